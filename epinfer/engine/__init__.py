"""Engine: requests, scheduling, cache accounting, the step loop and the `LLM` API."""

"""The rank runtime: the description of a run (`Job`), spawning or joining the ranks, the rank
worker that builds the engine and attaches the diagnostics, and the lockstep step loop. What a
rank does once it is up (generate, serve, bench) is passed in as a callable, never imported."""

"""Model runner: batch construction, forward, sampling."""

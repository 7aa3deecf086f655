"""Where blocking work runs: a thread pool for syscalls, rate limits for jobs."""

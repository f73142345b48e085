"""The machine and this process: the compute device and its streams, host memory (pinned buffers, arenas),
the memory this process holds, threads, the cache directory, and the hardware profile with its store."""

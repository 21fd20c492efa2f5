"""Frontends: the `distattn` command (`cli`), its launcher (`launch`), the HTTP server (`server`, `engine_loop`)
and the benchmarks behind `distattn bench`."""

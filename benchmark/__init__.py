"""Benchmarks: a load generator for the running server, the transformers baseline and the engine's
own decode loop, measured side by side by `make bench` (benchmark/run_all.py)."""

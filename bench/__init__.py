"""Benchmarks: run each from the project root as `python -m bench.<name>` (see bench/README.md)."""

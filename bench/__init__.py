"""Benchmarks: `python -m bench.<name>`; results in bench/RESULTS.md."""

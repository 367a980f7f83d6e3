"""Benchmarks: `python bench/run.py` runs them all and prints Markdown for RESULTS.md."""

"""Runnable benchmarks (see benchmarks/README.md). Each prints figures and ratios
measured in the same run."""

"""Benchmarks: each script checks targets and writes its results to bench/results/."""

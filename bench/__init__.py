"""Benchmarks (installed as steerops.bench)."""

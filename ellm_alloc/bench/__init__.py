"""Benchmarks: `python -m ellm_alloc.bench {replay,hotpath} ...`."""

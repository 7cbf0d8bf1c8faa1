"""Benchmarks: measurements, not tests. Run each from the repository root as
``python -m benchmarks.<name>``; see benchmarks/README.md."""

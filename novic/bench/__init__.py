"""Benchmarks: our runtime (torch-free, measure.py) vs the original-style PyTorch pipeline
(baseline.py) on the same random-weight models (setup.py). See docs/benchmarks.md."""

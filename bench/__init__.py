"""Benchmarks of the platform (figures 1-6 of bench/README.md); run ``python -m bench``."""

"""Benchmarks: scripts that measure the product and the synthetic cohort."""

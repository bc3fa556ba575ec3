"""Study files, the synthetic multi-centre cohort and benchmarks."""

"""radfed test suite."""

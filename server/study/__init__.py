"""The study: its driver and phases, external validation, running and recording a run."""

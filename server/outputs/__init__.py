"""What a run leaves for people: the run folder, figures, nomogram, report, comparisons."""

"""ComBat harmonisation across sites (distributed ComBat, Chen et al. 2022)."""

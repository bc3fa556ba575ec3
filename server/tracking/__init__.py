"""MLflow: study runs, their artifacts and the registered pipeline model."""

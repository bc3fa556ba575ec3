"""The coordinator: solvers, the study driver, MLflow tracking, the ServerApp."""

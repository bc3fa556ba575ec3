"""The coordinator, one room per layer.

- ``stats/``: the coordinator half of each federated statistic (solvers, LASSO, mRMR,
  evaluation, inference, ICC); imports neither Flower, MLflow, matplotlib nor site code.
- ``federation/``: the transport interface and its three transports, the ServerApp.
- ``study/``: the study driver, its phases, external validation, the run and its record.
- ``outputs/``: the run folder, figures, the nomogram chart, the report, run comparison.
- ``tracking/``: MLflow runs and the registered pipeline model.
- ``results.py``: the result objects every layer passes on; ``api.py``: the Python API.
"""

"""radfed's Python API for notebooks: ``from radfed.api import Federation, ...``.

A federation over site folders or pandas DataFrames (in-process), and federated
estimators with scikit-learn's contract and statsmodels-style results. The
implementation is :mod:`radfed.server.api`; docs/python-api.md walks through the
heart-disease study with it.
"""

from radfed.server.api import *  # noqa: F403 - this module is the public name of it
from radfed.server.api import __all__  # noqa: F401

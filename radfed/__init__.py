"""radfed: federated multi-centre radiomics nomograms.

The product's folders are imported under this namespace: ``radfed.client`` (what runs
in a hospital), ``radfed.server`` (the coordinator), ``radfed.shared`` (both sides),
``radfed.harmonization`` (ComBat), ``radfed.experiments`` (cohorts and studies),
``radfed.deploy`` (containers and runbooks) and ``radfed.tests``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("radfed")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

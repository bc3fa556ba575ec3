"""The study driver: the phases of a federated study run, over any transport.

Phases: consistency (sites agree on extraction settings and variables), split (each site
splits its own patients), standardisation (pooled mean and SD), the logistic model
(Newton-Raphson), and evaluation (per site and split). The number of federated rounds
of each phase is recorded.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np

import radfed
from radfed.server.protocol import Transport
from radfed.server.results import StudyResult
from radfed.server.solvers import fit_logistic, pooled_standardisation
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import Payload

log = logging.getLogger(__name__)

MODEL = "logistic"
CONSISTENT = ("features", "clinical", "settings_hash", "pyradiomics_version")


def check_consistency(described: dict[str, Payload]) -> dict[str, Any]:
    """Refuse a federation whose sites extracted or named their data differently.

    Returns
    -------
    dict
        The shared values (feature names, extraction settings hash, versions).

    Raises
    ------
    FederationError
        Listing every site that differs from the first site, and how.
    """
    reference_site, reference = next(iter(described.items()))
    problems = []
    for site, reply in described.items():
        for key in CONSISTENT:
            if reply[key] != reference[key]:
                mine, theirs = reply[key], reference[key]
                if isinstance(mine, list):
                    extra = sorted(set(mine) - set(theirs))[:5]
                    lacking = sorted(set(theirs) - set(mine))[:5]
                    detail = (
                        f"extra {extra}, lacking {lacking}"
                        if extra or lacking
                        else "different order"
                    )
                else:
                    detail = f"{mine!r} vs {theirs!r}"
                problems.append(f"{site} differs from {reference_site} in {key}: {detail}")
    if problems:
        raise FederationError("sites are not consistent:\n  " + "\n  ".join(problems))
    return {key: reference[key] for key in CONSISTENT} | {
        "radfed_version": reference["radfed_version"]
    }


class FederatedStudy:
    """Run a study over a transport and collect a :class:`StudyResult`.

    Parameters
    ----------
    config : StudyConfig
    transport : Transport
        Any of the three transports; the driver does not know which.
    """

    def __init__(self, config: StudyConfig, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        transport.protocol = config.protocol()

    def _phase(self, name: str) -> None:
        self.transport.step = name
        log.info("phase: %s", name)

    def run(self) -> StudyResult:
        cfg, transport = self.config, self.transport

        self._phase("consistency")
        described = transport.ask("describe")
        for site, reply in described.items():
            if reply["site"] != site:
                raise FederationError(f"site {site!r} answered as {reply['site']!r}")
        shared = check_consistency(described)

        self._phase("split")
        split = transport.ask("split")

        columns = list(shared["clinical"]) + list(shared["features"])
        self._phase("standardise")
        center, scale, _ = pooled_standardisation(transport, columns)

        self._phase("logistic")
        fit = fit_logistic(transport, columns, center, scale, outcome=cfg.outcome)
        log.info("logistic fit: %d iterations, deviance %.4f", fit.iterations, fit.deviance)

        self._phase("evaluate")
        evaluated = transport.ask(
            "evaluate", {"columns": columns, "center": center, "scale": scale, "beta": fit.coef}
        )

        sites = {
            site: {
                "n": described[site]["n"],
                "events": described[site]["events"],
                "n_excluded": described[site]["n_excluded"],
                **{
                    subset: {
                        "n": split[site][f"n_{subset}"],
                        "events": split[site][f"events_{subset}"],
                    }
                    for subset in ("train", "test")
                },
            }
            for site in described
        }
        performance = {
            MODEL: {
                site: {
                    subset: {
                        "n": int(r[f"n_{subset}"]),
                        "events": int(r[f"events_{subset}"]),
                        "auc": _float(r[f"auc_{subset}"]),
                    }
                    for subset in ("train", "test")
                }
                for site, r in evaluated.items()
            }
        }
        federation = {
            **shared,
            "sites": list(described),
            "n_features": len(shared["features"]),
            "flwr_version": _flwr_version(),
            "radfed_version": radfed.__version__,
        }
        return StudyResult(
            study=cfg.name,
            outcome=cfg.outcome,
            transport=transport.name,
            sites=sites,
            models={MODEL: fit},
            performance=performance,
            rounds=dict(transport.rounds),
            federation=federation,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )


def _float(value: Any) -> float:
    value = float(value)
    return value if np.isfinite(value) else float("nan")


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")

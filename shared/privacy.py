"""Privacy rules a site enforces on every reply it sends.

The rules follow DataSHIELD's disclosure filters: no count below ``min_cell``
(nfilter.tab, default 3), no model with more parameters than a third of the patients
(nfilter.glm), and no array whose shape grows with the number of patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from radfed.shared.errors import PrivacyRefusal


@dataclass(frozen=True)
class PrivacyPolicy:
    """A site's disclosure limits. Set by the site; the coordinator cannot lower them.

    Parameters
    ----------
    min_cell : int
        Smallest count a site may send (patients, events or non-events of any subset).
    max_param_fraction : float
        Largest ratio of model parameters to patients a site will fit on.
    """

    min_cell: int = 3
    max_param_fraction: float = 1 / 3

    def __post_init__(self) -> None:
        if self.min_cell < 1:
            raise ValueError(f"min_cell must be at least 1, got {self.min_cell}")
        if not 0 < self.max_param_fraction <= 1:
            raise ValueError(f"max_param_fraction must be in (0, 1], got {self.max_param_fraction}")

    def check_counts(self, counts: Mapping[str, int], context: str) -> None:
        """Refuse when any count that would be sent is below ``min_cell`` (zero included)."""
        small = {name: int(c) for name, c in counts.items() if int(c) < self.min_cell}
        if small:
            listed = ", ".join(f"{k}={v}" for k, v in small.items())
            raise PrivacyRefusal(
                f"{context}: count below the site's minimum cell size {self.min_cell} ({listed})"
            )

    def check_parameters(self, n_params: int, n_rows: int, context: str) -> None:
        """Refuse a model whose parameter count exceeds ``max_param_fraction`` of the rows."""
        if n_params > self.max_param_fraction * n_rows:
            raise PrivacyRefusal(
                f"{context}: {n_params} parameters for {n_rows} patients exceeds the site's "
                f"limit of {self.max_param_fraction:.3g} parameters per patient"
            )

    @staticmethod
    def check_shapes(
        reply: Mapping[str, object], allowed_dims: Iterable[int], context: str
    ) -> None:
        """Refuse a reply holding an array with a dimension the request did not fix.

        Every array dimension must be one of ``allowed_dims``, which the site derives
        from the request (number of columns, bins, thresholds), never from its data, so
        no reply can carry one value per patient.
        """
        allowed = set(allowed_dims)
        for key, value in reply.items():
            if isinstance(value, np.ndarray) and any(d not in allowed for d in value.shape):
                raise PrivacyRefusal(
                    f"{context}: reply field {key!r} of shape {value.shape} is not an aggregate "
                    f"of the requested size {sorted(allowed)}"
                )

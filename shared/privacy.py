"""Privacy rules a site enforces on every reply it sends.

The rules follow DataSHIELD's disclosure filters and go further where those are known
to be bypassable (Huth et al., Bioinformatics 2023). The site, never the request,
decides what it computes over and how (see ``docs/privacy.md`` for the threat model):

========================  ==============================================================
rule                      what it stops
========================  ==============================================================
``min-cell``              any count sent (patients, events, non-events of any subset,
                          fold, bin or threshold cell; exclusions) between 1 and
                          ``min_cell - 1`` (DataSHIELD's nfilter.tab)
``parameters``            more fitted parameters in one request, all models together,
                          than ``max_param_fraction`` of the patients (nfilter.glm)
``shape``                 an array whose size the request did not fix (one per patient)
``saturation``            a model whose linear predictor is beyond ``±saturation_logit``
                          for more than ``max_saturated_share`` of the patients: a sum
                          over such a model is a count of patients past a threshold
``concentration``         a logistic fit whose weights sit on fewer than ``min_cell``
                          patients (a steep model centred on one patient makes the
                          Hessian that patient's x xᵀ)
``standardisation``       a centre or scale unlike the site's own data (a near-zero
                          scale turns a sum into a count)
``differencing``          an aggregate over a patient set that differs from an already
                          answered one by fewer than ``min_cell`` patients
``pinned-study``          a request that changes a study's protocol after the site first
                          answered it
========================  ==============================================================

Refusals name the rule and where it applied, never the small count they protect.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from radfed.shared.errors import PrivacyRefusal

RULES = (
    "min-cell",
    "parameters",
    "shape",
    "saturation",
    "concentration",
    "standardisation",
    "differencing",
    "pinned-study",
)


def refuse(rule: str, context: str, detail: str) -> PrivacyRefusal:
    """A refusal naming the rule: ``"{context}: refused by the {rule} rule: {detail}"``.

    ``detail`` states the rule, never a count from the site's data.
    """
    return PrivacyRefusal(f"{context}: refused by the {rule} rule: {detail}", rule=rule)


@dataclass(frozen=True)
class PrivacyPolicy:
    """A site's disclosure limits. Set by the site; the coordinator cannot lower them.

    Parameters
    ----------
    min_cell : int
        Smallest non-zero count a site may send, and the smallest difference between
        two patient sets it answers over.
    max_param_fraction : float
        Largest ratio of fitted parameters (all models of a request together) to
        patients.
    saturation_logit : float
        A linear predictor beyond ``±saturation_logit`` is saturated (at 12, a
        predicted risk within 6e-6 of 0 or 1).
    max_saturated_share : float
        Largest share of a site's patients a model may saturate.
    max_scale_ratio : float
        A requested scale must lie within this factor of the site's own SD of the
        column, and a requested centre within this many of the site's SDs of its mean.
    """

    min_cell: int = 3
    max_param_fraction: float = 1 / 3
    saturation_logit: float = 12.0
    max_saturated_share: float = 0.5
    max_scale_ratio: float = 10.0

    def __post_init__(self) -> None:
        # Every limit a finite real number: None or a string would raise a TypeError in
        # the comparisons below, and NaN would pass them and switch a rule off.
        for name in (
            "min_cell",
            "max_param_fraction",
            "saturation_logit",
            "max_saturated_share",
            "max_scale_ratio",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
            ):
                kind = "whole number" if name == "min_cell" else "finite number"
                shown = repr(value)
                if len(shown) > 40 or "\n" in shown:  # one line, whatever was passed
                    shown = f"a {type(value).__name__}"
                raise ValueError(f"{name} must be a {kind}, got {shown}")
        if int(self.min_cell) != self.min_cell:
            raise ValueError(f"min_cell must be a whole number, got {self.min_cell!r}")
        if self.min_cell < 1:
            raise ValueError(f"min_cell must be at least 1, got {self.min_cell}")
        if not 0 < self.max_param_fraction <= 1:
            raise ValueError(f"max_param_fraction must be in (0, 1], got {self.max_param_fraction}")
        if not 0 < self.max_saturated_share < 1:
            raise ValueError("max_saturated_share must be in (0, 1)")
        if self.saturation_logit <= 0 or self.max_scale_ratio <= 1:
            raise ValueError("saturation_logit must be > 0 and max_scale_ratio > 1")

    # -- counts -----------------------------------------------------------------------

    def small(self, count: float) -> bool:
        """Whether ``count`` may not be sent: between 1 and ``min_cell - 1``."""
        return 0 < count < self.min_cell

    def check_counts(
        self, counts: Mapping[str, float], context: str, allow_zero: bool = False
    ) -> None:
        """Refuse when a count that would be sent is below ``min_cell``.

        Zero is refused too unless ``allow_zero`` (an empty subset is not a cohort; an
        empty bin or threshold cell discloses nothing).
        """
        for count in counts.values():
            if self.small(count) or (count == 0 and not allow_zero):
                raise refuse(
                    "min-cell",
                    context,
                    f"a count of patients, events or non-events would be below the site's "
                    f"minimum cell size {self.min_cell}",
                )

    def suppress(self, counts: Mapping[str, int], other: str = "other reasons") -> dict[str, int]:
        """Counts safe to publish: each below ``min_cell`` goes into ``other``, and so do
        the smallest others until ``other`` passes too (complementary suppression: its
        total, else known as a difference, may not be small). -1 marks a withheld count.
        """
        shown = {k: int(v) for k, v in counts.items() if int(v) > 0}
        merged = sum(v for v in shown.values() if self.small(v))
        shown = {k: v for k, v in shown.items() if not self.small(v)}
        while self.small(merged) and shown:
            smallest = min(shown, key=lambda k: (shown[k], k))
            merged += shown.pop(smallest)
        ordered = dict(sorted(shown.items(), key=lambda kv: (-kv[1], kv[0])))
        if merged:
            ordered[other] = -1 if self.small(merged) else merged
        return ordered

    def check_parameters(self, n_params: int, n_rows: int, context: str) -> None:
        """Refuse fitting more than ``max_param_fraction`` parameters per patient."""
        if n_params > self.max_param_fraction * n_rows:
            raise refuse(
                "parameters",
                context,
                f"{n_params} parameters exceed the site's limit of "
                f"{self.max_param_fraction:.3g} parameters per patient",
            )

    # -- crafted models ---------------------------------------------------------------

    def check_standardisation(
        self, x: np.ndarray, center: np.ndarray, scale: np.ndarray, context: str
    ) -> None:
        """Refuse a centre or scale unlike the site's own data in ``x`` (n, p).

        An honest request standardises with the federation's pooled mean and SD, which
        lie near the site's own; a scale far below the site's SD makes a logistic score
        a count of patients past a threshold. Constant columns at the site are exempt
        (nothing to learn from them).
        """
        x = np.asarray(x, dtype=float)
        center = np.broadcast_to(np.asarray(center, dtype=float), (x.shape[1],))
        scale = np.broadcast_to(np.asarray(scale, dtype=float), (x.shape[1],))
        if not (np.all(np.isfinite(center)) and np.all(np.isfinite(scale))):
            raise refuse("standardisation", context, "the centre and scale must be finite")
        if np.any(scale <= 0):
            raise refuse("standardisation", context, "every scale must be positive")
        if len(x) == 0:
            return
        mean, sd = x.mean(axis=0), x.std(axis=0)
        varying = sd > 1e-12 * np.maximum(1.0, np.abs(mean))
        r = self.max_scale_ratio
        bad_scale = varying & ((scale < sd / r) | (scale > sd * r))
        bad_center = varying & (np.abs(center - mean) > r * sd)
        if np.any(bad_scale | bad_center):
            raise refuse(
                "standardisation",
                context,
                f"a centre or scale is more than {r:g} of the site's own standard "
                "deviations from its data",
            )

    def check_linear_predictor(
        self, eta: np.ndarray, context: str, weights: np.ndarray | None = None
    ) -> None:
        """Refuse a saturated linear predictor, or fitting weights concentrated on few
        patients.

        Parameters
        ----------
        eta : ndarray of shape (n,) or (n, B)
            Linear predictor of each patient (for each of B problems).
        weights : ndarray of shape (n,) or (n, B), optional
            Logistic weights p(1-p) of the rows a fit sums over; their effective number
            of patients, (Σw)² / Σw², must be at least ``min_cell``.
        """
        eta = np.asarray(eta, dtype=float)
        if eta.size == 0:
            return
        if not np.all(np.isfinite(eta)):
            raise refuse("saturation", context, "the linear predictor is not finite")
        share = np.mean(np.abs(eta) > self.saturation_logit, axis=0)
        if np.any(share > self.max_saturated_share):
            raise refuse(
                "saturation",
                context,
                f"the model's linear predictor exceeds ±{self.saturation_logit:g} for more "
                f"than {self.max_saturated_share:.0%} of the patients",
            )
        if weights is not None:
            w = np.asarray(weights, dtype=float)
            total, squares = w.sum(axis=0), (w**2).sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                n_eff = np.where(squares > 0, total**2 / squares, 0.0)
            if np.any(n_eff < self.min_cell):
                raise refuse(
                    "concentration",
                    context,
                    "the fit's weights rest on fewer patients than the site's minimum "
                    f"cell size {self.min_cell}",
                )

    # -- reply shapes -----------------------------------------------------------------

    @staticmethod
    def check_shapes(
        reply: Mapping[str, object], allowed_dims: Iterable[int], context: str
    ) -> None:
        """Refuse a reply holding an array with a dimension the request did not fix.

        Every array dimension must be one of ``allowed_dims``, which the site derives
        from the request (number of columns, models) and its own grids (thresholds,
        bins), never from its data, so no reply can carry one value per patient.
        """
        allowed = set(allowed_dims)
        for key, value in reply.items():
            if isinstance(value, np.ndarray) and any(d not in allowed for d in value.shape):
                raise refuse(
                    "shape",
                    context,
                    f"reply field {key!r} of shape {value.shape} is not an aggregate of a "
                    "size the request fixed",
                )

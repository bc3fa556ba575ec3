"""Federated mRMR feature selection (minimum redundancy, maximum relevance).

Reproduces ``mrmr.mrmr_classif(X, y, K)`` of the ``mrmr-selection`` package with its
defaults (``relevance="f"``, ``redundancy="c"``, ``denominator="mean"``) on the pooled
rows of all sites, from per-site sums only:

* relevance of feature i: the one-way ANOVA F-statistic between the outcome classes
  (sklearn's ``f_classif`` formula, from per-class n, Σx, Σx²);
* features whose F is not > 0 (constant, no class difference) are never selected, and
  at most that many features are returned;
* first pick: the largest F; then at each step the candidate maximising
  F_i / mean_{s selected} max(|r_is|, 0.001), where r is Pearson's correlation and the
  denominator is replaced by +inf when it equals 1 (a copy of the selected features:
  score 0); ties go to the earlier feature in ``feature_names``.

Two ways to get the correlations (both send only aggregates):

``mode="columns"`` (default), at most k rounds
    Round 1: per-class moments. Then, for the feature just picked, each site sends the p
    centred cross-products Σ (x_i - x̄_i)(x_s - x̄_s) with it, and with it those of the
    ``prefetch`` (default 3) next-best candidates: when the next pick is one of them, it
    costs no round. A site sends at most (1 + prefetch)·k·p numbers in all (4 x 30 x 1300
    floats = 1.2 MB): columns of features that were, or nearly were, picked.
``mode="gram"``, 1 round
    Each site also sends its full XᵀX, p x p (13.5 MB per site for p = 1300). Fewer round
    trips, but ~p/k times more data, and when p exceeds a site's patients (the rule in
    radiomics) the Gram matrix pins the site's rows down up to a rotation, with every
    pairwise relation between features, most of which mRMR never reads.

The default is ``"columns"``: data minimisation wins over round trips, because each
round is one cheap matrix-vector product per site and k (~30) is small. Pass
``center``/``scale`` (the pooled mean and SD from the standardisation step) to make the
one-pass sums numerically safe for features with a large mean; in ``"columns"`` mode the
cross-products are always centred at the pooled mean learnt in round 1.

The site side is :func:`radfed.shared.selection_stats.answer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from radfed.shared.aggregate import sum_replies

#: mrmr-selection's floor on |r| in the redundancy denominator.
FLOOR = 0.001
#: Relative size of a sum of squares below which a feature counts as constant.
_CONSTANT_RTOL = 1e-12
#: A mean |r| this close to 1 counts as exactly 1 (mrmr-selection: ``replace(1.0, inf)``).
_ONE_ATOL = 1e-10

Ask = Callable[[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class MrmrResult:
    """The features mRMR picked, in order, with what decided each pick.

    Attributes
    ----------
    selected : list of str
        Selected feature names, in the order they were picked.
    selected_index : ndarray of shape (k,)
        Their positions in ``feature_names``.
    relevance : ndarray of shape (p,)
        F-statistic of every feature (0 for constant features).
    scores : ndarray of shape (k,)
        The mRMR score of each pick (F for the first, F / mean |r| after).
    redundancy : ndarray of shape (k,)
        The denominator of each pick: mean of max(|r|, 0.001) with the earlier picks
        (1 for the first pick).
    feature_names : list of str
    n : int
        Number of patients over all sites.
    n_sites : int
    rounds : int
        Federated rounds used.
    mode : str
        ``"columns"`` or ``"gram"`` (how the correlations were gathered).
    """

    selected: list[str]
    selected_index: np.ndarray
    relevance: np.ndarray
    scores: np.ndarray
    redundancy: np.ndarray
    feature_names: list[str] = field(repr=False)
    n: int
    n_sites: int
    rounds: int
    mode: str

    def summary(self) -> str:
        """A printable table of the picks."""
        width = max([len("feature"), *(len(s) for s in self.selected)])
        rule = "=" * (width + 50)
        lines = [
            "Federated mRMR (F-test relevance, mean |Pearson r| redundancy)".center(len(rule)),
            rule,
            f"Features: {len(self.feature_names)}   Selected: {len(self.selected)}   "
            f"Patients: {self.n}   Sites: {self.n_sites}   Rounds: {self.rounds} ({self.mode})",
            "-" * len(rule),
            f"{'rank':>4}  {'feature':<{width}}  {'F':>12}  {'mean |r|':>10}  {'score':>12}",
        ]
        for rank, (name, i, sc, red) in enumerate(
            zip(self.selected, self.selected_index, self.scores, self.redundancy, strict=True),
            start=1,
        ):
            red_txt = "--" if rank == 1 else f"{red:.4f}"
            lines.append(
                f"{rank:>4}  {name:<{width}}  {self.relevance[i]:>12.4f}  {red_txt:>10}  "
                f"{sc:>12.4f}"
            )
        lines.append(rule)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- statistics


def f_statistics(n: np.ndarray, sums: np.ndarray, sumsqs: np.ndarray) -> np.ndarray:
    """One-way ANOVA F of each feature from per-class counts, sums and sums of squares.

    The formula of sklearn's ``f_classif`` (so the federated and pooled values agree to
    rounding), except that a constant feature gets 0 instead of sklearn's rounding noise
    (NaN, 0 or a spurious value of either sign).

    Parameters
    ----------
    n : ndarray of shape (C,)
    sums, sumsqs : ndarray of shape (C, p)

    Returns
    -------
    ndarray of shape (p,)
        F; +inf when the classes differ but the feature is constant within each class.
    """
    n = np.asarray(n, dtype=float)
    sums = np.asarray(sums, dtype=float)
    sumsqs = np.asarray(sumsqs, dtype=float)
    present = n > 0
    n, sums, sumsqs = n[present], sums[present], sumsqs[present]
    n_total, n_classes = n.sum(), len(n)
    if n_classes < 2:
        raise ValueError("mRMR needs at least two outcome classes with patients")
    ss_all = sumsqs.sum(axis=0)
    sq_of_sum = sums.sum(axis=0) ** 2
    sstot = ss_all - sq_of_sum / n_total
    ssbn = (sums**2 / n[:, None]).sum(axis=0) - sq_of_sum / n_total
    sswn = sstot - ssbn
    msb = ssbn / (n_classes - 1)
    msw = sswn / (n_total - n_classes)
    tiny = _CONSTANT_RTOL * np.maximum(ss_all, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(sswn <= tiny, np.inf, msb / msw)
    return np.where(sstot <= tiny, 0.0, np.nan_to_num(f, nan=0.0, posinf=np.inf))


def _abs_corr(cross: np.ndarray, ss: np.ndarray, ss_j: float) -> np.ndarray:
    """|Pearson r| from centred cross-products and sums of squares; 0 where undefined
    (as pandas' ``corrwith(...).fillna(0)``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cross / np.sqrt(ss * ss_j)
    return np.clip(np.nan_to_num(np.abs(r), nan=0.0, posinf=0.0), 0.0, 1.0)


# --------------------------------------------------------------------------- greedy


def _greedy(
    relevance: np.ndarray, abs_corr_with: Callable[[int, np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mrmr-selection's ``mrmr_base`` loop on arrays.

    ``abs_corr_with(j, ranked)`` returns |r| of every feature with feature j, shape
    (p,); it is called once per pick except the last (each call may cost one federated
    round). ``ranked`` lists the other candidates best first by the score that picked j:
    the likely next picks, whose columns a caller may fetch in the same round.
    """
    remaining = relevance > 0  # mrmr: relevance[relevance.fillna(0) > 0]; NaN is False
    k = min(k, int(remaining.sum()))
    red_sum = np.zeros(len(relevance))  # Σ over picks of max(|r|, FLOOR)
    ranked = np.zeros(0, dtype=int)
    picks, scores, denominators = [], [], []
    for t in range(k):
        if t == 0:
            denom = np.ones(len(relevance))
        else:
            red_sum += np.maximum(abs_corr_with(picks[-1], ranked), FLOOR)
            denom = red_sum / t
            denom = np.where(np.abs(denom - 1.0) <= _ONE_ATOL, np.inf, denom)
        with np.errstate(invalid="ignore"):
            score = relevance / denom
        score = np.where(remaining & ~np.isnan(score), score, -np.inf)
        best = int(np.argmax(score))  # first maximum: the earlier feature wins ties
        picks.append(best)
        scores.append(score[best])
        denominators.append(denom[best])
        remaining[best] = False
        order = np.argsort(-score, kind="stable")
        ranked = order[remaining[order] & (score[order] > -np.inf)]
    return np.array(picks, dtype=int), np.array(scores), np.array(denominators)


# --------------------------------------------------------------------------- solvers


def mrmr_select(
    stats_sum: Mapping[str, np.ndarray],
    feature_names: Sequence[str],
    k: int = 30,
    n_sites: int = 0,
) -> MrmrResult:
    """mRMR from the sum of the sites' one-round statistics (``gram`` mode).

    Parameters
    ----------
    stats_sum : mapping
        The key-wise sum over sites of :func:`radfed.shared.selection_stats.class_moments`
        with ``gram=True``: ``n`` (C,), ``sum`` (C, p), ``sumsq`` (C, p), ``xtx`` (p, p).
    feature_names : sequence of str, length p
    k : int
        Number of features to select (fewer when fewer have a positive F).
    n_sites : int
        For the record only.

    Returns
    -------
    MrmrResult
    """
    names = _check_names(stats_sum, feature_names)
    relevance = f_statistics(stats_sum["n"], stats_sum["sum"], stats_sum["sumsq"])
    n_total = float(np.sum(stats_sum["n"]))
    total = np.asarray(stats_sum["sum"], dtype=float).sum(axis=0)
    xtx = np.asarray(stats_sum["xtx"], dtype=float)
    ss = np.diag(xtx) - total**2 / n_total

    def abs_corr_with(j: int, ranked: np.ndarray) -> np.ndarray:
        cross = xtx[:, j] - total * total[j] / n_total
        return _abs_corr(cross, ss, ss[j])

    idx, scores, denom = _greedy(relevance, abs_corr_with, k)
    return _result(names, idx, relevance, scores, denom, n_total, n_sites, 1, "gram")


def mrmr_federated(
    ask: Ask,
    feature_names: Sequence[str],
    k: int = 30,
    classes: Sequence[Any] = (0, 1),
    mode: Literal["columns", "gram"] = "columns",
    center: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    prefetch: int = 3,
) -> MrmrResult:
    """Run federated mRMR over the sites reached by ``ask``.

    Parameters
    ----------
    ask : callable
        ``ask(request) -> list of replies``: one federated round; every site answers
        ``request`` with :func:`radfed.shared.selection_stats.answer` on its rows.
    feature_names : sequence of str, length p
        The columns of the sites' feature matrices, in order.
    k : int
        Number of features to select.
    classes : sequence
        Outcome labels of the federation, in a fixed order.
    mode : {"columns", "gram"}
        ``"columns"``: k rounds, p numbers per site per round after the first (default);
        ``"gram"``: one round with p x p per site. See the module docstring.
    center, scale : ndarray of shape (p,), optional
        A common shift and scale for the sums (the pooled mean and SD), for accuracy.
    prefetch : int
        Columns mode: with each pick's column, also ask for the columns of up to this
        many next-best candidates (by the score that made the pick). When the next pick
        is among them it costs no round; the picks are the same for any value.

    Returns
    -------
    MrmrResult

    Notes
    -----
    Requests and replies (p features, C classes):

    1. ``{"step": "mrmr_moments", "classes", "center", "scale", "gram"}`` ->
       ``n`` (C,), ``sum`` (C, p), ``sumsq`` (C, p) [+ ``xtx`` (p, p) if gram].
    2. (columns mode, at most k - 1 more rounds) ``{"step": "mrmr_cross", "columns":
       [j, ...], "center", "scale"}`` -> ``cross`` (p, m), ``sumsq`` (p,), ``n``: the
       last pick's column and up to ``prefetch`` likely next ones.
    """
    if mode not in ("columns", "gram"):
        raise ValueError(f"mode must be 'columns' or 'gram', got {mode!r}")
    # Keys left out rather than None, so any transport can carry the request.
    shift = {
        key: np.asarray(value, dtype=float)
        for key, value in (("center", center), ("scale", scale))
        if value is not None
    }
    replies = ask(
        {"step": "mrmr_moments", "classes": list(classes), **shift, "gram": mode == "gram"}
    )
    first = sum_replies(replies)
    if mode == "gram":
        return mrmr_select(first, feature_names, k, n_sites=len(replies))

    names = _check_names(first, feature_names)
    relevance = f_statistics(first["n"], first["sum"], first["sumsq"])
    n_total = float(np.sum(first["n"]))
    # Centre the cross-products at the pooled mean (in the sites' original units).
    mean = np.asarray(first["sum"], dtype=float).sum(axis=0) / n_total
    if scale is not None:
        mean = mean * np.where(np.asarray(scale) > 0, scale, 1.0)
    if center is not None:
        mean = mean + np.asarray(center, dtype=float)
    rounds = 1
    crosses: dict[int, np.ndarray] = {}  # column j -> pooled Σ (x - m)(x_j - m_j)
    ss = np.zeros(len(names))

    def abs_corr_with(j: int, ranked: np.ndarray) -> np.ndarray:
        nonlocal rounds, ss
        if j not in crosses:
            # j and the likeliest next picks: a pick whose column came early costs no round.
            ahead = [int(c) for c in ranked if int(c) != j and int(c) not in crosses]
            columns = [int(j), *ahead[: max(int(prefetch), 0)]]
            request = {"step": "mrmr_cross", "columns": columns, "center": mean}
            if "scale" in shift:
                request["scale"] = shift["scale"]
            reply = sum_replies(ask(request))
            rounds += 1
            ss = np.asarray(reply["sumsq"], dtype=float)
            cross = np.asarray(reply["cross"], dtype=float)
            crosses.update({c: cross[:, i] for i, c in enumerate(columns)})
        return _abs_corr(crosses[j], ss, ss[j])

    idx, scores, denom = _greedy(relevance, abs_corr_with, k)
    return _result(names, idx, relevance, scores, denom, n_total, len(replies), rounds, mode)


def _check_names(stats: Mapping[str, np.ndarray], feature_names: Sequence[str]) -> list[str]:
    names = list(feature_names)
    p = np.shape(stats["sum"])[-1]
    if len(names) != p:
        raise ValueError(f"{len(names)} feature names for {p} features in the statistics")
    if len(set(names)) != len(names):
        raise ValueError("feature names must be unique")
    return names


def _result(
    names: list[str],
    idx: np.ndarray,
    relevance: np.ndarray,
    scores: np.ndarray,
    denom: np.ndarray,
    n_total: float,
    n_sites: int,
    rounds: int,
    mode: str,
) -> MrmrResult:
    return MrmrResult(
        selected=[names[i] for i in idx],
        selected_index=idx,
        relevance=relevance,
        scores=scores,
        redundancy=denom,
        feature_names=names,
        n=round(n_total),
        n_sites=n_sites,
        rounds=rounds,
        mode=mode,
    )

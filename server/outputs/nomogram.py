"""The nomogram chart of a logistic model, as R's rms ``nomogram()`` + ``plot.nomogram``.

Each predictor gets an axis of points: ``points_j(x) = (b_j x - min_j b_j x) * 100 / R``,
where ``b_j`` is the per-unit coefficient, ``min_j`` the smallest ``b_j x`` over the
predictor's displayed values and ``R`` the widest range of ``b_j x`` over all
predictors, so that predictor spans exactly 0-100 points and the others fewer. The
total of a patient's points maps back to the linear predictor
``lp = b_0 + sum_j min_j + total * R / 100`` and to the probability ``1 / (1 + e^-lp)``,
which the "Probability" axis shows: reading a patient off the chart gives the model's
prediction exactly. A negative coefficient gives an axis whose values decrease from
left to right, as in rms.

Display ranges. rms draws an axis over data quantiles; a federated study never sees
a row. A run's chart (:func:`~radfed.server.outputs.run_folder.nomogram_scales`) passes
``ranges={name: (lo, hi)}`` from ``evaluation["nomogram_ranges"]`` of results.json:
about the pooled 5th to 95th percentile of the training patients, bracketed on the
sites' fixed value grid from their merged counts, asked for in the ``evaluate`` round
(:mod:`radfed.server.stats.axis_ranges`). A range's ends are always kept as ticks, and
its end labels always drawn. Without a range, an axis covers the pooled mean ± 2 SD
(``LogisticFit.center`` / ``scale``), narrowed to the round tick values inside it (rms
also draws an axis between its first and last tick; the step is chosen so the ticks
cover at least 80% of the range). A predictor whose SD² equals mean·(1 - mean) within
1e-9, with 0 < mean < 1, is a 0/1 variable (its 1/n SD is exactly that) and gets the
axis {0, 1}, unless a range says otherwise.

Categorical predictors. A variable one-hot encoded with the federation's levels
(dummy columns ``name=level`` for every level but the first, the reference) is one
axis, as rms draws a factor: each level is a tick at its points (the reference's
coefficient is 0), labelled with its level name; ``categories={name: levels}`` says
which columns belong together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from radfed.server.outputs.plots import save_figure
from radfed.server.results import LogisticFit
from radfed.server.stats.axis_ranges import is_binary

#: Probabilities labelled on the probability axis when they fall within its range.
PROBABILITY_TICKS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_CHAR_POINTS = 0.9
_MIN_GAP = 3.0  # points units between tick labels on one axis, so labels do not collide


def nice_ticks(low: float, high: float, target: int = 6) -> np.ndarray:
    """Round tick values (steps 1, 2, 2.5 or 5 times a power of ten) within [low, high].

    At least two ticks are returned when ``low < high``: the step shrinks until they fit.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise ValueError(f"cannot place ticks on [{low}, {high}]")
    target = max(int(target), 2)
    while True:
        raw = (high - low) / (target - 1)
        magnitude = 10.0 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
        slack = step * 1e-9
        first, last = math.ceil((low - slack) / step), math.floor((high + slack) / step)
        ticks = np.arange(first, last + 1) * step
        if len(ticks) >= 2:
            decimals = max(0, -math.floor(math.log10(step)) + 1)
            return np.round(ticks, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
        target *= 2


def format_tick(value: float, step: float | None = None) -> str:
    """A tick label with no more decimals than the tick step needs."""
    if step is None or step <= 0:
        return f"{value:g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if step * 10**decimals % 1 > 1e-6:  # 2.5, 0.25: one more digit
        decimals += 1
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class VariableAxis:
    """One predictor's row of the nomogram.

    Attributes
    ----------
    name, label : str
        The model's column and the text shown left of the axis.
    coef : float
        Per-unit coefficient.
    low, high : float
        Displayed range (the axis ends).
    binary : bool
        A 0/1 variable (axis {0, 1}).
    ticks : tuple of float
        Values labelled on the axis, ascending.
    points_per_lp : float
        Points per unit of linear predictor (shared by all axes: 100 / R).
    levels : tuple of str
        A 0/1 predictor's level names, shown at 0 and 1 instead of the numbers; a
        categorical predictor's, one per category.
    categories : tuple of str
        A categorical predictor's levels (the reference first); its ticks are their
        indices and ``effects`` their per-level coefficients (0 for the reference).
    """

    name: str
    label: str
    coef: float
    low: float
    high: float
    binary: bool
    ticks: tuple[float, ...]
    points_per_lp: float
    levels: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    effects: tuple[float, ...] = ()

    @property
    def shift(self) -> float:
        """The smallest coef * x on the axis: the value that scores 0 points."""
        if self.categories:
            return min(self.effects)
        return min(self.coef * self.low, self.coef * self.high)

    @property
    def reversed(self) -> bool:
        """True when the axis runs from high to low values (negative coefficient)."""
        return self.coef < 0

    @property
    def max_points(self) -> float:
        if self.categories:
            return (max(self.effects) - min(self.effects)) * self.points_per_lp
        return abs(self.coef) * (self.high - self.low) * self.points_per_lp

    def points(self, value: float | str | np.ndarray) -> float | np.ndarray:
        """Points for ``value`` (linear: values off the axis extrapolate exactly); for
        a categorical predictor, ``value`` is a level (a code such as ``"4"`` or ``4``)."""
        if self.categories:
            effect = np.vectorize(self.effect, otypes=[float])(value)
            return (effect - self.shift) * self.points_per_lp
        return (self.coef * np.asarray(value, dtype=float) - self.shift) * self.points_per_lp

    def effect(self, level: float | str) -> float:
        """A categorical predictor's coefficient for ``level`` (0 for the reference).

        Raises
        ------
        KeyError
            A level the federation did not have.
        """
        code = level if isinstance(level, str) else f"{float(level):g}"
        if code not in self.categories:
            raise KeyError(f"{self.name}: level {level!r} is not one of {list(self.categories)}")
        return self.effects[self.categories.index(code)]

    def tick_points(self) -> np.ndarray:
        """The points of each tick (a categorical predictor's: of each level)."""
        if self.categories:
            return (np.asarray(self.effects) - self.shift) * self.points_per_lp
        return np.asarray(self.points(np.asarray(self.ticks)), dtype=float)

    def tick_labels(self) -> list[str]:
        if self.categories:
            return list(self.levels or self.categories)
        if self.binary and len(self.levels) == 2:
            return [self.levels[int(t)] for t in self.ticks]
        if self.binary or len(self.ticks) < 2:
            return [f"{t:g}" for t in self.ticks]
        step = min(np.diff(self.ticks))
        return [format_tick(t, step) for t in self.ticks]


@dataclass(frozen=True)
class NomogramScales:
    """Every scale of a nomogram: per-variable points, total points, probability.

    Build it with :meth:`from_fit`; read a patient with :meth:`points` and
    :meth:`probability_from_points`; draw it with :func:`nomogram_figure`.

    Attributes
    ----------
    variables : tuple of VariableAxis
        In the model's column order.
    intercept : float
        Per-unit intercept of the model.
    points_per_lp : float
        100 / R, R the widest range of coef * x among the predictors.
    outcome : str
        Named on the probability axis.
    probability_ticks : tuple of float
        Probabilities labelled on the probability axis (within the reachable totals).
    linear_predictor : bool
        Whether the figure draws a "Linear predictor" axis.
    """

    variables: tuple[VariableAxis, ...]
    intercept: float
    points_per_lp: float
    outcome: str
    probability_ticks: tuple[float, ...]
    linear_predictor: bool = False

    @classmethod
    def from_fit(
        cls,
        fit: LogisticFit,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        labels: Mapping[str, str] | None = None,
        levels: Mapping[str, Sequence[str] | Mapping[str, str]] | None = None,
        outcome: str | None = None,
        probabilities: Sequence[float] | None = None,
        linear_predictor: bool = False,
        categories: Mapping[str, Sequence[str]] | None = None,
    ) -> NomogramScales:
        """The nomogram of a fitted logistic model.

        Parameters
        ----------
        fit : LogisticFit
            Its per-unit coefficients are used (``fit.coef_per_unit``).
        ranges : mapping of str to (low, high), optional
            Displayed range of a predictor, overriding mean ± 2 SD and binary detection
            (see the module docstring).
        labels : mapping of str to str, optional
            Text shown for a predictor instead of its column name.
        levels : mapping of str to (str, str), optional
            Names of a 0/1 predictor's levels, shown at 0 and 1 (``[nomogram] levels``);
            for a categorical predictor, ``{level: name}`` (unnamed levels show as
            themselves) or one name per level.
        outcome : str, optional
            For the "Probability of ..." axis; ``fit.outcome`` by default.
        probabilities : sequence of float, optional
            Candidate probability ticks; :data:`PROBABILITY_TICKS` by default. Those
            outside the reachable totals are dropped; if fewer than three remain, round
            probabilities inside the range are used instead.
        linear_predictor : bool
            Also draw a "Linear predictor" axis.
        categories : mapping of str to sequence of str, optional
            The levels of each categorical predictor, the reference first: its dummy
            columns ``name=level`` (every level but the first) are drawn as one axis.

        Raises
        ------
        ValueError
            For a range or label naming no predictor, an empty or non-finite range, a
            categorical predictor whose dummy columns the model lacks, or a model in
            which no predictor moves the linear predictor.
        """
        ranges, labels, levels = dict(ranges or {}), dict(labels or {}), dict(levels or {})
        categories = {k: [str(v) for v in lv] for k, lv in (categories or {}).items()}
        dummies = {f"{name}={level}": name for name, lv in categories.items() for level in lv[1:]}
        lacking = sorted(set(dummies) - set(fit.columns))
        if lacking:
            raise ValueError(f"categorical dummy columns {lacking} are not in {fit.columns}")
        names = set(fit.columns) | set(categories)
        unknown = sorted((set(ranges) | set(labels) | set(levels)) - names)
        if unknown:
            raise ValueError(f"ranges/labels for unknown predictors {unknown}; has {fit.columns}")
        beta = np.asarray(fit.coef_per_unit, dtype=float)
        if not np.isfinite(beta).all():
            raise ValueError("the fit has non-finite coefficients")
        # Each categorical predictor's per-level coefficients (0 for the reference).
        effects = {
            name: [0.0, *(float(beta[1 + fit.columns.index(f"{name}={lv}")]) for lv in lv_all[1:])]
            for name, lv_all in categories.items()
        }
        numeric = [j for j, name in enumerate(fit.columns) if name not in dummies]

        # Display ranges and their ticks; the points scale needs all of them first.
        spans = []
        for j in numeric:
            name = fit.columns[j]
            center, scale = float(fit.center[j]), float(fit.scale[j])
            if name in ranges:
                low, high = map(float, ranges[name])
                binary = is_binary(center, scale) and (low, high) == (0.0, 1.0)
                explicit = True
            elif is_binary(center, scale):
                low, high, binary, explicit = 0.0, 1.0, True, True
            else:
                low, high, binary, explicit = center - 2 * scale, center + 2 * scale, False, False
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{name}: display range [{low}, {high}] is empty or not finite")
            spans.append((name, low, high, binary, explicit))
        category_spans = [max(e) - min(e) for e in effects.values()]
        widest = max(
            [abs(beta[j + 1]) * (s[2] - s[1]) for j, s in zip(numeric, spans, strict=True)]
            + category_spans
        )
        axes_ticks = []
        for j, (_, low, high, binary, explicit) in zip(numeric, spans, strict=True):
            if binary:
                axes_ticks.append((0.0, 1.0))
                continue
            share = abs(beta[j + 1]) * (high - low) / widest if widest > 0 else 0
            target = max(2, min(8, round(share * 100 / 12) + 1))
            ticks = nice_ticks(low, high, target)
            # Round ticks may leave much of the range out; finer steps until they cover 80%.
            while ticks[-1] - ticks[0] < 0.8 * (high - low) and target < 64:
                target *= 2
                ticks = nice_ticks(low, high, target)
            ticks = list(ticks)
            if explicit:
                step = ticks[1] - ticks[0]
                inner = [t for t in ticks if low + 0.3 * step < t < high - 0.3 * step]
                ticks = [low, *inner, high]
            axes_ticks.append(tuple(float(t) for t in ticks))

        ranges_shown = [(t[0], t[-1]) for t in axes_ticks]
        widest = max(
            [
                abs(beta[j + 1]) * (hi - lo)
                for j, (lo, hi) in zip(numeric, ranges_shown, strict=True)
            ]
            + category_spans
        )
        if not widest > 0:
            raise ValueError("no predictor moves the linear predictor: nothing to draw")
        per_lp = 100.0 / widest
        axes: dict[str, VariableAxis] = {
            name: VariableAxis(
                name=name,
                label=labels.get(name, name),
                coef=float(beta[j + 1]),
                low=ranges_shown[i][0],
                high=ranges_shown[i][1],
                binary=spans[i][3],
                ticks=axes_ticks[i],
                points_per_lp=per_lp,
                levels=tuple(levels.get(name, ())) if spans[i][3] else (),
            )
            for i, (j, name) in enumerate((j, fit.columns[j]) for j in numeric)
        }
        for name, lv_all in categories.items():
            axes[name] = VariableAxis(
                name=name,
                label=labels.get(name, name),
                coef=1.0,
                low=0.0,
                high=float(len(lv_all) - 1),
                binary=False,
                ticks=tuple(float(i) for i in range(len(lv_all))),
                points_per_lp=per_lp,
                levels=_level_names(lv_all, levels.get(name)),
                categories=tuple(lv_all),
                effects=tuple(effects[name]),
            )
        # In the model's column order, a categorical predictor where its first dummy is.
        order = dict.fromkeys(dummies.get(c, c) for c in fit.columns)
        variables = tuple(axes[name] for name in order)
        scales = cls(
            variables=variables,
            intercept=float(beta[0]),
            points_per_lp=per_lp,
            outcome=outcome or fit.outcome,
            probability_ticks=(),
            linear_predictor=linear_predictor,
        )
        candidates = PROBABILITY_TICKS if probabilities is None else probabilities
        ticks = scales._reachable(candidates)
        if len(ticks) < 3:
            p_low, p_high = (scales.probability_from_points(t) for t in (0, scales.max_total))
            ticks = scales._reachable(nice_ticks(p_low, p_high, target=6))
        return replace(scales, probability_ticks=tuple(ticks))

    # ------------------------------------------------------------------ reading

    @property
    def max_total(self) -> float:
        """The most total points a patient inside every axis can score."""
        return float(sum(v.max_points for v in self.variables))

    @property
    def total_ticks(self) -> np.ndarray:
        """Total-points ticks from 0 to the first round value at or above :attr:`max_total`."""
        ticks = nice_ticks(0.0, self.max_total, target=9)
        if ticks[-1] < self.max_total - 1e-9:
            ticks = np.append(ticks, ticks[-1] + (ticks[1] - ticks[0]))
        return ticks

    def variable(self, name: str) -> VariableAxis:
        for axis in self.variables:
            if axis.name == name:
                return axis
        raise KeyError(f"no predictor {name!r} in the nomogram")

    def points(self, x: Mapping[str, float]) -> float:
        """A patient's total points; ``x`` maps every predictor to a value, a
        categorical one to its level (extra keys, such as an ID, are ignored).

        Raises
        ------
        KeyError
            If a predictor is missing from ``x``.
        """
        missing = [v.name for v in self.variables if v.name not in x]
        if missing:
            raise KeyError(f"no value for {missing}")
        return float(
            sum(v.points(x[v.name] if v.categories else float(x[v.name])) for v in self.variables)
        )

    def linear_predictor_from_points(self, total: float) -> float:
        """The linear predictor (log-odds) at ``total`` points."""
        return self.intercept + sum(v.shift for v in self.variables) + total / self.points_per_lp

    def points_from_linear_predictor(self, lp: float) -> float:
        offset = self.intercept + sum(v.shift for v in self.variables)
        return (lp - offset) * self.points_per_lp

    def probability_from_points(self, total: float) -> float:
        """The predicted probability of the outcome at ``total`` points."""
        lp = self.linear_predictor_from_points(total)
        # Written for both signs so neither branch overflows.
        return 1 / (1 + math.exp(-lp)) if lp >= 0 else math.exp(lp) / (1 + math.exp(lp))

    def points_from_probability(self, p: float) -> float:
        return self.points_from_linear_predictor(math.log(p / (1 - p)))

    def _reachable(self, probabilities: Sequence[float]) -> list[float]:
        """Probabilities within (0, 1) whose totals fall inside [0, max_total]."""
        keep = []
        for p in sorted(float(p) for p in probabilities):
            if 0 < p < 1 and -1e-9 <= self.points_from_probability(p) <= self.max_total + 1e-9:
                keep.append(p)
        return keep

    def table(self) -> str:
        """The chart as text, as rms prints a nomogram: points per tick of each axis,
        then the probability at each total-points tick."""
        lines = []
        for v in self.variables:
            lines.append(f"{v.label:<24}{'Points':>8}")
            for label, points in zip(v.tick_labels(), v.tick_points(), strict=True):
                lines.append(f"  {label:<22}{points:8.1f}")
            lines.append("")
        lines.append(f"{'Total points':<24}{'Probability of ' + self.outcome}")
        for total in self.total_ticks:
            lines.append(f"  {total:<22g}{self.probability_from_points(total):.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _level_names(
    categories: Sequence[str], names: Sequence[str] | Mapping[str, str] | None
) -> tuple[str, ...]:
    """A categorical predictor's label per level: ``names`` as {level: name} or one name
    per level; a level without a name shows as itself."""
    if names is None:
        return tuple(categories)
    if isinstance(names, Mapping):
        return tuple(str(names.get(level, level)) for level in categories)
    if len(names) != len(categories):
        raise ValueError(
            f"{len(names)} level names for the {len(categories)} levels {list(categories)}"
        )
    return tuple(str(n) for n in names)


# --------------------------------------------------------------------------- drawing

_TICK = 0.14  # tick height, in row units
_LABEL_X = -40.0  # where row labels start, in points units


def nomogram_figure(scales: NomogramScales, title: str | None = None) -> Figure:
    """Draw the nomogram as ``plot.nomogram`` does.

    A "Points" ruler (0-100) on top, one axis per predictor (in points), then "Total
    points" and, below it, the "Probability of {outcome}" axis (and the "Linear
    predictor" axis if asked for). The total-points rows have their own scale across the
    full width. Light vertical lines every 10 points help read values up to the ruler.

    Parameters
    ----------
    scales : NomogramScales
    title : str, optional
        Drawn above the chart.
    """
    rows = 1 + len(scales.variables) + 2 + int(scales.linear_predictor)
    fig = Figure(figsize=(10.0, 0.9 + 0.62 * rows))
    ax = fig.add_axes((0.01, 0.02, 0.98, 0.9 if title else 0.96))
    ax.set_axis_off()
    ax.set_xlim(_LABEL_X - 1, 104)
    ax.set_ylim(-(rows - 1) - 0.6, 0.75)
    if title:
        fig.suptitle(title, fontsize=12)

    # The points ruler, with light guides down through the variable rows.
    y = 0.0
    bottom = -float(len(scales.variables))
    for p in range(0, 101, 10):
        ax.plot([p, p], [y, bottom], color="0.88", linewidth=0.6, zorder=0)
    _axis(ax, y, "Points", np.arange(0, 101, 10.0), [f"{p}" for p in range(0, 101, 10)])
    _minor(ax, y, np.arange(0, 101, 2.0))

    for i, v in enumerate(scales.variables, start=1):
        _axis(ax, -float(i), v.label, v.tick_points(), v.tick_labels(), every=bool(v.categories))

    # Total points (and the scales on it) use the full width for 0..last total tick.
    totals = scales.total_ticks
    width = 100.0 / float(totals[-1])
    y = -float(len(scales.variables) + 1)
    step = float(totals[1] - totals[0])
    _axis(ax, y, "Total points", totals * width, [format_tick(t, step) for t in totals])
    if scales.linear_predictor:
        y -= 1
        low, high = (scales.linear_predictor_from_points(t) for t in (0.0, scales.max_total))
        lps = nice_ticks(low, high, target=8)
        lp_step = float(lps[1] - lps[0])
        positions = np.array([scales.points_from_linear_predictor(t) for t in lps]) * width
        _axis(ax, y, "Linear predictor", positions, [format_tick(t, lp_step) for t in lps])
    y -= 1
    probs = list(scales.probability_ticks)
    positions = [scales.points_from_probability(p) * width for p in probs]
    _axis(ax, y, f"Probability of {scales.outcome}", np.array(positions), [f"{p:g}" for p in probs])
    return fig


def save_nomogram(
    scales: NomogramScales, path_without_suffix: str | Path, title: str | None = None
) -> list[Path]:
    """Draw the nomogram and write it as PNG and SVG (text kept as text in the SVG)."""
    return save_figure(nomogram_figure(scales, title), path_without_suffix, ("png", "svg"))


def _axis(
    ax: Axes,
    y: float,
    label: str,
    positions: np.ndarray,
    labels: Sequence[str],
    every: bool = False,
) -> None:
    """One nomogram row: its name, a line between its outer ticks, ticks, labels above.

    With ``every`` (a categorical predictor's levels) no label is dropped: one that
    would touch the last label above the line goes below it, as rms staggers them."""
    ax.text(_LABEL_X, y, label, ha="left", va="center", fontsize=10)
    if len(positions) == 0:
        ax.text(0, y, "(no ticks in range)", ha="left", va="center", fontsize=8, color="0.4")
        return
    ax.plot([positions.min(), positions.max()], [y, y], color="black", linewidth=1)
    items = sorted(zip(positions, labels, strict=True))
    margin = 2.0 if every else 1.0  # words need a wider gap than numbers

    def apart(i: int, k: int) -> bool:
        # Labels of 8-point text take about 0.9 points of the 0-100 scale per character.
        (xi, ti), (xk, tk) = items[i], items[k]
        return abs(xk - xi) >= max(_MIN_GAP, _CHAR_POINTS * (len(ti) + len(tk)) / 2 + margin)

    # A tick whose label would touch the last label stays unlabelled ...
    shown: list[int] = []
    for k in range(len(items)):
        if not shown or apart(shown[-1], k):
            shown.append(k)
    # ... but the axis's last value is always labelled, as its first (a range's ends are
    # the data's 5th and 95th percentiles): the labels before it make room.
    end = len(items) - 1
    if not every and end > 0 and shown[-1] != end:
        while len(shown) > 1 and not apart(shown[-1], end):
            shown.pop()
        if apart(shown[-1], end):  # an axis too short for both ends keeps its first
            shown.append(end)
    for k, (x, text) in enumerate(items):
        ax.plot([x, x], [y, y + _TICK], color="black", linewidth=1)
        if k in shown:
            if not every:
                text = text.replace("-", "−")  # a typographic minus, as matplotlib's axes
            ax.text(x, y + _TICK + 0.05, text, ha="center", va="bottom", fontsize=8)
        elif every:
            ax.text(x, y - 0.08, text, ha="center", va="top", fontsize=8)


def _minor(ax: Axes, y: float, positions: np.ndarray) -> None:
    for x in positions:
        ax.plot([x, x], [y, y + _TICK / 2], color="black", linewidth=0.6)

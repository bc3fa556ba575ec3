"""The nomogram reads back the model's own probability, on a real fit (UCI heart disease).

The fit is statsmodels' logistic regression on three real hospitals, on standardised
columns, packed by hand into a :class:`LogisticFit`; the probability a patient reads off
the chart is compared with the logistic model computed here from the per-SD coefficients
(not through ``coef_per_unit``, which the nomogram uses).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit

from radfed.experiments.heart_disease import read_hospital
from radfed.server.outputs.nomogram import (
    PROBABILITY_TICKS,
    NomogramScales,
    is_binary,
    nice_ticks,
    nomogram_figure,
    save_nomogram,
)
from radfed.server.results import LogisticFit

COLUMNS = ["age", "sex", "thalach", "exang", "oldpeak"]  # thalach protects: negative
LABELS = {"thalach": "Max heart rate", "oldpeak": "ST depression"}


@pytest.fixture(scope="module")
def heart_fit(shared_data: Path) -> LogisticFit:
    frames = [
        read_hospital(h, shared_data / "heart_disease") for h in ("cleveland", "hungarian", "va")
    ]
    data = pd.concat(frames)[[*COLUMNS, "disease"]].dropna()
    X, y = data[COLUMNS].to_numpy(float), data["disease"].to_numpy(int)
    center, scale = X.mean(axis=0), X.std(axis=0)  # pooled mean and 1/n SD, as radfed
    model = sm.Logit(y, sm.add_constant((X - center) / scale)).fit(disp=0)
    return LogisticFit(
        columns=COLUMNS,
        coef=np.asarray(model.params),
        cov=np.asarray(model.cov_params()),
        center=center,
        scale=scale,
        n=len(y),
        deviance=-2 * model.llf,
        iterations=int(model.mle_retvals["iterations"]),
        converged=bool(model.mle_retvals["converged"]),
        outcome="heart disease",
    )


def model_probability(fit: LogisticFit, x: dict[str, float]) -> float:
    """The model's probability straight from its per-SD coefficients."""
    values = np.array([x[c] for c in fit.columns])
    z = (values - fit.center) / fit.scale
    return float(expit(fit.coef[0] + fit.coef[1:] @ z))


def test_widest_predictor_spans_0_to_100(heart_fit: LogisticFit) -> None:
    scales = NomogramScales.from_fit(heart_fit)
    spans = {v.name: v.max_points for v in scales.variables}
    widest = max(spans, key=spans.get)
    assert spans[widest] == pytest.approx(100, abs=1e-12)
    assert all(span < 100 for name, span in spans.items() if name != widest)
    axis = scales.variable(widest)
    ends = sorted(float(axis.points(v)) for v in (axis.low, axis.high))
    assert ends == pytest.approx([0, 100], abs=1e-12)
    # Every axis starts at 0 points, and the ticks lie on it.
    for v in scales.variables:
        points = v.points(np.array(v.ticks))
        assert points.min() == pytest.approx(0, abs=1e-12)
        assert v.low == v.ticks[0] and v.high == v.ticks[-1]


def test_points_read_back_the_model_probability(heart_fit: LogisticFit) -> None:
    scales = NomogramScales.from_fit(heart_fit, ranges={"oldpeak": (0, 4)})
    rng = np.random.default_rng(11)
    for _ in range(200):
        x = {
            "age": rng.uniform(25, 80),
            "sex": float(rng.integers(0, 2)),
            "thalach": rng.uniform(80, 200),  # beyond the axis too: still exact
            "exang": float(rng.integers(0, 2)),
            "oldpeak": rng.uniform(-0.5, 5),
            "patient_id": "ignored",
        }
        total = scales.points(x)
        assert scales.probability_from_points(total) == pytest.approx(
            model_probability(heart_fit, x), abs=1e-9
        )
    # The axes' round trips agree with each other.
    lp = scales.linear_predictor_from_points(123.4)
    assert scales.points_from_linear_predictor(lp) == pytest.approx(123.4)
    assert scales.points_from_probability(0.3) == pytest.approx(
        scales.points_from_linear_predictor(np.log(0.3 / 0.7))
    )


def test_negative_coefficient_axis_is_reversed(heart_fit: LogisticFit) -> None:
    scales = NomogramScales.from_fit(heart_fit)
    thalach = scales.variable("thalach")
    assert thalach.coef < 0 and thalach.reversed
    assert thalach.points(thalach.low) > thalach.points(thalach.high) == pytest.approx(0)
    assert not scales.variable("age").reversed
    assert scales.variable("age").points(scales.variable("age").low) == pytest.approx(0)


def test_display_ranges_binary_and_mean_2sd(heart_fit: LogisticFit) -> None:
    scales = NomogramScales.from_fit(heart_fit, ranges={"oldpeak": (0, 4)}, labels=LABELS)
    binary = {v.name for v in scales.variables if v.binary}
    assert binary == {"sex", "exang"}
    for name in binary:
        assert scales.variable(name).ticks == (0.0, 1.0)
    j = COLUMNS.index("age")
    age = scales.variable("age")
    low, high = (
        heart_fit.center[j] - 2 * heart_fit.scale[j],
        heart_fit.center[j] + 2 * heart_fit.scale[j],
    )
    assert low <= age.low < age.high <= high  # narrowed to round ticks inside mean ± 2 SD
    assert age.high - age.low >= 0.8 * (high - low)
    assert all(t % 5 == 0 for t in age.ticks)
    oldpeak = scales.variable("oldpeak")
    assert (oldpeak.low, oldpeak.high) == (0, 4) and oldpeak.label == "ST depression"

    assert is_binary(0.3, np.sqrt(0.21))
    assert not is_binary(0.3, 0.5)
    assert not is_binary(0.0, 0.0)  # a constant is not a 0/1 variable
    with pytest.raises(ValueError, match="unknown predictors"):
        NomogramScales.from_fit(heart_fit, ranges={"cholesterol": (100, 300)})
    with pytest.raises(KeyError, match="exang"):
        scales.points({"age": 50, "sex": 1, "thalach": 150, "oldpeak": 1})


def test_probability_axis_ticks(heart_fit: LogisticFit) -> None:
    scales = NomogramScales.from_fit(heart_fit)
    assert set(scales.probability_ticks) <= set(PROBABILITY_TICKS)
    assert len(scales.probability_ticks) >= 3
    for p in scales.probability_ticks:
        assert 0 <= scales.points_from_probability(p) <= scales.max_total
    assert scales.total_ticks[0] == 0 and scales.total_ticks[-1] >= scales.max_total

    # A weak model: the default round probabilities are out of reach, finer ones are used.
    weak = LogisticFit(
        columns=["x"],
        coef=np.array([-1.0, 0.05]),
        cov=np.eye(2),
        center=np.array([10.0]),
        scale=np.array([2.0]),
        n=100,
        deviance=0.0,
        iterations=1,
        converged=True,
    )
    weak_scales = NomogramScales.from_fit(weak)
    assert len(weak_scales.probability_ticks) >= 2
    assert all(0.2 < p < 0.35 for p in weak_scales.probability_ticks)


def test_nice_ticks() -> None:
    # The step is the first of 1, 2, 2.5, 5 x 10^k at least (high - low) / (target - 1).
    assert nice_ticks(36.4, 72.3, 8).tolist() == [40, 50, 60, 70]
    assert nice_ticks(36.4, 72.3, 12).tolist() == [40, 45, 50, 55, 60, 65, 70]
    assert nice_ticks(0, 1, 5).tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert nice_ticks(-1.2, 3.2, 6).tolist() == [-1, 0, 1, 2, 3]
    assert len(nice_ticks(0.301, 0.302, 2)) >= 2
    with pytest.raises(ValueError):
        nice_ticks(1, 1)


def test_figure_png_and_svg(heart_fit: LogisticFit, tmp_path: Path) -> None:
    scales = NomogramScales.from_fit(heart_fit, labels=LABELS, linear_predictor=True)
    fig = nomogram_figure(scales)
    texts = {t.get_text() for t in fig.texts} | {t.get_text() for t in fig.axes[0].texts}
    assert {"Points", "Total points", "Linear predictor", "Probability of heart disease"} <= texts

    png, svg = save_nomogram(scales, tmp_path / "heart.nomogram", title="Heart disease")
    assert png == tmp_path / "heart.nomogram.png" and svg == tmp_path / "heart.nomogram.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    words = {"".join(e.itertext()).strip() for e in root.iter() if e.tag.endswith("text")}
    for v in scales.variables:
        assert v.label in words
    assert {"age", "Max heart rate", "ST depression", "Probability of heart disease"} <= words
    assert "0.5" in words  # probability tick labels are text too
    assert "age" in scales.table() and "Probability of heart disease" in str(scales)


def test_binary_axes_show_their_level_names(heart_fit: LogisticFit, tmp_path: Path) -> None:
    levels = {"sex": ("female", "male"), "exang": ("no", "yes")}
    scales = NomogramScales.from_fit(heart_fit, levels=levels, labels=LABELS)
    assert scales.variable("sex").tick_labels() == ["female", "male"]
    assert scales.variable("exang").tick_labels() == ["no", "yes"]
    assert scales.variable("age").levels == ()  # names only for 0/1 predictors
    # The names change the labels, never the points.
    plain = NomogramScales.from_fit(heart_fit, labels=LABELS)
    assert scales.points({c: 1.0 for c in COLUMNS}) == plain.points({c: 1.0 for c in COLUMNS})
    root = ET.parse(save_nomogram(scales, tmp_path / "named")[1]).getroot()
    words = {"".join(e.itertext()).strip() for e in root.iter() if e.tag.endswith("text")}
    assert {"female", "male", "no", "yes"} <= words


def test_study_file_nomogram_section_is_checked(tmp_path: Path) -> None:
    from radfed.shared.config import parse_study
    from radfed.shared.errors import StudyConfigError

    base = {
        "study": {"name": "s", "outcome": "y", "clinical": ["age", "sex"]},
        "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
    }
    names = {"labels": {"age": "Age (years)"}, "levels": {"sex": ["female", "male"]}}
    config = parse_study({**base, "nomogram": names}, tmp_path)
    assert config.nomogram_levels == {"sex": ("female", "male")}
    assert config.nomogram_labels == {"age": "Age (years)"}
    for bad, message in (
        ({"levels": {"sex": ["female"]}}, r"levels.sex must name the levels of 0 and 1"),
        ({"levels": {"weight": ["a", "b"]}}, r"levels for \['weight'\], which no model uses"),
        ({"labels": "Age"}, r"labels must be a table such as"),
        ({"colours": {}}, r"colours"),
    ):
        with pytest.raises(StudyConfigError, match=message):
            parse_study({**base, "nomogram": bad}, tmp_path)

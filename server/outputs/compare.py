"""Compare study runs tracked in MLflow: one metric per model, split and site, run by run.

Reads the parent runs of one experiment (tag ``radfed.kind`` = ``"study"``; runs from
before that tag count when they are not nested, i.e. have no ``mlflow.parentRunId``),
takes the metrics named ``{model}/{split}/{metric}/{site}`` (see
:mod:`radfed.server.tracking.runs`) and lays them out as a table: rows ``(model, split,
site)``, one column per run, oldest first, then one difference column per run against a
baseline run. A metric a parent run lacks is taken from its nested runs (the
``external`` runs of held-out sites), so ``split="external"`` compares external
validation too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from radfed.server.outputs.plots import model_color
from radfed.server.results import POOLED
from radfed.shared.errors import RadfedError

KIND_TAG = "radfed.kind"
PARENT_TAG = "mlflow.parentRunId"
INDEX = ["model", "split", "site"]
MODEL_ORDER = ("radiomics", "clinical", "nomogram")
#: Row keys of metrics that are not per-model (``site/{site}/{split}/n``, ``rounds/...``).
NOT_MODELS = {"site", "rounds"}
#: Summary rows after the hospitals.
LAST_SITES = (POOLED, "random_effects")
DIFF = "Δ "


class ComparisonError(RadfedError):
    """Runs cannot be compared: unknown experiment or run, no runs, metric not logged."""


# ---------------------------------------------------------------------------------------
# Reading MLflow


def _client(tracking_uri: str | None) -> Any:
    import logging

    from mlflow.tracking import MlflowClient

    # Opening an SQLite store that does not exist would silently create an empty one.
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ComparisonError(f"no MLflow store at {path} (tracking URI {tracking_uri})")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri)


def _experiment(client: Any, experiment: str) -> Any:
    """The experiment named ``experiment`` (or with that id)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = client.get_experiment(experiment)
        except MlflowException:
            found = None
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise ComparisonError(
            f"no MLflow experiment {experiment!r} in {client.tracking_uri}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    return found


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            max_results=1000,
            page_token=token,
            order_by=["attribute.start_time ASC"],
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _is_study_run(run: Any) -> bool:
    kind = run.data.tags.get(KIND_TAG)
    if kind is not None:
        return kind == "study"
    return PARENT_TAG not in run.data.tags  # runs logged before the tag existed


def _start(run: Any) -> datetime:
    return datetime.fromtimestamp((run.info.start_time or 0) / 1000, tz=UTC)


def _labels(runs: Sequence[Any]) -> list[str]:
    """``"{run name} {start, UTC}"``, with the short id added where two would clash."""
    labels = [
        f"{run.info.run_name or run.info.run_id[:8]} {_start(run):%Y-%m-%d %H:%M}" for run in runs
    ]
    return [
        f"{label} ({run.info.run_id[:8]})" if labels.count(label) > 1 else label
        for label, run in zip(labels, runs, strict=True)
    ]


def _pick(runs: Sequence[Any], wanted: str, what: str) -> Any:
    """The run whose id is ``wanted`` or starts with it."""
    hits = [r for r in runs if r.info.run_id == wanted] or [
        r for r in runs if r.info.run_id.startswith(wanted)
    ]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ComparisonError(f"{what} {wanted!r} is ambiguous: it starts {len(hits)} run ids")
    raise ComparisonError(f"{what} {wanted!r} is not a study run of this experiment")


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    parts = key.split("/", 3)
    if len(parts) != 4 or parts[0] in NOT_MODELS:
        return None
    return parts[0], parts[1], parts[2], parts[3]


def _model_key(model: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def _site_key(site: str) -> tuple[int, str]:
    return (1 + LAST_SITES.index(site), "") if site in LAST_SITES else (0, site)


def _row_key(row: tuple[str, str, str]) -> tuple[Any, ...]:
    return (_model_key(row[0]), row[1], _site_key(row[2]))


# ---------------------------------------------------------------------------------------
# The table


def compare_runs(
    experiment: str,
    tracking_uri: str | None = None,
    *,
    models: Sequence[str] | None = None,
    split: str = "test",
    metric: str = "auc",
    run_ids: Sequence[str] | None = None,
    last: int | None = None,
    baseline: str | None = None,
    sort_by: str | None = None,
    ascending: bool = True,
) -> pd.DataFrame:
    """One metric of every model, split and site across the study runs of an experiment.

    Parameters
    ----------
    experiment : str
        MLflow experiment name (or id).
    tracking_uri : str, optional
        MLflow tracking URI; MLflow's default (``$MLFLOW_TRACKING_URI``) when None.
    models : sequence of str, optional
        Models to keep (default: all logged).
    split : str
        ``"train"``, ``"test"`` or ``"external"``.
    metric : str
        A logged metric name: ``auc``, ``auc_ci_low``, ``brier``, ``cal_slope``,
        ``delong_p`` (its "models" are then pairs such as ``nomogram_vs_clinical``), ...
    run_ids : sequence of str, optional
        Runs to compare (full ids or unique prefixes); default all study runs that
        logged the metric (the others are listed in ``df.attrs["skipped"]``).
    last : int, optional
        Keep only the ``last`` most recent of the selected runs.
    baseline : str, optional
        Run (id, id prefix or column label) the differences are taken against; default
        the oldest selected run.
    sort_by : str, optional
        Sort the rows by this column (a run's label or id, a difference column, or
        ``model`` / ``split`` / ``site``); NaN last. See :func:`sort_comparison`.
    ascending : bool
        Sort order for ``sort_by``.

    Returns
    -------
    DataFrame
        Index ``(model, split, site)``; one column per run, oldest first, labelled
        ``"{run name} {start time, UTC}"``; then ``"Δ {label}"`` = run − baseline for
        every other run. NaN where a run did not log the metric (e.g. undefined).
        ``df.attrs`` holds ``experiment``, ``tracking_uri``, ``metric``, ``split``,
        ``baseline`` (label), ``runs`` (label -> run id) and ``skipped`` (ids of study
        runs left out because they did not log the metric).

    Raises
    ------
    ComparisonError
        Unknown experiment, run or model; no study runs; the metric is not logged for
        that split in the selected runs.
    """
    if last is not None and last < 1:
        raise ComparisonError(f"last must be at least 1, got {last}")
    client = _client(tracking_uri)
    exp = _experiment(client, experiment)
    everything = _all_runs(client, exp.experiment_id)
    runs = [r for r in everything if _is_study_run(r)]
    if not runs:
        raise ComparisonError(
            f"experiment {exp.name!r} has no study runs ({len(everything)} runs in all)"
        )
    if run_ids:
        picked = [_pick(runs, rid, "run") for rid in run_ids]
        ids = {r.info.run_id for r in picked}
        runs = [r for r in runs if r.info.run_id in ids]  # duplicates dropped
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    children: dict[str, list[Any]] = {}
    for run in everything:
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            children.setdefault(parent, []).append(run)

    columns: dict[str, dict[tuple[str, str, str], float]] = {}  # by run id
    logged: set[tuple[str, str]] = set()  # (split, metric) pairs seen, for the error
    for run in runs:
        metrics = dict(run.data.metrics)
        for child in children.get(run.info.run_id, []):
            for key, value in child.data.metrics.items():
                metrics.setdefault(key, value)
        column = {}
        for key, value in metrics.items():
            parts = _split_key(key)
            if parts is None:
                continue
            model, sp, met, site = parts
            logged.add((sp, met))
            if sp == split and met == metric:
                column[(model, sp, site)] = float(value)
        columns[run.info.run_id] = column

    rows = {key for column in columns.values() for key in column}
    if not rows:
        available = ", ".join(f"{m} ({s})" for s, m in sorted(logged, key=lambda t: t[::-1]))
        raise ComparisonError(
            f"metric {metric!r} of split {split!r} is not logged in the selected runs of "
            f"{exp.name!r}; logged: {available or 'none'}"
        )
    if models:
        present = {model for model, _, _ in rows}
        unknown = [m for m in models if m not in present]
        if unknown:
            raise ComparisonError(
                f"model(s) {', '.join(unknown)} have no {metric} ({split}) in the selected "
                f"runs; models there: {', '.join(sorted(present, key=_model_key))}"
            )
        rows = {r for r in rows if r[0] in models}
    # Runs that never logged this metric (e.g. older runs, for a newer metric) are left
    # out, unless asked for by id.
    skipped = []
    if not run_ids:
        skipped = [r.info.run_id for r in runs if not rows & columns[r.info.run_id].keys()]
        runs = [r for r in runs if r.info.run_id not in skipped]
    if last is not None:
        runs = runs[-last:]
    labels = _labels(runs)
    order = sorted(rows & {k for r in runs for k in columns[r.info.run_id]}, key=_row_key)
    if not order:
        raise ComparisonError(f"the selected runs have no {metric} ({split})")
    index = pd.MultiIndex.from_tuples(order, names=INDEX)
    df = pd.DataFrame(
        {
            label: [columns[run.info.run_id].get(r, math.nan) for r in order]
            for label, run in zip(labels, runs, strict=True)
        },
        index=index,
    )

    run_of = dict(zip(labels, (r.info.run_id for r in runs), strict=True))
    if baseline is None:
        base = labels[0]
    elif baseline in run_of:
        base = baseline
    else:
        base = labels[runs.index(_pick(runs, baseline, "baseline run"))]
    for label in labels:
        if label != base:
            df[DIFF + label] = df[label] - df[base]
    df.attrs.update(
        experiment=exp.name,
        tracking_uri=client.tracking_uri,
        metric=metric,
        split=split,
        baseline=base,
        runs=run_of,
        skipped=skipped,
    )
    if sort_by is not None:
        df = sort_comparison(df, sort_by, ascending=ascending)
    return df


def sort_comparison(df: pd.DataFrame, by: str, ascending: bool = True) -> pd.DataFrame:
    """Rows of a :func:`compare_runs` table sorted by one column, NaN last.

    ``by`` is a column label, ``model`` / ``split`` / ``site``, a run id (or unique
    prefix) meaning that run's column, ``"Δ "`` + a run id (prefix) for its difference,
    or the short names :func:`format_comparison` prints (``"#2"``, ``"Δ#2"``).
    """
    column = _column(df, by)
    flat = df.reset_index()
    flat = flat.sort_values(column, ascending=ascending, na_position="last", kind="stable")
    out = flat.set_index(INDEX)
    out.attrs = dict(df.attrs)
    return out


def _column(df: pd.DataFrame, by: str) -> str:
    if by in df.columns or by in INDEX:
        return by
    by_short = {short: column for column, short in _short_names(df).items()}
    if by.replace(" ", "") in by_short:  # "#2", "Δ#2": the names format_comparison prints
        return by_short[by.replace(" ", "")]
    runs: dict[str, str] = df.attrs.get("runs", {})
    diff = by.startswith(DIFF.strip())
    wanted = by.removeprefix(DIFF.strip()).strip()
    hits = [label for label, rid in runs.items() if rid.startswith(wanted)] if wanted else []
    if len(hits) == 1:
        column = DIFF + hits[0] if diff else hits[0]
        if column in df.columns:
            return column
    choices = ", ".join([*INDEX, *map(str, df.columns)])
    raise ComparisonError(f"cannot sort by {by!r}: not a column or run id; columns: {choices}")


# ---------------------------------------------------------------------------------------
# Output


def _short_names(df: pd.DataFrame) -> dict[str, str]:
    """``#1``, ``#2``, ... for the run columns, ``Δ#2`` ... for the differences."""
    runs = list(df.attrs.get("runs", {})) or [c for c in df.columns if not c.startswith(DIFF)]
    names = {label: f"#{i}" for i, label in enumerate(runs, 1)}
    names.update({DIFF + label: f"Δ{short}" for label, short in list(names.items())})
    return names


def format_comparison(
    df: pd.DataFrame, digits: int = 3, sort_by: str | None = None, ascending: bool = True
) -> str:
    """A plain-text table of a :func:`compare_runs` result.

    Run columns are numbered ``#1``, ``#2``, ... (oldest first) and explained under the
    table with their run ids; ``Δ#k`` is run k minus the baseline. Missing values print
    as "—".
    """
    if sort_by is not None:
        df = sort_comparison(df, sort_by, ascending=ascending)
    short = _short_names(df)
    flat = df.reset_index()
    head = [*INDEX, *(short.get(c, c) for c in df.columns)]

    def cell(column: str, value: Any) -> str:
        if column in INDEX:
            return str(value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        return f"{value:+.{digits}f}" if column.startswith(DIFF) else f"{value:.{digits}f}"

    body = [[cell(c, row[c]) for c in flat.columns] for _, row in flat.iterrows()]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    n_text = len(INDEX)

    def line(cells: Iterable[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i < n_text else f"{c:>{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    metric, split = df.attrs.get("metric", "?"), df.attrs.get("split", "?")
    title = f"{metric} ({split})"
    if df.attrs.get("experiment"):
        title += f" — experiment {df.attrs['experiment']!r}"
    lines = [title, line(head), "-" * len(line(head)), *(line(r) for r in body), ""]
    baseline = df.attrs.get("baseline")
    for label, rid in df.attrs.get("runs", {}).items():
        mark = "  (baseline)" if label == baseline else ""
        lines.append(f"{short[label]:>4} = {label}  [{rid}]{mark}")
    if baseline and len(df.attrs.get("runs", {})) > 1:
        lines.append(f"Δ#k = #k − {short[baseline]}")
    skipped = df.attrs.get("skipped") or []
    if skipped:
        lines.append(f"{len(skipped)} older study run(s) without {title.split(' — ')[0]} left out")
    return "\n".join(lines)


def comparison_figure(df: pd.DataFrame) -> Any:
    """Dot-and-line plot: one panel per site, the metric per run (oldest first, x axis),
    one colour per model. Returns a :class:`matplotlib.figure.Figure` (no pyplot)."""
    from matplotlib.figure import Figure

    runs = [c for c in df.columns if not str(c).startswith(DIFF)]
    short = _short_names(df)
    sites = sorted(df.index.get_level_values("site").unique(), key=_site_key)
    models = sorted(df.index.get_level_values("model").unique(), key=_model_key)
    pairs = {(m, s) for m, _, s in df.index}
    ncols = min(4, len(sites))
    nrows = math.ceil(len(sites) / ncols)
    fig = Figure(
        figsize=(max(4.5, 3.2 * ncols), 2.6 * nrows + 0.9 + 0.14 * len(runs)), layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    x = list(range(1, len(runs) + 1))
    for ax, site in zip(axes, sites, strict=False):
        for model in models:
            if (model, site) not in pairs:
                continue
            values = df.xs((model, site), level=("model", "site")).iloc[0][runs].astype(float)
            ax.plot(x, values.tolist(), "o-", color=model_color(model), label=model, lw=1.4, ms=5)
        ax.set_title(str(site), fontsize=10)
        ax.set_xticks(x, [short[r] for r in runs], fontsize=8)
        ax.set_xlim(0.5, len(runs) + 0.5)
        ax.grid(axis="y", color="0.9")
    for ax in axes[len(sites) :]:
        ax.set_visible(False)
    metric, split = df.attrs.get("metric", "value"), df.attrs.get("split", "")
    for ax in axes[::ncols]:
        name = "AUC" if metric == "auc" else metric
        ax.set_ylabel(f"{name} ({split})" if split else name)
    # One legend entry per model, whichever panel it appears in first.
    entries: dict[str, Any] = {}
    for ax in axes[: len(sites)]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(name, handle)
    fig.legend(
        list(entries.values()),
        list(entries),
        loc="outside upper right",
        ncols=len(entries),
        fontsize=8,
        frameon=False,
    )
    title = f"{metric.upper() if metric == 'auc' else metric} per site across runs"
    if df.attrs.get("experiment"):
        title += f" — {df.attrs['experiment']}"
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    baseline = df.attrs.get("baseline")
    key = "\n".join(f"{short[r]} = {r}" + ("  (baseline)" if r == baseline else "") for r in runs)
    fig.supxlabel(key, x=0.01, ha="left", fontsize=7, color="0.3")
    return fig


def write_comparison(
    df: pd.DataFrame, out_dir: str | Path, stem: str = "comparison"
) -> tuple[Path, Path]:
    """Write a :func:`compare_runs` table as CSV and its :func:`comparison_figure` as PNG.

    Returns
    -------
    (csv_path, png_path)
        ``out_dir/{stem}.csv`` (rows model, split, site; full precision, empty cells
        for missing values) and ``out_dir/{stem}.png`` (150 dpi).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    df.reset_index().to_csv(csv_path, index=False)
    comparison_figure(df).savefig(png_path, dpi=150)
    return csv_path, png_path

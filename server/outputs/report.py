"""A self-contained HTML report of one study run, for the statistician.

:func:`render_report` turns a ``results.json`` (schema ``radfed.results/2``; older files
render with what they hold) and the run's figures into ONE HTML page: inline CSS, images
embedded as base64 ``data:`` URIs, no external resource of any kind. A Content Security
Policy in the page forbids every network load, so the page reads the same offline, in
an e-mail attachment or archived beside the run.

A tiny inline script reports, once the page has loaded, what a headless browser can
check: ``<body data-images data-broken-images data-csp-violations
data-external-requests data-loaded>``.

:func:`report_from_run` builds the report of an MLflow run from its artifacts
(``results.json`` and ``figures/**.png``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import numbers
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from radfed.server.results import INTERCEPT, POOLED, by_count
from radfed.shared.errors import RadfedError

log = logging.getLogger(__name__)

MODEL_ORDER = ("radiomics", "clinical", "nomogram")
MODEL_TITLES = {
    "radiomics": "Radiomics model (Radscore)",
    "clinical": "Clinical model",
    "nomogram": "Nomogram (Radscore + clinical)",
}
SPLITS = ("train", "test")
FIGURE_KINDS = {
    "roc": "ROC curves",
    "calibration": "Calibration curves",
    "decision": "Decision curves",
    "lasso_cv": "LASSO cross-validation",
    "radscore": "Radscore coefficients",
    "forest": "External validation forest plot",
    "nomogram": "Nomogram",
}
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
}
NA = "—"
#: Nothing may be fetched: images are data: URIs, style and script are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

# Which ``approximate`` keys (pooled rows) concern which table column.
_APPROX_COLUMNS = {
    "auc": ("auc", "auc_se", "auc_ci"),
    "brier": ("brier",),
    "cutoff": ("cutoff",),
    "accuracy": ("accuracy", "accuracy_ci"),
    "sensitivity": ("sensitivity",),
    "specificity": ("specificity",),
    "cal_intercept": ("calibration", "intercept", "cal_intercept"),
    "cal_slope": ("calibration", "slope", "cal_slope"),
    "hl": ("calibration", "hl", "hl_statistic", "hl_df", "hl_p"),
}

_CSS = """
:root { --fg:#1b1b1b; --muted:#5f6368; --line:#d9d9d9; --head:#f3f5f8; --accent:#1f4e79;
        --warn:#9a3412; --ok:#166534; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff;
       font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
.layout { display:grid; grid-template-columns:13rem minmax(0,1fr); }
nav.toc { position:sticky; top:0; align-self:start; height:100vh; overflow-y:auto;
          padding:1.2rem 1rem; background:#fafbfc; border-right:1px solid var(--line);
          font-size:13px; }
nav.toc h2 { font-size:12px; text-transform:uppercase; letter-spacing:.06em;
             color:var(--muted); margin:0 0 .5rem; border:0; padding:0; }
nav.toc ol { list-style:none; margin:0; padding:0; }
nav.toc ol ol { padding-left:.9rem; font-size:12px; }
nav.toc a { display:block; padding:.15rem 0; color:var(--accent); text-decoration:none; }
nav.toc a:hover { text-decoration:underline; }
main { padding:1.5rem 2.2rem 4rem; max-width:78rem; }
header h1 { margin:0 0 .2rem; font-size:24px; }
header .sub { color:var(--muted); margin:0 0 1rem; }
dl.meta { display:grid; grid-template-columns:max-content 1fr; gap:.15rem 1.2rem; margin:0; }
dl.meta dt { color:var(--muted); }
dl.meta dd { margin:0; overflow-wrap:anywhere; }
section { margin-top:2.2rem; }
h2 { font-size:19px; border-bottom:2px solid var(--accent); padding-bottom:.2rem;
     margin:0 0 .8rem; }
h3 { font-size:15px; margin:1.3rem 0 .4rem; }
p.note, .muted { color:var(--muted); }
table { border-collapse:collapse; margin:.3rem 0 1rem; font-variant-numeric:tabular-nums; }
caption { caption-side:top; text-align:left; font-weight:600; padding:.2rem 0; }
th, td { padding:.22rem .6rem; border-bottom:1px solid var(--line); text-align:right;
         vertical-align:top; white-space:nowrap; }
thead th { background:var(--head); border-bottom:1px solid #b9bec6; font-weight:600; }
th.l, td.l { text-align:left; }
td.note { white-space:normal; text-align:left; color:var(--warn); font-size:12.5px;
          padding-top:0; }
tr.has-note td { border-bottom:0; }
.scroll + p.note { margin-top:-.4rem; }
tr.pooled td { background:#fbfaf3; }
tr.undefined td { color:var(--muted); }
.na { color:var(--muted); }
sup.approx { color:var(--warn); font-weight:600; line-height:0; }
.bad { color:var(--warn); font-weight:600; }
div.warnbox { border:2px solid var(--warn); background:#fff7ed; border-radius:4px;
              padding:.6rem 1rem; margin:1.2rem 0 0; }
div.warnbox h2 { color:var(--warn); border:0; padding:0; margin:0 0 .3rem; }
.good { color:var(--ok); }
pre.formula { white-space:pre-wrap; overflow-wrap:anywhere; background:#f6f8fa;
              border:1px solid var(--line); padding:.6rem .8rem; font-size:13px; }
ul.footnotes { margin:.2rem 0 1rem; padding-left:1.2rem; font-size:12.5px; color:var(--muted); }
ul.failed li { margin:.2rem 0; }
.figures { display:grid; grid-template-columns:repeat(auto-fill, minmax(22rem, 1fr)); gap:1rem; }
figure { margin:0; border:1px solid var(--line); padding:.5rem; break-inside:avoid; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figure.wide { grid-column:1 / -1; }
.scroll { overflow-x:auto; }
figcaption { font-size:12.5px; color:var(--muted); margin-top:.3rem; }
code { font-size:12.5px; }
@media (max-width:900px) {
  .layout { display:block; }
  nav.toc { position:static; height:auto; border-right:0; border-bottom:1px solid var(--line); }
}
@media print {
  nav.toc { display:none; }
  .layout { display:block; }
  main { padding:0; max-width:none; }
  section { break-before:auto; }
  h2, h3 { break-after:avoid; }
  table, figure, pre { break-inside:avoid; }
  thead { display:table-header-group; }
  body { font-size:10pt; }
  th, td { white-space:normal; padding:.15rem .4rem; }
  .scroll { overflow:visible; }
  .figures { grid-template-columns:1fr 1fr; }
  a { color:inherit; text-decoration:none; }
}
"""

# Once loaded, record what a headless browser can verify (tests/test_report.py):
# images that did not decode, and any load the Content Security Policy blocked.
_SCRIPT = """
(function () {
  var violations = 0;
  document.addEventListener("securitypolicyviolation", function () { violations++; });
  window.addEventListener("load", function () {
    var images = document.images, broken = 0;
    for (var i = 0; i < images.length; i++) {
      if (!images[i].complete || images[i].naturalWidth === 0) broken++;
    }
    var external = performance.getEntriesByType("resource").filter(function (e) {
      return !/^data:/.test(e.name);
    }).length;
    var d = document.body.dataset;
    d.images = images.length;
    d.brokenImages = broken;
    d.cspViolations = violations;
    d.externalRequests = external;
    d.loaded = "1";
  });
})();
"""


class ReportError(RadfedError):
    """The report cannot be built: not a results file, a missing figure or run."""


class Markup(str):
    """Text that is already HTML (escaped where needed); inserted as is.

    Concatenation keeps it markup and escapes a plain-string operand.
    """

    def __add__(self, other: object) -> Markup:
        return Markup(str.__add__(self, _e(other)))

    def __radd__(self, other: object) -> Markup:
        return Markup(str.__add__(_e(other), self))


def _e(value: Any) -> Markup:
    """Escape ``value`` unless it is already :class:`Markup`."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _tag(name: str, content: Any = "", **attrs: Any) -> Markup:
    """``<name attrs>content</name>``; attribute values are escaped, ``None`` ones dropped."""
    parts = [name]
    for key, value in attrs.items():
        if value is None:
            continue
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{_e(value)}"')
    return Markup(f"<{' '.join(parts)}>{_e(content)}</{name}>")


def _join(items: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(_e(i) for i in items))


# ---------------------------------------------------------------------------------------
# Numbers


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (null, NaN, infinite or not a number).

    NumPy scalars count: results built in memory (not read from JSON) hold them.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _exp(value: float | None) -> float | None:
    """exp, or None where it overflows (a separated fit's huge coefficient)."""
    if value is None or value > 700:
        return None
    return math.exp(value)


def _na(reason: str | None = None) -> Markup:
    return _tag("span", NA, class_="na", title=reason or None)


def _f(value: Any, digits: int = 3, reason: str | None = None) -> Markup:
    """Fixed-point number, or an em dash (with the reason on hover)."""
    v = _num(value)
    return _na(reason) if v is None else _e(f"{v:.{digits}f}")


def _g(value: Any, digits: int = 4, reason: str | None = None) -> Markup:
    """Significant-digit number (coefficients span many magnitudes)."""
    v = _num(value)
    return _na(reason) if v is None else _e(f"{v:.{digits}g}")


def _int(value: Any) -> Markup:
    v = _num(value)
    return _na() if v is None else _e(f"{int(v)}")


def _p(value: Any, reason: str | None = None) -> Markup:
    """P-value as statisticians print it; the full value on hover."""
    v = _num(value)
    if v is None:
        return _na(reason)
    text = "<0.001" if v < 0.001 else f"{v:.3f}"
    return _tag("span", text, title=f"{v:.3g}")


def _wald_or_ci(coef: Any, se: Any) -> list[float | None] | None:
    """95% Wald CI of an odds ratio from its log-odds coefficient and SE (results.json
    stores the per-unit CI of neither the models nor the screening)."""
    b, s = _num(coef), _num(se)
    if b is None or s is None:
        return None
    return [_exp(b - 1.959964 * s), _exp(b + 1.959964 * s)]


def _ci(pair: Any, digits: int = 3) -> str:
    """`` [lo, hi]`` or '' when the interval is unknown."""
    if pair is None or isinstance(pair, (str, bytes)) or len(pair) != 2:
        return ""
    lo, hi = (_num(x) for x in pair)
    if lo is None or hi is None:
        return ""
    return f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def _with_ci(value: Any, pair: Any, digits: int = 3, reason: str | None = None) -> Markup:
    v = _num(value)
    return _na(reason) if v is None else _e(f"{v:.{digits}f}{_ci(pair, digits)}")


# ---------------------------------------------------------------------------------------
# Building blocks


def _table(
    head: Sequence[Any],
    rows: Iterable[Sequence[Any] | tuple[Sequence[Any], str]],
    left: int = 1,
    caption: str | None = None,
    note_last: bool = False,
) -> Markup:
    """A table; the first ``left`` columns are text (left-aligned), the rest numbers.

    A row may be ``(cells, row_class)``. With ``note_last`` the last header and cell are
    a note: a non-empty note is printed in a row of its own under its row, so a long
    reason never widens the table.
    """
    if note_last:
        head = head[:-1]
    ths = _join(_tag("th", h, class_="l" if i < left else None) for i, h in enumerate(head))
    body = []
    for row in rows:
        row_class = None
        if isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], str):
            row, row_class = row
        note = row[-1] if note_last else None
        cells = row[:-1] if note_last else row
        tds = _join(
            _tag("td", "" if cell is None else cell, class_="l" if i < left else None)
            for i, cell in enumerate(cells)
        )
        if note:
            classes = " ".join(c for c in (row_class, "has-note") if c)
            note_row = Markup(
                f'<td colspan="{left}"></td>'
                f'<td class="note" colspan="{len(cells) - left}">↳ {_e(note)}</td>'
            )
            body.append(_tag("tr", tds, class_=classes))
            body.append(_tag("tr", note_row, class_=f"{row_class or ''} note-row".strip()))
        else:
            body.append(_tag("tr", tds, class_=row_class or None))
    cap = _tag("caption", caption) if caption else Markup("")
    return Markup(
        f'<div class="scroll"><table>{cap}<thead>{_tag("tr", ths)}</thead>'
        f"<tbody>{_join(body)}</tbody></table></div>"
    )


def _section(anchor: str, title: str, content: Any) -> Markup:
    return Markup(f'<section id="{_e(anchor)}">{_tag("h2", title)}{_e(content)}</section>')


def _para(text: Any, cls: str | None = None) -> Markup:
    return _tag("p", text, class_=cls)


def _missing(what: str) -> Markup:
    return _para(f"{what} not recorded in this run.", "note")


def _model_order(names: Iterable[str]) -> list[str]:
    names = list(names)
    return [m for m in MODEL_ORDER if m in names] + sorted(n for n in names if n not in MODEL_ORDER)


def _model_title(name: str) -> str:
    return MODEL_TITLES.get(name, name)


def _site_order(results: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Sites in the study's order, then any other rows, ``pooled`` last."""
    names = list(names)
    known = [s for s in results.get("sites", {}) if s in names]
    rest = sorted(n for n in names if n not in known and n != POOLED)
    return known + rest + ([POOLED] if POOLED in names else [])


def _status_note(metrics: Mapping[str, Any]) -> str:
    """The note of a metrics entry: status and reason when not plainly ok."""
    status = metrics.get("status", "ok")
    reason = metrics.get("reason")
    if status != "ok":
        return f"{status}: {reason}" if reason else str(status)
    return str(reason) if reason else ""


class _Approx:
    """Markers and footnotes for pooled metrics that are approximations."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    def mark(self, metrics: Mapping[str, Any], column: str) -> Markup:
        approx = metrics.get("approximate") or {}
        hits = [k for k in _APPROX_COLUMNS.get(column, (column,)) if k in approx]
        for key in hits:
            self.notes.setdefault(key, str(approx[key]))
        return Markup('<sup class="approx" title="approximate">≈</sup>' if hits else "")

    def footnotes(self) -> Markup:
        if not self.notes:
            return Markup("")
        items = _join(_tag("li", f"{k}: {why}") for k, why in self.notes.items())
        return Markup(
            '<ul class="footnotes"><li>≈ approximate in the pooled rows (computed from the '
            f"sites' aggregates):</li>{items}</ul>"
        )


# ---------------------------------------------------------------------------------------
# Sections


def _header(results: Mapping[str, Any]) -> Markup:
    fed = results.get("federation", {}) or {}
    sites = fed.get("sites") or list(results.get("sites", {}))
    created = str(results.get("created") or "")
    try:
        when = datetime.fromisoformat(created).strftime("%Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        when = created or NA
    versions = ", ".join(
        f"{name} {fed[key]}"
        for name, key in (
            ("radfed", "radfed_version"),
            ("Flower", "flwr_version"),
            ("pyradiomics", "pyradiomics_version"),
        )
        if fed.get(key)
    )
    items = [
        ("Outcome", results.get("outcome", NA)),
        ("Created", when),
        ("Transport", results.get("transport", NA)),
        ("Sites", ", ".join(map(str, sites)) or NA),
        ("MLflow run", fed.get("mlflow_run_id") or NA),
        ("MLflow store", fed.get("mlflow_uri") or NA),
        ("Settings hash", fed.get("settings_hash") or NA),
        ("Versions", versions or NA),
        ("Schema", results.get("schema", NA)),
    ]
    meta = _join(_tag("dt", k) + _tag("dd", v) for k, v in items)
    title = f"Study report: {results.get('study', '?')}"
    return Markup(
        f"<header>{_tag('h1', title)}"
        f"{_para('Federated radiomics nomogram study (radfed)', 'sub')}"
        f'<dl class="meta">{meta}</dl></header>'
    )


def _dropped_sites(results: Mapping[str, Any]) -> Markup:
    """A warning box naming each site that stopped answering, its phase and what followed."""
    dropped = (results.get("federation") or {}).get("dropped_sites") or []
    if not dropped:
        return Markup("")
    items = _join(
        _tag(
            "li",
            Markup(
                f"<strong>{_e(d.get('site'))}</strong> stopped answering in phase "
                f"<strong>{_e(d.get('phase'))}</strong> (task {_e(d.get('task'))}, round "
                f"{_e(d.get('round'))}, {_e(d.get('time'))}): {_e(d.get('reason'))}. "
                f"{_e(str(d.get('action') or '').capitalize())}."
            ),
        )
        for d in dropped
    )
    rounds = (results.get("rounds") or {}).get("abandoned")
    note = (
        f" The {rounds} round(s) of the abandoned attempt are counted apart (abandoned)."
        if rounds
        else ""
    )
    restarted = any(str(d.get("action", "")).startswith("the fit restarted") for d in dropped)
    text = (
        "The models were fitted without these sites: following the study's [federation] "
        "on_site_failure policy, the fit was restarted from its first phase on the "
        f"remaining sites, so no estimate mixes site sets.{note}"
        if restarted
        else "Only external validation lost these sites; the models were fitted on all "
        "training sites."
    )
    box = _tag("h2", "Warning: sites stopped answering during the run") + _para(text)
    return Markup('<div class="warnbox" role="alert">') + box + _tag("ul", items) + Markup("</div>")


def _settings(results: Mapping[str, Any]) -> Markup:
    settings = results.get("settings")
    if not settings:
        return _missing("Study settings")
    rows = [[_tag("code", k), _tag("code", v)] for k, v in sorted(settings.items())]
    return _table(["setting", "value"], rows, left=2)


def _cohort(results: Mapping[str, Any]) -> Markup:
    sites = results.get("sites") or {}
    if not sites:
        return _missing("The cohort")
    head = ["site", "n", "events", "excluded", "train n", "train events", "test n", "test events"]
    keys = [("n",), ("events",), ("n_excluded",), ("train", "n"), ("train", "events")]
    keys += [("test", "n"), ("test", "events")]
    totals: list[float | None] = [0.0] * len(keys)
    rows = []
    for site, info in sites.items():
        row: list[Any] = [site]
        for i, path in enumerate(keys):
            value: Any = info
            for part in path:
                value = value.get(part) if isinstance(value, Mapping) else None
            row.append(_int(value))
            # A count a site did not send (below its minimum cell size) leaves the
            # total unknown rather than too small.
            v = _num(value)
            totals[i] = None if v is None or totals[i] is None else totals[i] + v
        rows.append(row)
    rows.append(([Markup("<strong>total</strong>"), *(_int(t) for t in totals)], "pooled"))
    return _join([_table(head, rows), _exclusions(sites)])


def _exclusions(sites: Mapping[str, Any]) -> Markup:
    """Each site's patients kept out, per kind of reason, as the site published them."""
    rows = [
        [site, reason, "fewer than the site's minimum cell" if count < 0 else _int(count)]
        for site, info in sites.items()
        for reason, count in by_count(info.get("exclusions") or {})
    ]
    if not rows:
        return Markup("")
    note = _tag(
        "p",
        "Patients kept out, per site and kind of reason: a patient with several reasons "
        "is counted under each; the patients themselves stay at the site "
        "(radfed validate lists them there).",
    )
    return _join([note, _table(["site", "reason", "patients"], rows, left=2)])


def _reproducibility(results: Mapping[str, Any]) -> Markup:
    """The ICC filter: subjects per comparison, the features dropped and why."""
    from radfed.server.stats.reproducibility import icc_rows

    repro = results.get("reproducibility") or {}
    parts = []
    for name, table in (repro.get("comparisons") or {}).items():
        sites = ", ".join(f"{s}: {n}" for s, n in (table.get("n_per_site") or {}).items())
        parts.append(
            _para(
                f"{name.replace('_', '-')}: {table.get('n', 0)} patients rated by "
                f"{table.get('raters', 2)} readers ({sites})."
            )
        )
    kept, rows = repro.get("kept") or [], icc_rows(repro)
    parts.append(
        _para(
            f"{repro.get('icc_type', 'ICC2')} threshold {repro.get('threshold', NA)}: "
            f"{len(kept)} of {len(rows)} features kept before harmonisation and mRMR."
        )
    )
    dropped = [r for r in rows if not r["kept"]]
    if dropped:
        columns = [c for c in dropped[0] if c not in {"feature", "kept", "reason"}]
        parts.append(
            _table(
                ["dropped feature", *columns],
                [[_tag("code", r["feature"]), *(_f(r[c]) for c in columns)] for r in dropped],
            )
        )
    return _join(parts)


def _selection(results: Mapping[str, Any]) -> Markup:
    parts: list[Markup] = []
    harm = results.get("harmonization") or {}
    if harm:
        per_batch = harm.get("n_per_batch") or {}
        method = harm.get("method", "ComBat")
        text = f"Harmonisation: {method}"
        if harm.get("batch_levels"):
            text += f", batches {', '.join(map(str, harm['batch_levels']))}"
        if per_batch:
            text += " (" + ", ".join(f"{k}: n = {v}" for k, v in per_batch.items()) + ")"
        parts.append(_para(text + "."))
        kept_out = harm.get("kept_out") or {}
        if kept_out:
            harmonised = harm.get("harmonised") or []
            parts.append(
                _para(
                    f"{len(harmonised)} features harmonised; {len(kept_out)} kept out of "
                    "ComBat and used as the sites hold them:"
                )
            )
            parts.append(
                _table(
                    ["kept-out feature", "reason"],
                    [[_tag("code", f), str(why)] for f, why in kept_out.items()],
                )
            )
    selection = results.get("selection") or {}
    mrmr = selection.get("mrmr") or {}
    if mrmr.get("selected"):
        parts.append(_para(f"mRMR kept {len(mrmr['selected'])} features."))
        if mrmr.get("placement"):
            parts.append(_para(f"{mrmr['placement']}.", "note"))
    lasso = selection.get("lasso") or {}
    if lasso:
        rule = lasso.get("rule", "lambda.min")
        bits = [f"LASSO, {lasso['n_folds']}-fold CV" if "n_folds" in lasso else "LASSO"]
        for key in ("lambda_min", "lambda_1se"):
            if _num(lasso.get(key)) is not None:
                bits.append(f"{key.replace('_', '.')} = {lasso[key]:.4g}")
        bits.append(f"rule {rule}")
        if "nonzero" in lasso:
            bits.append(f"{len(lasso['nonzero'])} non-zero coefficients")
        parts.append(_para(", ".join(bits) + "."))
    formula = selection.get("radscore_formula")
    parts.append(
        _tag("pre", formula, class_="formula") if formula else _missing("The Radscore formula")
    )
    screening = results.get("clinical_screening") or {}
    uni = screening.get("univariable") or {}
    if uni:
        retained = set(screening.get("retained_variables") or screening.get("retained") or [])
        rows = []
        for name, u in uni.items():
            if u.get("categorical"):  # one likelihood-ratio test, then each level's OR
                test = f"LR χ² = {u.get('statistic', 0):.2f} on {u.get('df')} df"
                mark = Markup('<span class="good">✓</span>') if name in retained else ""
                rows.append([name, test, _p(u.get("p")), mark])
                for column, c in (u.get("coefficients") or {}).items():
                    level_ci = _wald_or_ci(c.get("coef_per_unit"), c.get("se_per_unit"))
                    rows.append(
                        [
                            f"  {column} (vs {u.get('reference')})",
                            _with_ci(c.get("odds_ratio_per_unit"), level_ci),
                            _p(c.get("p")),
                            "",
                        ]
                    )
                continue
            ci = u.get("odds_ratio_ci") or _wald_or_ci(u.get("coef_per_unit"), u.get("se_per_unit"))
            rows.append(
                [
                    name,
                    _with_ci(u.get("odds_ratio_per_unit"), ci),
                    _p(u.get("p")),
                    Markup('<span class="good">✓</span>') if name in retained else "",
                ]
            )
        threshold = screening.get("threshold")
        parts.append(_tag("h3", "Univariable screening of clinical variables"))
        parts.append(
            _table(["variable", "OR per unit [95% CI]", "p", f"retained (p < {threshold})"], rows)
        )
    return _join(parts)


def _coefficients(name: str, fit: Mapping[str, Any]) -> Markup:
    rows = []
    for term, c in (fit.get("coefficients") or {}).items():
        is_intercept = term == INTERCEPT
        unit, se_unit = _num(c.get("coef_per_unit")), c.get("se_per_unit")
        or_unit: Markup | str = ""
        if not is_intercept:
            or_unit = _with_ci(_exp(unit), _wald_or_ci(unit, se_unit))
        rows.append(
            [
                _tag("code", term),
                _g(c.get("coef")),
                _g(c.get("se")),
                _f(c.get("z"), 2),
                _p(c.get("p")),
                ""
                if is_intercept
                else _with_ci(c.get("odds_ratio_per_sd"), c.get("odds_ratio_ci")),
                _g(c.get("coef_per_unit")),
                or_unit,
            ]
        )
    head = ["term", "β per SD", "SE", "z", "p", "OR per SD [95% CI]", "β per unit"]
    head.append("OR per unit [95% CI]")
    converged = fit.get("converged")
    deviance = _num(fit.get("deviance"))
    info = (
        f"n = {fit.get('n', NA)}, deviance = {NA if deviance is None else f'{deviance:.6g}'}, "
        f"{fit.get('iterations', NA)} Newton iterations"
    )
    status = (
        Markup('<span class="bad">NOT converged</span>')
        if converged is False
        else Markup("converged")
    )
    return Markup(
        f"{_tag('h3', _model_title(name))}{_table(head, rows)}"
        f"{_para(Markup(f'{_e(info)}, {status}. Wald standard errors; SD = pooled SD.'), 'note')}"
    )


def _models(results: Mapping[str, Any]) -> Markup:
    models = results.get("models") or {}
    parts = [_coefficients(m, models[m]) for m in _model_order(models)]
    absent = [m for m in MODEL_ORDER if m not in models]
    if absent:
        parts.append(
            _para(
                "Not fitted in this run: " + ", ".join(_model_title(m) for m in absent) + ".",
                "note",
            )
        )
    return _join(parts) if parts else _missing("Fitted models")


def _rows_per_site(results: Mapping[str, Any], per_site: Mapping[str, Any]):
    """(site, split, metrics) in report order."""
    for site in _site_order(results, per_site):
        splits = per_site[site] or {}
        for split in [s for s in SPLITS if s in splits] + [s for s in splits if s not in SPLITS]:
            yield site, split, splits[split] or {}


def _row_class(site: str, metrics: Mapping[str, Any]) -> str:
    classes = []
    if site == POOLED:
        classes.append("pooled")
    if metrics.get("status", "ok") != "ok":
        classes.append("undefined")
    return " ".join(classes)


def _discrimination_cells(m: Mapping[str, Any], approx: _Approx) -> list[Any]:
    why = m.get("reason") if m.get("status", "ok") != "ok" else None
    return [
        _int(m.get("n")),
        _int(m.get("events")),
        _with_ci(m.get("auc"), m.get("auc_ci"), reason=why) + approx.mark(m, "auc"),
        _f(m.get("brier"), reason=why) + approx.mark(m, "brier"),
        _f(m.get("cutoff"), 2, reason=why),
        _with_ci(m.get("accuracy"), m.get("accuracy_ci"), reason=why) + approx.mark(m, "accuracy"),
        _f(m.get("sensitivity"), reason=why) + approx.mark(m, "sensitivity"),
        _f(m.get("specificity"), reason=why) + approx.mark(m, "specificity"),
        _status_note(m),
    ]


_DISCRIMINATION_HEAD = [
    "n",
    "events",
    "AUC [95% CI]",
    "Brier",
    "cut-off",
    "accuracy [95% CI]",
    "sensitivity",
    "specificity",
    "note",
]


def _discrimination(results: Mapping[str, Any]) -> Markup:
    performance = results.get("performance") or {}
    if not performance:
        return _missing("Discrimination")
    parts = []
    evaluation = results.get("evaluation") or {}
    cutoffs = evaluation.get("cutoffs") or {}
    if cutoffs:
        text = "Cut-offs: " + ", ".join(
            f"{m} {_num(c):.2f}" if _num(c) is not None else f"{m} {NA}" for m, c in cutoffs.items()
        )
        if evaluation.get("cutoff_rule"):
            text += f" ({evaluation['cutoff_rule']})"
        parts.append(_para(text + ".", "note"))
    for model in _model_order(performance):
        approx = _Approx()
        rows = []
        for site, split, m in _rows_per_site(results, performance[model]):
            cells = [site, split, *_discrimination_cells(m, approx)]
            rows.append((cells, _row_class(site, m)))
        parts.append(_tag("h3", _model_title(model)))
        parts.append(_table(["site", "split", *_DISCRIMINATION_HEAD], rows, left=2, note_last=True))
        parts.append(approx.footnotes())
    return _join(parts)


def _delong(results: Mapping[str, Any]) -> Markup:
    comparisons = (results.get("evaluation") or {}).get("comparisons") or {}
    rows = []
    for site in _site_order(results, comparisons):
        for split, tests in (comparisons[site] or {}).items():
            for t in tests or []:
                a, b = t.get("models", ["?", "?"])
                rows.append(
                    [
                        site,
                        split,
                        f"{a} vs {b}",
                        _f(t.get("auc_diff")),
                        _f(t.get("z"), 2),
                        _p(t.get("p")),
                    ]
                )
    if not rows:
        return _para(
            "No paired DeLong test recorded (a site or split that cannot be evaluated has none).",
            "note",
        )
    return Markup(
        _table(["site", "split", "models (a vs b)", "ΔAUC (a − b)", "z", "p"], rows, left=3)
        + _para("DeLong's test for two correlated ROC curves (same patients).", "note")
    )


def _calibration_cells(m: Mapping[str, Any], approx: _Approx) -> list[Any]:
    cal = m.get("calibration") or {}
    why = m.get("reason") if m.get("status", "ok") != "ok" else None
    return [
        _int(m.get("n")),
        _f(cal.get("intercept"), reason=why) + approx.mark(m, "cal_intercept"),
        _f(cal.get("slope"), reason=why) + approx.mark(m, "cal_slope"),
        _f(cal.get("hl_statistic"), 2, reason=why) + approx.mark(m, "hl"),
        _int(cal.get("hl_df")),
        _p(cal.get("hl_p"), reason=why),
        _status_note(m),
    ]


_CALIBRATION_HEAD = ["n", "intercept", "slope", "HL χ²", "df", "HL p", "note"]


def _calibration(results: Mapping[str, Any]) -> Markup:
    performance = results.get("performance") or {}
    rows = []
    approx = _Approx()
    for model in _model_order(performance):
        for site, split, m in _rows_per_site(results, performance[model]):
            rows.append(([model, site, split, *_calibration_cells(m, approx)], _row_class(site, m)))
    if not rows:
        return _missing("Calibration")
    return Markup(
        _table(["model", "site", "split", *_CALIBRATION_HEAD], rows, left=3, note_last=True)
        + approx.footnotes()
        + _para(
            "Calibration intercept and slope: logistic regression of the outcome on the "
            "linear predictor (ideal 0 and 1). HL: Hosmer-Lemeshow goodness-of-fit test.",
            "note",
        )
        + _val_prob(results)
    )


def _val_prob_cells(m: Mapping[str, Any], approx: _Approx) -> list[Any]:
    cal = m.get("calibration") or {}
    why = m.get("reason") if m.get("status", "ok") != "ok" else None
    errors_why = why or cal.get("errors_reason")
    errors = approx.mark(m, "calibration_errors")
    # A site's ICI is its exact mean (its bounds coincide); pooled it is approximate.
    ici_bounds = (cal.get("errors_bounds") or {}).get("ici") or [None, None]
    ici_mark = errors if ici_bounds[0] != ici_bounds[1] else Markup("")
    return [
        _int(m.get("n")),
        _with_ci(m.get("dxy"), m.get("dxy_ci"), reason=why) + approx.mark(m, "dxy"),
        _f(m.get("r2"), reason=why),
        _f(m.get("brier_scaled"), reason=why),
        _f(cal.get("ici"), reason=errors_why) + ici_mark,
        _f(cal.get("e50"), reason=errors_why) + errors,
        _f(cal.get("e90"), reason=errors_why) + errors,
        _f(cal.get("emax"), reason=errors_why) + errors,
        _status_note(m),
    ]


_VAL_PROB_HEAD = [
    "n",
    "Dxy [95% CI]",
    "R²",
    "scaled Brier",
    "ICI",
    "E50",
    "E90",
    "Emax",
    "note",
]


def _val_prob(results: Mapping[str, Any]) -> Markup:
    """rms val.prob's indices per model, site and split."""
    performance = results.get("performance") or {}
    rows = []
    approx = _Approx()
    for model in _model_order(performance):
        for site, split, m in _rows_per_site(results, performance[model]):
            if "dxy" not in m and m.get("status", "ok") == "ok":
                continue  # a run recorded before these indices existed
            rows.append(([model, site, split, *_val_prob_cells(m, approx)], _row_class(site, m)))
    if not rows:
        return Markup("")
    return Markup(
        _tag("h3", "Validation indices (rms val.prob)")
        + _table(["model", "site", "split", *_VAL_PROB_HEAD], rows, left=3, note_last=True)
        + approx.footnotes()
        + _para(
            "Dxy = 2 (AUC − ½), its CI from the AUC's. R²: Nagelkerke's, of the predictions "
            "as they are (from their log-likelihood). Scaled Brier: Brier / (ē (1 − ē)), ē "
            "the event rate; 1 minus it is the Brier skill. ICI, E50, E90, Emax: mean, "
            "median, 90th percentile and maximum of |c(p) − p| over the patients, c the "
            "smooth calibration curve (the site's own at a site, the pooled one pooled; "
            "Austin & Steyerberg 2019). At a site the ICI is exact; E50, E90 and Emax, and "
            "all four pooled, come from the patients' 0.01 risk cells (merged to each "
            "site's minimum cell size) and are approximate, with bounds in results.json "
            "(calibration.errors_bounds).",
            "note",
        )
    )


def _i2(value: Any) -> Markup:
    """I² (stored as a fraction of the total variance) as a percentage."""
    v = _num(value)
    return _na() if v is None else _e(f"{100 * v:.1f} %")


def _external_site(site: str, h: Mapping[str, Any], heading: str, trained: str) -> Markup:
    """One externally evaluated site: metrics per model, DeLong tests, its Radscore."""
    parts = [
        _tag("h3", heading),
        _para(
            f"Models fitted on {trained}; evaluated on all {h.get('n', NA)} patients "
            f"({h.get('events', NA)} events)."
        ),
    ]
    if h.get("reason"):
        parts.append(_para(h["reason"], "note"))
    rows = []
    approx = _Approx()
    metrics = h.get("metrics") or {}
    for model in _model_order(metrics):
        m = metrics[model] or {}
        why = m.get("reason") if m.get("status", "ok") != "ok" else None
        cal = m.get("calibration") or {}
        # The cut-off column is left out: it is the training data's (Discrimination).
        cells = [c for i, c in enumerate(_discrimination_cells(m, approx)[:-1]) if i != 4]
        rows.append(
            (
                [
                    model,
                    *cells,
                    _f(cal.get("slope"), reason=why),
                    _p(cal.get("hl_p"), reason=why),
                    _status_note(m),
                ],
                _row_class(site, m),
            )
        )
    head = ["model", *(col for col in _DISCRIMINATION_HEAD[:-1] if col != "cut-off")]
    head += ["cal. slope", "HL p", "note"]
    parts += [_table(head, rows, note_last=True), approx.footnotes()]
    tests = h.get("comparisons") or []
    if tests:
        test_rows = [
            [
                " vs ".join(map(str, t.get("models", ["?", "?"]))),
                _f(t.get("auc_diff")),
                _f(t.get("z"), 2),
                _p(t.get("p")),
            ]
            for t in tests
        ]
        parts.append(_table(["paired DeLong test (a vs b)", "ΔAUC (a − b)", "z", "p"], test_rows))
    if h.get("radscore_formula"):
        parts.append(_tag("pre", h["radscore_formula"], class_="formula"))
    return _join(parts)


def _failed_sites(title: str, failed: Sequence[tuple[str, str]]) -> Markup:
    if not failed:
        return Markup("")
    items = _join(_tag("li", Markup(f"<strong>{_e(s)}</strong>: {_e(r)}")) for s, r in failed)
    return _tag("h3", title) + Markup(f'<ul class="failed">{items}</ul>')


def _meta(meta: Mapping[str, Any]) -> Markup:
    rows = []
    for model in _model_order(meta):
        s = meta[model] or {}
        pi = _ci(s.get("prediction_interval")).strip()
        rows.append(
            [
                model,
                _with_ci(s.get("auc"), s.get("ci"), reason=s.get("reason")),
                pi or _na(),
                _g(s.get("tau2"), 3),
                _i2(s.get("i2")),
                _f(s.get("q"), 2),
                _p(s.get("q_p")),
                _int(s.get("k")),
                s.get("method") or "",
            ]
        )
        if s.get("reason"):
            rows[-1][-1] = f"not estimated: {s['reason']}"
        if s.get("excluded"):
            left_out = "; ".join(f"{site}: {why}" for site, why in s["excluded"].items())
            rows[-1][-1] = f"{rows[-1][-1]} (left out: {left_out})"
        dl = s.get("dersimonian_laird")
        if isinstance(dl, Mapping) and dl.get("auc") is not None:
            rows.append(
                [
                    f"{model} (sensitivity analysis)",
                    _with_ci(dl.get("auc"), dl.get("ci")),
                    _ci(dl.get("prediction_interval")).strip() or _na(),
                    _g(dl.get("tau2"), 3),
                    _i2(dl.get("i2")),
                    _f(dl.get("q"), 2),
                    _p(dl.get("q_p")),
                    _int(dl.get("k")),
                    dl.get("method") or "",
                ]
            )
    head = ["model", "AUC [95% CI]", "95% PI", "τ²", "I²", "Q", "p (Q)", "k", "method / note"]
    return _table(head, rows, left=1) + _para(
        "Summary of the held-out sites' external AUCs. PI: prediction interval for the AUC "
        "at a new hospital.",
        "note",
    )


def _external(results: Mapping[str, Any]) -> Markup:
    external = results.get("external")
    if not external:
        return _missing("External validation")
    sites = list(results.get("sites") or {})
    parts = []
    validation = external.get("validation") or {}
    if validation:
        parts.append(_tag("h3", "Validation-only sites"))
        parts.append(
            _para("Hospitals that took no part in fitting, evaluated with the study's models.")
        )
        failed = []
        for site in sorted(validation):
            v = validation[site] or {}
            if v.get("status") != "ok":
                failed.append((site, v.get("reason") or "no reason given"))
                continue
            trained = ", ".join(map(str, sites)) or "the training sites"
            parts.append(_external_site(site, v, f"Validation site: {site}", trained))
        parts.append(_failed_sites("Validation sites not evaluated", failed))

    parts.append(_tag("h3", "Leave-one-site-out"))
    if external.get("status") != "ran":
        reason = external.get("reason") or "no reason given"
        parts.append(_para(f"Not run: {reason}.", "note"))
        return _join(parts)
    parts.append(
        _para(
            "Each training site in turn is held out, the whole pipeline (ComBat included) is "
            "refitted on the other sites, and the models are evaluated on all patients of the "
            "held-out site.",
            "note",
        )
    )
    held_out = external.get("held_out") or {}
    failed = []
    for site in _site_order(results, held_out):
        h = held_out[site] or {}
        if h.get("status") != "ok":
            failed.append((site, h.get("reason") or "no reason given"))
            continue
        trained = ", ".join(map(str, h.get("training_sites") or [])) or NA
        parts.append(_external_site(site, h, f"Held out: {site}", trained))
    parts.append(_failed_sites("Held-out sites not evaluated", failed))
    meta = external.get("meta") or {}
    if meta:
        parts.append(_tag("h3", "Random-effects summary across held-out sites"))
        parts.append(_meta(meta))
    return _join(parts)


def _equivalence(rows: Sequence[Mapping[str, Any]]) -> Markup:
    body = []
    for r in rows:
        ok = r.get("ok")
        verdict = Markup(
            '<span class="good">ok</span>' if ok else '<span class="bad">DIFFERS</span>'
        )
        body.append(
            [
                r.get("estimate", "?"),
                _g(r.get("max_abs_diff"), 3),
                _g(r.get("tolerance"), 1),
                verdict,
            ]
        )
    return Markup(
        _table(["estimate", "max |federated − pooled|", "tolerance", ""], body)
        + _para(
            "Pooled references: neuroCombat, mrmr-selection, scikit-learn and statsmodels on "
            "the pooled data.",
            "note",
        )
    )


_BOOTSTRAP_METRICS = {
    "auc_within_site": "AUC within sites (exact)",
    "cal_slope": "calibration slope",
    "cal_intercept": "calibration intercept",
    "brier": "Brier score",
}


def _bootstrap(results: Mapping[str, Any]) -> Markup:
    """Harrell's optimism correction: apparent, mean optimism and corrected values per
    model and metric, over the training sites' training rows."""
    boot = results["evaluation"]["bootstrap"]
    rows = []
    for model in _model_order(boot.get("models") or {}):
        for key, title in _BOOTSTRAP_METRICS.items():
            entry = boot["models"][model].get(key) or {}
            rows.append(
                [
                    _model_title(model),
                    title,
                    _f(entry.get("apparent")),
                    _f(entry.get("optimism")),
                    _f(entry.get("corrected")),
                    _int(entry.get("replicates")),
                ]
            )
    failed = boot.get("failed") or {}
    note = (
        f"{boot.get('replicates_ok')} of {boot.get('B')} bootstrap replicates refitted the "
        "whole pipeline (ComBat, mRMR, LASSO-CV, screening, models); optimism = metric on "
        "the replicate minus metric of the same models on the original training rows; "
        "corrected = apparent minus mean optimism."
    )
    content = _para(note) + _table(
        ["model", "metric", "apparent", "optimism", "corrected", "replicates"], rows, left=2
    )
    if failed:
        content += _para(
            f"{len(failed)} replicate(s) could not be fitted and are left out (the mean "
            "optimism may then lean towards the replicates every site could answer): "
            + "; ".join(f"{b}: {why}" for b, why in list(failed.items())[:5]),
            "note",
        )
    return content


_CLASSIFIER_TITLES = {
    "logistic": "LASSO (logistic)",
    "xgboost": "XGBoost",
    "svm_radial": "SVM radial†",
    "svm_linear": "SVM linear",
    "random_forest": "Random forest",
    "neural_network": "Neural network",
    "knn": "KNN†",
}
_CLASSIFIER_METRICS = {
    "auc": "AUC",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "accuracy": "Accuracy",
}


def _classifiers(results: Mapping[str, Any]) -> Markup:
    """Seed 000's Table 3 per site and split: classifiers as columns, metrics as rows."""
    entry = results["classifiers"]
    if entry.get("status") != "ok":
        return _para(f"Not run: {entry.get('reason', 'no reason given')}", "note")
    names = list(entry.get("classifiers") or [])
    local = [_CLASSIFIER_TITLES.get(c, c) for c in entry.get("site_local") or []]
    content = _para(
        "Classifiers fed the Radscore alone; " + str(entry.get("cutoff_rule", "")) + ". "
        f"† {', '.join(local)}: site-local, not federated (support vectors and neighbours "
        "are patients' values): each site fits and scores them on its own rows only, and "
        "the model never leaves it. ≈: 0.5 fell in a threshold cell the site merged to its "
        "minimum cell size; the counts there are interpolated."
    )
    for site, by_subset in (entry.get("table") or {}).items():
        for subset, layout in by_subset.items():
            exact = layout.get("cutoff_exact") or [True] * len(names)
            rows = [
                [
                    title,
                    *(
                        _f(v) if metric == "auc" or ok else Markup("≈") + _f(v)
                        for v, ok in zip(layout["rows"].get(metric, []), exact, strict=False)
                    ),
                ]
                for metric, title in _CLASSIFIER_METRICS.items()
            ]
            head = ["metric", *(_CLASSIFIER_TITLES.get(c, c) for c in names)]
            content += _table(head, rows, caption=f"{site} — {subset}")
    return content


def _rounds(results: Mapping[str, Any]) -> Markup:
    rounds = results.get("rounds") or {}
    if not rounds:
        return _missing("Federated rounds")
    rows = [[phase, _int(n)] for phase, n in rounds.items()]
    total = sum(_num(n) or 0 for n in rounds.values())
    rows.append(([Markup("<strong>total</strong>"), _int(total)], "pooled"))
    return _table(["phase", "rounds"], rows)


# ---------------------------------------------------------------------------------------
# Figures


def _data_uri(path: Path) -> str:
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None:
        raise ReportError(f"figure {path}: unsupported image type {path.suffix!r}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReportError(f"figure {path} cannot be read: {exc}") from exc
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _split_key(key: str) -> tuple[str, list[str]]:
    """A figure key's kind and caption parts.

    ``"roc/hospital_a/test"`` and the flat file-name form ``"roc_hospital_a_test"`` both
    give ``("roc", ["hospital_a", "test"])``.
    """
    if "/" in key:
        kind, *rest = [p for p in key.split("/") if p]
        return kind, rest
    for kind in sorted(FIGURE_KINDS, key=len, reverse=True):
        if key == kind or key.startswith(kind + "_"):
            rest = key[len(kind) + 1 :]
            for split in (*SPLITS, "external"):
                if rest.endswith("_" + split):
                    return kind, [rest[: -len(split) - 1], split]
            return kind, [rest] if rest else []
    return key, []


def _kind_title(kind: str) -> str:
    return FIGURE_KINDS.get(kind, kind.replace("_", " ").capitalize())


def _caption(key: str) -> str:
    kind, parts = _split_key(key)
    return _kind_title(kind) + (f" — {', '.join(parts)}" if parts else "")


def _figure_groups(
    figures: Mapping[str, Path | str], sites: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """Figure keys grouped by kind, known kinds first; within a kind, in the study's
    site order (pooled after the hospitals), training split before test."""
    groups: dict[str, list[str]] = {}
    for key in figures:
        groups.setdefault(_split_key(key)[0], []).append(key)
    order = [k for k in FIGURE_KINDS if k in groups]
    order += sorted(k for k in groups if k not in FIGURE_KINDS)
    site_rank = {site: i for i, site in enumerate(sites)}
    split_rank = {split: i for i, split in enumerate((*SPLITS, "external"))}

    def rank(key: str) -> tuple[Any, ...]:
        parts = _split_key(key)[1]
        site = parts[0] if parts else ""
        split = parts[1] if len(parts) > 1 else ""
        first = (0, site_rank[site], "") if site in site_rank else (1 + (site == POOLED), 0, site)
        return (*first, split_rank.get(split, len(split_rank)), key)

    return [(k, sorted(groups[k], key=rank)) for k in order]


def _figures(
    figures: Mapping[str, Path | str], sites: Sequence[str]
) -> tuple[Markup, list[tuple[str, str]]]:
    parts, toc = [], []
    for kind, keys in _figure_groups(figures, sites):
        anchor = f"fig-{kind}"
        title = _kind_title(kind)
        toc.append((anchor, title))
        items = []
        for key in keys:
            uri = _data_uri(Path(figures[key]))
            wide = kind in {"nomogram", "forest", "lasso_cv"}
            img = Markup(f'<img src="{uri}" alt="{_e(_caption(key))}">')
            cap = _tag("figcaption", Markup(f"{_e(_caption(key))} · <code>{_e(key)}</code>"))
            items.append(_tag("figure", img + cap, class_="wide" if wide else None))
        parts.append(
            Markup(f'<div id="{anchor}">{_tag("h3", title)}')
            + _tag("div", _join(items), class_="figures")
            + Markup("</div>")
        )
    return _join(parts), toc


# ---------------------------------------------------------------------------------------
# Public API


def render_report(
    results: Mapping[str, Any], figures: Mapping[str, Path | str] | None = None
) -> str:
    """Render one run's results as a self-contained HTML page.

    Parameters
    ----------
    results : mapping
        The content of ``results.json`` (schema ``radfed.results/2``; sections an older
        file lacks are shown as not recorded). NaN and None both print as "—".
    figures : mapping of str to path, optional
        Image files keyed like ``"roc/hospital_a/test"``, ``"calibration/pooled/test"``,
        ``"lasso_cv"`` or ``"nomogram"`` (or flat, ``"roc_hospital_a_test"``): the kind
        they are grouped by, then site and split for the caption. Shown in the study's
        site order; embedded as base64 ``data:`` URIs (PNG, JPEG, GIF, WebP or SVG).

    Returns
    -------
    str
        The HTML page.

    Raises
    ------
    ReportError
        ``results`` is not a radfed results file, or a figure cannot be read.
    """
    schema = str(results.get("schema", ""))
    if not schema.startswith("radfed.results/"):
        raise ReportError(f"not a radfed results file (schema {schema!r})")
    figures = figures or {}
    sections: list[tuple[str, str, Markup]] = [
        ("settings", "Study settings", _settings(results)),
        ("cohort", "Cohort", _cohort(results)),
        *(
            [("reproducibility", "Reproducibility (ICC)", _reproducibility(results))]
            if results.get("reproducibility")
            else []
        ),
        ("radscore", "Radscore", _selection(results)),
        ("models", "Models", _models(results)),
        ("discrimination", "Discrimination", _discrimination(results)),
        ("delong", "Paired DeLong tests", _delong(results)),
        ("calibration", "Calibration", _calibration(results)),
        ("external", "External validation", _external(results)),
    ]
    if (results.get("evaluation") or {}).get("bootstrap"):
        sections.append(("bootstrap", "Bootstrap optimism correction", _bootstrap(results)))
    if results.get("equivalence"):
        sections.append(
            (
                "equivalence",
                "Federated versus pooled equivalence",
                _equivalence(results["equivalence"]),
            )
        )
    if results.get("classifiers"):
        sections.append(("classifiers", "Classifiers on the Radscore", _classifiers(results)))
    sections.append(("rounds", "Federated rounds", _rounds(results)))
    figure_toc: list[tuple[str, str]] = []
    if figures:
        content, figure_toc = _figures(figures, list(results.get("sites") or {}))
        sections.append(("figures", "Figures", content))

    toc_items = []
    for anchor, title, _ in sections:
        sub = Markup("")
        if anchor == "figures" and figure_toc:
            sub = _tag("ol", _join(_tag("li", _tag("a", t, href=f"#{a}")) for a, t in figure_toc))
        toc_items.append(_tag("li", _tag("a", title, href=f"#{anchor}") + sub))
    toc = Markup('<nav class="toc" aria-label="Contents"><h2>Contents</h2>')
    toc += _tag("ol", _join(toc_items)) + Markup("</nav>")
    body = _header(results) + _dropped_sites(results)
    body += _join(_section(a, t, c) for a, t, c in sections)
    title = f"radfed report: {results.get('study', '?')}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"{_tag('title', title)}\n<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head>\n"
        f'<body>\n<div class="layout">\n{toc}\n<main>\n{body}\n</main>\n</div>\n</body>\n</html>\n'
    )


def write_report(
    results: Mapping[str, Any], figures: Mapping[str, Path | str] | None, path: str | Path
) -> Path:
    """Write :func:`render_report`'s page to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    page = render_report(results, figures)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def figures_from_dir(folder: str | Path) -> dict[str, Path]:
    """Image files under ``folder`` keyed by their relative path without suffix.

    ``figures/roc/hospital_a/test.png`` becomes ``"roc/hospital_a/test"``; a missing
    folder gives no figures. A figure saved in several formats is taken once, in the
    first of :data:`IMAGE_TYPES`'s order (PNG first: it renders the same everywhere).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    rank = {suffix: i for i, suffix in enumerate(IMAGE_TYPES)}
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in rank and p.is_file()),
        key=lambda p: (p.with_suffix("").as_posix(), rank[p.suffix.lower()]),
    )
    figures: dict[str, Path] = {}
    for p in files:
        figures.setdefault(p.relative_to(folder).with_suffix("").as_posix(), p)
    return figures


def report_from_run(
    run_id: str, tracking_uri: str | None = None, out: str | Path | None = None
) -> Path:
    """Build the report of an MLflow study run from its artifacts.

    Parameters
    ----------
    run_id : str
        The parent (study) run; its ``results.json`` and ``figures/`` artifacts are read.
    tracking_uri : str, optional
        MLflow tracking URI (default: MLflow's own, e.g. ``$MLFLOW_TRACKING_URI``).
    out : path, optional
        HTML file to write, or an existing folder to write ``report-{run}.html`` into;
        default ``report-{run}.html`` in the working folder (``{run}``: first 8
        characters of the run id).

    Returns
    -------
    Path
        The written HTML file.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ReportError(f"no MLflow run {run_id!r} in {client.tracking_uri}") from exc
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "results.json" not in names:
        parent = run.data.tags.get("mlflow.parentRunId")
        hint = f"; it is a nested run of {parent}, try that one" if parent else ""
        raise ReportError(f"MLflow run {run_id} has no results.json artifact{hint}")
    default_name = f"report-{run.info.run_id[:8]}.html"
    target = Path(out) if out else Path(default_name)
    if target.is_dir():
        target = target / default_name
    with tempfile.TemporaryDirectory(prefix="radfed-report-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="results.json",
            dst_path=tmp,
            tracking_uri=client.tracking_uri,
        )
        results = json.loads(Path(local).read_text())
        figures: dict[str, Path] = {}
        if "figures" in names:
            folder = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id,
                artifact_path="figures",
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
            figures = figures_from_dir(folder)
        # Images are embedded while the downloads still exist.
        path = write_report(results, figures, target)
    log.info("report of run %s: %s", run.info.run_id, path)
    return path

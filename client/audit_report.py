"""``radfed audit``: a site's audit log as a table a data-protection officer can read.

The log itself is written by :class:`~radfed.client.site.SiteWorker` (one JSON line per
request, :mod:`radfed.client.site_state`); this module only reads it. It finds a site's
state folder from its data folder (and site name), filters the entries, and prints them
with a summary per study (its protocol hash: what a site may approve in advance).
See ``docs/privacy.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radfed.client.site_state import (
    AUDIT_FILE,
    SiteState,
    default_state_dir,
    protocol_hash,
    read_audit,
)
from radfed.shared.errors import RadfedError

ANSWERED, REFUSED, ERROR = "answered", "refused", "error"
COLUMNS = (
    "time (UTC)",
    "study",
    "task",
    "patient sets",
    "outcome",
    "rule",
    "counts sent (smallest)",
    "message",
)
#: Widest a column other than the message may print (longer values end in "…").
MAX_WIDTH = 40


def find_state_dir(site_dir: str | Path, name: str | None = None) -> Path:
    """The state folder of the site whose data folder is ``site_dir``.

    ``site_dir`` may be the state folder itself (it holds ``audit.jsonl``: a deployed
    site's ``RADFED_SITE_STATE_DIR``). Otherwise the folder is
    :func:`~radfed.client.site_state.default_state_dir` of ``name`` and ``site_dir``;
    without ``name``, the one site that used this data folder.
    """
    folder = Path(site_dir).expanduser()
    if (folder / AUDIT_FILE).is_file():
        return folder
    if name:
        state = default_state_dir(name, folder)
        if not (state / AUDIT_FILE).is_file():
            raise RadfedError(
                f"no audit log for site {name!r} of {folder} (looked in {state}): has it "
                "answered a request yet? A deployed site keeps it in its state folder "
                "(RADFED_SITE_STATE_DIR): give that folder instead"
            )
        return state
    tag = default_state_dir("site", folder).name.rpartition("-")[2]
    root = default_state_dir("site", folder).parent
    found = sorted(p for p in root.glob(f"*-{tag}") if (p / AUDIT_FILE).is_file())
    if not found:
        raise RadfedError(
            f"no audit log for the data folder {folder} under {root}: give the site's name "
            "(--site NAME, as in the study file) or its state folder (the one holding "
            f"{AUDIT_FILE})"
        )
    if len(found) > 1:
        names = ", ".join(p.name.rpartition("-")[0] for p in found)
        raise RadfedError(
            f"several sites used the data folder {folder} ({names}): choose one with --site NAME"
        )
    return found[0]


def select(
    entries: Sequence[dict[str, Any]], study: str | None = None, refused: bool = False
) -> list[dict[str, Any]]:
    """Entries of ``study`` (its name, or a prefix of its protocol hash) and, with
    ``refused``, only the refused ones."""
    out = []
    for e in entries:
        if (
            study
            and e.get("study") != study
            and not (len(study) >= 6 and str(e.get("protocol_hash", "")).startswith(study))
        ):
            continue
        if refused and e.get("outcome") != REFUSED:
            continue
        out.append(e)
    return out


def summary(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Requests answered, refused and failed, overall and per study (with its hash)."""
    total = {"requests": len(entries), ANSWERED: 0, REFUSED: 0, "errors": 0}
    studies: dict[str, dict[str, Any]] = {}
    for e in entries:
        key = {ANSWERED: ANSWERED, REFUSED: REFUSED}.get(str(e.get("outcome")), "errors")
        total[key] += 1
        name = str(e.get("study", ""))
        if not name:
            continue
        s = studies.setdefault(
            name,
            {
                "hashes": [],
                "first": e.get("time", ""),
                "last": "",
                "requests": 0,
                ANSWERED: 0,
                REFUSED: 0,
                "errors": 0,
            },
        )
        digest = str(e.get("protocol_hash", ""))
        if digest and digest not in s["hashes"]:
            s["hashes"].append(digest)
        s["last"] = e.get("time", "")
        s["requests"] += 1
        s[key] += 1
    return {**total, "studies": studies}


def _counts(entry: dict[str, Any]) -> str:
    if entry.get("outcome") != ANSWERED:
        return "none"
    sent = entry.get("counts_sent") or {}
    values = [float(v) for v in sent.values() if isinstance(v, (int, float)) and v > 0]
    if not sent:
        return ""
    smallest = f" ({min(values):g})" if values else ""
    return f"{len(sent)}{smallest}"


def _message(entry: dict[str, Any]) -> str:
    message = str(entry.get("message", ""))
    if entry.get("outcome") == ANSWERED:
        # Parts of an answered request that were not (undefined or refused subsets).
        reply = entry.get("reply") or {}
        notes = [
            f"{k.removesuffix('_status')}: {v}"
            for k, v in reply.items()
            if k.endswith("_status") and isinstance(v, str) and v not in ("ok", "none")
        ]
        message = "; ".join(notes)
    return message


def row(entry: dict[str, Any]) -> list[str]:
    """One entry as the table's cells (see :data:`COLUMNS`)."""
    time = str(entry.get("time", "")).replace("T", " ").removesuffix("+00:00")
    task = str(entry.get("task", ""))
    if entry.get("step"):
        task += f"/{entry['step']}"
    outcome = str(entry.get("outcome", ""))
    rule = str(entry.get("rule", ""))
    if outcome == ANSWERED:
        rule = "all passed"
    return [
        time,
        str(entry.get("study", "")) or "-",
        task,
        ", ".join(entry.get("subsets") or []) or "-",
        outcome,
        rule or "-",
        _counts(entry) or "-",
        _message(entry),
    ]


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(entries: Sequence[dict[str, Any]]) -> str:
    """The entries as an aligned text table, oldest first."""
    rows = [[_cell(c, MAX_WIDTH) for c in row(e)[:-1]] + [row(e)[-1]] for e in entries]
    header = list(COLUMNS)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, ["-" * w for w in widths] + ["-" * len(COLUMNS[-1])], *rows]:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_summary(
    info: dict[str, Any], state_dir: Path, total: int, filtered: bool = False
) -> str:
    """The summary: the folder, one line per study (its protocol hash and split
    assignment file) and the totals."""
    lines = [f"audit log: {Path(state_dir) / AUDIT_FILE}"]
    state = SiteState(state_dir)
    pins = pinned(state_dir)
    for name, s in info["studies"].items():
        pin = pins.get(name, {})
        digest = pin.get("hash", "")
        lines.append(
            f"study {name!r}: "
            + (f"protocol hash {digest}, pinned {pin.get('pinned', '')}; " if digest else "")
            + f"{s['requests']} requests from {s['first']} to {s['last']}"
        )
        others = [h[:12] for h in s["hashes"] if h != digest]
        if others:
            lines.append(f"  requests under another protocol (hash {', '.join(others)})")
        assignment = state.assignment_path(name)
        if assignment.is_file():
            lines.append(f"  split and folds of its patients (never sent): {assignment}")
    of = f" (of {total} in the log)" if filtered else ""
    requests = "1 request" if info["requests"] == 1 else f"{info['requests']} requests"
    errors = "1 error" if info["errors"] == 1 else f"{info['errors']} errors"
    lines.append(f"{requests}{of}: {info[ANSWERED]} answered, {info[REFUSED]} refused, {errors}")
    return "\n".join(lines)


def pinned(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The studies the site has pinned: name -> hash, protocol and when."""
    path = Path(state_dir) / "pins.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def audit_report(
    site_dir: str | Path,
    name: str | None = None,
    study: str | None = None,
    refused: bool = False,
    as_json: bool = False,
) -> str:
    """What ``radfed audit`` prints: the table and the summary, or (``as_json``) one
    JSON document with the state folder, the summary and the entries."""
    state_dir = find_state_dir(site_dir, name)
    entries = read_audit(state_dir)
    chosen = select(entries, study, refused)
    info = summary(chosen)
    if as_json:
        return json.dumps(
            {
                "state_dir": str(state_dir),
                "pinned": pinned(state_dir),
                "summary": info,
                "entries": chosen,
            },
            indent=1,
        )
    filtered = bool(study or refused)
    if not chosen:
        table = "no request matches" if filtered else "no request yet"
    else:
        table = format_table(chosen)
    return table + "\n\n" + format_summary(info, state_dir, len(entries), filtered)


def study_hash(study_file: str | Path) -> str:
    """The protocol hash of a study file: what a site's IT approves in advance
    (``RADFED_APPROVED_STUDIES``, node-config ``approved-studies``)."""
    from radfed.shared.config import load_study

    return protocol_hash(load_study(study_file).protocol())

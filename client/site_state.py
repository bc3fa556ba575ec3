"""What a site remembers between requests: its secret, pinned studies, the patient sets
it has answered over, its split assignments and its append-only audit log.

All of it lives in the site's own state folder and never leaves the site:

================================  =========================================================
file                              holds
================================  =========================================================
``secret.key``                    32 random bytes mixed into every split and fold draw, so
                                  the coordinator can neither predict nor steer them
``pins.json``                     each study's protocol, pinned the first time it was
                                  answered (or approved in advance by its hash)
``answered_sets.json``            keyed digests of every patient set an aggregate was
                                  computed over (differencing rule)
``assignments/{study}.csv``       patient id, subset and fold of every patient, for the
                                  site's own statisticians
``audit.jsonl``                   every request and reply: task, study, patient sets,
                                  shapes, counts sent, the rule that passed or refused it
================================  =========================================================

Flower starts a process per message, so every update is a locked read-modify-write.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import hmac
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radfed.shared.privacy import PrivacyPolicy, refuse

#: Overrides the root under which each site keeps its state folder.
STATE_ENV = "RADFED_SITE_STATE"
AUDIT_FILE = "audit.jsonl"
#: The state folder inside a writable site data folder.
LOCAL_STATE = ".radfed-site"
#: Protocol keys a pinned study may not change (everything that decides which patients
#: an aggregate covers or what it is computed from).
PINNED_KEYS = (
    "study",
    "outcome",
    "clinical",
    "features",
    "seed",
    "test_fraction",
    "folds",
    "batch",
    "covariates",
    "categorical",
    "extraction_params",
    "clinical_categorical",  # these two decide the split's redraws (rare levels)
    "merge_levels",
)
#: How a newly pinned study's split is drawn: 1, the first stratified draw; 2, redrawn
#: until no categorical level is rare in a split (``radfed.client.site.stratified_split``).
SPLIT_RULE = 2
#: Pinned keys a protocol may lack; hashed only when present, so that a study without
#: them keeps the hash its sites' IT approved before they were pinned.
OPTIONAL_PINNED_KEYS = ("clinical_categorical", "merge_levels")
#: Labels of the patient sets over which a site sends no statistic of the outcome (the
#: reproducibility ICC sums: the features of the patients rated on every mask). The
#: differencing rule compares such a set with any other on its patients only: no
#: difference with it can carry an outcome.
OUTCOME_FREE = ("reproducibility ",)


def protocol_hash(protocol: dict[str, Any]) -> str:
    """SHA-256 of the pinned part of a protocol: what a site's IT approves."""
    pinned = {
        k: protocol.get(k) for k in PINNED_KEYS if k in protocol or k not in OPTIONAL_PINNED_KEYS
    }
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()


def default_state_dir(name: str, data_dir: Path) -> Path:
    """Where a site keeps its state unless told: under ``$RADFED_SITE_STATE`` when set;
    else in the data folder (``.radfed-site/``, so the state goes with the data) when
    that is writable; else under ``~/.local/state/radfed/sites``."""
    tag = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    root = os.environ.get(STATE_ENV)
    if root:
        return Path(root) / "sites" / f"{name}-{tag}"
    if Path(data_dir).is_dir() and os.access(data_dir, os.W_OK):
        return Path(data_dir) / LOCAL_STATE
    home = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return home / "radfed" / "sites" / f"{name}-{tag}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class SiteState:
    """A site's state folder (created on first use, private to the site's user)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _ensure(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (processes answering concurrently take turns)."""
        self._ensure()
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_json(self, name: str, default: Any) -> Any:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else default

    def _write_json(self, name: str, value: Any) -> None:
        path = self.folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # -- the secret -------------------------------------------------------------------

    def secret(self) -> bytes:
        """The site's secret, made on first use (32 random bytes, readable by the site
        only)."""
        if getattr(self, "_secret", None):
            return self._secret
        path = self.folder / "secret.key"
        with self.locked():
            if not path.is_file():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
            self._secret = path.read_bytes()
        return self._secret

    def keyed(self, text: str) -> str:
        """A digest of ``text`` under the site's secret (patient ids in the state files)."""
        return hmac.new(self.secret(), text.encode(), hashlib.sha256).hexdigest()[:16]

    # -- pinned studies ---------------------------------------------------------------

    def pin(self, protocol: dict[str, Any], approved: Sequence[str] = (), min_cell: int = 0) -> str:
        """Pin ``protocol`` the first time its study is answered; refuse any change.

        With ``approved`` (hashes the site's IT approved), only those protocols are
        answered at all. The pin also keeps how the split is drawn (:data:`SPLIT_RULE`,
        with ``min_cell`` at the time), so that neither a later radfed nor a changed
        minimum cell size re-splits a pinned study (:meth:`split_rule`). Returns the
        protocol's hash.
        """
        study = str(protocol.get("study", ""))
        digest = protocol_hash(protocol)
        context = f"study {study!r}"
        if approved and digest not in approved:
            raise refuse(
                "pinned-study", context, "its protocol hash is not among the site's approved ones"
            )
        with self.locked():
            pins = self._read_json("pins.json", {})
            pinned = pins.get(study)
            if pinned is None:
                pins[study] = {
                    "hash": digest,
                    "protocol": _pinned(protocol),
                    "pinned": _now(),
                    "split": {"rule": SPLIT_RULE, "min_cell": int(min_cell)},
                }
                self._write_json("pins.json", pins)
            elif pinned["hash"] != digest:
                changed = sorted(
                    k for k in PINNED_KEYS if pinned["protocol"].get(k) != protocol.get(k)
                )
                raise refuse(
                    "pinned-study",
                    context,
                    f"the site pinned this study's protocol on {pinned['pinned']}; the request "
                    f"changes {', '.join(changed)} (run a changed protocol as a new study name)",
                )
        return digest

    def split_rule(self, study: str) -> dict[str, int]:
        """How a pinned study's split is drawn: ``{"rule", "min_cell"}``. A study pinned
        before split rules were kept (rule 1) keeps its first draw, without redraws."""
        pinned = self._read_json("pins.json", {}).get(study) or {}
        return pinned.get("split") or {"rule": 1, "min_cell": 0}

    # -- the differencing rule --------------------------------------------------------

    def check_sets(
        self,
        sets: dict[str, np.ndarray],
        ids: np.ndarray,
        y: np.ndarray,
        study: str,
        policy: PrivacyPolicy,
        record: bool = True,
    ) -> None:
        """Refuse when a patient set differs from an answered one by 1..min_cell-1
        patients, events or non-events; otherwise, with ``record``, remember the new
        sets (a site records them once its reply has passed every rule).

        The difference of two aggregates is an aggregate over the patients in one set
        and not the other, so it must pass the minimum-cell rule like any subset (an
        "all minus train" that recovers a refused test split is refused here). When
        either set is :data:`OUTCOME_FREE`, only the patients count: a difference with
        it holds no statistic of the outcome (a LASSO fold that shares most of its
        patients with the rated ones is answered, one that differs by two is not).

        Parameters
        ----------
        sets : dict
            Label (for the audit log) -> boolean mask over ``ids``.
        ids : ndarray of str
            The site's patient ids of its analysis table.
        y : ndarray
            The outcome (0/1) of each patient.
        """
        if not sets:
            return
        y = np.asarray(y).astype(bool)
        keyed_ids = np.array([self.keyed(i) for i in ids], dtype=object)
        keyed = {
            label: (set(keyed_ids[mask]), set(keyed_ids[mask & y])) for label, mask in sets.items()
        }
        with self.locked():
            answered = self._read_json("answered_sets.json", [])
            known = [
                (a["label"], a["study"], set(a["members"]), set(a["events"])) for a in answered
            ]
            for label, (members, events) in keyed.items():
                for other_label, other_study, other, other_events in known:
                    diff = members ^ other
                    diff_events = len(events ^ other_events)
                    counts = [len(diff), diff_events, len(diff) - diff_events]
                    if label.startswith(OUTCOME_FREE) or other_label.startswith(OUTCOME_FREE):
                        counts = counts[:1]
                    if any(policy.small(c) for c in counts):
                        raise refuse(
                            "differencing",
                            f"{label} of study {study!r}",
                            f"the patient set differs from one answered before "
                            f"({other_label} of study {other_study!r}) by fewer than "
                            f"{policy.min_cell} patients, events or non-events",
                        )
            new = False
            for label, (members, events) in keyed.items() if record else ():
                if all(members != other for _, _, other, _ in known):
                    answered.append(
                        {
                            "label": label,
                            "study": study,
                            "members": sorted(members),
                            "events": sorted(events),
                        }
                    )
                    known.append((label, study, members, events))
                    new = True
            if new:
                self._write_json("answered_sets.json", answered)

    # -- assignments and audit --------------------------------------------------------

    def assignment_path(self, study: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study) or "study"
        return self.folder / "assignments" / f"{safe}.csv"

    def write_assignment(
        self, study: str, ids: np.ndarray, subsets: np.ndarray, folds: np.ndarray
    ) -> Path:
        """patient_id, subset, fold of every patient (fold empty outside training)."""
        path = self.assignment_path(study)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["patient_id", "subset", "fold"])
        for pid, subset, fold in zip(ids, subsets, folds, strict=True):
            writer.writerow([pid, subset, "" if fold < 0 else int(fold)])
        text = buffer.getvalue()
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return path

    def audit(self, entry: dict[str, Any]) -> None:
        """Append one JSON line to the audit log (never rewritten)."""
        self._ensure()
        line = json.dumps({"time": _now(), **entry}, sort_keys=True, default=_plain) + "\n"
        with self.locked(), open(self.folder / AUDIT_FILE, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _pinned(protocol: dict[str, Any]) -> dict[str, Any]:
    return {k: protocol.get(k) for k in PINNED_KEYS}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_audit(folder: Path) -> list[dict[str, Any]]:
    """The audit log's entries, oldest first."""
    path = Path(folder) / AUDIT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_assignment(folder: Path, study: str) -> dict[str, tuple[str, int | None]]:
    """patient id -> (subset, fold) from a site's assignment file."""
    path = SiteState(folder).assignment_path(study)
    out: dict[str, tuple[str, int | None]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["patient_id"]] = (row["subset"], int(row["fold"]) if row["fold"] else None)
    return out

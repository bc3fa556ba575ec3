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
        # The answered sets as last read or written, with the file's identity then.
        self._index: tuple[tuple[int, int, int] | None, _AnsweredSets] | None = None

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
        weights: np.ndarray | None = None,
    ) -> None:
        """Refuse when a patient set differs from an answered one by 1..min_cell-1
        patients, events or non-events; otherwise, with ``record``, remember the new
        sets (a site records them once its reply has passed every rule).

        With ``weights`` (a bootstrap replicate: each patient's number of copies, over
        ``ids``) the sets are weighted: two aggregates then differ by the patients whose
        weights differ (a patient in one set only has weight 0 in the other), and those
        must be 0 or at least ``min_cell`` patients, events and non-events. Sets without
        weights are compared as before (every member weighs 1).

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
        weighed = {
            label: None
            if weights is None or np.all(weights[mask] == 1)
            else dict(zip(keyed_ids[mask], map(int, weights[mask]), strict=True))
            for label, mask in sets.items()
        }
        with self.locked():
            index = self._answered_index()
            for label, (members, events) in keyed.items():
                row = index.first_small(members, weighed[label], events, label, policy)
                if row is not None:
                    other = index.answered[row]
                    raise refuse(
                        "differencing",
                        f"{label} of study {study!r}",
                        f"the patient set differs from one answered before "
                        f"({other['label']} of study {other['study']!r}) by fewer than "
                        f"{policy.min_cell} patients, events or non-events",
                    )
            new = False
            for label, (members, events) in keyed.items() if record else ():
                mine = weighed[label]
                if not index.holds(members, mine):
                    entry = {
                        "label": label,
                        "study": study,
                        "members": sorted(members),
                        "events": sorted(events),
                    }
                    if mine is not None:
                        entry["weights"] = [mine[m] for m in entry["members"]]
                    index.add(entry)
                    new = True
            if new:
                self._write_json("answered_sets.json", index.answered)
                self._index = (self._stat("answered_sets.json"), index)

    def _stat(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = (self.folder / name).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _answered_index(self) -> _AnsweredSets:
        """The answered sets (call with the lock held), parsed again only when the file
        changed since this object last read or wrote it."""
        stat = self._stat("answered_sets.json")
        cached = self._index
        if cached is None or cached[0] != stat or stat is None:
            cached = (stat, _AnsweredSets(self._read_json("answered_sets.json", [])))
            self._index = cached
        return cached[1]

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


class _AnsweredSets:
    """The answered patient sets as a matrix (set x patient: its weight, 0 outside the
    set, 1 for a member of an unweighted set) and their events, so a new set is compared
    with all of them at once."""

    def __init__(self, answered: list[dict[str, Any]]) -> None:
        self.answered = answered
        self.column: dict[str, int] = {}
        for a in answered:
            for m in a["members"]:
                self.column.setdefault(m, len(self.column))
        n, u = len(answered), len(self.column)
        self.weights = np.zeros((n, u), dtype=np.int64)
        self.events = np.zeros((n, u), dtype=bool)
        for r, a in enumerate(answered):
            self.weights[r, [self.column[m] for m in a["members"]]] = a.get("weights", 1)
            self.events[r, [self.column[m] for m in a["events"]]] = True
        self.weighted = np.array(["weights" in a for a in answered], dtype=bool)
        self.free = np.array([a["label"].startswith(OUTCOME_FREE) for a in answered], dtype=bool)

    def _compare(
        self, members: set[str], weights: dict[str, int] | None, events: set[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per answered set: the patients whose weight differs from the new set's, and
        the events among them (for two unweighted sets: the events in one set only)."""
        inside = [m for m in members if m in self.column]
        outside = len(members) - len(inside)
        outside_events = sum(1 for m in events if m not in self.column)
        w = np.zeros(len(self.column), dtype=np.int64)
        cols = [self.column[m] for m in inside]
        w[cols] = [weights[m] for m in inside] if weights is not None else 1
        e = np.zeros(len(self.column), dtype=bool)
        e[[self.column[m] for m in events if m in self.column]] = True
        differ = self.weights != w
        diff = differ.sum(axis=1) + outside
        plain = (self.events ^ e).sum(axis=1)
        weighed = (differ & (self.events | e)).sum(axis=1)
        use = self.weighted | (weights is not None)
        return diff, np.where(use, weighed, plain) + outside_events

    def first_small(
        self,
        members: set[str],
        weights: dict[str, int] | None,
        events: set[str],
        label: str,
        policy: PrivacyPolicy,
    ) -> int | None:
        """The first answered set the new one differs from by 1..min_cell-1 patients,
        events or non-events (patients only when either is outcome-free), or None."""
        if not self.answered:
            return None
        diff, diff_events = self._compare(members, weights, events)

        def small(c: np.ndarray) -> np.ndarray:
            return (c > 0) & (c < policy.min_cell)

        free = self.free | label.startswith(OUTCOME_FREE)
        bad = small(diff) | (~free & (small(diff_events) | small(diff - diff_events)))
        rows = np.flatnonzero(bad)
        return int(rows[0]) if len(rows) else None

    def holds(self, members: set[str], weights: dict[str, int] | None) -> bool:
        """Whether the same patients with the same weights were answered before."""
        if not self.answered:
            return False
        diff, _ = self._compare(members, weights, set())
        return bool(np.any(diff == 0))

    def add(self, entry: dict[str, Any]) -> None:
        """Append a newly answered set."""
        for m in entry["members"]:
            self.column.setdefault(m, len(self.column))
        grow = len(self.column) - self.weights.shape[1]
        self.weights = np.pad(self.weights, ((0, 1), (0, grow)))
        self.events = np.pad(self.events, ((0, 1), (0, grow)))
        self.weights[-1, [self.column[m] for m in entry["members"]]] = entry.get("weights", 1)
        self.events[-1, [self.column[m] for m in entry["events"]]] = True
        self.weighted = np.append(self.weighted, "weights" in entry)
        self.free = np.append(self.free, entry["label"].startswith(OUTCOME_FREE))
        self.answered.append(entry)


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

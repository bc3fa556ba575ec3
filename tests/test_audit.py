"""The site's audit log and ``radfed audit``: what a data-protection officer reads.

One small heart-disease study runs in process; then a hostile coordinator sends crafted
requests. The log shows every request, the refused ones with their rule; it only grows;
the site's split assignment stays beside it and no patient id leaves the site.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from radfed.cli import main
from radfed.client.audit_report import find_state_dir, study_hash
from radfed.client.site_state import AUDIT_FILE, default_state_dir, read_assignment, read_audit
from radfed.experiments.heart_disease import write_sites
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.shared.errors import RadfedError
from radfed.shared.messages import BATCH, from_record, roundtrip, unpack
from radfed.tests.conftest import heart_study_text

SITES = ["cleveland", "hungarian", "va"]
SITE = "va"


class ReplyRecorder(InProcessTransport):
    """In-process transport that keeps every request's task and every decoded reply; a
    batch (several requests in one message) counts as its requests."""

    def __init__(self, workers):
        super().__init__(workers)
        self.sent: list[tuple[str, str, dict]] = []

    def _exchange(self, requests):
        replies = super()._exchange(requests)
        for site, rec in replies.items():
            request, reply = from_record(requests[site]), from_record(rec)
            pairs = (
                zip(unpack(request), unpack(reply), strict=True)
                if request.get("task") == BATCH
                else [(request, reply)]
            )
            for item, answer in pairs:
                self.sent.append((site, item.get("task", ""), answer))
        return replies


def strings(value) -> list[str]:
    """Every string inside a reply (names, messages, statuses, object arrays)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *strings(v)]]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings(v)]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        return [str(v) for v in value.ravel()]
    return []


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, shared_data):
    """The study run once; then two crafted requests to ``va`` (refused)."""
    root = tmp_path_factory.mktemp("audit")
    write_sites(root / "sites", shared_data / "heart_disease", tuple(SITES))
    (root / "study.toml").write_text(heart_study_text(SITES))
    config = load_study(root / "study.toml")
    transport = ReplyRecorder(InProcessTransport.from_study(config).workers)
    result = FederatedStudy(config, transport).run()
    state_dir = default_state_dir(SITE, root / "sites" / SITE)
    after_run = (state_dir / AUDIT_FILE).read_text()

    worker = transport.workers[SITE]
    protocol = config.protocol()
    moved = {**protocol, "test_fraction": protocol["test_fraction"] + 0.02}
    steep = {
        "task": "logistic",
        "protocol": protocol,
        "subset": "train",
        "models": ["probe"],
        "probe_columns": ["age"],
        "probe_center": np.array([55.0]),
        "probe_scale": np.array([9.0]),
        "probe_beta": np.array([0.0, 1000.0]),
    }
    crafted = [
        worker.handle(roundtrip({"task": "split", "protocol": moved})),
        worker.handle(roundtrip(steep)),
    ]
    return {
        "root": root,
        "config": config,
        "result": result,
        "transport": transport,
        "state_dir": state_dir,
        "after_run": after_run,
        "crafted": crafted,
    }


def audit(capsys, *args: str) -> str:
    assert main(["audit", *map(str, args)]) == 0
    return capsys.readouterr().out


def audit_hash(capsys, study_file) -> str:
    assert main(["study-hash", str(study_file)]) == 0
    return capsys.readouterr().out.strip()


def test_audit_prints_every_request_the_site_answered(study_run, capsys):
    run_entries = [json.loads(line) for line in study_run["after_run"].splitlines()]
    sent_to_site = [task for site, task, _ in study_run["transport"].sent if site == SITE]
    assert [e["task"] for e in run_entries] == sent_to_site  # one entry per request
    assert {e["outcome"] for e in run_entries} == {"answered"}

    data_dir = study_run["root"] / "sites" / SITE
    out = audit(capsys, data_dir, "--site", SITE)
    # The same table without --site (one site used this folder) and from the state folder.
    assert audit(capsys, data_dir) == out
    assert audit(capsys, study_run["state_dir"]) == out
    lines = out.splitlines()
    header = lines[0]
    for column in ("time (UTC)", "study", "task", "patient sets", "outcome", "rule", "counts"):
        assert column in header
    rows = lines[2 : 2 + len(run_entries) + 2]
    for entry, line in zip(run_entries, rows, strict=False):
        task = entry["task"] + (f"/{entry['step']}" if entry["step"] else "")
        assert task[:40] in line and "answered" in line, (task, line)
    assert (
        f"{len(run_entries) + 2} requests: {len(run_entries)} answered, 2 refused, 0 errors" in out
    )
    digest = study_hash(study_run["root"] / "study.toml")
    assert f"study 'heart': protocol hash {digest}, pinned " in out
    assert "requests under another protocol" in out  # the crafted split
    assert all(e["protocol_hash"] == digest for e in run_entries)
    assert digest == study_run["config"].protocol_hash()
    assert audit_hash(capsys, study_run["root"] / "study.toml") == digest
    # The smallest count sent is shown, never below the site's minimum cell.
    split = next(e for e in run_entries if e["task"] == "split")
    smallest = min(v for v in split["counts_sent"].values() if v > 0)
    assert smallest >= study_run["config"].privacy.min_cell
    assert f"({smallest:g})" in out


def test_crafted_requests_appear_refused_with_their_rule(study_run, capsys):
    for reply in study_run["crafted"]:
        assert reply["error_kind"] == "privacy"
    out = audit(capsys, study_run["root"] / "sites" / SITE, "--refused")
    table = out.split("\n\n")[0].splitlines()[2:]
    assert len(table) == 2
    assert "split" in table[0] and "refused" in table[0] and "pinned-study" in table[0]
    assert "changes test_fraction" in table[0]
    assert "logistic" in table[1] and "saturation" in table[1] and "none" in table[1]
    assert "2 requests (of " in out and "0 answered, 2 refused, 0 errors" in out

    doc = json.loads(audit(capsys, study_run["state_dir"], "--json", "--refused"))
    assert [e["rule"] for e in doc["entries"]] == ["pinned-study", "saturation"]
    assert doc["summary"]["refused"] == 2 and doc["summary"]["answered"] == 0
    assert "no request matches" in audit(capsys, study_run["state_dir"], "--study", "other")


def test_audit_log_is_append_only(study_run):
    after_run = study_run["after_run"]
    now = (study_run["state_dir"] / AUDIT_FILE).read_text()
    assert now.startswith(after_run) and len(now.splitlines()) == len(after_run.splitlines()) + 2
    worker = study_run["transport"].workers[SITE]
    worker.handle(roundtrip({"task": "split", "protocol": study_run["config"].protocol()}))
    later = (study_run["state_dir"] / AUDIT_FILE).read_text()
    assert later.startswith(now) and len(later.splitlines()) == len(now.splitlines()) + 1
    assert read_audit(study_run["state_dir"])[-1]["outcome"] == "answered"


def test_assignment_stays_beside_the_log_and_no_patient_id_is_sent(study_run):
    state_dir, root = study_run["state_dir"], study_run["root"]
    assignment = read_assignment(state_dir, "heart")
    path = next((state_dir / "assignments").glob("*.csv"))
    assert path.parent.parent == state_dir and not path.is_relative_to(root / "sites")
    info = study_run["result"].sites[SITE]
    assert len(assignment) == info["n"]  # one row per analysed patient
    subsets = [subset for subset, _ in assignment.values()]
    assert subsets.count("train") == info["train"]["n"]
    assert subsets.count("test") == info["test"]["n"]
    folds = {fold for subset, fold in assignment.values() if subset == "train"}
    assert folds == set(range(study_run["config"].selection.folds))
    ids = set()
    for site in SITES:
        ids |= set(pd.read_csv(root / "sites" / site / "features.csv")["patient_id"])
    assert set(assignment) <= ids

    replies = [reply for _, _, reply in study_run["transport"].sent] + study_run["crafted"]
    assert len(replies) > 50
    private = [str(i) for i in ids] + [str(state_dir), str(root)]
    for reply in replies:
        for text in strings(reply):
            leaked = [p for p in private if p in text]
            assert not leaked, (leaked, text)


def test_missing_log_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path), "--site", "nowhere"]) == 2
    assert "no audit log for site 'nowhere'" in capsys.readouterr().err
    with pytest.raises(RadfedError, match="give the site's name"):
        find_state_dir(tmp_path)


def test_table_of_handwritten_entries(tmp_path, monkeypatch):
    """The table's cells for each kind of entry, and the choice of site by data folder."""
    from radfed.client.audit_report import audit_report, row, summary

    answered = {
        "time": "2026-01-02T03:04:05+00:00",
        "study": "s",
        "task": "evaluate",
        "step": "",
        "outcome": "answered",
        "rule": "passed every rule",
        "subsets": ["train", "test"],
        "counts_sent": {"train n": 40, "test n": 12, "excluded": -1},
        "reply": {"train_status": "ok", "test_status": "refused", "test_auc": "array[2]"},
    }
    refused = {
        "time": "2026-01-02T03:04:06+00:00",
        "study": "s",
        "task": "select",
        "step": "lasso_irls",
        "outcome": "refused",
        "rule": "saturation",
        "message": "LASSO: refused by the saturation rule",
        "subsets": ["train"],
        "counts_sent": {"train n": 40},
    }
    failed = {"time": "2026-01-02T03:04:07+00:00", "task": "hello", "outcome": "error"}
    assert row(answered) == [
        "2026-01-02 03:04:05",
        "s",
        "evaluate",
        "train, test",
        "answered",
        "all passed",
        "3 (12)",
        "test: refused",
    ]
    # Nothing leaves with a refusal, whatever was counted before it.
    assert row(refused)[2] == "select/lasso_irls" and row(refused)[6] == "none"
    assert row(failed)[1] == "-" and row(failed)[4] == "error"
    info = summary([answered, refused, failed])
    assert (info["answered"], info["refused"], info["errors"]) == (1, 1, 1)
    assert info["studies"]["s"]["requests"] == 2

    # Two sites that used one data folder: --site chooses.
    monkeypatch.setenv("RADFED_SITE_STATE", str(tmp_path / "root"))
    data = tmp_path / "data"
    data.mkdir()
    for name, entry in (("a", answered), ("b", refused)):
        state = default_state_dir(name, data)
        state.mkdir(parents=True)
        (state / AUDIT_FILE).write_text(json.dumps(entry) + "\n")
    with pytest.raises(RadfedError, match=r"several sites used the data folder .* \(a, b\)"):
        find_state_dir(data)
    assert "1 request: 0 answered, 1 refused, 0 errors" in audit_report(data, "b")

"""A coordinator killed mid-run resumes from its last completed phase, to the same numbers.

The real command is run and killed with SIGKILL (no chance to clean up) once the run
folder holds a completed leave-one-site-out entry; ``radfed run --resume`` then
finishes the run in the same folder. Its results equal those of an uninterrupted run
with the same sites, and the sites' audit logs show that the resumed run did not ask
them again for what was saved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from radfed.server.study.checkpoint import Checkpoint
from radfed.shared.config import load_study
from radfed.shared.errors import RadfedError


def _radfed(*args: str, cwd: Path, env: dict, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "radfed", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _audit_lines(state: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in state.rglob("audit.jsonl"))


def _numbers(results: dict) -> dict:
    """Every estimate of a run (timings, paths and run ids left out)."""
    keep = ("models", "performance", "external", "selection", "harmonization")
    return {k: results.get(k) for k in keep}


def _assert_same(a, b, path="results"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and a and not isinstance(a[0], str):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert np.isclose(a, b, rtol=0, atol=1e-12, equal_nan=True), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_killed_coordinator_resumes_to_identical_results(tmp_path, shared_data):
    env = {**os.environ, "RADFED_SITE_STATE": str(tmp_path / "state")}
    env["RADFED_SHARED_DATA"] = str(shared_data)
    made = _radfed("heart-disease", "--out", "hd", cwd=tmp_path, env=env)
    assert made.wait() == 0, made.stderr.read()

    reference = _radfed(
        "-q", "run", "hd/study.toml", "--no-track", "--out", "ref", cwd=tmp_path, env=env
    )
    _, err = reference.communicate(timeout=3000)
    assert reference.returncode == 0, err
    full = _audit_lines(tmp_path / "state")

    run = _radfed("-q", "run", "hd/study.toml", "--no-track", "--out", "run", cwd=tmp_path, env=env)
    deadline = time.monotonic() + 3000  # a loaded machine is slow; the wait is for a file
    while not list((tmp_path / "run").glob("*/checkpoint/held_out-*.pkl")):
        assert run.poll() is None, run.stderr.read()
        assert time.monotonic() < deadline, "no leave-one-site-out entry was saved"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    folder = next((tmp_path / "run").glob("*/checkpoint")).parent
    assert not (folder / "results.json").exists()
    before = _audit_lines(tmp_path / "state")

    resumed = _radfed(
        "-q",
        "run",
        "hd/study.toml",
        "--no-track",
        "--out",
        "run",
        "--resume",
        cwd=tmp_path,
        env=env,
    )
    _, err = resumed.communicate(timeout=3000)
    assert resumed.returncode == 0, err
    assert f"resuming the run in {folder}" in err
    results = json.loads((folder / "results.json").read_text())
    expected = json.loads(next((tmp_path / "ref").glob("*/results.json")).read_text())
    _assert_same(_numbers(expected), _numbers(results))
    # The main fit and the refits share rounds, so a resumed run counts the rounds its
    # newest checkpoint had seen plus those it sent again: never fewer than a whole run.
    assert set(expected["rounds"]) <= set(results["rounds"])
    assert sum(results["rounds"].values()) >= sum(expected["rounds"].values())
    # The resumed run asked the sites only for what was missing: less than a whole run,
    # and with the killed run's requests at least the whole run's.
    resumed_requests, killed_requests = _audit_lines(tmp_path / "state") - before, before - full
    assert resumed_requests < full <= killed_requests + resumed_requests
    assert not (folder / "checkpoint").exists()  # forgotten once the results are kept


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, heart_dir):
    from radfed.tests.conftest import heart_study_text

    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    config = load_study(heart_dir / "study.toml")
    saved = Checkpoint(tmp_path / "run", config)
    saved.save("fit", {"answer": 42})
    assert Checkpoint(tmp_path / "run", config).load("fit") == {"answer": 42}
    (heart_dir / "study.toml").write_text(
        heart_study_text(["cleveland", "hungarian", "va"], min_cell=4)
    )
    changed = load_study(heart_dir / "study.toml")
    with pytest.raises(RadfedError, match="another study or other settings"):
        Checkpoint(tmp_path / "run", changed)

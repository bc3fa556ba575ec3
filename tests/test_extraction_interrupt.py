"""An interrupted `radfed extract` keeps every finished case; the rerun extracts the rest.

The command runs as a subprocess on a synthetic site of the shared ``synthetic_cohort``
fixture (36 patients, fast parameters), whose ``features.parquet`` is the table of an
uninterrupted extraction. The tests wait for the first case in the cache folder (no
fixed sleeps: machines are slow and noisy), send SIGINT or SIGTERM, and check the exit
status, the message, the cases on disk, that no table was written and that no worker
process is left; the rerun must reuse the kept cases and give the same table, value for
value.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from radfed.client import extraction
from radfed.client.extraction import (
    ExtractionInterrupted,
    cache_key,
    extract_site,
    load_params,
    read_features,
)

SITE = "hospital_a"
PATIENTS = 36  # the synthetic_cohort fixture's
WAIT = 900  # seconds: generous, a loaded 2-core machine is slow


def _extract(site: Path, cache: Path, out: Path, jobs: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "radfed", "extract", str(site), "--params", "fast"]
    command += ["--jobs", str(jobs), "--cache", str(cache), "--out", str(out)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a Ctrl-C in pytest's terminal does not reach it
    )


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.json")) if cache.is_dir() else []


def _children(pid: int) -> list[int]:
    """The process's children (its worker processes), where Linux tells."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(c) for c in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("signum", "jobs", "code"),
    [(signal.SIGINT, 2, 130), (signal.SIGTERM, 2, 143)],
    ids=["sigint", "sigterm"],
)
def test_interrupted_extraction_keeps_finished_cases(
    synthetic_cohort, tmp_path, signum, jobs, code
):
    site = synthetic_cohort / "sites" / SITE
    cache, out = tmp_path / "cache", tmp_path / "features.parquet"

    run = _extract(site, cache, out, jobs)
    deadline = time.monotonic() + WAIT
    while not _entries(cache):
        assert run.poll() is None, f"extraction ended early: {run.communicate()}"
        assert time.monotonic() < deadline, "no case finished in time"
        time.sleep(0.05)
    workers = _children(run.pid)
    run.send_signal(signum)
    sent = time.monotonic()
    stdout, stderr = run.communicate(timeout=WAIT)
    stopped_after = time.monotonic() - sent

    assert run.returncode == code, stderr
    kept = len(_entries(cache))
    assert 1 <= kept < PATIENTS
    line = f"interrupted: {kept} of {PATIENTS} cases kept in {cache}; "
    assert line + "run the same command again to finish" in stderr
    assert "Traceback" not in stderr  # workers ignore SIGINT; nothing half-written
    assert stdout == ""  # no "N cases ... -> table" line
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # never a partial table
    assert not list(cache.rglob("*.tmp"))
    # The worker processes end with the command, not minutes later.
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the command"
    assert stopped_after < 120  # in-flight cases are abandoned, not waited for

    again = _extract(site, cache, out, jobs)
    stdout, stderr = again.communicate(timeout=WAIT)
    assert again.returncode == 0, stderr
    cases = f"{kept} case" + "s" * (kept != 1)
    assert f"reusing {cases} extracted before; extracting {PATIENTS - kept}" in stderr
    assert f"({PATIENTS - kept} extracted, {kept} from the cache)" in stdout
    table, meta = read_features(out)
    reference, _ = read_features(site / "features.parquet")  # uninterrupted, same params
    pd.testing.assert_frame_equal(table, reference, check_exact=True)
    assert (meta["n_cases"], meta["n_cached"]) == (PATIENTS, kept)


# ------------------------------------------------------------------- in-process behaviour


def _tiny_site(root: Path, patients: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["patient_id,image,mask"]
    for i in range(patients):
        pixels = rng.normal(100, 20, (12, 16, 16)).astype(np.float32)
        labels = np.zeros((12, 16, 16), np.uint8)
        labels[3:9, 4:12, 4:12] = 1
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(root / "images" / f"p{i}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(root / "images" / f"m{i}.nii.gz"))
        rows.append(f"p{i},images/p{i}.nii.gz,images/m{i}.nii.gz")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def default_sigterm():
    """SIGTERM as a plain process has it: extract_site installs its handler only over the
    default one, and an earlier test's library (Flower's simulation) may have left its
    own in this pytest process."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_signal_during_serial_extraction_keeps_finished_cases(
    tmp_path, monkeypatch, default_sigterm
):
    """jobs=1 (cases computed in this process, with the real signal handler): the case in
    flight is abandoned at once, the finished ones stay in the cache."""
    site, cache = _tiny_site(tmp_path / "site"), tmp_path / "cache"
    real = extraction._run_case
    calls = []

    def second_case_is_interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler aborts this case
            time.sleep(30)
            raise AssertionError("the signal did not stop the case")
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction, "_run_case", second_case_is_interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ExtractionInterrupted) as caught:
        extract_site(site, load_params("fast"), jobs=1, cache_dir=cache, progress=False)
    stop = caught.value
    assert (stop.signum, stop.exit_code, stop.kept, stop.total) == (signal.SIGTERM, 143, 1, 3)
    assert str(stop).startswith(f"interrupted: 1 of 3 cases kept in {cache}")
    assert isinstance(stop, KeyboardInterrupt)  # `except Exception` does not swallow it
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back
    assert len(calls) == 2 and len(_entries(cache)) == 1

    monkeypatch.setattr(extraction, "_run_case", real)
    result = extract_site(site, load_params("fast"), jobs=1, cache_dir=cache, progress=False)
    assert (result.n_cached, result.n_extracted) == (1, 2)


def test_rerun_says_what_it_reuses(tmp_path, capsys):
    site, cache = _tiny_site(tmp_path / "site"), tmp_path / "cache"
    extract_site(site, load_params("fast"), cache_dir=cache, progress=False)
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[2:6, 2:8, 2:8] = 1
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(site / "images" / "m9.nii.gz"))
    (site / "manifest.csv").write_text(
        (site / "manifest.csv").read_text() + "p9,images/p0.nii.gz,images/m9.nii.gz\n"
    )
    result = extract_site(site, load_params("fast"), cache_dir=cache, progress=True)
    assert (result.n_cached, result.n_extracted) == (3, 1)
    assert "reusing 3 cases extracted before; extracting 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ cache key


def _key(image: Path, mask: Path, params=None, choice=()) -> str:
    return cache_key(image, mask, params or load_params("fast"), choice)


def _pair(folder: Path, fmt: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(6 * 8 * 8, dtype=np.int16).reshape(6, 8, 8)
    labels = (pixels % 3 == 0).astype(np.uint8)
    image, mask = folder / f"image.{fmt}", folder / f"mask.{fmt}"
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(image))
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(mask))
    return image, mask


@pytest.mark.parametrize(("fmt", "data"), [("hdr", "image.img"), ("mhd", "image.raw")])
def test_cache_key_counts_the_voxels_of_a_detached_header(tmp_path, fmt, data):
    """An Analyze/NIfTI pair or a MetaImage keeps its voxels beside the header file:
    changed voxels under the same header must not be served from the cache."""
    image, mask = _pair(tmp_path, fmt)
    assert (tmp_path / data).is_file()
    before = _key(image, mask)
    voxels = bytearray((tmp_path / data).read_bytes())
    voxels[100] ^= 0xFF
    (tmp_path / data).write_bytes(bytes(voxels))
    assert _key(image, mask) != before
    (tmp_path / data).unlink()
    assert _key(image, mask) != before


def test_cache_key_counts_what_changes_features(tmp_path, monkeypatch):
    image, mask = _pair(tmp_path / "a", "nii.gz")
    fast = load_params("fast")
    key = _key(image, mask, fast)
    copy = _pair(tmp_path / "b", "nii.gz")
    assert _key(*copy, fast) == key  # content, not path
    assert _key(image, mask, load_params("default")) != key  # parameters
    assert _key(image, mask, fast, ("", "2", "")) != key  # the row's label
    assert _key(image, mask, fast, ("", "", "GTV")) != key  # the row's roi
    assert _key(image, mask, fast, ("1.2.3", "", "")) != key  # the row's series
    monkeypatch.setattr(extraction, "_engine_versions", lambda: "pyradiomics=9.9")
    assert _key(image, mask, fast) != key  # library versions


def test_cache_key_of_plain_cases_is_unchanged(tmp_path):
    """The DICOM and LBP library versions are only in the keys of the cases that use
    them: existing caches of NIfTI cases stay valid."""
    image, mask = _pair(tmp_path, "nii.gz")
    assert extraction._extra_versions(load_params("fast"), image, mask) == ""
    lbp = load_params("fast")
    settings = {**lbp.settings, "imageType": {**lbp.settings["imageType"], "LBP3D": {}}}
    extra = extraction._extra_versions(extraction.ExtractionParams("x", settings, ""), image, mask)
    assert re.fullmatch(r"scipy=[^;]+;trimesh=[^;]+", extra)

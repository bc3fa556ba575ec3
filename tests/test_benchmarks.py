"""Every performance benchmark runs as a smoke run on tiny inputs and writes its CSV and
plot with finite ratios (no timing assertions: speed is measured by the benchmarks
themselves, side by side, in docs/performance.md). Also: the run timeout derived from
a study, and the site table cache the ClientApp reuses across messages."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radfed.shared.config import load_study
from radfed.tests.conftest import heart_study_text


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def finite(rows: list[dict[str, str]], column: str) -> list[float]:
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    assert values, f"no values in column {column}"
    assert all(math.isfinite(v) for v in values), (column, values)
    return values


def run_benchmark(name: str, out: Path, *extra: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"radfed.experiments.benchmarks.{name}",
            "--smoke",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / f"{name}.csv").stat().st_size > 0
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc.stdout


def test_convergence_benchmark_smoke(tmp_path):
    stdout = run_benchmark("convergence", tmp_path)
    summary = rows_of(tmp_path / "convergence-summary.csv")
    by = {r["method"]: r for r in summary}
    assert {"pooled", "radfed-newton", "fedavg-quickstart"} <= set(by)
    # radfed's Newton fit reaches the pooled optimum within 1e-6 in a few rounds.
    assert by["radfed-newton"]["reached"] == "True"
    finite([by["radfed-newton"]], "rounds_to_1e-6")
    finite(summary[1:], "bytes_per_round_vs_radfed")
    finite(summary, "test_auc")
    assert "FLamby split" in stdout


@pytest.mark.slow
def test_scale_benchmark_smoke(tmp_path):
    run_benchmark("scale", tmp_path)
    rows = rows_of(tmp_path / "scale.csv")
    assert [int(r["sites"]) for r in rows] == [2, 4]
    for column in ("time_vs_first", "memory_vs_first", "bytes_per_round_vs_first"):
        finite(rows, column)


@pytest.mark.slow
def test_overhead_benchmark_smoke(tmp_path):
    run_benchmark("overhead", tmp_path)
    rows = rows_of(tmp_path / "overhead.csv")
    assert [r["engine"] for r in rows] == ["inprocess", "pooled"]
    finite(rows, "vs_pooled")


@pytest.mark.slow
def test_extraction_benchmark_smoke(tmp_path):
    run_benchmark("extraction", tmp_path)
    rows = rows_of(tmp_path / "extraction.csv")
    assert {r["method"] for r in rows} == {"plain", "radfed-jobs2", "radfed-cached"}
    finite(rows, "speedup_vs_plain")
    cached = [r for r in rows if r["method"] == "radfed-cached"]
    finite(cached, "times_faster_than_first")
    finite(cached, "lookup_times_faster_than_first")


# ------------------------------------------------------------------- run time limits


def test_run_timeout_follows_the_study(heart_dir):
    from radfed.server.federation.timeouts import (
        EXTERNAL_TAIL,
        ROUND_ALLOWANCE_SECONDS,
        expected_rounds,
        run_timeout,
    )

    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(["cleveland", "hungarian", "va"], pipeline=True, loso=True))
    with_loso = load_study(path)
    path.write_text(heart_study_text(["cleveland", "hungarian", "va"], pipeline=True))
    without = load_study(path)
    # Leave-one-site-out refits share the main fit's rounds: they add only their
    # external evaluation's rounds, and the default limit follows.
    assert expected_rounds(with_loso) == expected_rounds(without) + EXTERNAL_TAIL
    assert run_timeout(with_loso) - run_timeout(without) == pytest.approx(
        EXTERNAL_TAIL * ROUND_ALLOWANCE_SECONDS
    )
    assert run_timeout(without, override=90) == 90
    assert run_timeout(without, override=0) is None  # no overall limit

    path.write_text(
        heart_study_text(["cleveland", "hungarian", "va"]).replace(
            "[tracking]", "[federation]\ntimeout = 7200\nround_timeout = 120\n\n[tracking]"
        )
    )
    config = load_study(path)
    assert (config.timeout, config.round_timeout) == (7200, 120)
    assert run_timeout(config) == 7200
    assert "timeout" not in config.protocol()


def test_federation_limits_are_checked(heart_dir):
    from radfed.shared.errors import StudyConfigError

    path = heart_dir / "study.toml"
    for bad in ("timeout = -1", "round_timeout = 0", 'timeout = "long"'):
        path.write_text(
            heart_study_text(["cleveland"]).replace(
                "[tracking]", f"[federation]\n{bad}\n\n[tracking]"
            )
        )
        with pytest.raises(StudyConfigError, match="federation"):
            load_study(path)


def test_cli_run_has_a_timeout_option():
    from radfed.cli import build_parser

    args = build_parser().parse_args(["run", "study.toml", "--timeout", "3600"])
    assert args.timeout == 3600


def test_progress_lines_are_relayed(tmp_path, caplog):
    import logging

    from radfed.deploy.local_federation import PROGRESS, _relay_progress

    log = tmp_path / "serverapp.log"
    log.write_text(
        f"noise\nradfed INFO: {PROGRESS}phase mrmr: 5 round(s) done\npartial {PROGRESS}x"
    )
    with caplog.at_level(logging.INFO, logger="radfed.deploy.local_federation"):
        offset = _relay_progress(log, 0)
    assert [r.getMessage() for r in caplog.records] == ["phase mrmr: 5 round(s) done"]
    assert offset == len(b"noise\nradfed INFO: ") + len(PROGRESS) + len(
        "phase mrmr: 5 round(s) done\n"
    )


# ------------------------------------------------------------------- site table cache


@pytest.fixture
def image_site(tmp_path, monkeypatch):
    """A two-case image site (real MR) with its own feature and table caches."""
    from radfed.experiments.heart_disease import shared_data_dir

    source = shared_data_dir() / "sts_mr"
    site = tmp_path / "site"
    site.mkdir()
    lines = ["patient_id,image,mask,y,age"]
    for i, case in enumerate(sorted(source.iterdir())[:4]):
        lines.append(f"{case.name},{case / 'image.nii.gz'},{case / 'mask.nii.gz'},{i % 2},{50 + i}")
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("RADFED_CACHE", str(tmp_path / "cache"))
    return site


@pytest.mark.slow
def test_table_cache_serves_the_same_table_until_the_data_changes(image_site, tmp_path):
    import pandas as pd

    from radfed.client import table_cache
    from radfed.client.data import TableSpec, load_site_table

    spec = TableSpec(outcome="y", clinical=("age",), features=("original_firstorder_*",))
    first = table_cache.cached_site_table(image_site, spec, "fast")
    entries = list((tmp_path / "cache" / "tables").glob("*.pkl"))
    assert len(entries) == 1 and entries[0].stat().st_mode & 0o077 == 0  # the site's only
    again = table_cache.cached_site_table(image_site, spec, "fast")
    pd.testing.assert_frame_equal(again.frame, first.frame)
    pd.testing.assert_frame_equal(again.frame, load_site_table(image_site, spec, "fast").frame)
    assert again.settings_hash == first.settings_hash

    # Another study's specification, or a changed manifest, is a new entry.
    other = TableSpec(outcome="y", features=("original_shape_*",))
    table_cache.cached_site_table(image_site, other, "fast")
    assert len(list((tmp_path / "cache" / "tables").glob("*.pkl"))) == 2
    manifest = image_site / "manifest.csv"
    time.sleep(0.01)
    manifest.write_text(manifest.read_text().replace(",0,50", ",1,50"))
    changed = table_cache.cached_site_table(image_site, spec, "fast")
    assert changed.y[0] == 1 and first.y[0] == 0


def test_table_cache_key_sees_files_outside_the_site(tmp_path):
    from radfed.client.table_cache import data_digest

    outside = tmp_path / "images"
    outside.mkdir()
    image = outside / "a.nii.gz"
    image.write_bytes(b"one")
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_text(f"patient_id,image,mask\nA,{image},{image}\n")
    before = data_digest(site)
    assert data_digest(site) == before
    image.write_bytes(b"three")  # same path, new content and size
    assert data_digest(site) != before
    (site / ".hidden.tmp").write_text("x")  # temporaries do not count
    assert data_digest(site) == data_digest(site)


def test_client_app_imports_no_site_code():
    code = (
        "import sys, radfed.client.app; "
        "print(sorted(m for m in ('pandas', 'scipy', 'radfed.client.site', 'SimpleITK') "
        "if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_hello_needs_no_site_code():
    code = """
import sys, types
import radfed.client.app as app
from radfed.shared.messages import from_record, to_record

class Msg:  # a stand-in for flwr's Message, which needs a running Flower task
    def __init__(self, content=None, reply_to=None, **kwargs):
        self.content = content

app.Message = Msg
context = types.SimpleNamespace(node_config={"site-name": "x", "data-dir": "/nowhere"})
reply = app._answer(app.settings_from_node_config, context, Msg(to_record({"task": "hello"})))
loaded = [m in sys.modules for m in ("radfed.client.site", "pandas")]
print(from_record(reply.content)["site"], *loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["x", "False", "False"]

"""Overhead: one study in-process, in Flower's Simulation and Deployment Engines, and
pooled.

Run ``python -m radfed.experiments.benchmarks.overhead [--engines ...] [--smoke]``.

The study is the heart-disease study (``radfed heart-disease``: three training
hospitals, Switzerland validating; ComBat, mRMR, LASSO CV, screening, three models,
evaluation) without leave-one-site-out refits, so that it finishes, and with 4 CV folds
(the sites' differencing rule refuses VA's folds of 10). Each engine runs in
its own process (timed whole, as ``/usr/bin/time -v``; the study's own time is measured
inside it):

* ``pooled``: the study fitted on the pooled rows with the reference libraries
  (:func:`radfed.server.study.pooled.equivalence`: neuroCombat, mRMR, scikit-learn LASSO at
  the federated lambda and its CV curve, statsmodels logistic models; no evaluation),
  the baseline a single-centre analysis would pay;
* ``inprocess``: :class:`~radfed.server.study.driver.FederatedStudy` over the in-process
  transport (sites in the same process, records still Flower-encoded);
* ``simulation``: Flower's Simulation Engine (Ray), one virtual SuperNode per site;
* ``deployment``: a SuperLink and one SuperNode per site on 127.0.0.1
  (:func:`radfed.deploy.local_federation.run_in_local_deployment`, insecure, no tracking),
  from starting the processes to the results written by the ServerApp.

Printed: wall seconds, rounds, seconds per round, and each engine's time against the
pooled fit and against in-process. ``--smoke`` uses two hospitals, clinical variables
only, and by default only ``pooled`` and ``inprocess``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from radfed.client.app import TIMING_ENV
from radfed.experiments.benchmarks import common

ENGINES = ("inprocess", "simulation", "deployment", "pooled")
SMOKE_STUDY = """
[study]
name = "overhead-smoke"
outcome = "disease"
clinical = ["age", "sex", "thalach", "oldpeak"]
seed = 3

[tracking]
enabled = false

[validation]
leave_one_site_out = false

[[sites]]
name = "cleveland"
path = "sites/cleveland"

[[sites]]
name = "hungarian"
path = "sites/hungarian"
"""


def write_study(root: Path, smoke: bool) -> Path:
    """The benchmark's study: heart disease without leave-one-site-out (or the smoke one)."""
    from radfed.experiments.heart_disease import STUDY_FILE, write_sites

    write_sites(root / "sites")
    study = root / "study.toml"
    if smoke:
        study.write_text(SMOKE_STUDY)
    else:
        text = STUDY_FILE.read_text().replace(
            "[tracking]", "[validation]\nleave_one_site_out = false\n\n[tracking]", 1
        )
        text = text.replace('uri = "sqlite:///mlflow.db"', "enabled = false")
        # Four folds: VA's 14 training non-events leave at least 3 out of every fold
        # (sites refuse fold subsets differing from the training set by fewer).
        study.write_text(text.replace("folds = 10", "folds = 4"))
    return study


def worker(engine: str, study: Path, out: Path) -> dict:
    """Run the study with one engine in this process; return its own timings."""
    import logging

    logging.disable(logging.WARNING)
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.results import StudyResult
    from radfed.server.study.driver import FederatedStudy
    from radfed.shared.config import load_study

    config = load_study(study)
    start = time.perf_counter()
    if engine == "pooled":
        from radfed.server.study.pooled import equivalence

        # The pooled fit compares against a federated result: make it first, untimed.
        federated = FederatedStudy(config, InProcessTransport.from_study(config)).run()
        start = time.perf_counter()
        rows = equivalence(config, federated)
        seconds = time.perf_counter() - start
        return {"study_seconds": seconds, "rounds": 0, "checks": len(rows)}
    if engine == "inprocess":
        result = FederatedStudy(config, InProcessTransport.from_study(config)).run()
    elif engine == "simulation":
        from radfed.server.federation.simulation import run_in_simulation

        result = run_in_simulation(config)
    elif engine == "deployment":
        from radfed.deploy.local_federation import run_in_local_deployment

        os.environ[TIMING_ENV] = "1"  # every ClientApp writes where its time went
        path = run_in_local_deployment(config, out, track=False)
        seconds = time.perf_counter() - start
        result = StudyResult.read_json(path)
        return {
            "study_seconds": seconds,
            "rounds": sum(result.rounds.values()),
            "messages": client_timings(out),
        }
    else:
        raise ValueError(engine)
    seconds = time.perf_counter() - start
    return {"study_seconds": seconds, "rounds": sum(result.rounds.values())}


def client_timings(out: Path) -> list[dict]:
    """The ClientApps' ``radfed timing`` lines from the SuperNodes' logs."""
    rows = []
    for log in sorted(out.glob("**/supernode-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "radfed timing:" not in line:
                continue
            fields = dict(part.split("=", 1) for part in line.split("radfed timing:", 1)[1].split())
            row: dict = {"site": fields.pop("site", ""), "task": fields.pop("task", "")}
            row.update({k: float(v) for k, v in fields.items()})
            rows.append(row)
    return rows


STAGES = ("start", "decode", "import", "load", "compute", "encode")


def write_message_timings(out: Path, messages: list[dict]) -> None:
    """Where a Deployment Engine message's time goes at a site (medians over messages)."""
    common.write_csv(out / "overhead-deployment-messages.csv", messages)
    data = [m for m in messages if m["task"] != "hello"]
    summary = {s: common.median(m.get(s, 0.0) for m in data) for s in STAGES if data}
    print(
        f"a ClientApp message at a site, median of {len(data)}: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in summary.items())
        + " (start: seconds from the process's start to the message; Flower's start-up)"
    )
    common.write_csv(out / "overhead-deployment-stages.csv", [{"messages": len(data), **summary}])


def main(argv: list[str] | None = None) -> int:
    p = common.parser("overhead", __doc__)
    p.add_argument(
        "--engines", nargs="*", choices=ENGINES, help="default: all (smoke: 2); none with --add"
    )
    p.add_argument(
        "--add",
        nargs="+",
        metavar="CSV",
        help="also show engines from an earlier run's overhead.csv (marked measured_by)",
    )
    p.add_argument("--worker", choices=ENGINES, help=argparse_hidden())
    p.add_argument("--study", help=argparse_hidden())
    p.add_argument("--worker-out", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.worker:
        out = Path(args.worker_out)
        row = worker(args.worker, Path(args.study), out.parent / f"run-{args.worker}")
        out.write_text(json.dumps(row))
        return 0

    info = common.machine()
    print(common.describe_machine(info), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.engines is not None:
        engines = list(args.engines)
    else:
        engines = ["inprocess", "pooled"] if args.smoke else list(ENGINES)
    repeats = args.repeats or 1
    rows: list[dict] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="radfed-bench-overhead-") as tmp:
        study = write_study(Path(tmp), args.smoke)
        for engine in engines:
            runs = []
            for _ in range(repeats):
                result = Path(tmp) / f"{engine}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "radfed.experiments.benchmarks.overhead",
                    "--worker",
                    engine,
                    "--study",
                    str(study),
                    "--worker-out",
                    str(result),
                ]
                try:
                    timing = common.run_process(cmd, {**os.environ, "PYTHONWARNINGS": "ignore"})
                except RuntimeError as exc:  # report the engine as failed, measure the rest
                    print(f"{engine}: FAILED ({exc}); see its output above", flush=True)
                    break
                runs.append({**json.loads(result.read_text()), "timing": timing})
            if not runs:
                failed.append(engine)
                continue
            messages = runs[-1].pop("messages", None)
            if messages:
                write_message_timings(out, messages)
            row = {
                "engine": engine,
                "study_seconds": common.median(r["study_seconds"] for r in runs),
                "process_seconds": common.median(r["timing"].wall for r in runs),
                "cpu_seconds_main_process": common.median(r["timing"].cpu for r in runs),
                "peak_rss_mb": max(r["timing"].max_rss_mb for r in runs),
                "rounds": runs[0]["rounds"],
                "repeats": repeats,
            }
            row["seconds_per_round"] = (
                row["study_seconds"] / row["rounds"] if row["rounds"] else float("nan")
            )
            print(f"{engine}: {row['study_seconds']:.1f} s ({row['rounds']} rounds)", flush=True)
            rows.append(row)
    for path in args.add or []:  # engines measured by an earlier run, said in its rows
        for earlier in common.read_csv(Path(path)):
            if earlier["engine"] not in {r["engine"] for r in rows}:
                earlier["measured_by"] = earlier.get("command", path)
                for key in ("study_seconds", "process_seconds", "seconds_per_round"):
                    earlier[key] = float(earlier[key])
                earlier["rounds"] = int(earlier["rounds"])
                rows.append(earlier)
    order = {e: i for i, e in enumerate(ENGINES)}
    rows.sort(key=lambda r: order[r["engine"]])
    by = {r["engine"]: r for r in rows}
    for row in rows:
        if "pooled" in by:
            row["vs_pooled"] = common.ratio(row["study_seconds"], by["pooled"]["study_seconds"])
        if "inprocess" in by:
            row["vs_inprocess"] = common.ratio(
                row["study_seconds"], by["inprocess"]["study_seconds"]
            )
        if "measured_by" not in row:
            row.update(info)
    common.write_csv(out / "overhead.csv", rows)
    common.print_table(
        rows,
        [
            "engine",
            "study_seconds",
            "process_seconds",
            "rounds",
            "seconds_per_round",
            "vs_pooled",
            "vs_inprocess",
            "peak_rss_mb",
        ],
    )
    fig, axes = common.figure(1, 2, size=(11, 4))
    names = [r["engine"] for r in rows]
    axes[0, 0].bar(names, [r["study_seconds"] for r in rows], color="#4c72b0")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylabel("study wall time (s)")
    axes[0, 1].bar(names, [r["seconds_per_round"] for r in rows], color="#dd8452")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_ylabel("seconds per federated round")
    common.save_figure(fig, out / "overhead.png", info["command"])
    print(f"wrote {out / 'overhead.csv'} and {out / 'overhead.png'}")
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())

"""Scale: time, peak memory and bytes per round as the number of sites grows.

Run ``python -m radfed.experiments.benchmarks.scale [--sites 10 50 100] [--smoke]``.

Every point is a fresh process (its peak resident memory is the process's, as
``/usr/bin/time -v`` reports it) that writes N synthetic feature-table sites
(``--patients`` each: age, sex and 8 measured features with site-specific location and
scale, a logistic outcome), then runs the whole radfed pipeline on them over the
in-process transport (ComBat, mRMR, LASSO with 4-fold CV, screening, three logistic
models, evaluation; no leave-one-site-out; 4 folds of 100 patients leave every fold at
least 3 events and non-events, as the sites' differencing rule requires). Requests and
replies go through radfed's Flower record encoding, as in the Flower engines; the bytes
counted are the encoded array buffers and config values of every request to and reply
from every site. With ``--simulation N`` one more point runs in Flower's Simulation
Engine (Ray) for the transports' overhead at that size.

Printed ratios: each point's wall time, memory and bytes per round against the
smallest point's, and per site (time per site-round), to show how each grows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from radfed.experiments.benchmarks import common

FEATURES = [f"f{i}" for i in range(1, 9)]
STUDY = """
[study]
name = "scale"
outcome = "y"
clinical = ["age", "sex"]
features = {features}
seed = 5

[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]

[selection]
mrmr_k = 4
folds = 4
n_lambdas = 20

[tracking]
enabled = false

[validation]
leave_one_site_out = false
"""


def write_sites(root: Path, sites: int, patients: int, seed: int = 0) -> Path:
    """N synthetic feature-table sites and their study file; returns the study file."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    weights = np.array([1.0, -0.8, 0.6, 0, 0, 0.4, 0, 0])
    tables = []
    for s in range(sites):
        name = f"site{s:03d}"
        age = rng.normal(55, 10, patients)
        sex = rng.integers(0, 2, patients)
        latent = rng.normal(size=(patients, len(FEATURES)))
        eta = 0.03 * (age - 55) + 0.4 * sex + latent @ weights
        y = (rng.random(patients) < 1 / (1 + np.exp(-eta))).astype(int)
        shift, scale = rng.normal(0, 0.5, len(FEATURES)), np.exp(rng.normal(0, 0.2, len(FEATURES)))
        values = latent * scale + shift + 0.01 * (age[:, None] - 55)
        frame = pd.DataFrame(values, columns=FEATURES)
        frame.insert(0, "patient_id", [f"{name}-{i:04d}" for i in range(patients)])
        frame["age"], frame["sex"], frame["y"] = age.round(1), sex, y
        folder = root / "sites" / name
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / "features.csv", index=False)
        tables.append(f'[[sites]]\nname = "{name}"\npath = "sites/{name}"\n')
    study = root / "study.toml"
    study.write_text(STUDY.format(features=json.dumps(FEATURES)) + "\n" + "\n".join(tables))
    return study


def _count_bytes() -> dict[str, int]:
    """Count the encoded bytes of every record through radfed's transports."""
    from radfed.server.federation import encoded, inprocess
    from radfed.shared import messages

    counts = {"bytes": 0, "records": 0}
    encode = messages.to_record

    def counting(payload):
        record = encode(payload)
        counts["records"] += 1
        counts["bytes"] += sum(len(a.data) for a in record["arrays"].values())
        counts["bytes"] += sum(len(str(k)) + len(str(v)) for k, v in record["config"].items())
        return record

    encoded.to_record = counting  # requests (every encoded transport)
    inprocess.to_record = counting  # in-process replies
    return counts


def worker(sites: int, patients: int, transport: str) -> dict:
    """One point, in this process: write the sites, run the study, report."""
    import logging

    logging.disable(logging.WARNING)
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.study.driver import FederatedStudy
    from radfed.shared.config import load_study

    with tempfile.TemporaryDirectory(prefix="radfed-scale-") as tmp:
        config = load_study(write_sites(Path(tmp), sites, patients))
        counts = _count_bytes()
        start = time.perf_counter()
        if transport == "simulation":
            from radfed.server.federation.simulation import run_in_simulation

            result = run_in_simulation(config, cpus_per_site=max(0.01, 2 / sites))
        else:
            result = FederatedStudy(config, InProcessTransport.from_study(config)).run()
        wall = time.perf_counter() - start
    rounds = sum(result.rounds.values())
    return {
        "study_seconds": wall,
        "rounds": rounds,
        "bytes": counts["bytes"],
        "records": counts["records"],
        "auc_nomogram_pooled_test": result.performance.get("nomogram", {})
        .get("pooled", {})
        .get("test", {})
        .get("auc", math.nan),
    }


def run_point(sites: int, patients: int, transport: str) -> dict:
    """Run one point in a fresh process; add its whole-process time and peak memory."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        args = [
            sys.executable,
            "-m",
            "radfed.experiments.benchmarks.scale",
            "--worker",
            str(sites),
            "--patients",
            str(patients),
            "--transport",
            transport,
            "--worker-out",
            str(out),
        ]
        timing = common.run_process(args, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
        row = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    row.update(
        sites=sites,
        patients_per_site=patients,
        transport=transport,
        process_seconds=timing.wall,
        cpu_seconds=timing.cpu,
        peak_rss_mb=timing.max_rss_mb,
        bytes_per_round=row["bytes"] / row["rounds"],
        seconds_per_round=row["study_seconds"] / row["rounds"],
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = common.parser("scale", __doc__)
    p.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--patients", type=int, default=100, help="patients per site")
    p.add_argument(
        "--simulation", type=int, default=0, help="also N sites in the Simulation Engine"
    )
    p.add_argument("--transport", default="inprocess", help=argparse_hidden())
    p.add_argument("--worker", type=int, help=argparse_hidden())
    p.add_argument("--worker-out", help=argparse_hidden())
    p.add_argument("--replot", metavar="CSV", help="only redraw the plot of a scale.csv")
    args = p.parse_args(argv)
    if args.replot:
        rows = common.read_csv(Path(args.replot))
        plot(rows, Path(args.replot).with_suffix(".png"), rows[0].get("command", ""))
        return 0
    if args.worker:
        row = worker(args.worker, args.patients, args.transport)
        Path(args.worker_out).write_text(json.dumps(row))
        return 0

    info = common.machine()
    print(common.describe_machine(info))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [(n, "inprocess") for n in ([2, 4] if args.smoke else args.sites)]
    if args.simulation and not args.smoke:
        points.append((args.simulation, "simulation"))
    patients = 60 if args.smoke else args.patients
    repeats = args.repeats or 1
    rows = []
    for n, transport in points:
        runs = [run_point(n, patients, transport) for _ in range(repeats)]
        row = dict(runs[0])
        for key in ("study_seconds", "process_seconds", "cpu_seconds", "peak_rss_mb"):
            row[key] = common.median(r[key] for r in runs)
        row["seconds_per_round"] = row["study_seconds"] / row["rounds"]
        row["repeats"] = repeats
        print(
            f"{n:4d} sites ({transport}): {row['study_seconds']:.1f} s, {row['rounds']} rounds, "
            f"{row['peak_rss_mb']:.0f} MB peak, {row['bytes_per_round'] / 1e3:.1f} kB/round",
            flush=True,
        )
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["sites_vs_first"] = row["sites"] / base["sites"]
        row["time_vs_first"] = common.ratio(row["study_seconds"], base["study_seconds"])
        row["memory_vs_first"] = common.ratio(row["peak_rss_mb"], base["peak_rss_mb"])
        row["bytes_per_round_vs_first"] = common.ratio(
            row["bytes_per_round"], base["bytes_per_round"]
        )
        row["ms_per_site_round"] = 1e3 * row["seconds_per_round"] / row["sites"]
        row.update(info)
    common.write_csv(out / "scale.csv", rows)
    common.print_table(
        rows,
        [
            "sites",
            "transport",
            "rounds",
            "study_seconds",
            "time_vs_first",
            "peak_rss_mb",
            "memory_vs_first",
            "bytes_per_round",
            "bytes_per_round_vs_first",
            "ms_per_site_round",
        ],
    )
    plot(rows, out / "scale.png", info["command"])
    print(f"wrote {out / 'scale.csv'} and {out / 'scale.png'}")
    return 0


def plot(rows: list[dict], path: Path, note: str) -> None:
    fig, axes = common.figure(1, 3, size=(12, 3.8))
    for transport in dict.fromkeys(r["transport"] for r in rows):
        chosen = [r for r in rows if r["transport"] == transport]
        x = [float(r["sites"]) for r in chosen]
        for ax, key, label in (
            (axes[0, 0], "study_seconds", "study wall time (s)"),
            (axes[0, 1], "peak_rss_mb", "peak memory (MB)"),
            (axes[0, 2], "bytes_per_round", "bytes per round (all sites)"),
        ):
            ax.plot(x, [float(r[key]) for r in chosen], marker="o", label=transport)
            ax.set_xlabel("sites")
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
    axes[0, 0].legend(fontsize=8)
    common.save_figure(fig, path, note)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())

"""Extraction: ``radfed extract --jobs 2`` against a plain pyradiomics loop, and its cache.

Run ``python -m radfed.experiments.benchmarks.extraction [--cases N] [--smoke]``.

Two inputs: the real MR images of ``../shared/data/sts_mr`` (soft-tissue sarcoma T1,
cropped, with tumour masks; radfed's ``default`` parameters, the seed study's) and a
synthetic cohort written by ``radfed synth`` (``--synth-patients`` cases). For each input,
in this order, each a whole process timed as ``/usr/bin/time -v`` would (wall, user+sys
CPU, peak memory):

1. ``plain``: one Python process that builds a ``RadiomicsFeatureExtractor`` from the
   same parameter file and calls ``execute(image, mask)`` case after case (what a user
   would write without radfed);
2. ``radfed-jobs1`` (with ``--with-jobs1``): ``radfed extract --jobs 1``, cold cache;
3. ``radfed-jobs2``: ``radfed extract --jobs 2``, cold cache;
4. ``radfed-cached``: ``radfed extract --jobs 2`` again, every case from the cache;
   and the cached lookup alone, inside one process (``extract_site``'s own time,
   without Python's start and imports).

Printed: cases per minute, the speed-up of 2 jobs over the plain loop, parallel
efficiency (speed-up / 2), and how many times faster the cached re-run is than the
first (whole process, and the cached lookup alone). Targets (issue 11): 2 jobs at least
1.8x the plain loop; a cached re-run at least 50x faster than the first.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from radfed.experiments.benchmarks import common

PLAIN_LOOP = """
import sys, time, warnings, logging
import radiomics
from radiomics.featureextractor import RadiomicsFeatureExtractor
radiomics.setVerbosity(logging.ERROR)
params, label, *cases = sys.argv[1:]
extractor = RadiomicsFeatureExtractor(params)
for pair in cases:
    image, mask = pair.split("::")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = extractor.execute(image, mask, label=int(label))
"""

CACHED_LOOKUP = """
import sys, time
from radfed.client.extraction import extract_site, load_params
params = load_params(sys.argv[2])
start = time.perf_counter()
result = extract_site(sys.argv[1], params, jobs=2, cache_dir=sys.argv[3], progress=False)
elapsed = time.perf_counter() - start
assert result.n_extracted == 0, "the cache should serve every case"
print(elapsed)
"""


def sts_site(root: Path, cases: int | None, source: Path) -> Path:
    """A site folder whose manifest names the real MR images (absolute paths)."""
    folder = root / "sts_mr"
    folder.mkdir(parents=True, exist_ok=True)
    patients = sorted(p for p in source.iterdir() if (p / "image.nii.gz").is_file())
    patients = patients[:cases] if cases else patients
    lines = ["patient_id,image,mask"]
    lines += [f"{p.name},{p / 'image.nii.gz'},{p / 'mask.nii.gz'}" for p in patients]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def synth_site(root: Path, patients: int) -> Path:
    from radfed.experiments.synth import write_cohort

    return write_cohort(root / "synth", sites=1, patients=patients, seed=7, progress=False)[0]


def case_pairs(site: Path) -> list[str]:
    from radfed.client.manifest import read_manifest

    manifest = read_manifest(site)
    return [f"{r['image_path']}::{r['mask_path']}" for _, r in manifest.rows.iterrows()]


def radfed_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "radfed", "-q", *args]


def bench_input(
    name: str, site: Path, params: str, work: Path, repeats: int, with_jobs1: bool
) -> list[dict]:
    from radfed.client.extraction import load_params

    loaded = load_params(params)
    params_file = work / f"{name}-params.yaml"
    params_file.write_text(loaded.text)
    pairs = case_pairs(site)
    n = len(pairs)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cold(jobs: int) -> common.Timed:
        cache = work / f"cache-{name}-{jobs}"
        shutil.rmtree(cache, ignore_errors=True)
        out = work / f"{name}-{jobs}.parquet"
        args = ["extract", str(site), "--params", params, "--jobs", str(jobs)]
        return common.run_process(radfed_cli(*args, "--cache", str(cache), "--out", str(out)), env)

    runs: dict[str, list[common.Timed]] = {"plain": [], "radfed-jobs2": [], "radfed-cached": []}
    if with_jobs1:
        runs["radfed-jobs1"] = []
    lookups: list[float] = []
    for _ in range(repeats):  # interleaved, so a change of load hits every method alike
        plain = [sys.executable, "-c", PLAIN_LOOP, str(params_file), str(loaded.label), *pairs]
        runs["plain"].append(common.run_process(plain, env))
        if with_jobs1:
            runs["radfed-jobs1"].append(cold(1))
        runs["radfed-jobs2"].append(cold(2))
        cache = work / f"cache-{name}-2"
        out = work / f"{name}-cached.parquet"
        args = ["extract", str(site), "--params", params, "--jobs", "2", "--cache", str(cache)]
        runs["radfed-cached"].append(common.run_process(radfed_cli(*args, "--out", str(out)), env))
        lookup = work / "lookup.txt"
        with open(lookup, "w") as handle:
            import subprocess

            subprocess.run(
                [sys.executable, "-c", CACHED_LOOKUP, str(site), params, str(cache)],
                check=True,
                stdout=handle,
                env=env,
            )
        lookups.append(float(lookup.read_text().split()[-1]))

    rows = []
    plain_wall = common.median(t.wall for t in runs["plain"])
    first_wall = common.median(t.wall for t in runs["radfed-jobs2"])
    for method, timings in runs.items():
        wall = common.median(t.wall for t in timings)
        row = {
            "input": name,
            "params": params,
            "cases": n,
            "method": method,
            "wall_seconds": wall,
            "cpu_seconds": common.median(t.cpu for t in timings),
            "peak_rss_mb": max(t.max_rss_mb for t in timings),
            "cases_per_minute": 60 * n / wall,
            "speedup_vs_plain": common.ratio(plain_wall, wall),
            "repeats": len(timings),
        }
        if method in ("radfed-jobs1", "radfed-jobs2"):
            row["parallel_efficiency"] = row["speedup_vs_plain"] / int(method[-1])
        if method == "radfed-cached":
            row["times_faster_than_first"] = common.ratio(first_wall, wall)
            row["lookup_seconds"] = common.median(lookups)
            row["lookup_times_faster_than_first"] = common.ratio(first_wall, row["lookup_seconds"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.parser("extraction", __doc__)
    p.add_argument("--cases", type=int, help="real MR cases (default: all 21)")
    p.add_argument("--synth-patients", type=int, default=20, help="synthetic cases (10 or more)")
    p.add_argument("--with-jobs1", action="store_true", help="also radfed with one job")
    p.add_argument("--data", help="sts_mr folder (default: the shared data)")
    args = p.parse_args(argv)
    from radfed.experiments.heart_disease import shared_data_dir

    info = common.machine()
    print(common.describe_machine(info), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or 1
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="radfed-bench-extract-") as tmp:
        work = Path(tmp)
        source = Path(args.data) if args.data else shared_data_dir() / "sts_mr"
        if args.smoke:
            inputs = [("sts_mr", sts_site(work, 2, source), "fast")]
        else:
            inputs = [
                ("sts_mr", sts_site(work, args.cases, source), "default"),
                ("synth", synth_site(work, args.synth_patients), "default"),
            ]
        for name, site, params in inputs:
            start = time.perf_counter()
            rows += bench_input(name, site, params, work, repeats, args.with_jobs1)
            print(f"{name}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    for row in rows:
        row.update(info)
    common.write_csv(out / "extraction.csv", rows)
    common.print_table(
        rows,
        [
            "input",
            "cases",
            "method",
            "wall_seconds",
            "cpu_seconds",
            "cases_per_minute",
            "speedup_vs_plain",
            "parallel_efficiency",
            "times_faster_than_first",
            "lookup_times_faster_than_first",
        ],
    )
    for name in dict.fromkeys(r["input"] for r in rows):
        by = {r["method"]: r for r in rows if r["input"] == name}
        two, cached = by["radfed-jobs2"], by["radfed-cached"]
        print(
            f"{name}: radfed --jobs 2 is {two['speedup_vs_plain']:.2f}x the plain loop "
            f"(target 1.8x; efficiency {two['parallel_efficiency']:.2f}); the cached re-run "
            f"is {cached['times_faster_than_first']:.1f}x faster as a whole process and "
            f"{cached['lookup_times_faster_than_first']:.0f}x as a cache lookup (target 50x)"
        )
    fig, axes = common.figure(1, 2, size=(11, 4))
    names = list(dict.fromkeys(r["input"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [
            next(r["cases_per_minute"] for r in rows if r["input"] == n and r["method"] == method)
            for n in names
        ]
        axes[0, 0].bar([j + i * width for j in range(len(names))], values, width, label=method)
    axes[0, 0].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    axes[0, 0].set_ylabel("cases per minute (whole process)")
    axes[0, 0].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    speedups = [
        next(
            r["speedup_vs_plain"] for r in rows if r["input"] == n and r["method"] == "radfed-jobs2"
        )
        for n in names
    ]
    axes[0, 1].bar(names, speedups, color="#4c72b0")
    axes[0, 1].axhline(1.8, color="grey", linestyle=":", label="target 1.8x")
    axes[0, 1].set_ylabel("radfed --jobs 2 speed-up over the plain loop")
    axes[0, 1].legend(fontsize=8)
    common.save_figure(fig, out / "extraction.png", info["command"])
    print(f"wrote {out / 'extraction.csv'} and {out / 'extraction.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

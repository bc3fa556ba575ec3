"""The ``radfed`` command line: synth, extract, run, demo, report, compare and deploy."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from radfed.shared.errors import RadfedError

log = logging.getLogger("radfed")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Third-party libraries stay quiet unless asked.
    for noisy in ("radiomics", "alembic", "mlflow", "flwr", "urllib3", "git", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity <= 0 else logging.INFO)


def cmd_synth(args: argparse.Namespace) -> int:
    from radfed.experiments.synth import write_cohort

    folders = write_cohort(
        args.out, sites=args.sites, patients=args.patients, seed=args.seed, progress=not args.quiet
    )
    for folder in folders:
        print(folder)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from radfed.client.extraction import extract_site, load_params, write_features

    params = load_params(args.params)
    site = Path(args.site_dir)
    result = extract_site(
        site, params, jobs=args.jobs, cache_dir=args.cache, progress=not args.quiet
    )
    out = Path(args.out) if args.out else site / "features.parquet"
    path = write_features(result, out)
    print(
        f"{len(result.features)} cases, {result.features.shape[1]} features "
        f"({result.n_extracted} extracted, {result.n_cached} from the cache) -> {path}"
    )
    if result.problems:
        print(f"{len(result.problems)} problem(s), kept out of the table:")
        for problem in result.problems:
            print(f"  {problem}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from radfed.server.runner import run_study
    from radfed.shared.config import load_study

    config = load_study(args.study)
    out = Path(args.out) if args.out else Path(config.source).parent / "radfed-out" / config.name
    result = run_study(
        config,
        transport=args.transport,
        out_dir=out,
        track=not args.no_track,
        jobs=args.jobs,
        pooled=args.pooled,
    )
    print(result.summary())
    print(f"\nresults.json: {out / 'results.json'}")
    print(f"report:       {out / 'report.html'}")
    _print_mlflow(result.federation)
    return 0


def _print_mlflow(federation: dict) -> None:
    run_id = federation.get("mlflow_run_id")
    if run_id:
        uri = federation["mlflow_uri"]
        print(f"MLflow run {run_id} in {uri}")
        print(f"  browse it with: mlflow ui --backend-store-uri {uri}")


def cmd_demo(args: argparse.Namespace) -> int:
    from radfed.experiments.demo import run_demo

    result, out = run_demo(
        Path(args.out),
        sites=args.sites,
        patients=args.patients,
        seed=args.seed,
        params=args.params,
        transport=args.transport,
        jobs=args.jobs,
        progress=not args.quiet,
    )
    print()
    print(result.auc_table())
    print()
    print(result.external_table())
    print(f"\nstudy file:   {out / 'study.toml'}")
    print(f"results.json: {out / 'results' / 'results.json'}")
    print(f"report:       {out / 'results' / 'report.html'}")
    _print_mlflow(result.federation)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from radfed.server.report import report_from_run

    path = report_from_run(args.run_id, tracking_uri=args.tracking_uri, out=args.out)
    print(f"report: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from radfed.server.compare import compare_runs, format_comparison, write_comparison

    tracking_uri, experiment = args.tracking_uri, args.experiment
    if experiment.endswith(".toml"):  # a study file names its store and experiment
        from radfed.shared.config import load_study

        config = load_study(experiment)
        tracking_uri = tracking_uri or config.tracking_uri
        experiment = config.experiment or config.name
    df = compare_runs(
        experiment,
        tracking_uri,
        models=args.models,
        split=args.split,
        metric=args.metric,
        run_ids=args.runs,
        last=args.last,
        baseline=args.baseline,
        sort_by=args.sort_by,
        ascending=not args.descending,
    )
    print(format_comparison(df))
    if args.out:
        csv_path, png_path = write_comparison(df, args.out)
        print(f"\ntable:  {csv_path}\nfigure: {png_path}")
    return 0


#: `radfed deploy TOOL ...` runs the deployment modules (deploy/README.md).
DEPLOY_TOOLS = ("pki", "signing", "site", "coordinator", "health", "demo")


def cmd_deploy(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"radfed.deploy.{args.tool}")
    return int(module.main(args.rest) or 0)


def cmd_heart_disease(args: argparse.Namespace) -> int:
    from radfed.experiments.heart_disease import write_study

    study = write_study(args.out)
    print(f"wrote the four hospitals and {study}")
    print(f"run it with: radfed run {study} [--pooled] [--transport simulation]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, warnings only"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic multi-centre MR cohort")
    p.add_argument("--out", required=True, help="folder for the site folders")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=60, help="patients per site")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("extract", help="extract radiomics features of one site with pyradiomics")
    p.add_argument("site_dir", help="site folder with manifest.csv")
    p.add_argument(
        "--params", default="default", help="'default', 'fast' or a pyradiomics parameter file"
    )
    p.add_argument("--jobs", type=int, default=1, help="cases in parallel (0: all cores)")
    p.add_argument(
        "--out", help="output table (.parquet, or .csv); default SITE_DIR/features.parquet"
    )
    p.add_argument(
        "--cache", help="feature cache folder (default $RADFED_CACHE or ~/.cache/radfed/features)"
    )
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("run", help="run a federated study")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument(
        "--transport", default="inprocess", choices=["inprocess", "simulation", "deployment"]
    )
    p.add_argument("--out", help="output folder (default: radfed-out/STUDY beside the study file)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--pooled",
        action="store_true",
        help="also fit the study on the pooled data with neuroCombat, scikit-learn and "
        "statsmodels, and report the federated-versus-pooled equivalence",
    )
    p.add_argument("--jobs", type=int, default=1, help="extraction cases in parallel at each site")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "heart-disease", help="write the UCI heart-disease hospitals and their study file"
    )
    p.add_argument("--out", default="heart-disease", help="folder (default: ./heart-disease)")
    p.set_defaults(func=cmd_heart_disease)

    p = sub.add_parser("demo", help="synthesise three hospitals, extract and run a study")
    p.add_argument("--out", default="radfed-demo", help="demo folder (default: ./radfed-demo)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=80, help="patients per site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", default="default", help="'default' (seed 000's), 'fast' or a file")
    p.add_argument(
        "--transport", default="inprocess", choices=["inprocess", "simulation", "deployment"]
    )
    p.add_argument(
        "--jobs", type=int, default=0, help="extraction cases in parallel (0: all cores)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="write the HTML report of a tracked study run")
    p.add_argument("run_id", help="MLflow run id of the study run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="HTML file or existing folder (default: ./report-RUN.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="compare a metric per site across tracked study runs")
    p.add_argument("experiment", help="MLflow experiment name, or a study file (TOML) naming it")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the study file's, else $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--metric", default="auc", help="auc (default), brier, cal_slope, hl_p, ...")
    p.add_argument("--split", default="test", choices=["train", "test", "external"])
    p.add_argument("--models", nargs="+", metavar="MODEL", help="default: every model logged")
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="run ids or unique prefixes")
    p.add_argument("--last", type=int, metavar="N", help="only the N most recent runs")
    p.add_argument("--baseline", metavar="RUN_ID", help="differences against (default: oldest)")
    p.add_argument(
        "--sort-by", metavar="COLUMN", help="model, site, #2, Δ#3 (as printed) or a run id"
    )
    p.add_argument("--descending", action="store_true", help="sort largest first")
    p.add_argument("--out", metavar="DIR", help="also write comparison.csv and comparison.png")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "deploy", help="keys, app signing and the container entrypoints (deploy/README.md)"
    )
    p.add_argument("tool", choices=DEPLOY_TOOLS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own arguments")
    p.set_defaults(func=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except RadfedError as exc:
        print(f"radfed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("radfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

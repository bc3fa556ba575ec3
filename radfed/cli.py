"""The ``radfed`` command line: synth, extract, validate, audit, run, demo, report, compare
and deploy."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

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
    if verbosity <= 0:
        # MLflow's artifact download bars (radfed report, model registration) say nothing
        # a user acts on; radfed's own bars (synth, extract) follow -q.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def cmd_synth(args: argparse.Namespace) -> int:
    from radfed.experiments.synth import write_cohort

    folders = write_cohort(
        args.out,
        sites=args.sites,
        patients=args.patients,
        seed=args.seed,
        progress=not args.quiet,
        second_reader=args.second_reader,
        dicom=args.dicom,
    )
    for folder in folders:
        print(folder)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from radfed.client.extraction import (
        ExtractionInterrupted,
        extract_site,
        load_params,
        write_features,
    )
    from radfed.server.outputs.run_folder import OutputError, check_writable

    params = load_params(args.params)
    site = Path(args.site_dir)
    out = _extract_out(site, args.out)  # checked before hours of extraction, not after
    try:
        result = extract_site(
            site, params, jobs=args.jobs, cache_dir=args.cache, progress=not args.quiet
        )
    except ExtractionInterrupted as stop:  # Ctrl-C, SIGTERM: the finished cases are cached
        print(f"radfed: {stop}", file=sys.stderr)
        return stop.exit_code
    try:
        check_writable(out.parent)
        path = write_features(result, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    print(
        f"{len(result.features)} cases, {result.features.shape[1]} features "
        f"({result.n_extracted} extracted, {result.n_cached} from the cache) -> {path}"
    )
    if result.problems:
        print(f"{len(result.problems)} problem(s), kept out of the table:")
        for problem in result.problems:
            print(f"  {problem}")
    return 0


def _extract_out(site: Path, out: str | None) -> Path:
    """The feature table's path: ``--out``, else ``SITE_DIR/features.parquet``, else
    (a read-only site folder) ``./features-SITE.parquet``, said on stderr."""
    from radfed.server.outputs.run_folder import OutputError, check_writable

    if out:
        path = Path(out).expanduser()
        check_writable(path.parent)
        if path.is_dir():
            raise OutputError(f"--out {path} is a folder: give a .parquet or .csv file name")
        if path.exists() and not path.is_file():  # a device such as /dev/full, a pipe
            raise OutputError(f"--out {path} is not a regular file: give a .parquet or .csv file")
        return path
    if not site.is_dir():
        return site / "features.parquet"  # extract_site says the folder is missing
    try:
        check_writable(site, "site folder")
        return site / "features.parquet"
    except OutputError:
        path = Path.cwd() / f"features-{site.resolve().name}.parquet"
        check_writable(path.parent, "current folder (the site folder is read-only)")
        print(
            f"radfed: the site folder {site} is read-only: the feature table goes to {path} "
            "(the feature cache still serves `radfed run`)",
            file=sys.stderr,
        )
        return path


def cmd_run(args: argparse.Namespace) -> int:
    from radfed.server.study.runner import run_study
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
        timeout=args.timeout,
        resume=args.resume,
    )
    print(result.summary())
    return _print_outputs(result.federation)


def _print_outputs(federation: dict) -> int:
    """Print where the run's results are; 2 when part of them could not be recorded."""
    folder = Path(federation.get("output_dir", "."))
    print(f"\nresults.json: {folder / 'results.json'}")
    if (folder / "report.html").is_file():
        print(f"report:       {folder / 'report.html'}")
    _print_mlflow(federation)
    errors = federation.get("errors") or []
    for error in errors:
        print(f"radfed: error: not recorded: {error} (the rest is in {folder})", file=sys.stderr)
    return 2 if errors else 0


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
        **({} if args.readers is None else {"readers": args.readers}),
    )
    print()
    print(result.auc_table())
    print()
    print(result.external_table())
    print(f"\nstudy file:   {out / 'study.toml'}")
    return _print_outputs(result.federation)


def cmd_report(args: argparse.Namespace) -> int:
    from radfed.server.outputs.report import report_from_run

    path = report_from_run(args.run_id, tracking_uri=args.tracking_uri, out=args.out)
    print(f"report: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from radfed.server.outputs.compare import compare_runs, format_comparison, write_comparison

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


def cmd_validate(args: argparse.Namespace) -> int:
    from radfed.client.validate import validate_site

    config = None
    if args.study:
        from radfed.shared.config import load_study

        config = load_study(args.study)
    found = validate_site(args.site_dir, config)
    print(found.report())
    return 0 if found.ok else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from radfed.client.audit_report import audit_report

    print(audit_report(args.site_dir, args.site, args.study, args.refused, args.json))
    return 0


def cmd_study_hash(args: argparse.Namespace) -> int:
    from radfed.client.audit_report import study_hash

    print(study_hash(args.study))
    return 0


def cmd_heart_disease(args: argparse.Namespace) -> int:
    from radfed.experiments.heart_disease import write_study

    study = write_study(args.out)
    print(f"wrote the four hospitals and {study}")
    print(f"run it with: radfed run {study} [--pooled] [--transport simulation]")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``radfed: error: ...`` line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"radfed: error: {message} (see: {self.prog} --help)\n")


def jobs_count(text: str) -> int:
    """``--jobs``: a whole number of worker processes, 0 for one per CPU core."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 0 (0: one per CPU core), got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="radfed", description=__doc__)
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
    p.add_argument(
        "--second-reader",
        action="store_true",
        help="also write a second reader's mask and a repeat per patient (ICC filter)",
    )
    p.add_argument("--dicom", action="store_true", help="write the images as DICOM series folders")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("extract", help="extract radiomics features of one site with pyradiomics")
    p.add_argument("site_dir", help="site folder with manifest.csv")
    p.add_argument(
        "--params",
        default="default",
        help="'default', 'fast', '2d' or a pyradiomics parameter file",
    )
    p.add_argument("--jobs", type=jobs_count, default=1, help="cases in parallel (0: all cores)")
    p.add_argument(
        "--out",
        help="output table (.parquet, or .csv); default SITE_DIR/features.parquet, or "
        "./features-SITE.parquet when the site folder is read-only",
    )
    p.add_argument(
        "--cache",
        help="feature cache folder (default $RADFED_CACHE or ~/.cache/radfed/features); "
        "each case is kept there as it finishes, so an interrupted extraction resumes",
    )
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "validate",
        help="list every problem of a site's data: file, line and all reasons per patient; "
        "exit status 1 when a patient or column is kept out",
    )
    p.add_argument("site_dir", help="site folder (manifest.csv, or features.csv/.parquet)")
    p.add_argument("--study", help="also check the study's outcome, variables and features")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "audit",
        help="print a site's audit log: every request it answered or refused, the rule, "
        "the counts it sent (docs/privacy.md)",
    )
    p.add_argument(
        "site_dir", metavar="SITE", help="the site's data folder, or its state folder (audit.jsonl)"
    )
    p.add_argument(
        "--site",
        metavar="NAME",
        help="the site's name, as in the study file (default: the "
        "one site that used this data folder)",
    )
    p.add_argument("--study", help="only this study (its name, or its protocol hash's start)")
    p.add_argument("--refused", action="store_true", help="only refused requests")
    p.add_argument("--json", action="store_true", help="the summary and entries as JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "study-hash",
        help="print a study file's protocol hash, which a site may approve in advance "
        "(RADFED_APPROVED_STUDIES)",
    )
    p.add_argument("study", help="study file (TOML)")
    p.set_defaults(func=cmd_study_hash)

    p = sub.add_parser("run", help="run a federated study")
    p.add_argument("study", help="study file (TOML)")
    p.add_argument(
        "--transport", default="inprocess", choices=["inprocess", "simulation", "deployment"]
    )
    p.add_argument(
        "--out",
        help="output root (default: radfed-out/STUDY beside the study file); each run "
        "writes into a new folder TIME-ID there, and DIR/latest points at the newest",
    )
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest unfinished in-process run under the output root from its "
        "last completed phase (after the coordinator was stopped or killed)",
    )
    p.add_argument(
        "--pooled",
        action="store_true",
        help="also fit the study on the pooled data with neuroCombat, scikit-learn and "
        "statsmodels, and report the federated-versus-pooled equivalence",
    )
    p.add_argument(
        "--jobs",
        type=jobs_count,
        default=1,
        help="extraction cases in parallel at each site (0: all cores)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="limit of a whole Flower Deployment Engine run (0: none; default: the study's "
        "[federation] timeout, else 300 s plus 60 s per expected round)",
    )
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
        "--jobs", type=jobs_count, default=0, help="extraction cases in parallel (0: all cores)"
    )
    p.add_argument(
        "--readers",
        type=int,
        metavar="N",
        help="patients per site with a second reader's and a repeat mask, for the ICC "
        "filter (default 15; 0: none, no reproducibility phase)",
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
    except Exception as exc:  # a bug, not a user's mistake: one line; -v shows where
        if args.verbose:
            raise
        first = (str(exc).splitlines() or [""])[0]
        print(
            f"radfed: internal error: {type(exc).__name__}: {first} "
            "(rerun with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

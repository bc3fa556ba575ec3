"""Every bad input of ``docs/bad-inputs.md``: a clear message, never a traceback.

Each row of :data:`CASES` is one kind of bad input: the files written, the command run
(in-process, through :func:`radfed.cli.main`), the exit status and the message the user
sees. Study-file mistakes and unusable outputs are one ``radfed: error: ...`` line with
exit status 2, before anything runs; ``radfed validate`` lists bad rows (exit status 1)
with file, line and every reason, and totals that add up. ``docs/bad-inputs.md`` lists
the same rows (a test checks that every row is documented).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from radfed.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"

STUDY = """
[study]
name = "s"
outcome = "y"
clinical = ["age"]
{study}
{sections}
{sites}"""
SITES = '[[sites]]\nname = "a"\npath = "a"\n\n[[sites]]\nname = "b"\npath = "b"\n'


def study(study: str = "", sections: str = "", sites: str = SITES, head: str = "") -> str:
    """A study file: the good minimal one, with lines added to [study], sections added
    after it, other [[sites]] tables, or lines before [study] (``head``)."""
    return head + STUDY.format(study=study, sections=sections, sites=sites)


RUN = ["run", "study.toml", "--no-track", "--out", "out"]
#: A folder nobody may write to, even root (a chmod-ed folder does not stop root).
UNWRITABLE = "/sys/radfed-test" if os.geteuid() == 0 else None

FEATURES = "patient_id,y,age,f1,f2\nP1,1,61,0.5,1.5\nP2,0,57,0.25,2.5\nP3,1,70,0.75,3.5\n"
FEATURE_STUDY = study(study='features = ["f*"]', sites='[[sites]]\nname = "a"\npath = "a"\n')
MANIFEST_HEADER = "patient_id,image,mask,y,age\n"


@dataclass(frozen=True)
class Case:
    """One kind of bad input: what is written, what is run, what the user must see."""

    id: str
    files: dict[str, str]
    args: list[str]
    message: str  # a regular expression the output must match
    status: int = 2
    stream: str = "err"  # "err": one error line on stderr; "out": a report on stdout
    dirs: tuple[str, ...] = ("a", "b")
    extra: dict[str, str] = field(default_factory=dict)  # more files
    lines: int = 1  # lines of the error (a federation's error lists each failing site)
    started: bool = False  # the run started: its folder records the failure


def _study_case(id: str, text: str, message: str) -> Case:
    return Case(id, {"study.toml": text}, RUN, message)


CASES = [
    # ----------------------------------------------------------- study file: shape
    _study_case("toml-syntax", "[study\n", "not valid TOML"),
    _study_case("study-missing", "", r"study file not found|missing required key 'study'"),
    _study_case(
        "split-not-a-table",
        study(head="split = 0.3\n"),
        r"'split' must be a table: write \[split\] on its own line .* not split = 0.3",
    ),
    _study_case(
        "section-as-key",
        study(study="split = 0.3"),
        r"\[study\]: unknown key\(s\) \['split'\] \('split' is a section",
    ),
    _study_case("privacy-not-a-table", study(head="privacy = 3\n"), "'privacy' must be a table"),
    _study_case(
        "sites-single-brackets",
        study(sites='[sites]\nname = "a"\npath = "a"\n'),
        r"write each site as a \[\[sites\]\] table \(double brackets\)",
    ),
    _study_case(
        "sites-string", study(head='sites = "a"\n', sites=""), r"'sites' must be \[\[sites\]\]"
    ),
    _study_case("no-sites", study(sites=""), r"add at least one \[\[sites\]\] table"),
    _study_case(
        "key-typo",
        study().replace("clinical", "clinicl"),
        r"unknown key\(s\) \['clinicl'\] \('clinicl': did you mean 'clinical'\?\)",
    ),
    _study_case(
        "key-misplaced",
        study(study="test_fraction = 0.2"),
        r"\['test_fraction'\] \('test_fraction' belongs in \[split\]\)",
    ),
    _study_case(
        "section-typo",
        study(sections="[selecton]\nmrmr_k = 3\n"),
        r"unknown section\(s\) \['selecton'\] \('selecton': did you mean 'selection'\?\)",
    ),
    _study_case(
        "key-outside-section",
        study(head="seed = 4\n"),
        r"'seed' is not a section \('seed' belongs in \[study\]\)",
    ),
    _study_case(
        "site-key-typo",
        study(sites='[[sites]]\nname = "a"\npth = "a"\n'),
        r"\[\[sites\]\]: unknown key\(s\) \['pth'\] \('pth': did you mean 'path'\?\)",
    ),
    # ------------------------------------------------------------ study file: types
    _study_case(
        "outcome-missing", study().replace('outcome = "y"\n', ""), "missing required key 'outcome'"
    ),
    _study_case("outcome-number", study().replace('"y"', "1", 1), "'outcome' must be a str"),
    _study_case(
        "clinical-string", study().replace('["age"]', '"age"'), "'clinical' must be a list"
    ),
    _study_case(
        "min-cell-bool",
        study(sections="[privacy]\nmin_cell = true\n"),
        r"\[privacy\]: min_cell must be an integer >= 1, got True",
    ),
    _study_case(
        "min-cell-float",
        study(sections="[privacy]\nmin_cell = 2.5\n"),
        r"min_cell must be an integer >= 1, got 2.5",
    ),
    _study_case(
        "tracking-enabled-string",
        study(sections='[tracking]\nenabled = "false"\n'),
        r"\[tracking\]: enabled must be true or false \(without quotes\), got 'false'",
    ),
    _study_case(
        "seed-string", study(study='seed = "42"'), r"seed must be an integer >= 0, got '42'"
    ),
    _study_case(
        "test-fraction-bool",
        study(sections="[split]\ntest_fraction = true\n"),
        r"test_fraction must be in \(0, 1\), got True",
    ),
    _study_case(
        "folds-bool",
        study(sections="[selection]\nfolds = true\n"),
        r"folds must be an integer >= 2, got True",
    ),
    _study_case(
        "rule-list",
        study(sections='[selection]\nrule = ["lambda.min"]\n'),
        r"rule must be 'lambda.min' or 'lambda.1se'",
    ),
    _study_case(
        "params-number",
        study(sections="[extraction]\nparams = 3\n"),
        r'params must be "default", "fast",? .*or a file path, got 3',
    ),
    _study_case(
        "tracking-uri-empty",
        study(sections='[tracking]\nuri = ""\n'),
        r"\[tracking\]: uri must be a non-empty string",
    ),
    _study_case(
        "parametric-string",
        study(sections='[harmonization]\nparametric = "yes"\n'),
        r"parametric must be true or false, got 'yes'",
    ),
    # -------------------------------------------------- study file: impossible values
    _study_case(
        "test-fraction-high",
        study(sections="[split]\ntest_fraction = 1.5\n"),
        r"test_fraction must be in \(0, 1\), got 1.5",
    ),
    _study_case(
        "test-fraction-zero",
        study(sections="[split]\ntest_fraction = 0\n"),
        r"test_fraction must be in \(0, 1\), got 0",
    ),
    _study_case(
        "folds-one", study(sections="[selection]\nfolds = 1\n"), "folds must be an integer >= 2"
    ),
    _study_case(
        "mrmr-k-zero",
        study(sections="[selection]\nmrmr_k = 0\n"),
        "mrmr_k must be an integer >= 1",
    ),
    _study_case(
        "lambda-ratio-high",
        study(sections="[selection]\nlambda_min_ratio = 2\n"),
        r"lambda_min_ratio must be in \(0, 1\)",
    ),
    _study_case(
        "rule-unknown",
        study(sections='[selection]\nrule = "lambda.2se"\n'),
        "rule must be 'lambda.min' or 'lambda.1se', got 'lambda.2se'",
    ),
    _study_case("seed-negative", study(study="seed = -1"), "seed must be an integer >= 0, got -1"),
    _study_case(
        "min-cell-zero",
        study(sections="[privacy]\nmin_cell = 0\n"),
        "min_cell must be an integer >= 1, got 0",
    ),
    _study_case(
        "max-param-fraction-high",
        study(sections="[privacy]\nmax_param_fraction = 2\n"),
        r"max_param_fraction must be a number in \[0, 1\], got 2",
    ),
    _study_case(
        "univariable-p-zero",
        study(sections="[models]\nunivariable_p = 0\n"),
        r"univariable_p must be in \(0, 1\]",
    ),
    _study_case(
        "loso-yes",
        study(sections='[validation]\nleave_one_site_out = "yes"\n'),
        r'leave_one_site_out must be "auto", true or false',
    ),
    _study_case(
        "harmonization-method",
        study(sections='[harmonization]\nmethod = "harmony"\n'),
        "method must be 'combat' or 'none', got 'harmony'",
    ),
    _study_case(
        "categorical-not-covariate",
        study(sections='[harmonization]\ncategorical = ["sex"]\n'),
        r"categorical \['sex'\] must also be covariates",
    ),
    _study_case(
        "clinical-empty", study().replace('["age"]', "[]"), "at least one clinical variable"
    ),
    _study_case(
        "clinical-twice",
        study().replace('["age"]', '["age", "age"]'),
        "'clinical' lists a name twice",
    ),
    # ------------------------------------------- study file: the outcome, sites, names
    _study_case(
        "outcome-as-clinical",
        study().replace('["age"]', '["age", "y"]'),
        r"the outcome 'y' is listed in \[study\] clinical",
    ),
    _study_case(
        "outcome-as-feature",
        study(study='features = ["y"]'),
        r"the outcome 'y' is listed in \[study\] features",
    ),
    _study_case(
        "outcome-as-combat-covariate",
        study(sections='[harmonization]\ncovariates = ["age", "y"]\n'),
        r"the outcome 'y' is listed in \[harmonization\] covariates",
    ),
    _study_case(
        "outcome-as-combat-batch",
        study(sections='[harmonization]\nbatch = "y"\n'),
        r"the outcome 'y' is listed in \[harmonization\] batch",
    ),
    _study_case(
        "clinical-and-feature",
        study(study='features = ["age"]'),
        r"\['age'\] listed both as clinical variables and as features",
    ),
    _study_case(
        "same-folder-twice",
        study(sites=SITES.replace('path = "b"', 'path = "./a/"')),
        "sites 'a' and 'b' point at the same folder .*/a: its patients would be counted twice",
    ),
    _study_case(
        "same-site-name-twice",
        study(sites=SITES.replace('name = "b"', 'name = "a"')),
        "site names must be unique",
    ),
    _study_case(
        "study-name-escapes",
        study().replace('name = "s"', 'name = "../../escaped"'),
        r"name '../../escaped' may hold only letters, digits, '.', '_' and '-'",
    ),
    _study_case(
        "study-name-slash",
        study().replace('name = "s"', 'name = "a/b"'),
        r"name 'a/b' may hold only letters",
    ),
    _study_case(
        "site-name-space",
        study(sites=SITES.replace('name = "a"', 'name = "a b"')),
        "site name 'a b' may hold only letters",
    ),
    _study_case(
        "site-path-empty",
        study(sites=SITES.replace('path = "a"', 'path = ""')),
        "'path' is empty",
    ),
    _study_case(
        "site-role-unknown",
        study(sites=SITES + 'role = "test"\n'),
        r"role must be one of \['training', 'validation'\], got 'test'",
    ),
    _study_case(
        "no-training-site",
        study(sites='[[sites]]\nname = "a"\npath = "a"\nrole = "validation"\n'),
        "at least one site must have role 'training'",
    ),
    Case(
        "site-folder-missing",
        {"study.toml": study(sites='[[sites]]\nname = "a"\npath = "a"\n')},
        RUN,
        "a: site folder not found",
        dirs=(),
        lines=2,
        started=True,
    ),
    # --------------------------------------------------------- command line, outputs
    Case(
        "jobs-negative",
        {"study.toml": study()},
        [*RUN, "--jobs", "-1"],
        r"--jobs: must be a whole number >= 0 \(0: one per CPU core\), got '-1'",
    ),
    Case(
        "jobs-text", {}, ["extract", "a", "--jobs", "many"], "--jobs: must be a whole number >= 0"
    ),
    Case(
        "unknown-transport",
        {"study.toml": study()},
        [*RUN, "--transport", "grpc"],
        "argument --transport: invalid choice: 'grpc'",
    ),
    Case("unknown-command", {}, ["fit", "study.toml"], "argument command: invalid choice: 'fit'"),
    Case(
        "extract-out-under-a-file",
        {"a/manifest.csv": "patient_id,image,mask\n"},
        ["extract", "a", "--out", "/dev/full/x.csv"],
        "cannot write to the output folder /dev/full: /dev/full is not a folder",
    ),
    Case(
        "extract-out-is-a-device",
        {"a/manifest.csv": "patient_id,image,mask\n"},
        ["extract", "a", "--out", "/dev/full"],
        "--out /dev/full is not a regular file",
    ),
    Case(
        "extract-out-is-a-folder",
        {"a/manifest.csv": "patient_id,image,mask\n"},
        ["extract", "a", "--out", "b"],
        "--out b is a folder: give a .parquet or .csv file name",
    ),
    Case(
        "run-out-under-a-file",
        {"study.toml": study(), "taken": "a file"},
        ["run", "study.toml", "--no-track", "--out", "taken/out"],
        "cannot write to the output folder .*/taken/out: .*/taken is not a folder",
    ),
    Case(
        "mlflow-db-is-a-folder",
        {"study.toml": study(sections='[tracking]\nuri = "sqlite:///store"\n'), "store/x": ""},
        ["run", "study.toml", "--out", "out"],
        "the MLflow tracking store .*/store is a folder, not a SQLite database file",
    ),
    Case(
        "mlflow-db-under-a-file",
        {
            "study.toml": study(sections='[tracking]\nuri = "sqlite:///taken/mlflow.db"\n'),
            "taken": "x",
        },
        ["run", "study.toml", "--out", "out"],
        "cannot write to the folder of the MLflow tracking store .*/taken: .* is not a folder",
    ),
    *(
        [
            Case(
                "run-out-read-only",
                {"study.toml": study()},
                ["run", "study.toml", "--no-track", "--out", UNWRITABLE],
                f"cannot write to the output folder {UNWRITABLE}: "
                "(Operation not permitted|Permission denied)",
            ),
            Case(
                "mlflow-db-read-only",
                {
                    "study.toml": study(
                        sections=f'[tracking]\nuri = "sqlite:///{UNWRITABLE}/mlflow.db"\n'
                    )
                },
                ["run", "study.toml", "--out", "out"],
                f"cannot write to the folder of the MLflow tracking store {UNWRITABLE}",
            ),
        ]
        if UNWRITABLE
        else []
    ),
    Case(
        "study-file-not-found", {}, ["run", "nowhere.toml"], "study file not found: .*nowhere.toml"
    ),
    # --------------------------------------------------- radfed validate: the data
    Case("validate-no-folder", {}, ["validate", "nowhere"], "site folder .*nowhere does not exist"),
    Case(
        "validate-empty-folder",
        {},
        ["validate", "a"],
        r"no manifest.csv \(images\) and no features.parquet or features.csv \(features\)",
    ),
    Case(
        "validate-semicolons",
        {"a/features.csv": FEATURES.replace(",", ";")},
        ["validate", "a"],
        r"features.csv is separated by ';' \(a spreadsheet export\?\)",
    ),
    Case(
        "validate-missing-column",
        {"a/features.csv": FEATURES.replace("age", "Age"), "study.toml": FEATURE_STUDY},
        ["validate", "a", "--study", "study.toml"],
        r"features.csv: missing column\(s\) \['age'\]",
    ),
    Case(
        "validate-feature-matches-nothing",
        {"a/features.csv": FEATURES, "study.toml": FEATURE_STUDY.replace('"f*"', '"g*"')},
        ["validate", "a", "--study", "study.toml"],
        "feature 'g\\*' matches none of the site's 2 columns",
    ),
    Case(
        "validate-manifest-column",
        {"a/manifest.csv": "patient_id,image\nP1,x.nii\n"},
        ["validate", "a"],
        "manifest.csv lacks column.* mask",
    ),
    Case(
        "validate-decimal-commas",
        {
            "a/features.csv": FEATURES.replace("0.5", '"0,5"').replace("0.25", '"0,25"'),
            "study.toml": FEATURE_STUDY,
        },
        ["validate", "a", "--study", "study.toml"],
        r"(?s)column problem: 'f1' is written with decimal commas: use decimal points.*"
        r"line 2 \(patient P1\): 'f1' is not a number: '0,5' \(use a decimal point\).*"
        r"3 rows: 1 kept, 2 excluded.*2  'f1' is not a number",
        status=1,
        stream="out",
    ),
    Case(
        "validate-text-column-star",
        {
            "a/features.csv": FEATURES.replace("f2", "scanner")
            .replace("1.5", "GE")
            .replace("2.5", "Siemens")
            .replace("3.5", "GE"),
            "study.toml": FEATURE_STUDY.replace('"f*"', '"*"'),
        },
        ["validate", "a", "--study", "study.toml"],
        r"(?s)column problem: column 'scanner' holds text, not numbers \(e.g. 'GE'\): it "
        r"matches the feature pattern '\*' but is not used as a feature"
        r".*3 rows: 3 kept, 0 excluded",
        status=1,
        stream="out",
    ),
    Case(
        "validate-text-column-named",
        {
            "a/features.csv": FEATURES.replace("f2", "scanner")
            .replace("1.5", "GE")
            .replace("2.5", "GE")
            .replace("3.5", "Philips"),
            "study.toml": FEATURE_STUDY.replace('"f*"', '"f1", "scanner"'),
        },
        ["validate", "a", "--study", "study.toml"],
        r"features.csv: feature\(s\) \['scanner'\] hold text, not numbers",
    ),
    Case(
        "validate-three-problems-one-patient",
        {
            "a/manifest.csv": MANIFEST_HEADER
            + "P1,i1.nii,m1.nii,1,61\nP2,gone.nii,m2.nii,2,abc\nP3,i3.nii,m3.nii,0,70\n",
            "a/i1.nii": "",
            "a/m1.nii": "",
            "a/m2.nii": "",
            "a/i3.nii": "",
            "a/m3.nii": "",
            "study.toml": study(sites='[[sites]]\nname = "a"\npath = "a"\n'),
        },
        ["validate", "a", "--study", "study.toml"],
        r"(?s)manifest.csv line 3 \(patient P2\): gone.nii: file not found; outcome 'y' must "
        r"be 0 or 1, got '2'; 'age' is not a number: 'abc'\n"
        r".*3 rows: 2 kept, 1 excluded\n"
        r"excluded patients per reason \(1 with several reasons, counted under each\):\n"
        r"  1  file not found\n  1  outcome 'y' must be 0 or 1\n  1  'age' is not a number",
        status=1,
        stream="out",
    ),
    Case(
        "validate-duplicate-patient",
        {"a/features.csv": FEATURES + "P1,0,50,0.1,0.2\n"},
        ["validate", "a"],
        r"(?s)line 2 \(patient P1\): patient_id is duplicated.*line 5 \(patient P1\): "
        r"patient_id is duplicated.*4 rows: 2 kept, 2 excluded",
        status=1,
        stream="out",
    ),
    Case(
        "validate-outcome-text",
        {"a/features.csv": FEATURES.replace("P2,0,", "P2,no,"), "study.toml": FEATURE_STUDY},
        ["validate", "a", "--study", "study.toml"],
        r"(?s)line 3 \(patient P2\): outcome 'y' is not a number: 'no'.*1 excluded",
        status=1,
        stream="out",
    ),
    Case(
        "validate-missing-values",
        {
            "a/features.csv": FEATURES.replace("P1,1,61,0.5,", "P1,1,NA,,").replace(
                "P3,1,70", "P3,1,NA"
            ),
            "study.toml": FEATURE_STUDY,
        },
        ["validate", "a", "--study", "study.toml"],
        r"(?s)line 2 \(patient P1\): 'age' is missing; 'f1' is missing\n"
        r"features.csv line 4 \(patient P3\): 'age' is missing\n.*3 rows: 1 kept, 2 excluded\n"
        r".*\n  2  'age' is missing\n  1  'f1' is missing",
        status=1,
        stream="out",
    ),
]


def _write(root: Path, case: Case) -> None:
    for name in case.dirs:
        (root / name).mkdir(parents=True, exist_ok=True)
    for name, text in {**case.files, **case.extra}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys):
    _write(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["-q", *case.args])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    out, err = capsys.readouterr()
    assert status == case.status, (out, err)
    assert "Traceback" not in out + err
    if case.stream == "err":
        assert err.startswith("radfed: error: ") and err.count("\n") == case.lines, err
        assert re.search(case.message, err), err
    else:
        assert re.search(case.message, out), out
    if not case.started:
        assert not (tmp_path / "out").exists()  # refused before any output was made
    else:  # the run's own folder says why it failed; latest still names no failed run
        (folder,) = (tmp_path / "out").iterdir()
        failure = json.loads((folder / "failure.json").read_text())
        assert re.search(case.message, failure["error"]) and failure["study"] == "s"


def test_every_case_is_documented():
    """docs/bad-inputs.md has a row per case (its id in the first column)."""
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert {c.id for c in CASES} - documented == set()
    assert len(CASES) >= 40


def test_validate_counts_add_up_on_real_hospitals(heart_dir):
    """Switzerland: all 123 lack cholesterol, and every reason has its own count."""
    from radfed.client.validate import validate_site
    from radfed.shared.config import load_study

    (heart_dir / "study.toml").write_text(
        '[study]\nname = "h"\noutcome = "disease"\nclinical = ["age", "sex", "trestbps"]\n'
        'features = ["cp", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]\n'
        '[[sites]]\nname = "switzerland"\npath = "sites/switzerland"\n'
    )
    config = load_study(heart_dir / "study.toml")
    found = validate_site(heart_dir / "sites" / "switzerland", config)
    assert (found.n_rows, len(found.kept), len(found.excluded)) == (123, 0, 123)
    counts = found.reason_counts()
    assert counts["'chol' is missing"] == 123
    assert counts["'fbs' is missing"] == 75
    assert sum(len(p.reasons) for p in found.excluded) == sum(counts.values())
    va = validate_site(heart_dir / "sites" / "va", config)
    assert len(va.kept) + len(va.excluded) == va.n_rows == 200
    assert len(va.excluded) == 103  # the 103 patients `radfed run` keeps out at VA


# ------------------------------------------------------------- results never lost


def _result():
    from radfed.server.results import StudyResult
    from radfed.tests.test_report import make_results

    return StudyResult.from_dict(json.loads(json.dumps(make_results())))


def _config(tmp_path: Path, tracking: str = ""):
    from radfed.shared.config import load_study

    (tmp_path / "a").mkdir(exist_ok=True)
    path = tmp_path / "study.toml"
    path.write_text(study(sections=tracking, sites='[[sites]]\nname = "a"\npath = "a"\n'))
    return load_study(path)


def test_a_failing_report_still_writes_results_with_the_error(tmp_path, monkeypatch):
    from radfed.server.outputs import run_folder as outputs
    from radfed.server.study.record import record_result

    def broken(*args, **kwargs):
        raise ValueError("AUCs must lie strictly between 0 and 1")

    monkeypatch.setattr(outputs, "write_figures", broken)
    path = record_result(_result(), _config(tmp_path), tmp_path / "run", track=False)
    data = json.loads(path.read_text())
    assert data["federation"]["errors"] == [
        "figures: ValueError: AUCs must lie strictly between 0 and 1"
    ]
    assert data["federation"]["output_dir"] == str(tmp_path / "run")
    assert data["models"] and data["performance"]  # what was computed is kept
    assert (tmp_path / "run" / "report.html").is_file()  # the report, without figures


def test_a_failing_mlflow_still_writes_results_and_the_command_says_so(
    tmp_path, monkeypatch, capsys
):
    from radfed.server.outputs import run_folder as outputs
    from radfed.server.study.record import record_result
    from radfed.server.tracking import runs as tracking

    def locked(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(tracking, "log_study", locked)
    monkeypatch.setattr(outputs, "write_figures", lambda *a, **k: {})  # (slow, not tested)
    config = _config(tmp_path)
    path = record_result(_result(), config, tmp_path / "run", track=True)
    data = json.loads(path.read_text())
    assert data["federation"]["errors"] == ["MLflow tracking: RuntimeError: database is locked"]
    assert (tmp_path / "run" / "report.html").is_file()
    from radfed.cli import _print_outputs

    capsys.readouterr()
    assert _print_outputs(data["federation"]) == 2  # radfed run's exit status
    out, err = capsys.readouterr()
    assert f"results.json: {tmp_path / 'run' / 'results.json'}" in out
    assert err == (
        "radfed: error: not recorded: MLflow tracking: RuntimeError: database is locked "
        f"(the rest is in {tmp_path / 'run'})\n"
    )


def test_unwritable_tracking_database_is_refused_before_any_round(tmp_path, monkeypatch):
    from radfed.server.outputs.run_folder import OutputError
    from radfed.server.tracking import runs as tracking

    config = _config(tmp_path)
    db = Path(config.tracking_uri.removeprefix("sqlite:///"))
    db.write_bytes(b"")
    real_access = os.access
    monkeypatch.setattr(
        tracking.os, "access", lambda p, mode: False if Path(p) == db else real_access(p, mode)
    )
    with pytest.raises(OutputError, match=f"cannot write to the MLflow tracking store {db}"):
        tracking.check_tracking_store(config)


def test_artifacts_are_stored_beside_the_tracking_database(tmp_path):
    from radfed.server.tracking.runs import artifact_location

    uri = f"sqlite:///{tmp_path}/studies/mlflow.db"
    assert artifact_location(uri, "heart disease/v2") == (
        (tmp_path / "studies" / "mlartifacts" / "heart_disease_v2").as_uri()
    )
    assert artifact_location("http://mlflow:5000", "x") is None


def test_each_run_gets_its_own_folder_and_latest_points_at_the_newest(tmp_path):
    from radfed.server.outputs.run_folder import LATEST, new_run_folder, point_latest

    first, second = new_run_folder(tmp_path), new_run_folder(tmp_path)
    assert first != second and first.parent == second.parent == tmp_path
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", second.name)
    assert not (tmp_path / LATEST).exists()  # set only once a run is recorded
    point_latest(tmp_path, first)
    point_latest(tmp_path, second)
    assert (tmp_path / LATEST).resolve() == second.resolve()
    assert os.readlink(tmp_path / LATEST) == second.name  # relative: the root may move


def test_extract_on_a_read_only_site_writes_elsewhere_and_says_where(
    tmp_path, monkeypatch, capsys, shared_data
):
    """The site folder can be mounted read-only: the table goes to the current folder."""
    from radfed.server.outputs import run_folder as outputs

    site = tmp_path / "site"
    site.mkdir()
    phantom = shared_data / "ibsi_phantom"
    (site / "manifest.csv").write_text(
        f"patient_id,image,mask\nP1,{phantom / 'phantom.nii.gz'},{phantom / 'mask.nii.gz'}\n"
    )
    real = outputs.check_writable

    def read_only_site(folder, what="output folder"):
        if Path(folder).resolve() == site.resolve():
            raise outputs.OutputError(f"cannot write to the {what} {folder}: Read-only file system")
        return real(folder, what)

    monkeypatch.setattr(outputs, "check_writable", read_only_site)
    monkeypatch.setenv("RADFED_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["-q", "extract", str(site), "--params", "fast"]) == 0
    out, err = capsys.readouterr()
    table = work / "features-site.parquet"
    assert f"the feature table goes to {table}" in err
    assert table.is_file() and str(table) in out
    assert not (site / "features.parquet").exists()


def test_a_text_column_matched_by_star_is_no_feature_at_the_site(tmp_path, caplog):
    """``features = ["*"]`` on a table with a scanner-name column: every patient is kept,
    the column is named in the site's log, and naming it as a feature is an error."""
    from radfed.client.data import TableSpec, load_feature_site
    from radfed.shared.errors import SiteDataError

    (tmp_path / "features.csv").write_text(
        FEATURES.replace("f2", "scanner")
        .replace("1.5", "GE")
        .replace("2.5", "Siemens")
        .replace("3.5", "NA")
    )
    table = load_feature_site(tmp_path, TableSpec("y", ("age",), ("*",)))
    assert table.features == ["f1"] and len(table.frame) == 3 and not table.problems
    assert "['scanner'] hold text, not numbers: not used as features" in caplog.text
    with pytest.raises(SiteDataError, match=r"feature\(s\) \['scanner'\] hold text"):
        load_feature_site(tmp_path, TableSpec("y", ("age",), ("f1", "scanner")))


@pytest.mark.slow
def test_a_deployment_run_is_reported_from_mlflow_after_it_ended(heart_dir):
    """The ServerApp runs in a temporary folder that is deleted after the run: its MLflow
    artifacts must still be beside the study's tracking database, where `radfed report`
    reads them, and the run has its own output folder. ``pooled`` takes the same
    recording path as on the other transports: the equivalence table reaches
    results.json, the report and MLflow."""
    from radfed.server.outputs.report import report_from_run
    from radfed.server.study.runner import run_study
    from radfed.shared.config import load_study
    from radfed.tests.conftest import heart_study_text

    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    config = load_study(heart_dir / "study.toml")
    result = run_study(
        config, transport="deployment", out_dir=heart_dir / "out", track=True, pooled=True
    )
    folder = heart_dir / "out" / "latest"
    assert result.federation["output_dir"] == str(folder.resolve())
    written = json.loads((folder / "results.json").read_text())
    assert written["transport"] == "deployment"
    estimates = {r["estimate"] for r in written["equivalence"]}
    assert "clinical model coefficients" in estimates
    assert all(r["ok"] for r in written["equivalence"]), written["equivalence"]
    assert "Federated versus pooled equivalence" in (folder / "report.html").read_text()

    import mlflow

    run = mlflow.MlflowClient(config.tracking_uri).get_run(result.federation["mlflow_run_id"])
    assert run.info.artifact_uri.startswith((heart_dir / "mlartifacts").as_uri() + "/")
    assert run.data.tags["radfed.pooled_equivalence"] == "ok"
    page = report_from_run(run.info.run_id, config.tracking_uri, heart_dir / "again.html")
    assert "cleveland" in page.read_text() and "Discrimination" in page.read_text()

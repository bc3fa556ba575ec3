"""A study over DICOM sites with two readers and two scanners shared by both hospitals.

Two hospitals each image patients on the same two scanner models (a batch spanning
sites); images are written as DICOM series, the second reader's masks with the
synthetic cohort's boundary jitter (:func:`radfed.experiments.synth.reader_mask`). The
study harmonises by the ``scanner`` label the sites derive from the DICOM headers and
filters features by ICC(2,1) >= 0.75 before ComBat and mRMR. Oracles, on the pooled
training rows: pingouin's ICC and neuroCombat with the scanner each patient was
written with (known to the test, not read back from the headers). Every reply the
sites send is recorded: the scanner levels leave the sites, no other header value does.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from radfed.client.dicom_export import SeriesInfo, write_series
from radfed.client.extraction import extract_site, load_params
from radfed.client.site_state import default_state_dir
from radfed.experiments.synth import reader_mask
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.shared.messages import from_record

pg = pytest.importorskip("pingouin")
nc = pytest.importorskip("neuroCombat")

SCANNERS = {  # label the site must derive -> (manufacturer, model, field, gain, offset)
    "SIEMENS Avanto 1.5T": ("SIEMENS", "Avanto", 1.5, 1.0, 0.0),
    "GE Signa HDxt 3T": ("GE MEDICAL SYSTEMS", "Signa HDxt", 3.0, 1.6, 80.0),
}
SITES = {"north": 30, "south": 30}
FEATURES = ["original_firstorder_*", "original_glcm_*"]


def _patient(folder: Path, pid: str, scanner: str, outcome: int, rng) -> None:
    maker, model, field, gain, offset = SCANNERS[scanner]
    z, y, x = np.indices((8, 26, 24))
    radii = rng.uniform([2.2, 6, 5], [3.2, 9.5, 8.5])
    inside = ((z - 3.5) / radii[0]) ** 2 + ((y - 12.5) / radii[1]) ** 2 + (
        (x - 11.5) / radii[2]
    ) ** 2 <= 1
    texture = rng.normal(0, 15 + 3 * outcome, inside.shape)
    values = 100 + rng.normal(0, 8, inside.shape) + inside * (120 + 6 * outcome + texture)
    image = sitk.GetImageFromArray(np.rint(gain * values + offset).astype(np.int16))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    for img in (image, mask):
        img.SetSpacing((1.0, 1.0, 2.5))
        img.SetOrigin((-12.0, -13.0, 40.0))
    info = SeriesInfo(patient_id=pid, manufacturer=maker, model=model, field_strength=field)
    write_series(image, folder / "images" / pid, info)
    (folder / "masks").mkdir(exist_ok=True)
    sitk.WriteImage(mask, str(folder / "masks" / f"{pid}.nii.gz"))
    second = reader_mask(mask, rng, 0.8, 0.4, 3.0)
    sitk.WriteImage(second, str(folder / "masks" / f"{pid}_r2.nii.gz"))


class RecordingTransport(InProcessTransport):
    """The in-process transport, keeping every reply a site sent (decoded)."""

    def _exchange(self, requests):
        replies = super()._exchange(requests)
        self.replies = [*getattr(self, "replies", []), *map(from_record, replies.values())]
        return replies


def _strings(value) -> set[str]:
    """Every text in a decoded reply: keys, values, text and object arrays."""
    if isinstance(value, dict):
        return {str(k) for k in value} | {t for v in value.values() for t in _strings(v)}
    if isinstance(value, (list, tuple)):
        return {t for v in value for t in _strings(v)}
    if isinstance(value, np.ndarray):
        return {str(v) for v in value.ravel()} if value.dtype.kind in "OUS" else set()
    return {value} if isinstance(value, str) else set()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    # The sites' feature cache, shared with the oracle's extraction below.
    saved = os.environ.get("RADFED_CACHE")
    os.environ["RADFED_CACHE"] = str(root / "cache")
    written = {}
    for s, (site, n) in enumerate(SITES.items()):
        folder = root / "sites" / site
        folder.mkdir(parents=True)
        rng = np.random.default_rng(100 + s)
        rows = []
        for i in range(n):
            pid = f"{site[0].upper()}{i:02d}"
            scanner = list(SCANNERS)[(i + s) % 2]
            outcome = int(i % 4 in (1, 2))
            _patient(folder, pid, scanner, outcome, rng)
            written[pid] = scanner
            rows.append(
                {
                    "patient_id": pid,
                    "image": f"images/{pid}",
                    "mask": f"masks/{pid}.nii.gz",
                    "mask_reader2": f"masks/{pid}_r2.nii.gz",
                    "outcome": outcome,
                    "age": int(rng.integers(30, 80)),
                }
            )
        # A fixed site secret: the study's splits and folds are then always the same.
        # (With some draws the LASSO path of these 20-odd patients per site nears
        # separation and a site rightly refuses it under the concentration rule.)
        state = default_state_dir(site, folder.resolve())
        state.mkdir(parents=True, exist_ok=True)
        (state / "secret.key").write_bytes(hashlib.sha256(f"repro-{site}".encode()).digest())
        with open(folder / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    sites = "\n".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n' for s in SITES)
    (root / "study.toml").write_text(
        f"""
[study]
name = "repro"
outcome = "outcome"
clinical = ["age"]
features = {FEATURES!r}
seed = 3

[extraction]
params = "fast"

[harmonization]
batch = "scanner"

[selection]
mrmr_k = 3
folds = 3
n_lambdas = 10
icc_threshold = 0.75
icc_type = "ICC2"

[tracking]
enabled = false

[privacy]
min_cell = 3

{sites}
""".replace("'", '"')
    )
    config = load_study(root / "study.toml")
    transport = RecordingTransport.from_study(config)
    try:
        fitted = FederatedStudy(config, transport).fit()
        yield config, transport, fitted, written
    finally:
        if saved is None:
            os.environ.pop("RADFED_CACHE", None)
        else:
            os.environ["RADFED_CACHE"] = saved


def _pooled_train(config, transport, written):
    """Every site's training rows, extracted here; the split is the one each site drew
    with its secret and keeps for its statisticians (its patient ids and test flags)."""
    fast = load_params("fast")
    parts = []
    for site in config.sites:
        result = extract_site(site.path, fast, progress=False)
        own = transport.workers[site.name].site(config.protocol())
        train_ids = list(own.ids[~own.test_mask])
        frame = result.features.loc[train_ids]
        parts.append(
            (
                frame,
                result.readers["mask_reader2"].loc[frame.index],
                pd.Series([written[p] for p in frame.index], index=frame.index),
                site.name,
            )
        )
    return parts


def test_icc_filter_equals_pingouin_on_the_pooled_training_rows(study):
    config, transport, fitted, written = study
    details = fitted.details["reproducibility"]
    parts = _pooled_train(config, transport, written)
    first = pd.concat([p[0] for p in parts])
    second = pd.concat([p[1] for p in parts])
    features = list(details["comparisons"]["inter_reader"]["ICC2"])
    assert features and all(
        f.startswith(("original_firstorder_", "original_glcm_")) for f in features
    )
    expected_icc = {}
    for f in features:
        long = pd.DataFrame(
            {
                "subject": list(first.index) * 2,
                "reader": [1] * len(first) + [2] * len(first),
                "value": list(first[f]) + list(second.loc[first.index, f]),
            }
        )
        table = pg.intraclass_corr(long, targets="subject", raters="reader", ratings="value")
        expected_icc[f] = table.set_index("Type").loc["ICC(A,1)", "ICC"]
    got = details["comparisons"]["inter_reader"]
    assert got["n"] == len(first)
    for f in features:
        if got["ICC2"][f] is None:
            assert not np.isfinite(expected_icc[f]), f
        else:
            assert abs(got["ICC2"][f] - expected_icc[f]) < 1e-9, f
    kept = [f for f in features if np.isfinite(expected_icc[f]) and expected_icc[f] >= 0.75]
    assert details["kept"] == kept
    assert 0 < len(kept) < len(features)  # the readers' disagreement filters some out
    # Only the kept features enter ComBat and selection.
    assert set(fitted.details["selection"]["mrmr"]["selected"]) <= set(kept)


def test_scanner_batch_spanning_sites_equals_neurocombat_pooled(study):
    config, transport, fitted, written = study
    harmonisation = fitted.details["harmonization"]
    assert harmonisation["batch"] == "scanner"
    assert harmonisation["batch_levels"] == sorted(SCANNERS)  # derived from the headers
    kept = fitted.details["reproducibility"]["kept"]
    parts = _pooled_train(config, transport, written)
    pooled = pd.concat([p[0][kept] for p in parts])
    batch = pd.concat([p[2] for p in parts])
    for _, _, scanners, _ in parts:  # each scanner is used at both sites
        assert set(scanners) == set(SCANNERS)
    out = nc.neuroCombat(
        dat=pooled.to_numpy(dtype=float).T,
        covars=pd.DataFrame({"batch": batch.to_numpy()}),
        batch_col="batch",
    )
    reference = pd.DataFrame(out["data"].T, index=pooled.index, columns=kept)
    request = {"protocol": config.protocol(), **transport.context}
    scale = reference.std(ddof=0).to_numpy()
    for (frame, _, _, name), worker in zip(parts, transport.workers.values(), strict=True):
        site = worker.site(config.protocol())
        mine = site.view(request, "train")[kept]
        assert list(mine.index) == list(frame.index), name
        theirs = reference.loc[frame.index].to_numpy()
        np.testing.assert_allclose((mine.to_numpy() - theirs) / scale, 0, atol=1e-6)
    # The harmonisation did something (pyradiomics' normalisation already removes most
    # of the scanners' gain and offset, so the shift is small but not nil).
    raw = pooled.loc[reference.index].to_numpy()
    assert np.abs((reference.to_numpy() - raw) / scale).mean() > 1e-3


def test_icc_table_goes_into_the_report_and_tracking(study):
    from radfed.server.outputs.report import render_report
    from radfed.server.stats.reproducibility import icc_rows, reproducibility_metrics

    details = study[2].details["reproducibility"]
    html = render_report({"schema": "radfed.results/2", "reproducibility": details})
    assert "Reproducibility (ICC)" in html
    dropped = sorted(details["dropped"])
    assert dropped and all(f in html for f in dropped)
    rows = icc_rows(details)
    assert [r["feature"] for r in rows if r["kept"]] == details["kept"]
    metrics = reproducibility_metrics(details)
    assert metrics["reproducibility/kept"] == len(details["kept"])
    assert metrics["reproducibility/inter_reader/n"] == details["comparisons"]["inter_reader"]["n"]


def test_icc_table_goes_into_results_json_and_mlflow(study, tmp_path):
    """results.json keeps the reproducibility entry; MLflow gets the ICC table as the
    artifact reproducibility/icc.json and the counts as metrics."""
    import dataclasses
    import json

    import mlflow

    from radfed.server.results import StudyResult
    from radfed.server.stats.reproducibility import icc_rows
    from radfed.server.tracking.runs import log_study

    config, _, fitted, _ = study
    details = fitted.details["reproducibility"]
    result = StudyResult(
        study=config.name,
        outcome=config.outcome,
        transport="inprocess",
        sites={},
        models=fitted.models,
        performance={},
        rounds={},
        details=dict(fitted.details),
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = log_study(result, dataclasses.replace(config, tracking_uri=uri), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["reproducibility"]["kept"] == details["kept"]
    assert (
        saved["reproducibility"]["comparisons"]["inter_reader"]["ICC2"]
        == (details["comparisons"]["inter_reader"]["ICC2"])
    )
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(run_id)
    assert run.data.metrics["reproducibility/kept"] == len(details["kept"])
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="reproducibility/icc.json"
            )
        ).read_text()
    )
    rows = icc_rows(details)
    assert table["columns"][:2] == ["feature", "inter_reader ICC2"]
    got = {r[0]: r[1] for r in table["data"]}
    want = {r["feature"]: r["inter_reader ICC2"] for r in rows}
    assert set(got) == set(want)
    for f, value in want.items():  # MLflow's table writes 10 decimals
        assert (got[f] is None) if value is None else abs(got[f] - value) < 1e-9, f


def test_only_the_named_scanner_label_leaves_the_sites(study):
    """Every reply of the study: the scanner levels (the batch the study names) are sent;
    no other header value (UIDs, patient ids, raw manufacturer, slice thickness, field
    strength or model as labels of their own) and no other label column's name."""
    config, transport, _, written = study
    sent = {t for reply in transport.replies for t in _strings(reply)}
    assert set(SCANNERS) <= sent  # the batch levels do leave, as ComBat's levels
    forbidden = {
        "GE MEDICAL SYSTEMS",
        "2.5mm",
        "1.5T",
        "3T",
        "Avanto",
        "Signa HDxt",
        "scanner_manufacturer",
        "scanner_model",
        "field_strength",
        "slice_thickness",
        *written,  # patient ids (also the DICOM PatientID)
    }
    for site in config.sites:
        for folder in sorted((site.path / "images").iterdir()):
            header = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
            forbidden |= {
                header.SeriesInstanceUID,
                header.StudyInstanceUID,
                header.FrameOfReferenceUID,
                header.SOPInstanceUID,
            }
    assert not sent & forbidden, sorted(sent & forbidden)[:5]

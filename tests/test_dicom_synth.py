"""The synthetic cohort with a second reader, a repeat and DICOM images, and the
federated ICC on it against pingouin."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from radfed.client.dicom import read_series, series_labels
from radfed.experiments.synth import (
    MANIFEST_COLUMNS,
    READER_COLUMNS,
    SITE_PROFILES,
    reader_mask,
    write_cohort,
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two hospitals of the synthetic cohort, with readers, images as DICOM series."""
    return write_cohort(
        tmp_path_factory.mktemp("synth"),
        sites=2,
        patients=10,
        seed=5,
        progress=False,
        second_reader=True,
        dicom=True,
    )


@pytest.fixture(scope="module")
def site(cohort):
    return cohort[0]


def test_cohort_with_readers_and_dicom_has_the_extra_columns_and_files(site):
    with open(site / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [*MANIFEST_COLUMNS, *READER_COLUMNS]
    profile = SITE_PROFILES[0]
    for row in rows:
        image, _ = read_series(site / row["image"])
        mask = sitk.ReadImage(str(site / row["mask"]))
        assert image.GetSize() == mask.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), profile.spacing, rtol=1e-9)
        np.testing.assert_allclose(image.GetOrigin(), mask.GetOrigin(), atol=1e-6)
        for column in READER_COLUMNS:
            other = sitk.ReadImage(str(site / row[column]))
            assert other.GetSize() == mask.GetSize()
    labels = series_labels(site / rows[0]["image"])
    assert labels["scanner"] == "GE MR750 3T" and labels["slice_thickness"] == "3.5mm"


def test_readers_disagree_at_the_boundary_like_radiologists(site):
    """Second reader: Dice 0.85-0.97 with the first (as inter-reader Dice of MR muscle
    ROIs); the first reader's repeat agrees more."""
    with open(site / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    inter, intra = [], []
    for row in rows:
        first = sitk.GetArrayFromImage(sitk.ReadImage(str(site / row["mask"]))).astype(bool)
        second = sitk.GetArrayFromImage(sitk.ReadImage(str(site / row["mask_reader2"])))
        repeat = sitk.GetArrayFromImage(sitk.ReadImage(str(site / row["mask_repeat"])))
        inter.append(_dice(first, second.astype(bool)))
        intra.append(_dice(first, repeat.astype(bool)))
    assert 0.85 < min(inter) and max(inter) < 0.97
    assert np.mean(intra) > np.mean(inter)


def test_reader_mask_is_reproducible_and_local():
    z, y, x = np.indices((12, 40, 40))
    ball = ((z - 5.5) / 4) ** 2 + ((y - 19.5) / 12) ** 2 + ((x - 19.5) / 12) ** 2 <= 1
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    mask.SetSpacing((0.8, 0.8, 3.0))
    a = reader_mask(mask, np.random.default_rng(1), 0.8, 0.4, 4.0)
    b = reader_mask(mask, np.random.default_rng(1), 0.8, 0.4, 4.0)
    still = reader_mask(mask, np.random.default_rng(1), 0.0, 0.0, 4.0)
    arr = sitk.GetArrayFromImage(a).astype(bool)
    assert np.array_equal(arr, sitk.GetArrayFromImage(b).astype(bool))  # same stream
    assert np.array_equal(sitk.GetArrayFromImage(still).astype(bool), ball)  # no jitter
    assert a.GetSpacing() == mask.GetSpacing()
    from scipy import ndimage

    sampling = mask.GetSpacing()[::-1]
    depth = ndimage.distance_transform_edt(ball, sampling=sampling)
    away = ndimage.distance_transform_edt(~ball, sampling=sampling)
    changed = arr != ball
    assert changed.any()
    # Nothing moves more than 5 SDs of the jitter (+ offset) from the boundary.
    assert depth[changed].max() < 6.0 and away[changed].max() < 6.0


# ------------------------------------------------------------ federated ICC on the cohort

#: Original first-order and GLCM features at 2 mm: quick, and they differ in
#: reproducibility (some fall below 0.75 between the readers, most do not).
LIGHT_PARAMS = """
imageType:
  Original: {}
featureClass:
  firstorder:
  glcm:
setting:
  label: 1
  resampledPixelSpacing: [2, 2, 2]
  interpolator: sitkBSpline
  normalize: true
  normalizeScale: 100
  binWidth: 25
  voxelArrayShift: 300
  geometryTolerance: 1.0e-4
"""
COMPARISONS = {"inter_reader": "mask_reader2", "intra_reader": "mask_repeat"}


def test_federated_icc_on_the_synthetic_cohort_equals_pingouin(cohort, tmp_path):
    """The sites' reproducibility replies (over the federation's record encoding) give
    the coordinator ICC(2,1) and ICC(3,1) equal to pingouin's on the pooled training
    rows to 1e-9, and the same filtered feature list."""
    pg = pytest.importorskip("pingouin")
    from radfed.client.extraction import extract_site, load_params
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.stats.reproducibility import reproducibility
    from radfed.shared.config import parse_study

    (tmp_path / "light.yaml").write_text(LIGHT_PARAMS)
    study = {
        "study": {"name": "synth-icc", "outcome": "fasciitis", "features": ["original_*"]},
        "extraction": {"params": str(tmp_path / "light.yaml")},
        # Ten patients a site: a test split of three; the min-cell rule is not under test.
        "privacy": {"min_cell": 1},
        "tracking": {"enabled": False},
        "sites": [{"name": s.name, "path": str(s)} for s in cohort],
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RADFED_CACHE", str(tmp_path / "cache"))  # shared with the oracle
        config = parse_study(study, tmp_path)
        transport = InProcessTransport.from_study(config)
        transport.sites, transport.protocol = config.training_sites, config.protocol()
        described = transport.ask("describe")
        assert all(set(r["reader_masks"]) == set(COMPARISONS.values()) for r in described.values())
        transport.ask("split")
        features = list(next(iter(described.values()))["features"])
        replies = transport.ask(
            "reproducibility", {"icc_features": features, "comparisons": list(COMPARISONS)}
        )
        result = reproducibility(features, replies, list(COMPARISONS), "ICC2", 0.75)
        # The oracle: every site's training rows, pooled (extraction served by the cache).
        first, others = [], {c: [] for c in COMPARISONS.values()}
        for s in config.sites:
            own = transport.workers[s.name].site(config.protocol())
            train = list(own.ids[~own.test_mask])
            extracted = extract_site(s.path, load_params(tmp_path / "light.yaml"), progress=False)
            # Every (patient, mask) case served from what the site extracted.
            assert extracted.n_cached == 3 * len(extracted.features)
            first.append(extracted.features.loc[train, features])
            for column in others:
                others[column].append(extracted.readers[column].loc[train, features])
    first = pd.concat(first)
    assert len(features) == 42 and np.isfinite(first.to_numpy()).all()
    passes = pd.Series(True, index=features)
    for name, column in COMPARISONS.items():
        second = pd.concat(others[column])
        assert np.isfinite(second.to_numpy()).all()
        got = result.comparisons[name]
        assert got["n"] == len(first) and got["raters"] == 2
        for f in features:
            long = pd.DataFrame(
                {
                    "subject": list(first.index) * 2,
                    "reader": [1] * len(first) + [2] * len(first),
                    "value": [*first[f], *second[f]],
                }
            )
            table = pg.intraclass_corr(long, targets="subject", raters="reader", ratings="value")
            table = table.set_index("Type")["ICC"]
            assert abs(got["ICC2"][f] - table["ICC(A,1)"]) < 1e-9, (name, f)
            assert abs(got["ICC3"][f] - table["ICC(C,1)"]) < 1e-9, (name, f)
            passes[f] &= bool(table["ICC(A,1)"] >= 0.75)
    assert result.kept == [f for f in features if passes[f]]
    assert 0 < len(result.kept) < len(features)  # the readers' disagreement filters

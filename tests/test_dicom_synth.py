"""The synthetic cohort with a second reader, a repeat and DICOM images."""

from __future__ import annotations

import csv

import numpy as np
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
def site(tmp_path_factory):
    (folder,) = write_cohort(
        tmp_path_factory.mktemp("synth"),
        sites=1,
        patients=10,
        seed=5,
        progress=False,
        second_reader=True,
        dicom=True,
    )
    return folder


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

"""Tests of the synthetic multi-centre cohort (radfed.experiments.synth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from radfed.experiments import synth
from radfed.experiments.synth import (
    ATYPICAL_FRACTION,
    MANIFEST_COLUMNS,
    SITE_PROFILES,
    TABLE2,
    draw_clinical,
    write_cohort,
)

SITES, PATIENTS, SEED = 3, 10, 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_cohort(tmp_path_factory.mktemp("cohort"), SITES, PATIENTS, SEED, progress=False)


@pytest.fixture(scope="module")
def table(cohort: list[Path]) -> pd.DataFrame:
    """All manifests with the folder and 3 raw + 2 z-scored ROI statistics per case."""
    frames = []
    for folder in cohort:
        manifest = pd.read_csv(folder / "manifest.csv")
        stats = [_roi_stats(*_read_case(folder, row)) for row in manifest.itertuples()]
        frame = pd.concat([manifest, pd.DataFrame(stats)], axis=1)
        frame["folder"] = folder
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _read_case(folder: Path, row) -> tuple[sitk.Image, sitk.Image]:
    return sitk.ReadImage(str(folder / row.image)), sitk.ReadImage(str(folder / row.mask))


def _roi_stats(image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    roi = sitk.GetArrayFromImage(mask).astype(bool)
    z = (arr - arr.mean()) / arr.std()  # whole-image normalisation, as pyradiomics'
    # In-plane 3 x 3 local SD: noise and blur, which normalisation does not remove.
    local_var = ndimage.uniform_filter(z**2, (1, 3, 3)) - ndimage.uniform_filter(z, (1, 3, 3)) ** 2
    return {
        "mean": arr[roi].mean(),
        "sd": arr[roi].std(),
        "median": np.median(arr[roi]),
        "z_sd": z[roi].std(),
        "z_local_sd": np.sqrt(np.maximum(local_var, 0))[roi].mean(),
    }


def _nearest_centroid_loo(X: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier on standardised X."""
    X = (X - X.mean(0)) / X.std(0)
    hits = 0
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        classes = np.unique(labels[keep])
        centroids = np.array([X[keep & (labels == c)].mean(0) for c in classes])
        hits += classes[np.argmin(((centroids - X[i]) ** 2).sum(1))] == labels[i]
    return hits / len(X)


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = score[y == 1], score[y == 0]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


# ----------------------------------------------------------------------------- layout


def test_site_folders_and_manifest(cohort: list[Path], table: pd.DataFrame) -> None:
    assert [f.name for f in cohort] == ["hospital_a", "hospital_b", "hospital_c"]
    for i, folder in enumerate(cohort):
        header = (folder / "manifest.csv").read_text().splitlines()[0]
        assert header == ",".join(MANIFEST_COLUMNS)
        manifest = pd.read_csv(folder / "manifest.csv")
        assert len(manifest) == PATIENTS
        assert (manifest["scanner"] == SITE_PROFILES[i].name).all()
        assert manifest["patient_id"].str.startswith("ABC"[i]).all()
        assert (manifest["image"] == "images/" + manifest["patient_id"] + ".nii.gz").all()
        assert (manifest["mask"] == "masks/" + manifest["patient_id"] + ".nii.gz").all()
        assert manifest["fasciitis"].nunique() == 2
    assert table["patient_id"].is_unique
    for col in ("fasciitis", "age", "sex"):
        assert pd.api.types.is_integer_dtype(table[col])
    assert set(table["fasciitis"]) <= {0, 1} and set(table["sex"]) <= {0, 1}
    assert table["age"].between(15, 85).all()
    assert np.allclose(table["cobb_angle"], table["cobb_angle"].round(1))
    assert np.allclose(table["fat_thickness"], table["fat_thickness"].round(2))
    assert (table["fat_thickness"] > 0).all() and (table["cobb_angle"] > 0).all()


def test_images_and_masks_share_geometry(cohort: list[Path], table: pd.DataFrame) -> None:
    for row in table.itertuples():
        image, mask = _read_case(row.folder, row)
        assert image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32)
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == mask.GetSize()
        assert np.allclose(image.GetSpacing(), mask.GetSpacing())
        assert np.allclose(image.GetOrigin(), mask.GetOrigin())
        assert np.allclose(image.GetDirection(), mask.GetDirection())
        profile = SITE_PROFILES[cohort.index(row.folder)]
        assert np.allclose(image.GetSpacing(), profile.spacing)
        values = np.unique(sitk.GetArrayViewFromImage(mask))
        assert set(values) == {0, 1}  # non-empty, and not the whole image
        # A small field of view, as pyradiomics with wavelets must stay ~1 s per case.
        extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
        assert np.all(extent < [100, 80, 45]) and np.all(extent > [80, 60, 25])


def test_profiles_are_distinct_hospitals() -> None:
    assert len(SITE_PROFILES) >= 6
    assert len({p.name for p in SITE_PROFILES}) == len(SITE_PROFILES)
    assert len({p.spacing for p in SITE_PROFILES}) == len(SITE_PROFILES)
    for p in SITE_PROFILES:
        assert 0.3 < p.prevalence < 0.7
    assert [synth.site_name(i) for i in (0, 25, 26, 27)] == ["a", "z", "aa", "ab"]


def test_sites_differ_in_spacing(cohort: list[Path]) -> None:
    spacings = set()
    for folder in cohort:
        first = pd.read_csv(folder / "manifest.csv")["image"].iloc[0]
        spacings.add(sitk.ReadImage(str(folder / first)).GetSpacing())
    assert len(spacings) == len(cohort)


# ----------------------------------------------------------------------------- determinism


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_overwrite_and_stale(
    tmp_path: Path, cohort: list[Path], capsys: pytest.CaptureFixture
) -> None:
    # Site a of a 1-site cohort is site a of the 3-site cohort: same seed, same bytes.
    (site,) = write_cohort(tmp_path, sites=1, patients=PATIENTS, seed=SEED, progress=True)
    assert f"{PATIENTS}/{PATIENTS}" in capsys.readouterr().err  # progress bar on stderr
    first = _snapshot(site)
    assert sum(name.startswith("images/") for name in first) == PATIENTS
    assert first == _snapshot(cohort[0])

    # A different seed may overwrite a previous synth output; a stale synth site of an
    # earlier, larger run goes, anything else stays.
    stale = tmp_path / "hospital_b"
    stale.mkdir()
    (stale / synth.MARKER).write_text("{}")
    (tmp_path / "notes.txt").write_text("kept")
    (site / "features.parquet").write_text("derived from the old images")
    (again,) = write_cohort(tmp_path, sites=1, patients=PATIENTS, seed=SEED + 1, progress=False)
    assert capsys.readouterr().err == ""
    assert again == site
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital_a", "notes.txt"]
    second = _snapshot(again)
    assert set(second) == set(first)
    assert second["manifest.csv"] != first["manifest.csv"]
    name = "images/A001.nii.gz"
    arr_a = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort[0] / name)))
    arr_b = sitk.GetArrayFromImage(sitk.ReadImage(str(again / name)))
    assert arr_a.shape == arr_b.shape and not np.array_equal(arr_a, arr_b)


def test_reader_masks_for_a_subset_of_patients(tmp_path: Path, cohort: list[Path]) -> None:
    """``reader_patients``: reader masks for that many patients per site, the other rows'
    reader cells empty; images, first masks and each patient's reader masks unchanged."""
    from radfed.client.extraction import _cases
    from radfed.client.manifest import read_manifest

    (site,) = write_cohort(
        tmp_path / "some", 1, PATIENTS, SEED, False, second_reader=True, reader_patients=4
    )
    (every,) = write_cohort(tmp_path / "all", 1, PATIENTS, SEED, False, second_reader=True)
    manifest = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, *synth.READER_COLUMNS]
    read = manifest[manifest["mask_reader2"] != ""]
    assert len(read) == 4 and (read["mask_repeat"] != "").all()
    assert (manifest.loc[manifest["mask_reader2"] == "", "mask_repeat"] == "").all()
    files, full, plain = _snapshot(site), _snapshot(every), _snapshot(cohort[0])
    assert {n for n in files if "_reader2" in n or "_repeat" in n} == {
        f"masks/{pid}_{role}.nii.gz" for pid in read["patient_id"] for role in ("reader2", "repeat")
    }
    for name, data in files.items():
        if name.startswith(("images/", "masks/")):
            assert data == full[name]
            assert name not in plain or data == plain[name]
    # The manifest reader takes the empty cells: one case per given mask, no problem.
    rows = read_manifest(site)
    assert rows.problems == []
    assert len(_cases(rows.rows)) == PATIENTS + 2 * 4


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 0}, "sites"),
        ({"patients": 9}, "patients"),
        ({"seed": -1}, "seed"),
        ({"sites": 2.5}, "sites"),
        ({"second_reader": True, "reader_patients": 0}, "reader_patients"),
        ({"reader_patients": 3}, "second_reader"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_cohort(tmp_path, **{"sites": 1, "patients": 10, **kwargs}, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_severity_raises() -> None:
    with pytest.raises(ValueError, match="severity"):
        synth.simulate_case(SITE_PROFILES[0], 1, 45, 1.8, np.random.default_rng(0), severity=1.5)


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "hospital_b"
    foreign.mkdir()
    (foreign / "patients.xlsx").write_text("real data")
    with pytest.raises(ValueError, match="not a previous synthetic cohort"):
        write_cohort(tmp_path, sites=2, patients=10, progress=False)
    assert (foreign / "patients.xlsx").read_text() == "real data"
    assert not (tmp_path / "hospital_a").exists()  # checked before writing anything
    (foreign / "patients.xlsx").unlink()
    (tmp_path / "hospital_c").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        write_cohort(tmp_path, sites=3, patients=10, progress=False)
    assert not (tmp_path / "hospital_a").exists()


# ----------------------------------------------------------------------------- realism


def test_clinical_draws_follow_table2() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    for fasciitis in (0, 1):
        rows = pd.DataFrame([draw_clinical(rng, fasciitis, SITE_PROFILES[0]) for _ in range(n)])
        assert abs(rows["sex"].mean() - 0.40) < 0.03
        assert abs(rows["atypical"].mean() - ATYPICAL_FRACTION) < 0.02
        for col in ("age", "cobb_angle", "fat_thickness"):
            own, other = TABLE2[fasciitis][col], TABLE2[1 - fasciitis][col]
            # Table 2's mean, moved by the documented share of atypical presentations.
            expected = (1 - ATYPICAL_FRACTION) * own[0] + ATYPICAL_FRACTION * other[0]
            assert abs(rows[col].mean() - expected) < 0.1 * own[1], col
            assert abs(rows[col].mean() - own[0]) < 0.35 * own[1], col
            assert 0.8 * own[1] < rows[col].std() < 1.6 * own[1], col
        typical = rows[rows["atypical"] == 0]
        assert abs(typical["age"].mean() - TABLE2[fasciitis]["age"][0]) < 1.5


def test_manifest_class_means_point_the_table2_way(table: pd.DataFrame) -> None:
    means = table.groupby("fasciitis")[["age", "cobb_angle", "fat_thickness"]].mean()
    assert means.loc[1, "cobb_angle"] < means.loc[0, "cobb_angle"]
    assert means.loc[1, "fat_thickness"] > means.loc[0, "fat_thickness"]


def test_batch_effect_separates_sites(table: pd.DataFrame) -> None:
    sites = table["scanner"].to_numpy()
    # Raw intensities: gain, offset and contrast differ (log: gains are multiplicative).
    raw = _nearest_centroid_loo(np.log(table[["mean", "sd", "median"]].to_numpy()), sites)
    assert raw > 0.75  # chance is 1/3; 0.87 at this seed
    # After whole-image z-scoring, noise and blur still give the site away.
    zscored = _nearest_centroid_loo(table[["z_sd", "z_local_sd"]].to_numpy(), sites)
    assert zscored > 0.6  # 0.77 at this seed


def test_disease_changes_roi_texture() -> None:
    # Paired cases: the same anatomy and scanner with and without moderate fasciitis.
    for k, profile in enumerate(SITE_PROFILES):
        rois = []
        for severity in (0.0, 0.6):
            image, mask, _ = synth.simulate_case(
                profile, 1, 45, 1.8, np.random.default_rng([11, k]), severity=severity
            )
            arr = sitk.GetArrayFromImage(image).astype(np.float64)
            rois.append(arr[sitk.GetArrayFromImage(mask).astype(bool)])
        healthy, sick = rois
        assert sick.mean() > 1.015 * healthy.mean(), profile.name  # oedema raises the signal
        # Hyperintense streaks: more voxels above the healthy ROI's 99th percentile.
        assert np.mean(sick > np.percentile(healthy, 99)) > 0.015, profile.name


def test_disease_visible_in_cohort(table: pd.DataFrame) -> None:
    # The ROI median, standardised within each site, is higher with fasciitis (oedema and
    # more posterior fat). Only 30 cases here, so the bound is loose (0.94 at this seed).
    z = table.groupby("scanner")["median"].transform(lambda x: (x - x.mean()) / x.std())
    assert _auc(z.to_numpy(), table["fasciitis"].to_numpy()) > 0.6

"""Tests of radiomics extraction on real files: STS MR cases and the IBSI digital phantom.

Runs in well under a minute on 2 cores: the default (wavelet) parameters are used on the
three smallest STS tumours only, everything else uses the fast parameters or tiny images.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from radfed.client import extraction
from radfed.client.extraction import (
    CaseError,
    ExtractionParams,
    ExtractionResult,
    ParamsError,
    default_cache_dir,
    extract_case,
    extract_site,
    load_params,
    pyradiomics_version,
    read_features,
    write_features,
)
from radfed.client.manifest import RowProblem

DATA = Path("/work/shared/data")
STS = DATA / "sts_mr"
IBSI = DATA / "ibsi_phantom"
SMALL_CASES = ["STS_019", "STS_008", "STS_002"]  # the three smallest tumours

pytestmark = pytest.mark.skipif(not STS.is_dir(), reason="real data folder not available")


def _write_manifest(site: Path, rows: list[dict]) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    with open(site / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return site


def _sts_rows(cases: list[str]) -> list[dict]:
    return [
        {
            "patient_id": c,
            "image": str(STS / c / "image.nii.gz"),
            "mask": str(STS / c / "mask.nii.gz"),
        }
        for c in cases
    ]


def _params_with(base: str, **setting) -> ExtractionParams:
    params = load_params(base)
    settings = json.loads(json.dumps(params.settings))
    settings["setting"].update(setting)
    return ExtractionParams(f"{base}+{setting}", settings, yaml.safe_dump(settings))


@pytest.fixture(scope="module")
def sts_site(tmp_path_factory) -> Path:
    return _write_manifest(tmp_path_factory.mktemp("sts") / "site", _sts_rows(SMALL_CASES))


@pytest.fixture(scope="module")
def default_run(sts_site, tmp_path_factory) -> tuple[ExtractionResult, Path]:
    cache = tmp_path_factory.mktemp("cache")
    result = extract_site(sts_site, load_params(), cache_dir=cache, progress=False)
    return result, cache


# ------------------------------------------------------------------------- real MR cases


def test_default_params_on_real_mr(default_run):
    result, _ = default_run
    table = result.features
    assert result.problems == []
    assert (result.n_extracted, result.n_cached) == (3, 0)
    assert list(table.index) == SMALL_CASES and table.index.name == "patient_id"
    # 14 shape + 93 features for each of Original and the 8 wavelet sub-bands
    assert table.shape[1] == 14 + 9 * 93 == 851
    assert list(table.columns) == sorted(table.columns)
    assert not any(c.startswith("diagnostics_") for c in table.columns)
    assert (table.dtypes == "float64").all()
    assert np.isfinite(table.to_numpy()).all()
    for name in [
        "original_shape_MeshVolume",
        "original_firstorder_Mean",
        "original_ngtdm_Busyness",
        "wavelet-LLH_glcm_Contrast",
        "wavelet-HHH_glszm_ZoneEntropy",
        "wavelet-LLL_gldm_DependenceEntropy",
    ]:
        assert name in table.columns
    assert result.pyradiomics_version == pyradiomics_version() == "3.0.1"
    assert result.settings_hash == load_params().settings_hash
    assert result.nonfinite == {}


def test_default_params_resample_and_normalise(default_run):
    """Volumes survive resampling; intensities are normalised over the whole image x 100."""
    table = default_run[0].features
    for case in SMALL_CASES:
        image = sitk.ReadImage(str(STS / case / "image.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(STS / case / "mask.nii.gz")))
        values = sitk.GetArrayFromImage(image).astype(float)
        volume = (mask == 1).sum() * np.prod(image.GetSpacing())
        assert table.loc[case, "original_shape_MeshVolume"] == pytest.approx(volume, rel=0.1)
        expected_mean = (values[mask == 1].mean() - values.mean()) / values.std() * 100
        assert table.loc[case, "original_firstorder_Mean"] == pytest.approx(expected_mean, abs=10)
    # voxelArrayShift 300 keeps (x + 300)^2 positive: Energy exceeds the unshifted sum
    assert (table["original_firstorder_Energy"] > 0).all()


def test_second_run_on_copied_site_is_served_from_cache(default_run, tmp_path, monkeypatch, capsys):
    result, cache = default_run
    rows = []
    for case in reversed(SMALL_CASES):  # other order, other ids, relative paths
        for kind in ("image", "mask"):
            dest = tmp_path / "copy" / kind / f"{case}.nii.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(STS / case / f"{kind}.nii.gz", dest)
        rows.append(
            {
                "patient_id": f"x{case}",
                "image": f"image/{case}.nii.gz",
                "mask": f"mask/{case}.nii.gz",
            }
        )
    site = _write_manifest(tmp_path / "copy", rows)

    def no_pyradiomics(*args, **kwargs):
        raise AssertionError("a cache hit must not call pyradiomics")

    monkeypatch.setattr(extraction, "extract_case", no_pyradiomics)
    again = extract_site(site, load_params(), cache_dir=cache, progress=True)
    assert (again.n_cached, again.n_extracted) == (3, 0)
    assert "3/3" in capsys.readouterr().err  # the tqdm bar goes to stderr
    assert again.problems == []
    renamed = again.features.rename(index=lambda pid: pid[1:]).loc[SMALL_CASES]
    pd.testing.assert_frame_equal(renamed, result.features, check_exact=True)


def test_jobs_2_gives_the_same_values_as_jobs_1(sts_site):
    fast = load_params("fast")
    serial = extract_site(sts_site, fast, jobs=1, progress=False, use_cache=False)
    parallel = extract_site(sts_site, fast, jobs=2, progress=False, use_cache=False)
    assert parallel.n_extracted == 3 and parallel.problems == []
    assert serial.features.shape == (3, 56)
    pd.testing.assert_frame_equal(parallel.features, serial.features, check_exact=True)


def test_cache_key_changes_with_params(tmp_path):
    site = _write_manifest(tmp_path / "site", _sts_rows(["STS_019"]))
    cache = tmp_path / "cache"
    fast = load_params("fast")
    narrow = _params_with("fast", binWidth=10)
    assert narrow.settings_hash != fast.settings_hash

    first = extract_site(site, fast, cache_dir=cache, progress=False)
    other = extract_site(site, narrow, cache_dir=cache, progress=False)
    assert (other.n_cached, other.n_extracted) == (0, 1)  # no stale hit
    a, b = first.features.iloc[0], other.features.iloc[0]
    assert a["original_shape_MeshVolume"] == b["original_shape_MeshVolume"]
    assert a["original_glcm_JointAverage"] != pytest.approx(b["original_glcm_JointAverage"])
    assert len(list(cache.rglob("*.json"))) == 2
    assert extract_site(site, fast, cache_dir=cache, progress=False).n_cached == 1


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    site = _write_manifest(tmp_path / "site", _sts_rows(["STS_019"]))
    cache = tmp_path / "cache"
    fast = load_params("fast")
    first = extract_site(site, fast, cache_dir=cache, progress=False)
    (entry,) = cache.rglob("*.json")
    entry.write_text('{"format": "radfed-features-cache/1", "key": "trunc')  # interrupted write
    second = extract_site(site, fast, cache_dir=cache, progress=False)
    assert (second.n_cached, second.n_extracted) == (0, 1)
    pd.testing.assert_frame_equal(second.features, first.features, check_exact=True)
    assert json.loads(entry.read_text())["features"]  # repaired
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temporary files
    assert extract_site(site, fast, cache_dir=cache, progress=False).n_cached == 1


def test_counts_include_the_reader_masks_of_some_rows(tmp_path):
    """n_extracted / n_cached count cases (one per mask), not rows: with reader masks on
    some patients only (issue 13 saw n_extracted = -20 on a second run)."""
    site = tmp_path / "site"
    rows = []
    for k, name in enumerate(["r1", "r2", "r3"]):
        _, mask = _synthetic_case(site / "data", name)
        # Another reader's outline: the same ROI one voxel tighter in-plane.
        tighter = sitk.BinaryErode(mask, [1, 1, 0])
        sitk.WriteImage(tighter, str(site / "data" / f"{name}_r2.nii.gz"))
        rows.append(
            {
                "patient_id": name,
                "image": f"data/{name}_img.nii.gz",
                "mask": f"data/{name}_seg.nii.gz",
                "mask_reader2": f"data/{name}_r2.nii.gz" if k < 2 else "",
                "mask_repeat": f"data/{name}_r2.nii.gz" if k == 0 else "",
            }
        )
    _write_manifest(site, rows)
    cache, fast = tmp_path / "cache", load_params("fast")

    first = extract_site(site, fast, cache_dir=cache, progress=False)
    assert first.problems == []
    assert list(first.features.index) == ["r1", "r2", "r3"]
    assert list(first.readers["mask_reader2"].index) == ["r1", "r2"]
    assert list(first.readers["mask_repeat"].index) == ["r1"]
    assert (first.n_cached, first.n_extracted) == (0, 6)  # 3 + 2 + 1 masks
    again = extract_site(site, fast, cache_dir=cache, progress=False)
    assert (again.n_cached, again.n_extracted) == (6, 0)
    # One new case (r3's second reader) next to six cached ones.
    rows[2]["mask_reader2"] = "data/r3_r2.nii.gz"
    _write_manifest(site, rows)
    third = extract_site(site, fast, cache_dir=cache, progress=False)
    assert (third.n_cached, third.n_extracted) == (6, 1)
    path = write_features(third, tmp_path / "features.parquet")
    assert read_features(path)[1]["n_extracted"] == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RADFED_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RADFED_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "radfed" / "features"


# ----------------------------------------------------------------------------- IBSI phantom

# IBSI tag -> pyradiomics name (Original image). pyradiomics averages GLCM/GLRLM features
# over the 13 3D directions (IBSI "3D_avg"); GLSZM, NGTDM and GLDM (alpha 0 = IBSI NGLDM)
# are computed in 3D.
IBSI_MAP = {
    "morph_volume": "shape_MeshVolume",
    "morph_vol_approx": "shape_VoxelVolume",
    "morph_area_mesh": "shape_SurfaceArea",
    "morph_av": "shape_SurfaceVolumeRatio",
    "morph_sphericity": "shape_Sphericity",
    "morph_diam": "shape_Maximum3DDiameter",
    "morph_pca_maj_axis": "shape_MajorAxisLength",
    "morph_pca_min_axis": "shape_MinorAxisLength",
    "morph_pca_least_axis": "shape_LeastAxisLength",
    "morph_pca_elongation": "shape_Elongation",
    "morph_pca_flatness": "shape_Flatness",
    "stat_mean": "firstorder_Mean",
    "stat_var": "firstorder_Variance",
    "stat_skew": "firstorder_Skewness",
    "stat_kurt": "firstorder_Kurtosis",
    "stat_median": "firstorder_Median",
    "stat_min": "firstorder_Minimum",
    "stat_p10": "firstorder_10Percentile",
    "stat_p90": "firstorder_90Percentile",
    "stat_max": "firstorder_Maximum",
    "stat_iqr": "firstorder_InterquartileRange",
    "stat_range": "firstorder_Range",
    "stat_mad": "firstorder_MeanAbsoluteDeviation",
    "stat_rmad": "firstorder_RobustMeanAbsoluteDeviation",
    "stat_energy": "firstorder_Energy",
    "stat_rms": "firstorder_RootMeanSquared",
    "ih_entropy": "firstorder_Entropy",
    "ih_uniformity": "firstorder_Uniformity",
    "cm_joint_max_3D_avg": "glcm_MaximumProbability",
    "cm_joint_avg_3D_avg": "glcm_JointAverage",
    "cm_joint_var_3D_avg": "glcm_SumSquares",
    "cm_joint_entr_3D_avg": "glcm_JointEntropy",
    "cm_diff_avg_3D_avg": "glcm_DifferenceAverage",
    "cm_diff_var_3D_avg": "glcm_DifferenceVariance",
    "cm_diff_entr_3D_avg": "glcm_DifferenceEntropy",
    "cm_sum_avg_3D_avg": "glcm_SumAverage",
    "cm_sum_entr_3D_avg": "glcm_SumEntropy",
    "cm_energy_3D_avg": "glcm_JointEnergy",
    "cm_contrast_3D_avg": "glcm_Contrast",
    "cm_inv_diff_3D_avg": "glcm_Id",
    "cm_inv_diff_norm_3D_avg": "glcm_Idn",
    "cm_inv_diff_mom_3D_avg": "glcm_Idm",
    "cm_inv_diff_mom_norm_3D_avg": "glcm_Idmn",
    "cm_inv_var_3D_avg": "glcm_InverseVariance",
    "cm_corr_3D_avg": "glcm_Correlation",
    "cm_auto_corr_3D_avg": "glcm_Autocorrelation",
    "cm_clust_tend_3D_avg": "glcm_ClusterTendency",
    "cm_clust_shade_3D_avg": "glcm_ClusterShade",
    "cm_clust_prom_3D_avg": "glcm_ClusterProminence",
    "cm_info_corr1_3D_avg": "glcm_Imc1",
    "cm_info_corr2_3D_avg": "glcm_Imc2",
    "rlm_sre_3D_avg": "glrlm_ShortRunEmphasis",
    "rlm_lre_3D_avg": "glrlm_LongRunEmphasis",
    "rlm_lgre_3D_avg": "glrlm_LowGrayLevelRunEmphasis",
    "rlm_hgre_3D_avg": "glrlm_HighGrayLevelRunEmphasis",
    "rlm_srlge_3D_avg": "glrlm_ShortRunLowGrayLevelEmphasis",
    "rlm_srhge_3D_avg": "glrlm_ShortRunHighGrayLevelEmphasis",
    "rlm_lrlge_3D_avg": "glrlm_LongRunLowGrayLevelEmphasis",
    "rlm_lrhge_3D_avg": "glrlm_LongRunHighGrayLevelEmphasis",
    "rlm_glnu_3D_avg": "glrlm_GrayLevelNonUniformity",
    "rlm_glnu_norm_3D_avg": "glrlm_GrayLevelNonUniformityNormalized",
    "rlm_rlnu_3D_avg": "glrlm_RunLengthNonUniformity",
    "rlm_rlnu_norm_3D_avg": "glrlm_RunLengthNonUniformityNormalized",
    "rlm_r_perc_3D_avg": "glrlm_RunPercentage",
    "rlm_gl_var_3D_avg": "glrlm_GrayLevelVariance",
    "rlm_rl_var_3D_avg": "glrlm_RunVariance",
    "rlm_rl_entr_3D_avg": "glrlm_RunEntropy",
    "szm_sze_3D": "glszm_SmallAreaEmphasis",
    "szm_lze_3D": "glszm_LargeAreaEmphasis",
    "szm_lgze_3D": "glszm_LowGrayLevelZoneEmphasis",
    "szm_hgze_3D": "glszm_HighGrayLevelZoneEmphasis",
    "szm_szlge_3D": "glszm_SmallAreaLowGrayLevelEmphasis",
    "szm_szhge_3D": "glszm_SmallAreaHighGrayLevelEmphasis",
    "szm_lzlge_3D": "glszm_LargeAreaLowGrayLevelEmphasis",
    "szm_lzhge_3D": "glszm_LargeAreaHighGrayLevelEmphasis",
    "szm_glnu_3D": "glszm_GrayLevelNonUniformity",
    "szm_glnu_norm_3D": "glszm_GrayLevelNonUniformityNormalized",
    "szm_zsnu_3D": "glszm_SizeZoneNonUniformity",
    "szm_zsnu_norm_3D": "glszm_SizeZoneNonUniformityNormalized",
    "szm_z_perc_3D": "glszm_ZonePercentage",
    "szm_gl_var_3D": "glszm_GrayLevelVariance",
    "szm_zs_var_3D": "glszm_ZoneVariance",
    "szm_zs_entr_3D": "glszm_ZoneEntropy",
    "ngt_coarseness_3D": "ngtdm_Coarseness",
    "ngt_contrast_3D": "ngtdm_Contrast",
    "ngt_busyness_3D": "ngtdm_Busyness",
    "ngt_complexity_3D": "ngtdm_Complexity",
    "ngt_strength_3D": "ngtdm_Strength",
    "ngl_lde_3D": "gldm_SmallDependenceEmphasis",
    "ngl_hde_3D": "gldm_LargeDependenceEmphasis",
    "ngl_lgce_3D": "gldm_LowGrayLevelEmphasis",
    "ngl_hgce_3D": "gldm_HighGrayLevelEmphasis",
    "ngl_ldlge_3D": "gldm_SmallDependenceLowGrayLevelEmphasis",
    "ngl_ldhge_3D": "gldm_SmallDependenceHighGrayLevelEmphasis",
    "ngl_hdlge_3D": "gldm_LargeDependenceLowGrayLevelEmphasis",
    "ngl_hdhge_3D": "gldm_LargeDependenceHighGrayLevelEmphasis",
    "ngl_glnu_3D": "gldm_GrayLevelNonUniformity",
    "ngl_dcnu_3D": "gldm_DependenceNonUniformity",
    "ngl_dcnu_norm_3D": "gldm_DependenceNonUniformityNormalized",
    "ngl_gl_var_3D": "gldm_GrayLevelVariance",
    "ngl_dc_var_3D": "gldm_DependenceVariance",
    "ngl_dc_entr_3D": "gldm_DependenceEntropy",
}


def _ibsi_reference() -> dict[str, tuple[float, float]]:
    with open(IBSI / "ibsi_1_dig_phantom.csv", newline="") as handle:
        rows = csv.DictReader(handle, delimiter=";")
        return {
            r["tag"]: (float(r["reference value"]), float(r["tolerance"]))
            for r in rows
            if r["reference value"].strip()
        }


def test_ibsi_digital_phantom_all_feature_classes(tmp_path):
    """pyradiomics 3.0.1 under numpy 2 reproduces IBSI reference values (all classes)."""
    params_file = tmp_path / "ibsi.yaml"
    params_file.write_text(
        "# IBSI phantom: no resampling, no normalisation, bin width 1\n"
        "imageType: {Original: {}}\n"
        "featureClass: {shape: , firstorder: , glcm: , glrlm: , glszm: , gldm: , ngtdm: }\n"
        "setting: {binWidth: 1, label: 1}\n"
    )
    params = load_params(params_file)
    assert params.name == "ibsi.yaml"
    got = extract_case(IBSI / "phantom.nii.gz", IBSI / "mask.nii.gz", params)
    n_roi = 74  # voxels in the phantom's ROI

    reference = _ibsi_reference()
    for tag, name in IBSI_MAP.items():
        value = got[f"original_{name}"]
        if tag == "stat_kurt":
            value -= 3  # documented: pyradiomics reports kurtosis, IBSI excess kurtosis
        if tag in {"morph_pca_maj_axis", "morph_pca_min_axis", "morph_pca_least_axis"}:
            # pyradiomics' shape covariance divides by N, IBSI's by N - 1
            value *= math.sqrt(n_roi / (n_roi - 1))
        ref, tol = reference[tag]
        # References without tolerance are given to 3 significant digits
        rounding = 0.5 * 10 ** (math.floor(math.log10(abs(ref))) - 2)
        assert abs(value - ref) <= tol + rounding + 1e-12, (tag, name, value, ref)


# ---------------------------------------------------------------------------- bad site data


def _synthetic_case(folder: Path, name: str, *, shape=(24, 28, 12), spacing=(1.0, 1.0, 2.0)):
    """A noisy image with a bright ellipsoid and its mask, written as NIfTI."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    z, y, x = np.indices(shape[::-1])
    centre = [(s - 1) / 2 for s in shape[::-1]]
    inside = ((z - centre[0]) / 3.5) ** 2 + ((y - centre[1]) / 8) ** 2 + (
        (x - centre[2]) / 7
    ) ** 2 <= 1
    values = rng.normal(100, 20, inside.shape) + 150 * inside
    image = sitk.GetImageFromArray(values.astype(np.int16))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    for img in (image, mask):
        img.SetSpacing(spacing)
        img.SetOrigin((-10.0, 5.0, 30.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / f"{name}_img.nii.gz"))
    sitk.WriteImage(mask, str(folder / f"{name}_seg.nii.gz"))
    return image, mask


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("bad") / "site"
    d = site / "data"
    _synthetic_case(d, "good")
    _, mask = _synthetic_case(d, "empty")
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    sitk.WriteImage(empty, str(d / "empty_seg.nii.gz"))
    _synthetic_case(d, "geom")
    _synthetic_case(d, "other", shape=(24, 28, 10), spacing=(1.0, 1.0, 2.5))
    _synthetic_case(d, "garbage")
    (d / "garbage_img.nii.gz").write_bytes(np.random.default_rng(1).bytes(4000))
    _synthetic_case(d, "trunc")
    data = gzip.decompress((d / "trunc_img.nii.gz").read_bytes())
    (d / "trunc_img.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    _synthetic_case(d, "onevox")
    one = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    one.CopyInformation(mask)
    one[5, 5, 5] = 1
    sitk.WriteImage(one, str(d / "onevox_seg.nii.gz"))
    _synthetic_case(d, "noy")
    _synthetic_case(d, "cut")
    data = (d / "cut_seg.nii.gz").read_bytes()
    (d / "cut_seg.nii.gz").write_bytes(data[: len(data) // 2])  # interrupted copy

    def row(pid, img, seg, y="1"):
        return {"patient_id": pid, "image": img, "mask": seg, "outcome": y}

    sts = STS / "STS_019"
    rows = [
        row("P01", "data/good_img.nii.gz", "data/good_seg.nii.gz", "0"),  # line 2
        row("P02", "data/missing_img.nii.gz", "data/good_seg.nii.gz"),  # line 3
        row("P03", "data/garbage_img.nii.gz", "data/garbage_seg.nii.gz"),  # line 4
        row("P04", "data/empty_img.nii.gz", "data/empty_seg.nii.gz"),  # line 5
        row("P05", "data/geom_img.nii.gz", "data/other_seg.nii.gz"),  # line 6
        row("P06", "data/noy_img.nii.gz", "data/noy_seg.nii.gz", ""),  # line 7
        row("P07", "data/trunc_img.nii.gz", "data/trunc_seg.nii.gz"),  # line 8
        row("P08", "data/onevox_img.nii.gz", "data/onevox_seg.nii.gz"),  # line 9
        row("P09", str(sts / "image.nii.gz"), str(sts / "mask.nii.gz")),  # line 10, real MR
        row("P10", "data/cut_img.nii.gz", "data/cut_seg.nii.gz"),  # line 11
    ]
    return _write_manifest(site, rows)


@pytest.fixture(scope="module")
def bad_run(bad_site, tmp_path_factory) -> ExtractionResult:
    cache = tmp_path_factory.mktemp("badcache")
    return extract_site(
        bad_site, load_params("fast"), cache_dir=cache, progress=False, outcome="outcome"
    )


def test_bad_site_reports_each_problem_and_extracts_the_rest(bad_run):
    result = bad_run
    assert list(result.features.index) == ["P01", "P09"]
    assert np.isfinite(result.features.to_numpy()).all()
    by_line = {p.row: p for p in result.problems}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 11] and len(result.problems) == 8

    assert by_line[3] == RowProblem(3, "P02", "data/missing_img.nii.gz", "file not found")
    assert by_line[4].file == "data/garbage_img.nii.gz"
    assert by_line[4].reason.startswith("cannot read image: ")
    assert by_line[5].file == "data/empty_seg.nii.gz"
    assert by_line[5].reason.startswith("mask is empty (no voxel with label 1")
    assert by_line[6].file == "data/other_seg.nii.gz"
    geometry = by_line[6].reason
    assert geometry.startswith("image and mask geometry differ (size, spacing)")
    assert "image size=(24, 28, 12), spacing=(1, 1, 2)" in geometry
    assert "mask size=(24, 28, 10), spacing=(1, 1, 2.5)" in geometry
    assert (by_line[7].file, by_line[7].reason) == ("manifest.csv", "outcome 'outcome' is missing")
    # ITK would silently zero-fill these two
    assert by_line[8].file == "data/trunc_img.nii.gz"
    assert (
        by_line[8].reason
        == "cannot read image: file is truncated (8240 bytes, the header promises 16480)"
    )
    assert by_line[11].file == "data/cut_seg.nii.gz"
    assert by_line[11].reason == "cannot read mask: file is truncated (compressed data ends early)"
    assert by_line[9].file == "data/onevox_seg.nii.gz"
    assert "single voxel" in by_line[9].reason and by_line[9].reason.startswith(
        "pyradiomics failed"
    )

    for p in result.problems:
        text = str(p)
        assert text.startswith(f"manifest.csv line {p.row} (patient {p.patient_id}): ")
        assert "Traceback" not in p.reason and "\n" not in p.reason and len(p.reason) < 400
        if p.file != "manifest.csv":
            assert p.file in text


def test_bad_site_in_parallel_reports_the_same(bad_site, bad_run):
    result = extract_site(
        bad_site, load_params("fast"), jobs=2, progress=False, use_cache=False, outcome="outcome"
    )
    assert result.problems == bad_run.problems  # errors keep their file across processes
    pd.testing.assert_frame_equal(result.features, bad_run.features, check_exact=True)


def test_failures_are_not_cached(bad_site, tmp_path):
    cache = tmp_path / "cache"
    extract_site(bad_site, load_params("fast"), cache_dir=cache, progress=False)
    assert len(list(cache.rglob("*.json"))) == 3  # P01, P06 (no outcome check) and P09
    again = extract_site(bad_site, load_params("fast"), cache_dir=cache, progress=False)
    assert (again.n_cached, again.n_extracted) == (3, 0)
    assert len(again.problems) == 7


def test_extract_case_raises_case_error(bad_site):
    d = bad_site / "data"
    fast = load_params("fast")
    with pytest.raises(CaseError, match="mask is empty") as info:
        extract_case(d / "empty_img.nii.gz", d / "empty_seg.nii.gz", fast)
    assert info.value.role == "mask"
    with pytest.raises(CaseError, match="cannot read mask"):
        extract_case(d / "good_img.nii.gz", d / "garbage_img.nii.gz", fast)
    with pytest.raises(CaseError, match="mask is empty"):  # label 2 is not in the mask
        extract_case(d / "good_img.nii.gz", d / "good_seg.nii.gz", _params_with("fast", label=2))


def test_nonfinite_values_are_kept_as_nan_and_noted(bad_site, tmp_path, monkeypatch):
    raw = {
        "diagnostics_x": "text",
        "a": np.float64("nan"),
        "b": np.array(np.inf),
        "c": np.array(2.0),
    }
    converted = extraction._to_float_features(raw)
    assert set(converted) == {"a", "b", "c"} and converted["c"] == 2.0
    assert math.isnan(converted["a"]) and math.isnan(converted["b"])

    def fake(image, mask, params):
        if "good" not in str(image):
            raise CaseError("skipped in this test")
        return {"f1": 1.0, "f2": math.nan}

    monkeypatch.setattr(extraction, "extract_case", fake)
    result = extract_site(bad_site, load_params("fast"), progress=False, use_cache=False)
    assert result.nonfinite == {"P01": ["f2"]}
    out = write_features(result, tmp_path / "f.parquet")
    table, meta = read_features(out)
    assert math.isnan(table.loc["P01", "f2"]) and meta["nonfinite"] == {"P01": ["f2"]}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_read_features_round_trip(bad_run, tmp_path, suffix):
    result = bad_run
    features = result.features.copy()
    features.loc["P01", "original_glcm_Contrast"] = math.nan  # NaN must survive
    features = pd.concat(
        [features, features.iloc[[0, 1]].rename(index={"P01": "007", "P09": "NA"})]
    )
    result = ExtractionResult(
        features,
        result.problems,
        result.n_cached,
        result.n_extracted,
        result.settings_hash,
        result.pyradiomics_version,
        "fast",
        {"P01": ["original_glcm_Contrast"]},
    )
    out = write_features(result, tmp_path / "sub" / f"features{suffix}")
    assert out.is_file() and Path(f"{out}.meta.json").is_file()
    if suffix == ".csv":
        assert out.read_text().startswith("patient_id,")
    table, meta = read_features(out)
    assert list(table.index) == ["P01", "P09", "007", "NA"]  # ids stay strings
    pd.testing.assert_frame_equal(table, features, check_exact=True, check_index_type=False)
    assert meta["settings_hash"] == result.settings_hash == load_params("fast").settings_hash
    assert meta["pyradiomics_version"] == "3.0.1"
    assert meta["params_name"] == "fast" and meta["n_cases"] == 4
    assert [RowProblem(**p) for p in meta["problems"]] == result.problems
    assert meta["nonfinite"] == {"P01": ["original_glcm_Contrast"]}


def test_read_features_without_sidecar(tmp_path):
    table = pd.DataFrame({"f": [1.5]}, index=pd.Index(["A"], name="patient_id"))
    table.to_parquet(tmp_path / "t.parquet")
    got, meta = read_features(tmp_path / "t.parquet")
    assert meta == {} and got.loc["A", "f"] == 1.5


# ------------------------------------------------------------------------------ parameters


def test_packaged_params_mirror_the_seed_study():
    default = load_params()
    assert load_params("default") == default and default.name == "default"
    s = default.settings
    assert set(s["imageType"]) == {"Original", "Wavelet"}
    assert set(s["featureClass"]) == {
        "firstorder",
        "shape",
        "glcm",
        "glrlm",
        "glszm",
        "gldm",
        "ngtdm",
    }
    assert all(v is None for v in s["featureClass"].values())  # every feature of each class
    setting = s["setting"]
    assert setting["resampledPixelSpacing"] == [1, 1, 1] and setting["binWidth"] == 25
    assert setting["normalize"] is True and setting["normalizeScale"] == 100
    assert setting["voxelArrayShift"] == 300 and setting["interpolator"] == "sitkBSpline"
    assert setting["label"] == 1
    assert "normalizeScale" in default.text and "#" in default.text

    fast = load_params("fast")
    assert set(fast.settings["imageType"]) == {"Original"}
    assert set(fast.settings["featureClass"]) == {"firstorder", "glcm", "shape"}
    for key in (
        "resampledPixelSpacing",
        "binWidth",
        "normalize",
        "normalizeScale",
        "voxelArrayShift",
    ):
        assert fast.settings["setting"][key] == setting[key]
    assert fast.settings_hash != default.settings_hash


def test_settings_hash_ignores_comments_layout_and_number_spelling(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("setting:\n  binWidth: 25\n  label: 1\nimageType:\n  Original: {}\n")
    b.write_text(
        "# same thing\nimageType: {Original: {}}\nsetting: {label: 1, binWidth: 25.0}  # x\n"
    )
    assert load_params(a).settings_hash == load_params(b).settings_hash
    assert len(load_params(a).settings_hash) == 64
    b.write_text("imageType: {Original: {}}\nsetting: {label: 1, binWidth: 20}\n")
    assert load_params(a).settings_hash != load_params(b).settings_hash


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("setting: {binwidth: 25}\n", "binwidth"),  # typo: pyradiomics would reject it
        ("settings: {binWidth: 25}\n", "settings"),
        ("setting: {binWidth: -1}\n", "binWidth"),
        ("imageType: {Wavelets: {}}\n", "Wavelets"),
        ("featureClass: {glcm: [Contrastt]}\n", "Contrastt"),
        ("setting: {interpolator: sitkCubic}\n", "sitkCubic"),
        ("setting: [binWidth\n", "not valid YAML"),
        ("imageType: {LoG: {}}\n", "LoG needs a sigma"),
        ("- 1\n- 2\n", "YAML mapping"),
        ("", "YAML mapping"),
    ],
)
def test_invalid_params_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=message) as info:
        load_params(path)
    assert "p.yaml" in str(info.value)


def test_image_type_with_missing_package_is_refused(tmp_path, monkeypatch):
    # pyradiomics would only log an error and return no features for this image type
    monkeypatch.setitem(extraction._IMAGE_TYPE_PACKAGES, "LBP3D", ("radfed_no_such_package",))
    path = tmp_path / "lbp.yaml"
    path.write_text("imageType: {LBP3D: {}}\n")
    with pytest.raises(ParamsError, match="LBP3D needs the Python package radfed_no_such_package"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match=r"not found.*default, fast"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params("fastest")


def test_an_image_with_nan_voxels_is_a_case_error(tmp_path):
    # NRRD keeps NaN (ITK's NIfTI reader does not return it).
    image, _ = _synthetic_case(tmp_path, "nan")
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    values[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(values)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(tmp_path / "nan_img.nrrd"))
    with pytest.raises(CaseError, match=r"image holds 1 voxel\(s\) that are NaN or infinite"):
        extract_case(tmp_path / "nan_img.nrrd", tmp_path / "nan_seg.nii.gz", load_params("fast"))

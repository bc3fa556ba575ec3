"""Hospital files as input: DICOM series, DICOM-SEG, RTSTRUCT and Slicer segmentations.

Real cases of ``../shared/data/sts_mr`` are converted in the test: the image to a DICOM
series with pydicom, the mask to a DICOM-SEG with highdicom and to an RTSTRUCT with
rt-utils. Tolerances, stated:

- **exact** (``==``) for every route (DICOM image with the NIfTI mask, DICOM-SEG,
  RTSTRUCT) when the case is first given a geometry whose decimal and binary spellings
  agree (spacing 0.9765625 x 0.9765625 x 3.25 mm, origin on a 1/64 mm grid): the DICOM
  header and the NIfTI header then describe the same grid bit for bit, and each DICOM
  mask route rebuilds the NIfTI mask voxel for voxel, which is asserted separately (a
  mask difference would be reported as such, not as a feature difference);
- **relative 1e-9** (measured: below 4e-12) on the cases' own float32 NIfTI grid
  (spacing 0.9765620231628418 mm ...), which a conformant DICOM header (Decimal Strings
  of at most 16 characters) can only hold to about 1e-14 relative: the voxels are still
  read exactly and the masks still rebuilt voxel for voxel.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from matplotlib.path import Path as MplPath
from pydicom.sr.codedict import codes

from radfed.client.contours import fill_slice, polygon_interior
from radfed.client.dicom import read_series, scanner_labels
from radfed.client.dicom_export import SeriesInfo, write_series
from radfed.client.extraction import extract_case, extract_site, load_params
from radfed.client.masks import MaskChoice, load_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STS = DATA / "sts_mr"
CASES = ["STS_002", "STS_019"]  # small tumours; both matrices are not square

pytestmark = [
    pytest.mark.skipif(not STS.is_dir(), reason="real data folder not available"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _exact_grid(image: sitk.Image) -> sitk.Image:
    """The image on a grid whose decimal (DICOM) and binary (NIfTI) spellings agree."""
    out = sitk.Image(image)
    out.SetSpacing((0.9765625, 0.9765625, 3.25))
    out.SetOrigin(tuple(round(v * 64) / 64 for v in image.GetOrigin()))
    return out


def _segment(number: int, label: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def write_seg(source: list, masks: dict[str, np.ndarray], path: Path) -> None:
    """A BINARY DICOM-SEG (highdicom) with one segment per named (z, y, x) mask."""
    source = sorted(source, key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = np.stack(list(masks.values()), axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(i + 1, name) for i, name in enumerate(masks)],
        series_instance_uid=hd.UID(),
        series_number=20,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="radfed-tests",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)


def write_rtstruct(series_dir: Path, masks: dict[str, np.ndarray], path: Path) -> None:
    """An RTSTRUCT (rt-utils) with one ROI per named (z, y, x) mask."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_new(str(series_dir))
    for name, mask in masks.items():
        rt.add_roi(mask=np.transpose(mask.astype(bool), (1, 2, 0)), name=name)
    rt.save(str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Each case as NIfTI image + mask, DICOM series, DICOM-SEG and RTSTRUCT."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for case in CASES:
        image = _exact_grid(sitk.ReadImage(str(STS / case / "image.nii.gz")))
        mask = _exact_grid(sitk.ReadImage(str(STS / case / "mask.nii.gz")))
        folder = root / case
        folder.mkdir()
        sitk.WriteImage(image, str(folder / "image.nii.gz"))
        sitk.WriteImage(mask, str(folder / "mask.nii.gz"))
        info = SeriesInfo(patient_id=case, manufacturer="SIEMENS", model="Avanto")
        source = write_series(image, folder / "series", info)
        # Shuffle the file names: the reader must sort by position, not by name.
        files = sorted((folder / "series").iterdir())
        rng = np.random.default_rng(len(files))
        for i, j in enumerate(rng.permutation(len(files))):
            files[i].rename(folder / "series" / f"tmp{j:04d}")
        for p in (folder / "series").iterdir():
            p.rename(p.with_name(p.name.replace("tmp", "X") + ".dcm"))
        tumour = sitk.GetArrayFromImage(mask).astype(bool)
        corner = np.zeros_like(tumour)
        corner[:, :4, :4] = True  # a second structure, to be not chosen
        write_seg(source, {"corner": corner, "Tumour": tumour}, folder / "seg.dcm")
        write_rtstruct(folder / "series", {"Body": corner, "GTV": tumour}, folder / "rt.dcm")
        out[case] = folder
    return out


FAST = load_params("fast")


@pytest.mark.parametrize("case", CASES)
def test_dicom_series_reads_the_nifti_voxels_and_grid(converted, case):
    nifti = sitk.ReadImage(str(converted[case] / "image.nii.gz"))
    image, series = read_series(converted[case] / "series")
    assert image.GetSize() == nifti.GetSize()
    assert image.GetSpacing() == nifti.GetSpacing()
    assert image.GetOrigin() == nifti.GetOrigin()
    assert image.GetDirection() == nifti.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(nifti))
    assert len(series.files) == nifti.GetSize()[2]


def test_multiframe_enhanced_mr_reads_as_the_single_frame_series(converted, tmp_path):
    """A legacy-converted enhanced MR (highdicom) of the series: one file, same volume."""
    folder = converted["STS_002"]
    legacy = [pydicom.dcmread(p) for p in sorted((folder / "series").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=legacy,
        series_instance_uid=hd.UID(),
        series_number=30,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "MF.dcm")
    image, series = read_series(tmp_path / "mf")
    nifti = sitk.ReadImage(str(folder / "image.nii.gz"))
    assert len(series.files) == 1
    assert image.GetSize() == nifti.GetSize() and image.GetSpacing() == nifti.GetSpacing()
    assert image.GetOrigin() == nifti.GetOrigin()
    assert image.GetDirection() == nifti.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(nifti))


@pytest.mark.parametrize(
    ("mask_file", "choice"),
    [
        ("seg.dcm", MaskChoice(roi="tumour")),  # by segment name, case-insensitive
        ("seg.dcm", MaskChoice(label=2)),  # by segment number
        ("rt.dcm", MaskChoice(roi="GTV")),
    ],
)
def test_dicom_masks_rebuild_the_nifti_mask_voxel_for_voxel(converted, mask_file, choice):
    for case in CASES:
        folder = converted[case]
        image, series = read_series(folder / "series")
        mask, label = load_mask(folder / mask_file, image, series, choice, default_label=1)
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
        got = sitk.GetArrayFromImage(mask)
        assert label == 1 and got.shape == expected.shape
        assert np.array_equal(got == 1, expected == 1), f"{case} {mask_file}"


def _route_features(tmp_path, folders, routes):
    """Every case through every route (image, mask, roi; ``{case}`` filled in), extracted
    at one site: the manifest rows and the extraction's result."""
    rows = [
        {
            "patient_id": f"{case}-{route}",
            "image": str(folders[case] / str(image).format(case=case)),
            "mask": str(folders[case] / str(mask).format(case=case)),
            "roi": roi,
        }
        for case in CASES
        for route, (image, mask, roi) in routes.items()
    ]
    result = extract_site(_site(tmp_path / "site", rows), FAST, use_cache=False, progress=False)
    assert result.problems == []
    return rows, result


def _site(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_every_route_gives_the_nifti_features_exactly(converted, tmp_path):
    """One site, four routes per case; features of each route == the NIfTI route's."""
    routes = {
        "nifti": ("image.nii.gz", "mask.nii.gz", ""),
        "dicom": ("series", "mask.nii.gz", ""),
        "seg": ("series", "seg.dcm", "Tumour"),
        "rt": ("series", "rt.dcm", "GTV"),
    }
    rows, result = _route_features(tmp_path, converted, routes)
    table = result.features
    assert table.shape == (len(rows), 56)
    for case in CASES:
        reference = table.loc[f"{case}-nifti"]
        for route in ("dicom", "seg", "rt"):
            got = table.loc[f"{case}-{route}"]
            assert got.equals(reference), f"{case} {route}: {(got - reference).abs().max()}"
    # Scanner labels come from the DICOM headers, for the rows with a DICOM image only.
    labels = result.labels
    assert set(labels.index) == {f"{c}-{r}" for c in CASES for r in ("dicom", "seg", "rt")}
    assert set(labels["scanner"]) == {"SIEMENS Avanto 1.5T"}
    assert set(labels["slice_thickness"]) == {"3.5mm"}  # 3.25 mm rounded to 0.5 mm


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict:
    """Each case on its own NIfTI grid (not made exact) as DICOM series, SEG and RTSTRUCT."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for case in CASES:
        folder = root / case
        folder.mkdir()
        image = sitk.ReadImage(str(STS / case / "image.nii.gz"))
        tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(STS / case / "mask.nii.gz"))) > 0
        source = write_series(image, folder / "series", SeriesInfo(patient_id=case))
        write_seg(source, {"Tumour": tumour}, folder / "seg.dcm")
        write_rtstruct(folder / "series", {"GTV": tumour}, folder / "rt.dcm")
        out[case] = folder
    return out


def test_native_grid_routes_agree_within_the_stated_tolerance(native, tmp_path):
    """The cases' own float32 grids in conformant headers: voxels and masks exact,
    geometry to relative 1e-13, features within relative 1e-9 of the NIfTI route."""
    long_spacing = False
    for case in CASES:
        nifti = sitk.ReadImage(str(STS / case / "image.nii.gz"))
        header = pydicom.dcmread(next((native[case] / "series").iterdir()))
        for key in ("PixelSpacing", "ImagePositionPatient", "SliceThickness"):
            values = header.data_element(key).value
            for v in values if isinstance(values, pydicom.multival.MultiValue) else [values]:
                assert len(str(v.original_string or v)) <= 16, (key, v)  # DS: 16 characters
        long_spacing |= len(repr(nifti.GetSpacing()[0])) > 16
        image, series = read_series(native[case] / "series")
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(nifti))
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(
                getattr(image, get)(), getattr(nifti, get)(), rtol=1e-13, atol=1e-13
            )
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(STS / case / "mask.nii.gz"))) > 0
        for mask_file, roi in (("seg.dcm", "Tumour"), ("rt.dcm", "GTV")):
            mask, _ = load_mask(native[case] / mask_file, image, series, MaskChoice(roi=roi), 1)
            assert np.array_equal(sitk.GetArrayFromImage(mask) == 1, expected), (case, mask_file)
    assert long_spacing  # a grid a 16-character DS cannot hold exactly is among the cases
    routes = {
        "nifti": (STS / "{case}" / "image.nii.gz", STS / "{case}" / "mask.nii.gz", ""),
        "dicom": ("series", STS / "{case}" / "mask.nii.gz", ""),
        "seg": ("series", "seg.dcm", "Tumour"),
        "rt": ("series", "rt.dcm", "GTV"),
    }
    _, result = _route_features(tmp_path, native, routes)
    table = result.features
    for case in CASES:
        reference = table.loc[f"{case}-nifti"].to_numpy()
        for route in ("dicom", "seg", "rt"):
            got = table.loc[f"{case}-{route}"].to_numpy()
            np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-12, err_msg=route)


def _slicer_segmentation(folder: Path, path: Path) -> None:
    """A Slicer-style .seg.nrrd: segment 'corner' = label 1, 'tumour' = label 2."""
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    labels = np.where(sitk.GetArrayFromImage(mask) > 0, 2, 0).astype(np.uint8)
    labels[:, :3, :3] = 1
    seg = sitk.GetImageFromArray(labels)
    seg.CopyInformation(mask)
    for i, (name, value) in enumerate((("corner", 1), ("tumour", 2))):
        seg.SetMetaData(f"Segment{i}_Name", name)
        seg.SetMetaData(f"Segment{i}_LabelValue", str(value))
        seg.SetMetaData(f"Segment{i}_Layer", "0")
    sitk.WriteImage(seg, str(path))


def test_label_by_number_and_slicer_segment_by_name(converted, tmp_path):
    """A multi-label map: the row's label number, or a .seg.nrrd segment name."""
    folder = converted["STS_002"]
    _slicer_segmentation(folder, tmp_path / "labels.seg.nrrd")
    rows = [
        {
            "patient_id": "nifti",
            "image": str(folder / "image.nii.gz"),
            "mask": str(folder / "mask.nii.gz"),
            "label": "",
            "roi": "",
        },
        {
            "patient_id": "number",
            "image": str(folder / "series"),
            "mask": str(tmp_path / "labels.seg.nrrd"),
            "label": "2",
            "roi": "",
        },
        {
            "patient_id": "name",
            "image": str(folder / "series"),
            "mask": str(tmp_path / "labels.seg.nrrd"),
            "label": "",
            "roi": "Tumour",
        },
        {
            "patient_id": "unknown",
            "image": str(folder / "series"),
            "mask": str(tmp_path / "labels.seg.nrrd"),
            "label": "",
            "roi": "GTV",
        },
        {
            "patient_id": "bad",
            "image": str(folder / "series"),
            "mask": str(tmp_path / "labels.seg.nrrd"),
            "label": "two",
            "roi": "",
        },
    ]
    result = extract_site(_site(tmp_path / "site", rows), FAST, use_cache=False, progress=False)
    table = result.features
    assert table.loc["number"].equals(table.loc["nifti"])
    assert table.loc["name"].equals(table.loc["nifti"])
    problems = {p.patient_id: p.reason for p in result.problems}
    assert set(problems) == {"unknown", "bad"}
    assert (
        "no segment named 'GTV' in the .seg.nrrd (segments: 'corner', 'tumour')"
        in (problems["unknown"])
    )
    assert "label must be a whole number" in problems["bad"]


def test_dicom_features_are_cached_by_folder_content(converted, tmp_path):
    rows = [{"patient_id": "a", "image": str(converted["STS_002"] / "series"), "mask": ""}]
    rows[0]["mask"] = str(converted["STS_002"] / "rt.dcm")
    rows[0]["roi"] = "GTV"
    site = _site(tmp_path / "site", rows)
    cache = tmp_path / "cache"
    first = extract_site(site, FAST, cache_dir=cache, progress=False)
    again = extract_site(site, FAST, cache_dir=cache, progress=False)
    assert (first.n_extracted, again.n_cached) == (1, 1)
    assert again.features.equals(first.features)
    # Another ROI of the same file is another cache entry.
    rows[0]["roi"] = "Body"
    other = extract_site(_site(site, rows), FAST, cache_dir=cache, progress=False)
    assert other.n_cached == 0 and other.n_extracted == 1


# ------------------------------------------------------------------------ broken inputs


def _small(folder: Path, name: str, shift: float = 0.0):
    """A small synthetic MR volume with a bright ellipsoid, as a DICOM series + NIfTI mask."""
    rng = np.random.default_rng(len(name))
    z, y, x = np.indices((10, 24, 20))
    inside = ((z - 4.5) / 3.2) ** 2 + ((y - 11.5) / 8) ** 2 + ((x - 9.5) / 7) ** 2 <= 1
    values = np.rint(rng.normal(100, 20, inside.shape) + 150 * inside)
    image = sitk.GetImageFromArray(values.astype(np.int16))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    for img in (image, mask):
        img.SetSpacing((1.0, 1.0, 2.0))
        img.SetOrigin((-10.0, 5.0, 30.0 + shift))
    source = write_series(image, folder / name, SeriesInfo(patient_id=name))
    sitk.WriteImage(mask, str(folder / f"{name}_mask.nii.gz"))
    return source, inside


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken")
    rows = []

    def row(pid, image, mask, **extra):
        rows.append({"patient_id": pid, "image": image, "mask": mask, **extra})

    _small(site, "good")
    row("P01", "good", "good_mask.nii.gz")

    _small(site, "missing")
    (site / "missing" / "IM0005.dcm").unlink()
    row("P02", "missing", "missing_mask.nii.gz")

    _small(site, "uneven")
    ds = pydicom.dcmread(site / "uneven" / "IM0006.dcm")
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.5
    ds.save_as(site / "uneven" / "IM0006.dcm")
    row("P03", "uneven", "uneven_mask.nii.gz")

    # Two series in one folder: refused without series_uid, read with it.
    source, _ = _small(site, "mixed")
    other = write_series(
        sitk.ReadImage([str(p) for p in sorted((site / "mixed").glob("*.dcm"))]),
        site / "mixed",
        SeriesInfo(patient_id="mixed", series_number=2),
        prefix="B",
    )
    assert other[0].SeriesInstanceUID != source[0].SeriesInstanceUID
    shutil.copyfile(site / "mixed_mask.nii.gz", site / "mixed2_mask.nii.gz")
    row("P04", "mixed", "mixed_mask.nii.gz")
    row("P05", "mixed", "mixed2_mask.nii.gz", series_uid=source[0].SeriesInstanceUID)

    # A multi-frame object without the per-frame geometry a volume needs.
    _small(site, "multiframe")
    ds = pydicom.dcmread(site / "multiframe" / "IM0001.dcm")
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    for p in (site / "multiframe").glob("*.dcm"):
        p.unlink()
    ds.save_as(site / "multiframe" / "MF.dcm")
    row("P06", "multiframe", "multiframe_mask.nii.gz")

    # An RTSTRUCT inside the image folder.
    _, inside = _small(site, "withrt")
    write_rtstruct(site / "withrt", {"GTV": inside}, site / "rt_tmp.dcm")
    shutil.move(site / "rt_tmp.dcm", site / "withrt" / "RS.dcm")
    row("P07", "withrt", "withrt_mask.nii.gz")

    # A DICOM-SEG drawn on another series of the same patient.
    _small(site, "segimg")
    other_source, inside = _small(site, "otherseries")
    write_seg(other_source, {"Tumour": inside}, site / "seg_other.dcm")
    row("P08", "segimg", "seg_other.dcm", roi="Tumour")

    # A file that is not DICOM among the slices.
    _small(site, "notdicom")
    (site / "notdicom" / "notes.txt").write_text("scanned by ...")
    row("P09", "notdicom", "notdicom_mask.nii.gz")

    # A DICOM-SEG for a NIfTI image (no series to check against).
    source, inside = _small(site, "segnifti")
    sitk.WriteImage(read_series(site / "segnifti")[0], str(site / "segnifti.nii.gz"))
    write_seg(source, {"Tumour": inside}, site / "seg_nifti.dcm")
    row("P10", "segnifti.nii.gz", "seg_nifti.dcm", roi="Tumour")

    # An unknown ROI name.
    write_rtstruct(site / "good", {"GTV": _small(site, "tmp")[1]}, site / "rt_good.dcm")
    row("P11", "good", "rt_good.dcm", roi="CTV")

    # An RTSTRUCT drawn on another series of the same patient.
    write_rtstruct(site / "otherseries", {"GTV": _small(site, "tmp2")[1]}, site / "rt_other.dcm")
    row("P12", "segimg", "rt_other.dcm", roi="GTV")

    # series_uid naming a non-image series of the folder (the RTSTRUCT beside the slices).
    rt_series = pydicom.dcmread(site / "withrt" / "RS.dcm").SeriesInstanceUID
    row("P13", "withrt", "withrt_mask.nii.gz", series_uid=rt_series)
    return _site(site, rows)


def test_each_broken_dicom_case_is_one_line_naming_row_and_file(broken_site):
    result = extract_site(broken_site, FAST, use_cache=False, progress=False)
    assert sorted(result.features.index) == ["P01", "P05"]  # the others are reported
    by_pid = {}
    for p in result.problems:
        assert p.patient_id not in by_pid, f"two problems for {p.patient_id}: {result.problems}"
        by_pid[p.patient_id] = p
        assert "\n" not in str(p) and len(str(p)) < 600
    expected = {
        "P02": ("missing/IM0006.dcm", r"missing slice\(s\): a gap of 4 mm .* spacing is 2 mm"),
        "P03": ("uneven/IM0006.dcm", r"unevenly spaced slices: gaps from 1.5 to 2.5 mm"),
        "P04": ("mixed/B0001.dcm", r"mixed series in one folder \(2 series: .*series_uid"),
        "P06": ("multiframe/MF.dcm", r"multi-frame object as a volume"),
        "P07": ("withrt/RS.dcm", r"non-image DICOM object \(RTSTRUCT"),
        "P08": ("seg_other.dcm", r"references series .* not the image series"),
        "P09": ("notdicom/notes.txt", r"is not a DICOM file"),
        "P10": ("seg_nifti.dcm", r"needs the image as a DICOM series"),
        "P11": ("rt_good.dcm", r"no ROI named 'CTV' in the RTSTRUCT \(ROIs: 'GTV'\)"),
        "P12": ("rt_other.dcm", r"the RTSTRUCT references series .* not the image series"),
        "P13": ("withrt/RS.dcm", r"series .* is not an image \(RTSTRUCT\)"),
    }
    assert set(by_pid) == set(expected)
    lines = {f"P{i:02d}": i + 1 for i in range(1, 14)}
    for pid, (file, reason) in expected.items():
        problem = by_pid[pid]
        assert problem.row == lines[pid]
        assert problem.file == file, (pid, problem)
        assert pytest.importorskip("re").search(reason, problem.reason), (pid, problem.reason)
    # The refused SEG names both series UIDs.
    seg_ref = pydicom.dcmread(broken_site / "seg_other.dcm").ReferencedSeriesSequence[0]
    assert seg_ref.SeriesInstanceUID in by_pid["P08"].reason
    image_uid = pydicom.dcmread(broken_site / "segimg" / "IM0001.dcm").SeriesInstanceUID
    assert image_uid in by_pid["P08"].reason
    # So does the refused RTSTRUCT.
    rt = pydicom.dcmread(broken_site / "rt_other.dcm")
    rt_ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    other_uid = rt_ref.RTReferencedSeriesSequence[0].SeriesInstanceUID
    assert other_uid != image_uid
    assert other_uid in by_pid["P12"].reason and image_uid in by_pid["P12"].reason


# ------------------------------------------------------------------------ polygon fill


def test_polygon_fill_agrees_with_matplotlib_away_from_edges():
    """Random polygons (self-intersecting ones too): even-odd interior of voxel centres."""
    rng = np.random.default_rng(0)
    shape = (40, 50)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    for _ in range(30):
        m = int(rng.integers(3, 12))
        vertices = rng.uniform([-3, -3], [shape[1] + 2, shape[0] + 2], size=(m, 2))
        got = polygon_interior(vertices, shape).ravel()
        path = MplPath(np.vstack([vertices, vertices[:1]]), closed=True)
        # matplotlib's non-zero winding equals even-odd only for simple polygons: use the
        # crossing parity of a far ray instead, written out here independently.
        inside = _even_odd(vertices, centres)
        distance = _distance_to_edges(vertices, centres)
        near = distance < 1e-2  # the outline's tolerance band is compared separately
        assert np.array_equal(got[~near], inside[~near])
        assert got[distance < 1e-6].all()  # on the outline: in the region
        if _is_simple(vertices):
            assert np.array_equal(path.contains_points(centres)[~near], inside[~near])


def _even_odd(vertices: np.ndarray, points: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(points), dtype=bool)
    a, b = vertices, np.roll(vertices, -1, axis=0)
    for (x0, y0), (x1, y1) in zip(a, b, strict=True):
        if y0 == y1:
            continue
        crosses = (points[:, 1] < max(y0, y1)) & (points[:, 1] >= min(y0, y1))
        x_at = x0 + (points[:, 1] - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (points[:, 0] < x_at)
    return inside


def _distance_to_edges(vertices: np.ndarray, points: np.ndarray) -> np.ndarray:
    best = np.full(len(points), np.inf)
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        d = b - a
        t = np.clip(((points - a) @ d) / max(d @ d, 1e-300), 0, 1)
        best = np.minimum(best, np.linalg.norm(points - a - t[:, None] * d, axis=1))
    return best


def _is_simple(vertices: np.ndarray) -> bool:
    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    edges = list(zip(vertices, np.roll(vertices, -1, axis=0), strict=True))
    for i, (p1, p2) in enumerate(edges):
        for j, (q1, q2) in enumerate(edges):
            if abs(i - j) <= 1 or {i, j} == {0, len(edges) - 1}:
                continue
            if (cross(p1, p2, q1) * cross(p1, p2, q2) < 0) and (
                cross(q1, q2, p1) * cross(q1, q2, p2) < 0
            ):
                return False
    return True


def test_nested_contour_is_a_hole_but_its_outline_stays():
    outer = np.array([[1, 1], [12, 1], [12, 12], [1, 12]], dtype=float)
    hole = np.array([[4, 4], [8, 4], [8, 8], [4, 8]], dtype=float)
    region = fill_slice([outer, hole], (15, 15))
    assert region[2, 2] and region[1, 1] and region[12, 12]  # inside and on the outline
    assert not region[6, 6]  # inside the hole
    assert region[4, 6] and region[8, 8]  # the hole's outline
    assert not region[0, 0] and not region[13, 13]
    assert region.sum() == 12 * 12 - 3 * 3


# ---------------------------------------------------------------------- scanner labels


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            {
                "Manufacturer": "GE MEDICAL SYSTEMS",
                "ManufacturerModelName": "Signa  HDxt",
                "MagneticFieldStrength": "1.5",
                "SliceThickness": "3.3",
            },
            ("GE", "Signa HDxt", "1.5T", "3.5mm", "GE Signa HDxt 1.5T"),
        ),
        (
            {
                "Manufacturer": "Philips Healthcare",
                "ManufacturerModelName": "Ingenia",
                "MagneticFieldStrength": "30000",
                "SliceThickness": "1.2",
            },
            ("PHILIPS", "Ingenia", "3T", "1mm", "PHILIPS Ingenia 3T"),
        ),
        (
            {
                "Manufacturer": "SIEMENS",
                "ManufacturerModelName": "SOMATOM Force",
                "MagneticFieldStrength": "",
                "SliceThickness": "0.75",
            },
            ("SIEMENS", "SOMATOM Force", None, "1mm", "SIEMENS SOMATOM Force"),
        ),
        ({"Manufacturer": "", "ManufacturerModelName": "X"}, (None, "X", None, None, None)),
    ],
)
def test_scanner_labels_follow_the_stated_rules(header, expected):
    got = scanner_labels(header)
    assert (
        got["scanner_manufacturer"],
        got["scanner_model"],
        got["field_strength"],
        got["slice_thickness"],
        got["scanner"],
    ) == expected


def test_2d_extraction_on_a_single_slice_roi(converted, tmp_path):
    """force2D with shape2D: a one-slice ROI is extracted; a 3D ROI is refused clearly."""
    folder = converted["STS_002"]
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    array = sitk.GetArrayFromImage(mask)
    k = int(np.argmax(array.reshape(array.shape[0], -1).sum(axis=1)))  # largest slice
    one = np.zeros_like(array)
    one[k] = array[k]
    single = sitk.GetImageFromArray(one)
    single.CopyInformation(mask)
    sitk.WriteImage(single, str(tmp_path / "slice.nii.gz"))
    params = load_params("2d")
    features = extract_case(folder / "series", tmp_path / "slice.nii.gz", params)
    # Resampled in-plane to 1 mm: the area is kept to a few per cent.
    area = float(one[k].sum()) * 0.9765625**2
    assert math.isclose(features["original_shape2D_PixelSurface"], area, rel_tol=0.05)
    assert not any(name.startswith("original_shape_") for name in features)
    with pytest.raises(Exception, match=r"needs the region on one slice; it covers \d+ slices"):
        extract_case(folder / "series", folder / "mask.nii.gz", params)
    # The settings reach pyradiomics as written: its own extractor gives the same values.
    assert params.settings["setting"]["force2D"] is True
    assert features == _pyradiomics(
        params.settings, folder / "image.nii.gz", tmp_path / "slice.nii.gz"
    )


def _pyradiomics(settings: dict, image: Path, mask: Path) -> dict[str, float]:
    """pyradiomics' own extractor on NIfTI files, without radfed (the oracle)."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    raw = RadiomicsFeatureExtractor(settings).execute(str(image), str(mask))
    return {k: float(v) for k, v in raw.items() if not k.startswith("diagnostics_")}


def test_force2d_texture_on_every_slice_the_mask_covers(converted, tmp_path):
    """force2D without shape2D: per-slice texture over the slices a 3D mask covers, as
    pyradiomics computes it, and not the 3D texture."""
    import copy

    folder = converted["STS_002"]
    settings = copy.deepcopy(load_params("2d").settings)
    del settings["featureClass"]["shape2D"]
    (tmp_path / "slices.yaml").write_text(yaml.safe_dump(settings))
    by_slice = load_params(tmp_path / "slices.yaml")
    got = extract_case(folder / "series", folder / "mask.nii.gz", by_slice)
    assert got == _pyradiomics(settings, folder / "image.nii.gz", folder / "mask.nii.gz")
    settings["setting"]["force2D"] = False
    volume = _pyradiomics(settings, folder / "image.nii.gz", folder / "mask.nii.gz")
    glcm = [k for k in got if "_glcm_" in k]
    assert len(glcm) == 24 and all(not math.isclose(got[k], volume[k], rel_tol=1e-9) for k in glcm)


def _contour(points_mm: list[tuple[float, float, float]], kind: str = "CLOSED_PLANAR"):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ContourGeometricType = kind
    item.ContourData = [v for p in points_mm for v in p]
    return item


def test_rtstruct_contours_off_the_grid_are_refused():
    from radfed.client.case_error import CaseError
    from radfed.client.masks import rasterise

    image = sitk.Image(10, 8, 4, sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((0.0, 0.0, 10.0))
    square = [(2.0, 2.0, 12.0), (6.0, 2.0, 12.0), (6.0, 5.0, 12.0), (2.0, 5.0, 12.0)]
    mask = sitk.GetArrayFromImage(rasterise([_contour(square)], image, set(), "GTV"))
    assert mask.sum() == 5 * 4 and mask[1, 2:6, 2:7].all()  # slice z = 12 mm is index 1
    between = [(x, y, 13.0) for x, y, _ in square]
    with pytest.raises(CaseError, match="does not lie on an image slice"):
        rasterise([_contour(between)], image, set(), "GTV")
    outside = [(x + 8.0, y, z) for x, y, z in square]
    with pytest.raises(CaseError, match="contour outside the image"):
        rasterise([_contour(outside)], image, set(), "GTV")
    with pytest.raises(CaseError, match="POINT contour"):
        rasterise([_contour(square[:1], "POINT")], image, set(), "GTV")

"""DICOM image series as radiomics input: find the series, check its slices, read it.

A manifest ``image`` may name a folder holding one DICOM series, or several with the
series chosen by the row's ``series_uid``. Headers are read with pydicom (no pixel data);
the slices are sorted by their position along the slice normal and checked; the voxels
are then read with SimpleITK's :class:`~SimpleITK.ImageSeriesReader` in that order.

Rules (each failure is a one-line :class:`~radfed.client.case_error.CaseError` naming
the file concerned):

- every file in the folder is DICOM (hidden files and ``DICOMDIR`` are skipped);
- without ``series_uid`` the folder holds one series; with it, that series exists;
- the series is an image: not RTSTRUCT, SEG, SR, presentation state, plan, dose ...
  (objects without rows and columns); masks belong beside the image folder, not in it;
- one orientation, one pixel spacing and one matrix size for every slice; no two slices
  at one position (several echoes or time points need a ``series_uid`` per volume);
- the slices are stacked along the slice normal (no gantry tilt) and evenly spaced:
  each gap within 1 % of the median gap; a gap of about two or more median gaps is
  reported as missing slices;
- a multi-frame (enhanced) object is read with highdicom as a regular volume, or
  refused with highdicom's reason.

Voxel values are the stored values after the modality rescale (slope and intercept),
as float32: pyradiomics then resamples them as it resamples a float NIfTI image.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from radfed.client.case_error import CaseError

#: Modalities that are never images for radiomics.
NON_IMAGE_MODALITIES = frozenset(
    {"RTSTRUCT", "SEG", "SR", "PR", "KO", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC", "RWV"}
)
#: Relative tolerance of the slice gaps (highdicom's default too).
SPACING_RTOL = 0.01
#: Tolerance of orientation cosines and in-plane offsets between slices (mm, cosines).
ORIENTATION_ATOL = 1e-4
SKIPPED_NAMES = frozenset({"DICOMDIR"})


@dataclass(frozen=True)
class SliceHeader:
    """What the checks need from one DICOM file (pydicom, no pixel data)."""

    path: Path
    series_uid: str
    sop_instance_uid: str
    modality: str
    frames: int
    rows: int | None
    columns: int | None
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    frame_of_reference: str
    dataset: object = field(default=None, compare=False, repr=False)  # the pydicom header


@dataclass(frozen=True)
class DicomSeries:
    """A checked image series: its files in slice order and the headers of its first slice."""

    folder: Path
    series_uid: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    frame_of_reference: str
    header: dict[str, str]


def is_dicom_folder(path: Path) -> bool:
    """Whether a manifest path names a folder (read as a DICOM series)."""
    return path.is_dir()


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in SKIPPED_NAMES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])
    )


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(math.isfinite(v) for v in numbers) else None


def read_header(path: Path, folder: Path, role: str = "image"):
    """The pydicom dataset of one file without its pixel data.

    Raises
    ------
    CaseError
        The file is not DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError) as exc:
        name = str(path.relative_to(folder)) if path.is_relative_to(folder) else path.name
        # pydicom's advice to its programmers ("Use force=True ...") is no help here.
        reason = short_error(ValueError(str(exc).split(" Use force=True")[0]))
        raise CaseError(f"{name} is not a DICOM file ({reason})", role, name) from exc


def _slice_header(path: Path, folder: Path) -> SliceHeader:
    ds = read_header(path, folder)
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")).upper(),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        dataset=ds,
    )


def scan_series(folder: Path, series_uid: str | None = None) -> tuple[DicomSeries, list]:
    """Find and check the image series of a folder.

    Parameters
    ----------
    folder : Path
        The manifest's image folder.
    series_uid : str, optional
        The series to use when the folder holds several.

    Returns
    -------
    (DicomSeries, list of pydicom.Dataset)
        The series (files in slice order) and its headers in the same order.

    Raises
    ------
    CaseError
        Any rule of the module docstring is broken.
    """
    files = _files(folder)
    if not files:
        raise CaseError("image folder holds no file (expected one DICOM series)")
    headers = [_slice_header(p, folder) for p in files]
    series: dict[str, list[SliceHeader]] = {}
    for h in headers:
        series.setdefault(h.series_uid, []).append(h)

    def name(h: SliceHeader) -> str:
        return str(h.path.relative_to(folder))

    if series_uid:
        if series_uid not in series:
            raise CaseError(
                f"no series with series_uid {series_uid} in the folder (it holds "
                f"{_describe_series(series)})"
            )
        chosen = series[series_uid]
    else:
        non_image = [h for h in headers if _is_non_image(h)]
        if non_image:
            h = non_image[0]
            raise CaseError(
                f"{name(h)} is a non-image DICOM object ({h.modality or 'no modality'}, series "
                f"{h.series_uid}) in the image folder: keep masks outside it, or name the "
                "image series in a series_uid column",
                file=name(h),
            )
        if len(series) > 1:
            raise CaseError(
                f"mixed series in one folder ({_describe_series(series)}): add a series_uid "
                "column naming the one to use",
                file=name(headers[0]),
            )
        chosen = headers
    first = chosen[0]
    if _is_non_image(first):
        raise CaseError(
            f"series {first.series_uid} is not an image ({first.modality or 'no rows/columns'})",
            file=name(first),
        )
    multi = [h for h in chosen if h.frames > 1]
    if multi:
        if len(chosen) > 1:
            raise CaseError(
                f"{name(multi[0])} is a multi-frame object in a series of {len(chosen)} files: "
                "expected either one multi-frame file or single-frame slices",
                file=name(multi[0]),
            )
        order = [multi[0]]
    else:
        order = _slice_order(chosen, folder)
    datasets = [h.dataset for h in order]
    return (
        DicomSeries(
            folder=folder,
            series_uid=first.series_uid,
            files=tuple(h.path for h in order),
            sop_instance_uids=tuple(h.sop_instance_uid for h in order),
            frame_of_reference=first.frame_of_reference,
            header=header_values(datasets[0]),
        ),
        datasets,
    )


def _is_non_image(h: SliceHeader) -> bool:
    return h.modality in NON_IMAGE_MODALITIES or h.rows is None or h.columns is None


def _describe_series(series: dict[str, list[SliceHeader]]) -> str:
    parts = [
        f"{uid or '(no SeriesInstanceUID)'}: {hs[0].modality or '?'}, {len(hs)} file(s)"
        for uid, hs in series.items()
    ]
    shown = "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")
    return f"{len(series)} series: {shown}"


def _slice_order(headers: list[SliceHeader], folder: Path) -> list[SliceHeader]:
    """Sort single-frame slices along the normal and check the stack (module rules)."""

    def name(h: SliceHeader) -> str:
        return str(h.path.relative_to(folder))

    for h in headers:
        if h.orientation is None or h.position is None or h.pixel_spacing is None:
            missing = [
                k
                for k, v in (
                    ("ImageOrientationPatient", h.orientation),
                    ("ImagePositionPatient", h.position),
                    ("PixelSpacing", h.pixel_spacing),
                )
                if v is None
            ]
            raise CaseError(f"{name(h)} lacks {', '.join(missing)}", file=name(h))
    first = headers[0]
    for h in headers[1:]:
        for what, a, b, tol in (
            ("orientation", h.orientation, first.orientation, ORIENTATION_ATOL),
            ("pixel spacing", h.pixel_spacing, first.pixel_spacing, ORIENTATION_ATOL),
            ("matrix size", (h.rows, h.columns), (first.rows, first.columns), 0),
        ):
            if not np.allclose(a, b, rtol=0, atol=tol):
                raise CaseError(
                    f"{name(h)} has another {what} than {name(first)} ({_fmt(a)} vs {_fmt(b)}): "
                    "not one volume",
                    file=name(h),
                )
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(row, col)
    positions = np.array([h.position for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions, along = positions[order], along[order]
    if len(headers) == 1:
        return headers
    gaps = np.diff(along)
    same = np.flatnonzero(gaps <= ORIENTATION_ATOL)
    if same.size:
        a, b = headers[same[0]], headers[same[0] + 1]
        counts = Counter(np.round(along, 3))
        most = max(counts.values())
        raise CaseError(
            f"{name(a)} and {name(b)} lie at the same position ({along[same[0]]:.6g} mm; up to "
            f"{most} slices share a position: several echoes, phases or time points? name one "
            "volume's series in series_uid)",
            file=name(b),
        )
    # The offset between neighbours must be along the normal (no tilt, no shear).
    steps = np.diff(positions, axis=0)
    in_plane = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    if np.any(in_plane > max(ORIENTATION_ATOL, 1e-3 * float(np.median(gaps)))):
        i = int(np.argmax(in_plane))
        raise CaseError(
            f"slices are not stacked along the slice normal (in-plane shift of {in_plane[i]:.3g} "
            f"mm between {name(headers[i])} and {name(headers[i + 1])}: gantry tilt?)",
            file=name(headers[i + 1]),
        )
    spacing = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - spacing) > SPACING_RTOL * spacing)
    if bad.size:
        i = int(bad[0])
        a, b = headers[i], headers[i + 1]
        ratio = gaps[i] / spacing
        if ratio > 1.5:
            missing = round(ratio) - 1
            what = (
                f"missing slice(s): a gap of {gaps[i]:.4g} mm between {name(a)} and {name(b)} "
                f"where the spacing is {spacing:.4g} mm (about {max(missing, 1)} slice(s) absent)"
            )
        else:
            what = (
                f"unevenly spaced slices: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                f"(first between {name(a)} and {name(b)}; tolerance {SPACING_RTOL:.0%} of "
                f"{spacing:.4g} mm)"
            )
        raise CaseError(what, file=name(b))
    return headers


def _fmt(values: Sequence) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_series(folder: Path, series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries]:
    """Read a checked DICOM image series as a float32 SimpleITK image.

    Raises
    ------
    CaseError
        The folder breaks a rule (module docstring) or its pixel data cannot be decoded.
    """
    series, datasets = scan_series(folder, series_uid)
    if len(series.files) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(series), series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CaseError(
            f"cannot read the pixel data of series {series.series_uid}: {_short_itk(exc)}"
        ) from exc
    return sitk.Cast(image, sitk.sitkFloat32), series


def _short_itk(exc: BaseException) -> str:
    text = str(exc)
    if "ERROR:" in text:
        text = text.rsplit("ERROR:", 1)[1]
    return short_error(RuntimeError(text))


def _read_multiframe(series: DicomSeries) -> sitk.Image:
    """A multi-frame image through highdicom's volume (its frame positions and spacing)."""
    import highdicom as hd

    path = series.files[0]
    name = path.name
    try:
        volume = hd.imread(str(path)).get_volume()
    except Exception as exc:  # highdicom raises ValueError/RuntimeError/... with a reason
        raise CaseError(
            f"cannot read this multi-frame object as a volume ({short_error(exc)})", file=name
        ) from exc
    array, affine = np.asarray(volume.array, dtype=np.float32), np.array(volume.affine)
    if array.ndim != 3:
        raise CaseError(
            f"this multi-frame object is not one single-channel volume (shape {array.shape})",
            file=name,
        )
    normal = np.cross(affine[:3, 2], affine[:3, 1])  # column x row direction
    if array.shape[0] > 1 and float(np.dot(normal, affine[:3, 0])) < 0:
        # Slices as a single-frame series would be read: along the slice normal.
        affine[:3, 3] += (array.shape[0] - 1) * affine[:3, 0]
        affine[:3, 0] = -affine[:3, 0]
        array = array[::-1]
    return volume_to_image(np.ascontiguousarray(array), affine)


def volume_to_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image from a (slices, rows, columns) array and highdicom's affine.

    highdicom's affine maps (slice, row, column) indices to LPS patient coordinates (mm),
    the coordinates SimpleITK uses; SimpleITK's x, y, z axes are column, row, slice.
    """
    image = sitk.GetImageFromArray(array)
    axes = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]  # x=column, y=row, z=slice
    spacing = [float(np.linalg.norm(a)) for a in axes]
    direction = np.column_stack([a / s for a, s in zip(axes, spacing, strict=True)])
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


# ------------------------------------------------------------------ scanner batch labels

#: Label columns a site derives from a DICOM image series' headers.
SCANNER_COLUMNS = (
    "scanner_manufacturer",
    "scanner_model",
    "field_strength",
    "slice_thickness",
    "scanner",
)
#: Slice thickness is rounded to the nearest multiple of this step (mm).
THICKNESS_STEP = 0.5


def header_values(ds) -> dict[str, str]:
    """The header values the scanner labels are made of (text as written)."""
    return {
        key: str(ds.get(key, "") or "").strip()
        for key in (
            "Manufacturer",
            "ManufacturerModelName",
            "MagneticFieldStrength",
            "SliceThickness",
            "Modality",
        )
    }


def scanner_labels(header: dict[str, str]) -> dict[str, str | None]:
    """The batch label columns of one series, by stated rules (``None`` when absent).

    - ``scanner_manufacturer``: the first word of Manufacturer, upper case, letters and
      digits only ("SIEMENS", "GE MEDICAL SYSTEMS" -> "GE", "Philips Healthcare" ->
      "PHILIPS");
    - ``scanner_model``: ManufacturerModelName with runs of spaces made one space;
    - ``field_strength``: MagneticFieldStrength in tesla rounded to 0.1 (halves up),
      written "1.5T",
      "3T" (some scanners write 15000 gauss: values above 100 are divided by 10 000);
    - ``slice_thickness``: SliceThickness rounded to the nearest 0.5 mm, halves up
      (3.25 -> "3.5mm");
    - ``scanner``: manufacturer, model and field strength joined by spaces (the present
      ones); ``None`` without a manufacturer or model.
    """
    manufacturer = header.get("Manufacturer", "")
    words = re.findall(r"[A-Za-z0-9]+", manufacturer)
    maker = words[0].upper() if words else None
    model = re.sub(r"\s+", " ", header.get("ManufacturerModelName", "")).strip() or None
    field = _number(header.get("MagneticFieldStrength", ""))
    if field is not None and field > 100:
        field /= 10_000  # gauss
    field_text = f"{_half_up(field, 0.1):g}T" if field is not None and field > 0 else None
    thickness = _number(header.get("SliceThickness", ""))
    thickness_text = (
        f"{_half_up(thickness, THICKNESS_STEP):g}mm"
        if thickness is not None and thickness > 0
        else None
    )
    scanner = " ".join(v for v in (maker, model, field_text) if v) if maker and model else None
    return {
        "scanner_manufacturer": maker,
        "scanner_model": model,
        "field_strength": field_text,
        "slice_thickness": thickness_text,
        "scanner": scanner,
    }


def _half_up(value: float, step: float) -> float:
    """``value`` rounded to a multiple of ``step``, halves up (3.25 -> 3.5 for 0.5)."""
    return round(math.floor(value / step + 0.5 + 1e-9) * step, 6)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def series_labels(folder: Path, series_uid: str | None = None) -> dict[str, str | None]:
    """Scanner labels of a folder's series from the headers of one of its files.

    Cheap (one header); the full checks run when the series is read.
    """
    files = _files(folder)
    for path in files:
        try:
            ds = read_header(path, folder)
        except CaseError:
            continue
        if series_uid and str(ds.get("SeriesInstanceUID", "")) != series_uid:
            continue
        if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        return scanner_labels(header_values(ds))
    return dict.fromkeys(SCANNER_COLUMNS)


def folder_fingerprint(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file of the folder, in a stable order (cache keys)."""
    return [(str(p.relative_to(folder)), p) for p in _files(folder)]

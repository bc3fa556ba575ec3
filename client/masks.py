"""A case's region of interest from the files hospitals write, on the image's grid.

Accepted masks (the manifest's ``mask``, ``mask_reader2`` or ``mask_repeat`` column):

- **label map** (NIfTI, NRRD, any format SimpleITK reads): the region is the voxels of
  one label, the row's ``label`` column or the parameter file's ``label`` (default 1).
  For 3D Slicer's ``.seg.nrrd`` the row's ``roi`` may name the segment instead (its
  ``SegmentN_Name``; the label value and layer come from the file). Rule: the label map
  must have the image's geometry (within the parameter file's ``geometryTolerance``).
- **DICOM-SEG**: the segment named by ``roi`` (its SegmentLabel) or numbered by
  ``label``, or the only segment. Rule: the segment's frames are placed by their plane
  positions and taken onto the image grid by nearest neighbour (fractional segments at
  0.5); every foreground voxel must fall inside the image.
- **RTSTRUCT**: the ROI named by ``roi`` (its ROIName), or the only ROI. Rule: closed
  planar contours are rasterised on the image grid (:mod:`radfed.client.contours`);
  each contour must lie on an image slice (within 0.1 slice) and inside the image.

A DICOM-SEG or RTSTRUCT must come with a DICOM image series and reference it: a mask
that references another series or frame of reference is refused with both UIDs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from radfed.client.case_error import CaseError
from radfed.client.contours import fill_slice
from radfed.client.dicom import DicomSeries, volume_to_image

#: Largest distance (in slices) of a contour from the nearest slice centre.
CONTOUR_SLICE_TOL = 0.1
#: Largest distance (in voxels) outside the image grid a mask voxel centre may lie.
GRID_TOL = 1e-3


@dataclass(frozen=True)
class MaskChoice:
    """Which region of a mask file to use: the row's ``label`` and ``roi`` cells."""

    label: int | None = None
    roi: str | None = None


def is_dicom_file(path: Path) -> bool:
    """Whether a file starts with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def load_mask(
    path: Path,
    image: sitk.Image,
    series: DicomSeries | None,
    choice: MaskChoice,
    default_label: int,
    role: str = "mask",
) -> tuple[sitk.Image, int]:
    """Read a mask and return it with the label of the region.

    Returns
    -------
    (SimpleITK.Image, int)
        A label map and the label to extract. A DICOM mask comes back as a 0/1 uint8
        image on the image grid (label 1); a label map comes back as read (its geometry
        is checked by the caller).

    Raises
    ------
    CaseError
        Unreadable file, unknown segment or ROI, a reference to another series, or a
        region outside the image.
    """
    if path.is_dir():
        raise CaseError(
            f"{role} is a folder: a mask is one file (label map, DICOM-SEG or RTSTRUCT)", role
        )
    if is_dicom_file(path):
        return _dicom_mask(path, image, series, choice, role), 1
    return _label_map(path, choice, default_label, role)


# ------------------------------------------------------------------------- label maps


def _label_map(
    path: Path, choice: MaskChoice, default_label: int, role: str
) -> tuple[sitk.Image, int]:
    from radfed.client.image_files import read_image

    mask = read_image(path, role)
    if choice.roi is not None:
        if not path.name.lower().endswith(".seg.nrrd"):
            raise CaseError(
                f"a roi name ({choice.roi!r}) selects a segment of a DICOM-SEG, an RTSTRUCT or "
                "a Slicer .seg.nrrd; for this label map give its number in the label column",
                role,
            )
        label, layer = _slicer_segment(mask, choice.roi, role)
        if mask.GetNumberOfComponentsPerPixel() > 1:
            mask = sitk.VectorIndexSelectionCast(mask, layer)
        return mask, label
    return mask, choice.label if choice.label is not None else default_label


def _slicer_segment(mask: sitk.Image, name: str, role: str) -> tuple[int, int]:
    """(label value, layer) of the Slicer segment called ``name`` (case-insensitive)."""
    keys = set(mask.GetMetaDataKeys())
    found: dict[str, tuple[int, int]] = {}
    for key in sorted(keys):
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if not match:
            continue
        i = match.group(1)
        label = (
            int(mask.GetMetaData(f"Segment{i}_LabelValue"))
            if (f"Segment{i}_LabelValue" in keys)
            else int(i) + 1
        )
        layer = int(mask.GetMetaData(f"Segment{i}_Layer")) if f"Segment{i}_Layer" in keys else 0
        found[mask.GetMetaData(key).strip()] = (label, layer)
    for segment, value in found.items():
        if segment.lower() == name.strip().lower():
            return value
    raise CaseError(
        f"no segment named {name!r} in the .seg.nrrd (segments: {_listed(found)})", role
    )


def _listed(names) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "") or "none"


# --------------------------------------------------------------------------- DICOM masks


def _dicom_mask(
    path: Path, image: sitk.Image, series: DicomSeries | None, choice: MaskChoice, role: str
) -> sitk.Image:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise CaseError(f"cannot read {role} as DICOM: {exc}", role) from exc
    modality = str(ds.get("Modality", "")).upper()
    if modality not in {"SEG", "RTSTRUCT"}:
        raise CaseError(
            f"a DICOM {role} must be a SEG or RTSTRUCT object, got modality {modality or '?'}",
            role,
        )
    if series is None:
        raise CaseError(
            f"a {modality} {role} needs the image as a DICOM series (to check what it "
            "references); this image is not DICOM",
            role,
        )
    if modality == "SEG":
        return _seg_mask(ds, image, series, choice, role)
    return _rtstruct_mask(ds, image, series, choice, role)


def _check_reference(
    referenced: set[str], frame_of_reference: str, series: DicomSeries, kind: str, role: str
) -> None:
    if series.series_uid not in referenced or (
        frame_of_reference and frame_of_reference != series.frame_of_reference
    ):
        refs = ", ".join(sorted(referenced)) or "no series"
        raise CaseError(
            f"the {kind} references series {refs} (frame of reference "
            f"{frame_of_reference or '?'}), not the image series {series.series_uid} (frame of "
            f"reference {series.frame_of_reference or '?'})",
            role,
        )


def _seg_mask(
    ds, image: sitk.Image, series: DicomSeries, choice: MaskChoice, role: str
) -> sitk.Image:
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:
        raise CaseError(f"cannot read {role} as DICOM-SEG: {exc}", role) from exc
    referenced = {str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])}
    _check_reference(referenced, str(ds.get("FrameOfReferenceUID", "")), series, "DICOM-SEG", role)
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    number = _choose_segment(segments, choice, role)
    try:
        volume = seg.get_volume(
            segment_numbers=[number], combine_segments=True, relabel=True, skip_overlap_checks=True
        )
    except Exception as exc:
        raise CaseError(f"cannot place the DICOM-SEG frames as a volume: {exc}", role) from exc
    array = np.asarray(volume.array)
    if array.dtype.kind == "f":
        array = array >= 0.5
    source = volume_to_image((array > 0).astype(np.uint8), volume.affine)
    return onto_grid(source, image, role)


def _choose_segment(segments: dict[int, str], choice: MaskChoice, role: str) -> int:
    shown = _listed(f"{n}: {name}" for n, name in segments.items())
    if choice.roi is not None:
        hits = [n for n, name in segments.items() if name.lower() == choice.roi.strip().lower()]
        if len(hits) != 1:
            why = "no" if not hits else "more than one"
            raise CaseError(f"{why} segment named {choice.roi!r} (segments: {shown})", role)
        return hits[0]
    if choice.label is not None:
        if choice.label not in segments:
            raise CaseError(f"no segment number {choice.label} (segments: {shown})", role)
        return choice.label
    if len(segments) != 1:
        raise CaseError(
            f"the DICOM-SEG holds {len(segments)} segments: name one in the roi column "
            f"(segments: {shown})",
            role,
        )
    return next(iter(segments))


def onto_grid(source: sitk.Image, image: sitk.Image, role: str) -> sitk.Image:
    """A 0/1 mask taken onto the image grid by nearest neighbour.

    Raises
    ------
    CaseError
        A foreground voxel centre lies outside the image grid.
    """
    fg = np.argwhere(sitk.GetArrayViewFromImage(source) > 0)  # (z, y, x)
    if fg.size == 0:
        raise CaseError(f"{role} region is empty", role)
    index = fg[:, ::-1].astype(float)
    origin = np.array(source.GetOrigin())
    matrix = np.array(source.GetDirection()).reshape(3, 3) @ np.diag(source.GetSpacing())
    points = origin + index @ matrix.T
    target = _continuous_index(image, points)
    size = np.array(image.GetSize())
    outside = np.any((target < -0.5 - GRID_TOL) | (target > size - 0.5 + GRID_TOL), axis=1)
    if outside.any():
        raise CaseError(
            f"{role}: {int(outside.sum())} of {len(fg)} region voxels lie outside the image",
            role,
        )
    resampled = sitk.Resample(
        source, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return resampled


def _continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    origin = np.array(image.GetOrigin())
    matrix = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return np.linalg.solve(matrix, (points - origin).T).T


def _rtstruct_mask(
    ds, image: sitk.Image, series: DicomSeries, choice: MaskChoice, role: str
) -> sitk.Image:
    referenced: set[str] = set()
    frames: set[str] = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(str(frame.get("FrameOfReferenceUID", "")))
        for study in frame.get("RTReferencedStudySequence", []):
            for ref in study.get("RTReferencedSeriesSequence", []):
                referenced.add(str(ref.SeriesInstanceUID))
    frame_uid = next(iter(frames)) if len(frames) == 1 else ""
    _check_reference(referenced, frame_uid, series, "RTSTRUCT", role)

    rois = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    if choice.roi is not None:
        hits = [n for n, name in rois.items() if name.strip().lower() == choice.roi.strip().lower()]
        if len(hits) != 1:
            why = "no" if not hits else "more than one"
            raise CaseError(
                f"{why} ROI named {choice.roi!r} in the RTSTRUCT (ROIs: {_listed(rois.values())})",
                role,
            )
        number = hits[0]
    elif len(rois) == 1:
        number = next(iter(rois))
    else:
        raise CaseError(
            f"the RTSTRUCT holds {len(rois)} ROIs: name one in the roi column "
            f"(ROIs: {_listed(rois.values())})",
            role,
        )
    contours = [
        c
        for item in ds.get("ROIContourSequence", [])
        if int(item.ReferencedROINumber) == number
        for c in item.get("ContourSequence", [])
    ]
    if not contours:
        raise CaseError(f"ROI {rois[number]!r} has no contour", role)
    return rasterise(contours, image, set(series.sop_instance_uids), rois[number], role)


def rasterise(
    contours, image: sitk.Image, instances: set[str], name: str, role: str = "mask"
) -> sitk.Image:
    """Closed planar contours (pydicom items) to a 0/1 mask on the image grid."""
    size = image.GetSize()
    shape2d = (size[1], size[0])
    by_slice: dict[int, list[np.ndarray]] = {}
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR"))
        if kind != "CLOSED_PLANAR":
            raise CaseError(
                f"ROI {name!r} has a {kind} contour: only CLOSED_PLANAR is filled", role
            )
        for ref in contour.get("ContourImageSequence", []):
            uid = str(ref.ReferencedSOPInstanceUID)
            if uid not in instances:
                raise CaseError(
                    f"ROI {name!r} has a contour on image {uid}, which is not in the image series",
                    role,
                )
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        index = _continuous_index(image, points)
        z = index[:, 2]
        k = int(np.rint(z.mean()))
        if np.max(np.abs(z - k)) > CONTOUR_SLICE_TOL:
            raise CaseError(
                f"ROI {name!r} has a contour that does not lie on an image slice (slice index "
                f"{z.min():.3f} to {z.max():.3f})",
                role,
            )
        xy = index[:, :2]
        if not (
            0 <= k < size[2]
            and np.all(xy > -0.5 - GRID_TOL)
            and np.all(xy < np.array(size[:2]) - 0.5 + GRID_TOL)
        ):
            raise CaseError(f"ROI {name!r} has a contour outside the image", role)
        by_slice.setdefault(k, []).append(xy)
    array = np.zeros(size[::-1], dtype=np.uint8)
    for k, polygons in by_slice.items():
        array[k] = fill_slice(polygons, shape2d)
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    return mask

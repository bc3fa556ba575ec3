"""Write an image as a DICOM series with pydicom (the synthetic cohort, tests, demos).

One single-frame file per slice, 16-bit signed stored values with a rescale slope and
intercept chosen so the stored integers hold the image exactly when its values are
whole numbers in the int16 range (else to 1/60000 of the range); the geometry is written
as conformant Decimal Strings (at most 16 characters): Python's shortest decimal spelling
of each number when it fits, else its closest 16-character spelling. A grid whose numbers
have short spellings (spacing 0.9765625, origin on a 1/64 mm grid ...) is then read back
bit for bit; another (a float32 NIfTI spacing such as 0.9765620231628418) is read back
to about 1e-14 relative, as from a scanner's own headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class SeriesInfo:
    """What a written series says about itself (UIDs and scanner headers)."""

    patient_id: str = "ANON"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    modality: str = "MR"
    manufacturer: str = "SIEMENS"
    model: str = "Avanto"
    field_strength: float | None = 1.5
    slice_thickness: float | None = None
    series_number: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pydicom.uid import generate_uid

        self.study_uid = self.study_uid or generate_uid()
        self.series_uid = self.series_uid or generate_uid()
        self.frame_of_reference_uid = self.frame_of_reference_uid or generate_uid()


#: Longest Decimal String (DS) value the DICOM standard allows (PS3.5 6.2).
DS_MAX_CHARS = 16


def _ds(value: float) -> str:
    """A conformant DS value: Python's shortest spelling of ``value`` when it fits in 16
    characters, else the closest spelling in 16 characters (pydicom's
    ``format_number_as_ds``: as many significant digits as fit), as a scanner writes it.
    """
    from pydicom.valuerep import format_number_as_ds

    text = repr(float(value))
    text = text[:-2] if text.endswith(".0") else text
    return text if len(text) <= DS_MAX_CHARS else format_number_as_ds(float(value))


def write_series(
    image: sitk.Image, folder: str | Path, info: SeriesInfo | None = None, prefix: str = "IM"
) -> list:
    """Write ``image`` (3D, one component) as one DICOM file per slice.

    Returns
    -------
    list of pydicom.Dataset
        The written datasets, slice by slice (z order of the image).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    info = info or SeriesInfo()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image).astype(float)  # (z, y, x)
    low, high = float(array.min()), float(array.max())
    if np.all(array == np.round(array)) and low >= -32768 and high <= 32767:
        slope, intercept = 1.0, 0.0
    else:
        slope = max(high - low, 1e-12) / 60000.0
        intercept = low + 30000 * slope
        # The stored integers are made with the values the header will hold.
        slope, intercept = float(_ds(slope)), float(_ds(intercept))
    stored = np.rint((array - intercept) / slope).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin())
    sop_class = CT_IMAGE_STORAGE if info.modality == "CT" else MR_IMAGE_STORAGE
    thickness = info.slice_thickness if info.slice_thickness is not None else spacing[2]
    written = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = info.modality
        ds.PatientID = info.patient_id
        ds.PatientName = f"{info.patient_id}^"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = info.study_uid
        ds.SeriesInstanceUID = info.series_uid
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = k + 1
        ds.Manufacturer = info.manufacturer
        ds.ManufacturerModelName = info.model
        if info.field_strength is not None:
            ds.MagneticFieldStrength = _ds(info.field_strength)
        ds.SliceThickness = _ds(thickness)
        position = origin + k * spacing[2] * direction[:, 2]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing, column spacing
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.PixelData = stored[k].tobytes()
        for key, value in info.extra.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"{prefix}{k + 1:04d}.dcm", enforce_file_format=True)
        written.append(ds)
    return written

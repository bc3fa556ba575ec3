"""Reading image and mask files: SimpleITK, with the checks its readers skip.

One place for what extraction and the mask readers both need: a truncated NIfTI file
refused instead of read as zeros, and short, readable ITK error messages.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

import SimpleITK as sitk

from radfed.client.case_error import CaseError

_READ_CHUNK = 1 << 20
_NIFTI2_HEADER = 540  # bytes; a NIfTI-1 header (348) fits in it


def read_image(path: Path, role: str) -> sitk.Image:
    _check_nifti_complete(path, role)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CaseError(f"cannot read {role}: {short_error(str(exc))}", role) from exc


def _check_nifti_complete(path: Path, role: str) -> None:
    """Refuse a truncated NIfTI file.

    ITK's NIfTI reader silently fills missing voxel data with zeros (an interrupted copy
    or download then yields plausible but wrong features), so check the data length
    promised by the header and the gzip stream's integrity ourselves.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(_NIFTI2_HEADER)
            size = len(header)
            while chunk := handle.read(_READ_CHUNK):
                size += len(chunk)
    except EOFError as exc:
        raise CaseError(
            f"cannot read {role}: file is truncated (compressed data ends early)", role
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise CaseError(
            f"cannot read {role}: corrupt compressed file ({short_error(str(exc))})", role
        ) from exc
    except OSError as exc:
        raise CaseError(f"cannot read {role}: {exc.strerror or exc}", role) from exc
    expected = _nifti_expected_size(header)
    if expected is not None and size < expected:
        raise CaseError(
            f"cannot read {role}: file is truncated ({size} bytes, the header promises {expected})",
            role,
        )


def _nifti_expected_size(header: bytes) -> int | None:
    """Header + voxel bytes of a single-file NIfTI-1/2, or None if not such a header."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":  # .hdr/.img pair: the data is elsewhere
                return None
            ndim, *dims = struct.unpack(f"{order}8h", header[40:56])
            bitpix = struct.unpack(f"{order}h", header[72:74])[0]
            offset = int(struct.unpack(f"{order}f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            ndim, *dims = struct.unpack(f"{order}8q", header[16:80])
            bitpix = struct.unpack(f"{order}h", header[14:16])[0]
            offset = struct.unpack(f"{order}q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    return offset + math.prod(max(d, 1) for d in dims[:ndim]) * bitpix // 8


def short_error(message: str, limit: int = 200) -> str:
    """First useful line of a (SimpleITK/ITK) error message, without source locations."""
    if "ERROR:" in message:
        message = message.rsplit("ERROR:", 1)[1]
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= limit else message[: limit - 3] + "..."

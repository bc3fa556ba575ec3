"""Radiomics feature extraction for one site: pyradiomics with cache, parallelism and a
per-case error report.

Each case is checked with SimpleITK before pyradiomics sees it (readable files, a mask
with at least one voxel of the label, matching image/mask geometry); a bad case becomes a
:class:`~radfed.client.manifest.RowProblem` and the other cases go on. Results are cached
per case in small JSON files keyed by the *content* of the image and mask, the parameter
settings and the versions of the numerical libraries, so a re-run (or a copy of the site
folder) is served from the cache.

Non-finite values: pyradiomics can return NaN (or inf) for degenerate regions. The case is
kept, the feature is stored as NaN (inf too: downstream statistics cannot use it) and
listed per patient in :attr:`ExtractionResult.nonfinite` and in the sidecar of
:func:`write_features`.

pyradiomics 3.0.1 with numpy 2: all feature classes and the wavelet filter run unchanged
(checked against the IBSI digital phantom in the tests). The only numpy-1-only code in
pyradiomics 3.0.1 (``numpy.float`` in ``firstorder._moment(moment=1)``) is never reached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
from tqdm import tqdm

from radfed.client.case_error import CaseError
from radfed.client.image_files import read_image, short_error
from radfed.client.manifest import READER_COLUMNS, RowProblem, read_manifest
from radfed.shared.errors import RadfedError, StudyConfigError

PACKAGED_PARAMS = ("default", "fast", "2d")
CACHE_FORMAT = "radfed-features-cache/1"
SIDECAR_FORMAT = "radfed-features/1"
_HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)


class ParamsError(StudyConfigError):
    """A pyradiomics parameter file is missing, not valid YAML, or rejected by pyradiomics."""


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped :func:`extract_site`; no table was made.

    Every case that finished before the signal is in the feature cache, so the same call
    again extracts only the missing cases. A subclass of KeyboardInterrupt: code that
    handles Ctrl-C handles it too, and ``except Exception`` does not swallow it.

    Attributes
    ----------
    signum : int
        The signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    kept, total : int
        Cases whose features are in the cache (from before and from this run) / cases
        to extract in all (readable files).
    cache : Path or None
        The feature cache folder; None when the cache was off.
    """

    def __init__(self, signum: int, kept: int, total: int, cache: Path | None) -> None:
        super().__init__(signum, kept, total, cache)
        self.signum, self.kept, self.total, self.cache = signum, kept, total, cache

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(self.signum)

    def __str__(self) -> str:
        if self.cache is None:
            return (
                f"interrupted: {self.total} cases not extracted (the cache is off, nothing "
                "was kept); run the same command again to start over"
            )
        return (
            f"interrupted: {self.kept} of {self.total} cases kept in {self.cache}; "
            "run the same command again to finish"
        )


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ExtractionParams:
    """A validated pyradiomics parameter set.

    Attributes
    ----------
    name : str
        ``"default"``, ``"fast"`` or the parameter file's name.
    settings : dict
        The parsed YAML (keys ``imageType``, ``featureClass``, ``setting``).
    text : str
        The YAML text.
    """

    name: str
    settings: dict
    text: str

    @property
    def settings_hash(self) -> str:
        """sha256 of a canonical JSON of ``settings``; comments and layout do not count."""
        canonical = json.dumps(_canonical(self.settings), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def label(self) -> int:
        """The mask label features are extracted for (pyradiomics' default is 1)."""
        return int((self.settings.get("setting") or {}).get("label", 1))

    @property
    def geometry_tolerance(self) -> float:
        """Tolerance of the image/mask geometry check (SimpleITK's default unless set)."""
        return float((self.settings.get("setting") or {}).get("geometryTolerance", 1e-6))


def _canonical(value: Any) -> Any:
    """Make equal settings hash equally: ``25`` and ``25.0`` are the same bin width."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_params(params: str | Path | None = None) -> ExtractionParams:
    """Load and validate a pyradiomics parameter file.

    Parameters
    ----------
    params : str or Path, optional
        ``None`` or ``"default"`` for the packaged seed-study parameters, ``"fast"`` for the
        quick variant, otherwise the path of a YAML file.

    Returns
    -------
    ExtractionParams

    Raises
    ------
    ParamsError
        The file is missing, not YAML, not a mapping, or pyradiomics rejects a key/value.
    """
    if params is None or str(params) in PACKAGED_PARAMS:
        name = str(params or "default")
        text = (resources.files("radfed.client") / "params" / f"{name}.yaml").read_text()
    else:
        path = Path(params).expanduser()
        if not path.is_file():
            raise ParamsError(
                f"parameter file {path} not found (use a YAML file, or one of "
                f"{', '.join(PACKAGED_PARAMS)})"
            )
        name, text = path.name, path.read_text(encoding="utf-8")
    settings = _parse_yaml(text, name)
    _validate_with_pyradiomics(settings, name)
    _check_image_types(settings, name)
    return ExtractionParams(name=name, settings=settings, text=text)


def _parse_yaml(text: str, name: str) -> dict:
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"parameter file {name} is not valid YAML: {exc}") from exc
    if not isinstance(settings, dict) or not settings:
        raise ParamsError(
            f"parameter file {name} must be a YAML mapping with keys such as imageType, "
            "featureClass and setting"
        )
    return settings


def _validate_with_pyradiomics(settings: dict, name: str) -> None:
    """Run pyradiomics' own schema check so a typo fails now, not on the first case."""
    _quiet_pyradiomics()
    from pykwalify.errors import PyKwalifyException
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pykwalify's load_module()
            RadiomicsFeatureExtractor(settings)
    except PyKwalifyException as exc:
        detail = str(getattr(exc, "msg", exc)).replace("Schema validation failed:", "").strip()
        raise ParamsError(f"pyradiomics rejects parameter file {name}: {detail}") from exc
    except (ValueError, TypeError) as exc:
        raise ParamsError(f"pyradiomics rejects parameter file {name}: {exc}") from exc


# Image types pyradiomics skips with only a log message when a package is missing.
_IMAGE_TYPE_PACKAGES = {"LBP2D": ("skimage",), "LBP3D": ("scipy", "trimesh")}


def _check_image_types(settings: dict, name: str) -> None:
    """Refuse image types pyradiomics would silently skip (missing sigma or package)."""
    image_types = settings.get("imageType") or {}
    common = settings.get("setting") or {}
    for image_type, custom in image_types.items():
        if image_type == "LoG" and not ((custom or {}).get("sigma") or common.get("sigma")):
            raise ParamsError(
                f"parameter file {name}: image type LoG needs a sigma list, e.g. [1.0, 3.0]"
            )
        for package in _IMAGE_TYPE_PACKAGES.get(image_type, ()):
            if importlib.util.find_spec(package) is None:
                raise ParamsError(
                    f"parameter file {name}: image type {image_type} needs the Python package "
                    f"{package}, which is not installed"
                )


def pyradiomics_version() -> str:
    """The installed pyradiomics version, e.g. ``"3.0.1"``."""
    try:
        return metadata.version("pyradiomics")
    except metadata.PackageNotFoundError:
        import radiomics

        return str(radiomics.__version__).lstrip("v")


@functools.cache  # a process's libraries do not change; metadata lookups cost ~2 ms each
def _engine_versions() -> str:
    """Versions whose change can change feature values; part of the cache key."""
    names = ("pyradiomics", "numpy", "SimpleITK", "PyWavelets")
    found = []
    for name in names:
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=?")
    return ";".join(found)


def _quiet_pyradiomics() -> None:
    """Silence pyradiomics (and pykwalify, which it uses) below ERROR."""
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.CRITICAL)  # errors come back as ParamsError


# ------------------------------------------------------------------------------ one case

_EXTRACTORS: dict[str, Any] = {}  # per process: building one re-validates the schema


def _extractor(params: ExtractionParams) -> Any:
    extractor = _EXTRACTORS.get(params.settings_hash)
    if extractor is None:
        _quiet_pyradiomics()
        from radiomics.featureextractor import RadiomicsFeatureExtractor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pykwalify's load_module()
            extractor = RadiomicsFeatureExtractor(params.settings)
        _EXTRACTORS[params.settings_hash] = extractor
    return extractor


def extract_case(
    image_path: str | Path,
    mask_path: str | Path,
    params: ExtractionParams,
    *,
    series_uid: str | None = None,
    label: int | None = None,
    roi: str | None = None,
    role: str = "mask",
) -> dict[str, float]:
    """Extract the features of one case.

    Parameters
    ----------
    image_path : str or Path
        Image file (any format SimpleITK reads) or a folder holding a DICOM series
        (:mod:`radfed.client.dicom`).
    mask_path : str or Path
        Label map, DICOM-SEG or RTSTRUCT (:mod:`radfed.client.masks`).
    params : ExtractionParams
    series_uid : str, optional
        The series of an image folder holding several.
    label, roi : optional
        Which region of the mask (the manifest's ``label`` and ``roi`` cells); the
        parameter file's ``label`` otherwise.
    role : str
        The manifest column of the mask, for messages.

    Returns
    -------
    dict of str to float
        pyradiomics feature names (no ``diagnostics_*``) to values; non-finite values
        are returned as NaN.

    Raises
    ------
    CaseError
        Unreadable file, empty mask, image/mask geometry mismatch, blank image, or a
        pyradiomics failure (short reason, no traceback).
    """
    from radfed.client.dicom import read_series
    from radfed.client.masks import MaskChoice, is_dicom_file, load_mask

    image_path, mask_path = Path(image_path), Path(mask_path)
    series = None
    if image_path.is_dir():
        image, series = read_series(image_path, series_uid)
    else:
        image = read_image(image_path, "image")
    mask, label = load_mask(mask_path, image, series, MaskChoice(label, roi), params.label, role)
    if not is_dicom_file(mask_path):  # DICOM masks are built on the image grid
        mask = _mask_channel(mask, params)
        _check_geometry(image, mask, params.geometry_tolerance, role)
    _check_mask_label(mask, label, role)
    _check_not_blank(image)
    _check_2d(mask, label, params, role)

    extractor = _extractor(params)
    try:
        with warnings.catch_warnings():
            # Degenerate regions raise numpy RuntimeWarnings; the NaN they cause is
            # reported through `nonfinite`, so the warnings are noise here.
            warnings.simplefilter("ignore")
            raw = extractor.execute(image, mask, label=label)
    except Exception as exc:  # pyradiomics raises bare ValueError/RuntimeError/...
        reason = short_error(str(exc)) or type(exc).__name__
        which = role if "mask" in reason.lower() else "image"
        raise CaseError(f"pyradiomics failed: {reason}", which) from exc
    return _to_float_features(raw)


def _check_2d(mask: sitk.Image, label: int, params: ExtractionParams, role: str) -> None:
    """With ``force2D`` and 2D shape features, the region must lie on one slice.

    pyradiomics computes texture per slice in 2D (``force2Ddimension``: 0 = axial
    slices, the z axis) and then averages; ``shape2D`` needs a region on one slice, the
    single-slice ROI of seed 000's protocol.
    """
    setting = params.settings.get("setting") or {}
    if not setting.get("force2D") or "shape2D" not in (params.settings.get("featureClass") or {}):
        return
    axis = int(setting.get("force2Ddimension", 0))  # numpy (z, y, x) axis across slices
    where = np.argwhere(sitk.GetArrayViewFromImage(mask) == label)
    slices = np.unique(where[:, axis]).size
    if slices != 1:
        raise CaseError(
            f"2D extraction (force2D with shape2D) needs the region on one slice; it covers "
            f"{slices} slices",
            role,
        )


def _mask_channel(mask: sitk.Image, params: ExtractionParams) -> sitk.Image:
    """Use the configured channel of a multi-channel (segmentation) mask."""
    if mask.GetNumberOfComponentsPerPixel() == 1:
        return mask
    channel = int((params.settings.get("setting") or {}).get("label_channel", 0))
    return sitk.VectorIndexSelectionCast(mask, channel)


def _geometry(image: sitk.Image) -> dict[str, tuple]:
    return {
        "size": image.GetSize(),
        "spacing": image.GetSpacing(),
        "origin": image.GetOrigin(),
        "direction": image.GetDirection(),
    }


def _check_geometry(
    image: sitk.Image, mask: sitk.Image, tolerance: float, role: str = "mask"
) -> None:
    """Same test as ITK's: positions within tolerance x spacing, directions absolute."""
    a, b = _geometry(image), _geometry(mask)
    if len(a["size"]) != len(b["size"]):
        raise CaseError(f"image is {len(a['size'])}D but mask is {len(b['size'])}D", role=role)
    position_tol = abs(tolerance * a["spacing"][0])
    differ = [
        key
        for key, tol in (
            ("size", 0),
            ("spacing", position_tol),
            ("origin", position_tol),
            ("direction", tolerance),
        )
        if not np.allclose(a[key], b[key], rtol=0, atol=tol)
    ]
    if differ:

        def describe(g: dict[str, tuple]) -> str:
            return ", ".join(f"{k}={_fmt(g[k])}" for k in differ)

        raise CaseError(
            f"image and mask geometry differ ({', '.join(differ)}): "
            f"image {describe(a)}; mask {describe(b)}",
            role=role,
        )


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_mask_label(mask: sitk.Image, label: int, role: str = "mask") -> None:
    labels = sitk.GetArrayViewFromImage(mask)
    if not np.any(labels == label):
        present = np.unique(labels)
        shown = ", ".join(f"{v:g}" for v in present[:10]) + (", ..." if present.size > 10 else "")
        raise CaseError(
            f"mask is empty (no voxel with label {label}; values present: {shown})", role=role
        )


def _check_not_blank(image: sitk.Image) -> None:
    """A constant image is a failed export; normalisation would also divide by 0 SD.
    NaN or infinite voxels (a failed conversion) would turn every feature into NaN."""
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise CaseError(
                f"image holds {bad} voxel(s) that are NaN or infinite (a failed export?)",
                role="image",
            )
    if values.size and values.min() == values.max():
        raise CaseError(f"image is blank (every voxel is {values.flat[0]:g})", role="image")


def _to_float_features(raw: Mapping[str, Any]) -> dict[str, float]:
    """Keep feature entries only, as Python floats; non-finite values become NaN."""
    features = {}
    for name, value in raw.items():
        if name.startswith("diagnostics_"):
            continue
        number = float(value)  # pyradiomics returns numpy scalars and 0-d arrays
        features[name] = number if math.isfinite(number) else math.nan
    return features


# --------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$RADFED_CACHE`` if set, else ``~/.cache/radfed/features``."""
    env = os.environ.get("RADFED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "radfed" / "features"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(
    image_path: str | Path,
    mask_path: str | Path,
    params: ExtractionParams,
    choice: tuple[str, ...] = (),
    mask_role: str = "mask",
) -> str:
    """Key of one case: image and mask content, settings and library versions.

    An image folder (DICOM series) counts by the names and content of all its files;
    ``choice`` (series UID, label, ROI name) is part of the key when given.

    Raises
    ------
    CaseError
        A file cannot be read.
    """
    parts = [CACHE_FORMAT]
    for path, role in ((Path(image_path), "image"), (Path(mask_path), mask_role)):
        try:
            if path.is_dir():
                from radfed.client.dicom import folder_fingerprint

                folder = hashlib.sha256()
                for name, file in folder_fingerprint(path):
                    folder.update(f"{name}\0{file_sha256(file)}\n".encode())
                parts.append("folder:" + folder.hexdigest())
            else:
                parts.append(file_sha256(path))
                # A header with its voxels in another file (.hdr/.img, .mhd/.raw,
                # .nhdr/.raw): the voxels count too (the key of a file alone is kept).
                parts += [f"data:{file_sha256(data)}" for data in _detached_data(path)]
        except OSError as exc:
            raise CaseError(f"cannot read {role}: {exc.strerror or exc}", role) from exc
    parts += [params.settings_hash, _engine_versions()]
    if any(choice):
        parts.append("choice:" + "\0".join(choice))
    extra = _extra_versions(params, image_path, mask_path)
    if extra:  # only where they matter, so the keys of plain cases stay as they were
        parts.append(extra)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


_DATA_FILE_FIELD = {
    ".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.MULTILINE),
    ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE),
}


def _detached_data(path: Path) -> list[Path]:
    """The files holding the voxels of a detached-header image, in a stable order.

    Analyze/NIfTI pairs (``.hdr`` with ``.img`` or ``.img.gz``); MetaImage ``.mhd`` and
    NRRD ``.nhdr`` by the data file their header names (one file, or ``LIST`` and the
    names after it). Other files hold their own voxels: none.
    """
    suffix = path.suffix.lower()
    if suffix == ".hdr":
        stem = path.name[: -len(path.suffix)]
        return [p for ext in (".img", ".img.gz") if (p := path.with_name(stem + ext)).is_file()]
    field = _DATA_FILE_FIELD.get(suffix)
    if field is None:
        return []
    with open(path, "rb") as handle:
        header = handle.read(1 << 16).decode("latin-1")
    match = field.search(header)
    if match is None:
        return []
    value = match.group(1)
    if value.upper() == "LOCAL":
        return []
    names = [value]
    if value.split()[0].upper() == "LIST":
        names = [line.strip() for line in header[match.end() :].splitlines() if line.strip()]
    return [f for name in names if (f := path.parent / name).is_file()]


def _extra_versions(params: ExtractionParams, image_path: str | Path, mask_path: str | Path) -> str:
    """Versions of the libraries only some cases use: the DICOM readers (series, SEG,
    RTSTRUCT) and the packages of pyradiomics' LBP filters."""
    from radfed.client.masks import is_dicom_file

    names: list[str] = []
    if Path(image_path).is_dir() or is_dicom_file(Path(mask_path)):
        names += ["pydicom", "highdicom"]
    image_types = params.settings.get("imageType") or {}
    if "LBP2D" in image_types:
        names += ["scikit-image"]
    if "LBP3D" in image_types:
        names += ["scipy", "trimesh"]
    return ";".join(f"{name}={_version(name)}" for name in names)


@functools.cache
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.json"


def _cache_get(cache_dir: Path, key: str) -> dict[str, float] | None:
    """The cached features, or None when absent or unusable (then recomputed)."""
    path = _cache_path(cache_dir, key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["format"] != CACHE_FORMAT or entry["key"] != key:
            return None
        return {str(k): math.nan if v is None else float(v) for k, v in entry["features"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring corrupt cache entry %s", path)
        return None


def _cache_put(cache_dir: Path, key: str, features: Mapping[str, float]) -> bool:
    """Write one entry atomically: a reader sees the old state or the whole new file.

    Returns False (after a warning) when the entry could not be written."""
    entry = {
        "format": CACHE_FORMAT,
        "key": key,
        "engine": _engine_versions(),
        "features": {k: (v if math.isfinite(v) else None) for k, v in features.items()},
    }
    try:
        _atomic_write_text(_cache_path(cache_dir, key), json.dumps(entry, allow_nan=False))
    except OSError as exc:  # a full or read-only cache must not stop the extraction
        log.warning("cannot write feature cache in %s: %s", cache_dir, exc)
        return False
    return True


def _temp_path(path: Path) -> Path:
    """A unique hidden sibling of ``path``: same file system, so os.replace is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:  # honours the umask
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- site


@dataclass
class ExtractionResult:
    """Features of one site and what went wrong.

    Attributes
    ----------
    features : pandas.DataFrame
        Index ``patient_id``; one float64 column per feature (pyradiomics names, sorted).
    problems : list of RowProblem
        Manifest problems and per-case extraction failures, in line order.
    n_cached, n_extracted : int
        Cases served from the cache / computed now.
    settings_hash, pyradiomics_version : str
        Provenance of the values.
    params_name : str
        Name of the parameter set.
    nonfinite : dict of str to list of str
        Patient id -> features pyradiomics returned as NaN/inf (kept as NaN).
    readers : dict of str to pandas.DataFrame
        Features on the other masks of a case, by manifest column (``mask_reader2``,
        ``mask_repeat``): the same columns as ``features``, rows of the cases that have
        that mask.
    labels : pandas.DataFrame
        Scanner label columns (:data:`radfed.client.dicom.SCANNER_COLUMNS`) of the cases
        with a DICOM image, derived from its headers (missing values as ``None``).
    """

    features: pd.DataFrame
    problems: list[RowProblem]
    n_cached: int
    n_extracted: int
    settings_hash: str
    pyradiomics_version: str
    params_name: str = ""
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    readers: dict[str, pd.DataFrame] = field(default_factory=dict)
    labels: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class _Case:
    patient_id: str
    line: int
    image: str  # as written in the manifest
    mask: str
    image_path: str
    mask_path: str
    role: str = "mask"  # the manifest column of the mask
    series_uid: str = ""
    label: str = ""
    roi: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.role, self.patient_id)

    @property
    def choice(self) -> tuple[str, ...]:
        return (self.series_uid, self.label, self.roi)

    def options(self) -> dict[str, Any]:
        """extract_case's keyword arguments (none for a plain label-map case)."""
        options: dict[str, Any] = {}
        if self.series_uid:
            options["series_uid"] = self.series_uid
        if self.label:
            options["label"] = int(self.label)
        if self.roi:
            options["roi"] = self.roi
        if self.role != "mask":
            options["role"] = self.role
        return options


def _cases(rows: pd.DataFrame) -> list[_Case]:
    """One case per row and mask column (the reader masks only where given)."""
    cases = []
    for pid, r in rows.iterrows():
        common = {
            "patient_id": str(pid),
            "line": int(r["line"]),
            "image": r["image"],
            "image_path": r["image_path"],
            "series_uid": str(r.get("series_uid", "") or ""),
            "label": str(r.get("label", "") or ""),
            "roi": str(r.get("roi", "") or ""),
        }
        for role in ("mask", *READER_COLUMNS):
            if str(r.get(role, "") or ""):
                cases.append(_Case(**common, mask=r[role], mask_path=r[f"{role}_path"], role=role))
    return cases


def extract_site(
    site_dir: str | Path,
    params: ExtractionParams | None = None,
    jobs: int | None = 1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    use_cache: bool = True,
    outcome: str | None = None,
) -> ExtractionResult:
    """Extract the features of every valid case in a site's manifest.

    Parameters
    ----------
    site_dir : str or Path
        Site folder with ``manifest.csv`` (see :mod:`radfed.client.manifest`).
    params : ExtractionParams, optional
        Defaults to :func:`load_params` ``()`` (the seed-study parameters).
    jobs : int, optional
        Worker processes; 0 or None means ``os.cpu_count()``; 1 runs in this process.
    cache_dir : str or Path, optional
        Feature cache folder; defaults to :func:`default_cache_dir`.
    progress : bool
        Show a tqdm progress bar on stderr.
    use_cache : bool
        False neither reads nor writes the cache.
    outcome : str, optional
        Also check this outcome column (rows with a bad outcome become problems and are
        not extracted). Extraction itself does not need outcomes.

    Returns
    -------
    ExtractionResult
    """
    params = params or load_params()
    manifest = read_manifest(site_dir, outcome=outcome)
    problems = list(manifest.problems)
    cases = _cases(manifest.rows)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    features: dict[tuple[str, str], dict[str, float]] = {}
    keys: dict[tuple[str, str], str] = {}
    todo = cases
    if use_cache:
        features, keys, todo = _lookup_cache(cases, params, cache, problems)
    n_cached = len(features)
    if progress and n_cached:
        print(
            f"reusing {n_cached} case{'s' * (n_cached != 1)} extracted before; "
            f"extracting {len(todo)}",
            file=sys.stderr,
        )

    bar = tqdm(
        total=len(features) + len(todo),
        initial=n_cached,
        unit="case",
        file=sys.stderr,
        desc=f"extract {manifest.site_dir.name}",
        disable=not progress,
    )
    kept = n_cached  # cases whose features are in the cache
    with _StopSignals() as stop, bar:
        running = _run_cases(todo, params, jobs, stop)
        try:
            for case, done in running:
                if isinstance(done, CaseError):
                    problems.append(_case_problem(case, done))
                else:
                    features[case.key] = done
                    if use_cache:
                        kept += _cache_put(cache, keys[case.key], done)
                bar.update()
        except (_Stop, KeyboardInterrupt) as exc:
            running.close()  # cancels queued cases and ends the worker processes now
            signum = stop.signum or getattr(exc, "signum", None) or signal.SIGINT
            raise ExtractionInterrupted(
                signum, kept if use_cache else 0, n_cached + len(todo), cache if use_cache else None
            ) from None
        finally:
            running.close()

    main = {k[1]: v for k, v in features.items() if k[0] == "mask"}
    order = [c.patient_id for c in cases if c.role == "mask" and c.patient_id in main]
    table = _feature_table(main, order)
    readers = {}
    for role in READER_COLUMNS:
        got = {k[1]: v for k, v in features.items() if k[0] == role}
        if got:
            ids = [c.patient_id for c in cases if c.role == role and c.patient_id in got]
            readers[role] = _feature_table(got, ids).reindex(columns=table.columns)
    return ExtractionResult(
        features=table,
        problems=sorted(problems, key=lambda p: p.row),
        n_cached=n_cached,
        n_extracted=len(features) - n_cached,  # every mask's case, not only the rows
        settings_hash=params.settings_hash,
        pyradiomics_version=pyradiomics_version(),
        params_name=params.name,
        nonfinite=_nonfinite(table),
        readers=readers,
        labels=_scanner_labels(manifest.rows.loc[order] if order else manifest.rows.iloc[:0]),
    )


def _scanner_labels(rows: pd.DataFrame) -> pd.DataFrame:
    """The scanner label columns of the rows with a DICOM image folder (headers only)."""
    from radfed.client.dicom import SCANNER_COLUMNS, series_labels

    found = {
        str(pid): series_labels(Path(r["image_path"]), str(r.get("series_uid", "") or "") or None)
        for pid, r in rows.iterrows()
        if Path(r["image_path"]).is_dir()
    }
    frame = pd.DataFrame.from_dict(found, orient="index", columns=list(SCANNER_COLUMNS))
    frame.index.name = "patient_id"
    return frame.astype(object)


def _lookup_cache(
    cases: list[_Case], params: ExtractionParams, cache: Path, problems: list[RowProblem]
) -> tuple[dict[str, dict[str, float]], dict[str, str], list[_Case]]:
    """Split cases into cache hits and cases to compute; unreadable files go to problems.

    Returns
    -------
    (features of the hits, cache key of every readable case, cases to compute)
    """
    hits: dict[tuple[str, str], dict[str, float]] = {}
    keys: dict[tuple[str, str], str] = {}
    todo: list[_Case] = []
    for case in cases:
        try:
            keys[case.key] = cache_key(
                case.image_path, case.mask_path, params, case.choice, case.role
            )
        except CaseError as error:
            problems.append(_case_problem(case, error))
            continue
        hit = _cache_get(cache, keys[case.key])
        if hit is None:
            todo.append(case)
        else:
            hits[case.key] = hit
    return hits, keys, todo


def _case_problem(case: _Case, error: CaseError) -> RowProblem:
    if error.role == "image":
        file = case.image
        if error.file:  # a file inside a DICOM folder
            file = f"{case.image.rstrip('/')}/{error.file}"
    else:
        file = case.mask
    reason = error.reason
    if case.role != "mask" and not reason.startswith(case.role):
        reason = f"{case.role}: {reason}"
    return RowProblem(case.line, case.patient_id, file, reason)


class _Stop(BaseException):
    """Raised inside the extraction loop when SIGINT/SIGTERM asked it to stop."""


class _StopSignals:
    """Turn SIGINT and SIGTERM into an orderly stop of :func:`extract_site`.

    The handlers only take note of the signal; the loop acts on it between cases, so a
    finished case is always written to the cache whole. The exception: a case computed
    in this process (``jobs=1``) is abandoned at once (``abort_case``). Installed only in
    the main thread and only over Python's default handlers: a caller's own handlers
    stay in charge (their KeyboardInterrupt is handled the same way).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.abort_case = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
            for signum, default in defaults.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self.abort_case:
            self.abort_case = False
            raise _Stop


def _run_cases(
    cases: list[_Case], params: ExtractionParams, jobs: int | None, stop: _StopSignals
) -> Iterator[tuple[_Case, dict[str, float] | CaseError]]:
    """Yield ``(case, features or CaseError)`` as cases finish.

    Raises :class:`_Stop` once ``stop`` has seen a signal, after yielding the cases that
    had finished by then. Closing the generator early (a signal, an error in the caller)
    cancels the queued cases and terminates the worker processes: the cases in flight
    are abandoned rather than waited for.
    """
    workers = min(max(1, int(jobs)) if jobs else os.cpu_count() or 1, len(cases))
    if workers <= 1:
        for case in cases:
            if stop.signum:
                raise _Stop
            stop.abort_case = True
            try:
                done = _run_case(case.image_path, case.mask_path, params, case.options())
            finally:
                stop.abort_case = False
            yield case, done
        if stop.signum:
            raise _Stop
        return

    # spawn, not fork: safe when the caller has threads (tqdm, Flower, Ray) and on macOS.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(workers,),
    )
    finished = False
    try:
        # Largest first (longest-processing-time order): a big case started last would
        # leave one worker idle while the other finishes it.
        futures: dict[Future, _Case] = {
            pool.submit(_run_case, c.image_path, c.mask_path, params, c.options()): c
            for c in sorted(cases, key=_size_on_disk, reverse=True)
        }
        pending = set(futures)
        while pending:
            if stop.signum:
                for future in pending:
                    future.cancel()  # queued cases never start
                for future in [f for f in futures if f in pending and f.done()]:
                    if not future.cancelled():
                        yield futures[future], _outcome(future)  # finished: keep it
                raise _Stop
            # A short timeout: the signal handlers only take note, this loop acts.
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: futures[f].line):
                yield futures[future], _outcome(future)
        finished = True
        if stop.signum:  # after the last case: still an interrupted command
            raise _Stop
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _terminate_pool(pool)


def _outcome(future: Future) -> dict[str, float] | CaseError:
    try:
        return future.result()
    except BrokenProcessPool:
        return CaseError("extraction process died (out of memory?); retry with fewer --jobs")


def _size_on_disk(case: _Case) -> int:
    """Bytes of a case's image and mask files (a folder: its files), a proxy for the
    case's extraction time; 0 for what cannot be read (the case reports that itself)."""
    total = 0
    for path in (Path(case.image_path), Path(case.mask_path)):
        try:
            files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
            total += sum(f.stat().st_size for f in files)
        except OSError:
            pass
    return total


def _terminate_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued cases and end the worker processes without waiting for them."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14: does all of this
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)


def _init_worker(workers: int) -> None:
    """Quiet pyradiomics and share the cores between workers instead of oversubscribing.

    Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
    main process decides (it keeps the finished cases, then terminates the workers).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_pyradiomics()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // workers))


def _run_case(
    image_path: str, mask_path: str, params: ExtractionParams, options: dict | None = None
) -> dict | CaseError:
    """Worker entry point: returns the error instead of raising it (cheaper to pickle)."""
    try:
        if options:
            return extract_case(image_path, mask_path, params, **options)
        return extract_case(image_path, mask_path, params)
    except CaseError as exc:
        return exc
    except Exception as exc:  # a bug must not lose the other cases
        return CaseError(f"unexpected error: {type(exc).__name__}: {short_error(str(exc))}")


def _feature_table(features: Mapping[str, Mapping[str, float]], order: list[str]) -> pd.DataFrame:
    columns = sorted({name for values in features.values() for name in values})
    rows = [[features[pid].get(c, math.nan) for c in columns] for pid in order]
    index = pd.Index(order, name="patient_id", dtype=object)
    return pd.DataFrame(rows, index=index, columns=columns, dtype="float64")


def _nonfinite(table: pd.DataFrame) -> dict[str, list[str]]:
    mask = table.isna()
    return {
        str(pid): list(table.columns[row])
        for pid, row in zip(table.index, mask.to_numpy(), strict=True)
        if row.any()
    }


# ------------------------------------------------------------------------------- storage


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.meta.json")


def write_features(result: ExtractionResult, out: str | Path) -> Path:
    """Write the feature table and its ``.meta.json`` sidecar.

    Parameters
    ----------
    result : ExtractionResult
    out : str or Path
        Output file: CSV when it ends in ``.csv``, Parquet otherwise.

    Returns
    -------
    Path
        The table's path; the sidecar is ``f"{out}.meta.json"``.
    """
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = result.features.astype("float64")
    table.index = table.index.astype(str).rename("patient_id")
    tmp = _temp_path(path)
    try:
        if path.suffix.lower() == ".csv":
            table.to_csv(tmp)  # floats are written with repr: exact round trip
        else:
            table.to_parquet(tmp, index=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    meta = {
        "format": SIDECAR_FORMAT,
        "settings_hash": result.settings_hash,
        "pyradiomics_version": result.pyradiomics_version,
        "params_name": result.params_name,
        "n_cases": len(table),
        "n_features": table.shape[1],
        "n_cached": result.n_cached,
        "n_extracted": result.n_extracted,
        "problems": [asdict(p) for p in result.problems],
        "nonfinite": result.nonfinite,
    }
    _atomic_write_text(_sidecar(path), json.dumps(meta, indent=2))
    return path


def read_features(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a table written by :func:`write_features`.

    Returns
    -------
    (pandas.DataFrame, dict)
        The table (index ``patient_id`` as str, float64 columns) and the sidecar
        metadata (``{}`` when there is no sidecar).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise RadfedError(f"feature file {path} not found; run `radfed extract` first")
    if path.suffix.lower() == ".csv":
        # Only feature cells can be missing: a patient called "NA" stays "NA".
        columns = pd.read_csv(path, nrows=0).columns
        missing = {c: ["", "nan", "NaN"] for c in columns if c != "patient_id"}
        table = pd.read_csv(
            path,
            dtype={"patient_id": str},
            keep_default_na=False,
            na_values=missing,
            float_precision="round_trip",  # exact floats, as written by to_csv
        ).set_index("patient_id")
    else:
        table = pd.read_parquet(path)
    table.index = table.index.astype(str).rename("patient_id")
    sidecar = _sidecar(path)
    meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    return table.astype("float64"), meta


__all__ = [
    "CaseError",
    "ExtractionInterrupted",
    "ExtractionParams",
    "ExtractionResult",
    "ParamsError",
    "default_cache_dir",
    "extract_case",
    "extract_site",
    "load_params",
    "pyradiomics_version",
    "read_features",
    "write_features",
]

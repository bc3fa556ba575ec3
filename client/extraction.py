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

import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
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

from radfed.client.manifest import RowProblem, read_manifest
from radfed.shared.errors import RadfedError, StudyConfigError

PACKAGED_PARAMS = ("default", "fast")
CACHE_FORMAT = "radfed-features-cache/1"
SIDECAR_FORMAT = "radfed-features/1"
_HASH_CHUNK = 1 << 20
_NIFTI2_HEADER = 540  # bytes; a NIfTI-1 header (348) fits in it

log = logging.getLogger(__name__)


class ParamsError(StudyConfigError):
    """A pyradiomics parameter file is missing, not valid YAML, or rejected by pyradiomics."""


class CaseError(RadfedError):
    """One case cannot be extracted; ``reason`` is short and has no traceback.

    Parameters
    ----------
    reason : str
        Human-readable reason.
    role : {"image", "mask"}
        Which of the case's files the reason is about.
    """

    def __init__(self, reason: str, role: str = "image") -> None:
        super().__init__(reason)
        self.reason = reason
        self.role = role


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
    image_path: str | Path, mask_path: str | Path, params: ExtractionParams
) -> dict[str, float]:
    """Extract the features of one case.

    Parameters
    ----------
    image_path, mask_path : str or Path
        Image and label mask, any format SimpleITK reads.
    params : ExtractionParams

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
    image = _read_image(Path(image_path), "image")
    mask = _read_image(Path(mask_path), "mask")
    mask = _mask_channel(mask, params)
    _check_geometry(image, mask, params.geometry_tolerance)
    _check_mask_label(mask, params.label)
    _check_not_blank(image)

    extractor = _extractor(params)
    try:
        with warnings.catch_warnings():
            # Degenerate regions raise numpy RuntimeWarnings; the NaN they cause is
            # reported through `nonfinite`, so the warnings are noise here.
            warnings.simplefilter("ignore")
            raw = extractor.execute(image, mask, label=params.label)
    except Exception as exc:  # pyradiomics raises bare ValueError/RuntimeError/...
        reason = _short(str(exc)) or type(exc).__name__
        role = "mask" if "mask" in reason.lower() else "image"
        raise CaseError(f"pyradiomics failed: {reason}", role) from exc
    return _to_float_features(raw)


def _read_image(path: Path, role: str) -> sitk.Image:
    _check_nifti_complete(path, role)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CaseError(f"cannot read {role}: {_short(str(exc))}", role) from exc


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
            while chunk := handle.read(_HASH_CHUNK):
                size += len(chunk)
    except EOFError as exc:
        raise CaseError(
            f"cannot read {role}: file is truncated (compressed data ends early)", role
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise CaseError(
            f"cannot read {role}: corrupt compressed file ({_short(str(exc))})", role
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


def _short(message: str, limit: int = 200) -> str:
    """First useful line of a (SimpleITK/ITK) error message, without source locations."""
    if "ERROR:" in message:
        message = message.rsplit("ERROR:", 1)[1]
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= limit else message[: limit - 3] + "..."


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


def _check_geometry(image: sitk.Image, mask: sitk.Image, tolerance: float) -> None:
    """Same test as ITK's: positions within tolerance x spacing, directions absolute."""
    a, b = _geometry(image), _geometry(mask)
    if len(a["size"]) != len(b["size"]):
        raise CaseError(f"image is {len(a['size'])}D but mask is {len(b['size'])}D", role="mask")
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
            role="mask",
        )


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_mask_label(mask: sitk.Image, label: int) -> None:
    labels = sitk.GetArrayViewFromImage(mask)
    if not np.any(labels == label):
        present = np.unique(labels)
        shown = ", ".join(f"{v:g}" for v in present[:10]) + (", ..." if present.size > 10 else "")
        raise CaseError(
            f"mask is empty (no voxel with label {label}; values present: {shown})", role="mask"
        )


def _check_not_blank(image: sitk.Image) -> None:
    """A constant image is a failed export; normalisation would also divide by 0 SD."""
    values = sitk.GetArrayViewFromImage(image)
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


def cache_key(image_path: str | Path, mask_path: str | Path, params: ExtractionParams) -> str:
    """Key of one case: image and mask content, settings and library versions.

    Raises
    ------
    CaseError
        A file cannot be read.
    """
    parts = [CACHE_FORMAT]
    for path, role in ((image_path, "image"), (mask_path, "mask")):
        try:
            parts.append(file_sha256(path))
        except OSError as exc:
            raise CaseError(f"cannot read {role}: {exc.strerror or exc}", role) from exc
    parts += [params.settings_hash, _engine_versions()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


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


def _cache_put(cache_dir: Path, key: str, features: Mapping[str, float]) -> None:
    """Write one entry atomically: a reader sees the old state or the whole new file."""
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
    """

    features: pd.DataFrame
    problems: list[RowProblem]
    n_cached: int
    n_extracted: int
    settings_hash: str
    pyradiomics_version: str
    params_name: str = ""
    nonfinite: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Case:
    patient_id: str
    line: int
    image: str  # as written in the manifest
    mask: str
    image_path: str
    mask_path: str


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
    cases = [
        _Case(str(pid), int(r["line"]), r["image"], r["mask"], r["image_path"], r["mask_path"])
        for pid, r in manifest.rows.iterrows()
    ]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    features: dict[str, dict[str, float]] = {}
    keys: dict[str, str] = {}
    todo = cases
    if use_cache:
        features, keys, todo = _lookup_cache(cases, params, cache, problems)
    n_cached = len(features)

    bar = tqdm(
        total=len(features) + len(todo),
        initial=n_cached,
        unit="case",
        file=sys.stderr,
        desc=f"extract {manifest.site_dir.name}",
        disable=not progress,
    )
    with bar:
        for case, done in _run_cases(todo, params, jobs):
            if isinstance(done, CaseError):
                problems.append(_case_problem(case, done))
            else:
                features[case.patient_id] = done
                if use_cache:
                    _cache_put(cache, keys[case.patient_id], done)
            bar.update()

    order = [c.patient_id for c in cases if c.patient_id in features]
    table = _feature_table(features, order)
    return ExtractionResult(
        features=table,
        problems=sorted(problems, key=lambda p: p.row),
        n_cached=n_cached,
        n_extracted=len(table) - n_cached,
        settings_hash=params.settings_hash,
        pyradiomics_version=pyradiomics_version(),
        params_name=params.name,
        nonfinite=_nonfinite(table),
    )


def _lookup_cache(
    cases: list[_Case], params: ExtractionParams, cache: Path, problems: list[RowProblem]
) -> tuple[dict[str, dict[str, float]], dict[str, str], list[_Case]]:
    """Split cases into cache hits and cases to compute; unreadable files go to problems.

    Returns
    -------
    (features of the hits, cache key of every readable case, cases to compute)
    """
    hits: dict[str, dict[str, float]] = {}
    keys: dict[str, str] = {}
    todo: list[_Case] = []
    for case in cases:
        try:
            keys[case.patient_id] = cache_key(case.image_path, case.mask_path, params)
        except CaseError as error:
            problems.append(_case_problem(case, error))
            continue
        hit = _cache_get(cache, keys[case.patient_id])
        if hit is None:
            todo.append(case)
        else:
            hits[case.patient_id] = hit
    return hits, keys, todo


def _case_problem(case: _Case, error: CaseError) -> RowProblem:
    file = case.mask if error.role == "mask" else case.image
    return RowProblem(case.line, case.patient_id, file, error.reason)


def _run_cases(
    cases: list[_Case], params: ExtractionParams, jobs: int | None
) -> Iterator[tuple[_Case, dict[str, float] | CaseError]]:
    """Yield ``(case, features or CaseError)`` as cases finish."""
    workers = min(max(1, int(jobs)) if jobs else os.cpu_count() or 1, len(cases))
    if workers <= 1:
        for case in cases:
            yield case, _run_case(case.image_path, case.mask_path, params)
        return

    # spawn, not fork: safe when the caller has threads (tqdm, Flower, Ray) and on macOS.
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(workers,),
    )
    try:
        futures: dict[Future, _Case] = {
            pool.submit(_run_case, c.image_path, c.mask_path, params): c for c in cases
        }
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:
                yield (
                    futures[future],
                    CaseError("extraction process died (out of memory?); retry with fewer --jobs"),
                )
    finally:
        # On Ctrl-C or an error in the caller, do not wait for queued cases.
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(workers: int) -> None:
    """Quiet pyradiomics and share the cores between workers instead of oversubscribing."""
    _quiet_pyradiomics()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // workers))


def _run_case(image_path: str, mask_path: str, params: ExtractionParams) -> dict | CaseError:
    """Worker entry point: returns the error instead of raising it (cheaper to pickle)."""
    try:
        return extract_case(image_path, mask_path, params)
    except CaseError as exc:
        return exc
    except Exception as exc:  # a bug must not lose the other cases
        return CaseError(f"unexpected error: {type(exc).__name__}: {_short(str(exc))}")


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

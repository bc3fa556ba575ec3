"""A site's loaded analysis table, kept on disk between the messages of a run.

Flower's Deployment Engine starts a new ClientApp process for every message, so without
this cache an image site re-reads its manifest, hashes every image and mask for the
feature cache and re-joins the table at every round. The first message of a study loads
the table as usual (:func:`radfed.client.data.load_site_table`) and stores it here; later
messages (and later runs of the same study) read it back in milliseconds.

The key is the digest of the site's data and of what the study asks of it:

- the content of the site's table files (``manifest.csv``, ``features.*`` and sidecars)
  and the size and modification time of every other file of the site folder and of
  every file the manifest names outside it (images, masks, DICOM series folders);
- the table specification the pinned protocol gives (outcome, variables, batch and
  covariate columns), the extraction parameters (a parameter file by its content);
- radfed's version, the source of ``radfed.client``'s modules (so an edited loader
  never serves an old table), and the versions of the numerical libraries.

A changed, added or removed file gives a new key, so the table is loaded afresh. Image
sites gain the most (no manifest validation, image hashing or feature-cache reads), but
a feature-table site is cached too (its validation row by row takes 0.2 s for 300
patients; the cached table 10 ms). Entries are written atomically, readable by the site's user
only, in ``CACHE_DIR/tables`` (the site's ``cache-dir``, else ``$RADFED_CACHE``, else
``~/.cache/radfed/features``); they hold the site's own rows and never leave the site.
Set ``RADFED_TABLE_CACHE=off`` to load the table from the data at every message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import secrets
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radfed.client.data import SiteTable, TableSpec

log = logging.getLogger(__name__)

FORMAT = "radfed-site-table/1"
MANIFEST = "manifest.csv"
ENV = "RADFED_TABLE_CACHE"
#: Files whose content (not only size and time) is part of the key: the tables.
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".json", ".txt", ".yaml", ".yml")
_LIBRARIES = ("radfed", "pyradiomics", "numpy", "pandas", "SimpleITK", "PyWavelets")


def enabled() -> bool:
    return os.environ.get(ENV, "on").strip().lower() not in {"off", "0", "false", "no"}


def cache_root(cache_dir: Path | None) -> Path:
    """Where the table entries go: ``tables/`` in the site's feature cache folder."""
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
    elif os.environ.get("RADFED_CACHE"):
        base = Path(os.environ["RADFED_CACHE"]).expanduser()
    else:
        base = Path.home() / ".cache" / "radfed" / "features"
    return base / "tables"


def _versions() -> list[str]:
    here = Path(__file__).parent
    code = hashlib.sha256()
    for path in sorted(here.glob("*.py")):  # radfed.client: the loaders among them
        try:
            code.update(path.name.encode() + path.read_bytes())
        except OSError:
            code.update(path.name.encode())
    found = [f"loaders={code.hexdigest()}"]
    for name in _LIBRARIES:
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=?")
    return found


def _stat_line(path: Path, label: str) -> str:
    st = path.stat()
    return f"{label}\t{st.st_size}\t{st.st_mtime_ns}"


def _walk(root: Path, label: str, lines: list[str], hashed: bool) -> None:
    """Add every file under ``root`` (or ``root`` itself): tables by content, others by
    size and modification time."""
    if root.is_file():
        paths = [root]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(root) if path != root else Path()
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden files and folders (editors' and caches' temporaries)
        name = f"{label}/{relative}" if path != root else label
        if hashed and path.suffix.lower() in TABLE_SUFFIXES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            lines.append(f"{name}\t{digest}")
        else:
            lines.append(_stat_line(path, name))


def _manifest_paths(site_dir: Path) -> list[Path]:
    """Existing files and folders named in the manifest that lie outside the site folder."""
    text = (site_dir / MANIFEST).read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    root = site_dir.resolve()
    found: set[Path] = set()
    for cells in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
        for cell in cells:
            cell = cell.strip()
            if not cell or ("/" not in cell and "\\" not in cell and "." not in cell):
                continue
            path = Path(cell).expanduser()
            path = path if path.is_absolute() else site_dir / path
            try:
                resolved = path.resolve()
                if resolved.exists() and not resolved.is_relative_to(root):
                    found.add(resolved)
            except (OSError, ValueError):
                continue
    return sorted(found)


def data_digest(site_dir: Path) -> str:
    """Digest of a site folder's data, as this module's docstring describes."""
    site_dir = Path(site_dir)
    lines: list[str] = []
    _walk(site_dir.resolve(), ".", lines, hashed=True)
    if (site_dir / MANIFEST).is_file():
        for path in _manifest_paths(site_dir):
            _walk(path, str(path), lines, hashed=False)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def table_key(site_dir: Path, spec: TableSpec, params: str) -> str:
    """The cache key of a site's table for one study's specification."""
    parts = {
        "format": FORMAT,
        "data": data_digest(site_dir),
        "site": str(Path(site_dir).resolve()),
        "spec": asdict(spec),
        "params": params,
        "versions": _versions(),
    }
    params_path = Path(params)
    if params not in {"default", "fast"} and params_path.is_file():
        parts["params_sha256"] = hashlib.sha256(params_path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, key: str) -> SiteTable | None:
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle)  # the site's own file, in its private cache folder
        if entry.get("format") != FORMAT or entry.get("key") != key:
            return None
        return entry["table"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt or stale entry is rebuilt, never fatal
        log.warning("ignoring unusable table cache entry %s: %s", path, exc)
        return None


def _write(path: Path, key: str, table: SiteTable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            pickle.dump({"format": FORMAT, "key": key, "table": table}, handle, protocol=5)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only cache must not stop the site
        tmp.unlink(missing_ok=True)
        log.warning("cannot write the table cache in %s: %s", path.parent, exc)


def cached_site_table(
    site_dir: str | Path,
    spec: TableSpec,
    params: str = "default",
    cache_dir: Path | None = None,
    jobs: int = 1,
    progress: bool = False,
) -> SiteTable:
    """:func:`radfed.client.data.load_site_table`, served from the cache when the site's
    data and the study's specification are unchanged (same arguments and result)."""
    from radfed.client.data import load_site_table

    site_dir = Path(site_dir)
    if not enabled() or not site_dir.is_dir():
        return load_site_table(site_dir, spec, params, cache_dir, jobs, progress)
    try:
        key = table_key(site_dir, spec, params)
    except OSError as exc:  # unreadable data: let the loader report it properly
        log.debug("table cache key failed (%s): loading without the cache", exc)
        return load_site_table(site_dir, spec, params, cache_dir, jobs, progress)
    path = cache_root(cache_dir) / f"{key}.pkl"
    table = _read(path, key)
    if table is not None:
        log.debug("site table of %s from the cache %s", site_dir, path)
        return table
    table = load_site_table(site_dir, spec, params, cache_dir, jobs, progress)
    _write(path, key, table)
    return table

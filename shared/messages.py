"""The payloads that travel between coordinator and sites, and their Flower encoding.

A payload is a flat ``dict`` from names to numpy arrays, numbers, strings or lists of
strings. Every transport moves payloads through :func:`to_record` / :func:`from_record`,
so the in-process transport exercises the same encoding as Flower does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # Flower loads only when a payload is encoded: the statistics need
    from flwr.app import RecordDict  # the payload names, not the transport

Payload = dict[str, Any]

# The column a site derives from the Radscore definition it receives.
RADSCORE = "Radscore"
# Column prefix of a fitted model's linear predictor ("lp:nomogram"), which a site
# derives from the model the request carries (calibration fits of y on logit p).
LINEAR_PREDICTOR = "lp:"
#: Marks the ServerApp log lines that a local Deployment Engine run relays as progress.
PROGRESS = "progress: "

ARRAYS = "arrays"
CONFIG = "config"
#: The ArrayRecord key of the one byte buffer holding every array of a payload.
PACKED = "packed"
#: The config key of the packed arrays' names, dtypes and shapes (JSON).
INDEX = "arrays:index"
#: The dtypes a payload array may have (little-endian; never objects).
DTYPES = frozenset({"<f8", "<f4", "<i8", "<i4", "|i1", "|u1", "|b1"})
MAX_NDIM = 4
# Dicts (for example the study protocol) travel as JSON strings under this prefix.
JSON_PREFIX = "json:"
#: The task of a message carrying several requests (independent fits sharing a round).
BATCH = "batch"
#: The most requests one batch may carry (a site refuses larger ones).
MAX_BATCH = 256


def to_record(payload: Mapping[str, Any]) -> RecordDict:
    """Encode a payload as a Flower ``RecordDict``.

    Parameters
    ----------
    payload : mapping
        Values are numpy arrays (sent as arrays), ``int``/``float``/``bool``/``str`` or
        lists of ``str`` (sent as config), or dicts (sent as JSON strings).

    Returns
    -------
    RecordDict
        With an ``"arrays"`` ArrayRecord holding one byte buffer, every array of the
        payload one after another (:data:`PACKED`), and a ``"config"`` ConfigRecord
        holding the rest and the arrays' names, dtypes and shapes (:data:`INDEX`).
        Flower moves each ``Array`` as an object of its own through the SuperLink's
        store (an HTTP request and a database row each way): a payload of 50-300
        arrays as one buffer costs one.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    if INDEX in payload:
        raise TypeError(f"{INDEX!r} is the encoding's own key, not a payload name")
    index: list[list[Any]] = []
    chunks: list[bytes] = []
    config: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            config[key] = value.item()  # a 0-d array is a number
        elif isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            if array.dtype.str not in DTYPES:
                raise TypeError(f"payload array {key!r} of dtype {array.dtype} cannot be sent")
            index.append([key, array.dtype.str, list(array.shape)])
            chunks.append(array.tobytes())
        elif isinstance(value, dict):
            config[JSON_PREFIX + key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, np.generic):
            config[key] = value.item()
        elif isinstance(value, (list, tuple)):
            config[key] = _homogeneous(key, value)
        elif isinstance(value, (bool, int, float, str)):
            config[key] = value
        else:
            raise TypeError(f"payload value {key!r} of type {type(value).__name__} cannot be sent")
    arrays = {}
    if index:
        config[INDEX] = json.dumps(index)
        arrays[PACKED] = Array(np.frombuffer(b"".join(chunks), dtype=np.uint8))
    return RecordDict({ARRAYS: ArrayRecord(array_dict=arrays), CONFIG: ConfigRecord(config)})


def _homogeneous(key: str, values: list | tuple) -> list:
    """A list Flower can carry: all str, all bool, all int or all float."""
    items = [v.item() if isinstance(v, np.generic) else v for v in values]
    for kind in (str, bool, int, float):
        if all(type(v) is kind for v in items):
            return items
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return [float(v) for v in items]
    raise TypeError(f"payload list {key!r} mixes types; send str, bool, int or float only")


def from_record(record: RecordDict) -> Payload:
    """Decode a ``RecordDict`` made by :func:`to_record` back into a payload (also one
    with an ``Array`` per key, as radfed sent before packing). A record comes from
    the other side: its index is checked like any hostile input.

    Raises
    ------
    ValueError
        An index that does not describe the buffer exactly (names, dtypes, shapes).
    """
    payload: Payload = {}
    config = dict(record[CONFIG].items()) if CONFIG in record else {}
    index = config.pop(INDEX, None)
    if ARRAYS in record:
        arrays = dict(record[ARRAYS].items())
        if index is not None:
            buffer = arrays.pop(PACKED, None)
            payload.update(_unpacked(index, None if buffer is None else buffer.numpy()))
        for key, array in arrays.items():
            payload[key] = array.numpy()
    elif index is not None:
        raise ValueError("a record's array index has no buffer")
    for key, value in config.items():
        if key.startswith(JSON_PREFIX):
            payload[key.removeprefix(JSON_PREFIX)] = json.loads(value)
        else:
            payload[key] = list(value) if isinstance(value, list) else value
    return payload


def _unpacked(index: Any, buffer: np.ndarray | None) -> Payload:
    """The arrays ``index`` ([name, dtype, shape] each, in order) lays out in ``buffer``."""
    try:
        entries = json.loads(index)
    except (TypeError, ValueError) as exc:
        raise ValueError("a record's array index is not JSON") from exc
    if buffer is None or buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError("a record's array buffer is missing or not bytes")
    if not isinstance(entries, list):
        raise ValueError("a record's array index is not a list")
    out: Payload = {}
    offset = 0
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in DTYPES
            and isinstance(entry[2], list)
            and len(entry[2]) <= MAX_NDIM
            and all(type(d) is int and 0 <= d for d in entry[2])
        ):
            raise ValueError("a record's array index has a malformed entry")
        key, dtype, shape = entry[0], np.dtype(entry[1]), tuple(entry[2])
        if key in out:
            raise ValueError(f"a record's array index names {key[:50]!r} twice")
        count = math.prod(shape)
        size = count * dtype.itemsize
        if offset + size > buffer.size:
            raise ValueError("a record's array index overruns its buffer")
        out[key] = buffer[offset : offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != buffer.size:
        raise ValueError("a record's array buffer holds bytes its index does not name")
    return out


def pack(items: list[Payload]) -> Payload:
    """Several payloads as one: item ``i``'s ``key`` travels as ``"i|key"``.

    A coordinator sends a :data:`BATCH` of requests when independent fits share a
    round; the site answers each item as if it had come alone (see :func:`unpack`).
    """
    packed: Payload = {"task": BATCH, "batch_size": len(items)}
    for i, item in enumerate(items):
        packed |= {f"{i}|{key}": value for key, value in item.items()}
    return packed


def unpack(payload: Mapping[str, Any]) -> list[Payload]:
    """The payloads :func:`pack` joined, checked as hostile input.

    Raises
    ------
    ValueError
        A size that is not a whole number in 1..:data:`MAX_BATCH`, a key of no item,
        or an item that is itself a batch.
    """
    size = payload.get("batch_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH:
        raise ValueError(f"a batch must carry 1 to {MAX_BATCH} requests")
    items: list[Payload] = [{} for _ in range(size)]
    for key, value in payload.items():
        if key in ("task", "batch_size"):
            continue
        index, sep, name = key.partition("|")
        if not sep or not index.isdigit() or int(index) >= size:
            raise ValueError(f"batch key {key[:40]!r} belongs to no request")
        items[int(index)][name] = value
    if any(item.get("task") == BATCH for item in items):
        raise ValueError("a batch cannot hold another batch")
    return items


def roundtrip(payload: Mapping[str, Any]) -> Payload:
    """Encode and decode a payload, as a transport does."""
    return from_record(to_record(payload))


def shape_signature(payload: Mapping[str, Any]) -> dict[str, tuple[int, ...] | str]:
    """Describe a payload by shapes and types only (for privacy checks and tests).

    Arrays become their shape; lists of strings their length; scalars their type name.
    """
    sig: dict[str, tuple[int, ...] | str] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            sig[key] = tuple(value.shape)
        elif isinstance(value, list):
            sig[key] = f"list[{len(value)}]"
        else:
            sig[key] = type(value).__name__
    return sig

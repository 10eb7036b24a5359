"""The safetensors header, read and validated without torch or numpy.

Hand-written rather than built on the ``safetensors`` package: that package reads a header only to hand out tensors
(torch or numpy), while inspecting a file must not import either, and its errors are not the one-line messages we
report. Validation is strict (sizes, offsets, dtypes, overlaps, holes): files come from strangers.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from loratools.errors import HeaderError

MAX_HEADER_SIZE = 100_000_000  # the limit the reference library enforces

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# safetensors dtype -> name of the torch dtype attribute
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


def quote_name(text: str) -> str:
    """Quote a name from a file for a one-line message: escape control characters, cut very long names."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return f"'{text[:200]}…'" if len(text) > 200 else f"'{text}'"


class TensorInfo(NamedTuple):
    """One tensor's entry in a header; ``begin``/``end`` are offsets into the data region. (A named tuple:
    thousands are made per file, five times faster than a frozen dataclass.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass
class Header:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_size: int
    data_start: int
    file_size: int


def check_regular_file(path: str) -> int:
    """Return the size of ``path``, or explain why it cannot be read as a file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HeaderError("file not found", path) from None
    except (OSError, ValueError) as e:
        raise HeaderError(f"cannot read file ({_reason(e)})", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise HeaderError("is a directory, not a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise HeaderError("not a regular file", path)
    return st.st_size


def _reason(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).lower()


def _read_prefix(path: str, size: int) -> tuple[int, bytes]:
    if size == 0:
        raise HeaderError("empty file", path)
    if size < 8:
        raise HeaderError(f"file too short for a safetensors header ({size} bytes)", path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):  # what io.pickled recognises
                raise HeaderError("a pickled checkpoint (a torch.save zip archive or a pickle), not safetensors: "
                                  "convert it to .safetensors", path)
            (n,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            if n == 0:
                raise HeaderError("header length is zero", path)
            if n > MAX_HEADER_SIZE:
                raise HeaderError(f"header too large ({n} bytes; the limit is {MAX_HEADER_SIZE})", path)
            if 8 + n > size:
                raise HeaderError(f"header length {n} runs past the end of the file ({size} bytes)", path)
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"cannot read file ({_reason(e)})", path) from None
    if len(raw) != n:
        raise HeaderError("file shrank while its header was read", path)
    return n, raw


def _parse_json(raw: bytes, path: str) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):  # the reference reader keeps the last one silently; we refuse
            seen: set[str] = set()
            duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise HeaderError(f"duplicate key {quote_name(duplicate)} in header", path)
        return obj

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"header is not valid utf-8 (byte {e.start})", path) from None
    # JSON "-0" must not pass as an integer; the hook that catches it costs time, so only when it can occur
    # (a date in the metadata, "2024-05-01", may still call for it)
    parse_int = _parse_int if _MINUS_ZERO.search(text) else None
    try:
        obj = json.loads(text, object_pairs_hook=unique, parse_int=parse_int)
    except json.JSONDecodeError as e:
        raise HeaderError(f"header is not valid json (line {e.lineno}, column {e.colno})", path) from None
    except (ValueError, RecursionError, MemoryError):  # huge integers, deep nesting
        raise HeaderError("header is not valid json", path) from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a json object", path)
    return obj


_MINUS_ZERO = re.compile(r"[\[,:]\s*-0(?![.\deE])")  # an integer -0 (or text that looks like one)


def _parse_int(text: str) -> int | float:
    """JSON ``-0`` is a float to the reference reader, so it must not pass where integers belong."""
    return -0.0 if text == "-0" else int(text)


def _is_text(value: object) -> bool:
    """A str that encodes as UTF-8 (JSON escapes can produce lone surrogates, which cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_metadata(value: object, path: str) -> dict[str, str]:
    if value is None:  # the reference writer's "no metadata"
        return {}
    if not isinstance(value, dict):
        raise HeaderError("__metadata__ is not an object", path)
    for key, item in value.items():
        if not _is_text(key):
            raise HeaderError("__metadata__ has a key that is not valid text", path)
        if not _is_text(item):
            raise HeaderError(f"__metadata__ value for {quote_name(key)} is not a string", path)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_NUMEL_CAP = 2**64


def _short(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else text[:56] + ", …]"


def _numel_capped(shape: list[int], cap: int) -> int:
    """Product of ``shape``, stopping once it exceeds ``cap`` (hostile shapes can be astronomically large)."""
    if 0 in shape:
        return 0
    total = 1
    for dim in shape:
        total *= dim
        if total > cap:
            return cap + 1
    return total


def _parse_tensor(name: str, entry: object, data_size: int, path: str) -> TensorInfo:
    if isinstance(entry, dict) and entry.keys() == _FIELDS:  # the common, valid case, checked cheaply
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        size = DTYPE_SIZES.get(dtype) if isinstance(dtype, str) else None
        if (size and type(shape) is list and type(offsets) is list and len(offsets) == 2
                and all(type(d) is int and 0 <= d < 2**64 for d in shape)
                and type(offsets[0]) is int and type(offsets[1]) is int
                and 0 <= offsets[0] <= offsets[1] <= data_size and (name.isascii() or _is_text(name))):
            numel = _numel_capped(shape, _NUMEL_CAP)
            if numel * size == offsets[1] - offsets[0]:
                return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    return _parse_tensor_slow(name, entry, data_size, path)


_FIELDS = {"dtype", "shape", "data_offsets"}


def _parse_tensor_slow(name: str, entry: object, data_size: int, path: str) -> TensorInfo:
    where = f"tensor {quote_name(name)}"
    if not _is_text(name):
        raise HeaderError("header has a tensor name that is not valid text", path)
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry is not an object", path)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise HeaderError(f"{where}: missing '{field}'", path)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        shown = quote_name(dtype) if isinstance(dtype, str) else "of the wrong type"
        raise HeaderError(f"{where}: unknown dtype {shown}", path)
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**64 for d in shape):
        raise HeaderError(f"{where}: shape is not a list of non-negative integers", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise HeaderError(f"{where}: data_offsets is not a pair of non-negative integers", path)
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{where}: data_offsets begin {begin} is after end {end}", path)
    if end > data_size:
        raise HeaderError(f"{where}: data_offsets end {end} is past the data region ({data_size} bytes)", path)
    numel = _numel_capped(shape, _NUMEL_CAP)
    if numel * DTYPE_SIZES[dtype] != end - begin:
        need = "more than 2**64" if numel > _NUMEL_CAP else str(numel * DTYPE_SIZES[dtype])
        raise HeaderError(f"{where}: data_offsets span {end - begin} bytes but {dtype} {_short(shape)} needs {need}",
                          path)  # fmt: skip
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_coverage(tensors: Iterable[TensorInfo], data_size: int, path: str) -> None:
    """Tensors must tile the data region exactly, as the reference reader requires (no hidden payloads)."""
    cursor, previous = 0, None
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin < cursor:
            raise HeaderError(f"tensors {quote_name(previous.name)} and {quote_name(info.name)} overlap", path)
        if info.begin > cursor:
            raise HeaderError(f"data region has a hole at bytes {cursor}-{info.begin}", path)
        cursor, previous = info.end, info
    if cursor != data_size:
        raise HeaderError(f"data region has {data_size - cursor} trailing bytes after the last tensor", path)


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file, without reading any tensor data.

    Raises:
        HeaderError: for any missing, unreadable or malformed file, with a one-line reason.

    Example:
        >>> header = read_header("lora.safetensors")  # doctest: +SKIP
        >>> header.tensors["lora_unet_x.alpha"].shape  # doctest: +SKIP
        ()
    """
    path = os.fspath(path)
    file_size = check_regular_file(path)
    n, raw = _read_prefix(path, file_size)
    obj = _parse_json(raw, path)
    data_size = file_size - 8 - n
    metadata = _parse_metadata(obj.get("__metadata__"), path)
    tensors = {
        name: _parse_tensor(name, entry, data_size, path) for name, entry in obj.items() if name != "__metadata__"
    }
    _check_coverage(tensors.values(), data_size, path)
    return Header(path, metadata, tensors, n, 8 + n, file_size)

"""Read, validate and write safetensors files without torch.

Hand-written rather than built on the ``safetensors`` package: that package needs torch to save torch tensors, has
no streaming, atomic, one-tensor-at-a-time writer, and its errors are not the one-line messages we report.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from loratools.errors import HeaderError, LoraToolsError

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


# numpy is imported only when tensor values are needed: reading a header must stay fast.
_ARRAY_HELPERS = ("bf16_bits_to_float32", "float32_to_bf16_bits", "numpy_to_bf16_bytes")


def __getattr__(name: str):
    if name in _ARRAY_HELPERS:
        from loratools.io import arrays

        return getattr(arrays, name)
    raise AttributeError(name)


# --- header ----------------------------------------------------------------------------------------------------


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
            (n,) = struct.unpack("<Q", f.read(8))
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


# --- reading tensors -------------------------------------------------------------------------------------------


class SafetensorsFile:
    """A validated safetensors file whose tensors are read on demand from a read-only memory map.

    Example:
        >>> with SafetensorsFile("lora.safetensors") as f:  # doctest: +SKIP
        ...     down = f.numpy("lora_unet_x.lora_down.weight")
    """

    def __init__(self, path: str | os.PathLike, header: Header | None = None):
        """``header``: the file's header as already read and validated (``twin``), else it is read here."""
        self.header = header if header is not None else read_header(path)
        self.path = self.header.path
        self.metadata = self.header.metadata
        self._map: mmap.mmap | None = None
        self._fd: int | None = None

    def twin(self) -> SafetensorsFile:
        """The same file with a descriptor of its own. Two threads streaming different tensors each keep the
        kernel's read-ahead of their own descriptor sequential; on one shared descriptor the two streams
        undo each other's (a cold-cache 6.9 GB bake: 24.9 s against 27.6 s, mean of four)."""
        return SafetensorsFile(self.path, self.header)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise LoraToolsError(f"tensor {quote_name(name)} not found", self.path) from None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            try:
                with open(self.path, "rb") as f:  # the map keeps its own handle
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise HeaderError(f"cannot map file ({_reason(e)})", self.path) from None
            # A file cut short after validation would crash the process (SIGBUS) on access.
            if len(self._map) != self.header.file_size:
                self.close()
                raise HeaderError("file changed after its header was read", self.path)
        return self._map

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as a zero-copy view into the map."""
        info = self.info(name)
        start = self.header.data_start
        return memoryview(self._mapped())[start + info.begin : start + info.end]

    def numpy(self, name: str):
        """The tensor as numpy: a read-only view when numpy has the dtype, float32 for bfloat16 and float8."""
        from loratools.io.arrays import from_bytes

        info = self.info(name)
        return from_bytes(self.raw(name), info.dtype, info.shape)

    def torch(self, name: str, into: bytearray | None = None) -> Any:
        """The tensor as a torch tensor in its own dtype, copied so it outlives the file: into a new buffer, or
        into the front of ``into`` when that is large enough (the tensor then shares its memory)."""
        import torch

        info = self.info(name)
        dtype = getattr(torch, TORCH_DTYPES[info.dtype])
        if info.numel == 0:  # torch.frombuffer refuses empty buffers
            return torch.empty(info.shape, dtype=dtype)
        if into is None or len(into) < info.nbytes:
            buf = self._read(info)
        else:
            buf = memoryview(into)[: info.nbytes]
            _pread_piece(self, self.header.data_start + info.begin, buf)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def read_bytes(self, name: str) -> bytearray:
        """A tensor's stored bytes (little-endian), read without decoding or mapping."""
        return self._read(self.info(name))

    def spans(self, name: str, parts: Sequence[tuple[int, int]]) -> FileSpans:
        """Byte ranges ``[lo, hi)`` of a tensor's stored bytes, for the writer to copy file to file."""
        info = self.info(name)
        start, size = self.header.data_start + info.begin, info.end - info.begin
        for lo, hi in parts:
            if not 0 <= lo <= hi <= size:
                raise ValueError(f"span {lo}-{hi} is outside tensor {name!r} ({size} bytes)")
        return FileSpans(self, tuple([(start + lo, hi - lo) for lo, hi in parts]))

    def fileno(self) -> int:
        """The descriptor reads go through (opened on first use, closed by ``close``)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise HeaderError(f"cannot read file ({_reason(e)})", self.path) from None
        return self._fd

    def _read(self, info: TensorInfo) -> bytearray:
        """A tensor's bytes read with pread, not through the map: streaming a whole file through the map
        would leave every page resident in this process, so peak memory would grow with the file."""
        buf = bytearray(info.nbytes)
        _pread_piece(self, self.header.data_start + info.begin, memoryview(buf))
        return buf

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._map is not None:
            # Arrays returned by numpy()/raw() may still point into the map; then it stays open until they go.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


# --- writing ---------------------------------------------------------------------------------------------------

Data = Any  # bytes | memoryview | np.ndarray | torch.Tensor | FileSpans | FdBytes | Callable[[], one of those]

# Replacing a file syncs the new one to disk before the rename, so that a crash cannot lose both versions;
# a new file is not synced unless asked (like cp and every trainer's save), which keeps writes at copy speed.
SYNC_NEW_FILES = False


class FileSpans:
    """Bytes that lie in an open safetensors file, as ``(offset, length)`` spans: the writer copies them from that
    file (see ``_Output``) instead of decoding them, so renamed tensors are never read into tensors."""

    __slots__ = ("source", "spans", "nbytes")

    def __init__(self, source: SafetensorsFile, spans: tuple[tuple[int, int], ...]):
        self.source, self.spans = source, spans
        self.nbytes = spans[0][1] if len(spans) == 1 else sum([n for _, n in spans])


class FdBytes(NamedTuple):
    """Bytes at ``[offset, offset + nbytes)`` of an open descriptor, typically a memory file a result was computed
    into: the writer sends them with ``os.sendfile``, kernel to kernel. Into this file system's page cache that
    measured 1.7 GB/s, against 0.5-1.0 GB/s for pwrite of the same freshly computed bytes from user memory.
    ``owner`` keeps the descriptor open while the bytes wait to be written."""

    fd: int
    offset: int
    nbytes: int
    owner: Any = None


class ScaledSpans(NamedTuple):
    """Stored floats (``spans`` of a source file, in ``dtype``) that the writer multiplies by ``k``, a power of
    two, on their way to the output: exact and torch-free (``arrays.scale_by_power_of_two``). The writer copies
    them through one reused buffer and scales them there, instead of a producer reading each tensor into a
    new buffer (whose pages each cost a fault)."""

    spans: FileSpans
    dtype: str
    k: float

    @property
    def nbytes(self) -> int:
        return self.spans.nbytes


_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; done once, at import, before any threads


def _plan(items: Iterable[tuple[str, str, Sequence[int], Data]], path: str) -> list[tuple[TensorInfo, Data]]:
    """Check names, dtypes and shapes, and lay the tensors out back to back in the given order."""
    plan, seen, offset = [], set(), 0
    for name, dtype, shape, data in items:
        if not (type(name) is str and name.isascii() or _is_text(name)) or name == "__metadata__" or name in seen:
            raise LoraToolsError(f"cannot write tensor {quote_name(str(name))}: invalid or duplicate name", path)
        size = DTYPE_SIZES.get(dtype)
        if size is None:
            raise LoraToolsError(f"cannot write tensor {quote_name(name)}: unknown dtype {dtype!r}", path)
        shape = tuple(shape)
        numel = 1
        for d in shape:
            if type(d) is not int and not _is_int(d) or d < 0:
                raise LoraToolsError(f"cannot write tensor {quote_name(name)}: invalid shape {list(shape)}", path)
            numel *= d
        end = offset + numel * size
        plan.append((TensorInfo(name, dtype, shape, offset, end), data))
        seen.add(name)
        offset = end
    return plan


def _copies_last(items: Iterable[tuple[str, str, Sequence[int], Data]]) -> list:
    """The items with data given as ``FileSpans`` moved behind the others and put in their source's order, so
    that spans which follow each other in the source are copied in one piece (a rename copies the whole data
    region at once). Everything else keeps its order, so producers are still called in the order given; the
    header lists the names in that order whatever the layout."""
    items = list(items)
    copies = [it for it in items if isinstance(it[3], FileSpans)]
    if not copies:
        return items
    rest = [it for it in items if not isinstance(it[3], FileSpans)]
    order = {id(src): k for k, src in enumerate(dict.fromkeys(it[3].source for it in copies))}
    copies.sort(key=lambda it: (order[id(it[3].source)], it[3].spans[0][0] if it[3].spans else 0))
    return rest + copies


# How copied bytes are placed relative to their source. Measured on ext4 with an 870 MB copy_file_range: the
# kernel copies at all only when both offsets share their place within a page (0.54 s); when they share it
# within 64 KiB and the copy starts at a 64 KiB boundary of the source, it takes 0.41-0.43 s, like cp. So files
# large enough to notice get up to 64 KiB of header padding.
_COPY_UNIT = 64 << 10
_LARGE_FILE = 64 << 20


def _page_offset(plan: list[tuple[TensorInfo, Data]]) -> tuple[int, int, int] | None:
    """(offset in the data region, offset in its source, alignment unit) of the first copied span."""
    size = plan[-1][0].end if plan else 0
    for info, data in plan:
        if isinstance(data, FileSpans) and data.spans:
            return info.begin, data.spans[0][0], _COPY_UNIT if size >= _LARGE_FILE else mmap.PAGESIZE
    return None


def _encode_header(plan: list[tuple[TensorInfo, Data]], metadata: dict[str, str] | None, align: int, path: str,
                   copy_at: tuple[int, int, int] | None, names: list[str]) -> bytes:
    """The header, listing ``names`` in that order (the data may lie in another), padded so that the first
    copied span keeps its place within the alignment unit ``copy_at`` gives."""
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive integer, not {align!r}")
    entries = []
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(_is_text(k) and _is_text(v) for k, v in metadata.items()):
            raise LoraToolsError("metadata must map strings to strings", path)
        entries.append('"__metadata__":' + json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))
    # the same text json.dumps writes for these entries, formatted directly: ~5x faster for thousands of them
    infos = {info.name: info for info, _ in plan}
    for info in (infos[n] for n in names):
        entries.append(f'{_json_text(info.name)}:{{"dtype":"{info.dtype}","shape":[{",".join(map(str, info.shape))}],'
                       f'"data_offsets":[{info.begin},{info.end}]}}')
    body = ("{" + ",".join(entries) + "}").encode("utf-8")
    pad = -(8 + len(body)) % align  # spaces are valid JSON padding
    if copy_at is not None:
        # Pad further so the copied bytes sit at the same place within a page (64 KiB for large files) as in
        # their source: the kernel then copies them file to file (or shares the blocks, where it can)
        at, source, unit = copy_at
        shift = (source - (8 + len(body) + at)) % unit
        if shift % align == pad % align:
            pad = shift
    body += b" " * pad
    if len(body) > MAX_HEADER_SIZE:  # no reader would open the file
        raise LoraToolsError(f"cannot write a header of {len(body)} bytes; the limit is {MAX_HEADER_SIZE}", path)
    return struct.pack("<Q", len(body)) + body


_json_text = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (as ensure_ascii=False)


def _tensor_bytes(info: TensorInfo, data: Data, path: str) -> memoryview | FileSpans | FdBytes:
    """Resolve ``data`` to its raw bytes (or spans of another file, or bytes of a descriptor), without copying
    where it can."""
    if callable(data):
        data = data()
    if isinstance(data, (FileSpans, FdBytes, ScaledSpans)):
        if isinstance(data, ScaledSpans) and (data.dtype != info.dtype or not scales_on_bits(data.dtype, data.k)):
            raise LoraToolsError(f"cannot write tensor {quote_name(info.name)}: cannot scale {data.dtype} by "
                                 f"{data.k} on the bits into {info.dtype}", path)
        if data.nbytes != info.nbytes:
            raise LoraToolsError(f"cannot write tensor {quote_name(info.name)}: got {data.nbytes} bytes, "
                                 f"{info.dtype} {list(info.shape)} needs {info.nbytes}", path)
        return data
    if type(data).__module__.startswith("torch"):  # a torch.Tensor, without importing torch here
        import torch

        data = data.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    is_array = type(data).__module__ == "numpy"
    if is_array:  # safetensors is little-endian
        from loratools.io.arrays import little_endian_bytes

        data = little_endian_bytes(data)
    if not isinstance(data, (bytes, bytearray, memoryview)) and not is_array:
        kind = type(data).__name__
        raise LoraToolsError(f"cannot write tensor {quote_name(info.name)}: unsupported data {kind}", path)
    view = memoryview(data) if is_array else memoryview(data).cast("B")
    if view.nbytes != info.nbytes:
        raise LoraToolsError(
            f"cannot write tensor {quote_name(info.name)}: got {view.nbytes} bytes, "
            f"{info.dtype} {list(info.shape)} needs {info.nbytes}",
            path,
        )
    return view


def scales_on_bits(dtype: str, k: float) -> bool:
    """Whether the writer can scale ``dtype`` floats by ``k`` on their bits, exactly (``ScaledSpans``): ``k``
    a finite power of two and ``dtype`` an IEEE-style float layout (those of ``arrays._FLOAT_BITS``, named here
    so that this module never imports numpy)."""
    return dtype in ("F16", "BF16", "F32") and isinstance(k, (int, float)) and math.frexp(k)[0] == 0.5


def _io(path: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one file-system step; its OSError becomes a one-line error (disk full, no permission…)."""
    try:
        return fn(*args)
    except OSError as e:
        raise LoraToolsError(f"cannot write output ({_reason(e)})", path) from e


def write_safetensors(
    path: str | os.PathLike,
    items: Iterable[tuple[str, str, Sequence[int], Data]],
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
    align: int = 8,
    sync: bool | None = None,
    group_copies: bool = False,
) -> None:
    """Write tensors to a safetensors file one at a time, atomically.

    Args:
        path: destination file.
        items: ``(name, dtype, shape, data)`` in file order; ``data`` is bytes, a numpy array, a torch tensor,
            ``FileSpans``, or a zero-argument callable returning one, called only when that tensor is written.
        metadata: the ``__metadata__`` string map.
        overwrite: replace an existing destination.
        align: the data region starts at a multiple of this many bytes.
        group_copies: lay tensors given as ``FileSpans`` out behind the others, in their source's order (see
            ``_copies_last``); otherwise the data region follows the given order.
        sync: flush the file to disk before it is renamed into place; by default only when it replaces a file
            (``SYNC_NEW_FILES`` extends that to new files). The rename is atomic either way: an interrupted
            write leaves no file at the destination.

    Example:
        >>> write_safetensors("out.safetensors", [("x", "F32", (2,), np.zeros(2, np.float32))])  # doctest: +SKIP
    """
    path = os.fspath(path)
    items = list(items)
    plan = _plan(_copies_last(items) if group_copies else items, path)
    header = _encode_header(plan, metadata, align, path, _page_offset(plan), [it[0] for it in items])
    if os.path.isdir(path):
        raise LoraToolsError("output is a directory", path)
    replacing = os.path.lexists(path)
    if replacing and not overwrite:
        raise LoraToolsError("output exists; pass --overwrite to replace it", path)
    if sync is None:
        sync = replacing or SYNC_NEW_FILES
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _io(path, tempfile.mkstemp, ".tmp", "." + os.path.basename(path) + ".", folder)
    try:
        try:
            _io(path, os.fchmod, fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would surprise users
            _write_data(fd, path, header, plan)
            if sync:
                _io(path, os.fsync, fd)
        finally:
            os.close(fd)
        _io(path, os.replace, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_folder(folder)


def _write_data(fd: int, path: str, header: bytes, plan: list[tuple[TensorInfo, Data]]) -> None:
    """Write the header and every tensor at its planned offset. When some tensors are copied from files and
    others computed, a second thread does the copies meanwhile: the copies spend their time in the kernel and
    the computing in numpy or torch, both without the GIL, so on two cores they overlap. Scaled spans are
    computing: this thread reads, scales and writes them through one reused buffer."""
    base = len(header)
    copies = [(info, data) for info, data in plan if isinstance(data, FileSpans)]
    if not copies or len(copies) == len(plan):
        _write_items(fd, path, base, plan, header)
        return
    computed = [(info, data) for info, data in plan if not isinstance(data, FileSpans)]
    worker = _Worker(_write_items, fd, path, base, copies, b"", False)
    try:
        _write_items(fd, path, base, computed, header, False, worker.check)
    except BaseException:
        worker.stop.set()
        worker.join(reraise=False)
        raise
    worker.join()


def _write_items(fd: int, path: str, base: int, items: list[tuple[TensorInfo, Data]], header: bytes = b"",
                 overlap: bool = True, check: Callable[[], bool] | None = None) -> None:
    """Write ``items`` at ``base`` + their data offsets, in order; stop early when ``check()`` says so.
    ``overlap``: copies through memory read ahead in a thread of their own (not when this already runs beside
    another thread: on two cores a third one measured slower)."""
    out = _Output(fd, path, overlap)
    out.write(header)
    for info, data in items:
        if check is not None and check():
            return
        out.seek(base + info.begin)
        out.write(_tensor_bytes(info, data, path))
    out.flush()


class _Worker:
    """``fn(*args, check)`` in a thread; ``check()`` tells it to stop, ``join()`` re-raises what it raised."""

    def __init__(self, fn: Callable[..., None], *args: Any):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args, self.stop.is_set)
        except BaseException as exc:  # handed to the joining thread
            self.error = exc
            self.stop.set()

    def check(self) -> bool:
        """Raise the worker's error as soon as there is one (the caller then stops too)."""
        if self.error is not None:
            raise self.error
        return False

    def join(self, reraise: bool = True) -> None:
        self.thread.join()
        if reraise and self.error is not None:
            raise self.error


class _Output:
    """Sequential writes to a file descriptor. Small pieces are gathered into one buffer (a LoRA has thousands
    of 4-byte alphas); large ones are written straight from their memory. ``FileSpans`` that continue one
    another in their source are merged, then copied by the kernel (``os.copy_file_range``) where source and
    destination offsets share their place in a page; the others are copied through memory at ``flush``, with
    reads and writes overlapped (see ``_copy_through_memory``). Measured on ext4, an in-kernel copy to a
    misaligned offset is slower than pread + pwrite. ``FdBytes`` are sent by the kernel at once.
    ``ScaledSpans`` are copied through memory too, and scaled on the way. Hand-written
    because no library writes tensors one at a time with in-file copies."""

    GATHER = 64 << 10
    CHUNK = 1 << 20  # measured on an 870 MB copy: 1-4 MiB pieces 0.74-0.86 s, 16 MiB 1.05-1.6 s (cache misses)
    BUFFERS = 4
    KERNEL_ALIGN = mmap.PAGESIZE

    def __init__(self, fd: int, path: str, overlap: bool = True):
        self.fd, self.path, self.offset, self.pending, self.overlap = fd, path, 0, bytearray(), overlap
        self.span: list | None = None  # [source, start, length] waiting to be copied
        # (source, start, length, at, scale): ranges to copy through memory, scaled on the way when ``scale`` is
        # (dtype, power of two)
        self.through_memory: list[tuple[SafetensorsFile, int, int, int, tuple[str, float] | None]] = []

    def write(self, data: memoryview | bytes | FileSpans | FdBytes | ScaledSpans) -> None:
        if isinstance(data, ScaledSpans):
            self._flush_span()
            self._flush_bytes()
            size = DTYPE_SIZES[data.dtype]
            for start, n in data.spans.spans:
                if n % size:
                    raise LoraToolsError(f"cannot scale {data.dtype} values: a span is not whole values", self.path)
                self.through_memory.append((data.spans.source, start, n, self.offset, (data.dtype, data.k)))
                self.offset += n
            return
        if isinstance(data, FdBytes):
            self._flush_span()
            self._flush_bytes()
            self._send(data)
            return
        if isinstance(data, FileSpans):
            self._flush_bytes()
            for start, n in data.spans:
                span = self.span
                if span is not None and span[0] is data.source and span[1] + span[2] == start:
                    span[2] += n
                else:
                    self._flush_span()
                    self.span = [data.source, start, n]
            return
        self._flush_span()
        view = memoryview(data).cast("B")
        if view.nbytes < self.GATHER:
            self.pending += view
            if len(self.pending) >= self.GATHER:
                self._flush_bytes()
        else:
            self._flush_bytes()
            self._write(view)

    def seek(self, offset: int) -> None:
        """Continue writing at ``offset`` (what is waiting is written first unless ``offset`` continues it)."""
        end = self.offset + len(self.pending) + (self.span[2] if self.span is not None else 0)
        if offset != end:
            self._flush_span()
            self._flush_bytes()
            self.offset = offset

    def flush(self) -> None:
        self._flush_span()
        self._flush_bytes()
        copies, self.through_memory = self.through_memory, []
        _copy_through_memory(copies, self.fd, self.path, self.CHUNK, self.BUFFERS if self.overlap else 1)

    def _flush_bytes(self) -> None:
        if self.pending:
            self._write(memoryview(self.pending))
            self.pending = bytearray()

    def _write(self, view: memoryview) -> None:
        _pwrite_all(self.fd, view, self.offset, self.path)
        self.offset += len(view)

    def _send(self, data: FdBytes) -> None:
        done = 0
        with _SEND_LOCK:  # sendfile writes at the descriptor's file position, which all threads share
            _io(self.path, os.lseek, self.fd, self.offset, os.SEEK_SET)
            while done < data.nbytes:
                try:
                    k = os.sendfile(self.fd, data.fd, data.offset + done, data.nbytes - done)
                except OSError as e:
                    if e.errno not in _NO_KERNEL_COPY:
                        raise LoraToolsError(f"cannot write output ({_reason(e)})", self.path) from e
                    break  # refused between these descriptors (a sandbox, another system): through memory
                if k <= 0:
                    raise LoraToolsError("cannot write output (the data to send ended early)", self.path)
                done += k
        while done < data.nbytes:
            piece = _io(self.path, os.pread, data.fd, min(self.CHUNK, data.nbytes - done), data.offset + done)
            if not piece:
                raise LoraToolsError("cannot write output (the data to send ended early)", self.path)
            _pwrite_all(self.fd, memoryview(piece), self.offset + done, self.path)
            done += len(piece)
        self.offset += data.nbytes

    def _flush_span(self) -> None:
        if self.span is None:
            return
        source, start, n = self.span
        self.span = None
        src, end = source.fileno(), start + n
        if _copy_file_range is not None and (start - self.offset) % self.KERNEL_ALIGN == 0:
            # a large copy goes faster from a 64 KiB boundary of the source on: copy the head up to it first
            head = (-start) % _COPY_UNIT if n >= 2 * _COPY_UNIT else 0
            while start < end:
                k = self._kernel_copy(src, start, head or end - start)
                head = 0
                if k is None:  # not between these files: through memory after all
                    break
                if k <= 0:
                    raise HeaderError("file changed after its header was read", source.path)
                start += k
                self.offset += k
        if start < end:
            self.through_memory.append((source, start, end - start, self.offset, None))
            self.offset += end - start

    def _kernel_copy(self, src: int, start: int, n: int) -> int | None:
        try:
            return _copy_file_range(src, self.fd, n, start, self.offset)
        except OSError as e:
            if e.errno in _NO_KERNEL_COPY:  # not across these file systems, or not supported
                return None
            raise LoraToolsError(f"cannot write output ({_reason(e)})", self.path) from e


def _pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        done += _io(path, os.pwrite, fd, view[done:], offset + done)


def _copy_through_memory(copies: list[tuple[SafetensorsFile, int, int, int, tuple[str, float] | None]], fd: int,
                         path: str, chunk: int, buffers: int) -> None:
    """Copy ``(source, start, length, at, scale)`` ranges into ``fd`` through a few reused buffers, multiplying
    the floats of those with a ``scale`` (dtype, power of two) on the way: a reader thread preads (and scales)
    the next pieces while this thread pwrites the last ones (both without the GIL), which measured about 30%
    faster than alternating the two on one thread."""
    pieces = [(source, start + k, min(chunk, n - k), at + k, scale)
              for source, start, n, at, scale in copies for k in range(0, n, chunk)]
    if not pieces:
        return
    if any(scale for *_, scale in pieces):
        from loratools.io.arrays import scale_by_power_of_two
    if len(pieces) == 1 or buffers == 1:  # read, write, read, ...
        buf = memoryview(bytearray(max(n for _, _, n, _, _ in pieces)))
        for source, start, n, at, scale in pieces:
            view = buf[: _pread_piece(source, start, buf[:n])]
            if scale:
                scale_by_power_of_two(view, *scale)
            _pwrite_all(fd, view, at, path)
        return
    import queue

    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(min(buffers, len(pieces))):
        free.put(memoryview(bytearray(chunk)))

    def read() -> None:
        try:
            for source, start, n, at, scale in pieces:
                buf = free.get()
                if buf is None:  # the writer stopped
                    return
                n = _pread_piece(source, start, buf[:n])
                if scale:
                    scale_by_power_of_two(buf[:n], *scale)
                full.put((buf, n, at))
        except BaseException as exc:  # handed to the writer, which raises it
            full.put(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in pieces:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n, at = item
            _pwrite_all(fd, buf[:n], at, path)
            free.put(buf)
    finally:
        free.put(None)
        reader.join()


def _pread_piece(source: SafetensorsFile, start: int, view: memoryview) -> int:
    """Fill ``view`` from ``source`` at ``start``; a source shorter than its header said is an error."""
    done = 0
    while done < len(view):
        try:
            k = os.preadv(source.fileno(), [view[done:]], start + done)
        except OSError as e:
            raise HeaderError(f"cannot read file ({_reason(e)})", source.path) from None
        if k <= 0:
            raise HeaderError("file changed after its header was read", source.path)
        done += k
    return done


_SEND_LOCK = threading.Lock()
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux only


def _fsync_folder(folder: str) -> None:
    """Make the rename durable; best effort, as some systems cannot open a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dtype_name(torch_dtype) -> str:
    """The safetensors dtype name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    attr = str(torch_dtype).removeprefix("torch.")
    for name, torch_attr in TORCH_DTYPES.items():
        if torch_attr == attr:
            return name
    raise ValueError(f"no safetensors dtype for {torch_dtype}")

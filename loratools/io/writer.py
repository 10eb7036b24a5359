"""Writing safetensors files one tensor at a time, atomically (see ``atomic``).

Hand-written because the ``safetensors`` package saves a dict of tensors held in memory at once (and needs torch
to save torch tensors); here each tensor is produced only when it is written, and tensors that are stored bytes of
another file are copied file to file (``spans``), so memory stays at about one tensor whatever the file's size.
Files up to 32 MiB (most LoRAs) are assembled in memory and written at once instead (``_assemble``): their
hundreds of small tensors then cost one read per run of stored bytes and one NaN/Inf test per dtype, not one each.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Iterable, Sequence

from loratools.errors import LoraToolsError
from loratools.io.atomic import atomic_file
from loratools.io.reader import DTYPE_SIZES, MAX_HEADER_SIZE, TensorInfo, _is_int, _is_text, quote_name
from loratools.io.spans import CHUNK, FileSpans, copy_range, pread_into, pwrite_all, read_pieces

Data = Any  # bytes | memoryview | np.ndarray | torch.Tensor | FileSpans | a zero-argument callable giving one

# Copied bytes keep their place relative to a 64 KiB boundary of their source in large files: the kernel then
# copies them at cp's speed (benchmarks/RESULTS.md, convert); small files only need the same place in a page.
_COPY_UNIT = 64 << 10
_LARGE_FILE = 64 << 20
_GATHER = 64 << 10  # pieces smaller than this are gathered into one write (a LoRA has thousands of 4-byte alphas)
_WHOLE = 32 << 20  # files up to this size are assembled in memory and written at once (``_assemble``)


class NonFinite(LoraToolsError):
    """A tensor being written holds NaN or Inf (``write_safetensors(finite=True)``); the file is not published."""

    def __init__(self, tensor: str, path: str):
        super().__init__(f"tensor {quote_name(tensor)} holds NaN or Inf", path)
        self.tensor = tensor


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
            if not _is_int(d) or d < 0:
                raise LoraToolsError(f"cannot write tensor {quote_name(name)}: invalid shape {list(shape)}", path)
            numel *= d
        end = offset + numel * size
        plan.append((TensorInfo(name, dtype, shape, offset, end), data))
        seen.add(name)
        offset = end
    return plan


def _copies_last(items: list) -> list:
    """Items given as ``FileSpans`` moved behind the others, in their source's order, so that spans which follow
    each other in the source are copied in one piece (a rename copies the whole data region at once). The others
    keep their order, so producers are called in the order given; the header lists names in the given order."""
    copies = [it for it in items if isinstance(it[3], FileSpans)]
    if not copies:
        return items
    rest = [it for it in items if not isinstance(it[3], FileSpans)]
    order = {id(src): k for k, src in enumerate(dict.fromkeys(it[3].source for it in copies))}
    copies.sort(key=lambda it: (order[id(it[3].source)], it[3].spans[0][0] if it[3].spans else 0))
    return rest + copies


def _copy_at(plan: list[tuple[TensorInfo, Data]]) -> tuple[int, int, int] | None:
    """(offset in the data region, offset in its source, alignment unit) of the first copied span."""
    size = plan[-1][0].end if plan else 0
    for info, data in plan:
        if isinstance(data, FileSpans) and data.spans:
            return info.begin, data.spans[0][0], _COPY_UNIT if size >= _LARGE_FILE else mmap.PAGESIZE
    return None


_json_text = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (as ensure_ascii=False)


def _encode_header(plan: list[tuple[TensorInfo, Data]], metadata: dict[str, str] | None, path: str,
                   names: list[str]) -> bytes:
    """The header, listing ``names`` in that order (the data may lie in another), padded (spaces are valid JSON)
    to a multiple of 8 and so that the first copied span keeps its place within the alignment unit."""
    entries = []
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(_is_text(k) and _is_text(v) for k, v in metadata.items()):
            raise LoraToolsError("metadata must map strings to strings", path)
        entries.append('"__metadata__":' + json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))
    # the same text json.dumps writes for these entries, formatted directly (thousands of them)
    infos = {info.name: info for info, _ in plan}
    for info in (infos[n] for n in names):
        entries.append(f'{_json_text(info.name)}:{{"dtype":"{info.dtype}","shape":[{",".join(map(str, info.shape))}],'
                       f'"data_offsets":[{info.begin},{info.end}]}}')
    body = ("{" + ",".join(entries) + "}").encode("utf-8")
    pad = -(8 + len(body)) % 8
    copy_at = _copy_at(plan)
    if copy_at is not None:
        at, source, unit = copy_at
        shift = (source - (8 + len(body) + at)) % unit
        if shift % 8 == pad:
            pad = shift
    body += b" " * pad
    if len(body) > MAX_HEADER_SIZE:  # no reader would open the file
        raise LoraToolsError(f"cannot write a header of {len(body)} bytes; the limit is {MAX_HEADER_SIZE}", path)
    return struct.pack("<Q", len(body)) + body


def _tensor_bytes(info: TensorInfo, data: Data, path: str) -> memoryview | FileSpans:
    """Resolve ``data`` to its raw little-endian bytes (or spans of another file), without copying where it can."""
    if callable(data):
        data = data()
    if isinstance(data, FileSpans):
        n = data.nbytes
    else:
        if type(data).__module__.startswith("torch"):  # a torch.Tensor, without importing torch here
            import torch

            data = data.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if type(data).__module__ == "numpy":
            from loratools.io.arrays import little_endian_bytes

            data = little_endian_bytes(data)
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            kind = type(data).__name__
            raise LoraToolsError(f"cannot write tensor {quote_name(info.name)}: unsupported data {kind}", path)
        data = memoryview(data).cast("B")
        n = data.nbytes
    if n != info.nbytes:
        raise LoraToolsError(f"cannot write tensor {quote_name(info.name)}: got {n} bytes, {info.dtype} "
                             f"{list(info.shape)} needs {info.nbytes}", path)
    return data


class _Output:
    """Writes at increasing offsets of a descriptor: small pieces gathered, spans that continue one another in
    their source merged into one copy."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path, self.offset = fd, path, 0
        self.pending = bytearray()
        self.span: list | None = None  # [source, start, length] waiting to be copied
        self.buf = bytearray(CHUNK)  # reused by every copy through memory

    def write(self, data: memoryview | FileSpans) -> None:
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
        if data.nbytes < _GATHER:
            self.pending += data
            if len(self.pending) >= _GATHER:
                self._flush_bytes()
        else:
            self._flush_bytes()
            pwrite_all(self.fd, data, self.offset, self.path)
            self.offset += data.nbytes

    def seek(self, offset: int) -> None:
        """Continue at ``offset`` (what is waiting is written first unless ``offset`` continues it)."""
        if offset != self.offset + len(self.pending) + (self.span[2] if self.span is not None else 0):
            self.flush()
            self.offset = offset

    def flush(self) -> None:
        self._flush_span()
        self._flush_bytes()

    def _flush_bytes(self) -> None:
        if self.pending:
            pwrite_all(self.fd, memoryview(self.pending), self.offset, self.path)
            self.offset += len(self.pending)
            self.pending = bytearray()

    def _flush_span(self) -> None:
        if self.span is not None:
            source, start, n = self.span
            self.span = None
            copy_range(source, start, n, self.fd, self.offset, self.path, self.buf)
            self.offset += n


def _write_tested(out: _Output, info: TensorInfo, data: memoryview | FileSpans, buf: bytearray, path: str) -> None:
    """Write a tensor whose bytes hold no NaN or Inf (else raise ``NonFinite``): bytes in memory are tested as they
    are, spans are read through ``buf`` and tested and written one piece at a time."""
    from loratools.io.arrays import all_finite

    for piece in read_pieces(data, buf) if isinstance(data, FileSpans) else (data,):
        if not all_finite(piece, info.dtype):
            raise NonFinite(info.name, path)
        out.write(piece)


def _assemble(plan: list[tuple[TensorInfo, Data]], header: bytes, finite: bool, path: str) -> bytearray:
    """A small file's bytes, assembled in memory: spans read straight into their place (spans that follow each
    other in their source and in the file in one read), and the NaN/Inf test done once per run of tensors of one
    dtype, not once per tensor (a LoRA of a few MB has hundreds of tensors of a few kB each)."""
    from loratools.io.arrays import all_finite

    base = len(header)
    whole = bytearray(base + (plan[-1][0].end if plan else 0))
    whole[:base] = header
    view = memoryview(whole)
    reads: list[list] = []  # [source, start in it, place in the file, length]; a span that continues one extends it
    for info, data in plan:
        data = _tensor_bytes(info, data, path)
        at = base + info.begin
        if not isinstance(data, FileSpans):
            view[at : at + data.nbytes] = data
            continue
        for start, n in data.spans:
            last = reads[-1] if reads else None
            if last and last[0] is data.source and last[1] + last[3] == start and last[2] + last[3] == at:
                last[3] += n
            else:
                reads.append([data.source, start, at, n])
            at += n
    for source, start, at, n in reads:
        pread_into(source, start, view[at : at + n])
    if finite:
        runs: list[list] = []  # [dtype, begin, end, first tensor index]
        for k, (info, _) in enumerate(plan):
            if runs and runs[-1][0] == info.dtype and runs[-1][2] == info.begin:
                runs[-1][2] = info.end
            else:
                runs.append([info.dtype, info.begin, info.end, k])
        for dtype, begin, end, first in runs:
            if not all_finite(view[base + begin : base + end], dtype):
                bad = next(info for info, _ in plan[first:]
                           if not all_finite(view[base + info.begin : base + info.end], info.dtype))
                raise NonFinite(bad.name, path)
    return whole


def write_safetensors(path: str | os.PathLike, items: Iterable[tuple[str, str, Sequence[int], Data]],
                      metadata: dict[str, str] | None = None, *, overwrite: bool = False, sync: bool = False,
                      group_copies: bool = False, finite: bool = False) -> None:
    """Write tensors to a safetensors file one at a time, atomically.

    Args:
        path: destination file.
        items: ``(name, dtype, shape, data)``; ``data`` is bytes, a numpy array, a torch tensor, ``FileSpans``, or a
            zero-argument callable returning one, called only when that tensor is written.
        metadata: the ``__metadata__`` string map.
        overwrite: replace an existing destination (otherwise an error, also when one appears while writing).
        sync: flush the file to disk before it gets its name (always done when it replaces a file).
        group_copies: lay tensors given as ``FileSpans`` out behind the others, in their source's order.
        finite: refuse NaN and Inf (``NonFinite``, and nothing is published), testing each tensor's bytes on their
            way out: ``FileSpans`` are then read and written, not copied by the kernel (the test reads them
            anyway; benchmarks/RESULTS.md, before / after).

    Example:
        >>> write_safetensors("out.safetensors", [("x", "F32", (2,), np.zeros(2, np.float32))])  # doctest: +SKIP
    """
    path = os.fspath(path)
    items = list(items)
    plan = _plan(_copies_last(items) if group_copies else items, path)
    header = _encode_header(plan, metadata, path, [it[0] for it in items])
    with atomic_file(path, overwrite=overwrite, sync=sync) as fd:
        if len(header) + (plan[-1][0].end if plan else 0) <= _WHOLE:
            pwrite_all(fd, memoryview(_assemble(plan, header, finite, path)), 0, path)
            return
        out = _Output(fd, path)
        out.write(memoryview(header))
        base = len(header)
        tested = bytearray(CHUNK) if finite else None  # its own: out.buf serves the copies
        for info, data in plan:
            out.seek(base + info.begin)
            if tested is None:
                out.write(_tensor_bytes(info, data, path))
            else:
                _write_tested(out, info, _tensor_bytes(info, data, path), tested, path)
        out.flush()

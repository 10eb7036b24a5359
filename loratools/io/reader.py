"""Reading the tensors of a validated safetensors file without torch (see ``header`` for the validation).

The names of ``header`` are importable from here too, as they were before the two were split.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any, Sequence

from loratools.errors import HeaderError, LoraToolsError
from loratools.io.header import (  # noqa: F401  (re-exported)
    DTYPE_SIZES, MAX_HEADER_SIZE, TORCH_DTYPES, Header, TensorInfo, _is_int, _is_text, _reason, check_regular_file,
    quote_name, read_header)
from loratools.io.spans import FileSpans, pread_into


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
        """The same file with a descriptor of its own: two threads streaming different tensors each keep the
        kernel's read-ahead of their own descriptor sequential (see benchmarks/RESULTS.md, bake)."""
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
            pread_into(self, self.header.data_start + info.begin, buf)
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
        pread_into(self, self.header.data_start + info.begin, memoryview(buf))
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


def dtype_name(torch_dtype) -> str:
    """The safetensors dtype name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    attr = str(torch_dtype).removeprefix("torch.")
    for name, torch_attr in TORCH_DTYPES.items():
        if torch_attr == attr:
            return name
    raise ValueError(f"no safetensors dtype for {torch_dtype}")

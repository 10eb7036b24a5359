"""Pickled checkpoints (.ckpt/.pt/.pth/.bin), loaded only on request and only with torch's weights-only unpickler.

Unpickling can run arbitrary code, and LoRAs come from strangers: without explicit permission we refuse, and with it
we use ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from loratools.errors import HeaderError, LoraToolsError, UnsafeFileError
from loratools.io.header import TORCH_DTYPES, TensorInfo, check_regular_file, quote_name

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})

REFUSED = (
    "pickled checkpoint: loading it could run arbitrary code; pass --allow-pickle to load it with "
    "torch.load(weights_only=True), or convert it to .safetensors"
)


def is_pickle_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a suffix that pickled torch checkpoints use."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def looks_pickled(path: str | os.PathLike) -> bool:
    """Whether a file is a pickle by its suffix or its first bytes (a zip archive or a pickle protocol mark)."""
    if is_pickle_path(path):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if head[8:9] == b"{":  # a safetensors header (its 8-byte length may start with any bytes)
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


class TensorDictSource:
    """Tensors already in memory (from a pickled checkpoint), read through the same interface as SafetensorsFile."""

    def __init__(self, path: str, tensors: dict[str, Any], skipped: list[str] | None = None):
        self.path = path
        self.metadata: dict[str, str] = {}
        self.skipped = list(skipped or [])  # names of entries that were not tensors of a known dtype
        self._tensors = tensors

    def __enter__(self) -> TensorDictSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def torch(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise LoraToolsError(f"tensor {quote_name(name)} not found", self.path) from None

    def info(self, name: str) -> TensorInfo:
        tensor = self.torch(name)
        return TensorInfo(name, _dtype_names()[tensor.dtype], tuple(tensor.shape), 0, 0)

    def raw(self, name: str) -> memoryview:
        """Little-endian bytes of the tensor, as a safetensors file would hold them."""
        import torch

        flat = self.torch(name).detach().contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy())

    def numpy(self, name: str):
        """A read-only array; bfloat16 and float8 become float32, as SafetensorsFile.numpy does."""
        import torch

        tensor = self.torch(name).detach()
        if self.info(name).dtype in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
            tensor = tensor.to(torch.float32)
        array = tensor.numpy().view()
        array.flags.writeable = False
        return array

    def close(self) -> None:
        self._tensors = {}


@functools.cache
def _dtype_names() -> dict[Any, str]:
    """torch dtype -> safetensors dtype name, for the dtypes this torch has."""
    import torch

    return {getattr(torch, attr): name for name, attr in TORCH_DTYPES.items() if hasattr(torch, attr)}


def _load_error(error: Exception, path: str) -> LoraToolsError:
    """Tell a pickle the weights-only unpickler refused (it may ask for code) from a damaged file."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"needs '{found.group(1)}', which" if found else "is damaged or uses pickle features"
        return UnsafeFileError(f"pickled checkpoint {what} weights-only loading refuses", path)
    return HeaderError(f"cannot read pickled checkpoint: damaged or not a torch file ({type(error).__name__})", path)


def load_pickled(path: str | os.PathLike, allow_pickle: bool) -> TensorDictSource:
    """Load the tensors of a pickled checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        UnsafeFileError: without ``allow_pickle``, or when the pickle asks for anything but tensors and containers.
        HeaderError: for a missing, truncated or otherwise unreadable file.
    """
    path = os.fspath(path)
    if not allow_pickle:
        raise UnsafeFileError(REFUSED, path)
    if check_regular_file(path) == 0:
        raise HeaderError("empty file", path)
    import torch

    try:
        with open(path, "rb") as f:  # zip checkpoints can be memory-mapped, the legacy format cannot
            zipped = f.read(4) == b"PK\x03\x04"
        with warnings.catch_warnings():  # torch's advice on pickle protocols is noise here; failures are reported
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch reports damaged files with many types (RuntimeError, EOFError, KeyError…)
        raise _load_error(e, path) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning and older trainers wrap the weights
    if not isinstance(loaded, dict):
        raise HeaderError("pickled checkpoint is not a dict of tensors", path)
    tensors, skipped = {}, []
    for key, value in loaded.items():
        dense = isinstance(value, torch.Tensor) and value.layout == torch.strided  # sparse ones have no flat bytes
        if isinstance(key, str) and dense and value.dtype in _dtype_names():
            tensors[key] = value
        else:
            skipped.append(str(key))
    return TensorDictSource(path, tensors, skipped)

"""The canonical in-memory LoRA: every adapted base weight is one :class:`Module`; a LoRA planned for writing in
some naming is a list of :class:`OutModule`.

Formats are codecs at the edge (read -> canonical -> write); operations work on this model only.
Tensors stay in their file (a :class:`TensorRef` into the source) until an operation needs them.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from loratools.io.reader import DTYPE_SIZES

if TYPE_CHECKING:  # pragma: no cover
    from loratools.adapters.base import Adapter
    from loratools.families import FamilyResult
    from loratools.families.naming import Part


class TensorRef(NamedTuple):
    """A lazy handle to one tensor of a source (a safetensors file or a loaded pickle)."""

    source: Any
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def numpy(self):
        return self.source.numpy(self.key)

    def torch(self):
        return self.source.torch(self.key)

    def scalar(self) -> float:
        """The value of a 0-d or one-element tensor (kohya `.alpha`), read without torch or numpy."""
        fmt = _SCALAR_FORMATS.get(self.dtype)
        # pread, not the memory map: a mapped page of a file the kernel caches in large folios brings the
        # whole folio into this process's resident set, hundreds of MB for a file's alphas
        read = getattr(self.source, "read_bytes", None)
        if fmt is not None and read is not None and 1 <= self.numel <= 64:
            data = bytes(read(self.key)[: struct.calcsize(fmt)])
            if self.dtype == "BF16":  # the top half of a float32
                return struct.unpack("<f", b"\0\0" + data)[0]
            return float(struct.unpack(fmt, data)[0])
        return float(self.numpy().reshape(-1)[0])


_SCALAR_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d", "BF16": "<2s", "I64": "<q", "I32": "<i", "I16": "<h",
                   "I8": "<b", "U8": "<B", "BOOL": "<?"}


@dataclass
class Module:
    """One adapted base weight.

    ``name`` is the module path as the file spells it, with the format's prefix removed (dotted, or
    kohya-flattened when the file is kohya: flattening cannot be undone without a family table).
    ``target``/``part`` name the base weight in the family's original naming (and the row slice of a fused
    weight) once a family table has resolved it.
    """

    name: str
    component: str
    adapter: Adapter
    alpha: float | None = None
    magnitude: TensorRef | None = None  # DoRA: `dora_scale` / `lora_magnitude_vector`
    rslora: bool = False
    keys: list[str] = field(default_factory=list)
    target: str | None = None
    part: Part | None = None
    alpha_ref: TensorRef | None = None  # the stored tensor ``alpha`` was read from (so it holds that value)
    halves_swapped: bool = False  # B's row halves in the order of a naming that trades them against the target's

    @property
    def rank(self) -> int | None:
        return self.adapter.rank

    @property
    def scale(self) -> float:
        """The factor ΔW is multiplied by (alpha rules per adapter type; user strength excluded)."""
        return self.adapter.scale(self.alpha, self.rslora)

    @property
    def type(self) -> str:
        return self.adapter.kind

    def delta(self, base=None, strength: float = 1.0):
        """Dense ΔW of this module at ``strength``, scale included (float32 torch)."""
        a = self.adapter
        d = a.delta(base=base, alpha=self.alpha, strength=strength)
        if d is None or a.strength_inside:
            return d
        return d * (self.scale * strength)

    @property
    def dora_axis(self) -> str | None:
        """'row' (one norm per output row) or 'column' (one per input column), from the magnitude's shape."""
        if self.magnitude is None:
            return None
        shape = self.magnitude.shape
        if len(shape) == 1 or (len(shape) >= 2 and shape[1] == 1 and shape[0] != 1):
            return "row"
        return "column"


@dataclass
class Lora:
    """A LoRA file in canonical form."""

    path: str
    format: str
    modules: list[Module]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    extras: dict[str, list[str]] = field(default_factory=dict)  # embeddings and other non-adapter tensors
    warnings: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # the file contradicts itself (e.g. config vs tensors)
    rejected: list[str] = field(default_factory=list)  # modules whose tensors do not fit together, with why
    family: FamilyResult | None = None
    tensors: dict[str, TensorRef] = field(default_factory=dict)  # every tensor of the source, by key
    size_bytes: int = 0
    source: Any = None
    config: dict | None = None  # PEFT adapter_config / diffusers lora_adapter_metadata, when present

    def components(self) -> Counter:
        return Counter(m.component for m in self.modules)

    def adapter_types(self) -> Counter:
        types = Counter(m.type for m in self.modules)
        dora = sum(1 for m in self.modules if m.magnitude is not None)
        if dora:
            types["dora"] = dora
        return types

    def close(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()

    def __enter__(self) -> Lora:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Rows(NamedTuple):
    """Rows [lo, hi) of a stored tensor (along its first dim), the two halves optionally swapped.

    Renames and splits only move rows, so they are written as the stored bytes: no decoding, no torch.
    """

    ref: TensorRef
    lo: int
    hi: int
    swap: bool = False

    def _byte_span(self) -> tuple[int, int, int]:
        """(first byte, last byte, bytes in the first half) of the rows within the stored tensor."""
        ref = self.ref
        row = ref.numel * DTYPE_SIZES[ref.dtype] // ref.shape[0] if ref.shape and ref.shape[0] else 0
        return self.lo * row, self.hi * row, (self.hi - self.lo) // 2 * row

    def spans(self):
        """The rows as spans of their source file (the writer copies those file to file), or None when the
        source is not a file."""
        spans = getattr(self.ref.source, "spans", None)
        if spans is None:
            return None
        lo, hi, half = self._byte_span()
        parts = [(lo + half, hi), (lo, lo + half)] if self.swap else [(lo, hi)]
        return spans(self.ref.key, parts)

    def scaled(self, k: float):
        """The rows times ``k``, in their stored dtype (one rounding; exact and torch-free for powers of two)."""
        from loratools.io.arrays import scale_by_power_of_two

        data = self.read()
        if not isinstance(data, bytearray):  # a slice of the stored tensor: a copy we may change
            data = bytearray(data)
        if data and not scale_by_power_of_two(data, self.ref.dtype, k):
            import torch

            from loratools.io.reader import TORCH_DTYPES

            t = torch.frombuffer(data, dtype=getattr(torch, TORCH_DTYPES[self.ref.dtype]))
            t.copy_(t.double() * k)  # float64, so that the only rounding is the final one
        return data

    def read(self) -> bytes:
        ref = self.ref
        reader = getattr(ref.source, "read_bytes", None)
        if reader is not None:
            data = reader(ref.key)
        else:  # an in-memory source
            import torch

            data = ref.torch().contiguous().view(torch.uint8).numpy().tobytes()
        lo, hi, half = self._byte_span()
        if lo == 0 and hi == len(data) and not self.swap:
            return data  # the whole tensor: no copy
        piece = bytes(memoryview(data)[lo:hi])
        return piece[half:] + piece[:half] if self.swap else piece


@dataclass
class OutModule:
    """One LoRA module to write: factors computed on demand (float32 torch), ΔW = scale · up @ down."""

    space: str
    native: str
    name: str  # dotted module path in the target naming
    factors: Callable[[], tuple]  # -> (up, down, mid or None)
    rank: int
    scale: float
    dtype: str
    magnitude: Callable | None = None  # DoRA magnitude, row-wise [out] or column-wise [1, in]
    dora_axis: str | None = None
    bias: Callable | None = None  # absolute bias delta [out]
    sources: list[str] = field(default_factory=list)
    shapes: tuple | None = None  # (up, down, mid or None) shapes, known before any tensor is read
    raw: tuple | None = None  # (up, down, mid) as Rows when the factors are stored rows, unchanged
    alpha_ref: TensorRef | None = None  # a stored tensor holding exactly scale * rank, to copy as it is


class MemorySource:
    """Tensors computed in memory (by resize, merge, convert), readable like a file source."""

    path = "<memory>"
    metadata: dict = {}

    def __init__(self):
        self._tensors: dict = {}

    def add(self, key: str, tensor) -> TensorRef:
        """Keep ``tensor`` (torch) under ``key`` and return a TensorRef to it."""
        from loratools.io.reader import dtype_name

        t = tensor.detach().contiguous()
        self._tensors[key] = t
        return TensorRef(self, key, dtype_name(t.dtype), tuple(t.shape))

    def keys(self):
        return list(self._tensors)

    def torch(self, key: str):
        return self._tensors[key]

    def numpy(self, key: str):
        t = self._tensors[key]
        return t.float().numpy() if t.dtype.is_floating_point and t.dtype.itemsize < 4 else t.numpy()

    def close(self) -> None:
        pass


def memory_ref(tensor, key: str = "t") -> TensorRef:
    """A TensorRef to a torch tensor that lives in memory."""
    return MemorySource().add(key, tensor)

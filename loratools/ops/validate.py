"""What every writing operation checks before it writes: a file that agrees with itself, modules whose factors fit
together, and finite numbers (a NaN or Inf in a factor or an alpha would spread through every output tensor)."""

from __future__ import annotations

import math

from loratools.errors import FormatError
from loratools.io.spans import pread_into
from loratools.model import Lora, Module

FLOAT32_MAX = 3.4028234663852886e38  # alphas are written as float32 scalars


class _Bits:
    """Reads stored tensors with pread into one reused buffer: mapping them instead would bring every page of the
    file into this process's resident memory (the writers copy those bytes file to file and never read them)."""

    def __init__(self):
        self.buf = bytearray()

    def finite(self, ref) -> bool:
        import numpy as np  # here, not at import: a conversion that leaves the test to the writer needs none

        from loratools.io.arrays import all_finite

        src = ref.source
        header = getattr(src, "header", None)
        if header is None or not hasattr(src, "fileno"):  # a loaded pickle, tensors in memory
            values = ref.numpy()
            return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
        info = header.tensors[ref.key]
        if len(self.buf) < info.nbytes:
            self.buf = bytearray(info.nbytes)
        view = memoryview(self.buf)[: info.nbytes]
        pread_into(src, header.data_start + info.begin, view)
        return all_finite(view, ref.dtype)


def nonfinite(m: Module, bits: _Bits, tensors: bool = True) -> str | None:
    """What is not finite in ``m`` (its alpha or, with ``tensors``, a stored tensor), or None."""
    if m.alpha is not None and not (math.isfinite(m.alpha) and abs(m.alpha) <= FLOAT32_MAX):
        return f"alpha {m.alpha!r}"
    if not tensors:
        return None
    refs = dict(m.adapter.tensors)
    if m.magnitude is not None:
        refs["dora_scale"] = m.magnitude
    for role, ref in refs.items():
        if not bits.finite(ref):
            return f"NaN/Inf in {role}"
    return None


def check_writable(lora: Lora, allow_nonfinite: bool = False, tensors: bool = True) -> None:
    """Refuse, before anything is published, a file that contradicts itself, holds modules that were rejected when
    it was read, or (unless ``allow_nonfinite``) NaN/Inf in an alpha or a factor. One line, naming the first
    modules and the count. ``tensors=False`` leaves the factors out (for a writer that tests them as it writes:
    ``write_safetensors(finite=True)``)."""
    if lora.conflicts:
        more = f" (and {len(lora.conflicts) - 1} more)" if len(lora.conflicts) > 1 else ""
        raise FormatError(f"the file contradicts itself: {lora.conflicts[0]}{more}", lora.path)
    if lora.rejected:
        more = f" (and {len(lora.rejected) - 1} more)" if len(lora.rejected) > 1 else ""
        raise FormatError(f"module {lora.rejected[0]}{more}; nothing written", lora.path)
    if allow_nonfinite:
        return
    bits = _Bits()
    bad = [(m.name, why) for m in lora.modules if (why := nonfinite(m, bits, tensors)) is not None]
    if bad:
        shown = ", ".join(f"{name} ({why})" for name, why in bad[:3])
        raise FormatError(f"{len(bad)} module{'s hold' if len(bad) > 1 else ' holds'} NaN or Inf: {shown}"
                          f"{' …' if len(bad) > 3 else ''}; --allow-nonfinite writes them unchanged", lora.path)

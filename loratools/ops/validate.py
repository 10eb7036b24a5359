"""What every writing operation checks before it writes: a file that agrees with itself, modules whose factors fit
together, and finite numbers (a NaN or Inf in a factor or an alpha would spread through every output tensor)."""

from __future__ import annotations

import math

import numpy as np

from loratools.errors import FormatError
from loratools.io.arrays import all_finite
from loratools.model import Lora, Module

FLOAT32_MAX = 3.4028234663852886e38  # alphas are written as float32 scalars


def _finite(ref) -> bool:
    raw = getattr(ref.source, "raw", None)
    if raw is not None:  # a safetensors file: read the bits where they lie
        return all_finite(raw(ref.key), ref.dtype)
    values = ref.numpy()  # other sources (a loaded pickle, tensors in memory)
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def nonfinite(m: Module) -> str | None:
    """What is not finite in ``m`` (its alpha or a stored tensor), or None."""
    if m.alpha is not None and not (math.isfinite(m.alpha) and abs(m.alpha) <= FLOAT32_MAX):
        return f"alpha {m.alpha!r}"
    refs = dict(m.adapter.tensors)
    if m.magnitude is not None:
        refs["dora_scale"] = m.magnitude
    for role, ref in refs.items():
        if not _finite(ref):
            return f"NaN/Inf in {role}"
    return None


def check_writable(lora: Lora, allow_nonfinite: bool = False) -> None:
    """Refuse, before anything is written, a file that contradicts itself, holds modules that were rejected when
    it was read, or (unless ``allow_nonfinite``) NaN/Inf in a factor or an alpha. One line, naming the first
    modules and the count."""
    if lora.conflicts:
        more = f" (and {len(lora.conflicts) - 1} more)" if len(lora.conflicts) > 1 else ""
        raise FormatError(f"the file contradicts itself: {lora.conflicts[0]}{more}", lora.path)
    if lora.rejected:
        more = f" (and {len(lora.rejected) - 1} more)" if len(lora.rejected) > 1 else ""
        raise FormatError(f"module {lora.rejected[0]}{more}; nothing written", lora.path)
    if allow_nonfinite:
        return
    bad = [(m.name, why) for m in lora.modules if (why := nonfinite(m)) is not None]
    if bad:
        shown = ", ".join(f"{name} ({why})" for name, why in bad[:3])
        raise FormatError(f"{len(bad)} module{'s hold' if len(bad) > 1 else ' holds'} NaN or Inf: {shown}"
                          f"{' …' if len(bad) > 3 else ''}; --allow-nonfinite writes them unchanged", lora.path)

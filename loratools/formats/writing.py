"""Tensors of planned LoRA modules, in the two suffix styles writers use: kohya's (``lora_down``/``lora_up`` +
``.alpha``) and PEFT's (``lora_A``/``lora_B``, the scale folded in or left to a config).

Writer rules that decide whether real loaders accept our files: kohya-style files keep an ``.alpha`` per module (the
stored tensor itself when its value still holds, else float32); diffusers folds alpha/r into the factors (see
``fold``) and writes no ``.alpha``, as diffusers itself does; PEFT writes ``r``, ``lora_alpha``, ``^``-anchored
``rank_pattern``/``alpha_pattern`` and full-path ``target_modules``. Conv factors stay 4-D. Tensors are produced one
module at a time.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from typing import Callable

from loratools.errors import FormatError, UsageError
from loratools.io.reader import DTYPE_SIZES
from loratools.model import OutModule

_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class Factors:
    """Computes one module's factors once and hands out its tensors (memory: one module at a time)."""

    def __init__(self, om: OutModule, dtype: str | None):
        self.om, self.dtype, self._f = om, dtype or om.dtype, None
        if self.dtype not in _TORCH:
            self.dtype = "F32"

    def factors(self):
        if self._f is None:
            self._f = self.om.factors()
        return self._f

    def cast(self, t):
        import torch

        return t.to(getattr(torch, _TORCH[self.dtype])).contiguous()

    def data(self, which: int, k: float = 1.0):
        """Producer of factor ``which`` (0 up, 1 down, 2 mid) times ``k`` in the output dtype: spans of the stored
        bytes when nothing changes, the stored rows times ``k`` when only the scale does (on the bits for a power
        of two), otherwise computed with torch."""
        rows = self.om.raw[which] if self.om.raw else None
        if rows is not None and rows.ref.dtype == self.dtype:
            if k != 1.0:
                return self.checked(lambda: rows.scaled(k), rows.read, k, self.dtype)
            spans = rows.spans()  # known without reading
            return rows.read if spans is None else spans
        return self.checked(lambda: self.scaled(self.factors()[which], k), lambda: self.factors()[which], k)

    def checked(self, produce, source, k: float, source_dtype: str | None = None):
        """``produce``, refused when it makes Inf of finite values (``k`` > 1 or a cast to another dtype beyond
        their range) or zeros of every value (``k`` < 1 below the dtype's range): numbers that are not the
        module's any more. ``source`` gives the values before (read again only then)."""
        grows, shrinks = abs(k) > 1 or source_dtype != self.dtype, abs(k) < 1  # (a dtype of None: not known)

        def run():
            out = produce()
            if grows and not _finite(out, self.dtype) and _finite(source(), source_dtype):
                raise FormatError(f"module {self.om.name}: {_what(k)} beyond {self.dtype}'s range (Inf); write a "
                                  "wider --dtype" + ("" if k == 1.0 else " or a format that keeps the scale (kohya)"))
            if shrinks and not _nonzero(out, self.dtype) and _nonzero(source(), source_dtype):
                raise FormatError(f"module {self.om.name}: {_what(k)} below {self.dtype}'s range (every value "
                                  "rounds to 0); write a wider --dtype or a format that keeps the scale (kohya)")
            return out

        return run

    def scaled(self, t, k: float):
        """``t * k`` in the output dtype: in the storage dtype when that is exact (k a power of two, no dtype
        change), in float32 otherwise (one rounding, at the final cast)."""
        if k == 1.0:
            return self.cast(t)
        if math.frexp(k)[0] == 0.5 and self.cast(t[:0]).dtype == t.dtype:
            return (t * k).contiguous()
        return self.cast(t.float() * k)

    def last(self, produce):
        """A producer that drops the cached factors once it has run (stored spans need no factors)."""
        if not callable(produce):
            return produce

        def run():
            value = produce()
            self._f = None
            return value

        return run


def _what(k: float) -> str:
    return "its values lie" if k == 1.0 else f"its factor times {k:.6g} (the scale folded in) lies"


def _finite(x, dtype: str | None) -> bool:
    """Whether stored bytes (in ``dtype``) or a torch tensor hold no NaN or Inf."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        from loratools.io.arrays import all_finite

        return all_finite(x, dtype)
    import torch

    return bool(torch.isfinite(x.float() if x.element_size() == 1 else x).all())  # no isfinite for float8


def _nonzero(x, dtype: str | None) -> bool:
    """Whether stored bytes (in ``dtype``) or a torch tensor hold a value other than ±0."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        from loratools.io.arrays import any_nonzero  # stops at the first piece with one: no pass over the whole

        return any_nonzero(x, dtype)
    return bool(x.any())


def _shapes(om: OutModule):
    up, down, mid = om.shapes
    return tuple(up), tuple(down), tuple(mid) if mid is not None else None


def _magnitude_shape(om: OutModule, up_shape, down_shape):
    if om.dora_axis == "row":
        return (up_shape[0],) + (1,) * (len(down_shape) - 1)
    return (1,) + tuple(down_shape[1:])


def alpha_item(om: OutModule) -> tuple:
    """(dtype, shape, data) of a kohya ``.alpha``: the stored tensor as it is when it still holds the module's
    alpha (its bytes then travel with the factors' in one copy), else a float32 scalar."""
    ref = om.alpha_ref
    spans = getattr(ref.source, "spans", None) if ref is not None else None
    if spans is not None and ref.dtype in _TORCH and ref.numel == 1:
        return ref.dtype, ref.shape, spans(ref.key, [(0, DTYPE_SIZES[ref.dtype])])
    return "F32", (), struct.pack("<f", om.scale * om.rank)


def common_alpha(mods: list[OutModule]) -> float | None:
    """The alpha most modules have (ties: the largest), the one a uniform-alpha file gives every module."""
    counts = Counter(om.scale * om.rank for om in mods)
    return max(counts, key=lambda a: (counts[a], a)) if counts else None


def down_up_items(mods: list[OutModule], stem_of: Callable[[OutModule], str], dtype: str | None,
                  alpha: float | None = None):
    """Tensors in kohya's suffix style: ``.alpha``, ``.lora_down.weight`` (+ ``.lora_mid``), ``.lora_up.weight``,
    ``.dora_scale``, ``.diff_b``. With ``alpha``, every module is written with that alpha and its own ratio
    alpha_i/alpha multiplied into lora_up: the same ΔW for loaders that apply one alpha to every module (diffusers'
    kohya reader does); exact when the ratio is a power of two, else one rounding in the output dtype."""
    for om in mods:
        f = Factors(om, dtype)
        stem = stem_of(om)
        up_shape, down_shape, mid_shape = _shapes(om)
        own = om.scale * om.rank
        k = own / alpha if alpha and own != alpha else 1.0
        if k == 1.0:
            yield (f"{stem}.alpha", *alpha_item(om))
        else:
            yield f"{stem}.alpha", "F32", (), struct.pack("<f", alpha)
        yield f"{stem}.lora_down.weight", f.dtype, down_shape, f.data(1)
        if mid_shape:
            yield f"{stem}.lora_mid.weight", f.dtype, mid_shape, f.data(2)
        yield f"{stem}.lora_up.weight", f.dtype, up_shape, f.last(f.data(0, k))
        if om.magnitude is not None:
            shape = _magnitude_shape(om, up_shape, down_shape)
            magnitude = f.checked(lambda f=f, s=shape: f.cast(f.om.magnitude().reshape(s)), f.om.magnitude, 1.0)
            yield f"{stem}.dora_scale", f.dtype, shape, magnitude
        if om.bias is not None:
            yield f"{stem}.diff_b", f.dtype, (up_shape[0],), f.checked(lambda f=f: f.cast(f.om.bias()), f.om.bias, 1.0)


def fold(scale: float, down_shape=(), up_shape=()) -> tuple[float, float]:
    """(A's factor, B's factor) that fold alpha/r into the factors. A power of two goes whole onto the smaller
    factor: exact either way, and the fewest bytes to rescale. Otherwise diffusers' split: B gets a power of two
    (exact), A the rest. A negative scale keeps its sign on A."""
    if scale == 0 or not math.isfinite(scale):
        return scale, 1.0
    if math.frexp(scale)[0] in (0.5, -0.5):
        return (scale, 1.0) if math.prod(down_shape) <= math.prod(up_shape) else (1.0, scale)
    exponent = math.frexp(math.sqrt(abs(scale)))[1]  # B gets about √|scale|, as a power of two: no loop on a value
    up = math.ldexp(1.0, exponent)
    return scale / up, up


def a_b_items(mods: list[OutModule], stem_of: Callable[[OutModule], str], dtype: str | None, fmt: str,
              folded: bool):
    """Tensors in PEFT's suffix style: ``.lora_A.weight``, ``.lora_B.weight``, the DoRA magnitude and
    ``.lora_B.bias``; with ``folded`` each module's scale is multiplied into its factors."""
    for om in mods:
        f = Factors(om, dtype)
        stem = stem_of(om)
        up_shape, down_shape, mid_shape = _shapes(om)
        if mid_shape:
            raise UsageError(f"{om.name}: a Tucker (lora_mid) module has no {fmt} spelling")
        s_down, s_up = fold(om.scale, down_shape, up_shape) if folded else (1.0, 1.0)
        yield f"{stem}.lora_A.weight", f.dtype, down_shape, f.data(1, s_down)
        yield f"{stem}.lora_B.weight", f.dtype, up_shape, f.last(f.data(0, s_up))
        if om.magnitude is not None:
            if om.dora_axis != "row":
                raise UsageError(f"{om.name}: column-wise DoRA (dora_scale [1, in]) has no {fmt} spelling; "
                                 "PEFT's magnitude is per output row")
            key = f"{stem}.lora_magnitude_vector" + ("" if fmt == "peft" else ".weight")
            yield key, f.dtype, (up_shape[0],), f.checked(lambda f=f: f.cast(f.om.magnitude().reshape(-1)),
                                                          f.om.magnitude, 1.0)
        if om.bias is not None:
            if not folded and om.scale == 0:
                raise UsageError(f"{om.name}: its scale is 0 and {fmt} multiplies lora_B.bias by the scale: its bias "
                                 f"has no {fmt} spelling")
            k = 1.0 if folded else 1.0 / om.scale  # PEFT multiplies lora_B.bias by the scale
            yield f"{stem}.lora_B.bias", f.dtype, (up_shape[0],), f.checked(lambda f=f, k=k: f.cast(f.om.bias() * k),
                                                                            f.om.bias, k)


def peft_config(mods: list[OutModule], base_model: str | None = None, folded: bool = False) -> dict:
    """A minimal adapter_config.json that gives every module its own rank and scale (scale 1 when the scales were
    folded into the factors)."""
    ranks = {om.name: om.rank for om in mods}
    alphas = {om.name: float(om.rank) if folded else om.scale * om.rank for om in mods}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
        "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != alpha},
        "use_rslora": False, "use_dora": any(om.magnitude is not None for om in mods),
        "lora_bias": any(om.bias is not None for om in mods), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True,
    }

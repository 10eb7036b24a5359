"""Writing planned LoRA modules in each target format (kohya, comfy, diffusers, PEFT folders).

Writer rules that decide whether real loaders accept our files: kohya and comfy keep an `.alpha` per module
(the stored tensor itself when its value still holds, else float32); diffusers folds alpha/r into the factors
(see ``_fold``) and writes no `.alpha`, as diffusers itself does; PEFT writes `r`, `lora_alpha`, `^`-anchored
`rank_pattern`/`alpha_pattern` and full-path `target_modules`, one adapter folder per component. Conv factors
stay 4-D. Tensors are produced one at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

from loratools.errors import LoraToolsError, UsageError
from loratools.io.safetensors import DTYPE_SIZES, ScaledSpans, scales_on_bits, write_safetensors
from loratools.ops.canonical import OutModule

TARGETS = ("kohya", "diffusers", "peft", "comfy")
_TORCH = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class _Lazy:
    """Computes one module's factors once and hands out its tensors (memory: one module at a time)."""

    def __init__(self, om: OutModule, dtype: str | None):
        self.om, self.dtype, self._f = om, dtype or om.dtype, None
        if self.dtype not in _TORCH:
            self.dtype = "F32"

    def factors(self):
        if self._f is None:
            self._f = self.om.factors()
        return self._f

    def torch_dtype(self):
        import torch

        return getattr(torch, _TORCH[self.dtype])

    def cast(self, t):
        return t.to(self.torch_dtype()).contiguous()

    def data(self, which: int, k: float = 1.0):
        """Producer of factor ``which`` (0 up, 1 down, 2 mid) times ``k`` in the output dtype: spans of the
        stored bytes when nothing changes, the stored rows times ``k`` when only the scale does (on the bits,
        without torch, for a power of two: by the writer as it copies them), otherwise computed with torch."""
        rows = self.om.raw[which] if self.om.raw else None
        if rows is not None and rows.ref.dtype == self.dtype:
            spans = rows.spans()  # known without reading
            if k != 1.0:
                if spans is not None and scales_on_bits(self.dtype, k):
                    return ScaledSpans(spans, self.dtype, k)
                return lambda: rows.scaled(k)
            return rows.read if spans is None else spans
        return lambda: self.scaled(self.factors()[which], k)

    def scaled(self, t, k: float):
        """``t * k`` cast to the output dtype: in the storage dtype when that is exact (k a power of two and
        no dtype change), in float32 otherwise (one rounding, at the final cast)."""
        import math

        if k == 1.0:
            return self.cast(t)
        mantissa, _ = math.frexp(k)
        if mantissa == 0.5 and t.dtype == self.torch_dtype():
            return (t * k).contiguous()
        return self.cast(t.float() * k)

    def done(self):
        self._f = None


def _slot_prefix(om: OutModule, table, fmt: str, model_prefix: str) -> str:
    if om.space == "model":
        return {"kohya": "lora_unet_", "comfy": "diffusion_model.", "diffusers": f"{model_prefix}."}[fmt]
    slot = table.encoder_slot(om.space, fmt)
    if fmt == "kohya":
        return f"lora_{slot}_"
    if fmt == "comfy":
        return f"text_encoders.{slot}.transformer."
    return f"{slot}."


def kohya_items(mods: list[OutModule], table, fmt: str, dtype: str | None, model_prefix: str = ""):
    """Tensors for kohya (flattened) or comfy (dotted) naming, with lora_down/lora_up/alpha."""
    for om in mods:
        lazy = _Lazy(om, dtype)
        prefix = _slot_prefix(om, table, fmt, model_prefix)
        stem = prefix + (om.name.replace(".", "_") if fmt == "kohya" else om.name)
        up_shape, down_shape, mid_shape = _shapes(om)
        yield (f"{stem}.alpha", *_alpha(om))
        yield f"{stem}.lora_down.weight", lazy.dtype, down_shape, lazy.data(1)
        if mid_shape:
            yield f"{stem}.lora_mid.weight", lazy.dtype, mid_shape, lazy.data(2)
        yield f"{stem}.lora_up.weight", lazy.dtype, up_shape, _then_done(lazy, lazy.data(0))
        if om.magnitude is not None:
            shape = _magnitude_shape(om, up_shape, down_shape)
            yield f"{stem}.dora_scale", lazy.dtype, shape, lambda z=lazy, s=shape: z.cast(z.om.magnitude().reshape(s))
        if om.bias is not None:
            yield f"{stem}.diff_b", lazy.dtype, (up_shape[0],), lambda z=lazy: z.cast(z.om.bias())


def _alpha(om: OutModule) -> tuple:
    """(dtype, shape, data) of a kohya `.alpha`: the stored tensor as it is when it still holds the module's
    alpha (its bytes then travel with the factors' in one copy), else a float32 scalar."""
    ref = om.alpha_ref
    spans = getattr(ref.source, "spans", None) if ref is not None else None
    if spans is not None and ref.dtype in _TORCH and ref.numel == 1:
        return ref.dtype, ref.shape, spans(ref.key, [(0, DTYPE_SIZES[ref.dtype])])
    return "F32", (), struct.pack("<f", om.scale * om.rank)


def _last(lazy: _Lazy, value):
    lazy.done()
    return value


def _then_done(lazy: _Lazy, produce):
    """A producer that drops the module's cached factors once the last of its tensors is made (stored
    spans, not a producer, need no factors)."""
    if not callable(produce):
        return produce
    return lambda: _last(lazy, produce())


def _shapes(om: OutModule):
    """Output factor shapes, known from the plan without reading data (the header is written first)."""
    up, down, mid = om.shapes
    return tuple(up), tuple(down), tuple(mid) if mid is not None else None


def _magnitude_shape(om: OutModule, up_shape, down_shape):
    if om.dora_axis == "row":
        return (up_shape[0],) + (1,) * (len(down_shape) - 1)
    return (1,) + tuple(down_shape[1:])


def _fold(scale: float, down_shape=(), up_shape=()) -> tuple[float, float]:
    """(A's factor, B's factor) that fold alpha/r into the factors. A power of two goes whole onto the smaller
    factor: exact either way, and the fewest bytes to rescale (an SDXL LoRA: 296 MB instead of 429 MB).
    Otherwise diffusers' split: B gets a power of two (exact), A the rest."""
    if math.frexp(scale)[0] == 0.5:
        return (scale, 1.0) if math.prod(down_shape) <= math.prod(up_shape) else (1.0, scale)
    down, up = scale, 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def peft_style_items(mods: list[OutModule], table, fmt: str, dtype: str | None, prefix_of, fold: bool):
    """Tensors with lora_A/lora_B suffixes (diffusers file or PEFT folder)."""
    for om in mods:
        lazy = _Lazy(om, dtype)
        stem = prefix_of(om) + om.name
        up_shape, down_shape, mid_shape = _shapes(om)
        if mid_shape:
            raise UsageError(f"{om.name}: a Tucker (lora_mid) module has no {fmt} spelling")
        s_down, s_up = _fold(om.scale, down_shape, up_shape) if fold else (1.0, 1.0)
        yield f"{stem}.lora_A.weight", lazy.dtype, down_shape, lazy.data(1, s_down)
        yield f"{stem}.lora_B.weight", lazy.dtype, up_shape, _then_done(lazy, lazy.data(0, s_up))
        if om.magnitude is not None:
            if om.dora_axis != "row":
                raise UsageError(f"{om.name}: column-wise DoRA (dora_scale [1, in]) has no {fmt} spelling; "
                                 "PEFT's magnitude is per output row")
            key = f"{stem}.lora_magnitude_vector" + ("" if fmt == "peft" else ".weight")
            yield key, lazy.dtype, (up_shape[0],), lambda z=lazy: z.cast(z.om.magnitude().reshape(-1))
        if om.bias is not None:
            k = 1.0 if fold else 1.0 / om.scale  # PEFT multiplies lora_B.bias by the scale
            yield f"{stem}.lora_B.bias", lazy.dtype, (up_shape[0],), lambda z=lazy, k=k: z.cast(z.om.bias() * k)


def peft_config(mods: list[OutModule], base_model: str | None = None, folded: bool = False) -> dict:
    """A minimal adapter_config.json that gives every module its own rank and scale (scale 1 when the
    scales were folded into the factors)."""
    ranks = {om.name: om.rank for om in mods}
    alphas = {om.name: float(om.rank) if folded else om.scale * om.rank for om in mods}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
        "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != alpha},
        "use_rslora": False, "use_dora": any(om.magnitude is not None for om in mods),
        "lora_bias": any(om.bias is not None for om in mods), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return cfg


def write_target(mods: list[OutModule], table, fmt: str, dest: Path, metadata: dict, *, dtype: str | None,
                 overwrite: bool, model_prefix: str) -> list[Path]:
    """Write ``mods`` as ``fmt`` at ``dest`` (a file, or a folder for PEFT); returns what was written."""
    if fmt in ("kohya", "comfy"):
        write_safetensors(dest, list(kohya_items(mods, table, fmt, dtype, model_prefix)), metadata, overwrite=overwrite,
                          group_copies=True)
        return [dest]
    if fmt == "diffusers":
        prefix = lambda om: _slot_prefix(om, table, "diffusers", model_prefix)  # noqa: E731
        items = list(peft_style_items(mods, table, fmt, dtype, prefix, fold=True))
        meta = {**metadata, "format": "pt", "lora_adapter_metadata": _diffusers_metadata(mods, table, model_prefix)}
        write_safetensors(dest, items, meta, overwrite=overwrite, group_copies=True)
        return [dest]
    if fmt == "peft":
        return _write_peft_folders(mods, table, dest, metadata, dtype=dtype, overwrite=overwrite,
                                   model_prefix=model_prefix)
    raise UsageError(f"unknown target format '{fmt}' (choose from {', '.join(TARGETS)})")


# The LoraConfig fields diffusers passes straight to LoraConfig(**metadata).
_DIFFUSERS_CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")


def _diffusers_metadata(mods: list[OutModule], table, model_prefix: str) -> str:
    """diffusers' `lora_adapter_metadata`: one LoraConfig per component, keys prefixed by the component.

    Without it diffusers infers ranks and alphas from the tensors, and with mixed ranks gets some modules'
    scale wrong; with it every module gets exactly its rank and scale 1 (alpha is folded into the factors).
    """
    by_component: dict[str, list[OutModule]] = {}
    for om in mods:
        comp = model_prefix if om.space == "model" else table.encoder_slot(om.space, "diffusers")
        by_component.setdefault(comp, []).append(om)
    packed = {}
    for comp, group in by_component.items():
        cfg = peft_config(group, folded=True)
        packed.update({f"{comp}.{k}": cfg[k] for k in _DIFFUSERS_CONFIG_KEYS})
    return json.dumps(packed, indent=2, sort_keys=True)


def _write_peft_folders(mods, table, dest: Path, metadata: dict, *, dtype, overwrite: bool, model_prefix: str):
    """One adapter folder per component, all built in a temporary folder and moved into place together."""
    by_component: dict[str, list[OutModule]] = {}
    for om in mods:
        comp = model_prefix if om.space == "model" else table.encoder_slot(om.space, "peft")
        by_component.setdefault(comp, []).append(om)
    if dest.exists() and not overwrite:
        raise LoraToolsError("output exists; pass --overwrite to replace it", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for comp, group in by_component.items():
            folder = tmp / comp
            folder.mkdir()
            items = list(peft_style_items(group, table, "peft", dtype, lambda om: "base_model.model.", fold=False))
            write_safetensors(folder / "adapter_model.safetensors", items, {**metadata, "format": "pt"},
                              group_copies=True)
            (folder / "adapter_config.json").write_text(json.dumps(peft_config(group), indent=2, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else os.remove(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [dest / comp for comp in by_component]

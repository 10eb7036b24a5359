"""Scaled-fp8 checkpoints: fp8 numbers times a per-tensor (or per-row) scale stored beside the weight.

ComfyUI's ``scaled_fp8`` files keep ``<layer>.scale_weight`` (and ``scale_input``) with a top-level ``scaled_fp8``
marker; BFL's and ComfyUI's newer mixed files keep ``<layer>.weight_scale`` (and ``input_scale``, ``comfy_quant``).
The weight a loader computes with is ``weight · scale``, so that is what a LoRA moves: bake dequantises, adds ΔW and
either quantises again with the same scale (``--dtype keep``) or writes the wider dtype and drops the layer's
quantisation tensors (a plain checkpoint every loader reads as such).
"""

from __future__ import annotations

from typing import Mapping

from loratools.errors import FormatError

FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
WEIGHT_SCALES = ("scale_weight", "weight_scale")
LAYER_SIDECARS = ("scale_weight", "weight_scale", "scale_input", "input_scale", "comfy_quant")
MARKERS = ("scaled_fp8",)


def weight_scale_key(tensors: Mapping, name: str) -> str | None:
    """The scale stored beside an fp8 ``<layer>.weight``, or None when the weight is plain fp8."""
    info = tensors.get(name)
    if info is None or info.dtype not in FP8 or not name.endswith(".weight"):
        return None
    stem = name[: -len("weight")]
    return next((stem + s for s in WEIGHT_SCALES if stem + s in tensors), None)


def dropped_when_widened(tensors: Mapping) -> set[str]:
    """The quantisation tensors a dequantised checkpoint no longer needs: every scaled layer's sidecars, and the
    file's marker once no fp8 weight is left scaled."""
    out = set()
    for name in tensors:
        if weight_scale_key(tensors, name):
            stem = name[: -len("weight")]
            out |= {stem + s for s in LAYER_SIDECARS if stem + s in tensors}
    if out:
        out |= {m for m in MARKERS if m in tensors}
    return out


def _broadcast(scale, w):
    """A scalar, per-row [out] or [out, 1] scale, shaped to multiply ``w``."""
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.shape[0] != w.shape[0] or scale.numel() != w.shape[0]:
        raise FormatError(f"a weight scale of shape {list(scale.shape)} does not fit a weight of shape "
                          f"{list(w.shape)}")
    return scale.reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def dequantised(w, scale):
    """The weight a loader computes with, float32."""
    import torch

    return w.to(torch.float32) * _broadcast(scale.to(torch.float32), w)


def quantised(x, scale, dtype, key: str, warnings: list[str]):
    """``x`` back in fp8 numbers at the stored ``scale``. Values the patch pushed past the fp8 range at that scale
    are clipped to it (what a quantiser keeping the scale does), and counted in ``warnings``."""
    import torch

    q = x / _broadcast(scale.to(torch.float32), x)
    limit = torch.finfo(dtype).max
    lo, hi = torch.aminmax(q)
    if lo.item() < -limit or hi.item() > limit:
        clipped = int((q.abs() > limit).sum())
        warnings.append(f"{key}: {clipped} baked values clipped to the fp8 range at the checkpoint's weight scale "
                        "(--dtype bf16 keeps them)")
        q = q.clamp(-limit, limit)
    return q.to(dtype)

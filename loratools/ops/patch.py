"""The arithmetic of baking: one base tensor plus its modules' ΔW (LoRA products on the device, other adapters on
CPU with the base weight where they need it), DoRA's renormalisation, and patching large tensors in blocks so memory
stays at a few blocks whatever the tensor's size."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from loratools.errors import FormatError, ShapeMismatch, UsageError
from loratools.model import Module
from loratools.ops.canonical import swap_halves
from loratools.ops.placement import Placement


@dataclass
class Patch:
    """One module's contribution to one base tensor (its weight, or its bias when ``bias``)."""

    module: Module
    strength: float
    where: Placement
    swap: bool
    family: str
    bias: bool = False



def bias_of(m: Module):
    a = m.adapter
    if a.has("diff_b"):
        return a.t("diff_b"), False  # absolute
    if a.has("lora_up_bias"):
        return a.t("lora_up_bias"), True  # PEFT scales lora_B.bias like the product
    return None


def _module_delta(m: Module, base_view, device, strength: float):
    """Dense ΔW at ``strength`` (scale included, float32) on ``device``: low-rank products are multiplied there,
    the rest computed on CPU (with the base weight, for the adapters that need it)."""
    import torch

    a = m.adapter
    factors = a.low_rank() if device.type != "cpu" and not a.needs_base else None
    if factors is not None:
        up, down = factors
        return (up.to(device) @ down.to(device)) * (m.scale * strength)
    base = base_view.float().cpu() if a.needs_base else None
    return m.delta(base=base, strength=strength).to(device, torch.float32)


def _fit(d, target, p: Patch):
    """ΔW in the target's shape (a 1x1 conv vs a linear differ only in trailing unit dims)."""
    if p.where.transpose:
        d = d.T
    if tuple(d.shape) != tuple(target.shape):
        if d.numel() != target.numel():
            raise ShapeMismatch(f"module {p.module.name} ({p.family}) gives ΔW {list(d.shape)} but base tensor "
                                f"{p.where.key} has {list(target.shape)} (is the base a {p.family} checkpoint?)")
        d = d.reshape(target.shape)
    return d


def _rows(x, src):
    return x if src is None else x[src[0]: src[1]]


def apply_weight(w, p: Patch, device) -> None:
    """Add (or DoRA-renormalise) one module's contribution into ``w`` (float32, in place)."""
    import torch

    m = p.module
    target = w if p.where.rows is None else w[p.where.rows[0]: p.where.rows[1]]
    if _add_product(target, p, device):
        return
    d = _module_delta(m, target, device, 1.0 if m.magnitude is not None else p.strength)
    if p.swap:
        d = swap_halves(d)
    d = _fit(_rows(d, p.where.src), target, p)
    if m.magnitude is None:
        target.add_(d)
        return
    mag = m.magnitude.torch().to(device, torch.float32)
    if m.dora_axis == "row":
        mag = _rows(swap_halves(mag.reshape(-1)) if p.swap else mag.reshape(-1), p.where.src)
    elif p.where.src is not None:
        raise UsageError(f"module {m.name}: a column-wise DoRA module cannot be split over several base weights")
    target.copy_(dora(target, d, mag, m.dora_axis, p.strength))


def _product(p: Patch, device):
    """(first row, B, A, factor) when ``p`` adds factor·B@A to rows of its weight as one multiply-add (plain
    LoRA factors, no dense ΔW, no extra passes); None when the general path must reshape, renormalise or explain."""
    m, a = p.module, p.module.adapter
    if p.bias or a.needs_base or m.magnitude is not None or p.where.transpose:
        return None
    factors = a.low_rank()
    if factors is None:
        return None
    up, down = (f.to(device) for f in factors)
    if p.swap:
        up = swap_halves(up)
    up = _rows(up, p.where.src)
    return (p.where.rows[0] if p.where.rows else 0), up, down, p.strength * m.scale


def _add_product(target, p: Patch, device) -> bool:
    product = _product(p, device)
    if product is None or not _fits(product, target.shape):
        return False
    _, up, down, factor = product
    target.view(target.shape[0], -1).addmm_(up, down, alpha=factor)
    return True


def _fits(product, shape) -> bool:
    """Whether B@A has exactly the rows and the (flattened) columns of a weight, or of its rows, of ``shape``."""
    _, up, down, _ = product
    return up.shape[0] == shape[0] and up.shape[0] * down.shape[1] == math.prod(shape)


def dora(w, d, mag, axis: str, strength: float):
    """m ⊙ (W + ΔW)/‖W + ΔW‖ along ``axis`` ('row': per output row; 'column': per input column); a strength
    t blends the result with W (W + t·(W' − W)), so t = 1 is exactly PEFT's merged DoRA weight."""
    merged = w + d
    if axis == "row":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        scale = mag.reshape(norm.shape)
    else:
        dims = [i for i in range(w.dim()) if i != 1]
        norm = merged.norm(dim=dims, keepdim=True)
        scale = mag.reshape(-1).reshape(norm.shape)
    out = merged * (scale / norm.clamp_min(1e-12))
    return w + strength * (out - w) if strength != 1 else out


def apply_bias(b, p: Patch, device) -> None:
    import torch

    ref, scaled = bias_of(p.module)
    v = ref.torch().to(device, torch.float32).reshape(-1) * (p.module.scale if scaled else 1.0)
    if p.swap:
        v = swap_halves(v)
    v = _rows(v, p.where.src)
    target = b if p.where.rows is None else b[p.where.rows[0]: p.where.rows[1]]
    if v.numel() != target.numel():
        raise ShapeMismatch(f"module {p.module.name} ({p.family}) has a bias of {v.numel()} but {p.where.bias_key} "
                            f"has {target.numel()}")
    target.add_(v.reshape(target.shape), alpha=p.strength)


def patch_tensor(w, patches: list[Patch], device, out_dtype, in_place: bool = False, products=None):
    """The patched tensor, computed in float32 on ``device`` and cast once to ``out_dtype`` (on CPU).
    ``in_place``: ``w`` may be overwritten with the result (when the dtype stays). ``products``: what
    ``cpu_products`` gave for ``patches``, made beforehand."""
    import torch

    if device.type == "cpu" and w.dim() >= 2 and w.numel():
        if products is None:
            products = cpu_products(patches, device)
        if all(pr is not None and _fits(pr, _target_shape(w.shape, p.where.rows)) for pr, p in zip(products, patches)):
            return _patch_in_blocks(w, products, out_dtype, in_place, patches)
    x = w.to(device, non_blocking=True).to(torch.float32)
    for p in patches:
        apply_bias(x, p, device) if p.bias else apply_weight(x, p, device)
    out = x.to(out_dtype)
    _check_range(out, x, patches)
    return out.cpu()


def _check_range(out, x, patches: list[Patch]) -> None:
    """Refuse a patched weight that the narrowing to its dtype made Inf (``x``: the float32 result, finite when
    base and LoRA were): a baked checkpoint full of Inf is no model. NaN/Inf already in ``x`` pass through."""
    if overflowed(out, x):
        names = ", ".join(dict.fromkeys(p.module.name for p in patches))
        raise FormatError(f"baking {names} puts weights beyond {str(out.dtype).removeprefix('torch.')}'s range "
                          "(Inf); bake with a wider --dtype or a lower strength")


def overflowed(out, x) -> bool:
    """Whether narrowing ``x`` to ``out`` made finite values Inf (NaN/Inf already in ``x`` do not count)."""
    import torch

    if not out.is_floating_point():
        return False
    if x.numel():
        lo, hi = torch.aminmax(x)  # one pass, no temporaries: what the isfinite tests below cost many times over
        limit = torch.finfo(out.dtype).max
        if -limit <= lo.item() and hi.item() <= limit:  # all within the dtype's range (a NaN fails both tests)
            return False
    wide = out.float() if out.element_size() == 1 else out  # torch has no isfinite for float8
    return not bool(torch.isfinite(wide).all()) and bool(torch.isfinite(x).all())


def cast_checked(x, dtype, key: str):
    """An unpatched weight ``x`` cast to ``dtype`` (``--dtype``); refused when the cast turns finite values Inf."""
    import torch

    out = x.to(dtype)
    narrows = x.is_floating_point() and out.is_floating_point() and torch.finfo(dtype).max < torch.finfo(x.dtype).max
    if narrows and overflowed(out, x):
        raise FormatError(f"casting {key} to {str(dtype).removeprefix('torch.')} puts weights beyond its range "
                          "(Inf); bake with a wider --dtype")
    return out


def cpu_products(patches: list[Patch], device) -> list | None:
    """Each patch's ``_product`` (its factors read and widened to float32), for the CPU path; None elsewhere."""
    if device.type != "cpu":
        return None
    return [_product(p, device) for p in patches]


def _target_shape(shape, rows):
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


# Rows of float32 worked on at a time: a block this size stays in the CPU's cache while it is widened, patched
# and narrowed, so W crosses memory once each way instead of through a tensor-sized float32 copy (which for
# large weights also costs a page fault per 4 KiB, as allocations over 32 MiB are fresh mappings).
_BLOCK_BYTES = 2 << 20
_scratch = threading.local()


def _patch_in_blocks(w, products, out_dtype, in_place: bool = False, patches: list[Patch] = ()):
    """W + Σ factor·B@A on CPU, block of rows by block of rows; the same float32 arithmetic as the whole-tensor
    path (each output row depends only on its own row of W and of B, so the result may overwrite W: each block
    is read before it is written). In place, the result never needs memory of its own, which is new memory
    (page faults) whenever the allocator maps it afresh."""
    import torch

    rows = w.shape[0]
    cols = w.numel() // rows
    src = w.reshape(rows, cols)
    same = in_place and w.dtype == out_dtype and w.is_contiguous()
    out = w if same else torch.empty(w.shape, dtype=out_dtype)
    dst = out.view(rows, cols)
    step = max(1, _BLOCK_BYTES // (4 * cols))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < step * cols:
        buf = _scratch.buf = torch.empty(step * cols, dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = buf[: (r1 - r0) * cols].view(r1 - r0, cols)
        x.copy_(src[r0:r1])
        for first, up, down, factor in products:
            lo, hi = max(r0, first), min(r1, first + up.shape[0])
            if lo < hi:
                x[lo - r0: hi - r0].addmm_(up[lo - first: hi - first], down, alpha=factor)
        dst[r0:r1].copy_(x)
        _check_range(dst[r0:r1], x, patches)  # the block is still in the cache
    return out


# --- writing ----------------------------------------------------------------------------------------------

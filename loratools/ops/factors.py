"""A module as flat factors for the factor-space SVD, and factors back as a LoRA module (resize, merge).

A LoRA module ΔW = s·B·A is read as ``up`` [m, r] and ``down`` [r, n] (conv kernels flattened into n); plain LoRA
modules become :class:`ops.batched.Job` s whose factors are read in the workers (:func:`factor_job`). LoHa, LoKr
and full-diff modules become LoRA first, through a dense SVD at ``lossy_rank`` (the only lossy step), and Tucker
modules by folding their mid into down (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loratools.adapters import LoRA
from loratools.errors import FormatError, UsageError
from loratools.model import MemorySource, Module
from loratools.ops.batched import Job
from loratools.ops.lowrank import compute_dtype, dense_svd, split_factors, svd

# Bias deltas a LoRA module may carry: PEFT's lora_B bias is scaled with the module, diff_b is not.
BIAS_ROLES = ("lora_up_bias", "diff_b")


@dataclass
class Factors:
    """A module's ΔW/s as a flat product ``up @ down`` ([m, r] @ [r, n]) on the compute device; ``up`` and
    ``down`` are None when the module's job reads them later (:func:`factor_job`)."""

    up: Any
    down: Any
    scale: float
    shape: tuple[int, ...]  # the dense ΔW's shape: (out, in) or (out, in, *kernel)
    up_ndim: int  # how many dims the stored up factor has (conv ups are [out, r, 1, 1])
    dtype: Any  # the storage dtype the factors came in
    rslora: bool = False
    total: float | None = None  # ‖ΔW/s‖² when up @ down only approximates ΔW (a lossy conversion) ...
    residual: float = 0.0  # ... and ‖ΔW/s − up @ down‖²
    lossy_error: float | None = None  # relative error of that conversion
    biases: dict = field(default_factory=dict)
    rank: int = 0  # columns of up

    def __post_init__(self):
        if self.up is not None:
            self.rank = self.up.shape[1]


def factor_job(index: int, m: Module, device, lossy_rank: int | None = None) -> tuple[Factors, Job]:
    """The module's factors as a job for ``ops.batched.factor_svds``: a plain LoRA module's are read when the job is
    filled (in a worker, straight into its batch); other kinds are converted here (module_factors)."""
    a = m.adapter
    refs = a.plain_factors()
    if refs is not None:
        import torch

        from loratools.io.header import TORCH_DTYPES

        a.check()
        up_ref, down_ref = refs
        rows, rank, cols = up_ref.shape[0], up_ref.shape[1], math.prod(down_ref.shape[1:])
        stored = [getattr(torch, TORCH_DTYPES[ref.dtype]) for ref in (up_ref, down_ref)]
        biases = {r: a.t(r).torch() for r in BIAS_ROLES if a.has(r)}
        f = Factors(None, None, m.scale, (rows, *down_ref.shape[1:]), len(up_ref.shape), stored[1], m.rslora,
                    biases=biases, rank=rank)

        def fill(up, down):
            up.copy_(up_ref.torch().reshape(rows, rank))
            down.copy_(down_ref.torch().reshape(rank, cols))

        return f, Job(index, m.name, rows, rank, cols, torch.float64 if torch.float64 in stored else torch.float32,
                      fill)
    f = module_factors(m, device, lossy_rank)

    def fill_from(up, down):
        up.copy_(f.up)
        down.copy_(f.down)

    return f, Job(index, m.name, f.up.shape[0], f.rank, f.down.shape[1], f.up.dtype, fill_from)


def module_factors(m: Module, device, lossy_rank: int | None = None) -> Factors:
    """Read a matrix module as flat factors on ``device``; one host-to-device copy per tensor."""
    a = m.adapter
    if not a.exact_lora:
        return _lossy_factors(m, device, lossy_rank)
    a.check()
    up_t, down_t = a.up.torch(), a.down.torch()
    cdt = compute_dtype(up_t, down_t)
    up, down = up_t.to(device, cdt).flatten(1), down_t.to(device, cdt)
    if a.plain_factors() is None:
        # Tucker: ΔW[o,i,k,l] = Σ up[o,m]·mid[m,n,k,l]·down[n,i]; folding mid into down gives plain conv
        # factors of rank r_up exactly, with the kernel on down as everywhere else.
        import torch

        mid = a.t("lora_mid").torch().to(device, cdt)
        down = torch.einsum("mnkl,ni->mikl", mid, down.flatten(1))
    shape = (up.shape[0], *down.shape[1:])
    biases = {r: a.t(r).torch() for r in BIAS_ROLES if a.has(r)}
    return Factors(up, down.flatten(1), m.scale, shape, up_t.dim(), down_t.dtype, m.rslora, biases=biases)


def _lossy_factors(m: Module, device, lossy_rank: int | None) -> Factors:
    """LoHa / LoKr / full diff -> top-``lossy_rank`` factors of the dense ΔW (the only lossy step)."""
    import torch

    a = m.adapter
    if lossy_rank is None:  # check_modules normally says so first
        raise UsageError(f"{a.lossy_name or a.label} modules need --lossy-rank N to become LoRA (a lossy SVD)")
    first = next(iter(a.tensors.values())).torch()
    kron = a.kron_factors()
    if kron is not None:  # ΔW = kron(w1, w2): its SVD comes from the factors' SVDs, exactly, without ΔW
        w1, w2 = kron
        cdt = compute_dtype(first)
        u, s, vh, total, residual = kron_svd(w1.to(device, cdt), w2.to(device, cdt), lossy_rank)
        up, down = split_factors(u, s, vh, s.shape[0])
        shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        err = math.sqrt(residual / total) if total > 0 else 0.0
        return Factors(up, down, m.scale, shape, 2, first.dtype, total=total, residual=residual, lossy_error=err)
    dense = a.delta()
    shape = tuple(dense.shape)
    mat = dense.to(device, compute_dtype(first)).flatten(1)
    del dense
    u, s, vh = dense_svd(mat, lossy_rank)
    up, down = split_factors(u, s, vh, min(lossy_rank, s.shape[0]))
    # measured, not inferred from ‖ΔW‖² − Σσ²: that difference is rounding noise when the error is tiny
    residual = float(torch.linalg.vector_norm(mat - up @ down))
    total = float(torch.linalg.vector_norm(mat))
    residual, total = residual * residual, total * total  # not ** 2: that raises beyond float64 (x * x is inf)
    del mat
    err = math.sqrt(residual / total) if total > 0 else 0.0
    biases = {"diff_b": a.t("diff_b").torch()} if a.has("diff_b") else {}
    return Factors(up, down, m.scale, shape, len(shape) if len(shape) > 2 else 2, first.dtype,
                   total=total, residual=residual, lossy_error=err, biases=biases)


def kron_svd(w1, w2, k: int):
    """Top-``k`` SVD terms of kron(w1, w2), plus ‖kron‖² and the squared error of the cut.

    The singular triplets of a Kronecker product are the Kronecker products of its factors' triplets, so two
    small SVDs replace one of the (out x in) product: exact, and the discarded terms give the error directly.
    """
    import torch

    u1, s1, v1 = svd(w1)
    u2, s2, v2 = svd(w2)
    products = torch.outer(s1, s2).flatten()
    top = torch.topk(products, min(k, products.numel())).indices  # largest first
    i, j = top // s2.numel(), top % s2.numel()
    u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, top.numel())  # kron(u1[:, i], u2[:, j])
    vh = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(top.numel(), -1)  # kron(v1[i], v2[j])
    squares = products.double() ** 2
    total = float(squares.sum())
    squares[top] = 0
    return u, products[top], vh, total, float(squares.sum())


def stored_factors(name: str, up, down, f: Factors, dtype) -> tuple[Any, Any]:
    """``(up, down)`` (flat, on the device) as fresh row-major host tensors in the stored layout and ``dtype``
    (None: the module's own); a FormatError when a value leaves that dtype's range."""
    import torch

    k = up.shape[1]
    out = dtype or f.dtype

    def stored(x, shape):  # a fresh row-major host tensor: QR outputs come column-major, even along unit dims
        t = torch.empty(shape, dtype=out).copy_(x.reshape(shape))
        if t.is_floating_point() and x.numel():
            lo, hi = torch.aminmax(x)  # one pass: only a result that may leave the dtype's range gets the tests below
            if -torch.finfo(out).max <= lo.item() and hi.item() <= torch.finfo(out).max:
                return t
        wide = t.float() if t.element_size() == 1 else t  # torch has no isfinite for float8
        if not bool(torch.isfinite(wide).all()) and bool(torch.isfinite(x).all()):
            raise FormatError(f"module {name}: the result lies beyond {str(out).removeprefix('torch.')}'s "
                              "range (Inf); pass a wider --dtype")
        return t

    return stored(up, (f.shape[0], k, *([1] * (f.up_ndim - 2)))), stored(down, (k, *f.shape[1:]))


def wrap_module(template: Module, up_t, down_t, alpha: float, f: Factors, mem: MemorySource, dtype,
                rslora: bool = False, biases: dict | None = None) -> Module:
    """A LoRA module over stored factors (:func:`stored_factors`), named as ``template``, its tensors in ``mem``."""
    key = f"{len(mem.keys())}:{template.component}.{template.name}"
    tensors = {"lora_down": mem.add(key + ".lora_down", down_t), "lora_up": mem.add(key + ".lora_up", up_t)}
    for role, t in (f.biases if biases is None else biases).items():
        tensors[role] = mem.add(f"{key}.{role}", t.to(dtype) if dtype is not None else t)
    return Module(name=template.name, component=template.component, adapter=LoRA(tensors), alpha=alpha,
                  rslora=rslora, keys=[], target=template.target, part=template.part)


def lora_module(template: Module, up, down, alpha: float, f: Factors, mem: MemorySource, dtype,
                rslora: bool = False, biases: dict | None = None) -> Module:
    """A LoRA module with the factors (flat, on the device) reshaped to the stored layout, named as ``template``."""
    up_t, down_t = stored_factors(template.name, up, down, f, dtype)
    return wrap_module(template, up_t, down_t, alpha, f, mem, dtype, rslora, biases)


def copy_module(m: Module, mem: MemorySource, dtype=None) -> Module:
    """The module unchanged (same tensors, same alpha), its tensors moved into ``mem``."""
    key = f"{len(mem.keys())}:{m.component}.{m.name}"
    tensors = {}
    for role, ref in m.adapter.tensors.items():
        t = ref.torch()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        tensors[role] = mem.add(f"{key}.{role}", t)
    return Module(name=m.name, component=m.component, adapter=type(m.adapter)(tensors), alpha=m.alpha,
                  rslora=m.rslora, keys=[], target=m.target, part=m.part)

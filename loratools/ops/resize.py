"""Rank reduction: each module truncated to its best rank-k approximation, computed in factor space.

A LoRA module ΔW = s·B·A is never formed densely: the SVD of B·A comes from QR of B and Aᵀ and an r×r
SVD (ops/lowrank.py), the top k terms are kept (Eckart–Young: the optimal rank-k approximation), and
the new factors B' = U√S, A' = √S·Vᵀ carry ΔW/s with alpha' = s·k (s·√k for rsLoRA), so the effective
scale is unchanged. LoHa, LoKr and full-diff modules become LoRA through a dense SVD at ``lossy_rank``.

The helpers here (reading a module as flat factors, writing factors back as a LoRA module) are shared
with ops/merge.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loratools.adapters import LoRA
from loratools.errors import FormatError, UsageError
from loratools.io.reader import DTYPE_SIZES
from loratools.model import Lora, MemorySource, Module
from loratools.ops.validate import check_writable
from loratools.ops.lowrank import (FactorSVD, check_rank, compute_dtype, dense_svd, parse_dynamic, resolve_device,
                                   select_rank, split_factors, svd, svd_of, truncation)
from loratools.ops.threads import small_matrix_threads

# Adapter kinds that become LoRA only through a dense, lossy SVD; the names users know them by.
LOSSY = {"loha": "LoHa", "lokr": "LoKr", "full": "full-diff"}
# Bias deltas a LoRA module may carry: PEFT's lora_B bias is scaled with the module, diff_b is not.
BIAS_ROLES = ("lora_up_bias", "diff_b")
_DTYPE_NAMES = {"fp16": "float16", "f16": "float16", "float16": "float16", "half": "float16",
                "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "f32": "float32",
                "float32": "float32", "float": "float32", "fp64": "float64", "f64": "float64", "float64": "float64"}
# Embedded hashes describe the input's tensors; after resizing or merging they would be wrong.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass
class Factors:
    """A module's ΔW/s as a flat product ``up @ down`` ([m, r] @ [r, n]) on the compute device."""

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


@dataclass
class RankRule:
    """How many singular values to keep: a fixed rank or a dynamic rule, with an optional cap."""

    rank: int | None = None
    dynamic: tuple[str, float] | None = None
    max_rank: int | None = None

    @classmethod
    def make(cls, rank=None, dynamic=None, max_rank=None, required: bool = True) -> RankRule | None:
        rank, max_rank = check_rank(rank), check_rank(max_rank, "max_rank")
        if rank is not None and dynamic is not None:
            raise UsageError("pass either --rank or --dynamic, not both")
        if rank is None and dynamic is None:
            if required:
                raise UsageError("pass --rank N or --dynamic METHOD:VALUE")
            if max_rank is not None:
                raise UsageError("--max-rank needs --rank or --dynamic")
            return None
        return cls(rank, None if dynamic is None else parse_dynamic(dynamic), max_rank)

    def select(self, s) -> int:
        return select_rank(s, rank=self.rank, dynamic=self.dynamic, max_rank=self.max_rank)

    def as_dict(self) -> dict:
        dyn = None if self.dynamic is None else {"method": self.dynamic[0], "value": self.dynamic[1]}
        return {"rank": self.rank, "dynamic": dyn, "max_rank": self.max_rank}


def storage_dtype(dtype):
    """A torch dtype from ``None`` (keep the input's), a torch dtype, or a name such as ``"fp16"``."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).strip().lower())
    if name is None:
        raise UsageError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32")
    return getattr(torch, name)


def check_modules(lora: Lora, lossy_rank: int | None) -> None:
    """Refuse, before any work, modules that cannot become LoRA with the options given."""
    for m in lora.modules:
        if m.magnitude is not None:
            raise UsageError("DoRA modules need the base weights: pass --base CKPT", lora.path)
        kind = m.adapter.kind
        if kind in ("lora", "norm") or is_vector(m):
            continue
        if kind not in LOSSY:
            raise UsageError(f"{m.adapter.label} modules depend on the base weights and cannot become LoRA",
                             lora.path)
        if lossy_rank is None:
            raise UsageError(f"{LOSSY[kind]} modules need --lossy-rank N to become LoRA (a lossy SVD)", lora.path)


def is_vector(m: Module) -> bool:
    """A delta with no matrix to factor (norm weights, a bias-only or 1-D diff): carried, not resized."""
    a = m.adapter
    if a.kind == "norm":
        return True
    return a.kind == "full" and (not a.has("diff") or len(a.t("diff").shape) < 2)


def module_factors(m: Module, device, lossy_rank: int | None = None) -> Factors:
    """Read a matrix module as flat factors on ``device``; one host-to-device copy per tensor."""
    a = m.adapter
    if a.kind != "lora":
        return _lossy_factors(m, device, lossy_rank)
    a.check()
    up_t, down_t = a.up.torch(), a.down.torch()
    cdt = compute_dtype(up_t, down_t)
    up, down = up_t.to(device, cdt).flatten(1), down_t.to(device, cdt)
    if a.has("lora_mid"):
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
        raise UsageError(f"{LOSSY.get(a.kind, a.kind)} modules need --lossy-rank N to become LoRA (a lossy SVD)")
    first = next(iter(a.tensors.values())).torch()
    if a.kind == "lokr":
        w1, w2 = a.w1(), a.w2()
        if w2.dim() == 2:  # ΔW = kron(w1, w2): its SVD comes from the factors' SVDs, exactly, without ΔW
            cdt = compute_dtype(first)
            u, s, vh, total, residual = kron_svd(w1.to(device, cdt), w2.to(device, cdt), lossy_rank)
            up, down = split_factors(u, s, vh, s.shape[0])
            shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
            err = math.sqrt(residual / total) if total > 0 else 0.0
            return Factors(up, down, m.scale, shape, 2, first.dtype, total=total, residual=residual,
                           lossy_error=err)
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
    biases = {"diff_b": a.t("diff_b").torch()} if a.kind == "full" and a.has("diff_b") else {}
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


def lora_module(template: Module, up, down, alpha: float, f: Factors, mem: MemorySource, dtype,
                rslora: bool = False, biases: dict | None = None) -> Module:
    """A LoRA module with the factors (flat, on the device) reshaped to the stored layout, named as ``template``."""
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
            raise FormatError(f"module {template.name}: the result lies beyond {str(out).removeprefix('torch.')}'s "
                              "range (Inf); pass a wider --dtype")
        return t

    down_t = stored(down, (k, *f.shape[1:]))
    up_t = stored(up, (f.shape[0], k, *([1] * (f.up_ndim - 2))))
    key = f"{len(mem.keys())}:{template.component}.{template.name}"
    tensors = {"lora_down": mem.add(key + ".lora_down", down_t), "lora_up": mem.add(key + ".lora_up", up_t)}
    for role, t in (f.biases if biases is None else biases).items():
        tensors[role] = mem.add(f"{key}.{role}", t.to(out) if dtype is not None else t)
    return Module(name=template.name, component=template.component, adapter=LoRA(tensors), alpha=alpha,
                  rslora=rslora, keys=[], target=template.target, part=template.part)


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


def output_lora(first: Lora, modules: list[Module], mem: MemorySource) -> Lora:
    """The result as a normal Lora over in-memory tensors, with the first input's format and metadata.

    A PEFT ``config`` is not carried: its ``r``/``lora_alpha``/``use_rslora`` describe the input's modules, and
    a writer must derive them from the new ones.
    """
    meta = {k: v for k, v in first.metadata.items() if k not in _STALE_METADATA}
    tensors = {ref.key: ref for m in modules for ref in m.adapter.tensors.values()}
    return Lora(path=MemorySource.path, format=first.format, modules=modules, metadata=meta,
                family=first.family, tensors=tensors, source=mem, size_bytes=size_of(modules)[1])


def size_of(modules) -> tuple[int, int]:
    """(parameters, bytes) of the modules' tensors."""
    params = nbytes = 0
    for m in modules:
        for ref in m.adapter.tensors.values():
            params += ref.numel
            nbytes += ref.numel * DTYPE_SIZES.get(ref.dtype, 4)
    return params, nbytes


def cpu_threads(device):
    """One BLAS thread for the per-module loop on CPU (tall-skinny QRs gain nothing from more, and lose
    many times over when the cores are busy); CUDA work is left alone."""
    import contextlib

    return small_matrix_threads() if device.type == "cpu" else contextlib.nullcontext()


def scale_alpha(scale: float, k: int, rslora: bool) -> float:
    """The alpha that gives a rank-k module the effective scale ``scale``."""
    return scale * (math.sqrt(k) if rslora else k)


def resize(lora: Lora, *, rank: int | None = None, dynamic=None, max_rank: int | None = None,
           lossy_rank: int | None = None, device="auto", dtype=None,
           allow_nonfinite: bool = False) -> tuple[Lora, dict]:
    """Reduce every module to its best rank-k approximation (k fixed, or chosen per module).

    Args:
        lora: the input (``loratools.load``).
        rank: keep this many singular values per module; modules already at or below it are copied.
        dynamic: ``"sv_ratio:V"`` (keep σᵢ ≥ σ₁/V), ``"sv_fro:V"`` (smallest k keeping the fraction V of
            Σσ²) or ``"sv_cumulative:V"`` (smallest k keeping the fraction V of Σσ).
        max_rank: cap on k (with ``dynamic``).
        lossy_rank: rank at which LoHa, LoKr and full-diff modules become LoRA (a dense SVD).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        dtype: storage dtype of the new factors (``None``: each module's input dtype; or ``"fp16"``...).

    Returns:
        ``(Lora, report)``: a Lora of LoRA modules over in-memory tensors, and the per-module report.

    Example:
        >>> small, report = resize(loratools.load("style.safetensors"), rank=32)
        >>> report["summary"]["retained_min"]
    """
    rule = RankRule.make(rank, dynamic, max_rank)
    lossy_rank = check_rank(lossy_rank, "lossy_rank")
    dev, out_dtype = resolve_device(device), storage_dtype(dtype)
    check_writable(lora, allow_nonfinite)
    check_modules(lora, lossy_rank)
    mem, modules, rows = MemorySource(), [], []
    with cpu_threads(dev):
        for m in lora.modules:
            with svd_of(m.name, lora.path):
                new, row = _resize_module(m, rule, dev, lossy_rank, mem, out_dtype)
            modules.append(new)
            rows.append(row)
    report = {"path": lora.path, "rule": {**rule.as_dict(), "lossy_rank": lossy_rank}, "device": str(dev),
              "modules": rows, "summary": summarize(rows, lora.modules, modules),
              "warnings": metadata_warnings(lora)}
    return output_lora(lora, modules, mem), report


def _resize_module(m: Module, rule: RankRule, dev, lossy_rank, mem, out_dtype) -> tuple[Module, dict]:
    row = {"name": m.name, "component": m.component, "type": m.adapter.label, "old_rank": m.rank}
    if is_vector(m):
        return copy_module(m, mem, out_dtype), {**row, "action": "kept", "new_rank": None, "retained": 1.0,
                                                "error": 0.0}
    if m.adapter.kind == "lora" and rule.dynamic is None and m.rank <= _fixed_target(rule):
        return _copied(m, mem, out_dtype, row)
    f = module_factors(m, dev, lossy_rank)
    svd = FactorSVD(f.up, f.down)
    s = svd.s
    k = rule.select(s)
    if f.lossy_error is None and k >= m.rank:
        return _copied(m, mem, out_dtype, row)
    up, down = svd.top(k)
    alpha = scale_alpha(f.scale, k, f.rslora)
    new = lora_module(m, up, down, alpha, f, mem, out_dtype, rslora=f.rslora)
    retained, error = truncation(s, k, f.total, f.residual)
    row.update(action="lossy" if f.lossy_error is not None else "truncated", new_rank=k, alpha=alpha,
               retained=retained, error=error)
    if f.lossy_error is not None:
        row["lossy_error"] = f.lossy_error
    return new, row


def _fixed_target(rule: RankRule) -> int:
    return min(r for r in (rule.rank, rule.max_rank) if r is not None)


def _copied(m: Module, mem, out_dtype, row: dict) -> tuple[Module, dict]:
    return copy_module(m, mem, out_dtype), {**row, "action": "copied", "new_rank": m.rank, "alpha": m.alpha,
                                            "retained": 1.0, "error": 0.0}


def summarize(rows: list[dict], before: list[Module], after: list[Module]) -> dict:
    """Counts per action, retained energy (mean, min), worst error, parameters and bytes before/after."""
    kept = [r["retained"] for r in rows if r.get("retained") is not None]
    errors = [r["error"] for r in rows if r.get("error") is not None]
    actions: dict[str, int] = {}
    for r in rows:
        actions[r["action"]] = actions.get(r["action"], 0) + 1
    p0, b0 = size_of(before)
    p1, b1 = size_of(after)
    return {"modules": len(rows), "actions": actions,
            "retained_mean": sum(kept) / len(kept) if kept else None, "retained_min": min(kept, default=None),
            "error_max": max(errors, default=None),
            "parameters_before": p0, "parameters_after": p1, "bytes_before": b0, "bytes_after": b1}


def metadata_warnings(lora: Lora) -> list[str]:
    stale = [k for k in _STALE_METADATA if k in lora.metadata]
    return [f"dropped stale metadata hashes: {', '.join(stale)}"] if stale else []


def to_lora(lora: Lora, lossy_rank: int, device="auto") -> tuple[Lora, list[str]]:
    """LoHa, LoKr and full-diff modules as rank-``lossy_rank`` LoRA (dense SVD); LoRA modules unchanged.

    Returns the new Lora and notes with the per-module relative error of each lossy step.
    """
    check_modules(lora, lossy_rank)
    dev = resolve_device(device)
    mem, modules, notes = MemorySource(), [], []
    with cpu_threads(dev):
        for m in lora.modules:
            if m.adapter.kind == "lora" or is_vector(m):
                modules.append(m)
                continue
            with svd_of(m.name, lora.path):
                f = module_factors(m, dev, lossy_rank)
            k = f.up.shape[1]
            modules.append(lora_module(m, f.up, f.down, scale_alpha(f.scale, k, False), f, mem, None))
            notes.append(f"{m.name}: {m.adapter.label} -> rank-{k} LoRA, relative error {f.lossy_error:.3g}")
    out = Lora(path=lora.path, format=lora.format, modules=modules, metadata=dict(lora.metadata),
               family=lora.family, tensors=lora.tensors, source=lora.source, size_bytes=lora.size_bytes)
    return out, notes

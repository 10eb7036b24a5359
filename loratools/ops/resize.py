"""Rank reduction: each module truncated to its best rank-k approximation, computed in factor space.

A LoRA module ΔW = s·B·A is never formed densely: the SVD of B·A comes from QR of B and Aᵀ and an r×r
SVD (ops/lowrank.py), the top k terms are kept (Eckart–Young: the optimal rank-k approximation), and
the new factors B' = U√S, A' = √S·Vᵀ carry ΔW/s with alpha' = s·k (s·√k for rsLoRA), so the effective
scale is unchanged. LoHa, LoKr and full-diff modules become LoRA through a dense SVD at ``lossy_rank``
(ops/factors.py). Modules of one shape are decomposed together, in batches spread over the cores
(ops/batched.py); each module's result is the one it would get alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from loratools.errors import FormatError, UsageError
from loratools.io.reader import DTYPE_SIZES
from loratools.model import Lora, MemorySource, Module
from loratools.ops.batched import factor_svds
from loratools.ops.factors import (BIAS_ROLES, Factors, copy_module, factor_job, kron_svd,  # noqa: F401
                                   lora_module, module_factors, stored_factors, wrap_module)
from loratools.ops.lowrank import NoSVD, check_rank, parse_dynamic, resolve_device, select_rank, svd_of, truncation
from loratools.ops.threads import small_matrix_threads
from loratools.ops.validate import _Bits, check_writable, nonfinite

_DTYPE_NAMES = {"fp16": "float16", "f16": "float16", "float16": "float16", "half": "float16",
                "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "f32": "float32",
                "float32": "float32", "float": "float32", "fp64": "float64", "f64": "float64", "float64": "float64"}
# Embedded hashes describe the input's tensors; after resizing or merging they would be wrong.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


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
            raise UsageError("DoRA modules need the base weights, so they cannot be resized or merged as LoRA; "
                             "bake them into the base instead (loratools bake)", lora.path)
        a = m.adapter
        if a.exact_lora or a.is_vector:
            continue
        if a.lossy_name is None:
            raise UsageError(f"{a.label} modules depend on the base weights and cannot become LoRA", lora.path)
        if lossy_rank is None:
            raise UsageError(f"{a.lossy_name} modules need --lossy-rank N to become LoRA (a lossy SVD)", lora.path)


def output_lora(first: Lora, modules: list[Module], mem: MemorySource) -> Lora:
    """The result as a normal Lora over in-memory tensors, with the first input's path (what messages about
    it name), format and metadata.

    A PEFT ``config`` is not carried: its ``r``/``lora_alpha``/``use_rslora`` describe the input's modules, and
    a writer must derive them from the new ones.
    """
    meta = {k: v for k, v in first.metadata.items() if k not in _STALE_METADATA}
    tensors = {ref.key: ref for m in modules for ref in m.adapter.tensors.values()}
    return Lora(path=first.path, format=first.format, modules=modules, metadata=meta,
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
    check_before_svds(lora, allow_nonfinite)
    check_modules(lora, lossy_rank)
    mem, jobs = MemorySource(), []
    modules: list = [None] * len(lora.modules)
    rows: list = [None] * len(lora.modules)
    with cpu_threads(dev), nonfinite_reported([lora], allow_nonfinite):
        for i, m in enumerate(lora.modules):
            row = {"name": m.name, "component": m.component, "type": m.adapter.label, "old_rank": m.rank}
            if m.adapter.is_vector:
                modules[i] = copy_module(m, mem, out_dtype)
                rows[i] = {**row, "action": "kept", "new_rank": None, "retained": 1.0, "error": 0.0}
            elif m.adapter.exact_lora and rule.dynamic is None and m.rank <= _fixed_target(rule):
                modules[i], rows[i] = _copied(m, mem, out_dtype, row)
            else:
                with svd_of(m.name, lora.path):  # a lossy conversion's dense SVD, here
                    f, job = factor_job(len(jobs), m, dev, lossy_rank)
                job.payload, job.modules = (i, m, f, row), (m,)
                jobs.append(job)
        outs = checked_svds([lora], jobs, _chooser(rule), _stored(out_dtype), dev, allow_nonfinite, lora.path)
    for job, out in zip(jobs, outs):
        i, m, f, row = job.payload
        if out is None:
            modules[i], rows[i] = _copied(m, mem, out_dtype, row)
            continue
        k, up_t, down_t, retained, error = out
        alpha = scale_alpha(f.scale, k, f.rslora)
        modules[i] = wrap_module(m, up_t, down_t, alpha, f, mem, out_dtype, rslora=f.rslora)
        rows[i] = {**row, "action": "lossy" if f.lossy_error is not None else "truncated", "new_rank": k,
                   "alpha": alpha, "retained": retained, "error": error}
        if f.lossy_error is not None:
            rows[i]["lossy_error"] = f.lossy_error
    report = {"path": lora.path, "rule": {**rule.as_dict(), "lossy_rank": lossy_rank}, "device": str(dev),
              "modules": rows, "summary": summarize(rows, lora.modules, modules),
              "warnings": metadata_warnings(lora)}
    return output_lora(lora, modules, mem), report


def check_before_svds(lora: Lora, allow_nonfinite: bool) -> None:
    """check_writable without the factors' NaN/Inf test, which comes with their SVD (checked_svds); a refusal is
    the whole check's, naming every module."""
    try:
        check_writable(lora, allow_nonfinite, tensors=False)
    except FormatError:
        check_writable(lora, allow_nonfinite)
        raise


def checked_svds(loras: list[Lora], jobs: list, choose, finish, dev, allow_nonfinite: bool, path=None) -> list:
    """``ops.batched.factor_svds`` after the NaN/Inf test that ``check_writable(tensors=False)`` left out, done in
    one pass: the batches test the factors they decompose (from the min and max they take anyway), and this tests
    every other tensor. Run it within :func:`nonfinite_reported`."""
    if not allow_nonfinite:
        batched, bits = {id(m) for job in jobs for m in job.modules}, _Bits()
        for lora in loras:
            for m in lora.modules:
                if id(m) not in batched:
                    bad = nonfinite(m, bits) is not None
                else:
                    bad = any(not bits.finite(m.adapter.t(r)) for r in BIAS_ROLES if m.adapter.has(r))
                if bad:
                    check_writable(lora)
    for lora in loras:  # the descriptor workers read through, opened once here
        fileno = getattr(lora.source, "fileno", None)
        if fileno is not None:
            fileno()
    return factor_svds(jobs, choose, finish, dev, path)


@contextlib.contextmanager
def nonfinite_reported(loras: list[Lora], allow_nonfinite: bool):
    """A NaN or Inf that an SVD met is reported as check_writable reports it (one line naming every such module),
    unless ``allow_nonfinite``: then the NoSVD names its module (an SVD of them is not defined)."""
    try:
        yield
    except NoSVD as e:
        if not allow_nonfinite and "NaN or Inf" in e.message:
            for lora in loras:
                check_writable(lora)
        raise


def _chooser(rule: RankRule):
    def choose(job, s):
        """k from the module's spectrum; None when nothing is cut (the module is then copied as it is)."""
        _, m, f, _ = job.payload
        k = rule.select(s)
        return None if f.lossy_error is None and k >= m.rank else k

    return choose


def _stored(out_dtype):
    def finish(job, s, k, up, down):
        if k is None:
            return None
        _, m, f, _ = job.payload
        up_t, down_t = stored_factors(m.name, up, down, f, out_dtype)
        return (k, up_t, down_t, *truncation(s, k, f.total, f.residual))

    return finish


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
            if m.adapter.exact_lora or m.adapter.is_vector:
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

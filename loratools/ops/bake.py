"""Baking LoRAs into a base checkpoint: W' = W + Σ strengthᵢ·sᵢ·ΔWᵢ, streamed tensor by tensor.

Every LoRA module is brought to its canonical identity (family naming tables) and located in the base
(``io.checkpoints``): a whole weight, a row slice of a fused weight, or several diffusers weights that a
fused native module splits into. The output header is planned from the base header; tensors are then read,
patched (float32, on the chosen device) and written one at a time, so memory is bounded by a few tensors,
not by the checkpoint. ΔW of a module is computed only when its base tensor comes by.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

from loratools.errors import FormatError, LoraToolsError, ShapeMismatch, UsageError
from loratools.families import Family
from loratools.io.checkpoints import Base, copy_file, rewrite_index
from loratools.io.reader import DTYPE_SIZES, TORCH_DTYPES
from loratools.model import Lora, Module
from loratools.ops.canonical import canonicalize
from loratools.ops.patch import Patch, bias_of, cast_checked, cpu_products, patch_tensor
from loratools.ops.pipeline import Pipeline
from loratools.ops.placement import Placement, base_family, locate
from loratools.ops.quant import dequantised, dropped_when_widened, quantised, weight_scale_key
from loratools.ops.threads import compute_threads, peak_rss_mb

_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_FP8 = {"F8_E4M3", "F8_E5M2"}


@dataclass
class BakeResult:
    base: str
    output: str
    device: str
    dtype: str
    loras: list[dict] = field(default_factory=list)
    patched_tensors: int = 0
    copied_tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resolve_modules(lora: Lora, family: Family, allow_unmatched: bool):
    """(canonical pairs, names the family tables lack); the lack is an error unless allowed."""
    try:
        return canonicalize(lora, family, lora_only=False), []
    except FormatError:
        if not allow_unmatched:
            raise
    pairs, missing = [], []
    for m in lora.modules:  # one at a time, to keep the modules that do resolve
        try:
            pairs += canonicalize(replace(lora, modules=[m]), family, lora_only=False)
        except FormatError:
            missing.append(f"{m.component}:{m.name}")
    return pairs, missing


def _needs_swap(family: Family, canon, where: Placement, m: Module) -> bool:
    if canon.space != "model":
        return False
    rule = family.naming.rule("model", canon.native)
    swap = rule.swaps(canon.naming, where.naming, m.adapter.out_dim or 0, m.adapter.in_dim or 0)
    if swap and m.adapter.needs_base:
        raise UsageError(f"module {m.name}: a {m.adapter.label} module on a weight whose shift/scale halves trade "
                         "places between namings is not supported")
    return swap


def plan_patches(base: Base, loras: list[tuple[Lora, float, Family]], allow_unmatched: bool):
    """Base key -> patches in LoRA order, plus the unmatched module names and per-LoRA counts."""
    patches: dict[str, list[Patch]] = defaultdict(list)
    unmatched, counts = [], []
    for lora, strength, family in loras:
        fid = family.id
        pairs, missing = resolve_modules(lora, family, allow_unmatched)
        matched = 0
        for m, c in pairs:
            places = locate(base, family, c, m.adapter.out_dim or 0)
            if not places:
                missing.append(f"{m.component}:{m.name}")
                continue
            matched += 1
            for p in places:
                swap = _needs_swap(family, c, p, m)
                if m.adapter.moves_weight:
                    patches[p.key].append(Patch(m, strength, p, swap, fid))
                if bias_of(m) is not None:
                    if p.bias_key is None:
                        raise ShapeMismatch(f"module {m.name} adapts a bias but the base has no {p.key[:-7]}.bias",
                                            lora.path)
                    patches[p.bias_key].append(Patch(m, strength, p, swap, fid, bias=True))
        unmatched += [f"{os.path.basename(lora.path)}: {n}" for n in missing]
        counts.append({"modules": len(lora.modules), "matched": matched, "unmatched": len(missing)})
    return patches, unmatched, counts


def unmatched_error(unmatched: list[str], loras, base: Base) -> FormatError:
    shown = ", ".join(unmatched[:20]) + (f" and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
    fams = sorted({f.id for _, _, f in loras})
    guess = base_family(base)[0]
    if guess and guess not in fams:
        cause = f"the LoRA is {'/'.join(fams)} but the base looks like {guess}"
    elif all(": te" in u for u in unmatched):
        cause = "the base holds no text encoder weights for them (a model-only file?)"
    else:
        # the LoRA's variant (an I2V LoRA's image cross-attention, a control LoRA's input) is often what the base lacks
        variants = sorted({v for lora, _, _ in loras if (v := getattr(lora.family, "variant", None))})
        kind = f" {'/'.join(variants)}" if variants else ""
        cause = f"the LoRA is {'/'.join(fams)}{kind}: is the base a {'/'.join(fams)}{kind} checkpoint?"
    return FormatError(f"{len(unmatched)} LoRA modules have no weight in the base: {shown} — {cause} "
                       "(--allow-unmatched skips them)", base.path)


def out_dtype_name(dtype: str, wanted: str | None) -> str:
    return wanted if wanted and dtype in _FLOATS else dtype


def _file_items(bf, patches, device, wanted, result: BakeResult, pipe: Pipeline):
    """(name, dtype, shape, callable) in base order; the callables pull results from the pipeline."""
    import torch

    jobs, items = [], []
    tensors = bf.header.tensors
    dropped = dropped_when_widened(tensors) if _widens(wanted) else set()
    for name, info in tensors.items():
        if name in dropped:  # a dequantised layer's scales: the written weight is plain
            continue
        key = f"{bf.component}/{name}" if bf.component else name
        todo = patches.get(key, [])
        dtype = out_dtype_name(info.dtype, wanted)
        if todo and info.dtype in _FP8 and dtype == info.dtype:
            result.warnings.append(f"{key}: patched in fp8; rounding to 8 bits loses much of a small ΔW "
                                   "(--dtype bf16 keeps it)")
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        scale_key = weight_scale_key(tensors, name)
        if scale_key and (todo or dtype != info.dtype):  # scaled fp8: patch (or widen) the weight loaders use
            scale = bf.sf.torch(scale_key).clone()
            jobs.append((name, lambda w, t=todo, s=scale, d=torch_dtype, k=key: _scaled(w, t, s, d, k, device,
                                                                                          result.warnings)))
            result.patched_tensors += bool(todo)
            result.copied_tensors += not todo
        elif todo:
            # the pipeline's read buffer is ours to overwrite; the reader thread reads the factors beforehand
            jobs.append((name, lambda w, pr, t=todo, d=torch_dtype: patch_tensor(w, t, device, d, True, pr),
                         lambda t=todo: cpu_products(t, device)))
            result.patched_tensors += 1
        elif dtype != info.dtype:
            jobs.append((name, lambda w, d=torch_dtype, k=key: cast_checked(w, d, k)))
            result.copied_tensors += 1
        else:  # byte for byte, copied file to file by the writer
            result.copied_tensors += 1
            items.append((name, dtype, info.shape, bf.sf.spans(name, [(0, info.nbytes)])))
            result.bytes_written += info.nbytes
            continue
        items.append((name, dtype, info.shape, pipe.next))  # computed by the pipeline, in this order
        result.bytes_written += info.numel * _size(dtype)
    pipe.start(bf.sf, jobs)
    return items


def _size(dtype: str) -> int:
    return DTYPE_SIZES[dtype]


def _widens(wanted: str | None) -> bool:
    return wanted is not None and wanted not in _FP8


def _scaled(w, todo: list[Patch], scale, out_dtype, key: str, device, warnings: list[str]):
    """A scaled-fp8 weight dequantised, patched, and either quantised again at its scale or left wide."""
    import torch

    x = dequantised(w, scale)
    if todo:
        x = patch_tensor(x, todo, device, torch.float32)
    if out_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return quantised(x, scale, out_dtype, key, warnings)
    return cast_checked(x, out_dtype, key)


@contextlib.contextmanager
def _pipeline(device):
    with compute_threads(), Pipeline(device) as pipe:
        yield pipe


def write_baked(base: Base, patches, output: str, metadata: dict, *, device, wanted, overwrite: bool,
                result: BakeResult, sync: bool = False) -> None:
    """Write the patched base at ``output`` (a file, or a folder mirroring a folder base), atomically."""
    from loratools.io.writer import write_safetensors

    if not base.is_folder:
        with _pipeline(device) as pipe:
            items = _file_items(base.files[0], patches, device, wanted, result, pipe)
            write_safetensors(output, items, {**base.files[0].header.metadata, **metadata}, overwrite=overwrite,
                              sync=sync)
        return
    from loratools.io.atomic import atomic_folder

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        _write_folder(base, patches, str(tmp), metadata, device, wanted, result, sync)


def _write_folder(base: Base, patches, tmp: str, metadata: dict, device, wanted, result, sync: bool) -> None:
    from loratools.io.writer import write_safetensors

    sizes: dict[str, int] = {}
    dropped = {f"{bf.component}/{n}" if bf.component else n for bf in base.files
               for n in (dropped_when_widened(bf.header.tensors) if _widens(wanted) else ())}
    for bf in base.files:
        dest = os.path.join(tmp, bf.rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        before = result.bytes_written
        if _untouched(bf, patches, wanted):  # a component no LoRA adapts: the file as it is
            copy_file(os.path.join(base.path, bf.rel), dest)
            result.copied_tensors += len(bf.header.tensors)
            result.bytes_written += sum(i.nbytes for i in bf.header.tensors.values())
            sizes[bf.rel] = result.bytes_written - before
            continue
        with _pipeline(device) as pipe:
            items = _file_items(bf, patches, device, wanted, result, pipe)
            write_safetensors(dest, items, {**bf.header.metadata, **metadata}, sync=sync)
        sizes[bf.rel] = result.bytes_written - before
    for rel, index in base.indexes.items():
        folder = os.path.dirname(rel)
        shard_sizes = {r: n for r, n in sizes.items() if os.path.dirname(r) == folder}
        component = folder.replace(os.sep, "/")
        gone = {k.split("/", 1)[1] if component else k for k in dropped
                if (k.split("/", 1)[0] == component if component else "/" not in k)}
        rewrite_index(index, os.path.join(tmp, rel), shard_sizes, gone)
    for rel in base.others:
        dest = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        copy_file(os.path.join(base.path, rel), dest)


def _untouched(bf, patches, wanted) -> bool:
    prefix = f"{bf.component}/" if bf.component else ""
    casts = wanted and any(i.dtype in _FLOATS and i.dtype != wanted for i in bf.header.tensors.values())
    return not casts and not any(prefix + name in patches for name in bf.header.tensors)


def bake_loras(base: Base, loras: list[tuple[Lora, float, Family]], output: str, *, dtype: str | None = None,
               device="auto", allow_unmatched: bool = False, overwrite: bool = False,
               provenance: list[dict] | None = None, sync: bool = False) -> BakeResult:
    """Bake ``loras`` ((Lora, strength, family) in order) into ``base`` and write ``output``."""
    from loratools._version import __version__
    from loratools.ops.lowrank import resolve_device

    start = time.perf_counter()
    dev = resolve_device(device)
    if os.path.abspath(output) == os.path.abspath(base.path):
        raise UsageError("the output would replace the base; choose another path", output)
    if os.path.lexists(output) and not overwrite:
        raise LoraToolsError("output exists; pass --overwrite to replace it", output)
    patches, unmatched, counts = plan_patches(base, loras, allow_unmatched)
    if unmatched and not allow_unmatched:
        raise unmatched_error(unmatched, loras, base)
    result = BakeResult(base.path, output, str(dev), dtype or "keep", unmatched=unmatched)
    provenance = provenance or [{"file": os.path.basename(l.path), "strength": s} for l, s, _ in loras]
    for info, count, (_, _, fam) in zip(provenance, counts, loras):
        result.loras.append({**info, "family": fam.id, **count})
    meta = {"loratools.version": __version__, "loratools.baked": json.dumps(provenance)}
    try:
        write_baked(base, patches, output, meta, device=dev, wanted=dtype, overwrite=overwrite, result=result,
                    sync=sync)
    except LoraToolsError as exc:  # raised while patching a tensor: name the base it was patching
        exc.path = exc.path or base.path
        raise
    result.seconds = round(time.perf_counter() - start, 3)
    result.peak_rss_mb = peak_rss_mb()
    return result

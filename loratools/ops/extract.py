"""Extracting a LoRA from two checkpoints of one family: ΔW = W_tuned − W_base, factored by (randomised) SVD.

Layers follow the family naming tables: every base weight that maps to a known module (attention and MLP
linears, 1×1 convs; k×k convs only with a conv rank; text encoders only when asked) is read from both
checkpoints one pair at a time, so memory stays at a few tensors. The factors B = U√S, A = √S·Vᵀ keep the top
singular terms; what each module keeps is reported as retained energy Σₖσ²/‖ΔW‖². The result is written
through the convert writers, so every output format (and fused-weight splitting) comes for free.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratools.errors import LoraToolsError, ShapeMismatch, UsageError
from loratools.families import Family, get_family
from loratools.io.checkpoints import Base
from loratools.model import MemorySource, Module
from loratools.ops.placement import (MODEL_NATIVE_PREFIXES, encoder_prefixes, model_diffusers_prefixes,
                                     openclip_modules)


@dataclass
class ExtractResult:
    base: str
    tuned: str
    output: str
    family: str
    target: str
    device: str
    modules: list[dict] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class Spec:
    rank: int | None
    dynamic: tuple[str, float] | None
    conv_rank: int | None
    text_encoders: bool


def candidates(base: Base, family: Family, text_encoders: bool):
    """(base key, Canon, rows or None, transposed) of every weight the family tables know, in file order."""
    table = family.naming
    enc = [(eid, p) for eid in family.encoders for p in encoder_prefixes(family, eid) if p] if text_encoders else []
    openclip = [(eid, p) for eid, e in family.encoders.items() for p in e.openclip] if text_encoders else []
    for key in base.keys:
        clip = next(((kind, key[len(p):]) for kind, p in openclip if key.startswith(p)), None)
        if clip:  # OpenCLIP layout: fused q/k/v rows, transposed projection
            for path, rows, transposed in openclip_modules(clip[1], base.shape(key)):
                canon = table.resolve(clip[0], path, False)
                if canon:
                    yield key, canon, rows, transposed
            continue
        if not key.endswith(".weight"):
            continue
        stem = key[: -len(".weight")]
        canon = _model_canon(family, stem)
        if canon is None:
            for kind, prefix in enc:
                if stem.startswith(prefix):
                    canon = table.resolve(kind, stem[len(prefix):], False)
                    if canon:
                        break
        if canon is not None:
            yield key, canon, None, False


def _model_canon(family: Family, stem: str):
    for prefix in dict.fromkeys(MODEL_NATIVE_PREFIXES + model_diffusers_prefixes(family)):
        if prefix and not stem.startswith(prefix):
            continue
        canon = family.naming.resolve("model", stem[len(prefix):], False)
        if canon is not None:
            return canon
    return None


# ΔW bytes (float32) per batch of one shape, and held back waiting for their batch in all: with two batches in
# the workers and one being read, memory stays at a few hundred MB whatever the checkpoints' size.
BATCH_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
HELD_BYTES = 128 << 20


@dataclass
class _Change:
    order: int  # the weight's place among the candidates: the output keeps the checkpoint's order
    key: str
    canon: object
    diff: object  # ΔW, float32 on the host
    dtype: object  # the storage dtype of the factors (the base weight's, float32 for others)


def _factor_batch(batch: list[_Change], spec: Spec, device, path) -> list[tuple]:
    """(change, up, down, kept rank, retained energy) of each ΔW of a batch of one shape, the factors on the host
    in their storage dtype."""
    import torch

    from loratools.ops.lowrank import NoSVD, select_rank, split_factors, truncation
    from loratools.ops.randomized import top_svd

    shape = batch[0].diff.shape
    rank = spec.conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else spec.rank
    mats = torch.stack([c.diff.reshape(shape[0], -1) for c in batch]).to(device, torch.float32)
    want = None if spec.dynamic else min(rank, *mats.shape[1:])
    try:
        u, s, vh = top_svd(mats, want)
    except NoSVD as e:  # a NaN or Inf in either checkpoint
        raise NoSVD(f"module {batch[e.index].key}: {e.message}", path) from None
    norms = torch.linalg.vector_norm(mats.flatten(1), dim=1).double().cpu().tolist()
    out = []
    for i, change in enumerate(batch):
        total = norms[i] * norms[i] if math.isfinite(norms[i]) else float(mats[i].double().pow(2).sum())
        values = s[i].double().cpu().tolist()
        k = select_rank(values, rank=want, dynamic=spec.dynamic, max_rank=rank)
        retained, _ = truncation(values, k, total=total)
        up, down = split_factors(u[i], s[i], vh[i], k)
        if len(shape) == 4:  # LoCon: A carries the kernel, B is 1×1
            down, up = down.reshape(k, *shape[1:]), up.reshape(up.shape[0], k, 1, 1)
        # row-major host tensors in the storage dtype (SVD factors come column-major)
        up, down = (torch.empty(x.shape, dtype=change.dtype).copy_(x) for x in (up, down))
        out.append((change, up, down, k, retained))
    return out


def _module(canon, key: str, up, down, mem: MemorySource) -> Module:
    from loratools.adapters.lora import LoRA

    adapter = LoRA({"lora_up": mem.add(key + ".up", up), "lora_down": mem.add(key + ".down", down)})
    return Module(canon.native, "model" if canon.space == "model" else canon.space, adapter, alpha=float(up.shape[1]))


def _changes(base: Base, tuned: Base, family: Family, spec: Spec, result: ExtractResult):
    """Every changed weight the tables know, as a _Change, read pair by pair in the checkpoints' order."""
    import torch

    for order, (key, canon, rows, transposed) in enumerate(candidates(base, family, spec.text_encoders)):
        if key not in tuned.keys:
            result.skipped.append(f"{key} (not in the tuned checkpoint)")
            continue
        if base.shape(key) != tuned.shape(key):
            raise ShapeMismatch(f"{key} is {list(base.shape(key))} in the base but {list(tuned.shape(key))} in the "
                                "tuned checkpoint (different families or variants?)", tuned.path)
        shape = base.shape(key)
        if len(shape) < 2:
            continue
        fb, nb = base.keys[key]
        ft, nt = tuned.keys[key]
        w0 = fb.sf.torch(nb)
        diff = ft.sf.torch(nt).to(torch.float32) - w0.to(torch.float32)
        if rows is not None:
            diff, key = diff[rows[0]: rows[1]], f"{key}[{rows[0]}:{rows[1]}]"
        if transposed:
            diff = diff.T
        if not torch.any(diff):
            result.unchanged += 1
            continue
        if diff.dim() == 4 and diff.shape[2:] != (1, 1) and spec.conv_rank is None:
            result.skipped.append(f"{key} (a {'x'.join(map(str, diff.shape[2:]))} conv: pass --conv-rank)")
            continue
        dtype = w0.dtype if w0.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        yield _Change(order, key, canon, diff, dtype)


def extract_pairs(base: Base, tuned: Base, family: Family, spec: Spec, device, result: ExtractResult):
    """[(Module, Canon)] for every changed weight. This thread reads the pairs and forms each ΔW; ΔW of one shape
    are stacked into batches that the workers (ops/batched.py: a thread per core, one intra-op thread each)
    decompose meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from loratools.ops.batched import worker_count
    from loratools.ops.resize import cpu_threads

    budget = BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"])
    workers = worker_count(device)
    groups: dict[tuple, list[_Change]] = {}
    held, running, done = 0, [], []
    with cpu_threads(device), ThreadPoolExecutor(workers) as pool:
        def submit(shape):
            nonlocal held
            batch = groups.pop(shape)
            held -= sum(c.diff.nelement() * 4 for c in batch)
            running.append(pool.submit(_factor_batch, batch, spec, device, tuned.path))
            while len(running) > workers:  # one batch waits while the others run: reading never gets far ahead
                done.extend(running.pop(0).result())

        for change in _changes(base, tuned, family, spec, result):
            shape = tuple(change.diff.shape)
            groups.setdefault(shape, []).append(change)
            held += change.diff.nelement() * 4
            if sum(c.diff.nelement() * 4 for c in groups[shape]) >= budget:
                submit(shape)
            while held > HELD_BYTES:
                submit(max(groups, key=lambda sh: sum(c.diff.nelement() for c in groups[sh])))
        for shape in list(groups):
            submit(shape)
        for future in running:
            done.extend(future.result())
    mem, pairs = MemorySource(), []
    for change, up, down, k, retained in sorted(done, key=lambda d: d[0].order):
        pairs.append((_module(change.canon, change.key, up, down, mem), change.canon))
        result.modules.append({"key": change.key, "rank": k, "retained_energy": round(retained, 6)})
    return pairs


def extract_lora(base: Base, tuned: Base, dest: Path, *, family: str, to: str = "kohya", rank: int | None = None,
                 dynamic=None, conv_rank: int | None = None, text_encoders: bool = False, device="auto",
                 overwrite: bool = False, sync: bool = False) -> ExtractResult:
    """Extract the LoRA that turns ``base`` into ``tuned`` and write it as ``to`` at ``dest``."""
    from loratools._version import __version__
    from loratools.formats import WriteOptions, codec_for
    from loratools.ops.canonical import plan
    from loratools.ops.lowrank import check_rank, parse_dynamic, resolve_device

    start = time.perf_counter()
    codec = codec_for(to)
    if (rank is None) == (dynamic is None) and rank is None:
        raise UsageError("give --rank N or --dynamic METHOD:VALUE")
    spec = Spec(check_rank(rank), parse_dynamic(dynamic) if dynamic is not None else None,
                check_rank(conv_rank, "conv rank"), text_encoders)
    dev = resolve_device(device)
    if dest.exists() and not overwrite:
        raise LoraToolsError("output exists; pass --overwrite to replace it", dest)
    fam = get_family(family)
    if not fam.has_naming:
        raise LoraToolsError(f"loratools has no naming tables for {fam.name} ({fam.id}) yet", base.path)
    result = ExtractResult(base.path, tuned.path, str(dest), family, to, str(dev))
    pairs = extract_pairs(base, tuned, fam, spec, dev, result)
    if not pairs:
        raise LoraToolsError("the checkpoints do not differ in any weight the family tables know", tuned.path)
    mods = plan(pairs, fam, codec.model_naming(fam))
    meta = {"loratools.version": __version__, "loratools.operation": "extract", "loratools.family": family,
            "loratools.target_format": to}
    if fam.naming.architecture:
        meta["modelspec.architecture"] = fam.naming.architecture
    dest.parent.mkdir(parents=True, exist_ok=True)
    codec.write(mods, fam, dest, meta, WriteOptions(None, overwrite, sync))
    result.seconds = round(time.perf_counter() - start, 3)
    return result

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
from loratools.ops.placement import (encoder_prefixes, model_diffusers_prefixes, model_native_prefixes,
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
    for prefix in dict.fromkeys(model_native_prefixes(family) + model_diffusers_prefixes(family)):
        if prefix and not stem.startswith(prefix):
            continue
        canon = family.naming.resolve("model", stem[len(prefix):], False)
        if canon is not None:
            return canon
    return None


# ΔW bytes (float32) per batch of one shape, and in batches being filled in all: with a batch per worker in flight
# as well, memory stays at a few hundred MB whatever the checkpoints' size.
BATCH_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
HELD_BYTES = 128 << 20


@dataclass
class _Change:
    order: int  # the weight's place among the candidates: the output keeps the checkpoint's order
    key: str
    canon: object
    dtype: object  # the storage dtype of the factors (the base weight's, float32 for others)


@dataclass
class _Batch:
    """ΔW of one shape, formed in place in a stacked float32 tensor as the pairs are read."""

    mats: object  # [capacity, out, in·kernel]
    shape: tuple  # each ΔW's own shape
    changes: list = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.changes) == self.mats.shape[0]


def _factor_batch(batch: _Batch, spec: Spec, device, path) -> list[tuple]:
    """(change, up, down, kept rank, retained energy) of each ΔW of a batch, the factors on the host in their
    storage dtype; (change, None, ...) for a ΔW that is all zeros (an unchanged weight)."""
    import torch

    from loratools.ops.lowrank import NoSVD, select_rank, split_factors, truncation
    from loratools.ops.randomized import top_svd

    shape, n = batch.shape, len(batch.changes)
    rank = spec.conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else spec.rank
    mats = batch.mats[:n].to(device)
    batch.mats = None  # the results keep the batch's changes, not its ΔW
    flat = mats.flatten(1)
    changed = (torch.maximum(-flat.amin(1), flat.amax(1)) != 0).cpu().tolist()  # NaN counts as changed
    out = [(c, None, None, 0, 0.0) for c, moved in zip(batch.changes, changed) if not moved]
    changes = [c for c, moved in zip(batch.changes, changed) if moved]
    if not changes:
        return out
    if len(changes) < n:
        mats = mats[torch.tensor(changed, device=mats.device)]
    want = None if spec.dynamic else min(rank, *mats.shape[1:])
    try:
        u, s, vh = top_svd(mats, want)
    except NoSVD as e:  # a NaN or Inf in either checkpoint
        raise NoSVD(f"module {changes[e.index].key}: {e.message}", path) from None
    # ‖ΔW‖² from the rows' norms (float32, short sums) added in float64: one float32 norm of a whole 10240x1280
    # ΔW is off by ~1e-3
    squares = torch.linalg.vector_norm(mats, dim=2).double().pow(2).sum(1).cpu().tolist()
    for i, change in enumerate(changes):
        total = squares[i] if math.isfinite(squares[i]) else float(mats[i].double().pow(2).sum())
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


def _plan(base: Base, tuned: Base, family: Family, spec: Spec, result: ExtractResult) -> list[tuple]:
    """(order, key, Canon, rows, transposed, ΔW shape) of every weight pair to read, from the headers alone."""
    plan = []
    for order, (key, canon, rows, transposed) in enumerate(candidates(base, family, spec.text_encoders)):
        if key not in tuned.keys:
            result.skipped.append(f"{key} (not in the tuned checkpoint)")
            continue
        if base.shape(key) != tuned.shape(key):
            raise ShapeMismatch(f"{key} is {list(base.shape(key))} in the base but {list(tuned.shape(key))} in the "
                                "tuned checkpoint (different families or variants?)", tuned.path)
        shape = tuple(base.shape(key))
        if len(shape) < 2:
            continue
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        plan.append((order, key, canon, rows, transposed, shape[::-1] if transposed else shape))
    return plan


def extract_pairs(base: Base, tuned: Base, family: Family, spec: Spec, device, result: ExtractResult):
    """[(Module, Canon)] for every changed weight. This thread reads the pairs (into two reused buffers) and forms
    each ΔW = W_tuned − W_base in float32 straight into the batch of its shape; the workers (a thread per core,
    one intra-op thread each) decompose the full batches meanwhile."""
    import collections
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    from loratools.ops.batched import worker_count
    from loratools.ops.resize import cpu_threads

    plan = _plan(base, tuned, family, spec, result)
    left = collections.Counter(shape for *_, shape in plan)  # ΔW of each shape still to come
    budget = BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"])
    workers, bufs = worker_count(device), [bytearray(), bytearray()]
    batches: dict[tuple, _Batch] = {}
    running, done = [], []
    with cpu_threads(device), ThreadPoolExecutor(workers) as pool:
        def submit(shape):
            running.append(pool.submit(_factor_batch, batches.pop(shape), spec, device, tuned.path))
            while len(running) > workers:  # a batch per worker at most: reading never gets far ahead
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    running.remove(future)
                    done.extend(future.result())

        for order, key, canon, rows, transposed, shape in plan:
            (fb, nb), (ft, nt) = base.keys[key], tuned.keys[key]
            for i, (sf, name) in enumerate(((fb.sf, nb), (ft.sf, nt))):
                if len(bufs[i]) < sf.info(name).nbytes:  # a new buffer as large as the largest tensor so far
                    bufs[i] = bytearray(sf.info(name).nbytes)
            w0, w1 = fb.sf.torch(nb, into=bufs[0]), ft.sf.torch(nt, into=bufs[1])
            if rows is not None:
                w0, w1, key = w0[rows[0]: rows[1]], w1[rows[0]: rows[1]], f"{key}[{rows[0]}:{rows[1]}]"
            if transposed:
                w0, w1 = w0.T, w1.T
            dtype = w0.dtype if w0.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
            left[shape] -= 1
            if len(shape) == 4 and shape[2:] != (1, 1) and spec.conv_rank is None:
                if torch.equal(w0, w1):
                    result.unchanged += 1
                else:
                    result.skipped.append(f"{key} (a {'x'.join(map(str, shape[2:]))} conv: pass --conv-rank)")
                continue
            if shape not in batches:
                size = 4 * math.prod(shape)
                capacity = max(1, min(budget // size, left[shape] + 1))
                batches[shape] = _Batch(torch.empty(capacity, shape[0], math.prod(shape[1:])), shape)
            batch = batches[shape]
            slot = batch.mats[len(batch.changes)].view(shape)
            slot.copy_(w1)
            # in float32: an fp16/bf16 operand is widened as it is read; torch promotes no float8
            slot.sub_(w0 if w0.element_size() > 1 or not w0.is_floating_point() else w0.float())
            batch.changes.append(_Change(order, key, canon, dtype))
            if batch.full:
                submit(shape)
            while sum(b.mats.nelement() * 4 for b in batches.values()) > HELD_BYTES:
                submit(max(batches, key=lambda sh: len(batches[sh].changes) * math.prod(sh)))
        for shape in list(batches):
            submit(shape)
        for future in running:
            done.extend(future.result())
    mem, pairs = MemorySource(), []
    for change, up, down, k, retained in sorted(done, key=lambda d: d[0].order):
        if up is None:
            result.unchanged += 1
            continue
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
        if not result.unchanged and not any(key in tuned.keys for key, *_ in candidates(base, fam, spec.text_encoders)):
            raise LoraToolsError(f"none of the base's {fam.name} weights is in the tuned checkpoint (a LoRA, or a "
                                 "checkpoint of another family or layout?)", tuned.path)
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

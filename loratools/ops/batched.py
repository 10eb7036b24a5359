"""Factor-space SVDs of many modules at once: modules of one shape are stacked and decomposed together.

An SDXL LoRA has ~1000 modules but only a dozen shapes. Stacking the modules of one shape turns ~6 small
LAPACK/BLAS calls per module into ~6 calls per batch (ops/lowrank.py, ``FactorSVD``), and the batches are spread
over the cores, each batch computed with one intra-op thread (idle OpenMP threads spin while the cores are busy;
benchmarks/RESULTS.md, resize / merge, has the profile and the measurements). The results are the per-module ones:
every step works on each module's own matrices, in the same order.

A job knows its module's shapes and how to fill its factors into the two slots it is given, so factors are read
inside the workers, one batch at a time: memory stays at a few batches whatever the file's size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from loratools.errors import LoraToolsError
from loratools.ops.lowrank import FactorSVD, NoSVD

# Bytes of stacked factors (up and down, compute dtype) per batch: big enough that the per-call overheads vanish,
# small enough that two batches in flight (plus their QR copies) stay far below the file's size.
BATCH_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}


@dataclass
class Job:
    """One module's ΔW/s as ``up @ down`` ([rows, rank] @ [rank, cols]), not read yet."""

    index: int  # the place of its result (0 to len(jobs) - 1); of several failing modules, the first is reported
    name: str  # names the module in a refusal
    rows: int
    rank: int
    cols: int
    dtype: Any  # the torch compute dtype
    fill: Callable[[Any, Any], None]  # fill(up_slot, down_slot) writes the module's factors into the slots
    payload: Any = None  # what the caller needs again in ``choose`` and ``finish``
    path: Any = None  # the file a refusal names (else the one given to factor_svds)
    modules: tuple = ()  # the modules whose factors it reads


class _Failed(Exception):
    def __init__(self, job: Job, error: LoraToolsError):
        super().__init__(error.message)
        self.job, self.error = job, error


def factor_svds(jobs: list[Job], choose: Callable, finish: Callable, device, path=None) -> list:
    """``finish(job, s, k, up, down)`` for every job, as a list indexed by ``job.index`` (0 to len(jobs) - 1):
    ``s`` is the module's whole spectrum (a list of floats), ``k = choose(job, s)``, and ``up`` [rows, k] and
    ``down`` [k, cols] are the balanced factors of its top k terms on ``device`` (None when ``choose`` returned
    None: no factors wanted).

    ``finish`` runs in the worker thread; it should leave the factors on the host in their storage dtype.
    A module whose values have no SVD is refused as ``module NAME: ...`` (a NoSVD); a LoraToolsError that
    ``finish`` raises goes out as it is. Of several failing modules, the first (lowest index) is reported.
    """
    results: list = [None] * len(jobs)
    chunks = _chunks(jobs, BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"]))
    run = lambda chunk: _run_chunk(chunk, choose, finish, device)  # noqa: E731
    workers = min(len(chunks), worker_count(device))
    done = _in_turn(chunks, run) if workers <= 1 else _parallel(chunks, run, workers)
    if isinstance(done, _Failed):
        if isinstance(done.error, NoSVD):
            raise NoSVD(f"module {done.job.name}: {done.error.message}", done.job.path or path) from None
        raise done.error from None
    for chunk, outs in done:
        for job, out in zip(chunk, outs):
            results[job.index] = out
    return results


# After a failure, only the batches that hold a module before the failing one still run: the module named is
# the first that fails, whatever order the batches ran in.

def _in_turn(chunks, run):
    done, failed = [], None
    for chunk in chunks:
        if failed is not None and chunk[0].index > failed.job.index:
            continue
        try:
            done.append((chunk, run(chunk)))
        except _Failed as e:
            failed = e if failed is None or e.job.index < failed.job.index else failed
    return failed or done


def _parallel(chunks, run, workers: int):
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, chunk): chunk for chunk in chunks}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
        if not errors:
            return [(futures[f], f.result()) for f in futures]
        first = min(e.job.index if isinstance(e, _Failed) else -1 for e in errors)
        for f in pending:
            if futures[f][0].index > first:
                f.cancel()
        done |= wait(pending)[0]
        errors = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
    bug = [e for e in errors if not isinstance(e, _Failed)]
    if bug:
        raise bug[0]
    return min(errors, key=lambda e: e.job.index)


def worker_count(device) -> int:
    if device.type != "cpu":
        return 1  # one device: batches queue on it anyway
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunks(jobs: list[Job], budget: int) -> list[list[Job]]:
    """Jobs grouped by shape and compute dtype, each group cut into batches of about ``budget`` bytes; the largest
    batches first, so that the last ones, which may leave a core idle, are short."""
    import math

    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.rows, job.rank, job.cols, job.dtype), []).append(job)
    chunks = []
    for (rows, rank, cols, dtype), group in groups.items():
        each = max(1, (rows + cols) * rank * dtype.itemsize)
        count = math.ceil(len(group) * each / budget)
        size = math.ceil(len(group) / count)
        chunks += [group[i: i + size] for i in range(0, len(group), size)]
    chunks.sort(key=lambda c: -len(c) * (c[0].rows + c[0].cols) * c[0].rank ** 2)
    return chunks


def _run_chunk(chunk: list[Job], choose: Callable, finish: Callable, device) -> list:
    import torch

    first = chunk[0]
    up = torch.empty(len(chunk), first.rows, first.rank, dtype=first.dtype, device=device)
    down = torch.empty(len(chunk), first.rank, first.cols, dtype=first.dtype, device=device)
    for slot, job in enumerate(chunk):
        try:
            job.fill(up[slot], down[slot])
        except LoraToolsError as e:
            raise _Failed(job, e) from None
    try:
        svd = FactorSVD(up, down)
    except NoSVD as e:
        raise _Failed(chunk[e.index], e) from None
    del up, down  # the SVD keeps what it needs
    spectra = svd.s.double().cpu().tolist()
    ks = [choose(job, s) for job, s in zip(chunk, spectra)]
    wanted = [k for k in ks if k is not None]
    left = right = None
    if wanted:
        left, right = svd.top(max(wanted))
    del svd
    outs = []
    for slot, (job, s, k) in enumerate(zip(chunk, spectra, ks)):
        try:
            if k is None:
                outs.append(finish(job, s, k, None, None))
            else:
                outs.append(finish(job, s, k, left[slot, :, :k], right[slot, :k]))
        except LoraToolsError as e:
            raise _Failed(job, e) from None
    return outs

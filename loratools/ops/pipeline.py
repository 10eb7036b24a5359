"""Bake's streaming pipeline: tensors of one file read, transformed and handed out in order.

A reader thread (pread into recycled buffers; pinned memory for CUDA) and a compute thread feed bounded queues, so
reading, computing and the caller's writing overlap while at most a few tensors are in memory. Read buffers are
recycled: a fresh buffer per tensor costs a page fault per 4 KiB (allocations this large are new mappings); see
benchmarks/RESULTS.md (bake) for what the pipeline and the recycling gain.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Pipeline:
    """``start(sf, jobs)``, then ``next()`` once per job for its result; leaving the ``with`` block stops both
    threads. ``next()`` raises the error of a failed stage. A result may live in a recycled read buffer (a
    transform that works in place), so it stays valid until the next call to ``next()``."""

    def __init__(self, device, depth: int = 2):
        self.device = device
        self.read_q: queue.Queue = queue.Queue(depth)
        self.done_q: queue.Queue = queue.Queue(depth)
        self.free: queue.Queue = queue.Queue(2 * depth + 2)  # every buffer that can be in flight at once
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.source = None
        self.lent = None  # the buffer the last result handed out lives in
        self.largest = 0  # bytes of the largest buffer made

    def start(self, sf, jobs: list[tuple]) -> None:
        """``jobs``: (tensor name, fn(tensor) -> tensor) or (tensor name, fn(tensor, ready) -> tensor, get_ready);
        untouched tensors never come here (the writer copies them from the file). ``fn`` may return its input or a
        view of it. ``get_ready()`` runs in the reader thread, which has time to spare: whatever ``fn`` needs besides
        the tensor (a LoRA's factors, read and widened) is then ready when the compute thread gets to it."""
        pin = getattr(self.device, "type", "cpu") == "cuda"
        self.source = sf.twin()  # the writer copies untouched tensors through ``sf`` meanwhile
        self.threads = [threading.Thread(target=self._read, args=(self.source, jobs, pin), daemon=True),
                        threading.Thread(target=self._compute, args=(len(jobs),), daemon=True)]
        for t in self.threads:
            t.start()

    def _put(self, q, item) -> bool:
        while not self.stopped.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q):
        while not self.stopped.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _buffer(self, nbytes: int) -> bytearray:
        try:
            buf = self.free.get_nowait()
        except queue.Empty:
            buf = bytearray()
        if len(buf) >= nbytes:
            return buf
        # a new buffer is as large as the largest so far: the pool soon holds only buffers that fit any tensor
        self.largest = max(nbytes, self.largest)
        return bytearray(self.largest)

    def _recycle(self, buf) -> None:
        with contextlib.suppress(queue.Full):
            self.free.put_nowait(buf)

    def _read(self, sf, jobs, pin: bool) -> None:
        try:
            for name, fn, *get_ready in jobs:
                if get_ready:
                    fn = functools.partial(_with, fn, get_ready[0]())
                buf = self._buffer(sf.info(name).nbytes)
                t = sf.torch(name, into=buf)
                if pin:
                    t = t.pin_memory()
                    self._recycle(buf)
                    buf = None
                if not self._put(self.read_q, (t, fn, buf)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(self.read_q, (_Failed(exc), None, None))

    def _compute(self, count: int) -> None:
        for _ in range(count):
            item = self._get(self.read_q)
            if item is None:
                return
            t, fn, buf = item
            try:
                out = t if isinstance(t, _Failed) else fn(t)
            except BaseException as exc:
                out = _Failed(exc)
            if buf is not None and not _shares_memory(out, t):
                self._recycle(buf)
                buf = None
            if not self._put(self.done_q, (out, buf)) or isinstance(out, _Failed):
                return

    def next(self):
        """The next result; the result before it may be overwritten from now on."""
        if self.lent is not None:
            self._recycle(self.lent)
        out, self.lent = self.done_q.get()
        if isinstance(out, _Failed):
            raise out.exc
        return out

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join()
        if self.source is not None:
            self.source.close()


def _with(fn, ready, t):
    return fn(t, ready)


def _shares_memory(out, t) -> bool:
    """Whether ``out`` may live in ``t``'s buffer (a failure holds none)."""
    if isinstance(out, _Failed) or isinstance(t, _Failed):
        return False
    base = t.untyped_storage()
    lo, hi = base.data_ptr(), base.data_ptr() + base.nbytes()
    return out.device == t.device and lo <= out.untyped_storage().data_ptr() < hi

"""Bytes that lie in an open file, and copying them into another file: by the kernel where it can, else through
one reused buffer.

Hand-written because no library copies byte ranges between files: ``shutil`` copies whole files and Python's
``os.copy_file_range`` is the bare system call. Measured on ext4 (benchmarks/RESULTS.md), the kernel copies at
cp's speed only when source and destination offsets share their place within a page; elsewhere pread + pwrite is
faster, so that is what misaligned ranges get.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any, Iterator

from loratools.errors import HeaderError, LoraToolsError

CHUNK = 1 << 20  # bytes per pread/pwrite when copying through memory
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class FileSpans:
    """Bytes of an open source file as ``(offset, length)`` spans: the writer copies them from that file instead of
    decoding them, so renamed tensors are never read into tensors. ``source`` has ``fileno()`` and ``path``."""

    __slots__ = ("source", "spans", "nbytes")

    def __init__(self, source: Any, spans: tuple[tuple[int, int], ...]):
        self.source, self.spans = source, spans
        self.nbytes = sum(n for _, n in spans)


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


def pread_into(source: Any, start: int, view: memoryview) -> int:
    """Fill ``view`` from ``source`` at ``start``; a source shorter than its header said is an error."""
    done = 0
    while done < len(view):
        try:
            k = os.preadv(source.fileno(), [view[done:]], start + done)
        except OSError as e:
            raise HeaderError(f"cannot read file ({_reason(e)})", source.path) from None
        if k <= 0:
            raise HeaderError("file changed after its header was read", source.path)
        done += k
    return done


def read_pieces(data: FileSpans, buf: bytearray) -> Iterator[memoryview]:
    """The bytes of ``data`` read into ``buf``, at most ``len(buf)`` at a time; each piece is valid until the next
    is read."""
    view = memoryview(buf)
    for start, n in data.spans:
        end = start + n
        while start < end:
            piece = view[: min(len(view), end - start)]
            pread_into(data.source, start, piece)
            yield piece
            start += len(piece)


def pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Write ``view`` at ``offset``, at most ``CHUNK`` bytes per call: one write of a whole large tensor measured
    several times slower than the same bytes in pieces (benchmarks/RESULTS.md, before / after)."""
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done : done + CHUNK], offset + done)
        except OSError as e:
            raise LoraToolsError(f"cannot write output ({_reason(e)})", path) from e


def copy_range(source: Any, start: int, n: int, fd: int, at: int, path: str, buf: bytearray | None = None) -> None:
    """Copy ``n`` bytes of ``source`` from ``start`` into ``fd`` at ``at``: in the kernel when both offsets share
    their place in a page, otherwise (or where the kernel refuses) through ``buf``."""
    end = start + n
    if _copy_file_range is not None and (start - at) % mmap.PAGESIZE == 0:
        src = source.fileno()
        while start < end:
            try:
                k = _copy_file_range(src, fd, end - start, start, at)
            except OSError as e:
                if e.errno in _NO_KERNEL_COPY:  # not across these file systems, or not supported
                    break
                raise LoraToolsError(f"cannot write output ({_reason(e)})", path) from e
            if k <= 0:
                raise HeaderError("file changed after its header was read", source.path)
            start, at = start + k, at + k
    if start < end:
        view = memoryview(buf if buf is not None and len(buf) >= CHUNK else bytearray(CHUNK))
        while start < end:
            piece = view[: min(CHUNK, end - start)]
            pread_into(source, start, piece)
            pwrite_all(fd, piece, at, path)
            start, at = start + len(piece), at + len(piece)

"""Outputs that appear whole or not at all, and never replace a file by surprise.

A file is written unnamed (Linux ``O_TMPFILE``) and given its name only when complete, with a hard link, which
fails when the name exists: a file that appeared at the destination meanwhile is kept and the command says so. A
killed run leaves nothing behind (the kernel frees an unnamed file). Where unnamed files are not available, the file
is written under a hidden temporary name that carries the writer's process id; the next run of loratools that
writes into the same folder removes such files whose process is gone (only this pattern). Folders (PEFT adapters,
diffusers checkpoints) are built under such a temporary name and renamed into place, without replacing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from loratools.errors import LoraToolsError

_TAG = ".loratools-tmp"
_STALE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}" + re.escape(_TAG) + "$")
_PROC_FD = "/proc/self/fd"
_AT_FDCWD = -100
_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; done once, at import, before any threads


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


def _io(path, fn, *args):
    """One file-system step; its OSError becomes a one-line error (disk full, no permission...)."""
    try:
        return fn(*args)
    except OSError as e:
        raise LoraToolsError(f"cannot write output ({_reason(e)})", path) from e


def temp_name(dest: Path) -> Path:
    """A hidden name beside ``dest`` that says which process wrote it."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}{_TAG}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def clean_stale(folder: Path) -> list[Path]:
    """Remove this tool's temporary files and folders in ``folder`` whose writing process has gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or _alive(int(m[1])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def check_destination(dest: Path, overwrite: bool, folder: bool = False) -> None:
    if not folder and dest.is_dir():
        raise LoraToolsError("output is a directory", dest)
    if os.path.lexists(dest) and not overwrite:
        raise LoraToolsError("output exists; pass --overwrite to replace it", dest)


def _appeared(dest: Path) -> LoraToolsError:
    return LoraToolsError("output appeared while it was being written; that file was kept and nothing was written "
                          "(pass --overwrite to replace it)", dest)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: some systems cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (best effort)."""
    for where, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(where, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_folder(Path(where))


def _libc_call(name: str):
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_AT_SYMLINK_FOLLOW = 0x400


def _link_fd(fd: int, dest) -> None:
    """linkat(2) of an unnamed file's /proc/self/fd entry, following it (os.link does not: it would try to link
    the proc symlink itself and fail with EXDEV); fails when ``dest`` exists."""
    src = os.fsencode(f"{_PROC_FD}/{fd}")
    if _libc_call("linkat")(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(dest), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dest))


def _open_unnamed(folder: Path) -> int | None:
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir(_PROC_FD) or _libc_call("linkat") is None:
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666 & ~_UMASK)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # the file system has no unnamed files
        raise LoraToolsError(f"cannot write output ({_reason(e)})", folder) from e


def _link(fd: int, dest: Path, overwrite: bool) -> None:
    """Give the finished file ``dest`` as its name: a hard link (fails if the name exists) unless replacing."""
    if overwrite:
        tmp = temp_name(dest)
        _io(dest, _link_fd, fd, tmp)
        try:
            _io(dest, os.replace, tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    try:
        _link_fd(fd, dest)
    except FileExistsError:
        raise _appeared(dest) from None
    except OSError as e:
        raise LoraToolsError(f"cannot write output ({_reason(e)})", dest) from e


@contextlib.contextmanager
def atomic_file(dest, overwrite: bool = False, sync: bool = False) -> Iterator[int]:
    """A descriptor to write ``dest`` through; the file gets its name only when the block ends without an error.
    ``sync`` flushes it to disk first (always done when it replaces a file, so a crash cannot lose both)."""
    dest = Path(dest)
    check_destination(dest, overwrite)
    folder = dest.parent
    _io(dest, folder.mkdir, 0o777, True, True)
    clean_stale(folder)
    replacing = os.path.lexists(dest)
    fd = _open_unnamed(folder)
    named = None
    if fd is None:
        named = temp_name(dest)
        fd = _io(dest, os.open, named, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 & ~_UMASK)
    try:
        yield fd
        if sync or replacing:
            _io(dest, os.fsync, fd)
        if named is None:
            _link(fd, dest, overwrite)
        elif overwrite:
            _io(dest, os.replace, named, dest)
        else:
            _publish_named(named, dest)
    finally:
        os.close(fd)
        if named is not None:
            with contextlib.suppress(OSError):
                os.unlink(named)
    if sync or replacing:
        _fsync_folder(folder)


def _publish_named(named: Path, dest: Path) -> None:
    try:
        os.link(named, dest)  # no-replace
    except FileExistsError:
        raise _appeared(dest) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise LoraToolsError(f"cannot write output ({_reason(e)})", dest) from e
        if os.path.lexists(dest):  # no hard links here: check, then rename
            raise _appeared(dest) from None
        _io(dest, os.replace, named, dest)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    renameat2 = _libc_call("renameat2")
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise LoraToolsError(f"cannot write output ({os.strerror(err).lower()})", b)


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever ``path`` is (no error if it is gone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _rename_noreplace(src: Path, dest: Path) -> None:
    """rename(2) that fails when ``dest`` exists (Linux renameat2); elsewhere a check, then rename."""
    renameat2 = _libc_call("renameat2")
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise _appeared(dest)
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise LoraToolsError(f"cannot write output ({os.strerror(err).lower()})", dest)
    if os.path.lexists(dest):
        raise _appeared(dest)
    _io(dest, os.rename, src, dest)


@contextlib.contextmanager
def atomic_folder(dest, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder to build ``dest`` in; moved into place when the block ends without an error. An old
    ``dest`` (with ``overwrite``) is swapped with it in one step and removed after (where the system cannot swap,
    it is moved aside first: a run killed between the two renames leaves neither at ``dest``)."""
    dest = Path(dest)
    check_destination(dest, overwrite, folder=True)
    folder = dest.parent
    _io(dest, folder.mkdir, 0o777, True, True)
    clean_stale(folder)
    tmp = temp_name(dest)
    _io(dest, os.mkdir, tmp)
    try:
        yield tmp
        if overwrite and os.path.lexists(dest):
            _fsync_tree(tmp)  # as for a replaced file: a crash after the swap must not lose both
            if not _exchange(tmp, dest):  # now ``tmp`` names the old output, removed below
                old = temp_name(dest)
                _io(dest, os.rename, dest, old)
                try:
                    _rename_noreplace(tmp, dest)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.rename(old, dest)
                    raise
                _remove(old)
        else:
            _rename_noreplace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)

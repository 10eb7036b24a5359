"""Outputs get their name only when complete, never replace a file that appeared meanwhile, and leave nothing
behind when a writer dies: the unnamed (O_TMPFILE) path and the named-temp fallback, files and folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import loratools
from loratools.errors import LoraToolsError
from loratools.io import atomic
from loratools.io.writer import write_safetensors

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "examples" / "sdxl_slider_kohya.safetensors"


@pytest.fixture(params=["unnamed", "named"])
def mode(request, monkeypatch):
    if request.param == "named":  # a file system without O_TMPFILE
        monkeypatch.setattr(atomic, "_open_unnamed", lambda folder: None)
    elif atomic._open_unnamed(Path(os.getcwd())) is None:
        pytest.skip("no O_TMPFILE here")
    return request.param


def test_a_file_that_appears_while_writing_is_kept(tmp_path, mode):
    dest = tmp_path / "out.safetensors"

    def produce():
        dest.write_bytes(b"someone else's")  # appears after the existence check, before the name is given
        return np.zeros(4, np.float32)

    with pytest.raises(LoraToolsError, match="appeared while it was being written") as err:
        write_safetensors(dest, [("x", "F32", (4,), produce)])
    assert err.value.path == str(dest)
    assert dest.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_with_overwrite_the_finished_file_replaces_it(tmp_path, mode):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old")
    write_safetensors(dest, [("x", "F32", (4,), np.ones(4, np.float32))], overwrite=True)
    with loratools.io.reader.SafetensorsFile(dest) as f:
        assert f.numpy("x").tolist() == [1.0] * 4
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_a_folder_that_appears_while_writing_is_kept(tmp_path):
    dest = tmp_path / "adapter"
    with pytest.raises(LoraToolsError, match="appeared"):
        with atomic.atomic_folder(dest) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"new")
            dest.mkdir()
            (dest / "mine").write_text("keep")
    assert (dest / "mine").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["adapter"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".out.safetensors.{dead}.0123abcd{atomic._TAG}"
    stale_dir = tmp_path / f".adapter.{dead}.89abcdef{atomic._TAG}"
    live = tmp_path / f".other.safetensors.{alive}.deadbeef{atomic._TAG}"
    unrelated = tmp_path / ".out.safetensors.123.tmp"  # not our pattern: never touched
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"x")
    live.write_bytes(b"busy")
    unrelated.write_bytes(b"theirs")
    write_safetensors(tmp_path / "new.safetensors", [("x", "U8", (1,), b"z")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name, "new.safetensors"])


def test_a_writer_killed_midway_leaves_no_output_and_its_temp_file_goes_next_time(tmp_path, monkeypatch):
    """The named fallback, killed between writing and naming (a forked child that dies at once)."""
    monkeypatch.setattr(atomic, "_open_unnamed", lambda folder: None)
    dest = tmp_path / "out.safetensors"
    pid = os.fork()
    if pid == 0:  # the child: write half a file, then die without cleaning up
        try:
            with atomic.atomic_file(dest) as fd:
                os.write(fd, b"half a file")
                os._exit(0)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not dest.exists() and len(leftovers) == 1 and leftovers[0].endswith(atomic._TAG)
    write_safetensors(dest, [("x", "U8", (1,), b"z")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.4, 0.8])
def test_sigkill_during_convert_then_the_same_command_again(tmp_path, delay):
    """Killed at any moment, convert leaves either nothing or the complete file; run again, it finishes and
    nothing else is left beside it."""
    src = tmp_path / "in.safetensors"
    src.write_bytes(EXAMPLE.read_bytes())
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, "-c", "from loratools.cli import main; main()", "convert", str(src), "--to", "diffusers",
           "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # it finished before the kill: a whole file
        assert loratools.verify(src, out, rtol=1e-6).equal
        out.unlink()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert loratools.verify(src, out, rtol=1e-6).equal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]

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
from loratools.io.reader import SafetensorsFile, read_header
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
    with SafetensorsFile(dest) as f:
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


def _tiny_sdxl_base(path: Path) -> Path:
    """An SGM slice holding one attention block the example LoRA adapts (real shapes: the base says SDXL)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    block = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
    shapes = {"attn2.to_k.weight": (640, 2048), **{f"attn1.{n}.weight": (640, 640)
                                                   for n in ("to_q", "to_k", "to_v", "to_out.0")}}
    save_file({block + k: rng.standard_normal(v).astype(np.float16) for k, v in shapes.items()}, str(path))
    return path


def _command(op: str, tmp_path: Path) -> tuple[list[str], Path]:
    src = tmp_path / "in.safetensors"
    out = tmp_path / "out.safetensors"
    args = {"convert": ["convert", str(src), "--to", "diffusers", "-o", str(out)],
            "resize": ["resize", str(src), "--rank", "2", "-o", str(out)],
            "merge": ["merge", str(src), f"{src}:0.5", "-o", str(out)],
            "bake": ["bake", str(tmp_path / "base.safetensors"), str(src), "-o", str(out), "--allow-unmatched"]}[op]
    return [sys.executable, "-c", "from loratools.cli import main; main()", *args], out


@pytest.mark.parametrize("op", ["convert", "resize", "merge", "bake"])
@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0])
def test_sigkill_at_any_moment_then_the_same_command_again(tmp_path, op, delay):
    """Killed at any moment, a writer leaves nothing or the complete file; run again, it finishes and nothing
    else is left beside its inputs and output."""
    (tmp_path / "in.safetensors").write_bytes(EXAMPLE.read_bytes())
    _tiny_sdxl_base(tmp_path / "base.safetensors")
    inputs = sorted(p.name for p in tmp_path.iterdir())
    cmd, out = _command(op, tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # it finished before the kill: a whole file
        read_header(out)
        out.unlink()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    read_header(out)
    if op == "convert":
        assert loratools.verify(tmp_path / "in.safetensors", out, rtol=1e-6).equal
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(inputs + ["out.safetensors"])

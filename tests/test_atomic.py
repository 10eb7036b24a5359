"""Outputs get their name only when complete, never replace a file that appeared meanwhile, and leave nothing
behind when a writer dies: the unnamed (O_TMPFILE) path and the named-temp fallback, files and folders."""

from __future__ import annotations

import os
import random
import shutil
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


def _die_at(calls: dict) -> None:
    """In a forked child: replace the named functions so that the process dies (no cleanup) when one is called."""
    for owner, name in calls.items():
        setattr(owner, name, lambda *args, **kwargs: os._exit(0))


def test_overwriting_a_folder_swaps_it_in_one_step(tmp_path):
    """With --overwrite the new folder and the old one trade names at once: a writer killed right then leaves the
    new output in place (never neither), and the old one under a temporary name that the next write removes."""
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "old").write_text("old")
    pid = os.fork()
    if pid == 0:
        try:
            real_rename = os.rename

            def rename(src, dst):  # the fallback moves the old folder aside first: die right after that
                real_rename(src, dst)
                if Path(src) == dest:
                    os._exit(0)

            os.rename = rename
            _die_at({atomic: "_remove"})  # after the swap, before the old folder is removed
            with atomic.atomic_folder(dest, overwrite=True) as tmp:
                (tmp / "new").write_text("new")
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert sorted(os.listdir(dest)) == ["new"]
    left = [p for p in tmp_path.iterdir() if p != dest]
    assert len(left) == 1 and (left[0] / "old").read_text() == "old"
    with atomic.atomic_folder(tmp_path / "other") as tmp:
        (tmp / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "other"]


@pytest.mark.parametrize("old", ["folder", "file"])
def test_overwrite_replaces_a_folder_output_where_names_cannot_be_swapped(tmp_path, monkeypatch, old):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "adapter"
    if old == "folder":
        dest.mkdir()
        (dest / "old").write_text("old")
    else:
        dest.write_text("old")
    with atomic.atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(dest)) == ["new"] and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_file_swapped_out_by_a_folder_output_is_removed(tmp_path):
    dest = tmp_path / "adapter"
    dest.write_text("old")
    with atomic.atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(dest)) == ["new"] and sorted(os.listdir(tmp_path)) == ["adapter"]


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


_BLOCK = {"attn2.to_k.weight": (640, 2048),
          **{f"attn1.{n}.weight": (640, 640) for n in ("to_q", "to_k", "to_v", "to_out.0")}}


def _tiny_sdxl_base(path: Path) -> Path:
    """An SGM slice holding one attention block the example LoRA adapts (real shapes: the base says SDXL)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    block = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
    save_file({block + k: rng.standard_normal(v).astype(np.float16) for k, v in _BLOCK.items()}, str(path))
    return path


def _tiny_sdxl_folder(path: Path) -> Path:
    """The same block as a diffusers pipeline folder (a UNet component with its config): bake writes a folder."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    (path / "unet").mkdir(parents=True)
    block = "down_blocks.1.attentions.0.transformer_blocks.0."
    save_file({block + k: rng.standard_normal(v).astype(np.float16) for k, v in _BLOCK.items()},
              str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    (path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048}')
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return path


# The command as a user runs it; with PAUSE set, every output file or folder stops once it is complete and before
# it gets its name (the moment a killed writer leaves the most behind), creates PAUSE to say so, and goes on when
# the file GO exists. NAMED makes the writer use the named-temp fallback, as on a file system without O_TMPFILE.
_CHILD = """
import contextlib, os, time
from loratools.io import atomic
pause = os.environ.get("PAUSE")
if pause:
    if os.environ.get("NAMED"):
        atomic._open_unnamed = lambda folder: None

    def paused(real):
        @contextlib.contextmanager
        def run(*args, **kwargs):
            with real(*args, **kwargs) as handle:
                yield handle
                open(pause, "w").close()
                go = os.environ.get("GO")
                for _ in range(30000):  # 300 s at most
                    if go and os.path.exists(go):
                        break
                    time.sleep(0.01)
        return run

    import loratools.formats.diffusers, loratools.io.writer
    atomic.atomic_folder = loratools.formats.diffusers.atomic_folder = paused(atomic.atomic_folder)
    loratools.io.writer.atomic_file = paused(atomic.atomic_file)
from loratools.cli import main
main()
"""


def _command(op: str, tmp_path: Path) -> tuple[list[str], Path]:
    src = tmp_path / "in.safetensors"
    out = tmp_path / ("out" if op in ("convert-peft", "bake-folder") else "out.safetensors")
    args = {"convert": ["convert", str(src), "--to", "diffusers", "-o", str(out)],
            "convert-peft": ["convert", str(src), "--to", "peft", "-o", str(out)],
            "resize": ["resize", str(src), "--rank", "2", "-o", str(out)],
            "merge": ["merge", str(src), f"{src}:0.5", "-o", str(out)],
            "bake": ["bake", str(tmp_path / "base.safetensors"), str(src), "-o", str(out), "--allow-unmatched"],
            "bake-folder": ["bake", str(tmp_path / "base"), str(src), "-o", str(out), "--allow-unmatched"]}[op]
    return [sys.executable, "-c", _CHILD, *args], out


def _check_complete(op: str, src: Path, out: Path) -> None:
    """A whole output: every file's header reads, and a conversion has the input's effect."""
    files = [out] if out.is_file() else sorted(out.rglob("*.safetensors"))
    assert files
    for f in files:
        read_header(f)
    if op.startswith("convert"):
        assert loratools.verify(src, out, rtol=1e-6).equal


def _written(cmd: list[str], cwd: Path, marker: Path, named: bool, go: Path | None = None) -> subprocess.Popen:
    """The command started and paused with its output complete and not yet named."""
    env = {**os.environ, "PAUSE": str(marker), **({"NAMED": "1"} if named else {}), **({"GO": str(go)} if go else {})}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the writer never finished writing: {proc.communicate()[1]}")
        time.sleep(0.01)
    marker.unlink()
    return proc


def _kill_when_written(cmd: list[str], cwd: Path, marker: Path, named: bool) -> None:
    proc = _written(cmd, cwd, marker, named)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.mark.parametrize("op", ["convert", "convert-peft"])
@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_an_output_that_appears_while_a_command_writes_is_kept_and_the_command_says_so(tmp_path, op, named):
    """The race of the command line: after the existence check and before the name is given, someone else's
    file (or folder) takes the output path. It stays as it is; the command fails with one line; nothing else is
    left."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.safetensors").write_bytes(EXAMPLE.read_bytes())
    cmd, out = _command(op, work)
    go = tmp_path / "go"
    proc = _written(cmd, work, tmp_path / "written", named, go)
    out.write_bytes(b"someone else's")
    go.touch()
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "appeared while it was being written" in lines[0], err
    assert out.read_bytes() == b"someone else's"
    assert sorted(p.name for p in work.iterdir()) == ["in.safetensors", out.name]


OPS = ["convert", "convert-peft", "resize", "merge", "bake", "bake-folder"]


@pytest.mark.parametrize("op", OPS)
def test_sigkill_at_any_moment_then_the_same_command_again(tmp_path, op):
    """Killed at the worst moment (output complete, not yet named), a writer using named temporary files leaves one
    beside the output; killed at a random moment, it leaves nothing or the complete output. Run again, it finishes
    and removes what the dead run left: nothing else is beside its inputs and output."""
    work = tmp_path / "work"
    work.mkdir()
    src = work / "in.safetensors"
    src.write_bytes(EXAMPLE.read_bytes())
    _tiny_sdxl_base(work / "base.safetensors")
    _tiny_sdxl_folder(work / "base")
    inputs = sorted(p.name for p in work.iterdir())
    cmd, out = _command(op, work)

    _kill_when_written(cmd, work, tmp_path / "written", named=True)
    left = sorted(p.name for p in work.iterdir() if p.name not in inputs)
    assert len(left) == 1 and left[0].endswith(atomic._TAG) and not out.exists(), left

    delay = random.Random(op).uniform(0.05, 2.0)  # a moment from start-up to writing, the same on each run
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # it finished before the kill: a whole output
        _check_complete(op, src, out)
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _check_complete(op, src, out)
    assert sorted(p.name for p in work.iterdir()) == sorted(inputs + [out.name])


def test_an_unnamed_output_killed_before_its_name_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.safetensors").write_bytes(EXAMPLE.read_bytes())
    if atomic._open_unnamed(work) is None:
        pytest.skip("no O_TMPFILE here")
    cmd, out = _command("convert", work)
    _kill_when_written(cmd, work, tmp_path / "written", named=False)
    assert sorted(p.name for p in work.iterdir()) == ["in.safetensors"]

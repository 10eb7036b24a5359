"""bake on hostile bases and strengths: a folder base's files that are not regular files, damaged shard indexes,
strengths that are not finite, and --dtype casts that would write Inf — one line, exit 2, nothing written."""

from __future__ import annotations

import os
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import loratools
from loratools.cli import main
from loratools.errors import FormatError, UsageError
from loratools.io.writer import write_safetensors
from test_bake import _diffusers_folder, _flux_base, load, pair, write_lora


def _flux_lora(path: Path, out_dim: int, in_dim: int) -> Path:
    up, down = pair(out_dim, in_dim, seed=7)
    return write_lora(path, {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
                             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up})


def _nothing_written(tmp: Path, name: str) -> None:
    assert not (tmp / name).exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(f".{name}")], "a temporary output was left"


@pytest.fixture
def bake_cli(capsys, monkeypatch):
    """``loratools bake ARGS`` as users run it: (exit code, the lines it printed)."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["loratools", "bake", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, [line for line in (out.out + out.err).splitlines() if line.strip()]

    return run


@pytest.fixture
def folder(tmp_path):
    _diffusers_folder(tmp_path, 32)
    return tmp_path / "base", _flux_lora(tmp_path / "l.safetensors", 96, 32)


@pytest.mark.parametrize("special", ["device", "fifo"])
def test_a_base_folder_file_that_is_not_regular_is_refused_before_writing(folder, tmp_path, special):
    base, lora = folder
    target = base / "transformer" / "tokenizer.json"
    if special == "device":
        os.symlink("/dev/zero", target)  # copied as it is, it would never end
    else:
        os.mkfifo(target)
    proc = subprocess.run([sys.executable, "-m", "loratools", "bake", str(base), str(lora), "-o",
                           str(tmp_path / "out"), "--family", "flux1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "transformer/tokenizer.json is not a regular file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    _nothing_written(tmp_path, "out")


@pytest.mark.parametrize("index", ["{bad", "[1]", '{"metadata": 5, "weight_map": {}}', b"\xff{}", "[" * 100000])
def test_a_damaged_shard_index_is_one_line_before_anything_is_written(folder, tmp_path, index, bake_cli):
    base, lora = folder
    path = base / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(FormatError, match=r"diffusion_pytorch_model.safetensors.index.json (is not|is nested)"):
        loratools.bake(base, [lora], tmp_path / "out", family="flux1")
    _nothing_written(tmp_path, "out")
    code, lines = bake_cli(base, lora, "-o", tmp_path / "out", "--family", "flux1")
    assert code == 2 and len(lines) == 1 and "index.json" in lines[0], lines


def test_the_rewritten_index_keeps_its_map_and_counts_the_new_shards(folder, tmp_path):
    base, lora = folder
    path = base / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["format"] = "pt"
    path.write_text(json.dumps(index))
    loratools.bake(base, [lora], tmp_path / "out", family="flux1")
    out = json.loads((tmp_path / "out" / "transformer" / path.name).read_text())
    assert out["weight_map"] == index["weight_map"] and out["metadata"]["format"] == "pt"
    shards = (tmp_path / "out" / "transformer").glob("*.safetensors")
    assert out["metadata"]["total_size"] == sum(t.numel() * t.element_size() for s in shards
                                                for t in load(s).values())


@pytest.mark.parametrize("strength", ["inf", "-inf", "nan", "1e39"])
def test_a_strength_that_is_not_a_finite_float32_is_refused(tmp_path, strength, bake_cli):
    _flux_base(tmp_path)
    lora = _flux_lora(tmp_path / "l.safetensors", 192, 64)
    code, lines = bake_cli(tmp_path / "flux.safetensors", f"{lora}:{strength}", "-o", tmp_path / "out.safetensors",
                           "--family", "flux1")
    assert code == 2 and len(lines) == 1 and f"strength '{strength}' is not a finite (float32) number" in lines[0]
    _nothing_written(tmp_path, "out.safetensors")
    with pytest.raises(UsageError, match="not a finite"):  # the API (and batch jobs, which call it) too
        loratools.bake(tmp_path / "flux.safetensors", [(lora, float(strength))], tmp_path / "out.safetensors",
                       family="flux1")
    with pytest.raises(UsageError, match="not a finite"):  # and the report
        loratools.report([f"{lora}:{strength}"], tmp_path / "r.html")


def test_a_dtype_cast_that_would_write_inf_into_an_unpatched_weight_is_refused(tmp_path):
    h = 32
    write_safetensors(tmp_path / "b.safetensors", [
        ("double_blocks.0.img_attn.qkv.weight", "F32", (3 * h, h), torch.full((3 * h, h), 0.1)),
        ("double_blocks.0.txt_attn.proj.weight", "F32", (h, h), torch.full((h, h), 1e5))])  # beyond fp16
    lora = _flux_lora(tmp_path / "l.safetensors", 3 * h, h)
    with pytest.raises(FormatError, match="casting double_blocks.0.txt_attn.proj.weight to float16 puts weights "
                                          "beyond its range"):
        loratools.bake(tmp_path / "b.safetensors", [lora], tmp_path / "o.safetensors", family="flux1", dtype="fp16")
    _nothing_written(tmp_path, "o.safetensors")
    loratools.bake(tmp_path / "b.safetensors", [lora], tmp_path / "o.safetensors", family="flux1", dtype="bf16")
    assert torch.isfinite(load(tmp_path / "o.safetensors")["double_blocks.0.txt_attn.proj.weight"].float()).all()


def test_widening_a_scaled_fp8_weight_beyond_the_target_dtype_is_refused(tmp_path):
    """W = weight · scale_weight can exceed float16 although every stored byte is finite."""
    h = 32
    q = (torch.randn(h, h, generator=torch.Generator().manual_seed(3)) * 200).clamp(-448, 448)
    write_safetensors(tmp_path / "b.safetensors", [
        ("scaled_fp8", "F8_E4M3", (0,), b""),
        ("double_blocks.0.img_attn.proj.weight", "F8_E4M3", (h, h), q.to(torch.float8_e4m3fn).view(torch.uint8)),
        ("double_blocks.0.img_attn.proj.scale_weight", "F32", (), torch.tensor(500.0))])
    up, down = pair(h, h)
    lora = write_lora(tmp_path / "l.safetensors", {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": down,
                                                   "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": up})
    with pytest.raises(FormatError, match="beyond its range"):
        loratools.bake(tmp_path / "b.safetensors", [lora], tmp_path / "o.safetensors", family="flux1", dtype="fp16")
    _nothing_written(tmp_path, "o.safetensors")
    loratools.bake(tmp_path / "b.safetensors", [lora], tmp_path / "o.safetensors", family="flux1", dtype="fp32")
    assert torch.isfinite(load(tmp_path / "o.safetensors")["double_blocks.0.img_attn.proj.weight"]).all()

"""Files for the newer video families that must not be written as asked: one line naming the file and the problem,
exit code 2, nothing written — and the same file written when the request is right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import loratools

RNG = np.random.default_rng(0)
WAN_ATTENTION = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")


def _lora(path: Path, modules: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    tensors = {}
    for stem, (out_dim, in_dim) in modules.items():
        tensors[f"{stem}.lora_down.weight"] = RNG.standard_normal((rank, in_dim)).astype(np.float16)
        tensors[f"{stem}.lora_up.weight"] = RNG.standard_normal((out_dim, rank)).astype(np.float16)
        tensors[f"{stem}.alpha"] = np.array(rank / 2, dtype=np.float16)
    save_file(tensors, str(path))
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True)


def _refused(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error: ") and "Traceback" not in done.stderr, lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_a_wan22_5b_file_is_not_written_as_wan21(tmp_path):
    """Wan 2.2 TI2V-5B is 3072 wide: names shared with Wan 2.1, shapes of neither Wan 2.1 model."""
    modules = {}
    for i in range(30):
        modules.update({f"diffusion_model.blocks.{i}.{n}": (3072, 3072) for n in WAN_ATTENTION})
        modules[f"diffusion_model.blocks.{i}.ffn.0"] = (14336, 3072)
        modules[f"diffusion_model.blocks.{i}.ffn.2"] = (3072, 14336)
    src = _lora(tmp_path / "wan22_5b.safetensors", modules)
    info = loratools.inspect(src)["family"]
    assert (info["id"], info["variant"]) == ("wan22", "5b")
    out = tmp_path / "out.safetensors"
    line = _refused(_cli("convert", src, "--to", "diffusers", "--family", "wan21", "-o", out),
                    str(src), "--family wan21", "wan22 (5b)", "3072")
    assert "model width" in line and not out.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left either
    ok = _cli("convert", src, "--to", "diffusers", "--family", "wan22", "-o", out)
    assert ok.returncode == 0, ok.stderr
    assert loratools.verify(src, out).equal


def test_a_tiny_wan_lora_still_converts_with_the_family_it_names(tmp_path):
    """Widths of no released model are no contradiction when no other family is decided (tiny or pruned models)."""
    src = _lora(tmp_path / "tiny.safetensors", {f"diffusion_model.blocks.{i}.{n}": (64, 64)
                                                 for i in range(2) for n in WAN_ATTENTION})
    r = loratools.convert(src, to="diffusers", output=tmp_path / "out.safetensors", family="wan21")
    assert r.family == "wan21" and loratools.verify(src, r.output, family="wan21").equal


def _i2v_lora(tmp_path: Path, width: int = 64) -> Path:
    modules = {f"diffusion_model.blocks.{i}.cross_attn.{n}": (width, width)
               for i in range(2) for n in ("q", "k", "v", "o", "k_img", "v_img")}
    return _lora(tmp_path / "i2v.safetensors", modules)


def test_a_text_encoder_the_target_cannot_name_is_refused_not_dropped(tmp_path):
    from safetensors.numpy import load_file

    src = _i2v_lora(tmp_path)
    tensors = load_file(str(src))
    te = "lora_te1_encoder_block_0_layer_0_SelfAttention_q"
    tensors[f"{te}.lora_down.weight"] = RNG.standard_normal((4, 4096)).astype(np.float16)
    tensors[f"{te}.lora_up.weight"] = RNG.standard_normal((4096, 4)).astype(np.float16)
    save_file(tensors, str(src))
    out = tmp_path / "out.comfy.safetensors"
    _refused(_cli("convert", src, "--to", "comfy", "--family", "wan21", "-o", out), "umt5_xxl", "comfy")
    _refused(_cli("convert", src, "--to", "kohya", "--family", "wan21", "-o", out), "umt5_xxl", "kohya")
    assert not out.exists()
    # the targets that name UMT5 keep it
    r = loratools.convert(src, to="diffusers", output=tmp_path / "out.diffusers.safetensors", family="wan21")
    assert r.modules_out == r.modules_in
    assert loratools.inspect(r.output)["components"].get("te1") == 1
    assert loratools.verify(src, r.output, family="wan21").equal


def test_an_i2v_lora_is_not_baked_into_a_t2v_base(tmp_path):
    width = 64
    base = {}
    for i in range(2):
        base.update({f"blocks.{i}.{n}.weight": RNG.standard_normal((width, width)).astype(np.float16)
                     for n in WAN_ATTENTION})
        base[f"blocks.{i}.modulation"] = RNG.standard_normal((1, 6, width)).astype(np.float16)
    base["head.modulation"] = RNG.standard_normal((1, 2, width)).astype(np.float16)
    save_file(base, str(tmp_path / "t2v.safetensors"))
    src = _i2v_lora(tmp_path, width)
    out = tmp_path / "baked.safetensors"
    line = _refused(_cli("bake", tmp_path / "t2v.safetensors", src, "-o", out), "k_img", "i2v")
    assert "--allow-unmatched" in line and not out.exists()

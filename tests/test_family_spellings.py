"""The spellings of one Wan / Qwen-Image / HunyuanVideo LoRA that trainers and tools write all read as the same
modules: converted to diffusers they give byte-identical files."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import loratools

RNG = np.random.default_rng(1)
WIDTH, RANK = 64, 4


def _factors(n: int):
    return [(RNG.standard_normal((RANK, WIDTH)).astype(np.float32), RNG.standard_normal((WIDTH, RANK)).astype(np.float32))
            for _ in range(n)]


def _write(path, stems, factors, down: str, up: str, alpha: bool):
    tensors = {}
    for stem, (d, u) in zip(stems, factors):
        tensors[f"{stem}.{down}"], tensors[f"{stem}.{up}"] = d, u
        if alpha:
            tensors[f"{stem}.alpha"] = np.array(RANK, dtype=np.float32)
    save_file(tensors, str(path))
    return path


KOHYA = ("lora_down.weight", "lora_up.weight", True)
PEFT = ("lora_A.weight", "lora_B.weight", False)
CASES = {
    "wan21": (["blocks.{i}.self_attn.q", "blocks.{i}.cross_attn.o", "blocks.{i}.ffn.0"], {
        "comfy": ("diffusion_model.{}", KOHYA),
        "diffusion-pipe": ("diffusion_model.{}", PEFT),
        "musubi": ("lora_unet_{flat}", KOHYA),
        "wan-fun": ("lora_unet__{flat}", KOHYA),  # a leading underscore too many
        "hybrid": ("lora_unet_{head}.{tail}", KOHYA),  # flattened prefix and block, dotted rest
    }),
    "qwen_image": (["transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.img_mlp.net.2"], {
        "ai-toolkit": ("diffusion_model.{}", PEFT),
        "musubi": ("lora_unet_{flat}", KOHYA),
        "diffsynth": ("{}", ("lora_A.default.weight", "lora_B.default.weight", False)),
        "bare kohya": ("{}", KOHYA),
    }),
    "hunyuan_video": (["double_blocks.{i}.img_mod.linear", "double_blocks.{i}.txt_attn_proj"], {
        "diffusion-pipe": ("diffusion_model.{}", PEFT),
        "musubi": ("lora_unet_{flat}", KOHYA),
        "comfyui": ("diffusion_model.{comfy}", KOHYA),  # ComfyUI's Flux-style names of the same modules
    }),
}
COMFY_HUNYUAN = {"img_mod.linear": "img_mod.lin", "txt_attn_proj": "txt_attn.proj"}


def _spell(template: str, name: str) -> str:
    head, _, tail = name.partition(".")
    block, _, rest = tail.partition(".")
    comfy = name
    for tencent, flux_style in COMFY_HUNYUAN.items():
        comfy = comfy.replace(tencent, flux_style)
    return template.format(name, flat=name.replace(".", "_"), head=f"{head}_{block}", tail=rest, comfy=comfy)


@pytest.mark.parametrize("family", sorted(CASES))
def test_every_spelling_reads_as_the_same_modules(family, tmp_path):
    templates, spellings = CASES[family]
    names = [t.format(i=i) for i in range(2) for t in templates]
    factors = _factors(len(names))
    outputs = {}
    for label, (key, (down, up, alpha)) in spellings.items():
        src = _write(tmp_path / f"{label}.safetensors", [_spell(key, n) for n in names], factors, down, up, alpha)
        info = loratools.inspect(src, family=family)
        assert info["modules"] == len(names), label
        assert label == "hybrid" or not info["warnings"], (label, info["warnings"])  # the hybrid is flagged
        out = tmp_path / f"{label}.diffusers.safetensors"
        loratools.convert(src, to="diffusers", output=out, family=family)
        outputs[label] = load_file(str(out))
    first, *rest = outputs.values()
    for label, tensors in outputs.items():
        assert tensors.keys() == first.keys(), label
        assert all(np.array_equal(tensors[k], first[k]) for k in first), label

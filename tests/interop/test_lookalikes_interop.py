"""Families whose diffusers names overlap, on LoRAs PEFT writes for tiny models of diffusers' own classes: a tiny
model says little (two blocks, toy widths), so the evidence may leave the family open, but it must never decide a
wrong one, and the true family is always among the candidates."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import diffusers  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import loratools  # noqa: E402

pytestmark = pytest.mark.interop

HEADS = {"num_attention_heads": 2, "attention_head_dim": 16}
TINY = {
    "sd3": ("SD3Transformer2DModel", {**HEADS, "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2,
                                       "joint_attention_dim": 32, "caption_projection_dim": 32,
                                       "pooled_projection_dim": 64, "out_channels": 4, "pos_embed_max_size": 16}),
    "flux1": ("FluxTransformer2DModel", {**HEADS, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                         "joint_attention_dim": 32, "pooled_projection_dim": 32,
                                         "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}),
    "flux2": ("Flux2Transformer2DModel", {**HEADS, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                          "joint_attention_dim": 32, "timestep_guidance_channels": 16,
                                          "axes_dims_rope": (4, 4, 4, 4)}),
    "chroma": ("ChromaTransformer2DModel", {**HEADS, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                            "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6),
                                            "approximator_num_channels": 8, "approximator_hidden_dim": 32,
                                            "approximator_layers": 2}),
    "qwen_image": ("QwenImageTransformer2DModel", {**HEADS, "in_channels": 16, "out_channels": 4, "num_layers": 2,
                                                   "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", {**HEADS, "in_channels": 4, "out_channels": 4,
                                                         "num_layers": 2, "num_single_layers": 2,
                                                         "num_refiner_layers": 1, "text_embed_dim": 32,
                                                         "pooled_projection_dim": 16, "rope_axes_dim": (4, 6, 6)}),
    "mochi": ("MochiTransformer3DModel", {**HEADS, "num_layers": 2, "pooled_projection_dim": 16, "in_channels": 4,
                                          "text_embed_dim": 32, "time_embed_dim": 16, "max_sequence_length": 16}),
    "cogvideox": ("CogVideoXTransformer3DModel", {**HEADS, "in_channels": 4, "out_channels": 4, "time_embed_dim": 16,
                                                  "text_embed_dim": 32, "num_layers": 2, "sample_width": 8,
                                                  "sample_height": 8, "sample_frames": 5, "max_text_seq_length": 16}),
    "wan21": ("WanTransformer3DModel", {**HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 32,
                                        "freq_dim": 16, "ffn_dim": 64, "num_layers": 2}),
}

# The families a tiny model of each class may legitimately leave open (names it shares with others); the true
# family must be decided or among the candidates either way.
OVERLAPS = {"wan21": {"wan21", "wan22"}}


def _lora_file(family: str, path) -> str:
    cls_name, config = TINY[family]
    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config).eval()
    linears = sorted({name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=linears))
    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize("family", sorted(TINY))
def test_tiny_model_lora_is_never_decided_wrongly(family, tmp_path):
    fam = loratools.inspect(_lora_file(family, tmp_path / f"{family}.safetensors"))["family"]
    if fam["id"] == "unknown":
        assert family in fam["candidates"] or OVERLAPS.get(family, set()) & set(fam["candidates"]), fam
        assert fam["reason"]
    else:
        assert fam["id"] in OVERLAPS.get(family, {family}), (fam["id"], fam["evidence"], fam["alternatives"])

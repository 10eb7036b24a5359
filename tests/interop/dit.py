"""Tiny diffusers transformers of the image and video DiT families, and the pipelines that load their LoRAs.

Each family is one entry of ``TINY``: its diffusers model class and a small explicit config (built offline, random
weights, CPU), the pipeline class whose ``load_lora_weights`` users call, and the forward inputs. ``source`` writes a
LoRA the way a diffusers/PEFT trainer does (PEFT adapter on every Linear, random non-zero factors, alpha ≠ rank,
saved with the pipeline's own ``save_lora_weights``); ``load`` applies a file to a fresh model through the
pipeline, the way users do, and fails on any message that says something did not load.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model_state_dict  # noqa: E402

from loratools.ops.threads import small_matrix_threads  # noqa: E402

FATAL = ("no lora keys", "unexpected", "missing", "unsupported keys", "did not match any", "not correctly renamed",
         "incompatible keys")


def _rand(gen: torch.Generator) -> Callable[..., torch.Tensor]:
    return lambda *shape: torch.randn(*shape, generator=gen)


def _flux_ids(axes: int, side: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(side * side, axes)
    img[:, 1] = torch.arange(side).repeat_interleave(side)
    img[:, 2] = torch.arange(side).repeat(side)
    txt = torch.zeros(tokens, axes)
    if axes == 4:
        txt[:, 3] = torch.arange(tokens)
    return img, txt


def _qwen_inputs(r, c):
    return dict(hidden_states=r(1, 16, c.in_channels), encoder_hidden_states=r(1, 5, c.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=torch.tensor([0.5]),
                img_shapes=[[(1, 4, 4)]])


def _flux_like_inputs(r, c):
    img_ids, txt_ids = _flux_ids(len(c.axes_dims_rope), 4, 5)
    out = dict(hidden_states=r(1, 16, c.in_channels), encoder_hidden_states=r(1, 5, c.joint_attention_dim),
               timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids)
    if getattr(c, "guidance_embeds", False):
        out["guidance"] = torch.tensor([3.5])
    return out


def _z_image_inputs(r, c):
    return dict(x=[r(c.in_channels, 1, 8, 8)], t=torch.tensor([0.5]), cap_feats=[r(5, c.cap_feat_dim)])


def _lumina2_inputs(r, c):
    return dict(hidden_states=r(1, c.in_channels, 8, 8), timestep=torch.tensor([0.5]),
                encoder_hidden_states=r(1, 5, c.cap_feat_dim),
                encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool))


def _hidream_inputs(r, c):
    return dict(hidden_states=r(1, c.in_channels, 8, 8), timesteps=torch.tensor([500]),
                encoder_hidden_states_t5=r(1, 5, c.caption_channels[0]),
                encoder_hidden_states_llama3=r(len(c.llama_layers), 1, 6, c.caption_channels[1]),
                pooled_embeds=r(1, c.text_emb_dim))


def _wan_inputs(r, c):
    out = dict(hidden_states=r(1, c.in_channels, 2, 8, 8), timestep=torch.tensor([500.0]),
               encoder_hidden_states=r(1, 8, c.text_dim))
    if c.image_dim:
        out["encoder_hidden_states_image"] = r(1, 5, c.image_dim)
    return out


def _hunyuan_video_inputs(r, c):
    return dict(hidden_states=r(1, c.in_channels, 1, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=r(1, 6, c.text_embed_dim), encoder_attention_mask=torch.ones(1, 6),
                pooled_projections=r(1, c.pooled_projection_dim), guidance=torch.tensor([3500.0]))


def _ltxv_inputs(r, c):  # packed tokens: (batch, frames × height × width, channels)
    return dict(hidden_states=r(1, 2 * 4 * 4, c.in_channels), encoder_hidden_states=r(1, 6, c.caption_channels),
                timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4,
                width=4)


def _cogvideox_inputs(r, c):  # (batch, latent frames, channels, height, width); 9 frames -> 3 latent frames
    return dict(hidden_states=r(1, 3, c.in_channels, 8, 8), encoder_hidden_states=r(1, 6, c.text_embed_dim),
                timestep=torch.tensor([500.0]))


def _mochi_inputs(r, c):
    return dict(hidden_states=r(1, c.in_channels, 2, 8, 8), encoder_hidden_states=r(1, 6, c.text_embed_dim),
                timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6))


def _ltx2_inputs(r, c):  # packed video tokens (2 frames × 2 × 2) and audio tokens; sigma drives the prompt AdaLN
    return dict(hidden_states=r(1, 2 * 2 * 2, c.in_channels), audio_hidden_states=r(1, 3, c.audio_in_channels),
                encoder_hidden_states=r(1, 5, c.caption_channels),
                audio_encoder_hidden_states=r(1, 5, c.caption_channels), timestep=torch.tensor([500.0]),
                sigma=torch.tensor([0.5]), encoder_attention_mask=torch.ones(1, 5),
                audio_encoder_attention_mask=torch.ones(1, 5), num_frames=2, height=2, width=2, audio_num_frames=3)


def _krea2_inputs(r, c):  # packed image tokens (4 × 4) after 5 text tokens; text rows of position_ids are 0
    grid = torch.zeros(16, 3)
    grid[:, 1], grid[:, 2] = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    return dict(hidden_states=r(1, 16, c.in_channels), encoder_hidden_states=r(1, 5, c.num_text_layers,
                                                                               c.text_hidden_dim),
                timestep=torch.tensor([0.5]), position_ids=torch.cat([torch.zeros(5, 3), grid]))


@dataclass(frozen=True)
class Tiny:
    model: str  # diffusers model class
    config: dict
    pipeline: str  # the pipeline whose load_lora_weights users call
    inputs: Callable[[Callable, Any], dict]
    family: str = ""  # the family id, when the case name is not one


HEADS = {"num_attention_heads": 2, "attention_head_dim": 16}
VIDEO_HEADS = {"num_attention_heads": 2, "attention_head_dim": 8}
WAN = {**VIDEO_HEADS, "patch_size": (1, 2, 2), "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32,
       "num_layers": 2, "rope_max_seq_len": 32}
TINY: dict[str, Tiny] = {
    "qwen_image": Tiny("QwenImageTransformer2DModel", {
        **HEADS, "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "joint_attention_dim": 24,
        "axes_dims_rope": (4, 6, 6)}, "QwenImagePipeline", _qwen_inputs),
    "flux2": Tiny("Flux2Transformer2DModel", {
        **HEADS, "patch_size": 1, "in_channels": 8, "num_layers": 2, "num_single_layers": 2,
        "joint_attention_dim": 24, "timestep_guidance_channels": 32, "mlp_ratio": 3.0,
        "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": True}, "Flux2Pipeline", _flux_like_inputs),
    "chroma": Tiny("ChromaTransformer2DModel", {
        **HEADS, "patch_size": 1, "in_channels": 8, "num_layers": 2, "num_single_layers": 2,
        "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6), "approximator_num_channels": 8,
        "approximator_hidden_dim": 32, "approximator_layers": 2}, "ChromaPipeline", _flux_like_inputs),
    "z_image": Tiny("ZImageTransformer2DModel", {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 4, "dim": 64, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 24, "axes_dims": [8, 12, 12],
        "axes_lens": [64, 32, 32]}, "ZImagePipeline", _z_image_inputs),
    # grouped-query attention 3:1 like the released 24:8
    "lumina2": Tiny("Lumina2Transformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 48, "num_layers": 2,
        "num_refiner_layers": 1, "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 16, "cap_feat_dim": 24,
        "axes_dim_rope": (4, 6, 6), "axes_lens": (64, 32, 32)}, "Lumina2Pipeline", _lumina2_inputs),
    "hidream": Tiny("HiDreamImageTransformer2DModel", {
        **HEADS, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
        "caption_channels": [24, 20], "text_emb_dim": 12, "num_routed_experts": 2, "num_activated_experts": 1,
        "axes_dims_rope": (8, 4, 4), "max_resolution": (16, 16), "llama_layers": [0, 1]},
        "HiDreamImagePipeline", _hidream_inputs),
    # no single blocks, separate q/k/v; the ByT5 path keeps its fixed 2048 width
    "hunyuan_video15": Tiny("HunyuanVideo15Transformer3DModel", {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
        "num_refiner_layers": 1, "mlp_ratio": 2.0, "text_embed_dim": 12, "text_embed_2_dim": 10, "image_embed_dim": 6,
        "rope_axes_dim": (2, 2, 4), "target_size": 32, "task_type": "t2v"}, "HunyuanVideo15Pipeline",
        lambda r, c: dict(hidden_states=r(1, c.in_channels, 1, 8, 8), timestep=torch.tensor([500.0]),
                          encoder_hidden_states=r(1, 5, c.text_embed_dim), encoder_attention_mask=torch.ones(1, 5),
                          encoder_hidden_states_2=r(1, 3, c.text_embed_2_dim),
                          encoder_attention_mask_2=torch.ones(1, 3), image_embeds=torch.zeros(1, 4, c.image_embed_dim))),
    # Sana 600M-like: width = cross-attention width; a convolutional MLP (its convs stay unadapted: Linear only)
    "sana": Tiny("SanaTransformer2DModel", {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
        "num_cross_attention_heads": 2, "cross_attention_head_dim": 8, "cross_attention_dim": 16,
        "caption_channels": 12, "sample_size": 8, "patch_size": 1}, "SanaPipeline",
        lambda r, c: dict(hidden_states=r(1, c.in_channels, 8, 8), encoder_hidden_states=r(1, 5, c.caption_channels),
                          timestep=torch.tensor([500.0]))),
    "auraflow": Tiny("AuraFlowTransformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 1, "num_single_dit_layers": 1,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16,
        "out_channels": 4, "pos_embed_max_size": 64}, "AuraFlowPipeline",
        lambda r, c: dict(hidden_states=r(1, c.in_channels, 8, 8), encoder_hidden_states=r(1, 5, c.joint_attention_dim),
                          timestep=torch.tensor([0.5]))),
    # grouped-query attention 2:1 like the released 48:12; tapped text layers mixed by txtfusion.projector
    "krea2": Tiny("Krea2Transformer2DModel", {
        "in_channels": 8, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 48, "timestep_embed_dim": 16, "text_hidden_dim": 12, "num_text_layers": 3,
        "text_num_attention_heads": 2, "text_num_key_value_heads": 2, "text_intermediate_size": 24,
        "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1, "axes_dims_rope": (4, 6, 6)},
        "Krea2Pipeline", _krea2_inputs),
    "wan21": Tiny("WanTransformer3DModel", {**WAN, "in_channels": 4}, "WanPipeline", _wan_inputs),
    # Wan 2.1 I2V: the CLIP image branch (k_img/v_img, img_emb)
    "wan21_i2v": Tiny("WanTransformer3DModel", {**WAN, "in_channels": 8, "image_dim": 12, "added_kv_proj_dim": 16},
                      "WanImageToVideoPipeline", _wan_inputs, "wan21"),
    "wan22": Tiny("WanTransformer3DModel", {**WAN, "in_channels": 4}, "WanPipeline", _wan_inputs),
    # mlp_ratio 4 (the default) keeps single_blocks.linear1 = q, k, v + 4 × hidden
    "hunyuan_video": Tiny("HunyuanVideoTransformer3DModel", {
        **VIDEO_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
        "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1, "text_embed_dim": 16,
        "pooled_projection_dim": 8, "rope_axes_dim": (2, 2, 4), "guidance_embeds": True},
        "HunyuanVideoPipeline", _hunyuan_video_inputs),
    "ltxv": Tiny("LTXVideoTransformer3DModel", {
        **VIDEO_HEADS, "in_channels": 8, "out_channels": 8, "cross_attention_dim": 16, "num_layers": 1,
        "caption_channels": 12}, "LTXPipeline", _ltxv_inputs),
    "cogvideox": Tiny("CogVideoXTransformer3DModel", {
        **VIDEO_HEADS, "in_channels": 4, "out_channels": 4, "time_embed_dim": 8, "text_embed_dim": 12,
        "num_layers": 1, "sample_width": 8, "sample_height": 8, "sample_frames": 9, "patch_size": 2,
        "max_text_seq_length": 6}, "CogVideoXPipeline", _cogvideox_inputs),
    # 48 blocks like the release (its last block has no text-stream update); text width half the visual width
    "mochi": Tiny("MochiTransformer3DModel", {
        **VIDEO_HEADS, "patch_size": 2, "num_layers": 48, "pooled_projection_dim": 8, "in_channels": 4,
        "text_embed_dim": 16, "time_embed_dim": 8, "max_sequence_length": 6}, "MochiPipeline", _mochi_inputs),
    # every LTX-2 option on (gated attention, prompt AdaLN of LTX-2.3, caption projections of LTX-2.0); two blocks, so
    # that block 0's audio branch reaches the video output (the only output compared) through audio_to_video_attn
    "ltx2": Tiny("LTX2VideoTransformer3DModel", {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
        "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4, "audio_num_attention_heads": 2,
        "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8, "num_layers": 2, "caption_channels": 12,
        "gated_attn": True, "audio_gated_attn": True, "cross_attn_mod": True, "audio_cross_attn_mod": True},
        "LTX2Pipeline", _ltx2_inputs),
}


def family(case: str) -> str:
    """The family id of a case of ``TINY``."""
    return TINY[case].family or case


@small_matrix_threads()
def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A fresh tiny model of ``family`` (same seed, same weights) and its fixed forward inputs."""
    spec = TINY[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, spec.model)(**spec.config).eval().requires_grad_(False)
    return model, spec.inputs(_rand(torch.Generator().manual_seed(1000 + seed)), model.config)


@small_matrix_threads()
def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out if torch.is_tensor(out) else torch.stack(list(out))


@dataclass
class Source:
    family: str
    path: Path  # the LoRA file, as the pipeline's save_lora_weights writes it
    reference: torch.Tensor  # the PEFT-adapted model's output
    modules: list[str]  # the adapted Linear modules (diffusers names)
    adapted: torch.nn.Module  # the model with the trainer's adapter (PEFT layers)


def linear_modules(model: torch.nn.Module, leave_out: str | None = None) -> list[str]:
    names = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return [n for n in names if not (leave_out and re.search(leave_out, n))]


@small_matrix_threads()
def source(family: str, folder: Path, leave_out: str | None = None, rank: int = 4, alpha: int = 8) -> Source:
    """A LoRA on every Linear of the tiny model (but those matching ``leave_out``), written like a trainer does."""
    model, inputs = build(family)
    targets = linear_modules(model, leave_out)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    reference = forward(model, inputs)
    pipeline = getattr(diffusers, TINY[family].pipeline)
    folder.mkdir(parents=True, exist_ok=True)
    layers, config = get_peft_model_state_dict(model), model.peft_config["default"].to_dict()
    if hasattr(pipeline, "save_lora_weights"):
        pipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
    else:  # a pipeline without a LoRA loader (HunyuanVideo 1.5): the same file, written by diffusers' base class
        from diffusers.loaders.lora_base import LoraBaseMixin

        LoraBaseMixin._save_lora_weights(folder, {"transformer": layers}, {"transformer": config})
    return Source(family, folder / "pytorch_lora_weights.safetensors", reference, targets, model)


def merged_state(model: torch.nn.Module) -> dict:
    """The state dict of a PEFT-adapted model with its adapters merged (what diffusers' ``fuse_lora`` runs), under
    the model's own names; the model is merged in place."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


class LoadFailed(AssertionError):
    """The library said (or showed) that a file did not load completely."""


@small_matrix_threads()
def load(family: str, path: Path) -> torch.Tensor:
    """The tiny model's output with ``path`` applied as users apply it: a PEFT adapter folder with
    ``PeftModel.from_pretrained``, a file with the family pipeline's ``load_lora_weights``."""
    model, inputs = build(family)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if path.is_dir():
                model = PeftModel.from_pretrained(model, path / "transformer")
            else:
                pipeline = getattr(diffusers, TINY[family].pipeline)
                params = [name for name, p in inspect.signature(pipeline.__init__).parameters.items()
                          if name != "self" and p.default is inspect.Parameter.empty]  # options keep defaults
                pipe = pipeline(**{**dict.fromkeys(params), "transformer": model})
                pipe.load_lora_weights(path.parent, weight_name=path.name)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    said = [str(w.message) for w in caught] + stream.getvalue().splitlines()
    bad = [m for m in said if any(f in m.lower() for f in FATAL) and "prefix='text_encoder'" not in m]
    if bad:
        raise LoadFailed(bad[0][:500])
    return forward(model, inputs)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())

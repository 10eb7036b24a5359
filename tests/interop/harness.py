"""Interoperability harness: tiny real models, library-written LoRA sources, and strict loaders.

Everything here uses the real libraries (diffusers, transformers, PEFT, optionally LyCORIS) on tiny, randomly
initialised models built offline from explicit configs. Nothing is downloaded.

- `build(family, seed)` gives fresh base `Components` (models in eval mode plus fixed inputs); `run()` gives every
  component's output on those inputs.
- `diffusers_file`, `peft_folder` and `lycoris_file` write LoRA sources the way the libraries write them
  themselves, with random non-zero factors; the returned `Source` keeps the adapted models, so
  `reference_outputs()` is the making library's own forward pass.
- `load_with_diffusers` and `load_with_peft` apply a file or folder to fresh components the way users do, and raise
  `AssertionError` when the library says (or shows) that something did not load.
- `max_rel_diff` compares outputs; `deltas` / `reference_deltas` give every adapted module's weight delta as the
  libraries compute it, for module-by-module comparison (also where no library can load a file).

Public functions run torch single-threaded (tiny tensors; avoids spinning worker threads on a busy machine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import time

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import (  # noqa: E402
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from loratools.ops.threads import small_matrix_threads  # noqa: E402

FAMILIES = ("sd1", "sdxl", "flux1", "sd3")

# Substrings (matched case-insensitively) that mark a load as failed or partial.
FATAL_MESSAGES = (
    "no lora keys",
    "unexpected",
    "missing",
    "not correctly renamed",
    "incompatible keys",
    "did not match any targeted module",
    "no module was matched",
    "inconsistency was discovered",
)

_LOGGERS = ("diffusers", "transformers", "peft", "LyCORIS")


# --------------------------------------------------------------------------------------------------------------------
# Families and tiny models


@dataclass(frozen=True)
class FamilySpec:
    pipeline: type
    denoiser: str
    text_encoders: tuple[str, ...]

    @property
    def loadable(self) -> tuple[str, ...]:
        """Components that the pipeline's `load_lora_weights` loads into, in order."""
        return (self.denoiser, *self.text_encoders)


SPECS: dict[str, FamilySpec] = {
    "sd1": FamilySpec(StableDiffusionPipeline, "unet", ("text_encoder",)),
    "sdxl": FamilySpec(StableDiffusionXLPipeline, "unet", ("text_encoder", "text_encoder_2")),
    "flux1": FamilySpec(FluxPipeline, "transformer", ("text_encoder",)),
    "sd3": FamilySpec(StableDiffusion3Pipeline, "transformer", ("text_encoder", "text_encoder_2")),
}


def spec(family: str) -> FamilySpec:
    try:
        return SPECS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}") from None


# Tiny models gain nothing from intra-op threads, and on a busy machine spinning workers make every small op
# tens of times slower; the project's own helper is used as a decorator on the public functions.
_one_thread = small_matrix_threads


@dataclass
class Components:
    """Tiny models of one family (name -> module, eval mode, float32) and their fixed inputs."""

    family: str
    seed: int
    models: dict[str, torch.nn.Module]
    inputs: dict[str, dict[str, Any]]

    def __getitem__(self, name: str) -> torch.nn.Module:
        return self.models[name]

    @property
    def spec(self) -> FamilySpec:
        return spec(self.family)


def _clip_config(layers: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=act,
    )


def _sd1_unet() -> UNet2DConditionModel:
    # Block layout of SD 1.x (cross-attention down blocks, plain last down / first up block), two levels deep.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    # SDXL block types, three levels, two resnets per down block; two transformer layers in the deepest level
    # (down_blocks.2, mid_block, up_blocks.0) as SDXL has more there; text_time conditioning (text_embeds 32 + 6 time
    # ids x 8). Every module name exists in the real SDXL UNet.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=32,
    )


def _flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def _sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _build_models(family: str) -> dict[str, torch.nn.Module]:
    if family == "sd1":
        return {"unet": _sd1_unet(), "text_encoder": CLIPTextModel(_clip_config(3, "quick_gelu"))}
    if family == "sdxl":
        return {
            "unet": _sdxl_unet(),
            "text_encoder": CLIPTextModel(_clip_config(3, "quick_gelu")),
            "text_encoder_2": CLIPTextModelWithProjection(_clip_config(4, "gelu")),
        }
    if family == "flux1":
        return {"transformer": _flux_transformer(), "text_encoder": CLIPTextModel(_clip_config(2, "quick_gelu"))}
    if family == "sd3":
        return {
            "transformer": _sd3_transformer(),
            "text_encoder": CLIPTextModelWithProjection(_clip_config(2, "quick_gelu")),
            "text_encoder_2": CLIPTextModelWithProjection(_clip_config(3, "gelu")),
        }
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _build_inputs(family: str, gen: torch.Generator) -> dict[str, dict[str, Any]]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    batch, tokens = 2, 8
    inputs: dict[str, dict[str, Any]] = {}
    for name in spec(family).text_encoders:
        inputs[name] = {"input_ids": torch.randint(0, 1000, (batch, tokens), generator=gen)}
    if family == "sd1":
        inputs["unet"] = {
            "sample": randn(batch, 4, 8, 8),
            "timestep": torch.tensor([10.0, 500.0]),
            "encoder_hidden_states": randn(batch, tokens, 32),
        }
    elif family == "sdxl":
        inputs["unet"] = {
            "sample": randn(batch, 4, 8, 8),
            "timestep": torch.tensor([10.0, 500.0]),
            "encoder_hidden_states": randn(batch, tokens, 64),
            "added_cond_kwargs": {
                "text_embeds": randn(batch, 32),
                "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]] * batch),
            },
        }
    elif family == "flux1":
        side = 4
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros(side * side), rows.flatten().float(), cols.flatten().float()], dim=1)
        inputs["transformer"] = {
            "hidden_states": randn(batch, side * side, 16),
            "encoder_hidden_states": randn(batch, tokens, 32),
            "pooled_projections": randn(batch, 32),
            "timestep": torch.tensor([0.1, 0.7]),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(tokens, 3),
            "guidance": torch.tensor([3.5, 3.5]),
        }
    elif family == "sd3":
        inputs["transformer"] = {
            "hidden_states": randn(batch, 4, 8, 8),
            "encoder_hidden_states": randn(batch, tokens, 32),
            "pooled_projections": randn(batch, 64),
            "timestep": torch.tensor([10.0, 500.0]),
        }
    return inputs


@_one_thread()
def build(family: str, seed: int = 0) -> Components:
    """Fresh tiny base models of `family` with fixed inputs; the same seed gives the same weights and inputs."""
    spec(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = _build_models(family)
    for model in models.values():
        model.eval().requires_grad_(False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    gen = torch.Generator().manual_seed(10_000 + seed)
    return Components(family, seed, models, _build_inputs(family, gen))


def _forward(name: str, model: torch.nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    if hasattr(out, "sample"):
        return {name: out.sample}
    result = {name: out.last_hidden_state}
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.pooler_output
    result[f"{name}.pooled"] = pooled
    return result


def _run(models: Mapping[str, torch.nn.Module], inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, model in models.items():
            outputs.update(_forward(name, model, inputs[name]))
    return outputs


@_one_thread()
def run(components: Components) -> dict[str, torch.Tensor]:
    """Every component's output on its fixed inputs: `<name>` (and `<name>.pooled` for text encoders)."""
    return _run(components.models, components.inputs)


@_one_thread()
def max_rel_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest per-output `max|a - b| / max|b|` over all outputs (same keys required)."""
    if set(a) != set(b):
        raise AssertionError(f"outputs differ in names: {sorted(set(a) ^ set(b))}")
    worst = 0.0
    with torch.no_grad():
        for key, ref in b.items():
            scale = float(ref.abs().max())
            diff = float((a[key].float() - ref.float()).abs().max())
            worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# --------------------------------------------------------------------------------------------------------------------
# LoRA sources written by the libraries


DEFAULT_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sd1", "unet"): (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ),
    ("sdxl", "unet"): (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ),
    ("flux1", "transformer"): (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out",
        "x_embedder", "context_embedder", "norm_out.linear",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
        "guidance_embedder.linear_1", "guidance_embedder.linear_2",
        "text_embedder.linear_1", "text_embedder.linear_2",
    ),
    ("sd3", "transformer"): (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        "norm1.linear", "norm1_context.linear", "proj_out", "norm_out.linear",
        "pos_embed.proj", "context_embedder",
        "timestep_embedder.linear_1", "timestep_embedder.linear_2",
        "text_embedder.linear_1", "text_embedder.linear_2",
    ),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class Source:
    """A LoRA written by a library, with the models it was written from (adapter applied: the reference)."""

    family: str
    kind: str  # "diffusers" | "peft" | "lycoris"
    path: Path  # the file (diffusers, lycoris) or adapter folder (peft)
    adapted: Components
    expect: tuple[str, ...]  # components the LoRA adapts
    modules: dict[str, int]  # number of adapted modules per component
    config: dict[str, dict] = field(default_factory=dict)  # per component: the LoraConfig dict, where one exists
    network: Any = None  # the LyCORIS network object, for lycoris sources


def targets_for(family: str, component: str) -> tuple[str, ...]:
    if component in spec(family).text_encoders:
        return TEXT_ENCODER_TARGETS
    return DEFAULT_TARGETS[(family, component)]


def _first_module(model: torch.nn.Module, suffix: str) -> str:
    for name, _ in model.named_modules():
        if name.endswith(suffix):
            return name
    raise ValueError(f"no module ending in {suffix!r}")


def _mixed_patterns(family: str, component: str, model: torch.nn.Module) -> tuple[dict, dict]:
    """Per-module ranks and alphas: suffix patterns plus one `^`-anchored full path."""
    if component in spec(family).text_encoders:
        anchored = "^" + _first_module(model, "self_attn.q_proj")
        return {"k_proj": 2, anchored: 6}, {"v_proj": 3, "fc2": 16, anchored: 2}
    anchored = "^" + _first_module(model, "attn.to_q" if family in ("flux1", "sd3") else "attn1.to_q")
    return {"to_k": 2, anchored: 6}, {"to_v": 3, "ff.net.2": 16, anchored: 2}


def lora_config(
    family: str,
    component: str,
    model: torch.nn.Module,
    rank: int = 4,
    alpha: float = 8,
    targets: Sequence[str] | None = None,
    mixed: bool = False,
) -> LoraConfig:
    rank_pattern, alpha_pattern = _mixed_patterns(family, component, model) if mixed else ({}, {})
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets or targets_for(family, component)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        init_lora_weights=True,
    )


def _randomise(named: Iterator[tuple[str, torch.nn.Parameter]], gen: torch.Generator) -> int:
    """Random non-zero factors: down/A and Tucker mid ~ N(0, 1/fan_in), up/B ~ N(0, 0.05^2), so the delta is a
    sizeable fraction of the base weight. Returns how many tensors were set."""
    count = 0
    with torch.no_grad():
        for name, param in named:
            shape = param.shape
            if any(tag in name for tag in ("lora_A", "lora_down", "lora_mid")):
                std = max(1, param[0].numel()) ** -0.5
            elif any(tag in name for tag in ("lora_B", "lora_up")):
                std = 0.05
            else:
                continue
            param.copy_(torch.randn(shape, generator=gen) * std)
            count += 1
    return count


def _lora_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def _randomise_peft(model: torch.nn.Module, adapter_name: str, gen: torch.Generator) -> int:
    layers = _lora_layers(model, adapter_name)
    for layer in layers.values():
        _randomise(
            iter([("lora_A", layer.lora_A[adapter_name].weight), ("lora_B", layer.lora_B[adapter_name].weight)]),
            gen,
        )
    return len(layers)


def _target_file(path: str | os.PathLike, default_name: str) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / default_name


@_one_thread()
def diffusers_file(
    family: str,
    path: str | os.PathLike,
    rank: int = 4,
    alpha: float = 8,
    targets: Mapping[str, Sequence[str]] | None = None,
    with_text_encoders: bool = True,
    mixed: bool = False,
    seed: int = 0,
) -> Source:
    """A LoRA file saved by the family's pipeline class `save_lora_weights`, as the diffusers training scripts do.

    PEFT adapters are added with `add_adapter(LoraConfig(...))` to the denoiser (and the text encoders unless
    `with_text_encoders=False`), randomised, and saved from `get_peft_model_state_dict` with each component's
    `peft_config` dict as `lora_adapter_metadata`. `path` is a folder (the file is then
    `pytorch_lora_weights.safetensors`) or a `.safetensors` file name. `targets` overrides the target modules per
    component. `mixed=True` sets `rank_pattern`/`alpha_pattern` (suffix patterns and one `^`-anchored full path).
    """
    components = build(family, seed)
    family_spec = components.spec
    chosen = (family_spec.denoiser, *(family_spec.text_encoders if with_text_encoders else ()))
    gen = torch.Generator().manual_seed(20_000 + seed)
    save_kwargs: dict[str, Any] = {}
    modules: dict[str, int] = {}
    configs: dict[str, dict] = {}
    for name in chosen:
        model = components[name]
        config = lora_config(family, name, model, rank, alpha, (targets or {}).get(name), mixed)
        model.add_adapter(config)
        modules[name] = _randomise_peft(model, "default", gen)
        save_kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        configs[name] = model.peft_config["default"].to_dict()
        save_kwargs[f"{name}_lora_adapter_metadata"] = configs[name]
    file = _target_file(path, "pytorch_lora_weights.safetensors")
    family_spec.pipeline.save_lora_weights(str(file.parent), weight_name=file.name, **save_kwargs)
    return Source(family, "diffusers", file, components, chosen, modules, configs)


@_one_thread()
def peft_folder(
    family: str,
    component: str,
    path: str | os.PathLike,
    rank: int = 4,
    alpha: float = 8,
    targets: Sequence[str] | None = None,
    mixed: bool = False,
    seed: int = 0,
) -> Source:
    """An adapter folder written by `get_peft_model(model, config).save_pretrained(path)` for one component."""
    components = build(family, seed)
    model = components[component]
    config = lora_config(family, component, model, rank, alpha, targets, mixed)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(30_000 + seed)
    count = _randomise_peft(model, "default", gen)
    peft_model.eval()
    peft_model.save_pretrained(str(path))
    return Source(
        family,
        "peft",
        Path(path),
        components,
        (component,),
        {component: count},
        {component: config.to_dict()},
    )


def lycoris_available() -> bool:
    try:
        import lycoris.kohya  # noqa: F401
    except Exception:
        return False
    return True


# LyCORIS presets written out explicitly. Its built-in "full" preset targets diffusers' TimestepEmbedding class and
# also names time_embedding.linear_1/2, so it wraps those twice and refuses a diffusers UNet ("duplicated lora name").
LYCORIS_PRESETS = {
    # kohya-style plain LoRA: Linear and 1x1 conv layers of the transformer blocks, CLIP attention and MLP.
    "lora": {
        "enable_conv": False,
        "unet_target_module": ["Transformer2DModel"],
        "unet_target_name": [],
        "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
    },
    # LoCon: also the resnet, down/upsampler and conv_in/conv_out convolutions (with their kernels) and the
    # time-embedding linears.
    "locon": {
        "enable_conv": True,
        "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
        "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
        "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
    },
}


def _toml_preset(preset: Mapping[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    return "".join(f"{key} = {value(v)}\n" for key, v in preset.items())


@_one_thread()
def lycoris_file(
    family: str,
    path: str | os.PathLike,
    algo: str = "locon",
    rank: int = 4,
    alpha: float = 8,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    with_text_encoders: bool = True,
    seed: int = 0,
) -> Source:
    """A kohya-style LoRA/LoCon file written by LyCORIS itself (sd1/sdxl UNet, optionally the CLIP text encoders).

    As a kohya trainer drives it: `lycoris.kohya.create_network(1.0, rank, alpha, None, text_encoder, unet,
    algo="lora", preset=<toml file>, conv_dim=..., conv_alpha=...)` with the preset of `LYCORIS_PRESETS[algo]`,
    then `network.apply_to(...)`, random factors, and `network.save_weights(path, torch.float32, {})`. Keys are
    `lora_unet_<diffusers module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` and
    `lora_te_` (sd1) or `lora_te1_`/`lora_te2_` (sdxl). Conv layers keep their kernel on `lora_down`.
    """
    import tempfile

    from lycoris.kohya import create_network

    if family not in ("sd1", "sdxl"):
        raise ValueError("lycoris_file supports the UNet families sd1 and sdxl")
    if algo not in LYCORIS_PRESETS:
        raise ValueError(f"algo must be one of {sorted(LYCORIS_PRESETS)}")
    components = build(family, seed)
    family_spec = components.spec
    encoders = [components[name] for name in family_spec.text_encoders]
    text_encoder = (encoders[0] if len(encoders) == 1 else encoders) if with_text_encoders else None
    unet = components["unet"]
    with tempfile.TemporaryDirectory() as tmp, capture_messages() as messages:
        preset_file = Path(tmp) / f"{algo}.toml"
        preset_file.write_text(_toml_preset(LYCORIS_PRESETS[algo]))
        network = create_network(
            1.0,
            rank,
            alpha,
            None,
            text_encoder,
            unet,
            algo="lora",
            preset=str(preset_file),
            conv_dim=conv_rank or rank,
            conv_alpha=conv_alpha or alpha,
        )
        network.apply_to(text_encoder, unet, apply_text_encoder=with_text_encoders, apply_unet=True)
    if messages:
        raise RuntimeError("LyCORIS complained while building the network:\n" + "\n".join(messages))
    gen = torch.Generator().manual_seed(40_000 + seed)
    _randomise(network.named_parameters(), gen)
    network.eval().requires_grad_(False)
    file = _target_file(path, "lycoris.safetensors")
    file.parent.mkdir(parents=True, exist_ok=True)
    network.save_weights(str(file), torch.float32, {})
    modules = {"unet": len(network.unet_loras)}
    expect: tuple[str, ...] = ("unet",)
    if with_text_encoders:
        prefixes = ["lora_te_"] if len(encoders) == 1 else [f"lora_te{i + 1}_" for i in range(len(encoders))]
        for name, prefix in zip(family_spec.text_encoders, prefixes):
            modules[name] = sum(1 for lora in network.text_encoder_loras if lora.lora_name.startswith(prefix))
        expect = family_spec.loadable
    return Source(family, "lycoris", file, components, expect, modules, network=network)


@_one_thread()
def reference_outputs(components: Components, source: Source) -> dict[str, torch.Tensor]:
    """Outputs of `source`'s own adapted models (the making library's forward) on `components`' inputs."""
    if components.family != source.family:
        raise ValueError(f"components are {components.family}, source is {source.family}")
    return _run(source.adapted.models, components.inputs)


@_one_thread()
def deltas(components: Components, adapter_name: str) -> dict[str, torch.Tensor]:
    """`scale * B @ A` of every PEFT LoRA layer of the adapter, as PEFT computes it (`get_delta_weight`), keyed
    `<component>.<module path>` (e.g. `unet.down_blocks.0.attentions.0.proj_in`); base weight shape (conv: 4-D)."""
    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, model in components.models.items():
            for path, layer in _lora_layers(model, adapter_name).items():
                result[f"{name}.{path}"] = layer.get_delta_weight(adapter_name).detach().clone()
    return result


@_one_thread()
def reference_deltas(source: Source) -> dict[str, torch.Tensor]:
    """The weight delta of every adapted module as the making library computes it, keyed like `deltas()`.

    PEFT's `get_delta_weight` for diffusers and PEFT sources; LyCORIS's `get_diff_weight` for lycoris sources.
    Compare a converted file's effect module by module, also where no library can load it (kohya Flux single-block
    `linear1` at tiny widths, SD3 kohya): stack the `to_q/to_k/to_v` deltas by rows to get a fused `qkv` delta.
    """
    if source.kind != "lycoris":
        return deltas(source.adapted, "default")
    paths = {
        id(module): f"{name}.{path}"
        for name, model in source.adapted.models.items()
        for path, module in model.named_modules()
    }
    with torch.no_grad():
        return {
            paths[id(lora.org_module[0])]: lora.get_diff_weight(multiplier=1)[0].detach().clone()
            for lora in source.network.loras
        }


def max_rel_delta_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Like `max_rel_diff`, for weight deltas; shapes must agree exactly."""
    for key in set(a) & set(b):
        if tuple(a[key].shape) != tuple(b[key].shape):
            raise AssertionError(f"{key}: shape {tuple(a[key].shape)} != {tuple(b[key].shape)}")
    return max_rel_diff(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Loaders


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def capture_messages() -> Iterator[list[str]]:
    """Collect warnings-module warnings and WARNING+ log records of the libraries while the block runs."""
    collector = _Collector()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(collector)
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield collector.messages
        collector.messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        for lg, level in saved:
            lg.removeHandler(collector)
            lg.setLevel(level)


def fatal_messages(messages: Sequence[str], patterns: Sequence[str] = FATAL_MESSAGES) -> list[str]:
    return [m for m in messages if any(p in m.lower() for p in patterns)]


@dataclass
class LoadReport:
    messages: list[str]  # every warning seen while loading (none of them fatal)
    layers: dict[str, int]  # LoRA layers of the adapter per loadable component
    model: Any = None  # the PeftModel, for load_with_peft


def _check_layers(model: torch.nn.Module, adapter_name: str, where: str) -> int:
    """Every LoRA layer of the adapter must hold real, non-zero B weights (zero B = a key that never loaded)."""
    layers = _lora_layers(model, adapter_name)
    empty = []
    for name, layer in layers.items():
        weight = layer.lora_B[adapter_name].weight
        if weight.is_meta or not bool(weight.detach().abs().max() > 0):
            empty.append(name)
    if empty:
        raise AssertionError(f"{where}: LoRA layers whose weights never loaded: {empty}")
    return len(layers)


def _pipeline(components: Components):
    m = components.models
    if components.family == "sd1":
        return StableDiffusionPipeline(
            vae=None, text_encoder=m["text_encoder"], tokenizer=None, unet=m["unet"], scheduler=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if components.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=None, text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"], tokenizer=None,
            tokenizer_2=None, unet=m["unet"], scheduler=None,
        )
    if components.family == "flux1":
        return FluxPipeline(
            scheduler=None, vae=None, text_encoder=m["text_encoder"], tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, transformer=m["transformer"],
        )
    if components.family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=m["transformer"], scheduler=None, vae=None, text_encoder=m["text_encoder"], tokenizer=None,
            text_encoder_2=m["text_encoder_2"], tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
    raise ValueError(f"unknown family {components.family!r}")


def _split_weight_name(path: Path, weight_name: str | None) -> tuple[Path, str]:
    """Offline, diffusers needs `weight_name` even for a file path, so pass (folder, file name) as users do."""
    if path.is_file():
        return path.parent, path.name
    if weight_name:
        return path, weight_name
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return path, "pytorch_lora_weights.safetensors"
    candidates = sorted(p.name for p in path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise ValueError(f"{path}: name the LoRA file (weight_name=...); found {candidates}")
    return path, candidates[0]


def _diffusers_file_modules(components: Components, folder: Path, weight_name: str) -> dict[str, set[str]]:
    """Module paths per component that diffusers reads from the file, after its own key conversion.

    Runs the pipeline class's `lora_state_dict` (which converts kohya and other foreign styles), then the same
    per-component renames `load_lora_adapter` / `_load_lora_into_text_encoder` apply before injecting.
    """
    family_spec = components.spec
    kwargs: dict[str, Any] = {"weight_name": weight_name}
    if components.family == "sdxl":
        kwargs["unet_config"] = components["unet"].config  # as StableDiffusionXLPipeline.load_lora_weights does
    loaded = family_spec.pipeline.lora_state_dict(str(folder), **kwargs)
    state_dict = loaded[0] if isinstance(loaded, tuple) else loaded
    modules: dict[str, set[str]] = {}
    for name in family_spec.loadable:
        prefix = f"{name}."
        part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not part:
            modules[name] = set()
            continue
        if name == family_spec.denoiser:
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        modules[name] = {k.split(".lora_")[0] for k in part if ".lora_" in k}
    return modules


@_one_thread()
def load_with_diffusers(
    family: str,
    components: Components,
    path: str | os.PathLike,
    adapter_name: str = "x",
    expect: Sequence[str] | None = None,
    **kwargs: Any,
) -> LoadReport:
    """`pipe.load_lora_weights(folder, weight_name=...)` on a pipeline holding `components` (no VAE, tokenizer or
    scheduler); `path` is the LoRA file, or a folder holding it.

    It is the user's code path, including diffusers' own conversion of kohya and other foreign key styles.
    Raises AssertionError when loading raises; when a captured message matches FATAL_MESSAGES (except "No LoRA
    keys" for a component outside `expect`); when a module that diffusers read from the file has no LoRA layer
    afterwards (diffusers drops unknown module names of the denoiser silently); when a LoRA layer is left with zero
    or meta weights; or when the components that received LoRA layers are not exactly `expect` (default: every
    LoRA-loadable component of the family). Extra kwargs go to `load_lora_weights`.
    """
    if components.family != family:
        raise ValueError(f"components are {components.family}, not {family}")
    loadable = components.spec.loadable
    expected = set(loadable if expect is None else expect)
    if not expected <= set(loadable):
        raise ValueError(f"expect must be within {loadable}")
    folder, kwargs["weight_name"] = _split_weight_name(Path(path), kwargs.get("weight_name"))
    pipe = _pipeline(components)
    with capture_messages() as messages:
        try:
            pipe.load_lora_weights(str(folder), adapter_name=adapter_name, **kwargs)
            in_file = _diffusers_file_modules(components, folder, kwargs["weight_name"])
        except Exception as exc:
            seen = "".join(f"\n  {m}" for m in messages)
            raise AssertionError(f"diffusers could not load {path}: {type(exc).__name__}: {exc}{seen}") from exc
    # "No LoRA keys ... prefix='<name>'" is expected for a component the file is not meant to touch.
    tolerated = [f"prefix='{name}'" for name in loadable if name not in expected]
    bad = [m for m in fatal_messages(messages) if not ("no lora keys" in m.lower() and any(t in m for t in tolerated))]
    if bad:
        raise AssertionError(f"diffusers loaded {path} with problems:\n" + "\n".join(bad))
    layers: dict[str, int] = {}
    for name in loadable:
        where = f"{path} [{name}]"
        injected = set(_lora_layers(components[name], adapter_name))
        dropped = sorted(in_file[name] - injected)
        if dropped:
            raise AssertionError(f"{where}: modules in the file that got no LoRA layer: {dropped}")
        extra = sorted(injected - in_file[name])
        if extra:
            raise AssertionError(f"{where}: LoRA layers for modules not in the file: {extra}")
        layers[name] = _check_layers(components[name], adapter_name, where)
    got = {name for name, count in layers.items() if count}
    if got != expected:
        raise AssertionError(f"{path}: LoRA landed in {sorted(got)}, expected {sorted(expected)}")
    return LoadReport(list(messages), layers)


@_one_thread()
def load_with_peft(
    components: Components,
    component: str,
    folder: str | os.PathLike,
    adapter_name: str = "default",
) -> LoadReport:
    """`PeftModel.from_pretrained(components[component], folder)`; the component is adapted in place.

    Raises AssertionError on loading errors, on FATAL_MESSAGES warnings (PEFT warns about missing keys), on tensors in
    the folder that the model does not take (PEFT ignores those silently), and on zero/meta LoRA weights.
    """
    model = components[component]
    folder = Path(folder)
    with capture_messages() as messages:
        try:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
        except Exception as exc:
            raise AssertionError(f"PEFT could not load {folder}: {type(exc).__name__}: {exc}") from exc
    bad = fatal_messages(messages)
    if bad:
        raise AssertionError(f"PEFT loaded {folder} with problems:\n" + "\n".join(bad))
    peft_model.eval()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        file_keys = set(handle.keys())
    taken = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    unexpected = sorted(file_keys - taken)
    if unexpected:
        raise AssertionError(f"PEFT ignored tensors of {folder}: {unexpected}")
    count = _check_layers(model, adapter_name, str(folder))
    if not count:
        raise AssertionError(f"{folder}: no LoRA layers were created")
    return LoadReport(list(messages), {component: count}, peft_model)


# --------------------------------------------------------------------------------------------------------------------
# Small helpers for tests


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `lora_adapter_metadata` of a diffusers-written file ({} when absent)."""
    raw = file_metadata(path).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def rename_keys(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    pattern: str,
    replacement: str,
    keep_metadata: bool = True,
) -> int:
    """Copy a safetensors file with `re.sub(pattern, replacement, key)` applied to every key; returns keys changed."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    changed = 0
    with safe_open(str(src), "pt") as handle:
        metadata = handle.metadata() if keep_metadata else None
        for key in handle.keys():
            new = re.sub(pattern, replacement, key)
            changed += new != key
            tensors[new] = handle.get_tensor(key)
    save_file(tensors, str(dst), metadata=metadata)
    return changed

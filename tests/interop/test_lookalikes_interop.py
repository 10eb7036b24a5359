"""Families whose diffusers names overlap, on LoRAs PEFT writes for diffusers' own model classes.

Two kinds of file:

- tiny models (two blocks, toy widths): they say little, so the evidence may leave the family open, but it must
  never decide a wrong one, the true family is always among the candidates, and nothing is written for a family the
  file was not made for;
- the released configurations (every block, the real widths), built on the meta device so that only PEFT's LoRA
  factors take memory: here the evidence (names, widths, complete block counts) decides, and only the look-alikes
  whose keys are identical by construction stay tied until metadata says which.

No prior decides anything: the answers do not change when the families are examined in another order.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import diffusers  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import loratools  # noqa: E402
import loratools.families as families  # noqa: E402
from loratools.errors import FormatError, UnknownFamily  # noqa: E402

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
    # 48 blocks as released: Mochi's last block has no text-stream update, a module (norm1_context.linear_1) the
    # naming tables know at block 47 only
    "mochi": ("MochiTransformer3DModel", {**HEADS, "num_layers": 48, "pooled_projection_dim": 16, "in_channels": 4,
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
TARGETS = ("kohya", "comfy", "diffusers", "peft")


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


def _tensors(path) -> dict:
    """Every tensor a written file or PEFT folder holds, keyed by file and tensor name."""
    from pathlib import Path

    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return {(str(f.relative_to(path)) if path.is_dir() else "", k): v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", sorted(TINY))
def test_tiny_model_lora_is_written_only_for_its_own_family(family, tmp_path):
    """Convert without --family either refuses, naming the same candidates inspect shows, or writes exactly what
    it writes when told the true family: never another family's names (nor anything, while the true family has no
    naming tables)."""
    source = _lora_file(family, tmp_path / f"{family}.safetensors")
    shown = loratools.inspect(source)["family"]
    for to in TARGETS:
        try:
            told = loratools.convert(source, to, tmp_path / "told" / f"x.{to}", family=family).output
        except FormatError as exc:
            assert "no naming tables" in str(exc), exc
            told = None
        try:
            guessed = loratools.convert(source, to, tmp_path / "auto" / f"x.{to}").output
        except UnknownFamily as exc:
            assert shown["id"] == "unknown", (to, shown)
            assert str(exc).endswith("pass --family with one of: " + ", ".join(shown["candidates"])), exc
            continue
        except FormatError as exc:
            assert told is None and "no naming tables" in str(exc), exc
            continue
        assert told is not None, f"{to}: written for {shown['id']}, but {family} has no naming tables"
        a, b = _tensors(told), _tensors(guessed)
        assert a.keys() == b.keys(), (to, sorted(a.keys() ^ b.keys())[:4])
        assert all(torch.equal(a[k], b[k]) for k in a), to


# --------------------------------------------------------------------------------------------------------------------
# The released configurations

WAN = {"attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256}
SD3 = {"sample_size": 32, "in_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096,
       "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 16}  # position table cut: no LoRA on it
COG = {"attention_head_dim": 64, "text_embed_dim": 4096, "time_embed_dim": 512, "in_channels": 16, "out_channels": 16}
RELEASED = {
    "sd3": ("SD3Transformer2DModel", {**SD3, "num_layers": 24, "num_attention_heads": 24,
                                      "caption_projection_dim": 1536}),
    "sd35_large": ("SD3Transformer2DModel", {**SD3, "num_layers": 38, "num_attention_heads": 38,
                                             "caption_projection_dim": 2432, "qk_norm": "rms_norm"}),
    "flux1": ("FluxTransformer2DModel", {"in_channels": 64, "guidance_embeds": True}),
    "chroma": ("ChromaTransformer2DModel", {}),
    "flux2": ("Flux2Transformer2DModel", {}),
    "qwen_image": ("QwenImageTransformer2DModel", {}),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", {}),
    "cogvideox_2b": ("CogVideoXTransformer3DModel", {**COG, "num_attention_heads": 30, "num_layers": 30}),
    "cogvideox_5b": ("CogVideoXTransformer3DModel", {**COG, "num_attention_heads": 48, "num_layers": 42,
                                                     "use_rotary_positional_embeddings": True}),
    "mochi": ("MochiTransformer3DModel", {}),
    "wan21_1.3b": ("WanTransformer3DModel", {**WAN, "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960}),
    "wan21_14b": ("WanTransformer3DModel", {**WAN, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824}),
    "wan21_14b_i2v": ("WanTransformer3DModel", {**WAN, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824,
                                                "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120}),
    "wan22_5b": ("WanTransformer3DModel", {**WAN, "num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336,
                                           "in_channels": 48, "out_channels": 48}),
}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# (model, targets) -> the decided family, or the set of families the keys cannot separate (a tie to be reported).
# "all" is every Linear of the model, "attention" the to_q/to_k/to_v/to_out.0 most LoRAs train; "all" is left out
# where it adds nothing to decide (PEFT takes seconds to wrap a thousand layers).
EXPECTED = {
    ("sd3", "all"): "sd3", ("sd3", "attention"): "sd3",
    ("sd35_large", "attention"): "sd35_large",
    ("flux1", "all"): "flux1", ("flux1", "attention"): {"flux1", "chroma"},
    ("chroma", "all"): "chroma", ("chroma", "attention"): {"flux1", "chroma"},
    ("flux2", "attention"): "flux2", ("qwen_image", "attention"): "qwen_image",
    ("hunyuan_video", "all"): "hunyuan_video", ("hunyuan_video", "attention"): "hunyuan_video",
    # complete block counts: CogVideoX 2B/5B have 30/42 blocks, Mochi 48 (3072 wide like the 5B): 42 is part of it
    ("cogvideox_2b", "attention"): "cogvideox", ("cogvideox_5b", "attention"): "cogvideox",
    ("mochi", "attention"): "mochi",
    ("wan21_1.3b", "all"): "wan21", ("wan21_14b", "all"): {"wan21", "wan22"},
    ("wan21_14b_i2v", "all"): "wan21", ("wan21_14b_i2v", "attention"): {"wan21", "wan22"},
    ("wan22_5b", "all"): "wan22", ("wan22_5b", "attention"): "wan22",
}


def _released_lora(model: str, targets: str, path, metadata: dict | None = None) -> str:
    """A LoRA with PEFT's names and shapes for the released configuration of ``model`` (built on the meta device;
    rank 1, random bf16 factors)."""
    from accelerate import init_empty_weights

    cls_name, config = RELEASED[model]
    with init_empty_weights(include_buffers=True):
        net = getattr(diffusers, cls_name)(**config)
    names = sorted({n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)})
    net.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=names if targets == "all" else list(ATTENTION)))
    gen = torch.Generator().manual_seed(0)
    state = {f"transformer.{k}": torch.randn(v.shape, generator=gen).to(torch.bfloat16)
             for k, v in get_peft_model_state_dict(net).items()}
    save_file(state, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("model,targets", sorted(EXPECTED))
def test_released_configuration_is_decided_by_evidence_alone(model, targets, tmp_path, monkeypatch):
    path = _released_lora(model, targets, tmp_path / "lora.safetensors")
    fam = loratools.inspect(path)["family"]
    want = EXPECTED[model, targets]
    if isinstance(want, str):
        assert fam["id"] == want and fam["confidence"] >= families.DECIDED, fam
    else:  # identical keys by construction: a tie, never a pick
        assert fam["id"] == "unknown" and set(fam["candidates"]) == want, fam
        assert "equally well" in fam["reason"]
    # no prior: the families examined in reverse order give the same answer
    every = families.load_families()
    monkeypatch.setattr(families, "load_families", lambda: dict(reversed(list(every.items()))))
    again = loratools.inspect(path)["family"]
    assert (again["id"], again["confidence"], sorted(again["candidates"])) == (
        fam["id"], fam["confidence"], sorted(fam["candidates"]))


@pytest.mark.parametrize("model,targets,metadata,decided", [
    ("flux1", "attention", {"modelspec.architecture": "flux-1-dev/lora"}, "flux1"),
    ("chroma", "attention", {"ss_base_model_version": "chroma"}, "chroma"),
    ("wan21_14b", "all", {"ss_base_model_version": "wan2.1"}, "wan21"),
    ("wan21_14b", "all", {"modelspec.architecture": "wan2.2-t2v-a14b"}, "wan22"),
    # a claim the keys contradict decides nothing: the keys are SD3's
    ("sd3", "attention", {"ss_base_model_version": "flux1"}, "sd3"),
])
def test_metadata_breaks_only_ties_the_keys_leave(model, targets, metadata, decided, tmp_path):
    fam = loratools.inspect(_released_lora(model, targets, tmp_path / "lora.safetensors", metadata))["family"]
    assert fam["id"] == decided, fam
    claim = next(c for c in fam["metadata_claims"] if c["key"] in metadata)
    assert claim["agrees"] is (claim["family"] == decided)


@pytest.mark.parametrize("model,targets", [("flux1", "attention"), ("wan21_14b", "all")])  # one per kind of tie
def test_released_ties_are_written_only_as_every_candidate_writes_them(model, targets, tmp_path):
    """FLUX.1 ⇄ Chroma and Wan 2.1 ⇄ Wan 2.2 LoRAs the keys cannot separate are written without --family only
    because each candidate writes the very same file (then no family is recorded)."""
    path = _released_lora(model, targets, tmp_path / "lora.safetensors")
    candidates = sorted(EXPECTED[model, targets])
    for to in TARGETS:
        done = loratools.convert(path, to, tmp_path / "auto" / f"x.{to}")
        assert done.family == "unknown", to
        written = _tensors(done.output)
        for fid in candidates:
            told = _tensors(loratools.convert(path, to, tmp_path / fid / f"x.{to}", family=fid).output)
            assert told.keys() == written.keys() and all(torch.equal(told[k], written[k]) for k in told), (to, fid)

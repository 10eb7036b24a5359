"""Anima: the Cosmos-Predict2 DiT (diffusers' ``CosmosTransformer3DModel``) and its LLM adapter (diffusers'
``AnimaTextConditioner``, the native ``llm_adapter.*`` of the released single file). A LoRA on every Linear of both
tiny models, converted to every target and back, gives the adapted models' outputs when diffusers' own Anima loader
or PEFT applies it; diffusers' converter names every native module as the family table does; a bake into a
diffusers folder of both components equals PEFT's merge."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import loratools  # noqa: E402
from loratools.families import get_family  # noqa: E402
from loratools.families.naming import split_component  # noqa: E402
from loratools.ops.threads import small_matrix_threads  # noqa: E402

from .dit import FATAL, merged_state  # noqa: E402

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "AnimaTextConditioner"):
    pytest.skip("this diffusers has no Anima support", allow_module_level=True)

from diffusers.loaders import AnimaLoraLoaderMixin  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers  # noqa: E402

pytestmark = pytest.mark.interop

# mlp_ratio 2 and model_dim != target_dim, so that in_proj exists; the DiT's text width is the adapter's output
TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                   mlp_ratio=2.0, text_embed_dim=24, adaln_lora_dim=8, max_size=(2, 8, 8), patch_size=(1, 2, 2),
                   concat_padding_mask=False, extra_pos_embed_type=None)
CONDITIONER = dict(source_dim=20, target_dim=24, model_dim=32, num_layers=2, num_attention_heads=2, mlp_ratio=2.0,
                   target_vocab_size=50)
PARTS = ("transformer", "text_conditioner")


class _Pipe(AnimaLoraLoaderMixin):
    """The two models a user's Anima pipeline holds, with the loader mixin its ``load_lora_weights`` comes from."""

    def __init__(self, transformer, text_conditioner):
        self.transformer, self.text_conditioner = transformer, text_conditioner
        self.hf_device_map = None
        self.components = {"transformer": transformer, "text_conditioner": text_conditioner}


@small_matrix_threads()
def _build():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (diffusers.CosmosTransformer3DModel(**TRANSFORMER).eval().requires_grad_(False),
                diffusers.AnimaTextConditioner(**CONDITIONER).eval().requires_grad_(False))


@small_matrix_threads()
def _forward(transformer, conditioner) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    qwen, ids = torch.randn(1, 5, 20, generator=gen), torch.randint(0, 50, (1, 6), generator=gen)
    x = torch.randn(1, 4, 1, 8, 8, generator=gen)
    with torch.no_grad():
        return transformer(x, torch.tensor([0.5]), conditioner(qwen, ids), return_dict=False)[0]


def _linears(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A diffusers-format LoRA on every Linear of both models (rank 4, alpha 8), and the adapted models' output."""
    folder = tmp_path_factory.mktemp("anima")
    models = _build()
    for model in models:
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=_linears(model), init_lora_weights=False))
    reference = _forward(*models)
    _Pipe._save_lora_weights(str(folder), {p: get_peft_model_state_dict(m) for p, m in zip(PARTS, models)},
                             {p: m.peft_config["default"].to_dict() for p, m in zip(PARTS, models)})
    return folder / "pytorch_lora_weights.safetensors", reference, [merged_state(copy.deepcopy(m)) for m in models]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _applied(path) -> torch.Tensor:
    """The output of fresh models with ``path`` applied as users apply it: a PEFT folder per component with
    ``PeftModel``, a file with diffusers' Anima ``load_lora_weights``."""
    transformer, conditioner = _build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if os.path.isdir(path):
            assert sorted(os.listdir(path)) == sorted(PARTS)
            transformer = PeftModel.from_pretrained(transformer, os.path.join(path, "transformer"))
            conditioner = PeftModel.from_pretrained(conditioner, os.path.join(path, "text_conditioner"))
        else:
            _Pipe(transformer, conditioner).load_lora_weights(os.path.dirname(path),
                                                              weight_name=os.path.basename(path))
    said = [str(w.message) for w in caught if any(f in str(w.message).lower() for f in FATAL + ("inconsisten",))]
    assert not said, said[0][:500]  # e.g. a config whose target modules are not the file's
    return _forward(transformer, conditioner)


def test_the_source_acts_through_both_models(source):
    path, reference, _ = source
    base = _forward(*_build())
    assert _rel(base, reference) > 0.1
    assert _rel(_applied(path), reference) <= 1e-6
    with loratools.load(path) as lora:
        assert lora.family.id == "anima" and len(lora.modules) == len(_linears(_build()[0])) + len(
            _linears(_build()[1]))


@pytest.mark.parametrize("to", ["kohya", "comfy", "diffusers", "peft"])
def test_every_target_and_back_acts_the_same(to, source, tmp_path):
    path, reference, _ = source
    out = loratools.convert(path, to, tmp_path / ("out" if to == "peft" else f"out.{to}.safetensors")).output
    if to == "kohya":  # diffusers' Anima loader reads diffusers names and ComfyUI's `diffusion_model.` files only
        keys = load_file(out)
        assert any(k.startswith("lora_unet_llm_adapter_blocks_0_") for k in keys)
        assert all(k.startswith("lora_unet_") for k in keys)
    else:
        assert _rel(_applied(out), reference) <= 1e-5, to
    back = loratools.convert(out, "diffusers", tmp_path / "back.safetensors").output
    assert _rel(_applied(back), reference) <= 1e-5
    assert loratools.verify(path, out, rtol=1e-6).equal


def test_the_table_names_modules_as_diffusers_converter_does():
    """Every native module of the family table, spelled as ComfyUI files spell it, becomes the diffusers name of the
    table under diffusers' own converter (the LLM adapter's in the text_conditioner component)."""
    table = get_family("anima").naming
    seen = 0
    for rule in table.model.rules:
        native, (diffusers_name,) = rule.native.replace("{i}", "3"), rule.diffusers
        got = _convert_non_diffusers_anima_lora_to_diffusers({f"diffusion_model.{native}.lora_A.weight": 0})
        want = ".".join(split_component(diffusers_name.replace("{i}", "3"), "transformer"))
        assert list(got) == [f"{want}.lora_A.weight"], native
        seen += 1
    assert seen == len(table.model.rules) >= 30


def test_the_tiny_models_have_no_linear_the_table_lacks():
    transformer, conditioner = _build()
    table = get_family("anima").naming
    for name in _linears(transformer):
        assert table.resolve("model", name, False) is not None, name
    for name in _linears(conditioner):
        assert table.resolve("model", f"text_conditioner.{name}", False) is not None, name


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_bake_into_a_diffusers_folder_equals_peft_merge(fmt, source, tmp_path):
    path, _, merged = source
    lora = path if fmt == "diffusers" else loratools.convert(path, fmt, tmp_path / "lora.safetensors").output
    base = tmp_path / "base"
    for part, model in zip(PARTS, _build()):
        model.save_pretrained(str(base / part))
    (base / "model_index.json").write_text(json.dumps({"_class_name": "AnimaModularPipeline"}))
    result = loratools.bake(base, [lora], tmp_path / "out", dtype="fp32")
    assert result.unmatched == []
    for part, want, fresh in zip(PARTS, merged, _build()):
        got = load_file(str(tmp_path / "out" / part / "diffusion_pytorch_model.safetensors"))
        before, moved = fresh.state_dict(), set()
        assert set(got) == set(before)
        for key, w in want.items():
            assert float((got[key].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30)) <= 1e-6, key
            if not torch.equal(got[key], before[key]):
                moved.add(key)
        assert moved == {m + ".weight" for m in _linears(fresh)}, part  # every adapted weight, and nothing else

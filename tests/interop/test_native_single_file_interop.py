"""The family tables against diffusers' own single-file converters, for families whose LoRAs diffusers reads in
diffusers names only (so its LoRA loader cannot check our native names): a native single file built from the tiny
model through the table converts back to the model's own weights with diffusers' converter, and a LoRA baked into
that file (kohya and comfy spellings) equals PEFT's merge once diffusers converts it."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import loratools  # noqa: E402
from loratools.families import get_family  # noqa: E402
from loratools.families.naming import DIFFUSERS, NATIVE  # noqa: E402

from .dit import build, linear_modules, source  # noqa: E402

pytestmark = pytest.mark.interop

# family -> (diffusers' converter of the original single file, the model's other tensors under their original names)
CASES = {
    "auraflow": ("convert_auraflow_transformer_checkpoint_to_diffusers",
                 {"register_tokens": "register_tokens", "positional_encoding": "pos_embed.pos_embed",
                  "init_x_linear.bias": "pos_embed.proj.bias", "t_embedder.mlp.0.bias": "time_step_proj.linear_1.bias",
                  "t_embedder.mlp.2.bias": "time_step_proj.linear_2.bias"}),
}


def _native(case: str, state: dict) -> dict:
    """The model's weights as the original single file names them, through the family table (halves swapped where
    the table says the namings order them differently)."""
    table = get_family(case).naming
    out = {native: state[d].clone() for native, d in CASES[case][1].items()}
    for name in linear_modules(build(case)[0]):
        canon = table.resolve("model", name, False)
        assert canon is not None and canon.naming == DIFFUSERS and canon.part is None, name
        w = state[f"{name}.weight"].clone()
        if table.rule("model", canon.native).swaps(DIFFUSERS, NATIVE, w.shape[0], w.shape[1]):
            w = torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
        out[f"{canon.native}.weight"] = w
    return out


def _diffusers(case: str, native: dict) -> dict:
    return getattr(single_file_utils, CASES[case][0])(dict(native))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_table_is_diffusers_single_file_naming(case):
    state = build(case)[0].state_dict()
    converted = _diffusers(case, _native(case, state))
    for name in linear_modules(build(case)[0]):
        assert torch.equal(converted[f"{name}.weight"], state[f"{name}.weight"]), name


def _merged(model) -> dict:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("fmt", ["kohya", "comfy", "diffusers"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bake_into_the_original_single_file_equals_peft_merge(case, fmt, tmp_path):
    src = source(case, tmp_path / "src")
    lora = src.path if fmt == "diffusers" else loratools.convert(src.path, fmt, tmp_path / f"l.{fmt}.safetensors",
                                                                 family=case).output
    base = tmp_path / "base.safetensors"
    save_file(_native(case, build(case)[0].state_dict()), str(base))
    result = loratools.bake(base, [lora], tmp_path / "out.safetensors", dtype="fp32")
    assert result.unmatched == [] and result.patched_tensors == len(src.modules)
    got = _diffusers(case, load_file(str(tmp_path / "out.safetensors")))
    want = _merged(src.adapted)
    for name in src.modules:
        w = want[f"{name}.weight"].double()
        assert float((got[f"{name}.weight"].double() - w).norm() / w.norm()) <= 1e-6, name

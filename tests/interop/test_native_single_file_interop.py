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

from .dit import build, merged_state, source  # noqa: E402

pytestmark = pytest.mark.interop

# family -> (diffusers' converter of the original single file, the model's tensors outside the table's modules under
# their original names: original name -> diffusers name, or None for what the converter reads and drops)
CASES = {
    "auraflow": ("convert_auraflow_transformer_checkpoint_to_diffusers",
                 {"register_tokens": "register_tokens", "positional_encoding": "pos_embed.pos_embed"}),
    "sana": ("convert_sana_transformer_to_diffusers",
             {"pos_embed": None, "y_embedder.y_embedding": None, "attention_y_norm.weight": "caption_norm.weight",
              "final_layer.scale_shift_table": "scale_shift_table",
              **{f"blocks.{i}.scale_shift_table": f"transformer_blocks.{i}.scale_shift_table" for i in range(2)}}),
}


def _native(case: str, state: dict) -> dict:
    """The model's tensors as the original single file names them: every weight and bias of a module the family
    table knows under its native name (the parts of a fused native weight concatenated in order, halves swapped
    where the table says the namings order them differently), the rest from ``CASES``."""
    table = get_family(case).naming
    out = {n: state[d].clone() if d else torch.zeros(1) for n, d in CASES[case][1].items()}
    parts: dict[str, dict] = {}
    for key in state:
        canon = table.resolve("model", key.removesuffix(".weight"), False) if key.endswith(".weight") else None
        if canon is not None:
            assert canon.naming == DIFFUSERS, key
            parts.setdefault(canon.native, {})[canon.part.index if canon.part else 0] = key.removesuffix(".weight")
    for native, by_index in parts.items():
        stems = [by_index[k] for k in sorted(by_index)]
        assert len(stems) == len(table.rule("model", native).diffusers), native  # every part of a fused weight
        weight = torch.cat([state[f"{st}.weight"] for st in stems])
        swap = table.rule("model", native).swaps(DIFFUSERS, NATIVE, weight.shape[0], weight.shape[1])
        for suffix in (".weight", ".bias"):
            if f"{stems[0]}{suffix}" in state:
                t = torch.cat([state[f"{st}{suffix}"] for st in stems])
                out[native + suffix] = torch.cat([t[t.shape[0] // 2:], t[: t.shape[0] // 2]]) if swap else t
    return out


def _diffusers(case: str, native: dict) -> dict:
    return getattr(single_file_utils, CASES[case][0])(dict(native))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_table_is_diffusers_single_file_naming(case):
    """diffusers' converter gives back every tensor of the model from the file named through the table."""
    state = build(case)[0].state_dict()
    converted = _diffusers(case, _native(case, state))
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


@pytest.mark.parametrize("fmt", ["kohya", "comfy", "diffusers"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bake_into_the_original_single_file_equals_peft_merge(case, fmt, tmp_path):
    src = source(case, tmp_path / "src")
    lora = src.path if fmt == "diffusers" else loratools.convert(src.path, fmt, tmp_path / f"l.{fmt}.safetensors",
                                                                 family=case).output
    base = tmp_path / "base.safetensors"
    save_file(_native(case, build(case)[0].state_dict()), str(base))
    result = loratools.bake(base, [lora], tmp_path / "out.safetensors", dtype="fp32")
    natives = {get_family(case).naming.resolve("model", m, False).native for m in src.modules}  # fused: one weight
    assert result.unmatched == [] and result.patched_tensors == len(natives)
    got = _diffusers(case, load_file(str(tmp_path / "out.safetensors")))
    want = merged_state(src.adapted)
    for name in src.modules:
        w = want[f"{name}.weight"].double()
        assert float((got[f"{name}.weight"].double() - w).norm() / w.norm()) <= 1e-6, name

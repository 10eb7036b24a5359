"""Every real LoRA layout, synthesised, loads with the right format, family, components and scales."""

import json

import pytest

from synth import layout, lora_layouts, other_layouts, write_peft_folder

import loratools
from loratools.errors import FormatError

FAMILY = {"sd15": "sd1"}  # layout family names that differ from our ids
FORMAT = {  # layout format label -> our format id
    "kohya": "kohya", "kohya_mixed": "kohya", "kohya_lokr": "lycoris", "lycoris_lokr": "lycoris",
    "kohya_diffusers": "onetrainer", "kohya_diffusers_dora": "onetrainer", "onetrainer_dora": "onetrainer",
    "diffusers": "diffusers", "diffusers_peft": "diffusers", "diffusers_attnproc": "diffusers_legacy",
    "diffusers_lora_linear": "diffusers_legacy", "peft": "peft", "aitoolkit": "comfy",
    "diffusion_model_peft": "comfy", "comfy_lora": "comfy", "comfy_lora_diff": "comfy", "xlabs": "xlabs",
    "bfl_control_lora": "bfl_control", "cloneofsimo": "cloneofsimo",
}


def expected_format(name: str) -> str:
    lay = layout(name)
    first = next(iter(lay["tensors"]))
    if first.startswith("diffusion_model."):  # dotted native names: the ComfyUI/ai-toolkit convention
        return "comfy"
    return FORMAT[lay["format"]]


LORAS = [n for n in lora_layouts() if "__malformed__" not in n]


def keys_only(name: str) -> bool:
    """Layouts whose source gives no shapes: only names are evidence, and some names fit several families."""
    return all(t.get("shape") is None for k, t in layout(name)["tensors"].items() if not k.endswith(".alpha"))


@pytest.mark.parametrize("name", LORAS)
def test_layout_format_and_family(name, layout_file):
    lay = layout(name)
    with loratools.load(layout_file(name)) as lora:
        assert lora.format == expected_format(name)
        assert lora.modules
        want = FAMILY.get(lay["family"], lay["family"])
        fam = lora.family
        if not fam.decided:
            # names and shapes that fit several families equally (FLUX.1 and Chroma share every block; a
            # fragment or a keys-only layout says little): an open tie that names the true family, never a pick
            assert want in fam.candidates and "equally well" in fam.reason, (fam.reason, fam.candidates)
            assert fam.confidence == 0.0
            return
        assert fam.id == want, (fam.id, fam.evidence, fam.alternatives)


@pytest.mark.parametrize("name", LORAS)
def test_every_key_is_accounted_for(name, layout_file):
    """Each key is in a module, an extra, or the unknown list: nothing is dropped silently."""
    with loratools.load(layout_file(name)) as lora:
        used = {k for m in lora.modules for k in m.keys}
        extras = {k for keys in lora.extras.values() for k in keys}
        assert used | extras | set(lora.unknown_keys) == set(lora.tensors)
        assert not used & set(lora.unknown_keys)


def test_flux_kohya_components(layout_file):
    with loratools.load(layout_file("flux1__kohya__invokeai-te1-te3.json")) as lora:
        assert dict(lora.components()) == {"te1": 72, "te3": 168, "transformer": 304}
        assert {m.scale for m in lora.modules} == {4.0}  # synthetic alpha 8 over rank 2


def test_kohya_sdxl_components(layout_file):
    with loratools.load(layout_file("sdxl__kohya__invokeai-slider-keys-only.json")) as lora:
        assert dict(lora.components()) == {"unet": 280}


def test_dora_modules_report_axis(layout_file):
    with loratools.load(layout_file("flux1__onetrainer_dora__invokeai-ball.json")) as lora:
        assert all(m.magnitude is not None for m in lora.modules)
        assert {m.dora_axis for m in lora.modules} == {"column"}  # OneTrainer stores [1, in]


def test_lokr_and_mixed_adapters(layout_file):
    with loratools.load(layout_file("qwen_image__kohya_lokr__invokeai-fragment.json")) as lora:
        assert set(lora.adapter_types()) == {"lokr"} or set(lora.adapter_types()) == {"lokr", "lora"}


def test_peft_folder_takes_alpha_from_config(tmp_path):
    folder = write_peft_folder("sd15__peft__faithsang.json", tmp_path / "adapter")
    with loratools.load(folder) as lora:
        assert lora.format == "peft"
        assert {m.alpha for m in lora.modules} == {16}
        assert {m.scale for m in lora.modules} == {16 / 4}


def test_peft_config_patterns_and_rslora(tmp_path):
    folder = write_peft_folder("sd15__peft__faithsang.json", tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    cfg.update(use_rslora=True, alpha_pattern={f"^{target}": 2})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with loratools.load(folder) as lora:
        by_name = {m.name: m for m in lora.modules}
        assert by_name[target].alpha == 2 and by_name[target].scale == pytest.approx(2 / 4**0.5)
        other = by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"]
        assert other.alpha == 16 and other.scale == pytest.approx(16 / 4**0.5)


def test_diffusers_alpha_from_header_metadata(layout_file):
    with loratools.load(layout_file("sd15__diffusers_peft__faithsang.json")) as lora:
        assert {m.alpha for m in lora.modules} == {16}


def test_malformed_file_is_diagnosed(layout_file):
    with pytest.raises(FormatError, match=r"suffix joined with '_' instead of '\.'.*lora_unet_unet_"):
        loratools.load(layout_file("sd15__malformed__timohavdk-bad-convert.json"))


@pytest.mark.parametrize("name", other_layouts())
def test_non_loras_are_not_mistaken_for_loras(name, layout_file):
    with pytest.raises(FormatError, match="not a LoRA"):
        loratools.load(layout_file(name))

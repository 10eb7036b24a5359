"""Baking into a diffusers model folder equals PEFT's own merge (what diffusers `fuse_lora` runs) on the same
tiny models, for every tensor of every component."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

torch = pytest.importorskip("torch")
H = pytest.importorskip("interop.harness")

import loratools  # noqa: E402


def _merged_state(model) -> dict:
    """The model's weights after PEFT merges every LoRA layer (base_layer names brought back to plain ones)."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def _files(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family", ["sdxl", "flux1"])
def test_bake_equals_peft_merge(tmp_path, family):
    base = H.build(family, seed=0)
    for name, model in base.models.items():
        model.save_pretrained(str(tmp_path / "base" / name))
    source = H.diffusers_file(family, tmp_path / "lora.safetensors", seed=0)
    r = loratools.bake(tmp_path / "base", [source.path], tmp_path / "out", family=family, dtype="fp32")
    assert r.unmatched == [] and r.patched_tensors == sum(source.modules.values())
    worst = 0.0
    for name in source.expect:
        want = _merged_state(source.adapted[name])
        got = _files(tmp_path / "out" / name)
        assert set(got) >= {k for k in want if not k.endswith("position_ids")}
        for key, w in want.items():
            if key not in got:
                continue
            diff = float((got[key].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30))
            worst = max(worst, diff)
    assert worst <= 1e-5

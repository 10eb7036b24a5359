"""Baking a LoRA of the DiT families into a diffusers model folder equals PEFT's own merge (what diffusers'
``fuse_lora`` runs) on the family's tiny model, for every weight: the family is taken from the folder's
``model_index.json``, fused native modules (kohya and comfy files) land on their diffusers parts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import loratools  # noqa: E402

from .dit import TINY, build, family, merged_state, source  # noqa: E402

pytestmark = pytest.mark.interop


def _base_folder(case: str, root):
    model, _ = build(case)
    model.save_pretrained(str(root / "transformer"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": TINY[case].pipeline,
                                                       "transformer": ["diffusers", TINY[case].model]}))
    return root


@pytest.mark.parametrize("fmt", ["diffusers", "comfy"])
@pytest.mark.parametrize("case", sorted(TINY))
def test_bake_into_a_diffusers_folder_equals_peft_merge(case, fmt, tmp_path):
    src = source(case, tmp_path / "src")
    lora = src.path
    if fmt != "diffusers":  # a native-named file: fused modules must land on their diffusers parts
        lora = tmp_path / f"lora.{fmt}.safetensors"
        loratools.convert(src.path, to=fmt, output=lora, family=family(case))
    base = _base_folder(case, tmp_path / "base")
    result = loratools.bake(base, [lora], tmp_path / "out", dtype="fp32")
    assert result.unmatched == []
    want = merged_state(src.adapted)
    got = {}
    for f in (tmp_path / "out" / "transformer").glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(want) <= set(got)
    before = build(case)[0].state_dict()
    moved = set()
    for key, w in want.items():
        diff = float((got[key].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30))
        assert diff <= 1e-6, (key, diff)
        if not torch.equal(got[key], before[key]):
            moved.add(key)
    assert moved == {m + ".weight" for m in src.modules}  # every adapted weight, and nothing else, was patched

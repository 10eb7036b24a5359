"""ComfyUI applies a LoRA by matching its module names to the keys of the original checkpoint it loaded
(`diffusion_model.<path>` and kohya's `lora_unet_<path with _>`; for SD 1.x also the diffusers names). ComfyUI is
not a library we can import, so its rule is checked on the names: every module our comfy and kohya outputs name
is a weight of the real original checkpoint layout (fixtures/checkpoints), or for SD 1.x kohya a module of the
diffusers UNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from interop import harness as h  # noqa: E402
from safetensors import safe_open  # noqa: E402

import loratools  # noqa: E402

pytestmark = pytest.mark.interop
CHECKPOINTS = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints"
LAYOUT = {"sd1": "sd15__ldm__sdmecha.json", "sdxl": "sdxl__sgm__sdmecha.json",
          "flux1": "flux1__bfl__sdmecha-dev-transformer.json", "sd3": "sd35_large__sai__invokeai.json"}


def _checkpoint_modules(family: str) -> set[str]:
    """Module paths of the original checkpoint's denoiser (weights only, prefix removed)."""
    keys = [k[: -len(".weight")] for k in json.loads((CHECKPOINTS / LAYOUT[family]).read_text())["tensors"]
            if k.endswith(".weight")]
    prefix = "model.diffusion_model."
    if not any(k.startswith(prefix) for k in keys):
        return set(keys)  # a lone transformer file (FLUX.1 BFL)
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


def _stems(path: str) -> set[str]:
    with safe_open(path, "np") as f:
        return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux1", "sd3"])
def test_comfy_and_kohya_outputs_name_modules_of_the_original_checkpoint(family, tmp_path):
    source = h.diffusers_file(family, tmp_path / "src.safetensors", with_text_encoders=False)
    modules = _checkpoint_modules(family)
    comfy = loratools.convert(source.path, "comfy", tmp_path / "c.safetensors", family=family)
    named = {s[len("diffusion_model."):] for s in _stems(comfy.output)}
    assert named and named <= modules, sorted(named - modules)[:5]
    kohya = loratools.convert(source.path, "kohya", tmp_path / "k.safetensors", family=family)
    flat = {s[len("lora_unet_"):] for s in _stems(kohya.output)}
    if family == "sd1":  # kohya SD 1.x spells diffusers names, which ComfyUI maps through its UNet table
        unet = h.build("sd1").models["unet"]
        known = {n.replace(".", "_") for n, _ in unet.named_modules() if n}
    else:
        known = {m.replace(".", "_") for m in modules}
    assert flat and flat <= known, sorted(flat - known)[:5]

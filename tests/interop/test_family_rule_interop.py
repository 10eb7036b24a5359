"""Never act on a guess, on files the libraries write themselves for tiny models whose names and shapes fit several
families: writing operations refuse with the candidates and --family, accept what every candidate writes alike,
and bake takes the family from the base."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from interop import harness as h  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import loratools  # noqa: E402
from loratools.cli import main  # noqa: E402
from loratools.errors import UnknownFamily  # noqa: E402

pytestmark = pytest.mark.interop


class Run(NamedTuple):
    exit_code: int
    output: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """The command as users run it (its error handling included): exit code and everything it printed."""

    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["loratools", *map(str, args)])
        threshold = gc.get_threshold()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        finally:
            gc.unfreeze()
            gc.set_threshold(*threshold)
        out = capsys.readouterr()
        return Run(code, out.out + out.err)

    return run


def _one_line_refusal(result: Run, *names: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "--family" in lines[0] and all(n in lines[0] for n in names), lines[0]
    return lines[0]


def test_tiny_sd3_lora_is_written_with_sd3_names(tmp_path, run_cli):
    """The silently wrong file of the issue: a diffusers SD3 LoRA of a 2-block model was written with FLUX.1 names.
    Its names fit SD3 and SD3.5 Large alike (not FLUX.1): both write the same kohya file, so convert goes ahead
    with SAI names and records no family."""
    source = h.diffusers_file("sd3", tmp_path / "sd3.safetensors", with_text_encoders=False)
    info = loratools.inspect(source.path)["family"]
    assert info["id"] == "unknown" and info["candidates"] == ["sd3", "sd35_large"]
    done = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{tmp_path}/out/")
    assert done.exit_code == 0, done.output
    (written,) = (tmp_path / "out").glob("*.safetensors")
    keys = list(load_file(written))
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn_qkv") for k in keys), keys[:5]
    assert not any("double_blocks" in k for k in keys)
    assert "loratools.family" not in h.file_metadata(written)
    for family in ("sd3", "sd35_large"):
        assert loratools.verify(source.path, written, rtol=1e-6, family=family).equal


BLOCKS_ONLY = {"transformer": ("to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm.linear", "proj_mlp")}


def test_lora_whose_names_fit_flux_and_hunyuan_video_is_refused(tmp_path, run_cli):
    """Two double and two single blocks at a toy width: FLUX.1 and HunyuanVideo names alike, and the two would be
    written differently. Every writing operation stops with one line naming both and --family; nothing written."""
    source = h.diffusers_file("flux1", tmp_path / "lora.safetensors", with_text_encoders=False, targets=BLOCKS_ONLY)
    info = loratools.inspect(source.path)["family"]
    assert info["id"] == "unknown" and info["candidates"] == ["flux1", "hunyuan_video"]
    out = tmp_path / "out"
    for args in (["convert", str(source.path), "--to", "kohya", "-o", f"{out}/"],
                 ["resize", str(source.path), "--rank", "2", "-o", str(out / "r.safetensors")],
                 ["merge", str(source.path), str(source.path), "-o", str(out / "m.safetensors")]):
        line = _one_line_refusal(run_cli(*args), "flux1", "hunyuan_video")
        assert "cannot tell the base-model family" in line
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(UnknownFamily, match="one of: flux1, hunyuan_video"):
        loratools.convert(source.path, "comfy", tmp_path / "c.safetensors")
    # told a family its modules do not fit: one line, exit 2, nothing written
    wrong = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{out}/", "--family", "sdxl")
    assert wrong.exit_code == 2 and len(wrong.output.strip().splitlines()) == 1, wrong.output
    assert "not in the sdxl tables" in wrong.output and (not out.exists() or not any(out.iterdir()))
    # told, it writes BFL names that act as the original
    done = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{out}/", "--family", "flux1")
    assert done.exit_code == 0, done.output
    (written,) = out.glob("*.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(written))
    assert loratools.verify(source.path, written, rtol=1e-6, family="flux1").equal


def _text_encoder_only(tmp_path) -> tuple[h.Source, Path]:
    source = h.diffusers_file("sd1", tmp_path / "full.safetensors")
    te_only = tmp_path / "clip.safetensors"
    # the diffusers file's own metadata kept: it holds the adapters' alphas
    save_file({k: v for k, v in load_file(source.path).items() if k.startswith("text_encoder.")}, te_only,
              metadata=h.file_metadata(source.path))
    return source, te_only


def test_text_encoder_only_lora_asks_for_the_family_when_naming_depends_on_it(tmp_path, run_cli):
    """A CLIP LoRA's names depend on the family in diffusers naming (HunyuanVideo keeps CLIP-L as text_encoder_2):
    convert lists the candidates; told sd1, the file loads in diffusers and acts as the original."""
    source, te_only = _text_encoder_only(tmp_path)
    _one_line_refusal(run_cli("convert", str(te_only), "--to", "diffusers", "-o", f"{tmp_path}/x/"), "sd1")
    r = loratools.convert(te_only, "diffusers", tmp_path / "te.diffusers.safetensors", family="sd1")
    fresh = h.build("sd1")
    h.load_with_diffusers("sd1", fresh, r.output, expect=("text_encoder",))
    got, ref = h.run(fresh), h.reference_outputs(fresh, source)
    assert h.max_rel_diff({k: got[k] for k in got if k.startswith("text_encoder")},
                          {k: ref[k] for k in ref if k.startswith("text_encoder")}) <= 1e-5


def _sd1_folder(path: Path) -> Path:
    base = h.build("sd1", seed=0)
    for name, model in base.models.items():
        model.save_pretrained(str(path / name))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "unet": ["diffusers", "UNet2DConditionModel"],
                                                      "text_encoder": ["transformers", "CLIPTextModel"]}))
    return path


def test_text_encoder_only_lora_bakes_into_the_base_it_names(tmp_path):
    """The base says it is SD 1.x (model_index.json): the CLIP LoRA bakes into its text encoder, no --family."""
    import torch

    source, te_only = _text_encoder_only(tmp_path)
    base = _sd1_folder(tmp_path / "base")
    r = loratools.bake(base, [te_only], tmp_path / "out", dtype="fp32")
    assert r.unmatched == [] and r.patched_tensors == source.modules["text_encoder"]
    adapted = source.adapted["text_encoder"]
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in adapted.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    want = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    got = {}
    for f in (tmp_path / "out" / "text_encoder").glob("*.safetensors"):
        got.update(load_file(f))
    worst = max(float((got[k].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30))
                for k, w in want.items() if k in got)
    assert worst <= 1e-6
    # the UNet is copied untouched
    unet_in = load_file(next((base / "unet").glob("*.safetensors")))
    unet_out = load_file(next((tmp_path / "out" / "unet").glob("*.safetensors")))
    assert all(torch.equal(unet_in[k], unet_out[k]) for k in unet_in)


def test_bake_refuses_a_lora_of_another_family_than_the_base(tmp_path, run_cli):
    base = _sd1_folder(tmp_path / "base")
    sdxl = h.diffusers_file("sdxl", tmp_path / "sdxl.safetensors", with_text_encoders=False)
    result = run_cli("bake", str(base), str(sdxl.path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "sd1" in result.output and not (tmp_path / "out").exists()

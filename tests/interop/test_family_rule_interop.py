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
    output: str  # stdout and stderr together
    stdout: str = ""


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
        return Run(code, out.out + out.err, out.out)

    return run


def _one_line_refusal(result: Run, *names: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("loratools: error: ")
    assert "--family" in lines[0] and all(n in lines[0] for n in names), lines[0]
    return lines[0]


def _named(line: str) -> list[str]:
    """The families a refusal asks to choose from."""
    head, sep, tail = line.rpartition("pass --family with one of: ")
    assert sep, line
    return tail.strip().split(", ")


def _inspect_candidates(run_cli, path) -> list[str]:
    """What `inspect --json` shows as the candidates of an undecided family."""
    shown = run_cli("inspect", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    (doc,) = json.loads(shown.stdout)
    assert doc["family"]["id"] == "unknown" and doc["family"]["reason"], doc["family"]
    return doc["family"]["candidates"]


FLUX_NAMES = ("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn", "linear1")


def _stems(path) -> list[str]:
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [k for f in files for k in load_file(f)]


@pytest.mark.parametrize("with_text_encoders", [False, True], ids=["transformer", "with-text-encoders"])
def test_tiny_sd3_lora_is_written_with_sd3_names(with_text_encoders, tmp_path, run_cli):
    """The silently wrong file of the issue: a diffusers SD3 LoRA of a 2-block model was written with FLUX.1 names.
    Its names fit SD3 and SD3.5 Large alike (not FLUX.1): both write the same files, so convert goes ahead, in every
    target, with SAI / diffusers SD3 names, and records no family. diffusers loads the diffusers and PEFT outputs
    into the SD3 pipeline and they act as the original."""
    source = h.diffusers_file("sd3", tmp_path / "sd3.safetensors", with_text_encoders=with_text_encoders)
    info = loratools.inspect(source.path)["family"]
    assert info["id"] == "unknown" and info["candidates"] == ["sd3", "sd35_large"]
    for to in ("kohya", "comfy", "diffusers", "peft"):
        done = run_cli("convert", str(source.path), "--to", to, "-o", f"{tmp_path}/{to}/")
        assert done.exit_code == 0, done.output
        (written,) = (tmp_path / to).iterdir()
        keys = _stems(written)
        assert not any(n in k for k in keys for n in FLUX_NAMES), [k for k in keys if "blocks" in k][:5]
        if to in ("kohya", "comfy"):
            assert any("joint_blocks_0_x_block_attn_qkv" in k.replace(".", "_") for k in keys), keys[:5]
        if to != "peft":
            assert "loratools.family" not in h.file_metadata(written)
        for family in ("sd3", "sd35_large"):
            assert loratools.verify(source.path, written, rtol=1e-6, family=family).equal
        if to in ("diffusers", "peft"):
            fresh = h.build("sd3")
            if to == "peft":
                for folder in sorted(p for p in written.iterdir() if p.is_dir()):
                    h.load_with_peft(fresh, folder.name, folder)
            else:
                h.load_with_diffusers("sd3", fresh, written, expect=source.expect)
            assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= 1e-5


BLOCKS_ONLY = {"transformer": ("to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm.linear", "proj_mlp")}


def test_lora_whose_names_fit_flux_and_hunyuan_video_is_refused(tmp_path, run_cli):
    """Two double and two single blocks at a toy width: FLUX.1 and HunyuanVideo names alike, and the two would be
    written differently. Every writing operation stops with one line naming exactly the candidates inspect shows
    and --family (exit 2, nothing written); --json says the same in its document; in a batch the file fails alone
    (exit 1). Told a family the modules do not fit: one line. Told flux1, or baked into a FLUX.1 base (which says
    what it is), it acts as the original."""
    source = h.diffusers_file("flux1", tmp_path / "lora.safetensors", with_text_encoders=False, targets=BLOCKS_ONLY)
    shown = _inspect_candidates(run_cli, source.path)
    assert shown == ["flux1", "hunyuan_video"]
    out = tmp_path / "out"
    for args in (["convert", str(source.path), "--to", "kohya", "-o", f"{out}/"],
                 ["convert", str(source.path), "--to", "comfy", "-o", f"{out}/"],
                 ["resize", str(source.path), "--rank", "2", "--to", "kohya", "-o", str(out / "r.safetensors")],
                 ["merge", str(source.path), str(source.path), "--to", "comfy", "-o", str(out / "m.safetensors")]):
        line = _one_line_refusal(run_cli(*args), "flux1", "hunyuan_video")
        assert "cannot tell the base-model family" in line and _named(line) == shown, line
    assert not out.exists() or not any(out.iterdir())
    # in diffusers names the two families spell these blocks alike: the same file either way, no family recorded
    for args in (["resize", str(source.path), "--rank", "2", "-o", str(tmp_path / "r.safetensors")],
                 ["merge", str(source.path), str(source.path), "-o", str(tmp_path / "m.safetensors")]):
        assert run_cli(*args).exit_code == 0
    assert "loratools.family" not in h.file_metadata(tmp_path / "r.safetensors")
    with pytest.raises(UnknownFamily, match="one of: flux1, hunyuan_video"):
        loratools.convert(source.path, "kohya", tmp_path / "c.safetensors")
    # --json: one document on stdout, the same refusal in it, exit 2
    as_json = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{out}/", "--json")
    assert as_json.exit_code == 2, as_json.output
    (doc,) = json.loads(as_json.stdout)
    assert doc["ok"] is False and _named(doc["error"]) == shown
    # a batch: the other file is written, this one is listed as failed, exit 1
    other = h.diffusers_file("sdxl", tmp_path / "sdxl.safetensors", with_text_encoders=False)
    batch = run_cli("convert", str(source.path), str(other.path), "--to", "kohya", "-o", f"{out}/", "--json")
    assert batch.exit_code == 1, batch.output
    docs = {Path(d["path"]).name: d for d in json.loads(batch.stdout)}
    assert docs["lora.safetensors"]["ok"] is False and docs["sdxl.safetensors"]["ok"] is True
    assert [p.name for p in out.iterdir()] == ["sdxl.kohya.safetensors"]
    (out / "sdxl.kohya.safetensors").unlink()
    # told a family its modules do not fit: one line, exit 2, nothing written
    wrong = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{out}/", "--family", "sdxl")
    assert wrong.exit_code == 2 and len(wrong.output.strip().splitlines()) == 1, wrong.output
    assert "not in the sdxl tables" in wrong.output and not any(out.iterdir())
    # told, it writes BFL names that act as the original
    done = run_cli("convert", str(source.path), "--to", "kohya", "-o", f"{out}/", "--family", "flux1")
    assert done.exit_code == 0, done.output
    (written,) = out.glob("*.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in load_file(written))
    assert loratools.verify(source.path, written, rtol=1e-6, family="flux1").equal
    resized = run_cli("resize", str(source.path), "--rank", "4", "-o", str(tmp_path / "r4.safetensors"),
                      "--family", "flux1")
    assert resized.exit_code == 0, resized.output
    assert loratools.verify(source.path, tmp_path / "r4.safetensors", rtol=1e-5, family="flux1").equal
    # bake: the base is FLUX.1 by its weights, so no --family is needed; the result is PEFT's own merge
    base = h.build("flux1", seed=0)
    base["transformer"].save_pretrained(str(tmp_path / "base" / "transformer"))
    baked = run_cli("bake", str(tmp_path / "base"), str(source.path), "-o", str(tmp_path / "baked"),
                    "--dtype", "fp32")
    assert baked.exit_code == 0, baked.output
    assert _max_merge_error(source, "transformer", tmp_path / "baked" / "transformer") <= 1e-6


def _max_merge_error(source: h.Source, component: str, folder: Path) -> float:
    """The largest relative difference between the weights baked into ``folder`` and PEFT's own merge of the
    source's adapter into ``component``."""
    import torch
    from peft.tuners.lora import LoraLayer

    adapted = source.adapted[component]
    with torch.no_grad():
        for module in adapted.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    want = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    got = {}
    for f in folder.glob("*.safetensors"):
        got.update(load_file(f))
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    return max(float((got[k].double() - w.double()).norm() / max(float(w.double().norm()), 1e-30))
               for k, w in want.items())


def _text_encoder_only(tmp_path, kind: str) -> tuple[h.Source, Path]:
    """A CLIP LoRA for SD 1.x and nothing else: a PEFT adapter folder of the text encoder, or the text-encoder part
    of a file diffusers wrote (its own metadata kept: it holds the adapters' alphas)."""
    if kind == "peft":
        source = h.peft_folder("sd1", "text_encoder", tmp_path / "clip_adapter", mixed=True)
        return source, source.path
    source = h.diffusers_file("sd1", tmp_path / "full.safetensors")
    te_only = tmp_path / "clip.safetensors"
    save_file({k: v for k, v in load_file(source.path).items() if k.startswith("text_encoder.")}, te_only,
              metadata=h.file_metadata(source.path))
    return source, te_only


def _text_encoder_outputs(outputs: dict) -> dict:
    return {k: v for k, v in outputs.items() if k.startswith("text_encoder")}


@pytest.mark.parametrize("kind", ["peft", "diffusers"])
def test_text_encoder_only_lora_asks_for_the_family_when_naming_depends_on_it(kind, tmp_path, run_cli):
    """A CLIP LoRA's names depend on the family (SD 1.x kohya files say lora_te_, SDXL lora_te1_, HunyuanVideo keeps
    CLIP-L as text_encoder_2): convert lists the candidates inspect shows. Told sd1, every output loads in the
    library that reads it (kohya with --uniform-alpha for the mixed PEFT adapter) and acts as the original."""
    source, te_only = _text_encoder_only(tmp_path, kind)
    shown = _inspect_candidates(run_cli, te_only)
    assert "sd1" in shown and "sdxl" in shown
    for to in ("kohya", "diffusers", "peft", "comfy"):
        line = _one_line_refusal(run_cli("convert", str(te_only), "--to", to, "-o", f"{tmp_path}/x/"), "sd1")
        assert _named(line) == shown, line
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    want = _text_encoder_outputs(h.reference_outputs(h.build("sd1"), source))
    for to in ("kohya", "diffusers", "peft"):
        r = loratools.convert(te_only, to, tmp_path / f"te.{to}" / ("" if to == "peft" else "x.safetensors"),
                              family="sd1", uniform_alpha=to == "kohya")
        assert r.family == "sd1" and loratools.verify(te_only, r.output, rtol=1e-6, family="sd1").equal
        fresh = h.build("sd1")
        if to == "peft":
            h.load_with_peft(fresh, "text_encoder", Path(r.output) / "text_encoder")
        else:
            h.load_with_diffusers("sd1", fresh, r.output, expect=("text_encoder",))
        assert h.max_rel_diff(_text_encoder_outputs(h.run(fresh)), want) <= 1e-5, to


def _sd1_folder(path: Path) -> Path:
    base = h.build("sd1", seed=0)
    for name, model in base.models.items():
        model.save_pretrained(str(path / name))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                      "unet": ["diffusers", "UNet2DConditionModel"],
                                                      "text_encoder": ["transformers", "CLIPTextModel"]}))
    return path


@pytest.mark.parametrize("kind", ["peft", "diffusers"])
def test_text_encoder_only_lora_bakes_into_the_base_it_names(kind, tmp_path, run_cli):
    """The base says what it is (model_index.json: a StableDiffusionPipeline, SD 1.x or 2.x, which put a CLIP LoRA
    on the same weights alike): the LoRA bakes into its text encoder, no --family, and the text encoder equals
    PEFT's own merge; the UNet is copied untouched."""
    import torch

    source, te_only = _text_encoder_only(tmp_path, kind)
    base = _sd1_folder(tmp_path / "base")
    baked = run_cli("bake", str(base), str(te_only), "-o", str(tmp_path / "out"), "--dtype", "fp32", "--json")
    assert baked.exit_code == 0, baked.output
    r = json.loads(baked.stdout)
    assert r["unmatched"] == [] and r["patched_tensors"] == source.modules["text_encoder"], r
    assert _max_merge_error(source, "text_encoder", tmp_path / "out" / "text_encoder") <= 1e-6
    unet_in = load_file(next((base / "unet").glob("*.safetensors")))
    unet_out = load_file(next((tmp_path / "out" / "unet").glob("*.safetensors")))
    assert all(torch.equal(unet_in[k], unet_out[k]) for k in unet_in)


def test_bake_refuses_a_lora_of_another_family_than_the_base(tmp_path, run_cli):
    base = _sd1_folder(tmp_path / "base")
    sdxl = h.diffusers_file("sdxl", tmp_path / "sdxl.safetensors", with_text_encoders=False)
    result = run_cli("bake", str(base), str(sdxl.path), "-o", str(tmp_path / "out"))
    line = _one_line_refusal(result, "sdxl", "sd1")
    assert "the LoRA is sdxl but the base fits only sd1, sd2" in line and not (tmp_path / "out").exists()


def _clip_g_only(tmp_path) -> Path:
    """A LoRA on SDXL's second text encoder (OpenCLIP-G at its released size, built on the meta device) and nothing
    else, written by StableDiffusionXLPipeline.save_lora_weights: names and widths say CLIP-G, which SDXL, the SDXL
    refiner, SD3, SD3.5 Large and HiDream all have."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")
    with init_empty_weights(include_buffers=True):
        encoder = CLIPTextModelWithProjection(config)
    encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(h.TEXT_ENCODER_TARGETS)))
    gen = torch.Generator().manual_seed(3)
    layers = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in get_peft_model_state_dict(encoder).items()}
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), weight_name="clip_g.safetensors",
                                                text_encoder_2_lora_layers=layers)
    return tmp_path / "clip_g.safetensors"


def test_clip_g_only_lora_names_its_candidates_and_converts_when_told(tmp_path, run_cli):
    source = _clip_g_only(tmp_path)
    shown = _inspect_candidates(run_cli, source)
    assert shown == ["hidream", "sd3", "sd35_large", "sdxl", "sdxl_refiner"]
    line = _one_line_refusal(run_cli("convert", str(source), "--to", "kohya", "-o", f"{tmp_path}/x/"), "sdxl")
    assert _named(line) == shown
    done = loratools.convert(source, "kohya", tmp_path / "told.safetensors", family="sdxl")
    assert all(k.startswith("lora_te2_") for k in load_file(done.output))
    assert loratools.verify(source, done.output, rtol=1e-6, family="sdxl").equal


@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_clip_g_only_lora_converts_without_family_where_every_candidate_names_it_alike(to, tmp_path):
    """In diffusers and PEFT naming every family with CLIP-G calls it text_encoder_2 (HiDream's pipeline too): the
    file is the same whichever the family, so convert needs no --family."""
    import torch

    source = _clip_g_only(tmp_path)
    done = loratools.convert(source, to, tmp_path / "auto" / f"x.{to}")
    told = loratools.convert(source, to, tmp_path / "told" / f"x.{to}", family="sdxl")
    assert done.family == "unknown"
    a, b = _all_tensors(done.output), _all_tensors(told.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(f.startswith("text_encoder_2/") or k.startswith("text_encoder_2.") for f, k in a)


def _all_tensors(path) -> dict:
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return {(str(f.relative_to(path)) if path.is_dir() else "", k): v for f in files for k, v in load_file(f).items()}

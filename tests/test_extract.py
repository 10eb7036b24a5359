"""`loratools extract`: ΔW between two checkpoints as a LoRA; extract ∘ bake at full rank gives back the tuned
weights, dynamic rules pick the true rank, and the output loads as a LoRA of the family."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from test_bake import SDXL_KEYS, load, shapes, write_base
from test_ops_resize import DEVICES

import loratools
from loratools.cli import cli
from loratools.errors import LoraToolsError, ShapeMismatch, UsageError

H = 32
FLUX = {"double_blocks.0.img_attn.qkv.weight": (3 * H, H), "double_blocks.0.img_mlp.0.weight": (4 * H, H),
        "single_blocks.0.linear1.weight": (7 * H, H), "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (H, 16),
        "vector_in.in_layer.weight": (H, 16)}  # what FLUX.1 has and Chroma lacks


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def tuned_copy(base: dict, path, changes: dict, dtype=None) -> dict:
    """``base`` with ``changes`` (key -> ΔW) added; written to ``path``."""
    from test_bake import _dt

    from loratools.io.writer import write_safetensors

    out = {k: (v + changes[k].to(v.dtype)) if k in changes else v for k, v in base.items()}
    write_safetensors(path, [(k, _dt(v), tuple(v.shape), v) for k, v in out.items()])
    return out


def _delta(shape, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(shape, generator=g) * 0.01
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, *shape[1:], generator=g)) * 0.01


def test_full_rank_round_trip_flux(tmp_path):
    base = write_base(tmp_path / "base.safetensors", FLUX, dtype=torch.float32)
    changes = {k: _delta(FLUX[k], seed=i) for i, k in enumerate(["double_blocks.0.img_attn.qkv.weight",
                                                                 "single_blocks.0.linear1.weight",
                                                                 "final_layer.adaLN_modulation.1.weight"])}
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", changes)
    for to in ("kohya", "diffusers"):
        out = tmp_path / f"x.{to}.safetensors"
        r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=H, to=to)
        assert r.family == "flux1" and len(r.modules) == 3 and r.unchanged == 3
        assert all(m["retained_energy"] > 0.999999 for m in r.modules)
        loratools.bake(tmp_path / "base.safetensors", [out], tmp_path / f"re.{to}.safetensors", family="flux1")
        again = load(tmp_path / f"re.{to}.safetensors")
        for k, w in tuned.items():
            assert torch.allclose(again[k], w, atol=2e-6), (to, k)


def test_dynamic_rank_finds_true_rank(tmp_path):
    base = write_base(tmp_path / "base.safetensors", FLUX, dtype=torch.float32)
    tuned_copy(base, tmp_path / "tuned.safetensors", {"double_blocks.0.img_mlp.0.weight": _delta((4 * H, H), rank=3)})
    r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "d.safetensors",
                          dynamic="sv_fro:0.999999")
    assert [m["rank"] for m in r.modules] == [3]
    r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "e.safetensors",
                          rank=1)
    assert r.modules[0]["rank"] == 1 and 0 < r.modules[0]["retained_energy"] < 1
    lora = loratools.load(tmp_path / "e.safetensors")
    assert len(lora.modules) == 1 and lora.modules[0].rank == 1


def test_sdxl_convs_and_text_encoders_are_opt_in(tmp_path):
    spec = shapes("sdxl__sgm__sdmecha.json", SDXL_KEYS)
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float32)
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    te = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    to_q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    proj = "conditioner.embedders.1.model.text_projection"
    changes = {conv: _delta(spec[conv], seed=1), te: _delta(spec[te], rank=2, seed=2), to_q: _delta(spec[to_q], 4, 3),
               in_proj: _delta(spec[in_proj], rank=8, seed=4), proj: _delta(spec[proj], rank=8, seed=5)}
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", changes)
    r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "a.safetensors",
                          rank=8)
    assert [m["key"] for m in r.modules] == [to_q] and any("--conv-rank" in s for s in r.skipped)
    r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "b.safetensors",
                          rank=8, conv_rank=2880, text_encoders=True)
    assert sorted({m["key"].split("[")[0] for m in r.modules}) == sorted(changes)
    assert len(r.modules) == len(changes) + 2  # q, k and v rows of the OpenCLIP in_proj are three modules
    loratools.bake(tmp_path / "base.safetensors", [tmp_path / "b.safetensors"], tmp_path / "re.safetensors",
                   family="sdxl")
    again = load(tmp_path / "re.safetensors")
    for k in changes:
        assert torch.allclose(again[k], tuned[k], atol=1e-5), k


@pytest.mark.parametrize("device", DEVICES)
def test_a_batched_extract_gives_each_module_what_it_gets_alone(tmp_path, monkeypatch, device):
    """ΔW of one shape are stacked into batches that run on a pool of threads; the output is the one of a run that
    decomposes each ΔW alone, in the checkpoint's order, whatever the batches and the workers."""
    import loratools.ops.batched as batched
    import loratools.ops.extract as extract

    spec = {**{f"double_blocks.{i}.img_attn.qkv.weight": (3 * H, H) for i in range(4)},
            **{f"double_blocks.{i}.img_mlp.0.weight": (4 * H, H) for i in range(3)}, "img_in.weight": (H, 16)}
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float16)
    tuned_copy(base, tmp_path / "tuned.safetensors", {k: _delta(shape, seed=i) for i, (k, shape) in enumerate(spec.items())})
    runs = {}
    for label, budget, workers in (("alone", 1, 1), ("batched", 1 << 20, 2), ("batched, one worker", 1 << 20, 1)):
        monkeypatch.setitem(extract.BATCH_BYTES, device, budget)
        monkeypatch.setattr(batched, "worker_count", lambda device, n=workers: n)
        for rule in ({"rank": 5}, {"dynamic": "sv_fro:0.5", "rank": 12}):
            out = tmp_path / f"{label}.{len(rule)}.safetensors"
            r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, family="flux1",
                                  device=device, **rule)
            assert r.device == device
            runs[label, len(rule)] = (r.modules, load(out))
    for rule in (1, 2):
        modules, tensors = runs["alone", rule]
        assert [m["key"] for m in modules] == list(spec)  # the checkpoint's order
        assert len({m["rank"] for m in modules}) > 1 or rule == 1
        for label in ("batched", "batched, one worker"):
            got_modules, got = runs[label, rule]
            assert got_modules == modules
            for k, t in tensors.items():
                assert got[k].dtype == t.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16)
                torch.testing.assert_close(got[k].float(), t.float(), rtol=2e-3, atol=1e-5)


def test_retained_energy_is_exact_for_large_weights(tmp_path):
    """Σₖσ²/‖ΔW‖² as reported, against float64, for a ΔW of 2.9M values (a float32 norm of it is off by ~1e-4)."""
    spec = {"single_blocks.0.linear1.weight": (2816, 1024), "double_blocks.0.img_mlp.0.weight": (4 * H, H)}
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    big = (torch.randn(2816, 48, generator=g) * torch.exp(-torch.arange(48) / 8.0)) @ torch.randn(48, 1024, generator=g)
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", {"single_blocks.0.linear1.weight": big * 1e-3,
                                                              "double_blocks.0.img_mlp.0.weight": _delta((4 * H, H))})
    r = loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          rank=8, family="flux1")
    for m in r.modules:
        s = torch.linalg.svdvals((tuned[m["key"]].double() - base[m["key"]].double()))
        assert m["retained_energy"] == pytest.approx(float(s[:8].pow(2).sum() / s.pow(2).sum()), abs=2e-6), m


def test_float8_checkpoints_extract_as_their_float32_values(tmp_path):
    """ΔW is formed in float32 in place (torch promotes no float8 in a subtraction: the base is widened first)."""
    from test_bake import _dt

    from loratools.io.writer import write_safetensors

    def write(path, tensors):
        name = lambda v: "F8_E4M3" if v.dtype == torch.float8_e4m3fn else _dt(v)  # noqa: E731
        write_safetensors(path, [(k, name(v), tuple(v.shape), v) for k, v in tensors.items()])

    base = write_base(tmp_path / "b16.safetensors", FLUX, dtype=torch.float32)
    base8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in base.items()}
    tuned8 = dict(base8, **{"img_in.weight": (base["img_in.weight"] + _delta((H, 16)) * 10).to(torch.float8_e4m3fn)})
    write(tmp_path / "b8.safetensors", base8)
    write(tmp_path / "t8.safetensors", tuned8)
    r = loratools.extract(tmp_path / "b8.safetensors", tmp_path / "t8.safetensors", tmp_path / "x.safetensors",
                          rank=16, family="flux1")
    assert [m["key"] for m in r.modules] == ["img_in.weight"] and r.modules[0]["retained_energy"] > 0.999999
    got = load(tmp_path / "x.safetensors")
    want = tuned8["img_in.weight"].float() - base8["img_in.weight"].float()
    (up,), (down,) = ([v for k, v in got.items() if f"lora_{r}" in k] for r in ("up", "down"))
    assert up.dtype == torch.float32  # no float8 factors
    torch.testing.assert_close((up.double() @ down.double()).float(), want, rtol=1e-5, atol=1e-5)


def test_a_nan_in_a_batch_names_its_weight(tmp_path, monkeypatch):
    import loratools.ops.batched as batched

    monkeypatch.setattr(batched, "worker_count", lambda device: 2)
    spec = {f"double_blocks.{i}.img_attn.qkv.weight": (3 * H, H) for i in range(4)}
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float32)
    bad = _delta((3 * H, H), seed=1)
    bad[3, 4] = float("nan")
    tuned_copy(base, tmp_path / "tuned.safetensors", {**{k: _delta((3 * H, H), seed=i) for i, k in enumerate(spec)},
                                                      "double_blocks.2.img_attn.qkv.weight": bad})
    with pytest.raises(LoraToolsError) as e:
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          rank=4, family="flux1")
    assert str(e.value) == (f"{tmp_path / 'tuned.safetensors'}: module double_blocks.2.img_attn.qkv.weight: its values "
                            "hold NaN or Inf, which have no SVD")
    assert not (tmp_path / "x.safetensors").exists()


def test_errors(tmp_path):
    write_base(tmp_path / "base.safetensors", FLUX, dtype=torch.float32)
    with pytest.raises(UsageError, match="give --rank N or --dynamic METHOD:VALUE"):
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "base.safetensors", tmp_path / "o.safetensors")
    with pytest.raises(LoraToolsError, match="do not differ in any weight"):
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "base.safetensors", tmp_path / "o.safetensors",
                          rank=4)
    other = dict(FLUX, **{"img_in.weight": (H, 8)})
    write_base(tmp_path / "other.safetensors", other, dtype=torch.float32)
    with pytest.raises(ShapeMismatch, match=r"img_in.weight is \[32, 16\] in the base but \[32, 8\]"):
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "other.safetensors", tmp_path / "o.safetensors",
                          rank=4)
    lora = os.path.join(os.path.dirname(__file__), "..", "fixtures", "examples", "sdxl_slider_kohya.safetensors")
    with pytest.raises(LoraToolsError, match="none of the base's FLUX.1 weights is in the tuned checkpoint"):
        loratools.extract(tmp_path / "base.safetensors", lora, tmp_path / "o.safetensors", rank=4, family="flux1")
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_json(tmp_path):
    base = write_base(tmp_path / "base.safetensors", FLUX, dtype=torch.float32)
    tuned_copy(base, tmp_path / "tuned.safetensors", {"img_in.weight": _delta((H, 16), seed=4)})
    res = CliRunner().invoke(cli, ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                                   "-o", str(tmp_path / "x.safetensors"), "--rank", "4", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["modules"][0]["rank"] == 4 and doc["family"] == "flux1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_extract_round_trip(tmp_path):
    base = write_base(tmp_path / "base.safetensors", FLUX, dtype=torch.float32)
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", {"single_blocks.0.linear1.weight": _delta((7 * H, H))})
    loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                      rank=H, device="cuda")
    loratools.bake(tmp_path / "base.safetensors", [tmp_path / "x.safetensors"], tmp_path / "re.safetensors",
                   family="flux1", device="cuda")
    again = load(tmp_path / "re.safetensors")
    assert torch.allclose(again["single_blocks.0.linear1.weight"], tuned["single_blocks.0.linear1.weight"], atol=1e-5)


def test_diffusers_component_file_round_trip_through_fused_kohya(tmp_path):
    """A diffusers transformer file: the to_k change comes out as a kohya qkv LoRA and bakes back into to_k."""
    spec = {f"transformer_blocks.0.attn.to_{p}.weight": (H, H) for p in "qkv"}
    spec["x_embedder.weight"] = (H, 16)
    base = write_base(tmp_path / "base.safetensors", spec, dtype=torch.float32)
    key = "transformer_blocks.0.attn.to_k.weight"
    tuned = tuned_copy(base, tmp_path / "tuned.safetensors", {key: _delta((H, H), seed=6)})
    with pytest.raises(LoraToolsError, match="pass --family"):
        loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                          rank=H)
    loratools.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "x.safetensors",
                      rank=H, family="flux1", to="kohya")
    lora = loratools.load(tmp_path / "x.safetensors", family="flux1")
    assert [m.name for m in lora.modules] == ["double_blocks_0_img_attn_qkv"]
    loratools.bake(tmp_path / "base.safetensors", [tmp_path / "x.safetensors"], tmp_path / "re.safetensors",
                   family="flux1")
    again = load(tmp_path / "re.safetensors")
    for k, w in tuned.items():
        assert torch.allclose(again[k], w, atol=2e-6), k

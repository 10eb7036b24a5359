"""`loratools bake`: every adapted weight equals a float64 reference of W + t·s·ΔW, everything else is
copied bit for bit, and bad input fails cleanly (exit 2, nothing at the output path).

Bases are small subsets of real checkpoint layouts (fixtures/checkpoints/*.json: real names, real shapes),
so fused targets (OpenCLIP in_proj, Flux qkv/linear1) and layout prefixes are the real ones.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loratools
from loratools.cli import cli
from loratools.errors import FormatError, LoraToolsError, ShapeMismatch, UsageError
from loratools.io.reader import read_header
from loratools.io.writer import write_safetensors

CHECKPOINTS = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
SGM = "model.diffusion_model."
TE2 = "conditioner.embedders.1.model."
TO_Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
SDXL_KEYS = [SGM + TO_Q + ".weight", SGM + "input_blocks.4.1.proj_in.weight",
             SGM + "input_blocks.1.0.in_layers.2.weight",
             TE2 + "transformer.resblocks.0.attn.in_proj_weight", TE2 + "transformer.resblocks.0.attn.in_proj_bias",
             TE2 + "text_projection", TE2 + "transformer.resblocks.9.mlp.c_proj.bias",
             "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids", SGM + "out.2.weight"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def shapes(layout: str, keys: list[str]) -> dict:
    data = json.loads((CHECKPOINTS / layout).read_text())["tensors"]
    return {k: tuple(data[k]["shape"]) for k in keys}


def write_base(path: Path, spec: dict, dtype=torch.float16, seed: int = 0) -> dict:
    """A checkpoint with random values: name -> shape (int64 for *_ids, else ``dtype``); returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.items():
        if name.endswith("_ids"):
            out[name] = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    items = [(k, _dt(v), tuple(v.shape), v) for k, v in out.items()]
    write_safetensors(path, items, {"modelspec.title": "base"})
    return out


def _dt(t) -> str:
    return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[t.dtype]


def write_lora(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    write_safetensors(path, [(k, _dt(v), tuple(v.shape), v.contiguous()) for k, v in tensors.items()], metadata or {})
    return path


def pair(out_dim: int, in_dim: int, rank: int = 4, seed: int = 1, kernel=()):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, in_dim, *kernel), generator=g) * 0.1
    up = torch.randn((out_dim, rank) + ((1, 1) if kernel else ()), generator=g) * 0.1
    return up, down


def product(up, down):
    d = up.double().flatten(1) @ down.double().flatten(1)
    return d.reshape(up.shape[0], *down.shape[1:]) if down.dim() > 2 else d


def load(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_close(got, ref, tol=2e-3):
    """Output is fp16: compare against the float64 reference rounded once to fp16."""
    exp = ref.to(got.dtype).double()
    assert torch.equal(got.double(), exp) or float((got.double() - exp).abs().max()) <= tol * float(ref.abs().max())


@pytest.fixture
def sdxl(tmp_path):
    spec = shapes("sdxl__sgm__sdmecha.json", SDXL_KEYS)
    base = write_base(tmp_path / "base.safetensors", spec)
    up, down = pair(640, 640)
    uk, dk = pair(1280, 1280, seed=2)
    up_p, down_p = pair(1280, 1280, seed=3)
    lora = {
        f"lora_unet_{TO_Q.replace('.', '_')}.lora_up.weight": up,
        f"lora_unet_{TO_Q.replace('.', '_')}.lora_down.weight": down,
        f"lora_unet_{TO_Q.replace('.', '_')}.alpha": torch.tensor(2.0),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": uk,
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": dk,
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.alpha": torch.tensor(4.0),
        "lora_te2_text_projection.lora_up.weight": up_p,
        "lora_te2_text_projection.lora_down.weight": down_p,
        "lora_te2_text_projection.alpha": torch.tensor(4.0),
    }
    path = write_lora(tmp_path / "lora.safetensors", lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    return tmp_path, base, path, {"to_q": (up, down, 0.5), "k": (uk, dk, 1.0), "proj": (up_p, down_p, 1.0)}


def test_sdxl_sgm_every_key_matches_reference(sdxl):
    tmp, base, lora, parts = sdxl
    r = loratools.bake(tmp / "base.safetensors", [f"{lora}:0.7"], tmp / "out.safetensors", family="sdxl")
    out = load(tmp / "out.safetensors")
    assert list(out) == list(base) and r.patched_tensors == 3 and r.loras[0]["matched"] == 3
    up, down, s = parts["to_q"]
    assert_close(out[SGM + TO_Q + ".weight"], base[SGM + TO_Q + ".weight"].double() + 0.7 * s * product(up, down))
    ref = base[TE2 + "transformer.resblocks.0.attn.in_proj_weight"].double().clone()
    ref[1280:2560] += 0.7 * product(*parts["k"][:2])  # k_proj is the middle third of in_proj
    assert_close(out[TE2 + "transformer.resblocks.0.attn.in_proj_weight"], ref)
    ref = base[TE2 + "text_projection"].double() + 0.7 * product(*parts["proj"][:2]).T  # stored transposed
    assert_close(out[TE2 + "text_projection"], ref)
    for k in set(base) - {SGM + TO_Q + ".weight", TE2 + "transformer.resblocks.0.attn.in_proj_weight",
                          TE2 + "text_projection"}:
        assert torch.equal(out[k], base[k]) and out[k].dtype == base[k].dtype
    meta = read_header(tmp / "out.safetensors").metadata
    baked = json.loads(meta["loratools.baked"])
    assert meta["modelspec.title"] == "base" and baked[0]["strength"] == 0.7 and len(baked[0]["sha256"]) == 64


def test_untouched_tensors_are_byte_identical(sdxl):
    tmp, base, lora, _ = sdxl
    loratools.bake(tmp / "base.safetensors", [lora], tmp / "out.safetensors", family="sdxl")
    a, b = read_header(tmp / "base.safetensors"), read_header(tmp / "out.safetensors")
    raw_a, raw_b = (tmp / "base.safetensors").read_bytes(), (tmp / "out.safetensors").read_bytes()
    name = TE2 + "transformer.resblocks.9.mlp.c_proj.bias"
    ia, ib = a.tensors[name], b.tensors[name]
    data_a, data_b = raw_a[a.data_start:], raw_b[b.data_start:]
    assert data_a[ia.begin: ia.end] == data_b[ib.begin: ib.end]


def test_dtype_option_casts_floats_only(sdxl):
    tmp, base, lora, _ = sdxl
    loratools.bake(tmp / "base.safetensors", [lora], tmp / "out.safetensors", family="sdxl", dtype="fp32")
    h = read_header(tmp / "out.safetensors").tensors
    assert h[SGM + "out.2.weight"].dtype == "F32"
    assert h["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == "I64"


def _flux_base(tmp: Path, h: int = 64, folder: bool = False) -> dict:
    spec = {"double_blocks.0.img_attn.qkv.weight": (3 * h, h), "double_blocks.0.img_attn.qkv.bias": (3 * h,),
            "single_blocks.0.linear1.weight": (7 * h, h), "final_layer.adaLN_modulation.1.weight": (2 * h, h),
            "double_blocks.0.img_attn.norm.key_norm.scale": (h // 2,)}
    return write_base(tmp / "flux.safetensors", spec, dtype=torch.bfloat16)


def test_flux_diffusers_parts_land_in_fused_rows_with_swaps(tmp_path):
    h = 64
    base = _flux_base(tmp_path, h)
    mods = {"transformer_blocks.0.attn.to_k": (h, h), "single_transformer_blocks.0.proj_mlp": (4 * h, h),
            "single_transformer_blocks.0.attn.to_q": (h, h), "norm_out.linear": (2 * h, h)}
    lora, ref = {}, {}
    for i, (name, (o, n)) in enumerate(mods.items()):
        up, down = pair(o, n, seed=10 + i)
        lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"] = down, up
        ref[name] = product(up, down)
    path = write_lora(tmp_path / "flux_lora.safetensors", lora)
    loratools.bake(tmp_path / "flux.safetensors", [path], tmp_path / "out.safetensors", family="flux1")
    out = load(tmp_path / "out.safetensors")
    qkv = base["double_blocks.0.img_attn.qkv.weight"].double().clone()
    qkv[h:2 * h] += ref["transformer_blocks.0.attn.to_k"]
    lin = base["single_blocks.0.linear1.weight"].double().clone()
    lin[0:h] += ref["single_transformer_blocks.0.attn.to_q"]
    lin[3 * h:] += ref["single_transformer_blocks.0.proj_mlp"]
    d = ref["norm_out.linear"]
    ada = base["final_layer.adaLN_modulation.1.weight"].double() + torch.cat([d[h:], d[:h]])  # scale/shift swapped
    for key, want in (("double_blocks.0.img_attn.qkv.weight", qkv), ("single_blocks.0.linear1.weight", lin),
                      ("final_layer.adaLN_modulation.1.weight", ada)):
        assert_close(out[key], want, tol=1e-2)
    assert torch.equal(out["double_blocks.0.img_attn.qkv.bias"], base["double_blocks.0.img_attn.qkv.bias"])


def test_row_blocks_give_the_whole_tensor_result(tmp_path, monkeypatch):
    """Fused rows, a swapped half and a row slice that straddle the blocks patched one at a time on CPU: the
    result is the float32 result of the whole tensor, whatever the block size."""
    import loratools.ops.patch as patch_mod

    h = 64
    base = _flux_base(tmp_path, h)
    lora, ref = {}, {}
    for i, (name, o) in enumerate({"transformer_blocks.0.attn.to_k": h, "transformer_blocks.0.attn.to_v": h,
                                   "single_transformer_blocks.0.proj_mlp": 4 * h, "norm_out.linear": 2 * h}.items()):
        up, down = pair(o, h, seed=20 + i)
        lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"] = down, up
        ref[name] = product(up, down)
    path = write_lora(tmp_path / "l.safetensors", lora)
    outs = []
    for block in (1 << 21, 4 * h * 5):  # default, then 5 rows: block edges fall inside every slice
        monkeypatch.setattr(patch_mod, "_BLOCK_BYTES", block)
        loratools.bake(tmp_path / "flux.safetensors", [f"{path}:0.8"], tmp_path / f"{block}.safetensors",
                       family="flux1", dtype="fp32")
        outs.append(load(tmp_path / f"{block}.safetensors"))
    qkv = base["double_blocks.0.img_attn.qkv.weight"].double().clone()
    qkv[h:2 * h] += 0.8 * ref["transformer_blocks.0.attn.to_k"]
    qkv[2 * h:] += 0.8 * ref["transformer_blocks.0.attn.to_v"]
    d = ref["norm_out.linear"]
    ada = base["final_layer.adaLN_modulation.1.weight"].double() + 0.8 * torch.cat([d[h:], d[:h]])
    lin = base["single_blocks.0.linear1.weight"].double().clone()
    lin[3 * h:] += 0.8 * ref["single_transformer_blocks.0.proj_mlp"]
    for key, want in (("double_blocks.0.img_attn.qkv.weight", qkv), ("final_layer.adaLN_modulation.1.weight", ada),
                      ("single_blocks.0.linear1.weight", lin)):
        a, b = outs[0][key], outs[1][key]
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=1e-7), key
        assert float((a.double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), key
    # keeping bf16, the blocks overwrite the read buffer in place: the same float32 sums, then one rounding
    monkeypatch.setattr(patch_mod, "_BLOCK_BYTES", 4 * h * 5)
    loratools.bake(tmp_path / "flux.safetensors", [f"{path}:0.8"], tmp_path / "keep.safetensors", family="flux1")
    kept = load(tmp_path / "keep.safetensors")
    for key in ("double_blocks.0.img_attn.qkv.weight", "final_layer.adaLN_modulation.1.weight",
                "single_blocks.0.linear1.weight"):
        assert kept[key].dtype == torch.bfloat16
        assert torch.equal(kept[key], outs[1][key].to(torch.bfloat16)), key


def test_pipeline_recycles_read_buffers_but_never_under_a_live_result(tmp_path):
    """A transform may return its input or overwrite it (the result lives in the read buffer): that buffer is
    not reused before the caller asks for the next result, however far the reader runs ahead. Buffers of
    transforms that made new tensors are reused at once."""
    import threading
    import time

    from loratools.io.reader import SafetensorsFile
    from loratools.ops.pipeline import Pipeline
    from loratools.ops.threads import compute_threads

    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(64 - i, 48, generator=g) for i in range(12)}  # each fits an earlier buffer
    write_safetensors(tmp_path / "t.safetensors", [(k, "F32", tuple(v.shape), v) for k, v in tensors.items()], {})
    kinds = ["view", "in place", "new"]

    ready_in = []

    def three():  # what a transform needs besides its tensor is made in the reader thread
        ready_in.append(threading.current_thread().name)
        return 3

    def job(name, kind):
        if kind == "view":
            return name, lambda t: t[1:]
        if kind == "in place":
            return name, lambda t: t.mul_(2)
        return name, lambda t, k: t * k, three

    jobs = [job(k, kinds[i % 3]) for i, k in enumerate(tensors)]
    sf = SafetensorsFile(tmp_path / "t.safetensors")
    before = torch.get_num_threads()
    with compute_threads(), Pipeline(torch.device("cpu")) as pipe:
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
        pipe.start(sf, jobs)
        for i, (k, t) in enumerate(tensors.items()):
            got = pipe.next()
            time.sleep(0.02)  # the reader fills every free buffer meanwhile
            want = {"view": t[1:], "in place": t * 2, "new": t * 3}[kinds[i % 3]]
            assert torch.equal(got, want), k
        reused = pipe.free.qsize()
    sf.close()
    assert torch.get_num_threads() == before
    assert reused >= 2  # the last result's buffer is still lent, the others came back
    assert len(ready_in) == 4 and all("_read" in name for name in ready_in)


def test_full_size_flux_qkv(tmp_path):
    """One real-size tensor: the BFL qkv of Flux-dev (9216 × 3072 bf16) with a comfy-named fused LoRA."""
    spec = shapes("flux1__bfl__sdmecha-dev-transformer.json", ["double_blocks.0.img_attn.qkv.weight",
                                                               "double_blocks.0.img_attn.norm.key_norm.scale"])
    base = write_base(tmp_path / "flux.safetensors", spec, dtype=torch.bfloat16)
    up, down = pair(9216, 3072, rank=8)
    path = write_lora(tmp_path / "l.safetensors", {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
                                                   "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up})
    loratools.bake(tmp_path / "flux.safetensors", [f"{path}:0.5"], tmp_path / "o.safetensors", family="flux1")
    got = load(tmp_path / "o.safetensors")["double_blocks.0.img_attn.qkv.weight"]
    assert_close(got, base["double_blocks.0.img_attn.qkv.weight"].double() + 0.5 * product(up, down), tol=1e-2)


def _diffusers_folder(root: Path, h: int = 32, shards: bool = True) -> dict:
    """A diffusers Flux transformer folder, sharded in two files with an index."""
    names = {"transformer_blocks.0.attn.to_q.weight": (h, h), "transformer_blocks.0.attn.to_k.weight": (h, h),
             "transformer_blocks.0.attn.to_v.weight": (h, h), "transformer_blocks.0.attn.to_q.bias": (h,),
             "x_embedder.weight": (h, 16)}
    folder = root / "base" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    first = dict(list(names.items())[:2])
    rest = dict(list(names.items())[2:])
    t1 = write_base(folder / "diffusion_pytorch_model-00001-of-00002.safetensors", first, torch.float32)
    t2 = write_base(folder / "diffusion_pytorch_model-00002-of-00002.safetensors", rest, torch.float32, seed=5)
    wmap = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in first}
    wmap.update({k: "diffusion_pytorch_model-00002-of-00002.safetensors" for k in rest})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    (root / "base" / "vae").mkdir()
    write_base(root / "base" / "vae" / "diffusion_pytorch_model.safetensors", {"decoder.conv_in.weight": (8, 4, 3, 3)})
    return {**t1, **t2}


def test_fused_lora_splits_into_a_sharded_diffusers_folder(tmp_path):
    h = 32
    base = _diffusers_folder(tmp_path, h)
    up, down = pair(3 * h, h, seed=7)
    path = write_lora(tmp_path / "l.safetensors", {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,
                                                   "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up})
    r = loratools.bake(tmp_path / "base", [path], tmp_path / "out", family="flux1")
    assert r.patched_tensors == 3
    folder = tmp_path / "out" / "transformer"
    out = {**load(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"),
           **load(folder / "diffusion_pytorch_model-00002-of-00002.safetensors")}
    d = product(up, down)
    for k, part in enumerate("qkv"):
        want = base[f"transformer_blocks.0.attn.to_{part}.weight"].double() + d[k * h:(k + 1) * h]
        assert torch.allclose(out[f"transformer_blocks.0.attn.to_{part}.weight"].double(), want, atol=1e-6)
    assert (folder / "config.json").read_text() == '{"_class_name": "FluxTransformer2DModel"}'
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base.values())
    vae = Path("vae") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "out" / vae).read_bytes() == (tmp_path / "base" / vae).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_row_dora_matches_formula(sdxl):
    tmp, base, _, _ = sdxl
    up, down = pair(640, 640, seed=4)
    mag = torch.rand(640) + 0.5
    stem = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    path = write_lora(tmp / "dora.safetensors", {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up,
                                                  f"{stem}.lora_magnitude_vector": mag})
    loratools.bake(tmp / "base.safetensors", [path], tmp / "o.safetensors", family="sdxl")
    w = base[SGM + TO_Q + ".weight"].double() + product(up, down)
    want = mag.double()[:, None] * w / w.norm(dim=1, keepdim=True)
    assert_close(load(tmp / "o.safetensors")[SGM + TO_Q + ".weight"], want)


def test_two_loras_add_in_order(sdxl):
    tmp, base, lora, parts = sdxl
    loratools.bake(tmp / "base.safetensors", [(lora, 1.0), (lora, -0.25)], tmp / "o.safetensors", family="sdxl")
    up, down, s = parts["to_q"]
    want = base[SGM + TO_Q + ".weight"].double() + 0.75 * s * product(up, down)
    assert_close(load(tmp / "o.safetensors")[SGM + TO_Q + ".weight"], want)


def _bake_one(tmp: Path, spec: dict, lora: dict, family: str, dtype=torch.float32) -> tuple[dict, dict]:
    base = write_base(tmp / "b.safetensors", spec, dtype=dtype)
    path = write_lora(tmp / "l.safetensors", lora)
    loratools.bake(tmp / "b.safetensors", [path], tmp / "o.safetensors", family=family)
    return base, load(tmp / "o.safetensors")


def test_sd1_ldm_linear_lora_on_1x1_conv_and_clip(tmp_path):
    conv = SGM + "input_blocks.1.1.proj_in.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"
    spec = shapes("sd15__ldm__sdmecha.json", [conv, te, SGM + "output_blocks.11.0.skip_connection.weight"])
    (u1, d1), (u2, d2) = pair(320, 320, seed=1), pair(768, 768, seed=2)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": u1,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": d1,
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": u2,
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": d2}
    base, out = _bake_one(tmp_path, spec, lora, "sd1")
    assert torch.allclose(out[conv].double(), base[conv].double() + product(u1, d1).reshape(320, 320, 1, 1), atol=1e-6)
    assert torch.allclose(out[te].double(), base[te].double() + product(u2, d2), atol=1e-6)


def test_sd3_sai_qkv_part_and_last_block_swap(tmp_path):
    h = 48
    qkv = SGM + "joint_blocks.0.x_block.attn.qkv.weight"
    ada = SGM + "joint_blocks.1.context_block.adaLN_modulation.1.weight"  # the last block: shift/scale only
    spec = {qkv: (3 * h, h), ada: (2 * h, h), SGM + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (6 * h,)}
    (u1, d1), (u2, d2) = pair(h, h, seed=1), pair(2 * h, h, seed=2)
    lora = {"transformer.transformer_blocks.0.attn.to_v.lora_A.weight": d1,
            "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": u1,
            "transformer.transformer_blocks.1.norm1_context.linear.lora_A.weight": d2,
            "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight": u2}
    base, out = _bake_one(tmp_path, spec, lora, "sd3")
    want = base[qkv].double().clone()
    want[2 * h:] += product(u1, d1)
    assert torch.allclose(out[qkv].double(), want, atol=1e-6)
    d = product(u2, d2)
    assert torch.allclose(out[ada].double(), base[ada].double() + torch.cat([d[h:], d[:h]]), atol=1e-6)


def test_comfy_bundle_flux_with_clip_l(tmp_path):
    h = 32
    qkv = SGM + "double_blocks.0.img_attn.qkv.weight"
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    spec = {qkv: (3 * h, h), te: (768, 768), SGM + "double_blocks.0.img_attn.norm.key_norm.scale": (8,)}
    (u1, d1), (u2, d2) = pair(3 * h, h, seed=1), pair(768, 768, seed=2)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": u1,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": d1,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": u2,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": d2}
    base, out = _bake_one(tmp_path, spec, lora, "flux1")
    assert torch.allclose(out[qkv].double(), base[qkv].double() + product(u1, d1), atol=1e-6)
    assert torch.allclose(out[te].double(), base[te].double() + product(u2, d2), atol=1e-6)


def test_fp8_kept_only_with_keep_and_warned(tmp_path):
    h = 32
    key = "double_blocks.0.img_attn.proj.weight"
    base = {key: (torch.randn(h, h) * 0.05).to(torch.float8_e4m3fn),
            "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(8, dtype=torch.bfloat16)}
    write_safetensors(tmp_path / "b.safetensors", [(k, "F8_E4M3" if v.dtype == torch.float8_e4m3fn else "BF16",
                                                    tuple(v.shape), v.view(torch.uint8) if v.element_size() == 1
                                                    else v) for k, v in base.items()])
    up, down = pair(h, h)
    path = write_lora(tmp_path / "l.safetensors", {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": down,
                                                   "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": up})
    r = loratools.bake(tmp_path / "b.safetensors", [path], tmp_path / "k.safetensors", family="flux1")
    assert read_header(tmp_path / "k.safetensors").tensors[key].dtype == "F8_E4M3"
    assert any("fp8" in w for w in r.warnings)
    r = loratools.bake(tmp_path / "b.safetensors", [path], tmp_path / "w.safetensors", family="flux1", dtype="bf16")
    assert not r.warnings
    got = load(tmp_path / "w.safetensors")[key]
    want = base[key].double() + product(up, down)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.double(), want, atol=1e-2)


def test_scaled_fp8_base_is_patched_in_the_weight_loaders_use_and_widened_to_a_plain_checkpoint(tmp_path):
    """ComfyUI's scaled_fp8 layout: W = weight · scale_weight. Kept, the patch lands on W at the same scale; widened,
    the weight is W + ΔW and the layer's scales and the file's marker go (a plain bf16 checkpoint). An unpatched
    scaled weight is dequantised too when widened."""
    h = 32
    g = torch.Generator().manual_seed(7)
    names = ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj")
    real = {n: torch.randn(h, h, generator=g) * 0.05 for n in names}
    scales = {n: real[n].abs().max() / 448 for n in names}
    items = [("scaled_fp8", "F8_E4M3", (0,), b"")]
    for n in names:
        q = (real[n] / scales[n]).to(torch.float8_e4m3fn)
        items += [(f"{n}.weight", "F8_E4M3", (h, h), q.view(torch.uint8)),
                  (f"{n}.scale_weight", "F32", (), scales[n].reshape(())),
                  (f"{n}.scale_input", "F32", (), torch.tensor(1.0))]
    write_safetensors(tmp_path / "b.safetensors", items)
    stored = load(tmp_path / "b.safetensors")
    up, down = pair(h, h)
    path = write_lora(tmp_path / "l.safetensors", {f"diffusion_model.{names[0]}.lora_A.weight": down,
                                                   f"diffusion_model.{names[0]}.lora_B.weight": up})
    w0 = {n: stored[f"{n}.weight"].double() * float(scales[n]) for n in names}
    delta = product(up, down)
    loratools.bake(tmp_path / "b.safetensors", [path], tmp_path / "k.safetensors", family="flux1")
    kept = load(tmp_path / "k.safetensors")
    assert set(kept) == set(stored) and kept[f"{names[0]}.weight"].dtype == torch.float8_e4m3fn
    moved = kept[f"{names[0]}.weight"].double() * float(kept[f"{names[0]}.scale_weight"]) - w0[names[0]]
    assert abs(float((moved * delta).sum() / (delta * delta).sum()) - 1.0) < 0.05  # ΔW, to fp8's rounding
    assert torch.equal(kept[f"{names[1]}.weight"].view(torch.uint8), stored[f"{names[1]}.weight"].view(torch.uint8))
    loratools.bake(tmp_path / "b.safetensors", [path], tmp_path / "w.safetensors", family="flux1", dtype="bf16")
    wide = load(tmp_path / "w.safetensors")
    assert set(wide) == {f"{n}.weight" for n in names}  # no scales, no marker: a plain checkpoint
    assert torch.allclose(wide[f"{names[0]}.weight"].double(), w0[names[0]] + delta, atol=2e-3)
    assert torch.allclose(wide[f"{names[1]}.weight"].double(), w0[names[1]], atol=1e-3)


# --- bad input --------------------------------------------------------------------------------------------------

def test_lora_of_another_family_lists_unmatched_and_cause(sdxl, tmp_path):
    tmp = sdxl[0]
    up, down = pair(64, 64)
    path = write_lora(tmp / "flux.safetensors", {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
                                                 "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up})
    with pytest.raises(FormatError, match="1 LoRA modules have no weight in the base: .*to_k.* the LoRA is flux1 but "
                                          "the base looks like sdxl"):
        loratools.bake(tmp / "base.safetensors", [path], tmp / "o.safetensors", family="flux1")
    assert not (tmp / "o.safetensors").exists()
    r = loratools.bake(tmp / "base.safetensors", [path], tmp / "o.safetensors", family="flux1", allow_unmatched=True)
    assert r.patched_tensors == 0 and len(r.unmatched) == 1


def test_shape_mismatch_names_module_and_shapes(sdxl):
    tmp = sdxl[0]
    up, down = pair(320, 320)
    path = write_lora(tmp / "bad.safetensors", {f"lora_unet_{TO_Q.replace('.', '_')}.lora_up.weight": up,
                                                f"lora_unet_{TO_Q.replace('.', '_')}.lora_down.weight": down})
    with pytest.raises(ShapeMismatch, match=r"gives ΔW \[320, 320\] but base tensor .*to_q.weight has \[640, 640\]"):
        loratools.bake(tmp / "base.safetensors", [path], tmp / "o.safetensors", family="sdxl")
    assert not (tmp / "o.safetensors").exists()


def test_output_rules(sdxl):
    tmp, _, lora, _ = sdxl
    (tmp / "o.safetensors").write_bytes(b"x")
    with pytest.raises(LoraToolsError, match="output exists; pass --overwrite"):
        loratools.bake(tmp / "base.safetensors", [lora], tmp / "o.safetensors", family="sdxl")
    loratools.bake(tmp / "base.safetensors", [lora], tmp / "o.safetensors", family="sdxl", overwrite=True)
    assert read_header(tmp / "o.safetensors").tensors
    (tmp / "outdir").mkdir()
    r = loratools.bake(tmp / "base.safetensors", [lora], str(tmp / "outdir") + "/", family="sdxl")
    assert r.output == str(tmp / "outdir" / "base.safetensors") and (tmp / "outdir" / "base.safetensors").is_file()
    with pytest.raises(UsageError, match="would replace the base"):
        loratools.bake(tmp / "base.safetensors", [lora], tmp / "base.safetensors", family="sdxl", overwrite=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda(sdxl):
    tmp, _, lora, _ = sdxl
    with pytest.raises(UsageError, match="CUDA was requested but torch sees no CUDA device"):
        loratools.bake(tmp / "base.safetensors", [lora], tmp / "p.safetensors", family="sdxl", device="cuda")


def test_cli_truncated_base_exit_2(sdxl):
    tmp, _, lora, _ = sdxl
    raw = (tmp / "base.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    res = CliRunner().invoke(cli, ["bake", str(tmp / "cut.safetensors"), str(lora), "-o", str(tmp / "o.safetensors"),
                                   "--family", "sdxl"])
    assert res.exit_code != 0 and isinstance(res.exception, LoraToolsError)
    assert not (tmp / "o.safetensors").exists()


def test_cli_json_report(sdxl):
    tmp, _, lora, _ = sdxl
    res = CliRunner().invoke(cli, ["bake", str(tmp / "base.safetensors"), f"{lora}:0.5", "-o",
                                   str(tmp / "o.safetensors"), "--family", "sdxl", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["patched_tensors"] == 3 and doc["loras"][0]["strength"] == 0.5 and doc["device"] == "cpu"
    assert doc["bytes_written"] > 0 and doc["peak_rss_mb"] > 0


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from loratools.cli import main
sys.argv = ["loratools", "bake", *sys.argv[1:]]
main()
"""


def test_full_disk_is_a_clean_error(sdxl):
    tmp, _, lora, _ = sdxl
    out = tmp / "o.safetensors"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp / "base.safetensors"), str(lora), "-o", str(out),
                           "--family", "sdxl"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("loratools: error: ") and "cannot write output" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp) if p.startswith(".o.safetensors")]


def test_interrupted_run_leaves_nothing(sdxl, monkeypatch):
    tmp, _, lora, _ = sdxl
    import loratools.ops.bake as bake_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bake_mod, "patch_tensor", boom)
    with pytest.raises(KeyboardInterrupt):
        loratools.bake(tmp / "base.safetensors", [lora], tmp / "o.safetensors", family="sdxl")
    assert not [p for p in os.listdir(tmp) if p.startswith(".o.safetensors") or p == "o.safetensors"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bake_equals_cpu_bake(sdxl):
    tmp, _, lora, _ = sdxl
    loratools.bake(tmp / "base.safetensors", [lora], tmp / "cpu.safetensors", family="sdxl", device="cpu")
    loratools.bake(tmp / "base.safetensors", [lora], tmp / "gpu.safetensors", family="sdxl", device="cuda")
    a, b = load(tmp / "cpu.safetensors"), load(tmp / "gpu.safetensors")
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-3), k

"""Resized and merged files, written in each format, load in diffusers/PEFT and match the dense reference."""

from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402

from interop import harness as h  # noqa: E402

import loratools  # noqa: E402

pytestmark = pytest.mark.interop


def _truncated(reference: dict, k: int) -> dict:
    """The optimal rank-k approximation of every reference ΔW (dense float64 SVD)."""
    out = {}
    for name, d in reference.items():
        mat = d.double().flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        out[name] = (u[:, :k] * s[:k]) @ vh[:k]
    return out


def _loaded_deltas(family, source, out, to):
    fresh = h.build(family)
    if to == "peft":
        for folder in sorted(p for p in Path(out).iterdir() if p.is_dir()):
            h.load_with_peft(fresh, folder.name, folder)
        return h.deltas(fresh, "default"), fresh
    h.load_with_diffusers(family, fresh, out, expect=source.expect)
    return h.deltas(fresh, "x"), fresh


def _max_rel(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    return max(float((got[n].double().flatten(1) - ref[n]).norm() / ref[n].norm()) for n in ref)


@pytest.mark.parametrize("to", ("diffusers", "peft"))
def test_resized_file_loads_and_is_the_optimal_truncation(to, tmp_path):
    source = h.diffusers_file("sd1", tmp_path / "src.safetensors", rank=4, with_text_encoders=True)
    small, report = loratools.resize(source.path, rank=2)
    out = loratools.save(small, f"{tmp_path}/out/" + ("r2.safetensors" if to == "diffusers" else "r2.peft"), to=to,
                         family="sd1")
    got, _ = _loaded_deltas("sd1", source, out.output, to)
    assert _max_rel(got, _truncated(h.reference_deltas(source), 2)) < 1e-4  # float32 factors
    assert report["summary"]["retained_min"] < 1.0


@pytest.mark.parametrize("to", ("diffusers", "peft"))
def test_merged_file_loads_and_acts_like_the_weighted_sum(to, tmp_path):
    source = h.diffusers_file("flux1", tmp_path / "src.safetensors", rank=4)
    merged, _ = loratools.merge([(source.path, 0.75), (source.path, 0.25)])  # = the source, at rank 8
    out = loratools.save(merged, f"{tmp_path}/out/" + ("m.safetensors" if to == "diffusers" else "m.peft"), to=to,
                         family="flux1")
    got, fresh = _loaded_deltas("flux1", source, out.output, to)
    ref = {n: d.double().flatten(1) for n, d in h.reference_deltas(source).items()}
    assert _max_rel(got, ref) < 1e-5
    assert h.max_rel_diff(h.run(fresh), h.reference_outputs(fresh, source)) <= 1e-5

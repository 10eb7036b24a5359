"""OFT and butterfly OFT (BOFT): a file LyCORIS's own modules saved is applied to a base weight exactly as LyCORIS
merges it, at full and partial strength, with and without the norm constraint and the rescale."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import loratools

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402

STEM = "lora_unet_transformer_blocks_0_attn1_to_q"  # LTX-Video: 2048 wide, which BOFT can factor


@pytest.mark.parametrize("algo", [ButterflyOFTModule, DiagOFTModule], ids=["boft", "diag-oft"])
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("rescaled", [False, True])
def test_oft_and_boft_apply_as_lycoris_merges_them(tmp_path, algo, constraint, rescaled):
    torch.manual_seed(0)
    with torch.no_grad():
        base = torch.nn.Linear(2048, 2048, bias=False)
        module = algo(STEM, base, 1.0, 8, constraint=constraint, rescaled=rescaled)
        module.oft_blocks.copy_(torch.randn_like(module.oft_blocks) * 0.05)  # trained: away from the identity
        if rescaled:
            module.rescale.copy_(torch.rand_like(module.rescale) + 0.5)
        save_file({f"{STEM}.{k}": v.contiguous() for k, v in module.state_dict().items() if k != "org_weight"},
                  str(tmp_path / "oft.safetensors"))
        with loratools.load(tmp_path / "oft.safetensors") as lora:
            (m,) = lora.modules
            assert m.adapter.label == ("boft" if algo is ButterflyOFTModule else "oft")
            assert m.adapter.needs_base
            for strength in (1.0, 0.6):
                got = m.adapter.delta(base.weight, alpha=m.alpha, strength=strength)
                merged = module.get_merged_weight(multiplier=strength)
                want = (merged[0] if isinstance(merged, tuple) else merged) - base.weight
                assert want.abs().max() > 1e-3  # the test has something to compare
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

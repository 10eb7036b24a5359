"""Adapter math on tiny tensors against hand-written formulas (float64 references)."""

import pytest
import torch

from loratools.adapters import IA3, GLoRA, LoHa, LoKr, LoRA, Full
from loratools.errors import ShapeMismatch
from loratools.io.pickled import TensorDictSource
from loratools.model import Module, TensorRef


def refs(**tensors):
    src = TensorDictSource("mem", tensors)
    return {k: TensorRef(src, k, src.info(k).dtype, tuple(v.shape)) for k, v in tensors.items()}


def g(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def test_lora_linear_delta_and_scale():
    up, down = g(6, 2), g(2, 5)
    a = LoRA(refs(lora_up=up, lora_down=down))
    assert a.rank == 2 and a.in_dim == 5 and a.out_dim == 6 and a.label == "lora"
    torch.testing.assert_close(a.delta(), up @ down)
    assert a.scale(4.0) == 2.0
    assert a.scale(None) == 1.0  # missing alpha means alpha = rank
    assert a.scale(4.0, rslora=True) == pytest.approx(4.0 / 2**0.5)


def test_conv_lora_keeps_kernel_on_down():
    up, down = g(8, 3, 1, 1), g(3, 4, 3, 3)
    a = LoRA(refs(lora_up=up, lora_down=down))
    assert a.label == "locon" and a.kernel == (3, 3)
    d = a.delta()
    assert d.shape == (8, 4, 3, 3)
    ref = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double())
    torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-6)


def test_tucker_mid():
    up, mid, down = g(8, 3, 1, 1), g(3, 3, 3, 3), g(3, 4, 1, 1)
    a = LoRA(refs(lora_up=up, lora_mid=mid, lora_down=down))
    ref = torch.zeros(8, 4, 3, 3, dtype=torch.float64)
    for o in range(8):
        for i in range(4):
            for m in range(3):
                for n in range(3):
                    ref[o, i] += up[o, m, 0, 0].double() * mid[m, n].double() * down[n, i, 0, 0].double()
    torch.testing.assert_close(a.delta().double(), ref, rtol=1e-5, atol=1e-6)
    assert a.label == "locon"


def test_lora_rank_mismatch_is_reported():
    a = LoRA(refs(lora_up=g(6, 3), lora_down=g(2, 5)))
    with pytest.raises(ShapeMismatch, match="up has rank 3, down has rank 2"):
        a.check()


def test_loha_is_hadamard_of_two_products():
    w1a, w1b, w2a, w2b = g(6, 2), g(2, 5), g(6, 2), g(2, 5)
    a = LoHa(refs(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b))
    torch.testing.assert_close(a.delta(), (w1a @ w1b) * (w2a @ w2b))
    assert a.rank == 2 and a.scale(1.0) == 0.5


def test_lokr_full_factors_ignore_alpha():
    w1, w2 = g(2, 3), g(4, 5)
    a = LoKr(refs(lokr_w1=w1, lokr_w2=w2))
    assert a.rank is None and a.scale(16.0) == 1.0
    assert a.out_dim == 8 and a.in_dim == 15
    torch.testing.assert_close(a.delta(), torch.kron(w1, w2))


def test_lokr_decomposed_w2_uses_its_rank():
    w1, w2a, w2b = g(2, 3), g(4, 2), g(2, 5)
    a = LoKr(refs(lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b))
    assert a.rank == 2 and a.scale(1.0) == 0.5
    torch.testing.assert_close(a.delta(), torch.kron(w1, w2a @ w2b))


def test_full_diff_and_ia3_need_base_only_where_they_should():
    diff = g(3, 4)
    assert torch.equal(Full(refs(diff=diff)).delta(), diff)
    w = g(3)
    ia3 = IA3(refs(plain_weight=w, on_input=torch.tensor(False)))
    base = g(3, 4)
    torch.testing.assert_close(ia3.delta(base), base * w[:, None])
    with pytest.raises(ValueError):
        ia3.delta()


def test_glora():
    a1, a2, b1, b2 = g(4, 2), g(2, 4), g(3, 2), g(2, 4)
    a = GLoRA(refs(glora_a1=a1, glora_a2=a2, glora_b1=b1, glora_b2=b2))
    base = g(3, 4)
    torch.testing.assert_close(a.delta(base), base @ (a1 @ a2) + b1 @ b2)


@pytest.mark.parametrize("shape,axis", [((6, 1), "row"), ((6,), "row"), ((1, 5), "column")])
def test_dora_axis_from_magnitude_shape(shape, axis):
    r = refs(lora_up=g(6, 2), lora_down=g(2, 5), m=g(*shape))
    m = Module("x", "model", LoRA({k: r[k] for k in ("lora_up", "lora_down")}), magnitude=r["m"])
    assert m.dora_axis == axis


@pytest.mark.parametrize("decomposed", [False, True])
def test_lokr_singular_values_are_those_of_its_dense_delta(decomposed):
    """inspect --stats takes a LoKr's spectrum from its Kronecker factors; it must be the dense ΔW's."""
    w2 = dict(lokr_w2_a=g(6, 2), lokr_w2_b=g(2, 5)) if decomposed else dict(lokr_w2=g(6, 5))
    a = LoKr(refs(lokr_w1=g(3, 4), **w2))
    dense = torch.linalg.svdvals(a.delta().double())
    s = a.singular_values()
    n = min(s.numel(), dense.numel())  # the longer list ends in zeros
    assert torch.allclose(s[:n], dense[:n], rtol=1e-5, atol=1e-5)
    assert bool((s[n:].abs() < 1e-5).all()) and bool((dense[n:].abs() < 1e-5).all())
    assert LoRA(refs(lora_up=g(5, 2), lora_down=g(2, 4))).singular_values() is None  # from its factors instead

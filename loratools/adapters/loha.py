"""LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b), optionally Tucker (`hada_t1/t2`) as in LyCORIS."""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


class LoHa(Adapter):
    kind = "loha"
    lossy_name = "LoHa"
    detect = (frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),)
    optional = frozenset({"hada_t1", "hada_t2"})
    suffixes = {(r,): (r, LYCORIS) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}

    @property
    def tucker(self) -> bool:
        return self.has("hada_t1")

    @property
    def rank(self) -> int:
        return self.t("hada_w1_b").shape[0]

    @property
    def out_dim(self) -> int | None:
        a = self.t("hada_w1_a").shape
        return a[1] if self.tucker else a[0]

    @property
    def in_dim(self) -> int | None:
        b = self.t("hada_w1_b").shape
        if self.tucker:
            return b[1]
        return None if len(b) < 2 else b[1]  # plain conv LoHa flattens in*kh*kw

    def check(self) -> None:
        shapes = {r: tuple(self.t(r).shape) for r in self.tensors}
        if any(len(s) < 2 for r, s in shapes.items()):
            raise self._mismatch("every factor must be at least 2-D")
        outs = []
        for i in (1, 2):
            a, b = shapes[f"hada_w{i}_a"], shapes[f"hada_w{i}_b"]
            if self.tucker:
                t = shapes.get(f"hada_t{i}")
                if t is None or len(t) != 4 or t[0] != a[0] or t[1] != b[0]:
                    raise self._mismatch(f"hada_t{i} must be [r, r, kh, kw] matching hada_w{i}_a and _b")
                outs.append((a[1], b[1], t[2:]))
            else:
                if a[1] != b[0]:
                    raise self._mismatch(f"hada_w{i}_a has rank {a[1]}, hada_w{i}_b has rank {b[0]}")
                outs.append((a[0], b[1:]))
        if outs[0] != outs[1]:
            raise self._mismatch("the two Hadamard factors have different shapes")
        if self.rank < 1:
            raise self._mismatch("rank 0: no factor to apply")

    def scale(self, alpha: float | None, rslora: bool = False) -> float:
        r = self.rank
        return 1.0 if alpha is None or r == 0 else alpha / r

    def _factor(self, i: int):
        import torch

        a, b = f32(self.t(f"hada_w{i}_a")), f32(self.t(f"hada_w{i}_b"))
        if self.tucker:
            t = f32(self.t(f"hada_t{i}"))
            return torch.einsum("ijkl,jr,ip->prkl", t, b, a)
        return a @ b

    def delta(self, base=None, alpha=None, strength=1.0):
        d = self._factor(1) * self._factor(2)
        if base is not None and d.shape != tuple(base.shape):
            d = d.reshape(base.shape)
        return d

"""LoKr: ΔW = kron(w1, w2) with either factor possibly low-rank (and w2 possibly Tucker)."""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


class LoKr(Adapter):
    kind = "lokr"
    detect = (
        frozenset({"lokr_w1", "lokr_w2"}),
        frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_w2"}),
        frozenset({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    )
    optional = frozenset({"lokr_t2"})
    lossy_name = "LoKr"
    suffixes = {(r,): (r, LYCORIS) for r in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                             "lokr_t2")}

    def _w1_shape(self) -> tuple[int, int]:
        if self.has("lokr_w1"):
            s = self.t("lokr_w1").shape
            return s[0], s[1]
        return self.t("lokr_w1_a").shape[0], self.t("lokr_w1_b").shape[1]

    def _w2_shape(self) -> tuple[int, int]:
        if self.has("lokr_w2"):
            s = self.t("lokr_w2").shape
            return s[0], s[1]
        a, b = self.t("lokr_w2_a").shape, self.t("lokr_w2_b").shape
        if self.has("lokr_t2"):
            return a[1], b[1]
        return a[0], b[1]  # conv: b[1] is d*kh*kw

    @property
    def decomposed(self) -> bool:
        return not (self.has("lokr_w1") and self.has("lokr_w2"))

    @property
    def rank(self) -> int | None:
        # LyCORIS takes the rank of a decomposed factor; w1's when both are (InvokeAI, sd-mecha).
        if self.has("lokr_w1_b"):
            return self.t("lokr_w1_b").shape[0]
        if self.has("lokr_w2_b"):
            return self.t("lokr_w2_b").shape[0]
        return None

    @property
    def out_dim(self) -> int:
        return self._w1_shape()[0] * self._w2_shape()[0]

    @property
    def in_dim(self) -> int:
        # A decomposed conv w2 flattens d*kh*kw, so this is then in*kh*kw (as other readers report it).
        return self._w1_shape()[1] * self._w2_shape()[1]

    def check(self) -> None:
        shapes = {r: tuple(self.t(r).shape) for r in self.tensors}
        if any(len(s) < 2 for s in shapes.values()):
            raise self._mismatch("every factor must be at least 2-D")
        for w in ("lokr_w1", "lokr_w2"):
            if self.has(f"{w}_a"):
                a, b = shapes[f"{w}_a"], shapes[f"{w}_b"]
                if w == "lokr_w2" and self.has("lokr_t2"):
                    t = shapes["lokr_t2"]
                    if len(t) != 4 or t[0] != a[0] or t[1] != b[0]:
                        raise self._mismatch("lokr_t2 must be [r, r, kh, kw] matching lokr_w2_a and _b")
                elif a[1] != b[0]:
                    raise self._mismatch(f"{w}_a has rank {a[1]}, {w}_b has rank {b[0]}")
                if min(a[1], b[0]) < 1:
                    raise self._mismatch("rank 0: no factor to apply")

    def scale(self, alpha: float | None, rslora: bool = False) -> float:
        r = self.rank
        if alpha is None or r is None or r == 0:
            return 1.0  # both factors full: alpha is ignored
        return alpha / r

    def w1(self):
        """The first Kronecker factor, float32 (a product when stored low-rank)."""
        if self.has("lokr_w1"):
            return f32(self.t("lokr_w1"))
        return f32(self.t("lokr_w1_a")) @ f32(self.t("lokr_w1_b"))

    def w2(self):
        """The second Kronecker factor, float32 (2-D, or 4-D for a conv)."""
        import torch

        if self.has("lokr_w2"):
            return f32(self.t("lokr_w2"))
        a, b = f32(self.t("lokr_w2_a")), f32(self.t("lokr_w2_b"))
        if self.has("lokr_t2"):
            return torch.einsum("ijkl,jr,ip->prkl", f32(self.t("lokr_t2")), b, a)
        return a @ b

    def kron_factors(self):
        w2 = self.w2()
        return (self.w1(), w2) if w2.dim() == 2 else None

    def singular_values(self):
        # a Kronecker product's singular values are the pairwise products of its factors': no dense ΔW needed
        import torch

        s1, s2 = (torch.linalg.svdvals(w.flatten(1)).double() for w in (self.w1(), self.w2()))
        return torch.outer(s1, s2).flatten().sort(descending=True).values

    def delta(self, base=None, alpha=None, strength=1.0):
        import torch

        w1, w2 = self.w1(), self.w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
        if base is not None and d.shape != tuple(base.shape):
            d = d.reshape(base.shape)
        return d

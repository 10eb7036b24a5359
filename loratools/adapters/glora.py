"""GLoRA: ΔW = W·(a1@a2) + b1@b2 (older files store the transposed layout)."""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


class GLoRA(Adapter):
    kind = "glora"
    detect = (frozenset({"glora_a1", "glora_a2", "glora_b1", "glora_b2"}),)
    optional = frozenset({"glora_bm"})
    suffixes = {(n, "weight"): (f"glora_{n}", LYCORIS) for n in ("a1", "a2", "b1", "b2", "bm")}
    needs_base = True

    @property
    def rank(self) -> int:
        return min(self.t("glora_b1").shape[:2])

    @property
    def out_dim(self) -> int | None:
        b1, b2 = self.t("glora_b1").shape, self.t("glora_b2").shape
        return b1[0] if b1[1] == b2[0] else b2[0]

    def check(self) -> None:
        a1, a2, b1, b2 = (tuple(self.t(f"glora_{n}").shape) for n in ("a1", "a2", "b1", "b2"))
        if any(len(s) < 2 for s in (a1, a2, b1, b2)):
            raise self._mismatch("every factor must be at least 2-D")
        if not ((a1[1] == a2[0] and b1[1] == b2[0]) or (a2[1] == a1[0] and b2[1] == b1[0])):
            raise self._mismatch("a1 @ a2 and b1 @ b2 must both be products")

    def scale(self, alpha: float | None, rslora: bool = False) -> float:
        r = self.rank
        return 1.0 if alpha is None or r == 0 else alpha / r

    def delta(self, base=None, alpha=None, strength=1.0):
        if base is None:
            raise ValueError("GLoRA needs the base weight")
        a1, a2, b1, b2 = (f32(self.t(f"glora_{n}")) for n in ("a1", "a2", "b1", "b2"))
        w = base.float().flatten(1)
        if b1.shape[1] == b2.shape[0]:
            d = w @ (a1.flatten(1) @ a2.flatten(1)) + b1.flatten(1) @ b2.flatten(1)
        else:  # old layout: transposed factors
            d = w @ (a2.flatten(1) @ a1.flatten(1)) + b2.flatten(1) @ b1.flatten(1)
        return d.reshape(base.shape)

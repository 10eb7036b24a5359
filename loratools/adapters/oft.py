"""Diagonal OFT and butterfly OFT (BOFT) as LyCORIS stores them: `oft_blocks` (+ `rescale`)."""

from __future__ import annotations

from loratools.adapters.base import Adapter, f32


def _cayley(blocks, constraint: float | None):
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if constraint:
        norm = torch.linalg.matrix_norm(q.flatten(0, -3) if q.dim() > 3 else q).max()
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


class OFT(Adapter):
    kind = "oft"
    detect = (frozenset({"oft_blocks"}),)
    optional = frozenset({"rescale"})
    needs_base = True

    @property
    def label(self) -> str:
        return "boft" if len(self.t("oft_blocks").shape) == 4 else "oft"

    @property
    def rank(self) -> int | None:
        return self.t("oft_blocks").shape[-1]  # block size

    @property
    def out_dim(self) -> int | None:
        s = self.t("oft_blocks").shape
        return s[0] * s[1] if len(s) == 3 else None

    def delta(self, base=None, constraint: float | None = None):
        import torch

        if base is None:
            raise ValueError("OFT needs the base weight")
        if self.label == "boft":
            raise NotImplementedError("BOFT ΔW is not implemented")
        blocks = f32(self.t("oft_blocks"))
        r = _cayley(blocks, constraint)
        w = base.float()
        n, b = r.shape[0], r.shape[-1]
        wb = w.reshape(n, b, *w.shape[1:])
        out = torch.einsum("knm,kn...->km...", r, wb).reshape(w.shape)
        if self.has("rescale"):
            out = out * f32(self.t("rescale")).reshape(-1, *([1] * (w.dim() - 1)))
        return out - w

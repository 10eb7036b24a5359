"""Diagonal OFT and butterfly OFT (BOFT) as LyCORIS stores them: ``oft_blocks`` (+ ``rescale``), alpha = constraint.

Both rotate the base weight's output rows: W' = R·W (·rescale), R from skew-symmetric blocks by the Cayley
transform. Diagonal OFT ([n, b, b]) has one block-diagonal R; BOFT ([m, n, b, b]) chains m block-diagonal stages,
stage i mixing rows 2^i·b/2 apart (a butterfly), as LyCORIS's ``boft`` module computes it. A stored alpha is the
norm constraint per output row (LyCORIS multiplies it by the output width).
"""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


def _rotations(blocks, constraint: float | None):
    """Cayley rotations R = (I + Q)(I − Q)⁻¹ of the blocks' skew parts, Q scaled down to the constraint (LyCORIS's
    rule: the norm of all of Q at once)."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    if constraint:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


class OFT(Adapter):
    kind = "oft"
    detect = (frozenset({"oft_blocks"}),)
    optional = frozenset({"rescale"})
    suffixes = {("oft_blocks",): ("oft_blocks", LYCORIS), ("rescale",): ("rescale", LYCORIS)}
    needs_base = True
    # the strength interpolates R (every stage of BOFT) toward the identity and the rescale stays whole, as LyCORIS
    # applies them: not a factor on ΔW
    strength_inside = True

    @property
    def butterfly(self) -> bool:
        return len(self.t("oft_blocks").shape) == 4

    @property
    def label(self) -> str:
        return "boft" if self.butterfly else "oft"

    @property
    def rank(self) -> int | None:
        return self.t("oft_blocks").shape[-1]  # block size

    @property
    def out_dim(self) -> int | None:
        s = self.t("oft_blocks").shape
        return s[-3] * s[-1] if len(s) >= 3 else None

    def check(self) -> None:
        s = self.t("oft_blocks").shape
        if len(s) not in (3, 4) or s[-1] != s[-2]:
            raise self._mismatch("oft_blocks must be [n, b, b] or [m, n, b, b]")
        if self.butterfly and s[-1] % 2:
            raise self._mismatch("a BOFT block size must be even")

    def delta(self, base=None, alpha=None, strength=1.0):
        import torch

        if base is None:
            raise ValueError("OFT needs the base weight")
        w = base.float()
        if w.shape[0] != self.out_dim:
            raise self._mismatch(f"the base weight has {w.shape[0]} rows")
        constraint = alpha * w.shape[0] if alpha else None
        r = _rotations(f32(self.t("oft_blocks")), constraint)
        eye = torch.eye(r.shape[-1], dtype=r.dtype)
        if self.butterfly:
            out = w
            half = r.shape[-1] // 2
            for i in range(r.shape[0]):
                stage = r[i] * strength + (1 - strength) * eye if strength != 1 else r[i]
                k = 2**i * half
                x = out.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, r.shape[-1]))
                x = torch.einsum("bij,bj...->bi...", stage, x)
                out = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        else:
            r = r * strength + (1 - strength) * eye if strength != 1 else r
            n, b = r.shape[0], r.shape[-1]
            out = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
        if self.has("rescale"):
            rescale = f32(self.t("rescale")).reshape(-1, *([1] * (w.dim() - 1)))
            out = out * rescale  # LyCORIS applies the rescale whole at any strength
        return out - w

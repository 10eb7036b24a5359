"""LoRA and LoCon: ΔW = flat(up) @ flat(down), reshaped; Tucker `lora_mid` as in LyCORIS."""

from __future__ import annotations

from loratools.adapters.base import KOHYA, PEFT, Adapter, f32


class LoRA(Adapter):
    kind = "lora"
    detect = (frozenset({"lora_down", "lora_up"}),)
    optional = frozenset({"lora_mid", "lora_up_bias", "diff_b"})
    exact_lora = True
    suffixes = {
        ("lora_down", "weight"): ("lora_down", KOHYA), ("lora_up", "weight"): ("lora_up", KOHYA),
        ("lora_mid", "weight"): ("lora_mid", KOHYA),
        ("lora_A", "weight"): ("lora_down", PEFT), ("lora_B", "weight"): ("lora_up", PEFT),
        ("lora_B", "bias"): ("lora_up_bias", PEFT),
        ("lora_A",): ("lora_down", PEFT), ("lora_B",): ("lora_up", PEFT),  # Mochi's trainer omits ".weight"
    }

    @property
    def down(self):
        return self.t("lora_down")

    @property
    def up(self):
        return self.t("lora_up")

    @property
    def rank(self) -> int:
        return self.down.shape[0] if self.down.shape else 0

    @property
    def out_dim(self) -> int | None:
        return self.up.shape[0] if self.up.shape else None

    @property
    def in_dim(self) -> int | None:
        shape = self.down.shape  # Tucker's down is [r, in, 1, 1] too
        return shape[1] if len(shape) > 1 else None

    @property
    def kernel(self) -> tuple[int, ...] | None:
        """The conv kernel (from down, or from mid for Tucker), None for linears."""
        src = self.t("lora_mid") if self.has("lora_mid") else self.down
        return tuple(src.shape[2:]) if len(src.shape) > 2 else None

    @property
    def label(self) -> str:
        k = self.kernel
        if self.has("lora_mid") or (k is not None and any(d > 1 for d in k)):
            return "locon"
        return "lora"

    def scale(self, alpha: float | None, rslora: bool = False) -> float:
        r = self.rank
        if alpha is None or r == 0:
            return 1.0
        return alpha / (r**0.5) if rslora else alpha / r

    def check(self) -> None:
        up, down = self.up.shape, self.down.shape
        if len(up) < 2 or len(down) < 2:
            raise self._mismatch("up and down must be at least 2-D")
        if self.has("lora_mid"):
            mid = self.t("lora_mid").shape
            if len(mid) != 4 or mid[0] != up[1] or mid[1] != down[0]:
                raise self._mismatch("mid must be [r_up, r_down, kh, kw]")
        elif up[1] != down[0]:
            raise self._mismatch(f"up has rank {up[1]}, down has rank {down[0]}")
        if down[0] < 1:
            raise self._mismatch("rank 0: no factor to apply")
        if len(up) > 2 and any(d != 1 for d in up[2:]):
            raise self._mismatch("a conv up factor must be 1x1")

    def plain_factors(self):
        return None if self.has("lora_mid") else (self.up, self.down)

    def low_rank(self):
        """(up [out, r], down [r, in·k·k]) in float32; a Tucker mid is folded into down (exact, rank r_up)."""
        import torch

        up, down = f32(self.up).flatten(1), f32(self.down)
        if self.has("lora_mid"):
            down = torch.einsum("mnkl,ni->mikl", f32(self.t("lora_mid")), down.flatten(1))
        return up, down.flatten(1)

    def delta(self, base=None, alpha=None, strength=1.0):
        up, down = self.low_rank()
        d = up @ down
        kernel = self.kernel
        if kernel is not None:
            d = d.reshape(up.shape[0], self.down.shape[1], *kernel)
        return d

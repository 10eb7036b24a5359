"""(IA)³: the base weight scaled per output row (or per input column with `on_input`)."""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


class IA3(Adapter):
    kind = "ia3"
    detect = (frozenset({"plain_weight", "on_input"}),)
    needs_base = True
    suffixes = {("on_input",): ("on_input", LYCORIS)}  # plus the plain "weight"

    @property
    def on_input(self) -> bool:
        return bool(self.t("on_input").scalar())

    @property
    def out_dim(self) -> int | None:
        return None if self.on_input else self.t("plain_weight").shape[0]

    @property
    def in_dim(self) -> int | None:
        return self.t("plain_weight").shape[0] if self.on_input else None

    def delta(self, base=None, alpha=None, strength=1.0):
        if base is None:
            raise ValueError("(IA)3 needs the base weight")
        w = f32(self.t("plain_weight"))
        base = base.float()
        if self.on_input:
            return base * w.reshape(1, -1, *([1] * (base.dim() - 2)))
        return base * w.reshape(-1, *([1] * (base.dim() - 1)))

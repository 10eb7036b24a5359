"""Whole-tensor adapters: full ΔW (`diff`/`diff_b`), norm deltas (`w_norm`/`b_norm`) and replacements."""

from __future__ import annotations

from loratools.adapters.base import LYCORIS, Adapter, f32


class Full(Adapter):
    """A stored ΔW (LyCORIS "full"), with or without a bias delta."""

    kind = "full"
    detect = (frozenset({"diff"}), frozenset({"diff_b"}))
    suffixes = {("diff",): ("diff", LYCORIS), ("diff_b",): ("diff_b", LYCORIS)}
    lossy_name = "full-diff"

    @property
    def out_dim(self) -> int | None:
        ref = self.tensors.get("diff") or self.tensors.get("diff_b")
        return ref.shape[0] if ref.shape else None

    @property
    def in_dim(self) -> int | None:
        ref = self.tensors.get("diff")
        return ref.shape[1] if ref is not None and len(ref.shape) > 1 else None

    @property
    def moves_weight(self) -> bool:
        return self.has("diff")

    @property
    def is_vector(self) -> bool:
        return not self.has("diff") or len(self.t("diff").shape) < 2

    def delta(self, base=None, alpha=None, strength=1.0):
        return f32(self.t("diff")) if self.has("diff") else None


class Norm(Adapter):
    """A delta on a normalisation layer's weight and bias."""

    kind = "norm"
    detect = (frozenset({"w_norm"}), frozenset({"b_norm"}))
    suffixes = {("w_norm",): ("w_norm", LYCORIS), ("b_norm",): ("b_norm", LYCORIS)}
    is_vector = True

    @property
    def out_dim(self) -> int | None:
        ref = self.tensors.get("w_norm") or self.tensors.get("b_norm")
        return ref.shape[0] if ref.shape else None

    def delta(self, base=None, alpha=None, strength=1.0):
        return f32(self.t("w_norm")) if self.has("w_norm") else None


class Replace(Adapter):
    """Tensors that replace the base weight (BFL control LoRA norms and widened inputs, `set_weight`)."""

    kind = "set"
    detect = (frozenset({"set_weight"}), frozenset({"plain_scale"}), frozenset({"plain_weight"}),
              frozenset({"plain_bias"}))
    optional = frozenset({"reshape_weight", "plain_weight", "plain_bias", "plain_scale"})
    suffixes = {("set_weight",): ("set_weight", LYCORIS), ("reshape_weight",): ("reshape_weight", LYCORIS)}
    needs_base = True

    @property
    def out_dim(self) -> int | None:
        for ref in self.tensors.values():
            if ref.shape:
                return ref.shape[0]
        return None

    def delta(self, base=None, alpha=None, strength=1.0):
        if base is None:
            raise ValueError("a replacement needs the base weight")
        ref = self.tensors.get("set_weight") or self.tensors.get("plain_weight") or self.tensors.get("plain_scale")
        return f32(ref) - base.float()

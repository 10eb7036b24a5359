"""The adapter base class: each adapter type owns a few key roles and computes its own ΔW."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from loratools.errors import ShapeMismatch

if TYPE_CHECKING:  # pragma: no cover
    from loratools.model import TensorRef

_REGISTRY: list[type[Adapter]] = []


class Adapter:
    """One adapter type. Subclasses declare the roles that identify them and the optional extras.

    ``detect`` lists alternative role sets; a stem whose roles include every role of one set belongs
    to this adapter. ``optional`` roles are taken too when present.
    """

    kind: ClassVar[str]
    detect: ClassVar[tuple[frozenset[str], ...]]
    optional: ClassVar[frozenset[str]] = frozenset()
    needs_base: ClassVar[bool] = False  # ΔW depends on the base weight (IA3, OFT, GLoRA)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr in ("kind", "detect"):
            if not hasattr(cls, attr):
                raise TypeError(f"{cls.__name__} must define {attr}")
        cls._owned = frozenset().union(*cls.detect) | cls.optional
        _REGISTRY.append(cls)

    def __init__(self, tensors: dict[str, TensorRef]):
        self.tensors = tensors

    @classmethod
    def claim(cls, roles: set[str]) -> frozenset[str] | None:
        """The roles this adapter takes from a stem, or None when the stem is not of this type."""
        for needed in cls.detect:
            if needed <= roles:
                return frozenset(roles & cls._owned)
        return None

    def t(self, role: str) -> TensorRef:
        return self.tensors[role]

    def has(self, role: str) -> bool:
        return role in self.tensors

    @property
    def rank(self) -> int | None:
        return None

    @property
    def out_dim(self) -> int | None:
        return None

    @property
    def in_dim(self) -> int | None:
        """Input features of the adapted weight (conv: in channels), when the factors tell."""
        return None

    @property
    def label(self) -> str:
        """The type as inspect reports it (a conv LoRA reports as locon)."""
        return self.kind

    def scale(self, alpha: float | None, rslora: bool = False) -> float:
        return 1.0

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def check(self) -> None:
        """Raise ShapeMismatch when the factors cannot belong together."""

    def delta(self, base=None):
        """Dense ΔW (float32 torch tensor, unscaled) — 2-D for linears, 4-D for convs when known."""
        raise NotImplementedError

    def _mismatch(self, what: str) -> ShapeMismatch:
        shapes = ", ".join(f"{r} {list(t.shape)}" for r, t in sorted(self.tensors.items()))
        return ShapeMismatch(f"{self.kind} factors do not fit together ({what}): {shapes}")


def registry() -> list[type[Adapter]]:
    """Adapter classes in detection order."""
    return list(_REGISTRY)


def f32(ref):
    """A factor as a float32 torch tensor."""
    return ref.torch().float()

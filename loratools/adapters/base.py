"""The adapter base class: each adapter type owns its key suffixes and roles and computes its own ΔW."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from loratools.errors import ShapeMismatch

if TYPE_CHECKING:  # pragma: no cover
    from loratools.model import TensorRef

_REGISTRY: list[type[Adapter]] = []

# Suffix spellings, for telling formats apart: kohya (lora_down/up, .alpha), peft (lora_A/B), lycoris (hada_, lokr_,
# oft_, glora, diff...), plain (weight/bias/scale, which only a few formats use as adapter tensors).
KOHYA, PEFT, LYCORIS, PLAIN = "kohya", "peft", "lycoris", "plain"

# Suffixes that modify whatever adapter a module has rather than being one: alpha and the DoRA magnitude.
MODIFIERS: dict[tuple[str, ...], tuple[str, str]] = {
    ("alpha",): ("alpha", KOHYA),
    ("dora_scale",): ("dora_scale", KOHYA),
    ("lora_magnitude_vector",): ("dora_scale", PEFT),
    ("lora_magnitude_vector", "weight"): ("dora_scale", PEFT),
}
MODIFIER_ROLES = frozenset(role for role, _ in MODIFIERS.values())
# Plain tensor suffixes, adapter tensors only inside some formats ((IA)³ weights, control-LoRA replacements).
PLAIN_SUFFIXES: dict[tuple[str, ...], tuple[str, str]] = {
    ("weight",): ("plain_weight", PLAIN), ("bias",): ("plain_bias", PLAIN), ("scale",): ("plain_scale", PLAIN),
}


class Adapter:
    """One adapter type. Subclasses declare their key suffixes, the roles that identify them and what they need.

    ``suffixes`` maps a key's last dot-separated parts to ``(role, spelling)``. ``detect`` lists alternative role
    sets; a module whose roles include every role of one set belongs to this adapter. ``optional`` roles are taken
    too when present. ``needs_base``: ΔW depends on the base weight (IA3, OFT, GLoRA...). ``exact_lora``: the
    module is a LoRA product as stored, so it converts between LoRA formats exactly.
    """

    kind: ClassVar[str]
    detect: ClassVar[tuple[frozenset[str], ...]]
    suffixes: ClassVar[dict[tuple[str, ...], tuple[str, str]]] = {}
    optional: ClassVar[frozenset[str]] = frozenset()
    needs_base: ClassVar[bool] = False
    exact_lora: ClassVar[bool] = False
    strength_inside: ClassVar[bool] = False  # delta() applies the strength itself (it is not a linear factor)
    lossy_name: ClassVar[str | None] = None  # becomes LoRA only through a dense, lossy SVD: the name users know

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
        """The roles this adapter takes from a module's keys, or None when they are not of this type."""
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

    @property
    def moves_weight(self) -> bool:
        """Whether the adapter changes its layer's weight (a stored bias difference alone does not)."""
        return True

    @property
    def is_vector(self) -> bool:
        """A delta with no matrix to factor (norm weights, a bias-only or 1-D diff): carried, never resized."""
        return False

    def plain_factors(self):
        """``(up, down)`` TensorRefs when ΔW is their flat product exactly as stored (read straight into a batch),
        else None."""
        return None

    def kron_factors(self):
        """``(w1, w2)``, 2-D float32, when ΔW = kron(w1, w2): its SVD then comes from the two factors'."""
        return None

    def check(self) -> None:
        """Raise ShapeMismatch when the factors cannot belong together."""

    def low_rank(self):
        """``(up, down)``, 2-D float32 with ΔW = up @ down (flattened), when the adapter is a low-rank product."""
        return None

    def singular_values(self):
        """The unscaled ΔW's singular values (float64, descending) when the adapter has them cheaper than from a
        dense ΔW (LoKr), else None: the caller decomposes ``low_rank()`` or ``delta()``."""
        return None

    def delta(self, base=None, alpha: float | None = None, strength: float = 1.0):
        """Dense ΔW (float32 torch tensor, unscaled) — 2-D for linears, 4-D for convs when known. ``alpha`` and
        ``strength`` matter only to adapters that use them inside (OFT's constraint; ``strength_inside``)."""
        raise NotImplementedError

    def _mismatch(self, what: str) -> ShapeMismatch:
        shapes = ", ".join(f"{r} {list(t.shape)}" for r, t in sorted(self.tensors.items()))
        return ShapeMismatch(f"{self.kind} factors do not fit together ({what}): {shapes}")


def registry() -> list[type[Adapter]]:
    """Adapter classes in detection order."""
    return list(_REGISTRY)


def suffix_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Every key suffix an adapter or modifier owns -> (role, spelling)."""
    table = dict(MODIFIERS)
    table.update(PLAIN_SUFFIXES)
    for cls in _REGISTRY:
        table.update(cls.suffixes)
    return table


def f32(ref):
    """A factor as a float32 torch tensor."""
    return ref.torch().float()

"""A naming format is one codec: its key prefixes (which component a key belongs to), the key spellings only it
has, how it recognises its own modules, and — for the formats loratools writes — how it writes a planned LoRA.

Adapter suffixes (``lora_down.weight``, ``hada_w1_a``...) belong to the adapter types (``loratools.adapters``);
a codec adds only what is its own: prefixes, and spellings no adapter owns (diffusers' legacy processor keys,
XLabs' ``qkv_lora1``, cloneofsimo's positional keys, PEFT's adapter-name infix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from loratools.families import Family
    from loratools.model import OutModule, TensorRef

_REGISTRY: list[Codec] = []


class KeyParts(NamedTuple):
    stem: str
    role: str
    spelling: str  # kohya | peft | legacy | lycoris | xlabs | cloneofsimo | plain
    adapter_name: str | None = None


class Stem:
    """The keys of one module stem (a plain slotted class: a file has thousands)."""

    __slots__ = ("component", "name", "naming", "roles", "keys", "spellings", "duplicates")

    def __init__(self, component: str, name: str, naming: str):
        self.component, self.name, self.naming = component, name, naming
        self.roles: dict[str, TensorRef] = {}
        self.keys: dict[str, str] = {}  # role -> key
        self.spellings: dict[str, int] = {}  # suffix spelling -> how many keys use it
        self.duplicates: list[str] = []

    @property
    def spelling(self) -> str:
        """The stem's most used suffix spelling (the first of the most used)."""
        return max(self.spellings, key=self.spellings.get) if self.spellings else "plain"

    @property
    def adapter_roles(self) -> set[str]:
        return {r for r in self.roles if not r.startswith("plain_") and r != "unknown"}

    @property
    def lycoris_algo(self) -> bool:
        """Whether the stem holds a LyCORIS algorithm's tensors (or a DoRA scale) rather than plain LoRA."""
        return "dora_scale" in self.roles or any(
            r.startswith(("hada_", "lokr_", "oft_", "glora_", "diff", "w_norm", "b_norm")) for r in self.roles)


class WriteOptions(NamedTuple):
    dtype: str | None = None  # storage dtype of written factors (None: each module's own)
    overwrite: bool = False
    sync: bool = False  # flush new files to disk before they are renamed into place
    uniform_alpha: bool = False  # kohya-style: one alpha for every module, each scale folded into lora_up
    finite: bool = False  # refuse NaN/Inf, testing each tensor as it is written (write_safetensors)


class Codec:
    """One naming format. Subclasses set ``id`` and their ``prefixes``; registration order is detection order."""

    id: ClassVar[str]
    prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()  # (key prefix, component: model | te1 | te2 | ...)
    flat: ClassVar[bool] = False  # module paths are flattened with '_' (kohya and its descendants)
    writable: ClassVar[bool] = False
    suffix: ClassVar[str] = ""  # what an output file name ends in (``x.kohya.safetensors``)
    module_metadata: ClassVar[bool] = False  # diffusers' lora_adapter_metadata, if present, names these modules

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "id" in cls.__dict__:
            _REGISTRY.append(cls())

    def parse(self, key: str, parts: list[str]) -> KeyParts | None:
        """A key in a spelling only this format has, or None."""
        return None

    def claims(self, stem: Stem) -> bool:
        """Whether a module stem is written in this format (one vote for it)."""
        return stem.naming == self.id

    def score(self, stems: list[Stem]) -> int:
        """How many of a file's adapter stems this format explains (the best score names the file's format)."""
        return sum(1 for st in stems if st.adapter_roles and self.claims(st))

    def stores_alpha(self, family: Family) -> bool:
        """Whether files of this format keep one ``.alpha`` per module for ``family`` (else scales are folded)."""
        return False

    def model_naming(self, family: Family) -> str:
        """The naming (native or diffusers) this format writes the diffusion model in."""
        raise NotImplementedError

    def stem(self, om: OutModule, family: Family) -> str:
        """The key stem (or, for folder formats, the file and stem) a written module gets."""
        raise NotImplementedError

    def write(self, mods: list[OutModule], family: Family, dest: Path, metadata: dict,
              options: WriteOptions) -> list[Path]:
        raise NotImplementedError


def codecs() -> list[Codec]:
    """Every registered codec, in detection order (``loratools.formats`` imports, and so registers, them all)."""
    return list(_REGISTRY)


def get_codec(fid: str) -> Codec:
    for c in codecs():
        if c.id == fid:
            return c
    raise KeyError(fid)


def targets() -> tuple[str, ...]:
    """The formats loratools writes."""
    return tuple(c.id for c in codecs() if c.writable)

"""Format codecs: reading any supported naming scheme into canonical modules.

Formats differ in two things only: how a key's suffix spells the tensor's role (``keys.parse_key``)
and how its prefix names the component (``keys.split_stem``). Reading groups keys by stem, lets each
adapter class claim its roles, and reports every key nobody claimed.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from loratools.adapters import MODIFIER_ROLES, Replace, registry
from loratools.errors import FormatError
from loratools.formats.keys import parse_key, split_stem
from loratools.formats.peft_config import AdapterConfig
from loratools.model import Module, TensorRef

FORMAT_IDS = ("kohya", "diffusers", "diffusers_legacy", "peft", "comfy", "lycoris", "xlabs", "bfl_control",
              "onetrainer", "cloneofsimo")
_EMBEDDING_PREFIXES = ("bundle_emb.",)
_MALFORMED_SUFFIX = re.compile(r"_lora_(down|up)\.weight$|_lora_[AB]\.weight$")


@dataclass
class ReadResult:
    format: str
    modules: list[Module]
    unknown_keys: list[str] = field(default_factory=list)
    extras: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # the file contradicts itself (config vs tensors)


class _Stem:
    """The keys of one module stem (a plain class: a file has thousands, and a dataclass with default
    factories costs several times more to make)."""

    __slots__ = ("component", "name", "naming", "roles", "keys", "spellings", "duplicates")

    def __init__(self, component: str, name: str, naming: str):
        self.component, self.name, self.naming = component, name, naming
        self.roles: dict[str, TensorRef] = {}
        self.keys: dict[str, str] = {}  # role -> key
        self.spellings: dict[str, int] = {}  # suffix spelling -> how many keys use it
        self.duplicates: list[str] = []


def read_modules(tensors: dict[str, TensorRef], metadata: dict[str, str], path: str,
                 config: AdapterConfig | None = None) -> ReadResult:
    """Turn a file's tensors into canonical modules; raise FormatError if none is an adapter."""
    stems: dict[str, _Stem] = {}
    extras: dict[str, list[str]] = defaultdict(list)
    embeds = {k for k, v in metadata.items() if v == "<embed>"}  # cloneofsimo PTI tokens
    for key, ref in tensors.items():
        if key.startswith(_EMBEDDING_PREFIXES) or key in embeds:
            extras["embeddings"].append(key)
            continue
        kp = parse_key(key)
        st = stems.get(kp.stem)
        if st is None:
            sp = split_stem(kp.stem)
            st = stems[kp.stem] = _Stem(sp.component, sp.name, sp.naming)
        if kp.role in st.roles:
            st.duplicates.append(key)
            continue
        st.roles[kp.role] = ref
        st.keys[kp.role] = key
        st.spellings[kp.spelling] = st.spellings.get(kp.spelling, 0) + 1

    fmt = _decide_format(stems)
    config = config or AdapterConfig.from_metadata(metadata)
    result = ReadResult(fmt, [], extras=dict(extras))
    for st in stems.values():
        _read_stem(st, fmt, config, result)
    if not result.modules:
        raise FormatError(_not_a_lora(tensors), path)
    _check_mixture(stems, result)
    return result


def _read_stem(st: _Stem, fmt: str, config: AdapterConfig | None, result: ReadResult) -> None:
    roles = set(st.roles)
    for key in st.duplicates:
        result.warnings.append(f"duplicate key for the same tensor role, ignored: {key}")
        result.unknown_keys.append(key)
    for cls in registry():
        if cls is Replace and fmt != "bfl_control":
            continue  # plain weights are only replacements inside a control LoRA
        owned = cls.claim(roles)
        if owned is None:
            continue
        adapter = cls({r: st.roles[r] for r in owned})
        taken = set(owned) | (roles & MODIFIER_ROLES)
        alpha = st.roles.get("alpha")
        module = Module(
            name=st.name, component=st.component, adapter=adapter,
            alpha=None if alpha is None else alpha.scalar(), alpha_ref=alpha,
            magnitude=st.roles.get("dora_scale"),
            keys=sorted(st.keys[r] for r in taken),
        )
        if config is not None and adapter.kind == "lora":
            config.apply(module, st, result.conflicts)
        try:
            adapter.check()
        except Exception as exc:  # a ShapeMismatch: keep the module out, say why
            result.warnings.append(f"{st.name}: {exc}")
            result.unknown_keys.extend(module.keys)
            return
        result.modules.append(module)
        result.unknown_keys.extend(st.keys[r] for r in roles - taken)
        return
    result.unknown_keys.extend(st.keys.values())


def _decide_format(stems: dict[str, _Stem]) -> str:
    """The format most adapter stems are written in (special formats by their signature)."""
    votes: Counter = Counter()
    plain_full = 0
    for st in stems.values():
        adapter_roles = {r for r in st.roles if not r.startswith("plain_") and r != "unknown"}
        if not adapter_roles:
            plain_full += 1
            continue
        votes[_stem_format(st, adapter_roles)] += 1
    if not votes:
        return "unknown"
    fmt = votes.most_common(1)[0][0]
    if "onetrainer" in votes and set(votes) <= {"onetrainer", "kohya", "lycoris"}:
        fmt = "onetrainer"  # OneTrainer writes its text encoders with kohya's lora_te1_/lora_te2_
    if fmt in ("diffusers", "plain") and plain_full and any(
            "double_blocks" in s.name and "lora_up_bias" in s.roles for s in stems.values()):
        return "bfl_control"
    return "diffusers" if fmt == "plain" else fmt


def _stem_format(st: _Stem, roles: set[str]) -> str:
    spelling = max(st.spellings, key=st.spellings.get) if st.spellings else "plain"  # the first of the most used
    if spelling in ("xlabs", "cloneofsimo"):
        return spelling
    lycoris_algo = any(r.startswith(("hada_", "lokr_", "oft_", "glora_", "diff", "w_norm", "b_norm"))
                       for r in roles) or "dora_scale" in roles
    if st.naming == "kohya":
        return "lycoris" if lycoris_algo else "kohya"
    if st.naming in ("lycoris", "onetrainer", "peft", "comfy"):
        return st.naming
    if spelling == "legacy":
        return "diffusers_legacy"
    return "diffusers" if st.naming == "diffusers" else "plain"


def _check_mixture(stems: dict[str, _Stem], result: ReadResult) -> None:
    # kohya and OneTrainer are both flattened namings; OneTrainer files use both prefixes.
    namings = Counter("kohya" if st.naming == "onetrainer" else st.naming
                      for st in stems.values() if st.naming != "plain" and st.spellings)
    if len(namings) > 1:
        parts = ", ".join(f"{n} {c}" for n, c in namings.most_common())
        result.warnings.append(f"keys mix naming schemes ({parts})")
    mixed = [st.name for st in stems.values() if st.naming == "kohya" and "." in st.name]
    if mixed:
        result.warnings.append(
            f"{len(mixed)} kohya keys mix '_' and '.' in the module path (e.g. lora_unet_{mixed[0]})")


def _not_a_lora(tensors: dict[str, TensorRef]) -> str:
    keys = list(tensors)
    if not keys:
        return "not a LoRA: the file holds no tensors"
    broken = [k for k in keys if _MALFORMED_SUFFIX.search(k)]
    if broken:
        hint = ""
        if any(k.startswith("lora_unet_unet_") for k in broken):
            hint = " and 'lora_unet_unet_' doubles the component prefix"
        return (f"not a loadable LoRA: {len(broken)} of {len(keys)} keys end in '_lora_down.weight'/"
                f"'_lora_up.weight' (suffix joined with '_' instead of '.'){hint}; this looks like a "
                f"broken conversion (e.g. {broken[0]})")
    return (f"not a LoRA: none of its {len(keys)} tensors has an adapter suffix (lora_down/lora_A/"
            f"hada_/lokr_/diff...); it looks like a full model or another kind of network (e.g. {keys[0]})")

"""Format codecs: reading any supported naming scheme into canonical modules, and writing the writable ones.

Reading groups a file's keys by module stem (``keys.parse_key``: the adapters' suffixes and the codecs' own
spellings; ``keys.split_stem``: the codecs' prefixes), lets each adapter type claim its roles, names the file's
format by the codec that explains most of its modules, and reports every key nobody claimed. The grouping and the
format depend on the key names alone and are remembered per list of keys (files of one trainer configuration
share it); the tensors are bound to the stems afresh for every file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from loratools.adapters import MODIFIER_ROLES, Replace, registry
from loratools.errors import FormatError, ShapeMismatch, UsageError
from loratools.formats import special, kohya, diffusers  # noqa: F401  (registration order is detection order)
from loratools.formats.codec import Codec, Stem, WriteOptions, codecs, get_codec, targets
from loratools.formats.keys import parse_key, split_stem
from loratools.formats.peft_config import AdapterConfig
from loratools.model import Module, TensorRef

__all__ = ["FORMAT_IDS", "TARGETS", "Codec", "ReadResult", "WriteOptions", "codec_for", "read_modules", "targets"]

FORMAT_IDS = tuple(c.id for c in codecs())
TARGETS = targets()
_EMBEDDING_PREFIXES = ("bundle_emb.",)
_MALFORMED_SUFFIX = re.compile(r"_lora_(down|up)\.weight$|_lora_[AB]\.weight$")
# How many key layouts are remembered: a collection holds few distinct ones.
REMEMBERED = 32


def codec_for(fmt: str) -> Codec:
    """The codec that writes ``fmt``; UsageError for a format loratools does not write."""
    try:
        codec = get_codec(fmt)
    except KeyError:
        codec = None
    if codec is None or not codec.writable:
        raise UsageError(f"unknown target format '{fmt}' (choose from {', '.join(TARGETS)})")
    return codec


@dataclass
class ReadResult:
    format: str
    modules: list[Module]
    unknown_keys: list[str] = field(default_factory=list)
    extras: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # the file contradicts itself (config vs tensors)
    rejected: list[str] = field(default_factory=list)  # modules whose tensors do not fit together


class _Layout(NamedTuple):
    """What a file's key names alone say: its format, its module stems (component, name, naming, (role, key)
    pairs, suffix spellings, duplicate keys) and its embedding keys."""

    format: str
    stems: tuple[tuple[str, str, str, tuple, tuple, tuple], ...]
    embeddings: tuple[str, ...]


@lru_cache(maxsize=REMEMBERED)
def _layout(keys: tuple[str, ...], embeds: frozenset[str]) -> _Layout:
    """Grouping and format detection, from the key names alone (the stems' roles hold keys, not tensors): files of
    one trainer configuration share them."""
    stems: dict[str, Stem] = {}
    embeddings = []
    for key in keys:
        if key.startswith(_EMBEDDING_PREFIXES) or key in embeds:
            embeddings.append(key)
            continue
        kp = parse_key(key)
        st = stems.get(kp.stem)
        if st is None:
            sp = split_stem(kp.stem)
            st = stems[kp.stem] = Stem(sp.component, sp.name, sp.naming)
        if kp.role in st.roles:
            st.duplicates.append(key)
            continue
        st.roles[kp.role] = key
        st.spellings[kp.spelling] = st.spellings.get(kp.spelling, 0) + 1
    fmt = decide_format(list(stems.values()))
    return _Layout(fmt, tuple((st.component, st.name, st.naming, tuple(st.roles.items()), tuple(st.spellings.items()),
                               tuple(st.duplicates)) for st in stems.values()), tuple(embeddings))


def read_modules(tensors: dict[str, TensorRef], metadata: dict[str, str], path: str,
                 config: AdapterConfig | None = None) -> ReadResult:
    """Turn a file's tensors into canonical modules; raise FormatError if none is an adapter."""
    embeds = frozenset(k for k, v in metadata.items() if v == "<embed>")  # cloneofsimo PTI tokens
    layout = _layout(tuple(tensors), embeds)
    fmt = layout.format
    if config is None and any(c.id == fmt and c.module_metadata for c in codecs()):
        config = AdapterConfig.from_metadata(metadata)
    stems = []
    for component, name, naming, roles, spellings, duplicates in layout.stems:
        st = Stem(component, name, naming)
        stems.append(st)
        st.keys = dict(roles)
        st.roles = {role: tensors[key] for role, key in roles}
        st.spellings = dict(spellings)
        st.duplicates = list(duplicates)
    result = ReadResult(fmt, [], extras={"embeddings": list(layout.embeddings)} if layout.embeddings else {})
    for st in stems:
        _read_stem(st, fmt, config, result)
    if not result.modules:
        raise FormatError(_not_a_lora(tensors, result.rejected), path)
    _check_mixture(stems, result)
    return result


def decide_format(stems: list[Stem]) -> str:
    """The codec that explains most of the file's adapter stems (the first registered on a tie)."""
    best, best_score = "unknown", 0
    for codec in codecs():
        score = codec.score(stems)
        if score > best_score:
            best, best_score = codec.id, score
    return best


def _read_stem(st: Stem, fmt: str, config: AdapterConfig | None, result: ReadResult) -> None:
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
        if alpha is not None and alpha.numel != 1:
            raise FormatError(f"module {st.name}: its alpha holds {alpha.numel} values (shape "
                              f"{list(alpha.shape)}); an alpha is one number")
        module = Module(
            name=st.name, component=st.component, adapter=adapter,
            alpha=None if alpha is None else alpha.scalar(), alpha_ref=alpha,
            magnitude=st.roles.get("dora_scale"),
            keys=sorted(st.keys[r] for r in taken),
        )
        if config is not None and adapter.exact_lora:
            config.apply(module, st, result.conflicts)
        try:
            adapter.check()
        except ShapeMismatch as exc:  # keep the module out, say why
            result.warnings.append(f"{st.name}: {exc}")
            result.rejected.append(f"{st.name}: {exc}")
            result.unknown_keys.extend(module.keys)
            return
        result.modules.append(module)
        result.unknown_keys.extend(st.keys[r] for r in roles - taken)
        return
    result.unknown_keys.extend(st.keys.values())


def _check_mixture(stems: list[Stem], result: ReadResult) -> None:
    # kohya and OneTrainer are both flattened namings; OneTrainer files use both prefixes.
    namings = Counter("kohya" if st.naming == "onetrainer" else st.naming
                      for st in stems if st.naming != "plain" and st.spellings)
    if len(namings) > 1:
        parts = ", ".join(f"{n} {c}" for n, c in namings.most_common())
        result.warnings.append(f"keys mix naming schemes ({parts})")
    mixed = [st.name for st in stems if st.naming == "kohya" and "." in st.name]
    if mixed:
        result.warnings.append(
            f"{len(mixed)} kohya keys mix '_' and '.' in the module path (e.g. lora_unet_{mixed[0]})")


def _not_a_lora(tensors: dict[str, TensorRef], rejected: list[str]) -> str:
    keys = list(tensors)
    if not keys:
        return "not a LoRA: the file holds no tensors"
    if rejected:
        more = f" (and {len(rejected) - 1} more modules)" if len(rejected) > 1 else ""
        return f"no usable module: {rejected[0]}{more}"
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

"""Alpha, rank and rsLoRA from a PEFT `adapter_config.json` or diffusers' `lora_adapter_metadata`.

PEFT and diffusers files keep no `.alpha` tensors: the scale lives in a LoraConfig. diffusers packs one
config per component into the header, each key prefixed with the component (`transformer.r`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from loratools.errors import FormatError

FLOAT32_MAX = 3.4028234663852886e38  # alphas are written as float32 .alpha tensors
MAX_RANK = 1 << 20
# Pattern keys are regular expressions from the file: a backtracking one can take longer than the universe to
# match a 40-character name. Matching them all for one config may take this long, then the config is refused.
MATCH_BUDGET_S = 5.0

_COMPONENT_PREFIXES = {"model": ("unet", "transformer"), "te1": ("text_encoder",),
                       "te2": ("text_encoder_2",), "te3": ("text_encoder_3",)}


@dataclass
class LoraConfig:
    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    raw: dict = field(default_factory=dict)
    where: str = "adapter_config.json"
    _matching: float = 0.0  # seconds spent matching patterns so far

    @classmethod
    def from_dict(cls, d: dict, where: str = "adapter_config.json") -> LoraConfig:
        """The config's LoRA fields, checked as PEFT types them; FormatError (one line) on anything else."""
        check_config(d, where)
        return cls(r=d.get("r"), lora_alpha=d.get("lora_alpha"), rank_pattern=d.get("rank_pattern") or {},
                   alpha_pattern=d.get("alpha_pattern") or {}, use_rslora=bool(d.get("use_rslora")),
                   use_dora=bool(d.get("use_dora")), raw=d, where=where)

    def rank_for(self, name: str) -> int | None:
        return self._pattern_value("rank_pattern", self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float | None:
        return self._pattern_value("alpha_pattern", self.alpha_pattern, name, self.lora_alpha)

    def _pattern_value(self, field_name: str, patterns: dict, name: str, default):
        """PEFT's rule: the first pattern matching the end of the module path wins; '^' anchors it. Matched
        within the config's time budget (``MATCH_BUDGET_S``); a pattern that exhausts it is a one-line error."""
        for pattern in patterns:
            left = MATCH_BUDGET_S - self._matching
            start = time.perf_counter()
            try:
                hit = _matches(pattern, name, max(left, 1e-3))
            except TimeoutError:
                raise FormatError(f"{self.where}: {field_name}[{json.dumps(pattern)[:60]}] takes too long to "
                                  "match (a regular expression that backtracks without end)") from None
            finally:
                self._matching += time.perf_counter() - start
            if hit:
                return patterns[pattern]
        return default


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rank_problem(v) -> str | None:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_RANK:
        return f"must be an integer from 1 to {MAX_RANK}, not {json.dumps(v)[:40]}"
    return None


def _alpha_problem(v) -> str | None:
    if not _is_number(v):
        return f"must be a number, not {json.dumps(v)[:40]}"
    try:
        finite = math.isfinite(v) and abs(float(v)) <= FLOAT32_MAX
    except OverflowError:  # an integer beyond float64 (JSON integers have no size limit)
        finite = False
    if not finite:
        return f"must be a finite number within float32's range, not {str(v)[:40]}"
    return None


def check_config(d: dict, where: str) -> None:
    """The fields loratools reads, typed as PEFT's LoraConfig types them (r and patterns ints, alphas finite
    numbers, patterns maps of strings, flags booleans, target_modules a string or a list of strings)."""
    def fail(field_name: str, problem: str):
        raise FormatError(f"{where}: {field_name} {problem}")

    if d.get("r") is not None and (p := _rank_problem(d["r"])):
        fail("r", p)
    if d.get("lora_alpha") is not None and (p := _alpha_problem(d["lora_alpha"])):
        fail("lora_alpha", p)
    for name, problem in (("rank_pattern", _rank_problem), ("alpha_pattern", _alpha_problem)):
        patterns = d.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            fail(name, f"must map module patterns to values, not a {type(patterns).__name__}")
        for key, value in patterns.items():
            if (p := problem(value)) is not None:
                fail(f"{name}[{json.dumps(key)[:60]}]", p)
    for flag in ("use_rslora", "use_dora"):
        if d.get(flag) is not None and not isinstance(d[flag], bool):
            fail(flag, f"must be true or false, not {json.dumps(d[flag])[:40]}")
    targets = d.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        fail("target_modules", "must be a string or a list of strings")


def _matches(pattern: str, name: str, timeout: float) -> bool:
    r"""Whether ``pattern`` names module ``name`` as PEFT matches it (``re.match(rf"(.*\.)?({pattern})$")``;
    ``^`` anchors at the start); an invalid expression names only itself. Through the ``regex`` package, whose
    matches take a timeout (``re``'s cannot be stopped): TimeoutError when it runs out."""
    import regex

    try:
        if pattern.startswith("^"):
            return regex.fullmatch(pattern[1:], name, timeout=timeout) is not None
        return regex.match(rf"(.*\.)?({pattern})$", name, timeout=timeout) is not None
    except regex.error:
        return pattern == name


@dataclass
class AdapterConfig:
    """Configs by component prefix (None: applies to every component)."""

    configs: dict[str | None, LoraConfig]
    origin: str  # "adapter_config.json" or "lora_adapter_metadata"

    @classmethod
    def from_peft(cls, d: dict) -> AdapterConfig:
        return cls({None: LoraConfig.from_dict(d)}, "adapter_config.json")

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterConfig | None:
        text = metadata.get("lora_adapter_metadata")
        if not text:
            return None
        try:
            d = json.loads(text)
        except RecursionError:
            raise FormatError("lora_adapter_metadata is nested too deeply") from None
        except ValueError:
            return None
        if not isinstance(d, dict):
            return None
        grouped: dict[str | None, dict] = {}
        for key, value in d.items():
            head, _, rest = key.partition(".")
            if rest and head in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
                grouped.setdefault(head, {})[rest] = value
            else:
                grouped.setdefault(None, {})[key] = value
        return cls({k: LoraConfig.from_dict(v, "lora_adapter_metadata") for k, v in grouped.items()},
                   "lora_adapter_metadata")

    def for_component(self, component: str) -> LoraConfig | None:
        for prefix in _COMPONENT_PREFIXES.get(component, ()):
            if prefix in self.configs:
                return self.configs[prefix]
        return self.configs.get(None)

    def apply(self, module, stem, conflicts: list[str]) -> None:
        cfg = self.for_component(module.component)
        if cfg is None:
            return
        module.rslora = cfg.use_rslora
        if module.alpha is None:
            module.alpha = cfg.alpha_for(module.name)
        expected = cfg.rank_for(module.name)
        if expected is not None and module.rank is not None and expected != module.rank:
            conflicts.append(f"{module.name}: {self.origin} says rank {expected}, the tensors have rank "
                             f"{module.rank}")

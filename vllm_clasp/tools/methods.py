"""The benchmark's methods: named speculative configs compared against plain decoding.

Owns the built-in method table and parsing of `--methods` (built-in names or `name=JSON`),
`--sweep-skip` and other comma-separated integer flags. No vLLM, no engines.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

from vllm_clasp.tools.report import BASELINE

logger = logging.getLogger("vllm_clasp.tools.bench")

#: Built-in method names. `ngram` keeps vLLM's defaults (prompt_lookup_min = max = 5) except k;
#: `suffix` is vLLM's own suffix decoding with its defaults (arctic-inference, K = 24).
BUILTIN_METHODS: dict[str, dict | None] = {
    "plain": None,
    "clasp": {"method": "clasp"},
    # CLaSp's layer-skipped drafts alone (the paper's method), without copied drafts.
    "clasp-layers": {"method": "clasp", "clasp_copy_source": "none"},
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "suffix": {"method": "suffix"},
    # Every draft source off: vLLM's speculative path with zero draft tokens plus CLaSp's
    # bookkeeping, i.e. the floor of what a step costs when nothing is worth drafting.
    "clasp-off": {"method": "clasp", "clasp_copy_source": "none",
                  "clasp_max_model_draft_tokens": 0},
}


def unavailable(method: "Method") -> str | None:
    """Why a method cannot run on this machine (None: it can): vLLM's `suffix` method, or a
    CLaSp config asking for suffix copies, without arctic-inference."""
    from vllm_clasp.core.options import SUFFIX_INSTALL_HINT, suffix_library_available

    config = method.speculative_config or {}
    wants_suffix = (config.get("method") == "suffix"
                    or str(config.get("clasp_copy_source")).startswith("suffix"))
    if wants_suffix and not suffix_library_available():
        return f"arctic-inference is not installed ({SUFFIX_INSTALL_HINT})"
    return None


@dataclass(frozen=True)
class Method:
    name: str
    speculative_config: dict | None  # None: plain decoding


def parse_methods(spec: str, sweep_skip: Sequence[int] = ()) -> list[Method]:
    """`plain,clasp,ngram,name={"method": ...}` -> methods; plain is always first.

    A `name=JSON` entry may contain commas: entries are split on commas outside JSON braces.
    """
    methods: list[Method] = []
    for item in _split_top_level(spec):
        if "=" in item:
            name, _, raw = item.partition("=")
            name = name.strip()
            try:
                config = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"method {name!r}: invalid JSON {raw!r} ({e})") from None
            if not isinstance(config, dict) or not isinstance(config.get("method"), str):
                raise ValueError(f"method {name!r}: the JSON must be an object with a "
                                 f"\"method\" key, got {raw!r}")
        else:
            name = item
            if name not in BUILTIN_METHODS:
                raise ValueError(f"unknown method {name!r}: use one of "
                                 f"{', '.join(BUILTIN_METHODS)} or name=JSON")
            config = BUILTIN_METHODS[name]
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"bad method name {name!r}")
        methods.append(Method(name, None if config is None else dict(config)))
    for skip in sweep_skip:
        methods.append(Method(f"clasp-skip{skip}", {"method": "clasp", "clasp_skip_layers": skip}))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate method names: {', '.join(duplicates)}")
    if BASELINE not in names:
        logger.info("adding %s as the baseline", BASELINE)
        methods.insert(0, Method(BASELINE, None))
    methods.sort(key=lambda m: m.name != BASELINE)  # stable: plain first
    return methods


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in spec:
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    items.append("".join(current).strip())
    return [i for i in items if i]


def parse_int_list(text: str, flag: str, low: int = 0) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected a comma-separated list of integers, got {text!r}")
    if not values or any(v < low for v in values):
        raise ValueError(f"{flag}: expected integers >= {low}, got {text!r}")
    return values

"""Baseline methods of the paper's comparison, behind one protocol (`Method`, see base.py).

    Q          bare query, no system prompt                       1 target call per query
    Q+IF       system prompt listing the values with definitions   1
    URIAL      alignment system prompt + 3 in-context examples     1
    URIAL+Sum  URIAL plus a summary of the values                  1
    MP         persona who holds the values                        1
    Modular    one draft per value, then a merge                   K + 1
    OPRO       searched instruction (needs an optimizer and judge) 1, after its search
    GEPA       instruction searched by the `gepa` package           1, after its search (optional extra)
    Instruction(text)  any given system prompt (e.g. PICACO's)     1
"""

from __future__ import annotations

from picaco.baselines.bare import Bare
from picaco.baselines.gepa_baseline import Gepa, GepaParams, GepaResult
from picaco.baselines.base import Method, PromptMethod, fingerprint
from picaco.baselines.instruct import ValuesInstruction
from picaco.baselines.instruction import Instruction
from picaco.baselines.modular import Modular
from picaco.baselines.opro import Opro, OproParams, OproResult, budget_from_run
from picaco.baselines.persona import Persona
from picaco.baselines.urial import Urial, UrialSum
from picaco.errors import ConfigError

#: methods that need nothing but the target, by their report name
SIMPLE_METHODS = {
    "Q": Bare,
    "Q+IF": ValuesInstruction,
    "URIAL": Urial,
    "URIAL+Sum": UrialSum,
    "MP": Persona,
    "Modular": Modular,
}

_ALIASES = {
    "bare": "Q",
    "q_if": "Q+IF",
    "qif": "Q+IF",
    "q-if": "Q+IF",
    "urial_sum": "URIAL+Sum",
    "urial-sum": "URIAL+Sum",
    "persona": "MP",
    "modular_pluralism": "Modular",
    "modular-pluralism": "Modular",
}

#: methods that search for their prompt under a call budget (they need an optimizer and a judge)
SEARCH_METHODS = ("OPRO", "GEPA")

METHOD_NAMES = (*SIMPLE_METHODS, *SEARCH_METHODS)


def canonical_name(name: str) -> str:
    """The report name for a method name or alias, case-insensitively ('q+if' -> 'Q+IF')."""
    lowered = name.strip().lower()
    for known in METHOD_NAMES:
        if known.lower() == lowered:
            return known
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)} or a named instruction")


def make_simple(name: str) -> PromptMethod:
    """A method that needs only the target (everything but OPRO, GEPA and given instructions)."""
    canonical = canonical_name(name)
    if canonical not in SIMPLE_METHODS:
        raise ConfigError(f"{canonical} needs more than a name to build (use its class)")
    return SIMPLE_METHODS[canonical]()


def seedable_name(name: str) -> str:
    """The canonical name of a method whose whole prompt is one system prompt (`PromptMethod.seedable`),
    so that prompt can be an optimizer's starting instruction; anything else is a ConfigError."""
    canonical = canonical_name(name)
    method = SIMPLE_METHODS.get(canonical)
    if method is None or not method.seedable:
        usable = ", ".join(n for n, m in SIMPLE_METHODS.items() if m.seedable)
        raise ConfigError(f"{canonical} is not a single system prompt; use one of {usable}")
    return canonical


__all__ = [
    "Bare", "Gepa", "GepaParams", "GepaResult", "Instruction", "METHOD_NAMES", "Method", "Modular", "Opro",
    "OproParams", "OproResult", "Persona", "PromptMethod", "SEARCH_METHODS", "SIMPLE_METHODS", "Urial",
    "UrialSum", "ValuesInstruction", "budget_from_run", "canonical_name", "fingerprint", "make_simple", "seedable_name",
]

"""The machine a result was made on, for provenance.json and an evaluation's summary.json.

The embedded backend's sampled answers are the same on one machine and build, not across CPUs:
llama.cpp is compiled for the CPU it is built on and its float rounding moves near-tied tokens
(docs/RESULTS.md, "The scaling study with the Q+IF seed"). So a result names its machine; this is
provenance only, never part of a cache key or a run's fingerprint.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _static() -> dict:
    return {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": _version("llama_cpp_python")}


def machine_info() -> dict:
    """CPU model, architecture, cores, OS, Python and llama-cpp-python versions, and, when llama.cpp
    is loaded in this process, the CPU features it was built to use."""
    info = dict(_static())
    llama = sys.modules.get("llama_cpp")  # only when the embedded backend loaded it: no import here
    if llama is not None and hasattr(llama, "llama_print_system_info"):
        try:
            raw = llama.llama_print_system_info()
            info["llama_cpp_system"] = (raw.decode() if isinstance(raw, bytes) else str(raw)).strip()
        except Exception:  # a provenance detail must never fail a run
            pass
    return info


def describe_machine(info: dict | None) -> str:
    """One line for a report: "AMD EPYC 7B13 (x86_64, 2 cores); Linux-...; Python 3.11.9;
    llama-cpp-python 0.3.16"; "" without the information (results made before it was recorded)."""
    if not info:
        return ""
    cpu = f"{info.get('cpu', '?')} ({info.get('arch', '?')}, {info.get('cores', '?')} cores)"
    parts = [cpu, info.get("os"), f"Python {info['python']}" if info.get("python") else None,
             f"llama-cpp-python {info['llama_cpp_python']}" if info.get("llama_cpp_python") else None]
    return "; ".join(p for p in parts if p)


def same_build(a: dict | None, b: dict | None) -> bool:
    """Whether two machines give an embedded model the same sampled answers as far as we can tell:
    the same CPU model, architecture and llama-cpp-python version, and, where both recorded it, the
    instruction set llama.cpp was compiled for (one CPU gives other answers with a native build than
    with the AVX2 one `make install` makes). A missing record counts as same."""
    if not a or not b:
        return True
    fields = ("cpu", "arch", "llama_cpp_python")
    same_system = (not a.get("llama_cpp_system") or not b.get("llama_cpp_system")
                   or a["llama_cpp_system"] == b["llama_cpp_system"])
    return same_system and all(a.get(f) == b.get(f) for f in fields)


def mixed_machines_warning(machines: list[dict], what: str) -> str | None:
    """A warning when ``what`` (e.g. "the rows of this evaluation") was made on machines whose builds
    differ; None when they are one build."""
    distinct: list[dict] = []
    for m in machines:
        if m and not any(same_build(m, d) for d in distinct):
            distinct.append(m)
    if len(distinct) < 2:
        return None
    names = " and ".join(describe_machine(m) for m in distinct)
    return (f"{what} were made on {len(distinct)} different machines ({names}): an embedded model's "
            "sampled answers differ across CPUs and llama.cpp builds, so they are not one draw; "
            "rerun in a new directory on one machine to compare methods exactly")

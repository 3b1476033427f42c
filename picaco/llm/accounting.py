"""Per-role accounting of model calls, and the run budget that caps them.

Every request that reaches a backend (or is answered from the cache) is counted here under its role
(target, optimizer, judge, eval_judge, ...). The budget reserves a call and its worst-case tokens
*before* the call is made, so concurrent requests can never push a run past its caps.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from picaco.errors import BudgetExhausted


@dataclass
class RoleStats:
    calls: int = 0  # requests sent to the backend (cache misses)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time spent waiting on the backend
    retries: int = 0
    faults: Counter = field(default_factory=Counter)  # fault kind -> count (429, 5xx, timeout, ...)

    def to_json(self) -> dict:
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "retries": self.retries,
            "faults": dict(self.faults),
        }


# Faults met while serving one logical call. Backends are often shared between roles, so a backend-wide
# counter cannot say which role a fault belongs to; the client opens a sink around each call and the
# backend reports into whichever sink is open in its task (tasks inherit it from the caller).
_CALL_FAULTS: contextvars.ContextVar[Counter | None] = contextvars.ContextVar(
    "picaco_call_faults", default=None
)


def report_fault(kind: str, n: int = 1) -> None:
    """Count a fault kind (or ``"retries"``) against the call being served, if a client is counting."""
    sink = _CALL_FAULTS.get()
    if sink is not None:
        sink[kind] += n


@contextlib.contextmanager
def collect_faults() -> Iterator[Counter]:
    """Open a sink for the faults of one call; yields the Counter the backend reports into."""
    sink: Counter = Counter()
    token = _CALL_FAULTS.set(sink)
    try:
        yield sink
    finally:
        _CALL_FAULTS.reset(token)


class Budget:
    """Hard caps on backend calls and tokens for a whole run (all roles together). None = no cap."""

    def __init__(self, max_calls: int | None = None, max_tokens: int | None = None):
        self.max_calls = max_calls
        self.max_tokens = max_tokens
        self.calls = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if self.max_calls is not None and self.calls + 1 > self.max_calls:
                raise BudgetExhausted(f"call budget of {self.max_calls} calls is spent")
            if self.max_tokens is not None and self.tokens + tokens > self.max_tokens:
                raise BudgetExhausted(
                    f"token budget of {self.max_tokens} tokens would be exceeded "
                    f"({self.tokens} used, next call may take {tokens})"
                )
            self.calls += 1
            self.tokens += tokens

    def settle(self, reserved: int, actual: int) -> None:
        """Replace a reservation's worst case by what the call really used."""
        with self._lock:
            self.tokens += actual - reserved

    def release(self, reserved: int) -> None:
        """A reserved call failed before using anything."""
        with self._lock:
            self.calls -= 1
            self.tokens -= reserved

    def to_json(self) -> dict:
        return {"max_calls": self.max_calls, "max_tokens": self.max_tokens,
                "calls": self.calls, "tokens": self.tokens}


class Accounting:
    def __init__(self) -> None:
        self.roles: dict[str, RoleStats] = {}
        self._lock = threading.Lock()

    def role(self, name: str) -> RoleStats:
        with self._lock:
            return self.roles.setdefault(name, RoleStats())

    def record_call(self, role: str, *, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        with self._lock:
            s = self.roles.setdefault(role, RoleStats())
            s.calls += 1
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            s.seconds += seconds

    def record_hit(self, role: str) -> None:
        with self._lock:
            self.roles.setdefault(role, RoleStats()).cache_hits += 1

    def record_faults(self, role: str, faults: dict[str, int], retries: int) -> None:
        with self._lock:
            s = self.roles.setdefault(role, RoleStats())
            s.faults.update(faults)
            s.retries += retries

    def total(self) -> RoleStats:
        t = RoleStats()
        for s in self.roles.values():
            t.calls += s.calls
            t.cache_hits += s.cache_hits
            t.prompt_tokens += s.prompt_tokens
            t.completion_tokens += s.completion_tokens
            t.seconds += s.seconds
            t.retries += s.retries
            t.faults.update(s.faults)
        return t

    def to_json(self) -> dict:
        return {role: s.to_json() for role, s in sorted(self.roles.items())} | {
            "total": self.total().to_json()
        }

    def merge_json(self, data: dict) -> None:
        """Add counts saved by an earlier (interrupted) process of the same run."""
        self._add_json(data, 1)

    def since(self, before: dict) -> Accounting:
        """What was counted after `before` (an earlier `to_json()` of this accounting): the spend of
        one piece of work done on a client that is used for more than that work."""
        delta = Accounting()
        delta.merge_json(self.to_json())
        delta._add_json(before, -1)
        delta.roles = {name: r for name, r in delta.roles.items() if r.to_json() != RoleStats().to_json()}
        return delta

    def _add_json(self, data: dict, sign: int) -> None:
        for role, d in data.items():
            if role == "total":
                continue
            s = self.role(role)
            with self._lock:
                s.calls += sign * d.get("calls", 0)
                s.cache_hits += sign * d.get("cache_hits", 0)
                s.prompt_tokens += sign * d.get("prompt_tokens", 0)
                s.completion_tokens += sign * d.get("completion_tokens", 0)
                s.seconds += sign * d.get("seconds", 0.0)
                s.retries += sign * d.get("retries", 0)
                s.faults.update({k: sign * n for k, n in d.get("faults", {}).items()})
                s.faults = +s.faults  # drops the kinds that cancelled out

"""Several OpenAI-compatible endpoints serving the same model, used as one backend with failover.

A role whose config lists ``endpoints`` gets an :class:`EndpointPool`: one :class:`OpenAIBackend` per
base URL (same model, prompt template and likelihood mode; the role's key, or one per endpoint when
the endpoints belong to different providers or clusters). The pool

- sends each request to the healthy endpoint with the fewest requests in flight (ties go to the one
  picked least often, so equal endpoints take turns);
- keeps the role's overall cap: at most ``max_in_flight`` requests in flight over all endpoints;
- on a connection failure, timeout, 5xx or malformed answer retries the request at once on another
  endpoint it has not tried yet; after ``fail_threshold`` such failures in a row an endpoint is taken
  out for ``cooldown`` seconds, then one trial request is let through (success puts it back, failure
  doubles its cool-down up to ``cooldown_cap``);
- on a 429 keeps away from that endpoint until its ``Retry-After`` has passed, without counting it as
  unhealthy;
- waits (exponential backoff with full jitter, or the earliest ``Retry-After`` / cool-down) only when
  every endpoint has been tried in the current round; ``max_retries`` bounds these waits, so a
  request makes at most ``(max_retries + 1) x len(endpoints)`` attempts;
- fails with one :class:`BackendError` naming every endpoint and its last fault when none answers.

The pool's cache identity names the model and prompt template but no URL, so an answer is cached once
whichever endpoint served it, and a failover never pays for work twice. Errors that no other endpoint
would answer differently (other 4xx, an unsupported feature) are raised at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from picaco.errors import BackendError, ConfigError
from picaco.llm.accounting import report_fault
from picaco.llm.base import (
    Capabilities,
    CapabilityMissing,
    Completion,
    GenerateRequest,
    Likelihood,
    LikelihoodRequest,
    Message,
)
from picaco.llm.openai_backend import LikelihoodMode, OpenAIBackend

T = TypeVar("T")

#: fault kinds that say something about the endpoint itself (count towards taking it out)
_HEALTH_FAULTS = frozenset({"connection", "timeout", "server_error", "malformed"})
#: fault kinds after which a probe's "no" is not an answer about the feature
_TRANSIENT_FAULTS = _HEALTH_FAULTS | {"rate_limited", "request_timeout", "conflict"}


def _display_url(url: str) -> str:
    """The URL without any user:password part, for messages and reports."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass
class EndpointState:
    """Health and load of one endpoint, as the pool sees it."""

    url: str
    backend: OpenAIBackend
    in_flight: int = 0
    peak_in_flight: int = 0
    picks: int = 0  # attempts sent here
    served: int = 0  # attempts answered successfully
    failures: int = 0  # attempts that failed with a routable fault
    consecutive_failures: int = 0
    down_until: float | None = None  # None: healthy; else out until then, then one trial request
    trial_in_flight: bool = False
    cooldown: float = 0.0
    not_before: float = 0.0  # a 429's Retry-After: no request before this time
    times_down: int = 0
    last_fault: str = ""
    fault_kinds: Counter = field(default_factory=Counter)

    def available(self, now: float) -> bool:
        if now < self.not_before:
            return False
        if self.down_until is None:
            return True
        return now >= self.down_until and not self.trial_in_flight

    def report(self) -> dict:
        return {
            "url": _display_url(self.url),
            "healthy": self.down_until is None,
            "served": self.served,
            "failures": self.failures,
            "attempts": self.picks,
            "peak_in_flight": self.peak_in_flight,
            "times_down": self.times_down,
            "faults": dict(self.fault_kinds),
            "last_fault": self.last_fault,
        }


class EndpointPool:
    """A :class:`~picaco.llm.base.Backend` over several endpoints of one model, with failover."""

    kind = "openai"

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str,
        api_key: str | None = None,
        *,
        api_keys: Sequence[str | None] | None = None,
        max_in_flight: int = 16,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 120.0,
        fail_threshold: int = 3,
        cooldown: float = 5.0,
        cooldown_cap: float = 60.0,
        likelihood: LikelihoodMode = "auto",
        prompt_template: str | Callable[[Sequence[Message]], str] = "chatml",
        top_logprobs: bool = True,
        seeded: bool = False,
        default_headers: dict[str, str] | None = None,
    ):
        if api_keys is not None and len(api_keys) != len(base_urls):
            raise ConfigError(f"{len(api_keys)} API keys for {len(base_urls)} endpoints")
        keys = list(api_keys) if api_keys is not None else [api_key] * len(base_urls)
        # same URL twice is one endpoint, with the key given first
        key_of = dict(reversed([(u.rstrip("/"), k) for u, k in zip(base_urls, keys)]))
        urls = list(dict.fromkeys(u.rstrip("/") for u in base_urls))
        if not urls:
            raise ConfigError("an endpoint pool needs at least one base URL")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        if fail_threshold < 1:
            raise ConfigError("fail_threshold must be at least 1")
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.fail_threshold = fail_threshold
        self.base_cooldown = cooldown
        self.cooldown_cap = cooldown_cap
        self.endpoints = [
            EndpointState(
                url=u,
                backend=OpenAIBackend(
                    u, model, key_of[u],
                    max_in_flight=max_in_flight, timeout=timeout, max_retries=0,
                    backoff_base=backoff_base, backoff_cap=backoff_cap, retry_after_cap=retry_after_cap,
                    likelihood=likelihood, prompt_template=prompt_template, top_logprobs=top_logprobs,
                    seeded=seeded, default_headers=default_headers,
                ),  # one attempt per call: the pool does the retrying, across endpoints
                cooldown=cooldown,
            )
            for u in urls
        ]
        first = self.endpoints[0].backend
        self.capabilities: Capabilities = first.capabilities
        self._identity = {k: v for k, v in first.identity().items() if k != "base_url"}
        self._sem = asyncio.Semaphore(max_in_flight)
        self._probe_lock = asyncio.Lock()
        self._probed = likelihood != "auto"
        self._own_stats: Counter[str] = Counter()  # retries and failovers made by the pool
        self.in_flight = 0
        self.peak_in_flight = 0

    def __repr__(self) -> str:
        urls = ", ".join(_display_url(e.url) for e in self.endpoints)
        return f"EndpointPool([{urls}], model={self.model!r})"

    def identity(self) -> dict:
        # No URL: the same model answers the same way on every endpoint (see the module docstring).
        return dict(self._identity)

    @property
    def stats(self) -> Counter:
        """Fault kinds over all endpoints plus ``retries``; read by ``LLMClient.sync_faults``."""
        total = Counter(self._own_stats)
        total.pop("failovers", None)
        for e in self.endpoints:
            total.update(e.backend.stats)
        return total

    @property
    def reports_call_faults(self) -> bool:
        """True when the members count each call's faults for the calling role (see accounting)."""
        return all(getattr(e.backend, "reports_call_faults", False) for e in self.endpoints)

    @property
    def failovers(self) -> int:
        return self._own_stats["failovers"]

    def report(self) -> list[dict]:
        """Per endpoint: requests served, failures, whether it is in service now, last fault."""
        return [e.report() for e in self.endpoints]

    # -- routing -------------------------------------------------------------------------------

    def _pick(self, tried: set[int], now: float) -> EndpointState | None:
        candidates = [
            e for i, e in enumerate(self.endpoints) if i not in tried and e.available(now)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (e.in_flight, e.picks))

    def _next_opening(self, now: float) -> float:
        """Seconds until some endpoint can take a request again (0 if one can now)."""
        waits = []
        for e in self.endpoints:
            opening = max(e.not_before, e.down_until or 0.0)
            waits.append(max(0.0, opening - now))
        return min(waits)

    def _backoff(self, round_index: int) -> float:
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**round_index))

    def _record_success(self, e: EndpointState) -> None:
        e.served += 1
        e.consecutive_failures = 0
        if e.down_until is not None:  # the trial request worked: back in service
            e.down_until = None
        e.cooldown = self.base_cooldown

    def _record_failure(self, e: EndpointState, fault: Any, now: float, trial: bool) -> None:
        e.failures += 1
        e.fault_kinds[fault.kind] += 1
        status = f"HTTP {fault.status}" if fault.status else fault.kind
        e.last_fault = status + (f": {fault.detail}" if fault.detail else "")
        if fault.retry_after is not None:
            e.not_before = max(e.not_before, now + min(fault.retry_after, self.retry_after_cap))
        if fault.kind not in _HEALTH_FAULTS:
            return
        e.consecutive_failures += 1
        if trial:  # the trial after a cool-down failed: out again, for longer
            e.cooldown = min(self.cooldown_cap, e.cooldown * 2)
            e.down_until = now + e.cooldown
        elif e.down_until is None and e.consecutive_failures >= self.fail_threshold:
            e.down_until = now + e.cooldown
            e.times_down += 1

    def _record_unreachable(self, e: EndpointState, faults: Counter) -> None:
        """A probe (which retries by itself) could not reach the endpoint: one failure in a row."""
        e.failures += 1
        e.fault_kinds.update(faults)
        e.last_fault = "unreachable during the likelihood probe (" + ", ".join(sorted(faults)) + ")"
        e.consecutive_failures += 1
        if e.down_until is None and e.consecutive_failures >= self.fail_threshold:
            e.down_until = time.monotonic() + e.cooldown
            e.times_down += 1

    async def _attempt(self, e: EndpointState, send: Callable[[OpenAIBackend], Awaitable[T]], trial: bool) -> T:
        e.in_flight += 1
        e.picks += 1
        e.peak_in_flight = max(e.peak_in_flight, e.in_flight)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if trial:
            e.trial_in_flight = True
        try:
            return await send(e.backend)
        finally:
            e.in_flight -= 1
            self.in_flight -= 1
            if trial:
                e.trial_in_flight = False

    async def _dispatch(self, what: str, send: Callable[[OpenAIBackend], Awaitable[T]]) -> T:
        """Run ``send`` on some endpoint, failing over and backing off as the module docstring says."""
        attempts = 0
        for round_index in range(self.max_retries + 1):
            tried: set[int] = set()
            while True:
                async with self._sem:
                    e = self._pick(tried, time.monotonic())
                    if e is None:
                        break
                    if tried:  # another endpoint failed this request in this round
                        self._own_stats["failovers"] += 1
                    tried.add(self.endpoints.index(e))
                    trial = e.down_until is not None
                    attempts += 1
                    if attempts > 1:
                        self._own_stats["retries"] += 1
                        report_fault("retries")  # the members report their own fault kinds
                    try:
                        result = await self._attempt(e, send, trial)
                    except BackendError as exc:
                        fault = getattr(exc, "fault", None)  # OpenAIBackend._error attaches it
                        if fault is None or not fault.retryable:
                            raise  # e.g. a 400, or a feature this model lacks: same on every endpoint
                        self._record_failure(e, fault, time.monotonic(), trial)
                        continue
                self._record_success(e)
                return result
            if round_index == self.max_retries:
                break
            # every endpoint was tried, is out, or asked us to wait: sleep without holding a slot
            opening = min(self._next_opening(time.monotonic()), self.retry_after_cap)
            await asyncio.sleep(max(opening * random.uniform(1.0, 1.1), self._backoff(round_index)))
        raise self._exhausted(what, attempts)

    def _exhausted(self, what: str, attempts: int) -> BackendError:
        now = time.monotonic()
        parts = []
        for e in self.endpoints:
            state = "in service" if e.down_until is None else f"out for {max(0.0, e.down_until - now):.0f}s more"
            parts.append(f"{_display_url(e.url)} ({state}; last fault: {e.last_fault or 'none'})")
        return BackendError(
            f"{what} failed on every endpoint of model {self.model} after {attempts} attempts: "
            + "; ".join(parts)
        )

    # -- the Backend protocol ------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Completion:
        return await self._dispatch("chat completion", lambda b: b.generate(request))

    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        if not self._probed:
            await self.probe()
        if not self.capabilities.continuation_logprobs:
            raise CapabilityMissing(
                f"the endpoints of {self.model} cannot score a given response: "
                + "; ".join(self.capabilities.notes)
            )

        async def score(r: LikelihoodRequest) -> Likelihood:
            if not r.response:
                return Likelihood(token_logprobs=())
            return (await self._dispatch("log-likelihood", lambda b: b.loglikelihood([r])))[0]

        return list(await asyncio.gather(*(score(r) for r in requests)))

    async def probe(self) -> Capabilities:
        """Find the likelihood mode on the first endpoint that answers; every endpoint then uses it.

        An endpoint that cannot be reached during the probe is skipped (and counted as a failure);
        the first one that answers decides, because all of them serve the same model.
        """
        async with self._probe_lock:
            if self._probed:
                return self.capabilities
            notes: list[str] = []
            for e in sorted(self.endpoints, key=lambda e: e.down_until is not None):
                before = Counter(e.backend.stats)
                caps = await e.backend.probe()
                transport_faults = Counter(e.backend.stats) - before
                if caps.continuation_logprobs:
                    self._adopt(e.backend.likelihood_mode, caps)
                    return self.capabilities
                if not any(k in _TRANSIENT_FAULTS for k in transport_faults):
                    # the endpoint answered, and said no: the model's servers lack the feature
                    self.capabilities = caps
                    self._probed = True
                    return self.capabilities
                self._record_unreachable(e, transport_faults)
                notes.append(f"{_display_url(e.url)}: " + "; ".join(caps.notes))
            # nobody answered: report it, and let a later call probe again
            self.capabilities = dataclasses.replace(
                self.capabilities, continuation_logprobs=False,
                notes=("no endpoint answered the likelihood probe: " + " | ".join(notes),),
            )
            return self.capabilities

    def _adopt(self, mode: str, caps: Capabilities) -> None:
        # Setting a concrete mode makes each member skip its own probe on first use.
        for e in self.endpoints:
            e.backend.likelihood_mode = mode  # type: ignore[assignment]
            e.backend.capabilities = dataclasses.replace(e.backend.capabilities, continuation_logprobs=True, notes=())
        self.capabilities = caps
        self._probed = True

    async def aclose(self) -> None:
        await asyncio.gather(*(e.backend.aclose() for e in self.endpoints))

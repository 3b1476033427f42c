"""A role's view of a backend: caching, accounting, budget, concurrency and capability checks.

Everything above this layer (judges, optimizer, baselines, evaluation) talks to an `LLMClient`, never
to a backend directly, so caching and counting cannot be forgotten and work the same for every backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from picaco.llm.accounting import Accounting, Budget, collect_faults
from picaco.llm.base import (
    Backend,
    CapabilityMissing,
    Completion,
    GenerateRequest,
    Likelihood,
    LikelihoodRequest,
    Message,
    frame,
    frame_chars,
    turns_as_pairs,
)
from picaco.llm.cache import CallCache, cache_key

_CAPABILITY_TEXT = {
    "generate": "chat generation",
    "top_logprobs": "next-token top log-probabilities",
    "continuation_logprobs": "the log-likelihood of a given response",
    "seeded": "seeded sampling",
}


class LLMClient:
    def __init__(
        self,
        role: str,
        backend: Backend,
        *,
        cache: CallCache | None = None,
        accounting: Accounting | None = None,
        budget: Budget | None = None,
        max_concurrency: int = 64,
        system_template: str | None = None,
        prior_turns: tuple[Message, ...] = (),
    ):
        self.role = role
        self.backend = backend
        #: a fixed system prompt around the instruction (`system_template` in a config); every
        #: request of this role is sent framed by it, so the cache keys the framed text
        self.system_template = system_template
        #: fixed example exchanges (`prior_turns` in a config) every request of this role is sent
        #: with, after the system message; the cache keys them too
        self.prior_turns = tuple(prior_turns)
        self.cache = cache
        self.accounting = accounting if accounting is not None else Accounting()
        self.budget = budget
        self._sem = asyncio.Semaphore(max_concurrency)
        self._faults_seen: Counter = Counter()
        self._retries_seen = 0
        self._probed = False

    # -- capabilities -------------------------------------------------------------------------
    async def probe(self) -> None:
        """Let a backend find out what its server can do (once); call before reading `has()`."""
        probe = getattr(self.backend, "probe", None)
        if probe is not None and not self._probed:
            answered_before = _answered(self.backend)
            t0 = time.perf_counter()
            with collect_faults() as faults:
                try:
                    await probe()
                finally:
                    self._record_faults(faults)
                    # the probe's requests are paid for like any other: count them as calls
                    answered = _answered(self.backend) - answered_before
                    for _ in range(answered):
                        self.accounting.record_call(self.role, prompt_tokens=0, completion_tokens=0,
                                                    seconds=(time.perf_counter() - t0) / answered)
        self._probed = True

    def identity(self) -> dict:
        """The backend's identity, plus the system template and prior turns when there are some (so a
        run or an evaluation made in another deployment does not resume from this one's records)."""
        ident = dict(self.backend.identity())
        if self.system_template:
            ident["system_template"] = self.system_template
        if self.prior_turns:
            ident["prior_turns"] = turns_as_pairs(self.prior_turns)
        return ident

    @property
    def frames(self) -> bool:
        """Whether requests are sent inside a fixed deployment (a system template, prior turns)."""
        return bool(self.system_template or self.prior_turns)

    @property
    def frame_chars(self) -> int:
        """Characters the deployment frame adds to every request (the template's text and the
        prior turns), for the pre-flight token estimate."""
        return frame_chars(self.system_template, self.prior_turns)

    def _framed(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        return frame(messages, self.system_template, self.prior_turns) if self.frames else messages

    def has(self, capability: str) -> bool:
        return bool(getattr(self.backend.capabilities, capability))

    def require(self, capability: str) -> None:
        if not self.has(capability):
            notes = "; ".join(self.backend.capabilities.notes)
            raise CapabilityMissing(
                f"the {self.role} model ({self.backend.kind}:{self.backend.model}) cannot provide "
                f"{_CAPABILITY_TEXT.get(capability, capability)}" + (f": {notes}" if notes else "")
            )

    # -- generation ---------------------------------------------------------------------------
    async def generate(
        self,
        messages: tuple[Message, ...],
        *,
        n: int = 1,
        temperature: float = 0.7,
        max_tokens: int = 256,
        top_p: float = 1.0,
        seed: int | None = 0,
        stop: tuple[str, ...] = (),
        top_logprobs: int = 0,
    ) -> list[Completion]:
        """n samples; sample i uses seed + i and is cached under its own key."""
        if top_logprobs:
            self.require("top_logprobs")
        requests = [
            GenerateRequest(
                messages=tuple(messages),
                temperature=temperature,
                max_tokens=max_tokens,
                top_p=top_p,
                seed=None if seed is None else seed + i,
                sample_index=i,
                stop=tuple(stop),
                top_logprobs=top_logprobs,
            )
            for i in range(n)
        ]
        return list(await asyncio.gather(*(self.generate_one(r) for r in requests)))

    async def generate_one(self, request: GenerateRequest) -> Completion:
        if self.frames:
            request = dataclasses.replace(request, messages=self._framed(request.messages))
        key = cache_key(self.backend.identity(), "generate", request.key_payload())
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.accounting.record_hit(self.role)
            return Completion.from_json(hit)
        reserved = self._reserve(request.max_tokens + _rough_tokens(request.messages))
        async with self._sem:
            t0 = time.perf_counter()
            with collect_faults() as faults:
                try:
                    out = await self.backend.generate(request)
                except BaseException:
                    self._release(reserved)
                    raise
                finally:
                    self._record_faults(faults)
            elapsed = time.perf_counter() - t0
        self._settle(reserved, out.prompt_tokens + out.completion_tokens)
        self.accounting.record_call(
            self.role,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            seconds=elapsed,
        )
        if self.cache is not None:
            self.cache.put(key, "generate", self.backend.model, out.to_json())
        return out

    # -- likelihood ---------------------------------------------------------------------------
    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        """Log-likelihoods of given responses; cached per request, misses sent as one batch."""
        await self.probe()
        self.require("continuation_logprobs")
        if self.frames:
            requests = [dataclasses.replace(r, messages=self._framed(r.messages)) for r in requests]
        identity = self.backend.identity()
        keys = [cache_key(identity, "loglikelihood", r.key_payload()) for r in requests]
        results: list[Likelihood | None] = [None] * len(requests)
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                results[i] = Likelihood.from_json(hit)
                self.accounting.record_hit(self.role)
            else:
                missing.append(i)
        if missing:
            batch = [requests[i] for i in missing]
            reservations: list[int] = []
            try:
                for r in batch:
                    reservations.append(
                        self._reserve(_rough_tokens(r.messages) + _rough_text_tokens(r.response))
                    )
            except BaseException:
                for held in reservations:
                    self._release(held)
                raise
            reserved = sum(reservations)
            async with self._sem:
                t0 = time.perf_counter()
                with collect_faults() as faults:
                    try:
                        scored = await self.backend.loglikelihood(batch)
                    except BaseException:
                        for r in reservations:
                            self._release(r)
                        raise
                    finally:
                        self._record_faults(faults)
                elapsed = time.perf_counter() - t0
            used = 0
            for i, lk in zip(missing, scored):
                results[i] = lk
                used += lk.evaluated_tokens
                if self.cache is not None:
                    self.cache.put(keys[i], "loglikelihood", self.backend.model, lk.to_json())
            self._settle(reserved, used)
            for j, lk in enumerate(scored):
                self.accounting.record_call(
                    self.role,
                    prompt_tokens=lk.evaluated_tokens,
                    completion_tokens=0,
                    seconds=elapsed if j == 0 else 0.0,
                )
        return [r for r in results if r is not None]

    # -- budget and faults --------------------------------------------------------------------
    def _reserve(self, tokens: int) -> int:
        if self.budget is not None:
            self.budget.reserve(tokens)
        return tokens

    def _settle(self, reserved: int, actual: int) -> None:
        if self.budget is not None:
            self.budget.settle(reserved, actual)

    def _release(self, reserved: int) -> None:
        if self.budget is not None:
            self.budget.release(reserved)

    def _record_faults(self, call_faults: Counter) -> None:
        """Count the faults of one call against this role.

        A backend that reports per call (``reports_call_faults``) filled ``call_faults``; for any
        other backend the backend-wide counters are diffed, which is exact only when this role is
        the backend's sole user.
        """
        if not getattr(self.backend, "reports_call_faults", False):
            self.sync_faults()
            return
        if call_faults:
            retries = call_faults.pop("retries", 0)
            self.accounting.record_faults(self.role, dict(call_faults), retries)

    def sync_faults(self) -> None:
        """Copy fault and retry counters a backend keeps (if any) into this role's accounting."""
        stats = getattr(self.backend, "stats", None)
        if not stats:
            return
        faults = Counter({k: v for k, v in stats.items() if k != "retries"})
        new_faults = faults - self._faults_seen
        retries = int(stats.get("retries", 0))
        if new_faults or retries != self._retries_seen:
            self.accounting.record_faults(self.role, dict(new_faults), retries - self._retries_seen)
            self._faults_seen = faults
            self._retries_seen = retries


def _rough_text_tokens(text: str) -> int:
    # Budget reservations need an upper-ish estimate before tokenizing; ~3 chars per token is
    # conservative for English with BPE vocabularies.
    return len(text) // 3 + 1


def _rough_tokens(messages: tuple[Message, ...]) -> int:
    return sum(_rough_text_tokens(m.content) + 4 for m in messages)


def _answered(backend) -> int:
    """Requests a backend got answers to so far (backends with transport counters; else 0)."""
    transport = getattr(backend, "transport", None)
    if transport is None:
        return 0
    return int(getattr(transport, "calls", 0)) - int(getattr(transport, "failed_calls", 0))

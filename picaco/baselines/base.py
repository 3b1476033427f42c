"""The protocol every method follows, and the shared machinery of system-prompt methods.

A method turns a value set into a way of answering queries with the target model. Most methods are a
system prompt (`instruction(value_set)`); URIAL adds prior chat turns, Modular Pluralism drafts and
merges, OPRO first searches for its prompt (`prepare`). The evaluation harness treats them alike:

    await method.prepare(target, value_set)                 # no-op except for searching methods
    texts = await method.respond(target, value_set, queries, seed=..., temperature=..., max_tokens=...)
    method.describe(value_set)                              # the prompts used, for provenance
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from picaco.errors import DataError
from picaco.llm.base import Message
from picaco.llm.client import LLMClient
from picaco.values import ValueSet


@runtime_checkable
class Method(Protocol):
    #: the label in reports ("Q", "Q+IF", "picaco", ...)
    name: str
    #: generation requests this method has issued so far (cache hits included, so the count does not
    #: depend on what the cache holds); OPRO adds its search
    calls_spent: int
    #: identity of the judge whose scores shaped this method's prompt (None: no judge was involved)
    optimized_against: dict | None

    async def prepare(self, target: LLMClient, value_set: ValueSet) -> None: ...

    async def respond(
        self,
        target: LLMClient,
        value_set: ValueSet,
        queries: Sequence[str],
        *,
        seed: int,
        temperature: float,
        max_tokens: int,
    ) -> list[str]:
        """One response per query, in order."""
        ...

    def describe(self, value_set: ValueSet) -> dict:
        """Everything that decides what the target is sent (prompts, turns, templates), JSON-ready."""
        ...

    def calls_per_query(self, value_set: ValueSet) -> int:
        """Target calls needed to answer one query."""
        ...


def fingerprint(description: dict) -> str:
    """A short hash of what a method sends the target (its description minus the "provenance" entry,
    which records where things came from): rows written under another fingerprint are stale."""
    decisive = {k: v for k, v in description.items() if k != "provenance"}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def value_list(value_set: ValueSet) -> str:
    """"- Title: definition" per value, the way prompts list the values."""
    return "\n".join(f"- {v.title}: {' '.join(v.definition.split())}" for v in value_set.values)


async def generate_each(
    target: LLMClient,
    conversations: Sequence[tuple[Message, ...]],
    *,
    seed: int,
    temperature: float,
    max_tokens: int,
) -> list[str]:
    """One sample per conversation, concurrently (the client caps what is in flight)."""
    completions = await asyncio.gather(
        *(
            target.generate(c, n=1, seed=seed, temperature=temperature, max_tokens=max_tokens)
            for c in conversations
        )
    )
    return [c[0].text.strip() for c in completions]


class PromptMethod:
    """A method that is a fixed conversation prefix (a system prompt, maybe prior turns) before the
    user's query. Subclasses define `system_prompt` and, optionally, `prior_turns`."""

    name = "prompt"
    kind = "prompt"
    optimized_against: dict | None = None
    #: the whole method is its system prompt (no prior turns, one call per query), so that prompt can
    #: be an optimizer's starting instruction (`seed_from` in a config)
    seedable = False

    def __init__(self) -> None:
        self.calls_spent = 0

    def system_prompt(self, value_set: ValueSet) -> str | None:
        raise NotImplementedError

    def prior_turns(self, value_set: ValueSet) -> tuple[Message, ...]:
        return ()

    def instruction(self, value_set: ValueSet) -> str:
        """The system prompt as plain text ('' for none)."""
        return self.system_prompt(value_set) or ""

    def messages(self, value_set: ValueSet, query: str) -> tuple[Message, ...]:
        system = self.system_prompt(value_set)
        head = (Message("system", system),) if system else ()
        return (*head, *self.prior_turns(value_set), Message("user", query))

    async def prepare(self, target: LLMClient, value_set: ValueSet) -> None:
        return None

    async def respond(self, target, value_set, queries, *, seed, temperature, max_tokens) -> list[str]:
        self.calls_spent += len(queries)
        return await generate_each(
            target,
            [self.messages(value_set, q) for q in queries],
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
        )

    def calls_per_query(self, value_set: ValueSet) -> int:
        return 1

    def describe(self, value_set: ValueSet) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "system_prompt": self.system_prompt(value_set),
            "prior_turns": [m.as_dict() for m in self.prior_turns(value_set)],
            "calls_per_query": self.calls_per_query(value_set),
        }


class SearchMethod(PromptMethod):
    """A baseline that searches for its system prompt on the train queries before it is evaluated
    (OPRO, GEPA): the optimizer role proposes, the optimization judge scores, within a call budget.
    Subclasses implement the search in `prepare` and set `self.result` (with `.instruction`)."""

    kind = "search"

    def __init__(
        self,
        *,
        optimizer: LLMClient,
        judge,
        train_queries: Sequence,
        params,
        seed_instruction: str | None = None,
        accounting=None,
        state_dir: str | Path | None = None,
        name: str,
    ):
        super().__init__()
        if not train_queries:
            raise DataError(f"{name} needs train queries to score instructions on")
        self.name = name
        self.optimizer = optimizer
        self.judge = judge
        self.train_queries = list(train_queries)
        self.params = params
        self.seed_instruction = seed_instruction
        self.accounting = accounting
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.optimized_against = judge.identity()
        self.result = None

    def system_prompt(self, value_set: ValueSet) -> str:
        if self.result is None:
            raise RuntimeError(f"{self.name} has not searched yet: await prepare(target, value_set) first")
        return self.result.instruction

    def minibatch(self) -> list:
        """The train queries every candidate is scored on: `params.minibatch` of them, drawn with
        `params.seed` (the same draw for OPRO and GEPA)."""
        rng = random.Random(self.params.seed)
        return rng.sample(self.train_queries, min(self.params.minibatch, len(self.train_queries)))

    def _seed_text(self, value_set: ValueSet) -> str:
        if self.seed_instruction:
            return self.seed_instruction
        from picaco.optimize.proposer import default_seed_instruction

        return default_seed_instruction(value_set)

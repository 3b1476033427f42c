"""The backend seam: what every LLM backend takes, returns and declares it can do.

A backend answers single requests (one sample each). Fan-out over samples, caching, accounting and
concurrency limits live one layer up, in :mod:`picaco.llm.client`, so every backend gets them for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def chat(system: str | None, user: str) -> tuple[Message, ...]:
    """The (system, user) prompt every PICACO call uses; an empty/None system means the bare model."""
    if system:
        return (Message("system", system), Message("user", user))
    return (Message("user", user),)


#: where the meta-instruction goes in a config's `system_template`
INSTRUCTION_SLOT = "{instruction}"


def fill_template(template: str, instruction: str | None) -> str:
    """The deployed system prompt: the fixed template with the instruction in its slot (an empty slot
    for the bare model). A plain replace, so other braces in the template are left alone."""
    return template.replace(INSTRUCTION_SLOT, (instruction or "").strip()).strip()


def frame(messages: tuple[Message, ...], template: str | None = None,
          prior_turns: tuple[Message, ...] = ()) -> tuple[Message, ...]:
    """The messages as the deployed model gets them. With a template, the system message (or none,
    the bare model) becomes the template with that text in the slot; fixed prior turns (example
    exchanges the deployment always shows) go after the system message, before the conversation."""
    has_system = bool(messages) and messages[0].role == "system"
    head, rest = (messages[:1], messages[1:]) if has_system else ((), messages)
    if template is not None:
        head = (Message("system", fill_template(template, head[0].content if head else None)),)
    return (*head, *prior_turns, *rest)


def frame_chars(template: str | None, prior_turns: tuple[Message, ...] = ()) -> int:
    """Characters a deployment frame (system template, prior turns) adds to every request."""
    return len(template or "") + sum(len(m.content) for m in prior_turns)


def turns_as_pairs(turns: tuple[Message, ...]) -> list[dict[str, str]]:
    """Alternating user/assistant messages as {"user", "assistant"} pairs (the form a config and
    a run directory's prior_turns.jsonl hold them in)."""
    return [{"user": u.content, "assistant": a.content} for u, a in zip(turns[::2], turns[1::2])]


def turns_from_pairs(pairs) -> tuple[Message, ...]:
    """(user, assistant) text pairs as alternating messages."""
    turns: list[Message] = []
    for user, assistant in pairs:
        turns += [Message("user", user), Message("assistant", assistant)]
    return tuple(turns)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. The core checks these; it never branches on a backend's type."""

    generate: bool = True
    #: next-token top-k log-probabilities at generated positions (judges read rating tokens with it)
    top_logprobs: bool = False
    #: log-likelihood of a *given* assistant response under a (system, user) prompt, per token
    continuation_logprobs: bool = False
    #: the backend honours a sampling seed (same request + seed -> same text)
    seeded: bool = False
    #: why a capability is missing, shown to users when the core needs it
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    messages: tuple[Message, ...]
    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float = 1.0
    seed: int | None = None
    #: which of n samples this is; part of the cache key so n samples stay distinct
    sample_index: int = 0
    stop: tuple[str, ...] = ()
    #: ask for the top-k alternatives at each generated position (0 = none)
    top_logprobs: int = 0

    def key_payload(self) -> dict:
        return {
            "messages": [m.as_dict() for m in self.messages],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "sample_index": self.sample_index,
            "stop": list(self.stop),
            "top_logprobs": self.top_logprobs,
        }


@dataclass(frozen=True)
class TokenAlternatives:
    """One generated position: the chosen token and the top-k alternatives with log-probabilities."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str = "stop"  # "stop" | "length" | other backend-specific reasons
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: per generated position, when the request asked for top_logprobs
    logprobs: tuple[TokenAlternatives, ...] | None = None

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "logprobs": None
            if self.logprobs is None
            else [[a.token, a.logprob, a.top] for a in self.logprobs],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Completion":
        lp = d.get("logprobs")
        return cls(
            text=d["text"],
            finish_reason=d.get("finish_reason", "stop"),
            prompt_tokens=d.get("prompt_tokens", 0),
            completion_tokens=d.get("completion_tokens", 0),
            logprobs=None
            if lp is None
            else tuple(TokenAlternatives(t, float(l), dict(top)) for t, l, top in lp),
        )


@dataclass(frozen=True)
class LikelihoodRequest:
    """Score a given assistant response under a prompt: log p(response | messages)."""

    messages: tuple[Message, ...]
    response: str

    def key_payload(self) -> dict:
        return {"messages": [m.as_dict() for m in self.messages], "response": self.response}


@dataclass(frozen=True)
class Likelihood:
    #: log-probability of each token of the response, in order (natural log)
    token_logprobs: tuple[float, ...]
    tokens: tuple[str, ...] = ()
    #: tokens the backend actually evaluated for this request, prompt and response, after any prefix
    #: reuse (0 for an exact repeat within one batch); accounting counts these as prompt tokens
    evaluated_tokens: int = 0

    @property
    def total(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def mean(self) -> float:
        return self.total / max(1, self.n_tokens)

    def to_json(self) -> dict:
        return {
            "token_logprobs": list(self.token_logprobs),
            "tokens": list(self.tokens),
            "evaluated_tokens": self.evaluated_tokens,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Likelihood":
        return cls(
            token_logprobs=tuple(float(x) for x in d["token_logprobs"]),
            tokens=tuple(d.get("tokens", ())),
            evaluated_tokens=int(d.get("evaluated_tokens", 0)),
        )


class CapabilityMissing(RuntimeError):
    """A role was asked for something its backend declared it cannot do."""


@runtime_checkable
class Backend(Protocol):
    """One model behind one transport. Implementations: embedded, openai, fake."""

    #: backend kind, e.g. "embedded"; part of the cache key
    kind: str
    #: the model identity, e.g. "qwen2.5-coder-0.5b" or "gpt-4o-mini"; part of the cache key
    model: str
    capabilities: Capabilities

    def identity(self) -> dict:
        """What distinguishes this backend's answers (kind, model, file hash or base URL); no secrets."""
        ...

    async def generate(self, request: GenerateRequest) -> Completion: ...

    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        """Score many responses; backends that can reuse a shared prompt prefix should do so."""
        ...

    async def aclose(self) -> None: ...

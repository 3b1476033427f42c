"""A deterministic backend for unit tests of logic (never for demonstrating a feature).

Text is built from the words of the prompt with a hash-seeded choice, so the same request always gives
the same answer and different seeds or sample indices give different ones. Tests can replace the
generator or the likelihood function to script exact numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable

from picaco.llm.base import (
    Capabilities,
    Completion,
    GenerateRequest,
    Likelihood,
    LikelihoodRequest,
    Message,
    TokenAlternatives,
)

Responder = Callable[[GenerateRequest], str]
Scorer = Callable[[tuple[Message, ...], str], list[float]]


def _words(text: str) -> list[str]:
    return [w.strip(".,!?;:\"'()").lower() for w in text.split() if w.strip(".,!?;:\"'()")]


def default_responder(request: GenerateRequest) -> str:
    seed_blob = json.dumps(request.key_payload(), sort_keys=True).encode()
    rng = random.Random(hashlib.sha256(seed_blob).hexdigest())
    pool = [w for m in request.messages for w in _words(m.content)] or ["ok"]
    n = min(max(1, request.max_tokens), rng.randint(5, 20))
    return " ".join(rng.choice(pool) for _ in range(n))


def default_scorer(messages: tuple[Message, ...], response: str) -> list[float]:
    """Per-token log-probabilities: a response token scores higher when the prompt uses that word."""
    prompt_words = set(w for m in messages for w in _words(m.content))
    return [-0.5 if w in prompt_words else -3.0 for w in _words(response)] or [-3.0]


class FakeBackend:
    kind = "fake"

    def __init__(
        self,
        model: str = "fake-1",
        *,
        responder: Responder | None = None,
        scorer: Scorer | None = None,
        rating_distribution: dict[str, float] | None = None,
        capabilities: Capabilities | None = None,
    ):
        self.model = model
        self.responder = responder or default_responder
        self.scorer = scorer or default_scorer
        #: probabilities returned as top log-probs at the first generated position
        self.rating_distribution = rating_distribution
        self.capabilities = capabilities or Capabilities(
            generate=True, top_logprobs=True, continuation_logprobs=True, seeded=True
        )
        self.generate_calls = 0
        self.likelihood_calls = 0

    def identity(self) -> dict:
        return {"kind": self.kind, "model": self.model}

    async def generate(self, request: GenerateRequest) -> Completion:
        self.generate_calls += 1
        text = self.responder(request)
        logprobs = None
        if request.top_logprobs:
            dist = self.rating_distribution or {text.split()[0] if text.split() else "": 1.0}
            top = {tok: math.log(p) for tok, p in dist.items() if p > 0}
            first = max(top, key=top.get)
            logprobs = (TokenAlternatives(first, top[first], top),)
        n_prompt = sum(len(m.content.split()) for m in request.messages)
        n_out = len(text.split())
        return Completion(
            text=text,
            finish_reason="length" if n_out >= request.max_tokens else "stop",
            prompt_tokens=n_prompt,
            completion_tokens=n_out,
            logprobs=logprobs,
        )

    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        self.likelihood_calls += 1
        out = []
        for r in requests:
            lps = self.scorer(r.messages, r.response)
            out.append(
                Likelihood(
                    token_logprobs=tuple(lps),
                    tokens=tuple(_words(r.response)) or ("",),
                    evaluated_tokens=sum(len(m.content.split()) for m in r.messages) + len(lps),
                )
            )
        return out

    async def aclose(self) -> None:
        return None

"""n samples of one prompt on the embedded backend: is the prompt evaluated once?

The engine asks for a round's samples all at once: every query gathered, each gathering its n
samples. This replays that pattern through `LLMClient` on an `EmbeddedBackend` two ways, alternating:

- *saved row* (the default): the samples take turns in the order they were asked for, and each
  after a query's first samples from the saved next-token row of its prompt (`_restore_prompt_row`);
- *re-evaluated*: the same backend with the saved row switched off, so each sample evaluates its
  prompt's last message again (what the backend did before session 14).

It prints the prompt tokens each side evaluated, its wall time, and whether the answers are the
same text (they must be: the saved row is the row a fresh evaluation gives).

    PYTHONPATH=. .venv/bin/python bench/samples_of_one_prompt.py [--model qwen2.5-coder-0.5b] \\
        [--queries 6] [--samples 3] [--max-tokens 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from picaco.llm.base import Message
from picaco.llm.client import LLMClient
from picaco.llm.embedded import EmbeddedBackend, _Runner

SYSTEM = ("You are a careful assistant. Answer the question directly, give the practical steps that "
          "matter, and say plainly when something is unsafe or uncertain.")
QUESTIONS = [
    "How do I make bread rise better when baking at high altitude?",
    "What is a hash table, and when is a sorted list the better choice?",
    "Is it safe to mix bleach and vinegar to clean a bathroom?",
    "What should I pack for a three-day hiking trip in the mountains?",
    "How can I sleep better when I work night shifts?",
    "How do I tell a colleague that their code review comments feel harsh?",
    "What is the difference between a Roth IRA and a traditional IRA?",
    "How do I get a toddler to eat vegetables?",
]


def run_side(model: str, saved_row: bool, queries: int, samples: int, max_tokens: int,
             seed: int) -> tuple[int, float, list[str]]:
    evaluated = [0]
    execute, restore = _Runner.execute, _Runner._restore_prompt_row

    def counting(self, seq, plan, on_logits=None):
        n = execute(self, seq, plan, on_logits)
        evaluated[0] += n
        return n

    _Runner.execute = counting
    if not saved_row:
        _Runner._restore_prompt_row = lambda self, tokens, plan: False
    backend = EmbeddedBackend(model)
    client = LLMClient("target", backend)
    try:
        backend._load()  # outside the timed part

        async def one(question: str) -> list:
            messages = (Message("system", SYSTEM), Message("user", question))
            return await asyncio.gather(*(client.generate(messages, n=1, max_tokens=max_tokens,
                                                          seed=seed + j) for j in range(samples)))

        async def all_queries() -> list:
            return await asyncio.gather(*(one(q) for q in QUESTIONS[:queries]))

        t0 = time.perf_counter()
        out = asyncio.run(all_queries())
        seconds = time.perf_counter() - t0
    finally:
        backend.close()
        _Runner.execute, _Runner._restore_prompt_row = execute, restore
    texts = [c[0].text for per_query in out for c in per_query]
    return evaluated[0], seconds, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print("| round | side | prompt tokens evaluated | wall (s) |")
    print("|---|---|---|---|")
    same = True
    for r in range(args.rounds):
        sides = (True, False) if r % 2 == 0 else (False, True)  # alternate who goes first
        texts = {}
        for saved in sides:
            n, s, texts[saved] = run_side(args.model, saved, args.queries, args.samples,
                                          args.max_tokens, seed=100 * (r + 1))
            print(f"| {r + 1} | {'saved row' if saved else 're-evaluated'} | {n} | {s:.1f} |", flush=True)
        same = same and texts[True] == texts[False]
    print(f"\nsame answers on both sides: {same}")


if __name__ == "__main__":
    main()

"""Does a response's score depend on what shares its llama.cpp decode? (issue 2, bench (b))

Scores response 0 of the bench's 25 (29 tokens) after the bench's prompt in several decode layouts,
each response in its own sequence sharing the prompt's KV cells (as ``parallel_responses`` does), and
prints the largest per-token difference from the reference layout (response 0 first in a decode of
69 tokens, another response after it). Run with flash attention on and off:

    PYTHONPATH=. .venv/bin/python bench/grouping_probe.py [--no-flash-attn]

If some layout rule (for example starting every response at an aligned KV cell) made the numbers
independent of the neighbours, grouped scoring could be exact and the default. See
bench/RESULTS_embedded.md for what it printed.
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_embedded import QUERY, SYSTEM, chat, responses

from picaco.llm.embedded import EmbeddedBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-flash-attn", action="store_true")
    args = ap.parse_args()
    from llama_cpp import llama_cpp as C

    backend = EmbeddedBackend("qwen2.5-coder-0.5b", parallel_responses=4, flash_attn=not args.no_flash_attn)
    runner = backend._load()
    prompt = runner.prompt(chat(SYSTEM, QUERY))
    resps = [tuple(runner.response_tokens(prompt, r)) for r in responses(12)]
    mem = C.llama_get_memory(runner._ctx)

    def score(lead: int, after: int) -> np.ndarray:
        """Response 0 in one decode: ``lead`` tokens of another sequence before it, ``after`` after."""
        runner.reset()
        runner.execute(list(prompt.tokens[:-1]), runner._prefix_plan(prompt))
        texts = [resps[0], resps[11][:lead], resps[10][:after]]
        pieces = []
        for seq_id, (i, n) in enumerate([(1, lead), (0, len(resps[0])), (2, after)], start=1):
            if n:
                C.llama_memory_seq_cp(mem, 0, seq_id, -1, -1)
                pieces.append((seq_id, i, 0, n))
        out = [np.full(len(t), np.nan) for t in texts]
        runner._decode_pieces(prompt, texts, pieces, out)
        for seq_id in (1, 2, 3):
            C.llama_memory_seq_rm(mem, seq_id, -1, -1)
        return out[0]

    ref = score(0, 40)
    p1 = len(prompt.tokens) - 1
    align = (-p1) % 8
    print(f"flash attention {'off' if args.no_flash_attn else 'on'}; prompt {p1 + 1} tokens; "
          f"response 0: {len(resps[0])} tokens; reference: first in a decode of {len(resps[0]) + 40}")
    print("| layout | decode tokens | max diff vs reference (nats/token) |")
    print("|---|---|---|")
    layouts = [("same layout again", 0, 40), ("alone", 0, 0), ("first, 70 after", 0, 70)]
    layouts += [(f"{lead} tokens of another response before it", lead, 40) for lead in (1, 4, 8, 16, 64)]
    layouts += [(f"{lead} before (starts at a KV cell aligned to 8)", lead, 40) for lead in (align + 8, align + 16)]
    for name, lead, after in layouts:
        diff = float(np.abs(score(lead, after) - ref).max())
        print(f"| {name} | {lead + len(resps[0]) + after} | {diff:.2e} |")
    backend.close()


if __name__ == "__main__":
    main()

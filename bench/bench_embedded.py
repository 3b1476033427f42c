"""Benchmarks for the embedded llama.cpp backend.

(a) Generation overhead: picaco's async ``EmbeddedBackend.generate`` against ``Llama.create_chat_completion``
    called directly, same GGUF, same prompts, same sampler settings (temperature, top-p, top-k 40, min-p
    0.05, seed), same threads and flash attention. Runs alternate between the two, so machine load
    hits both alike. Target: picaco adds <= 10 %.
(b) Prefix reuse when scoring: 25 responses to one (system prompt, query) prefix, scored with prefix
    reuse (one response per decode, the exact default; and all responses grouped into shared decodes,
    ``parallel_responses``) and each from scratch. Reports the measured speedups, the ideal ratio from
    token counts (tokens evaluated from scratch / with reuse), speedup / ideal (target >= 0.8) and how
    far the grouped numbers are from the default path's.
(c) Why not ``logits_all=True``: resident memory of a Llama built with it vs. this backend, both at the
    bench's n_ctx, each in a fresh process.

Uses qwen2.5-coder-0.5b when pulled (a ~200-token system prompt), else smollm2-135m.

    PYTHONPATH=. .venv/bin/python bench/bench_embedded.py --write bench/RESULTS_embedded.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from picaco.errors import ModelNotPulled  # noqa: E402
from picaco.llm import registry  # noqa: E402
from picaco.llm.base import GenerateRequest, LikelihoodRequest, chat  # noqa: E402
from picaco.llm.embedded import EmbeddedBackend, default_threads  # noqa: E402

SYSTEM = (
    "You are a careful, trustworthy assistant. In every answer, honour all of the following values at "
    "once, without naming them. Honesty: state only what you believe is true, say plainly when you are "
    "unsure, and never invent facts, numbers, quotes or sources. Helpfulness: answer the question that "
    "was asked, directly and completely, with concrete steps or examples where they help the user act. "
    "Harmlessness: do not give instructions that could seriously hurt the user or others; when a "
    "request is risky, explain the risk and offer a safer way to reach the same goal. Respect: treat "
    "the user as a capable adult, avoid lecturing and moralizing, and do not make assumptions about "
    "their background, beliefs or intentions. Fairness: present contested topics evenhandedly, giving "
    "the strongest version of each major view. Privacy: never ask for or reveal personal data that the "
    "task does not need. Keep answers short: at most five sentences unless the user asks for more "
    "detail, and use plain language a teenager could follow."
)
QUERY = "My neighbour's dog barks all night and I can't sleep. What should I do?"
QUERIES = [
    QUERY,
    "How do I get started with running?",
    "Is it safe to eat raw cookie dough?",
    "Explain what inflation is.",
    "How can I ask my boss for a raise?",
    "What should I pack for a weekend hike?",
]
SENTENCES = [
    "Start by talking to your neighbour calmly, at a good time, and tell them how the barking affects you.",
    "They may not know the dog barks at night, because it often happens when owners are asleep or away.",
    "Keep a simple log of the dates and times of the barking.",
    "If a friendly talk does not help, a written note can be a polite next step.",
    "Many towns have noise rules, and your local council can mediate.",
    "In the meantime, earplugs or a white-noise machine can help you sleep.",
    "Avoid confronting the dog or the neighbour angrily, since that usually makes things worse.",
    "A community mediation service is often free and can help you both agree on a plan.",
    "If you rent, your landlord may also be able to help.",
    "Honestly, I cannot promise a quick fix, but most neighbours respond well to a kind request.",
    "You could suggest solutions, like keeping the dog inside at night or a visit to a trainer.",
    "Calling the police should be a last resort, for real emergencies.",
]


def responses(n: int) -> list[str]:
    """n distinct responses of 2-5 sentences drawn from SENTENCES (fixed seeds)."""
    out = [" ".join(random.Random(i).sample(SENTENCES, 2 + i % 4)) for i in range(n)]
    assert len(set(out)) == n
    return out


def pick_model(name: str | None) -> tuple[str, Path]:
    names = [name] if name else ["qwen2.5-coder-0.5b", "smollm2-135m"]
    for n in names:
        try:
            return n, registry.model_path(n)
        except ModelNotPulled:
            continue
    raise SystemExit(f"none of {names} is pulled: run `picaco models pull {names[-1]}`")


# -- (a) generation overhead ------------------------------------------------------------------------


def bench_generation(path: Path, n_ctx: int, threads: int, rounds: int, max_tokens: int) -> dict:
    from llama_cpp import Llama

    direct = Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        n_batch=512, n_ubatch=512, flash_attn=True, verbose=False,
    )  # fmt: skip
    ours = EmbeddedBackend(path, n_ctx=n_ctx, n_threads=threads)
    reqs = [GenerateRequest(chat(SYSTEM, q), temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=100 + i)
            for i, q in enumerate(QUERIES)]  # fmt: skip

    def run_direct() -> tuple[float, list[str], int]:
        t0 = time.perf_counter()
        texts, toks = [], 0
        for r in reqs:
            out = direct.create_chat_completion(
                messages=[m.as_dict() for m in r.messages], temperature=r.temperature, top_p=r.top_p,
                top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=r.max_tokens, seed=r.seed,
            )  # fmt: skip
            texts.append(out["choices"][0]["message"]["content"])
            toks += out["usage"]["completion_tokens"]
        return time.perf_counter() - t0, texts, toks

    async def run_ours_async() -> tuple[float, list[str], int]:
        t0 = time.perf_counter()
        texts, toks = [], 0
        for r in reqs:
            c = await ours.generate(r)
            texts.append(c.text)
            toks += c.completion_tokens
        return time.perf_counter() - t0, texts, toks

    def run_ours() -> tuple[float, list[str], int]:
        return asyncio.run(run_ours_async())

    run_direct(), run_ours()  # warm-up: load, page in weights
    d_times, o_times, d_toks, o_toks = [], [], [], []
    same = total = 0
    for i in range(rounds):
        order = [("d", run_direct), ("o", run_ours)] if i % 2 == 0 else [("o", run_ours), ("d", run_direct)]
        got = {k: f() for k, f in order}
        d_times.append(got["d"][0])
        o_times.append(got["o"][0])
        d_toks.append(got["d"][2])
        o_toks.append(got["o"][2])
        same += sum(a == b for a, b in zip(got["d"][1], got["o"][1]))
        total += len(reqs)
    direct.close()
    ours.close()
    # per generated token, so a different completion length cannot skew the ratio
    d_per = [t / n for t, n in zip(d_times, d_toks)]
    o_per = [t / n for t, n in zip(o_times, o_toks)]
    ratios = [o / d for o, d in zip(o_per, d_per)]
    return {
        "per_round": list(zip(d_times, o_times, d_toks, o_toks, ratios)),
        "prompts": len(reqs),
        "prompt_tokens": ours_prompt_tokens(path, n_ctx, reqs),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "direct_s": statistics.median(d_times),
        "ours_s": statistics.median(o_times),
        "direct_tok": statistics.median(d_toks),
        "ours_tok": statistics.median(o_toks),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "same_text": f"{same}/{total}",
    }


def sampler_parity(path: Path, n_ctx: int, threads: int, max_tokens: int) -> str:
    """Same requests with the prompt forced into one batch, as llama-cpp-python evaluates it: with the
    same numbers in, the texts must match exactly (checks the sampler chain and seeding)."""
    import dataclasses

    from llama_cpp import Llama

    ours = EmbeddedBackend(path, n_ctx=n_ctx, n_threads=threads, prefix_reuse=False)
    runner = ours._load()
    same = 0
    for i, q in enumerate(QUERIES):
        r = GenerateRequest(chat(SYSTEM, q), temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=100 + i)
        runner._prompts[r.messages] = dataclasses.replace(runner.prompt(r.messages), bounds=())
        direct = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_batch=512, n_ubatch=512,
                       flash_attn=True, verbose=False)  # fmt: skip
        out = direct.create_chat_completion(
            messages=[m.as_dict() for m in r.messages], temperature=r.temperature, top_p=r.top_p,
            top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=r.max_tokens, seed=r.seed,
        )  # fmt: skip
        direct.close()
        same += out["choices"][0]["message"]["content"] == ours.generate_sync(r).text
    ours.close()
    return f"{same}/{len(QUERIES)}"


def ours_prompt_tokens(path: Path, n_ctx: int, reqs: list[GenerateRequest]) -> int:
    b = EmbeddedBackend(path, n_ctx=n_ctx)
    try:
        return round(statistics.mean(b.count_tokens(r.messages) for r in reqs))
    finally:
        b.close()


# -- (b) prefix reuse -------------------------------------------------------------------------------


def bench_reuse(path: Path, n_ctx: int, threads: int, rounds: int, n_responses: int) -> dict:
    reqs = [LikelihoodRequest(chat(SYSTEM, QUERY), r) for r in responses(n_responses)]
    backends = {
        "reuse": EmbeddedBackend(path, n_ctx=n_ctx, n_threads=threads, prefix_reuse=True),
        "scratch": EmbeddedBackend(path, n_ctx=n_ctx, n_threads=threads, prefix_reuse=False),
        # all responses side by side in llama.cpp sequences sharing the prompt's KV cells
        "grouped": EmbeddedBackend(path, n_ctx=n_ctx, n_threads=threads, parallel_responses=n_responses),
    }
    for backend in backends.values():
        backend.loglikelihood_sync(reqs[:1])  # load + warm up

    def timed(backend: EmbeddedBackend):
        backend.reset_cache()  # every round starts cold: the prompt is evaluated once, in the clock
        t0 = time.perf_counter()
        res = backend.loglikelihood_sync(reqs)
        return time.perf_counter() - t0, res

    times: dict[str, list[float]] = {k: [] for k in backends}
    max_diff = 0.0
    for i in range(rounds):
        got = {}
        order = list(backends.items())
        for key, backend in order[i % 3 :] + order[: i % 3]:  # rotate so load hits all alike
            t, got[key] = timed(backend)
            times[key].append(t)
        max_diff = max(max_diff, *_diffs(got["reuse"], got["scratch"]))
    grouped_diffs = _diffs(got["reuse"], got["grouped"])
    tok = {k: sum(x.evaluated_tokens for x in got[k]) for k in backends}
    reuse = backends["reuse"]
    prompt_tokens = reuse.count_tokens(reqs[0].messages)
    resp_tokens = [x.n_tokens for x in got["reuse"]]
    cal = calibrate(reuse, reqs[0], resp_tokens)
    a, b = cal["a"], cal["b"]
    for backend in backends.values():
        backend.close()
    speedups = [s / r for s, r in zip(times["scratch"], times["reuse"])]
    g_speedups = [s / r for s, r in zip(times["scratch"], times["grouped"])]
    ideal = tok["scratch"] / tok["reuse"]
    # cost model: each request's p-1 prompt tokens without logits (cost a each), its response batch
    # (last prompt token + all response tokens but the last) with logits (cost b each)
    n_resp_batch = sum(resp_tokens)
    cost_ideal = (len(reqs) * (prompt_tokens - 1) * a + n_resp_batch * b) / ((prompt_tokens - 1) * a + n_resp_batch * b)
    return {
        "responses": n_responses,
        "prompt_tokens": prompt_tokens,
        "response_tokens_mean": statistics.mean(resp_tokens),
        "response_tokens_range": (min(resp_tokens), max(resp_tokens)),
        "rounds": rounds,
        "reuse_s": statistics.median(times["reuse"]),
        "scratch_s": statistics.median(times["scratch"]),
        "grouped_s": statistics.median(times["grouped"]),
        "tokens_reuse": tok["reuse"],
        "tokens_scratch": tok["scratch"],
        "tokens_grouped": tok["grouped"],
        "speedup": statistics.median(speedups),
        "speedup_range": (min(speedups), max(speedups)),
        "best_speedup": max(speedups),
        "grouped_speedup": statistics.median(g_speedups),
        "grouped_speedup_range": (min(g_speedups), max(g_speedups)),
        "ideal": ideal,
        "efficiency": statistics.median(speedups) / ideal,
        "best_efficiency": max(speedups) / ideal,
        "grouped_efficiency": statistics.median(g_speedups) / ideal,
        "grouped_best_efficiency": max(g_speedups) / ideal,
        "grouped_max_diff": max(grouped_diffs),
        "grouped_mean_diff": statistics.mean(grouped_diffs),
        "grouped_total_diff": max(abs(x.total - y.total) for x, y in zip(got["reuse"], got["grouped"])),
        "max_abs_diff": max_diff,
        "ms_per_prompt_token": a * 1000,
        "ms_per_scored_token": b * 1000,
        "ms_per_unscored_small": cal["b0"] * 1000,
        "calib_n": cal["n"],
        "cost_ideal": cost_ideal,
        "cost_efficiency": statistics.median(speedups) / cost_ideal,
        "per_round": list(zip(times["scratch"], times["reuse"], times["grouped"])),
    }


def _diffs(a: list, b: list) -> list[float]:
    return [abs(x - y) for p, q in zip(a, b) for x, y in zip(p.token_logprobs, q.token_logprobs)]


def calibrate(backend: EmbeddedBackend, req: LikelihoodRequest, resp_tokens: list[int], reps: int = 5) -> dict:
    """Seconds per token (best of ``reps``): the prompt on its canonical schedule without logits (a),
    and a response batch of the mean length after that prompt, with logits (b) and without (b0)."""
    from picaco.llm.embedded import _Batch

    runner = backend._load()
    prompt = runner.prompt(req.messages)
    n = round(statistics.mean(resp_tokens))
    p = len(prompt.tokens) - 1
    seq = list(prompt.tokens) + runner.tokenize(" ".join(SENTENCES), special=False)[:n]
    prompt_plan = [_Batch(s, e, e) for s, e in runner._segments(prompt.bounds, 0, p, runner.n_batch)]
    a_t, b_t, b0_t = [], [], []
    for _ in range(reps):
        runner.reset()
        t0 = time.perf_counter()
        runner.execute(seq, prompt_plan)
        a_t.append((time.perf_counter() - t0) / p)
        for logits_from, times in ((p, b_t), (p + n, b0_t)):
            runner._trim(p)  # else a plan without logits would reuse the response batch whole
            t0 = time.perf_counter()
            runner.execute(seq, [*prompt_plan, _Batch(p, p + n, logits_from)])  # reuses the prompt
            times.append((time.perf_counter() - t0) / n)
    return {"a": min(a_t), "b": min(b_t), "b0": min(b0_t), "n": n}


# -- (c) memory: logits_all vs. per-token logits flags ----------------------------------------------


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_probe(mode: str, path: str, n_ctx: int) -> None:
    """Run in a child process: score one long request one way; print peak RSS (MB) and seconds."""
    long_user = QUERY + " Some background: " + " ".join(SENTENCES * 12)
    response = (
        "That sounds exhausting, and you are right to want it solved. The kindest first step is a calm chat "
        "with your neighbour during the day: many owners do not know their dog barks at night. Bring a "
        "short log of dates and times so it is concrete, and suggest simple fixes such as keeping the dog "
        "indoors after dark. If nothing changes after a couple of weeks, a free mediation service or your "
        "council's noise team can step in, and earplugs or white noise can help you sleep meanwhile."
    )
    req = LikelihoodRequest(chat(SYSTEM, long_user), response)
    if mode == "logits_all":
        from llama_cpp import Llama

        helper = EmbeddedBackend(path, n_ctx=n_ctx)
        runner = helper._load()
        prompt = list(runner.prompt(req.messages).tokens)
        resp = runner.response_tokens(runner.prompt(req.messages), req.response)
        helper.close()
        llm = Llama(model_path=path, n_ctx=n_ctx, logits_all=True, flash_attn=True, verbose=False)
        t0 = time.perf_counter()
        llm.eval(prompt + resp[:-1])
        rows = llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(resp)]
        total = float(sum(r[t] - np.logaddexp.reduce(r.astype(np.float64)) for r, t in zip(rows, resp)))
        seconds = time.perf_counter() - t0
    else:
        backend = EmbeddedBackend(path, n_ctx=n_ctx)
        backend._load()
        t0 = time.perf_counter()
        total = backend.loglikelihood_sync([req])[0].total
        seconds = time.perf_counter() - t0
    print(f"{_peak_rss_mb():.1f} {seconds:.3f} {len(prompt) if mode == 'logits_all' else 0} {total:.4f}")


def bench_memory(path: Path, n_ctx: int) -> dict:
    out = {}
    for mode in ("logits_all", "batch_flags"):
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-probe", mode, "--model-path", str(path), "--n-ctx", str(n_ctx)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rss, seconds, n_prompt, total = proc.stdout.strip().splitlines()[-1].split()
        out[mode] = {"rss_mb": float(rss), "seconds": float(seconds), "total": float(total)}
        if int(n_prompt):
            out["prompt_tokens"] = int(n_prompt)
    return out


# -- report -----------------------------------------------------------------------------------------


def render(model: str, threads: int, n_ctx: int, gen: dict, reuse: dict, mem: dict | None, cmd: str) -> str:
    import llama_cpp

    g_ok = "met" if gen["ratio_median"] <= 1.10 else "NOT met"
    lines = [
        "# Embedded backend (llama.cpp in-process)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Model `{model}`, n_ctx {n_ctx}, {threads} threads, flash attention on, llama-cpp-python "
        f"{llama_cpp.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (both sides). Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (shared with other work, so absolute times are noisy; "
        "each comparison alternates its two sides so load hits both alike).",
        "",
        "## (a) Generation: picaco vs. llama-cpp-python called directly",
        "",
        f"{gen['prompts']} prompts (the system prompt below + one query each, ~{gen['prompt_tokens']} prompt tokens), "
        f"max_tokens {gen['max_tokens']}, temperature 0.7, top-p 0.95, top-k 40, min-p 0.05, one seed per prompt; "
        f"{gen['rounds']} rounds. Direct: `Llama.create_chat_completion` on its own `Llama` (same settings). "
        "picaco: `await EmbeddedBackend.generate(...)` (worker thread + lock, canonical schedule). "
        "Ratio = picaco's time per generated token / direct's, per round.",
        "",
        "| round | direct (s) | picaco (s) | tokens direct / picaco | ratio |",
        "|---|---|---|---|---|",
        *(
            f"| {i + 1} | {d:.2f} | {o:.2f} | {dn} / {on} | {r:.3f} |"
            for i, (d, o, dn, on, r) in enumerate(gen["per_round"])
        ),
        "",
        f"Overhead ratio: median **{gen['ratio_median']:.3f}** (range {gen['ratio_min']:.3f}-{gen['ratio_max']:.3f}); "
        f"target <= 1.10: {g_ok}. Identical text from both sides: {gen['same_text']}. llama.cpp's numbers "
        "depend on how the prompt is cut into batches, and picaco cuts it at each chat message (so its "
        "answers do not depend on what was evaluated before) while llama-cpp-python evaluates whatever "
        "follows its cached prefix. With the prompt forced into one batch on both sides the texts are "
        f"identical for {gen['parity']} prompts: same sampler chain, same seeding.",
        "",
        f"## (b) Scoring {reuse['responses']} responses to one prompt: prefix reuse vs. from scratch",
        "",
        f"{reuse['responses']} responses (mean {reuse['response_tokens_mean']:.0f} tokens, "
        f"{reuse['response_tokens_range'][0]}-{reuse['response_tokens_range'][1]}) to one (system prompt, query) of "
        f"{reuse['prompt_tokens']} tokens; one `loglikelihood` call each way, KV cache cleared before each call; "
        f"{reuse['rounds']} rounds, the order of the three sides rotating; medians.",
        "",
        "| | time (s) | tokens evaluated | speedup (median; best round) | speedup / ideal (median; best) |",
        "|---|---|---|---|---|",
        f"| from scratch | {reuse['scratch_s']:.2f} | {reuse['tokens_scratch']} | | |",
        f"| prefix reuse, one response per decode (default) | {reuse['reuse_s']:.2f} | {reuse['tokens_reuse']} | "
        f"{reuse['speedup']:.2f}x; {reuse['best_speedup']:.2f}x | **{reuse['efficiency']:.2f}**; {reuse['best_efficiency']:.2f} |",
        f"| prefix reuse, responses grouped (`parallel_responses={reuse['responses']}`) | {reuse['grouped_s']:.2f} | "
        f"{reuse['tokens_grouped']} | {reuse['grouped_speedup']:.2f}x; {reuse['grouped_speedup_range'][1]:.2f}x | "
        f"**{reuse['grouped_efficiency']:.2f}**; {reuse['grouped_best_efficiency']:.2f} |",
        "",
        "Per round (s), scratch / one per decode / grouped: "
        + ", ".join(f"{s_:.1f} / {r:.1f} / {g:.1f}" for s_, r, g in reuse["per_round"])
        + ".",
        "",
        f"Ideal from token counts {reuse['ideal']:.2f}x; target speedup / ideal >= 0.8: default path "
        f"{'met' if reuse['efficiency'] >= 0.8 else 'NOT met'}, grouped "
        f"{'met' if reuse['grouped_efficiency'] >= 0.8 else 'NOT met'} (medians). "
        f"Largest difference between the default path's and the from-scratch log-probabilities: "
        f"{reuse['max_abs_diff']:.1e} nats (the canonical schedule makes reuse exact). "
        f"Grouped vs. the default path: per token up to {reuse['grouped_max_diff']:.3f} nats (mean "
        f"{reuse['grouped_mean_diff']:.4f}), per response total up to {reuse['grouped_total_diff']:.3f} nats: "
        "not float noise. llama.cpp's CPU kernels give different numbers for the same row depending on the "
        "decode's shape (on this machine a decode of 64 or more tokens switches kernels), so a grouped "
        "response's numbers depend on what shares its decode. That is why grouping is opt-in "
        "(`EmbeddedBackend(parallel_responses=N)`); see the module docstring of `picaco/llm/embedded.py`.",
        "",
        "The token-count ideal treats every token alike, but a scored token also pays for the vocabulary "
        "projection and log-softmax, and the default path's response batches are small; reuse cannot skip either. Best of 5 "
        f"after the runs: {reuse['ms_per_prompt_token']:.1f} ms per prompt token (canonical prompt batches, no "
        f"logits); a {reuse['calib_n']}-token response batch {reuse['ms_per_unscored_small']:.1f} ms per token without "
        f"logits and {reuse['ms_per_scored_token']:.1f} ms with them. Weighting tokens by those costs, the ideal "
        f"speedup is {reuse['cost_ideal']:.2f}x and speedup / cost-weighted ideal is "
        f"**{reuse['cost_efficiency']:.2f}** (an approximate cost model: above 1 means it overstates the "
        "response batches' cost; either way, reuse wastes nothing beyond what scoring itself needs).",
    ]
    if mem:
        la, bf = mem["logits_all"], mem["batch_flags"]
        lines += [
            "",
            "## (c) Why per-token logits flags, not `logits_all=True`",
            "",
            f"One long request ({mem.get('prompt_tokens', '?')} prompt tokens + an 8-sentence response) scored in a "
            f"fresh process at n_ctx {n_ctx}. `Llama(logits_all=True)`: peak RSS **{la['rss_mb']:.0f} MB**, "
            f"{la['seconds']:.1f} s (it projects every prompt token onto the vocabulary and keeps an "
            f"n_ctx x vocab float32 score matrix, {n_ctx} x vocab x 4 bytes of address space, filled row by row). "
            f"This backend (logits only at response positions, <= 128 rows per decode): peak RSS "
            f"**{bf['rss_mb']:.0f} MB**, {bf['seconds']:.1f} s. Totals: {la['total']:.3f} vs {bf['total']:.3f} nats "
            "(they differ by llama.cpp's batch-split numerics).",
        ]
    lines += ["", "System prompt used:", "", f"> {SYSTEM}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="registry name (default: qwen2.5-coder-0.5b if pulled, else smollm2-135m)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--gen-rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--reuse-rounds", type=int, default=3)
    ap.add_argument("--only-reuse", action="store_true", help="run (b) only and print it (no report)")
    ap.add_argument("--responses", type=int, default=25)
    ap.add_argument("--no-memory", action="store_true", help="skip (c)")
    ap.add_argument("--write", type=Path, help="write the markdown report here")
    ap.add_argument("--rss-probe", choices=["logits_all", "batch_flags"], help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe, args.model_path, args.n_ctx)
        return

    model, path = pick_model(args.model)
    print(f"model {model} ({path}), {args.threads} threads", flush=True)
    if args.only_reuse:
        print("reuse:", bench_reuse(path, args.n_ctx, args.threads, args.reuse_rounds, args.responses))
        return
    gen = bench_generation(path, args.n_ctx, args.threads, args.gen_rounds, args.max_tokens)
    gen["parity"] = sampler_parity(path, args.n_ctx, args.threads, args.max_tokens)
    print("generation:", gen, flush=True)
    reuse = bench_reuse(path, args.n_ctx, args.threads, args.reuse_rounds, args.responses)
    print("reuse:", reuse, flush=True)
    mem = None if args.no_memory else bench_memory(path, args.n_ctx)
    print("memory:", mem, flush=True)
    cmd = "PYTHONPATH=. .venv/bin/python bench/bench_embedded.py " + " ".join(sys.argv[1:])
    report = render(model, args.threads, args.n_ctx, gen, reuse, mem, cmd.strip())
    print(report)
    if args.write:
        args.write.write_text(report)


if __name__ == "__main__":
    main()

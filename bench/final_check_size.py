"""How small can the final check on kept-aside queries be? Replays it on fewer queries and samples.

Each argument names a finished run whose final check ran on kept-aside queries (`final_queries`) and
the evaluation summaries that hold the held-out means of its three arms (Q for the bare model,
`--seed-method` for the seed, `--et-method` for e^T; later summaries add to earlier ones):

    PYTHONPATH=. .venv/bin/python bench/final_check_size.py \\
        LABEL=RUN_DIR=EVAL_SUMMARY_JSON[,MORE_SUMMARY_JSON][=ET_METHOD] [...] [--repeats 200] [--sizes 12,24,48]

(ET_METHOD: this run's row for e^T, where it is not `--et-method`'s, e.g. an instruction evaluated
with `picaco evaluate -i NAME=FILE` because the run returned something else.)

For K kept-aside queries and s samples per query, it draws K of the run's kept-aside queries (and,
for s = 1, one of the recorded samples of each) from the check's own records, applies the final
check's rule to them with the engine's own functions (`scoring.seed_comes_back`: the seed only if
e^T is demonstrably worse, one-sided paired t-test at 0.05; `scoring.bare_model_wins`:
then the bare model if its mean f is higher) and scores the choice by its held-out mean: the bare
model by Q's row, the seed by Q+IF's (the runs of session 14 were seeded from Q+IF), e^T by PICACO's. The average
over runs and draws says what a smaller check would have returned on these runs. The last line is
what the full check would have returned had no round changed the seed (the seed against the bare
model): the limit of an incumbent advantage no candidate passes. No model is called.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

from picaco.optimize.pools import Scored
from picaco.optimize.rundir import instruction_hash
from picaco.optimize.scoring import bare_model_wins, seed_comes_back

ARMS = ("bare", "seed", "eT")


def load(run_dir: Path, summaries: list[Path], seed_method: str, et_method: str):
    prov = json.loads((run_dir / "provenance.json").read_text())
    kept = prov.get("final_queries")
    if not kept:
        raise SystemExit(f"{run_dir}: its final check ran on no kept-aside queries (final_queries)")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    hashes = {"bare": instruction_hash(""), "seed": instruction_hash(prov["seed_instruction"]),
              "eT": instruction_hash(rounds[-1]["instruction"])}
    samples: dict[str, dict[str, dict[int, Scored]]] = {a: collections.defaultdict(dict) for a in ARMS}
    for line in (run_dir / "responses.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["phase"] != "final" or r["query_id"] not in kept:
            continue
        for arm, h in hashes.items():
            if r["instruction_hash"] == h:
                samples[arm][r["query_id"]][r["sample"]] = Scored.from_record(r)
    methods: dict = {}
    for summary in summaries:
        methods.update(json.loads(summary.read_text())["methods"])
    held_out = {"bare": methods["Q"]["mean"], "seed": methods[seed_method]["mean"],
                "eT": methods[et_method]["mean"]}
    return kept, samples, held_out


def choose(samples, picks: list[tuple[str, list[int]]]) -> str:
    """The final check's choice on the given (query, samples) picks (as `Engine._select_final` and `_bare_wins` decide)."""
    drawn = {a: [samples[a][q][j] for q, js in picks for j in js] for a in ARMS}
    pick = "seed" if seed_comes_back(drawn["eT"], drawn["seed"])[0] else "eT"
    return "bare" if bare_model_wins(drawn[pick], drawn["bare"], kept_aside=True)[0] else pick


def choose_without_rounds(samples, picks: list[tuple[str, list[int]]]) -> str:
    """The check's choice had no round changed the seed (e^T = the seed): the seed or the bare model."""
    drawn = {a: [samples[a][q][j] for q, js in picks for j in js] for a in ("bare", "seed")}
    return "bare" if bare_model_wins(drawn["seed"], drawn["bare"], kept_aside=True)[0] else "seed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR=EVAL_SUMMARY_JSON[,MORE_SUMMARY_JSON][=ET_METHOD]")
    ap.add_argument("--repeats", type=int, default=200, help="random draws per size and run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="", help="kept-aside query counts to replay, comma-separated "
                    "(default: all of them, 10, 8 and 6)")
    ap.add_argument("--seed-method", default="Q+IF", help="the summaries' row holding the seed's held-out mean")
    ap.add_argument("--et-method", default="PICACO", help="the summaries' row holding e^T's held-out mean")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        label, run_dir, summaries, *et_method = spec.split("=")
        runs.append((label, *load(Path(run_dir), [Path(p) for p in summaries.split(",")],
                                  args.seed_method, (et_method or [args.et_method])[0])))
    rng = random.Random(args.seed)
    always_et = sum(h["eT"] for *_, h in runs) / len(runs)
    print(f"{len(runs)} runs; held-out mean of e^T (no final check): {always_et:.3f}")
    print("| kept-aside queries | samples each | held-out mean of the choice | bare / seed / e^T chosen |")
    print("|---|---|---|---|")
    full = min(len(kept) for _, kept, *_ in runs)
    # samples per query and arm the checks recorded (the fewest over runs, arms and queries)
    recorded = min(len(samples[a][q]) for _, kept, samples, _ in runs for a in ARMS for q in kept)
    sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else [full, 10, 8, 6]
    for k in sorted({k for k in sizes if k <= full}, reverse=True):
        for n in (2, 1) if recorded >= 2 else (1,):
            every = k == full and n == recorded  # the check as it ran: one draw is all there is
            total, count, chosen = 0.0, 0, collections.Counter()
            for _ in range(1 if every else args.repeats):
                for _, kept, samples, held_out in runs:
                    queries = kept if every else rng.sample(kept, k)
                    picks = [(q, list(range(n)) if n == recorded else [rng.randrange(recorded)])
                             for q in queries]
                    arm = choose(samples, picks)
                    total += held_out[arm]
                    count += 1
                    chosen[arm] += 1
            share = " / ".join(f"{chosen[a] / count:.0%}" for a in ARMS)
            print(f"| {k} | {n} | {total / count:.3f} | {share} |")
    # the limit of an incumbent advantage that no candidate ever passes: the rounds change nothing
    limit = [held_out[choose_without_rounds(samples, [(q, list(range(recorded))) for q in kept])]
             for _, kept, samples, held_out in runs]
    print(f"\nHad no round changed the seed, the full check would return prompts scoring "
          f"{sum(limit) / len(limit):.3f} held out (per run: {', '.join(f'{x:.2f}' for x in limit)}).")


if __name__ == "__main__":
    main()

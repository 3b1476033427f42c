"""How much of a difference between two methods is response noise? Reads an evaluation with two or
more responses per held-out query (`picaco evaluate --samples 3` or `picaco compare --samples 3`).

    python bench/response_noise.py results/s3-helpfulness-4 [--focus PICACO]

Per method, the response noise: the variance of one response's mean rating (over the values) around
its query's mean, pooled over queries (ddof = 1 within each query). Per pair (the focus method
against each other one), the same for the difference of the two methods' responses drawn with the
same seed (sample j of both; `evaluate` gives sample j of every method the same seed, so this
counts what the two draws share), noise_d. With S responses a query and per-query differences d of
the S-response means, var(d) = var_q + noise_d / S, so the variance that would stay with endlessly
many responses is var_q = var(d) − noise_d / S (floored at 0). From these, the share of a
one-response difference's variance that is response noise, and the queries a paired test at 0.05
needs for 80% power on the observed mean difference with 1, S and 10 responses a query and with
no response noise at all (`picaco.evaluate.metrics.queries_to_detect`). The split is the one the
report makes of a run's decisions (`picaco.report.rundata.decision_noise`). No model is called.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picaco.evaluate.metrics import queries_to_detect  # noqa: E402
from picaco.report.rundata import decision_noise  # noqa: E402


def per_query_samples(eval_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """method -> query id -> sample index -> the mean rating (over scored values) of that response."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for line in (eval_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rated = [v for v in row["ratings"].values() if v is not None]
        if rated:
            out[row["method"]][row["query_id"]][int(row["sample"])] = float(np.mean(rated))
    return out


def needed(variance: float, difference: float) -> str:
    n = queries_to_detect(variance, difference)
    return "–" if n is None else f"{n:,}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path, help="evaluation directories (with samples.jsonl)")
    ap.add_argument("--focus", default="PICACO")
    args = ap.parse_args(argv)
    for d in args.eval_dirs:
        data = per_query_samples(d)
        if args.focus not in data:
            ap.error(f"{d}: no {args.focus} rows")
        S = min(len(xs) for m in data.values() for xs in m.values())
        if S < 2:
            ap.error(f"{d}: a query with one response; evaluate with --samples 2 or more")
        # the same split the report makes of a run's decisions: d[q, s] = mu + a[q] + e[q, s]
        noise = {m: decision_noise([{(q, j): x for q, xs in by_q.items() for j, x in xs.items()}]).var_sample
                 for m, by_q in data.items()}
        print(f"### {d.name}: {S} responses a query\n")
        print("response noise (variance of one response's mean rating within its query): " +
              ", ".join(f"{m} {noise[m]:.3f}" for m in data) + "\n")
        print(f"| {args.focus} against | mean difference ({S} responses) | var of one-response difference "
              f"| of it response noise | queries for 80% power: 1 response | {S} | 10 | no response noise |")
        print("|---|---|---|---|---|---|---|---|")
        mine = data[args.focus]
        for other, theirs in data.items():
            if other == args.focus:
                continue
            # per query, the differences of the responses drawn with the same seed
            paired = {(q, j): mine[q][j] - theirs[q][j] for q in sorted(set(mine) & set(theirs))
                      if all(j in mine[q] and j in theirs[q] for j in range(S)) for j in range(S)}
            split = decision_noise([paired])
            noise_d, var_q = split.var_sample, split.var_query
            one = var_q + noise_d
            mean = float(np.mean(list(paired.values())))
            print(f"| {other} | {mean:+.3f} | {one:.3f} | {noise_d / one:.0%} | {needed(one, mean)} | "
                  f"{needed(var_q + noise_d / S, mean)} | {needed(var_q + noise_d / 10, mean)} | {needed(var_q, mean)} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

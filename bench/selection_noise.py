"""How many training queries does one PICACO decision need? (docs/RESULTS.md, "Selection noise")

    python bench/selection_noise.py results/v3-helpfulness-4 results/v3-harmlessness-4 ...

Reads the `picaco-run/responses.jsonl` of each compare directory; no model is called. In sampling
mode every round samples the incumbent and each candidate on the same (query, seed) pairs (common
random numbers), so each candidate gives paired differences d[q, s] = candidate - incumbent per
query q and sample s, in two units: the objective's response score f, and the mean 1-5 rating over
the values (what the held-out table reports). A random-effects split of the paired differences,

    d[q, s] = mu + a[q] + e[q, s],   var(a) = instruction x query interaction, var(e) = sampling noise,

gives the standard error of a decision on n_q queries with n_s samples each:
sqrt(var(a) / n_q + var(e) / (n_q n_s)). var(a) does not shrink with more samples of the same
queries: it is why a candidate that wins on the 6 training queries need not win on held-out ones.

The held-out side: the variance over queries of the paired differences between PICACO's instruction
and each other method in `eval/samples.jsonl` (40 queries, one sample each) is the same var(a) +
var(e), measured on queries the optimizer never saw.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def mean_rating(row: dict) -> float | None:
    ratings = [s["rating"] for s in row.get("scores", {}).values() if s.get("rating") is not None]
    return float(np.mean(ratings)) if ratings else None


def paired_differences(rows: list[dict], unit: str) -> list[dict[tuple[str, int], float]]:
    """Per round and candidate: {(query, seed): candidate - incumbent} on the shared seeds."""
    value = (lambda r: r.get("f")) if unit == "f" else mean_rating
    by = defaultdict(dict)  # (round, phase, hash) -> {(query, seed): value}
    for r in rows:
        if r["phase"] in ("enhance", "candidate") and value(r) is not None:
            by[(r["round"], r["phase"], r["instruction_hash"])][(r["query_id"], r["seed"])] = value(r)
    out = []
    for (rnd, phase, ihash), cand in sorted(by.items()):
        if phase != "candidate":
            continue
        incumbents = [v for (r2, p2, _), v in by.items() if r2 == rnd and p2 == "enhance"]
        if not incumbents:
            continue
        inc = incumbents[0]
        shared = sorted(set(cand) & set(inc))
        if shared:
            out.append({k: cand[k] - inc[k] for k in shared})
    return out


def variance_components(diffs: list[dict[tuple[str, int], float]]) -> tuple[float, float, int, int]:
    """Pooled one-way random-effects (method of moments) over candidates: (var_a, var_e, n_q, n_s)."""
    within, between, n_s_all, n_q_all = [], [], [], []
    for d in diffs:
        per_q = defaultdict(list)
        for (q, _), x in d.items():
            per_q[q].append(x)
        groups = [np.array(v) for v in per_q.values() if len(v) >= 2]
        if len(groups) < 2:
            continue
        n_s = min(len(g) for g in groups)
        groups = [g[:n_s] for g in groups]
        means = np.array([g.mean() for g in groups])
        within.append(np.mean([g.var(ddof=1) for g in groups]))
        between.append(means.var(ddof=1))
        n_s_all.append(n_s)
        n_q_all.append(len(groups))
    if not within:
        raise SystemExit("no paired candidate samples found (sampling-mode runs only)")
    var_e = float(np.mean(within))
    n_s = int(round(np.mean(n_s_all)))
    var_a = max(0.0, float(np.mean(between)) - var_e / n_s)
    return var_a, var_e, int(round(np.mean(n_q_all))), n_s


def decision_se(var_a: float, var_e: float, n_q: int, n_s: int) -> float:
    return math.sqrt(var_a / n_q + var_e / (n_q * n_s))


def heldout_variance(eval_dir: Path, final: str = "PICACO") -> tuple[float, int] | None:
    """Mean over the other methods of var_q(final - method) in mean rating, one held-out sample per
    query: the held-out counterpart of var(a) + var(e). None without an evaluation."""
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        return None
    by = defaultdict(dict)
    for line in path.open():
        r = json.loads(line)
        ratings = [x for x in (r.get("ratings") or {}).values() if x is not None]
        if ratings:
            by[r["method"]][r["query_id"]] = float(np.mean(ratings))
    if final not in by:
        return None
    variances = []
    for method, per in by.items():
        shared = [q for q in per if q in by[final]]
        if method != final and len(shared) >= 2:
            variances.append(float(np.var([by[final][q] - per[q] for q in shared], ddof=1)))
    return (float(np.mean(variances)), len(by[final])) if variances else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dirs", type=Path, nargs="+")
    ap.add_argument("--effect", type=float, default=0.1,
                    help="mean-rating difference a decision should resolve (default 0.1)")
    args = ap.parse_args()
    print("| set | unit | candidates | var(a) query x instruction | var(e) sampling | SE now "
          f"(n_q x n_s) | queries for SE = {args.effect}/2 (2 samples) |")
    print("|---|---|---|---|---|---|---|")
    for d in args.compare_dirs:
        rows = [json.loads(line) for line in (d / "picaco-run" / "responses.jsonl").open()]
        for unit in ("f", "rating"):
            diffs = paired_differences(rows, unit)
            var_a, var_e, n_q, n_s = variance_components(diffs)
            se = decision_se(var_a, var_e, n_q, n_s)
            need = "" if unit == "f" else str(math.ceil((var_a + var_e / 2) / (args.effect / 2) ** 2))
            print(f"| {d.name.removeprefix('v3-')} | {unit} | {len(diffs)} | {var_a:.3f} | {var_e:.3f} | "
                  f"{se:.3f} ({n_q} x {n_s}) | {need} |")
        held = heldout_variance(d / "eval")
        if held is not None:
            print(f"| {d.name.removeprefix('v3-')} held-out | rating | PICACO vs each method | "
                  f"var(a) + var(e) = {held[0]:.3f} | | SE {math.sqrt(held[0] / held[1]):.3f} "
                  f"({held[1]} x 1) | |")

if __name__ == "__main__":
    main()

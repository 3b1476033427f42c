"""How many training queries does one PICACO decision need? (docs/RESULTS.md, "Selection noise")

    python bench/selection_noise.py results/v3-helpfulness-4 results/v3-harmlessness-4 ...

Reads the `picaco-run/responses.jsonl` of each compare directory; no model is called. In sampling
mode every round samples the incumbent and each candidate on the same (query, seed) pairs (common
random numbers), so each candidate gives paired differences d[q, s] = candidate - incumbent per
query q and sample s, in mean 1-5 rating over the values (the unit of the held-out tables). A
random-effects split of the paired differences (picaco.report.rundata.decision_noise; the run report
shows the same numbers for any run),

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
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picaco.report.rundata import decision_noise, paired_differences  # noqa: E402


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
    target = args.effect / 2
    print("| set | candidates | var(a) query x instruction | var(e) sampling | SE of one decision "
          f"(n_q x n_s) | queries for SE = {target:g} (2 samples) | held-out var(a) + var(e) (40 x 1) |")
    print("|---|---|---|---|---|---|---|")
    for d in args.compare_dirs:
        rows = [json.loads(line) for line in (d / "picaco-run" / "responses.jsonl").open()]
        noise = decision_noise(paired_differences(rows))
        if noise is None:
            raise SystemExit(f"{d}: no paired candidate samples (sampling-mode runs only)")
        held = heldout_variance(d / "eval")
        print(f"| {d.name.removeprefix('v3-')} | {noise.candidates} | {noise.var_query:.3f} | "
              f"{noise.var_sample:.3f} | {noise.se():.3f} ({noise.n_queries} x {noise.n_samples}) | "
              f"{noise.queries_for(target)} | {'' if held is None else f'{held[0]:.3f}'} |")


if __name__ == "__main__":
    main()

"""Rescore a compare's held-out answers with both cross-fitted offline judges (docs/RESULTS.md,
"Both judges on the same held-out answers").

    python bench/rescore.py results/v3-helpfulness-4 helpfulness-4   # a compare or evaluate directory

Prints, per method, the mean of per-value mean ratings under the optimization judge (train half 0)
and the evaluation judge (train half 1) of the bundled labeled data as it is now.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picaco.embeddings import shared_embedder  # noqa: E402
from picaco.evaluate.harness import read_rows  # noqa: E402
from picaco.judge.offline import OfflineConfig, OfflineJudge  # noqa: E402
from picaco.values import load_value_set  # noqa: E402
from results_table import evaluation_file  # noqa: E402  (bench/, the script's own directory)


async def mean_by_method(rows: list[dict], value_set, half: int) -> dict[str, float]:
    judge = OfflineJudge(shared_embedder(), config=OfflineConfig(half=half))
    scores = await judge.score(value_set, [(r["query"], r["response"]) for r in rows])
    per = defaultdict(lambda: defaultdict(list))
    for r, s in zip(rows, scores):
        for v in value_set.ids:
            if s[v].rating is not None:
                per[r["method"]][v].append(s[v].rating)
    return {m: statistics.mean(statistics.mean(x) for x in pv.values()) for m, pv in per.items()}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir", type=Path, help="a `picaco compare` or `picaco evaluate` output directory")
    ap.add_argument("value_set")
    args = ap.parse_args()
    samples = evaluation_file(args.compare_dir, "samples.jsonl")
    if not samples.is_file():
        sys.exit(f"error: no samples.jsonl in {args.compare_dir} or its eval/ (expected a `picaco "
                 "compare -o DIR` or `picaco evaluate -o DIR` directory)")
    rows = read_rows(samples)
    vs = load_value_set(args.value_set)
    half0 = await mean_by_method(rows, vs, 0)
    half1 = await mean_by_method(rows, vs, 1)
    print("| method | half 0 | half 1 |\n|---|---|---|")
    for m in half0:
        print(f"| {m} | {half0[m]:.2f} | {half1[m]:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())

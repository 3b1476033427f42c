"""How much evidence is behind each change of instruction a sampling-mode run made? (docs/RESULTS.md)

    PYTHONPATH=. .venv/bin/python bench/change_evidence.py RUN_DIR [RUN_DIR ...]

Reads each run directory's `rounds.jsonl` and `responses.jsonl`; no model is called. In sampling mode
a round samples the incumbent (its enhance phase) and every candidate on the same (query, seed) pairs,
and the candidate with the highest mean f replaces the incumbent, however small its lead. For every
round that changed the instruction this prints the one-sided paired p value that the incumbent is
worse than its replacement (`scoring.worse_p_value`, the final check's test, over the round's
queries), and then how many changes had p below some levels. A round that appears in several
directories (a run copied to be ended again, or two runs that share their first rounds) counts once.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from picaco.optimize.pools import Scored
from picaco.optimize.scoring import worse_p_value

LEVELS = (0.05, 0.1, 0.2, 0.3)


def round_samples(responses: list[dict], instruction_hash: str, round: int) -> list[Scored]:
    """The samples an instruction got on a round's seeds (as incumbent or as candidate), one per
    (query, sample)."""
    picked = {}
    for r in responses:
        if (r["instruction_hash"] == instruction_hash and r["round"] == round
                and r["phase"] in ("enhance", "candidate")):
            picked[(r["query_id"], r["sample"])] = Scored.from_record(r)
    return list(picked.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (sampling mode)")
    args = ap.parse_args()
    seen: set[tuple] = set()
    kept, p_values = 0, []
    print("| run | round | mean f: incumbent -> replacement | p (incumbent worse) |")
    print("|---|---|---|---|")
    for run in args.runs:
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        if not rounds or rounds[0].get("mode") != "sampling":
            continue
        responses = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
        for rd in rounds:
            key = (rd["previous_hash"], rd["instruction_hash"], rd["round"])
            if key in seen:
                continue
            seen.add(key)
            if not rd["changed"]:
                kept += 1
                continue
            incumbent = round_samples(responses, rd["previous_hash"], rd["round"])
            replacement = round_samples(responses, rd["instruction_hash"], rd["round"])
            p = worse_p_value(incumbent, replacement)
            p_values.append(p)
            print(f"| {run} | {rd['round']} | {rd['objective_previous']:.2f} -> {rd['objective']:.2f} "
                  f"| {p:.3f} |")
    print()
    print(f"{len(p_values) + kept} distinct rounds: {kept} kept the incumbent, {len(p_values)} replaced it.")
    if p_values:
        print(f"median p of a replacement: {statistics.median(p_values):.2f}; "
              + ", ".join(f"p < {a}: {sum(p < a for p in p_values)}" for a in LEVELS))


if __name__ == "__main__":
    main()

"""Would the `balance` term of f have chosen differently? Replays a finished sampling-mode run.

    python bench/balance_replay.py results/v3-harmlessness-4/picaco-run [--balance 0 0.25 0.5 1]

In sampling mode a candidate's responses do not depend on f (same seeds for every candidate of a
round), so its mean f under another `balance` can be recomputed from `responses.jsonl` exactly, and
each round's choice among the same candidates replayed. Later rounds' candidates would differ once a
choice differs, so only the first differing round is a like-for-like comparison; the table marks it.
Per candidate it also prints the mean 1-5 rating per value and their coefficient of variation.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from picaco import objective
from picaco.optimize.rundir import RunDir
from picaco.values import load_value_set


def replay(run_dir: Path, balances: list[float]) -> list[str]:
    rundir = RunDir(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    params = config["fingerprint"]["params"]
    if config["fingerprint"]["mode"] != "sampling":
        raise SystemExit(f"{run_dir}: not a sampling-mode run; its choices depend on f through the pools")
    responses = defaultdict(list)
    for r in rundir.records("responses.jsonl"):
        # a round's current instruction was sampled with the same seeds in its enhancement step
        if r["phase"] in ("candidate", "enhance") and r["f"] is not None:
            responses[(r["round"], r["instruction_hash"])].append(r)
    scores = [c for c in rundir.records("candidates.jsonl") if c["kind"] == "score"]
    value_set = load_value_set(config["run_config"]["values"])
    if value_set.fingerprint() != config["fingerprint"]["value_set"]["fingerprint"]:
        raise SystemExit(f"{run_dir}: the value set {value_set.name!r} changed since the run")
    weights = value_set.weights()
    rows: dict[int, list[tuple[str, dict[float, float], dict[str, float], str]]] = defaultdict(list)
    for c in scores:
        group = responses.get((c["round"], c["instruction_hash"]))
        if not group:
            raise SystemExit(f"{run_dir}: no responses of {c['instruction_hash']} in round {c['round']}")
        mean_f = {}
        for b in balances:
            fs = [objective.response_score({k: v["prob"] for k, v in r["scores"].items()}, weights,
                                           r["log_qphi"], params["beta"], b) for r in group]
            mean_f[b] = float(np.mean(fs))
        ratings = {k: float(np.mean([r["scores"][k]["rating"] for r in group
                                     if r["scores"][k]["rating"] is not None])) for k in weights}
        rows[c["round"]].append((c["instruction_hash"][:8], mean_f, ratings, c["instruction"]))
    head = "| round | instruction | " + " | ".join(f"mean f, balance {b}" for b in balances)
    lines = [head + " | ratings | CV |", "|" + "---|" * (len(balances) + 4)]
    first_difference = None
    for rnd in sorted(rows):
        cands = rows[rnd]
        picks = {b: max(range(len(cands)), key=lambda i: (cands[i][1][b], -i)) for b in balances}
        if first_difference is None and len(set(picks.values())) > 1:
            first_difference = rnd
        for i, (h, mean_f, ratings, text) in enumerate(cands):
            cells = [f"**{mean_f[b]:.3f}**" if picks[b] == i else f"{mean_f[b]:.3f}" for b in balances]
            vals = np.array(list(ratings.values()))
            label = f"{h}{' (current)' if i == 0 else ''}: {text[:50].replace('|', '/').replace(chr(10), ' ')}…"
            lines.append(f"| {rnd} | {label} | " + " | ".join(cells)
                         + f" | {' '.join(f'{k[:5]} {v:.2f}' for k, v in ratings.items())} | "
                         f"{vals.std() / vals.mean():.3f} |")
    lines.append("")
    lines.append("bold: the pick under that balance (ties keep the current instruction). "
                 + ("All balances pick the same instruction in every round."
                    if first_difference is None else
                    f"The picks first differ in round {first_difference}; later rounds are not comparable."))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--balance", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    print("\n".join(replay(args.run_dir, args.balance)))


if __name__ == "__main__":
    main()

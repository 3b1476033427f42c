"""Assemble docs/RESULTS.md's comparison tables from `picaco compare` output directories.

    python bench/results_table.py results/helpfulness-4 results/confucianism-4 > table.md
    python bench/results_table.py --overview results/helpfulness-4 results/confucianism-4

Each argument is a `picaco compare -o DIR` directory (its `eval/summary.json` is read, and
`picaco-run/accounting.json` for PICACO's optimization spend) or a `picaco evaluate -o DIR` one (its
`summary.json`). Nothing is recomputed here: every
number comes from the summaries, so the table is exactly what the commands produced.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


#: rows in the paper's order: the bare model, the prompting baselines, the optimizers, PICACO last
METHOD_ORDER = ("Q", "Q+IF", "URIAL", "URIAL+Sum", "MP", "Modular", "OPRO", "GEPA", "PICACO")


def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _ci(pair, fmt=_f) -> str:
    if not pair or pair[0] is None:
        return ""
    return f" [{fmt(pair[0])}, {fmt(pair[1])}]"


def optimization_requests(compare_dir: Path) -> dict[str, str]:
    """Model requests each optimizing method spent before evaluation, cache hits included (the unit
    of the shared budget): PICACO's from its run's accounting, OPRO's and GEPA's (with the budget they
    were held to) from the provenance the harness recorded in `eval/methods.json`."""
    spend: dict[str, str] = {}
    acc = compare_dir / "picaco-run" / "accounting.json"
    if acc.is_file():
        total = json.loads(acc.read_text()).get("total") or {}
        spend["PICACO"] = str(int(total.get("calls", 0)) + int(total.get("cache_hits", 0)))
    methods = compare_dir / "eval" / "methods.json"
    if methods.is_file():
        for name, desc in json.loads(methods.read_text()).items():
            prov = desc.get("provenance")
            if isinstance(prov, str):
                try:
                    prov = ast.literal_eval(prov)
                except (ValueError, SyntaxError):
                    prov = None
            if isinstance(prov, dict) and "spent" in prov:
                spend[name] = f"{prov['spent']} of {prov.get('max_calls', '?')}"
    return spend


def evaluation_file(d: Path, name: str) -> Path:
    """A file of the evaluation in `d`: a `picaco compare -o` directory keeps it in eval/, a `picaco
    evaluate -o` directory in itself."""
    return d / "eval" / name if (d / "eval" / name).is_file() else d / name


def summary_file(d: Path) -> Path:
    """A `picaco compare -o` directory's evaluation summary, or an evaluation directory's own."""
    return evaluation_file(d, "summary.json")


def pair(summary: dict, a: str, b: str) -> dict | None:
    """The pairwise test of methods a and b from a summary (either order), or None."""
    for p in summary.get("friedman", {}).get("pairs", []):
        if {p["a"], p["b"]} == {a, b}:
            return p
    return None


def _need(p: dict | None) -> str:
    """Queries a paired test needs to tell the pair apart 80% of the time (summaries older than the
    column have none)."""
    if p is None or "queries_for_power" not in p:
        return "–"
    return "no difference" if p["queries_for_power"] is None else f"{p['queries_for_power']:,}"


def set_table(compare_dir: Path, focus: str = "PICACO") -> str:
    summary = json.loads(summary_file(compare_dir).read_text())
    spend = optimization_requests(compare_dir)
    name = summary["value_set"]["name"]
    judge = summary.get("judge", {})
    lines = [
        f"### {name}",
        "",
        f"{summary['queries']['n']} held-out queries, target `{summary['target'].get('model', '?')}`, "
        f"evaluation judge `{judge.get('kind', '?')}` ({judge.get('weights', judge.get('backend', ''))}); "
        f"same judge as optimization: {'YES' if summary.get('same_judge') else 'no'}.",
        "",
        f"| method | mean (1–5) [95% CI] | lowest value | CV ↓ [95% CI] | dropped ↓ | fake ↓ | win vs Q | "
        f"p vs {focus} (Holm) | queries to tell from {focus} | optimization requests | calls/query |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    for m, s in sorted(summary["methods"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        ci = s.get("ci", {})
        p = None if m == focus else pair(summary, m, focus)
        lines.append(
            f"| {m} | {_f(s['mean'])}{_ci(ci.get('mean'))} | {_f(s['lowest'])} ({s.get('lowest_value') or '–'}) | "
            f"{_f(s['cv'], 3)}{_ci(ci.get('cv'), lambda x: _f(x, 3))} | {_pct(s['dropped_share'])} | "
            f"{_pct(s['fake_rate'])} | {_pct(s['win_rate'])} | {_f(p['p_holm'], 3) if p else '–'} | "
            f"{'–' if m == focus else _need(p)} | {spend.get(m, '–')} | {s.get('calls_per_query', '–')} |"
        )
    fr = summary.get("friedman", {})
    if fr.get("statistic") is not None:
        lines += ["", f"Friedman over {fr['n_queries']} queries: χ² = {fr['statistic']:.2f}, "
                      f"p = {fr['p_value']:.3g}, Kendall's W = {fr['kendalls_w']:.3f}."]
    for w in summary.get("warnings", []):
        lines += ["", f"> {w}"]
    return "\n".join(lines) + "\n"


def overview(compare_dirs: list[Path], focus: str = "PICACO") -> str:
    """One row a set: every method's mean and CV, the best mean and the lowest CV in bold, and how
    many queries would tell `focus` from the best other method on mean."""
    summaries = [json.loads(summary_file(d).read_text()) for d in compare_dirs]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    methods = sorted({m for s in summaries for m in s["methods"]}, key=lambda m: (order.get(m, len(order)), m))
    lines = ["Mean conformity (1–5) / CV across values; bold: the set's best mean and lowest CV.", "",
             "| set | " + " | ".join(methods) + f" | best other | queries to tell {focus} from it |",
             "|---|" + "---|" * (len(methods) + 2)]
    for s in summaries:
        got = s["methods"]
        best_mean = max(v["mean"] for v in got.values() if v["mean"] is not None)
        best_cv = min(v["cv"] for v in got.values() if v["cv"] is not None)
        cells = []
        for m in methods:
            v = got.get(m)
            if v is None:
                cells.append("–")
                continue
            mean, cv = _f(v["mean"]), _f(v["cv"], 3)
            cells.append(f"{f'**{mean}**' if v['mean'] == best_mean else mean} / "
                         f"{f'**{cv}**' if v['cv'] == best_cv else cv}")
        others = [m for m in got if m != focus and got[m]["mean"] is not None]
        best = max(others, key=lambda m: got[m]["mean"]) if others and focus in got else None
        lines.append(f"| {s['value_set']['name']} | " + " | ".join(cells) +
                     f" | {best or '–'} | {_need(pair(s, best, focus)) if best else '–'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("compare_dirs", nargs="+", type=Path,
                        help="`picaco compare -o` directories (or `picaco evaluate -o` ones)")
    parser.add_argument("--overview", action="store_true",
                        help="one table with a row a set instead of a table a set")
    args = parser.parse_args(argv)
    for d in args.compare_dirs:
        if not summary_file(d).is_file():
            parser.error(f"{d}: no eval/summary.json or summary.json (not a finished `picaco compare` "
                         "or `picaco evaluate` directory)")
    if args.overview:
        print(overview(args.compare_dirs))
        return 0
    for d in args.compare_dirs:
        print(set_table(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

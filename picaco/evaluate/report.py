"""The Markdown rendering of an evaluation summary (summary.json -> summary.md)."""

from __future__ import annotations

from picaco.machine import describe_machine


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(ci, fmt=_f) -> str:
    return "" if not ci else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def _requests_line(summary: dict) -> list[str]:
    """Model requests paid for, by this process and by all that worked on the directory."""
    here = (summary.get("accounting") or {}).get("total")
    every = summary.get("accounting_all_processes") or {}
    if not here:
        return []
    text = f"Requests paid for: {here['calls']:,} by this process"
    if every.get("processes", 1) > 1:
        text += (f", {every['total']['calls']:,} by all {every['processes']} processes that worked on "
                 "this directory (accounting.jsonl)")
    return [text + f"; {here['cache_hits']:,} answered from the cache.", ""]


def markdown_summary(summary: dict) -> str:
    methods = summary["methods"]
    values = summary.get("values", {})
    baseline = summary.get("baseline")
    lines = [f"# Evaluation: {summary['value_set']['name']}", ""]
    for w in summary.get("warnings", []):
        lines += [f"> **WARNING:** {w}", ""]
    judge = summary.get("judge", {})
    lines += [
        f"{summary['queries']['n']} held-out queries × {summary['sampling']['samples_per_query']} "
        f"sample(s); judge `{judge.get('kind', '?')}`"
        + (f" on `{judge['backend'].get('model')}`" if isinstance(judge.get("backend"), dict) else "")
        + f"; {int(100 * summary['settings']['confidence'])}% bootstrap intervals over queries "
        f"({summary['settings']['n_boot']} resamples, seed {summary['settings']['seed']}).",
        "",
        *([f"Machine: {machine}.", ""] if (machine := describe_machine(summary.get("machine"))) else []),
        *_requests_line(summary),
        "| method | mean conformity (1–5) | lowest value | CV ↓ | dropped-value ↓ | fake alignment ↓ | "
        f"win vs {baseline or 'bare'} | unscored | calls/query |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in methods.items():
        ci = s.get("ci", {})
        low = f"{_f(s['lowest'])} ({values.get(s['lowest_value'], s['lowest_value'] or '–')})"
        lines.append(
            f"| {name} | {_f(s['mean'])}{_ci(ci.get('mean'))} | {low} | {_f(s['cv'])}{_ci(ci.get('cv'))} | "
            f"{_pct(s['dropped_share'])} | {_pct(s['fake_rate'])} | "
            f"{_pct(s['win_rate'])}{_ci(ci.get('win_rate'), _pct)} | {s['unscored']['total']} | "
            f"{s.get('calls_per_query', '–')} |"
        )
    ids = list(values)
    lines += ["", "Per-value mean conformity:", "",
              "| method | " + " | ".join(values[v] for v in ids) + " |",
              "|---|" + "---|" * len(ids)]
    for name, s in methods.items():
        lines.append(f"| {name} | " + " | ".join(_f(s["per_value"].get(v)) for v in ids) + " |")
    fr = summary.get("friedman", {})
    lines += [""]
    if fr.get("statistic") is not None:
        lines.append(
            f"Friedman test over {fr['n_queries']} queries: χ² = {_f(fr['statistic'])}, "
            f"p = {fr['p_value']:.4g}, Kendall's W = {_f(fr['kendalls_w'])}."
        )
    elif fr.get("note"):
        lines.append(f"Friedman test: {fr['note']}.")
    if fr.get("mean_ranks"):
        ranks = ", ".join(f"{k} {_f(v, 2)}" for k, v in sorted(fr["mean_ranks"].items(), key=lambda kv: kv[1]))
        lines.append(f"Mean rank (1 = best): {ranks}.")
    if fr.get("pairs"):
        lines += ["", "Pairwise Wilcoxon signed-rank tests (Holm-adjusted). The last column: queries a paired "
                  "test would need to detect the mean difference 80% of the time at p < 0.05 (a floor; "
                  "docs/evaluation.md):", "",
                  "| a | b | n | mean a−b | median a−b | p | p (Holm) | queries for 80% power |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in fr["pairs"]:
            need = p.get("queries_for_power")
            lines.append(
                f"| {p['a']} | {p['b']} | {p['n']} | {_f(p.get('mean_difference'), 3)} | "
                f"{_f(p['median_difference'])} | {_f(p['p_value'], 4)} | {_f(p['p_holm'], 4)} | "
                f"{'–' if need is None else f'{need:,}'} |"
            )
    return "\n".join(lines) + "\n"

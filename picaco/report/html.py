"""`write_report`: one self-contained HTML file for a run directory, and its figures for papers.

The page needs no network: CSS and the figures (SVG) are inline and the only script is a small
inline copy button. Every model text (instructions, queries, responses, proposals) goes through
jinja2's autoescaping, and a Content-Security-Policy allows no script but the report's own (by its
hash), so a response that contains HTML shows as text and could not run even if escaping failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
from markupsafe import Markup

import picaco
from picaco.machine import describe_machine
from picaco.report import figures as F
from picaco.report.rundata import (
    CandidateRow,
    RunData,
    candidate_history,
    examples,
    gain_and_noise,
    held_out_pairs,
    load_compare,
    load_run,
    overall,
    pairs,
    rating_of,
    read_compare,
    round_means,
    seed_final_scores,
    weakest_values,
)

#: how many of the lowest-scoring values get before/after examples
WEAKEST_VALUES = 3
#: the rating difference the noise note says a decision would need to resolve (at two standard errors)
RESOLVE_DIFFERENCE = 0.1

# The report's only script. It marks the document (so a browser test can tell scripts ran) and wires
# the copy buttons; clipboard access can be refused on file:// pages, so selection + execCommand
# is the fallback.
COPY_JS = """\
document.documentElement.dataset.js = "ready";
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  button.addEventListener("click", function () {
    var source = document.getElementById(button.dataset.copy);
    var text = source.textContent;
    function done(ok) {
      button.textContent = ok ? "Copied" : "Press Ctrl+C";
      setTimeout(function () { button.textContent = "Copy"; }, 1800);
    }
    function fallback() {
      var range = document.createRange();
      range.selectNodeContents(source);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      done(ok);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else {
      fallback();
    }
  });
});
"""


def write_report(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    *,
    compare: Mapping | str | Path | None = None,
    queries: Mapping[str, str] | Sequence | None = None,
) -> Path:
    """Write the HTML report of a run (finished or not) and its figures; return the report's path.

    `out_path` defaults to `RUN_DIR/report.html`; the figures go to a `figures/` folder next to it
    (`scores`, `radar`, `rounds`, each as .svg and .png). `compare` adds other methods' per-value
    mean ratings (1–5) to the radar chart and the score table: a mapping or a JSON file shaped
    ``{"methods": {name: {value_id: mean_rating}}}``. `queries` supplies query texts (a mapping
    id -> text, or Query objects) when the run's queries are not a bundled set.
    """
    run = load_run(run_dir)
    if queries is not None:
        run.query_texts.update(_query_map(queries))
    out = Path(out_path) if out_path is not None else run.path / "report.html"
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    context = build_context(run, compare, out.parent / "figures")
    html = render_html(context)
    _write_atomic(out, html)
    return out


def _query_map(queries) -> dict[str, str]:
    if isinstance(queries, Mapping):
        return {str(k): str(v) for k, v in queries.items()}
    out = {}
    for q in queries:
        if isinstance(q, Mapping):
            out[str(q["id"])] = str(q["text"])
        else:
            out[str(q.id)] = str(q.text)
    return out


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the page -----------------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("picaco.report", "templates"),
        autoescape=True,  # on for every template, whatever its file name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["signed"] = _signed
    env.filters["thousands"] = lambda x: "–" if x is None else f"{int(x):,}"
    env.filters["compact_json"] = lambda x: json.dumps(x, ensure_ascii=False, sort_keys=True)
    return env


def render_html(context: dict) -> str:
    return _environment().get_template("report.html.j2").render(**context)


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}".replace("-", "−")  # a typographic minus, as wide as the plus


def _signed(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}".replace("-", "−")


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
            "img-src data:; base-uri 'none'; form-action 'none'")


def build_context(run: RunData, compare, figure_dir: Path) -> dict:
    matched = pairs(run)
    scores = seed_final_scores(run, matched)
    compare = read_compare(compare)
    methods, compare_notes = load_compare(compare, run.value_ids,
                                          (run.config.get("fingerprint") or {}).get("value_set"))
    # the final check weighed the bare model and returned no instruction: its side is the bare model
    no_instruction = run.returned_no_instruction
    if no_instruction:
        final_label, final_side = "no instruction", "bare model (no instruction)"
    else:
        final_label = "final" if run.final_kind == "final" else "latest"
        final_side = f"{final_label} instruction"
    per_round = round_means(run)
    value_rows = _value_rows(run, scores, methods)
    weak = weakest_values(scores.final if any(v is not None for v in scores.final.values())
                          else scores.seed, WEAKEST_VALUES)
    value_colours = {v: F.SERIES[i % len(F.SERIES)] for i, v in enumerate(run.value_ids)}
    figs, figure_notes = _figures(run, scores, methods, per_round, value_colours, figure_dir,
                                  final_label, final_side)
    history = candidate_history(run)
    gain, noise = gain_and_noise(run, matched)  # is the gain more than the noise of the decisions that found it?
    return {
        "run": run,
        "title": f"picaco report · {run.path.resolve().name}",
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "version": picaco.__version__,
        "status": _status(run),
        "final_label": final_label,
        "final_side": final_side,
        "cards": _cards(run, scores),
        "scores": scores,
        "gain": gain,
        "noise": noise,
        "resolve": RESOLVE_DIFFERENCE,
        "value_rows": value_rows,
        "methods": list(methods),
        "method_colours": _method_colours(methods),
        "compare_notes": compare_notes,
        "held_out": held_out_pairs(compare),
        "figures": {f.name: f for f in figs},
        "figure_notes": figure_notes,
        "figure_dir": figure_dir.name,
        "round_rows": _round_rows(run, per_round),
        "history": _group_history(history),
        "examples": _example_groups(run, matched, weak),
        "weak": weak,
        "same_instruction": run.final_hash == run.seed_hash,
        "no_instruction": no_instruction,
        "accounting": _accounting_rows(run.accounting),
        "estimate": (run.config.get("estimate") or {}),
        "provenance": _provenance_rows(run),
        "params": (run.config.get("fingerprint") or {}).get("params") or {},
        "warnings": _warnings(run),
        "copy_js": Markup(COPY_JS),
        "csp": _csp(COPY_JS),
    }


def _status(run: RunData) -> dict:
    if run.result is None:
        last = _last_phase(run.events)
        detail = (f"No result.json yet: the run is still going or was interrupted{last}. "
                  f"This report shows what it recorded: {len(run.rounds)} finished round(s). "
                  "The instruction shown is the latest one chosen, not a final selection.")
        return {"kind": "incomplete", "label": "not finished", "detail": detail}
    reason = run.result.get("stop_reason", "")
    detail = run.result.get("stop_detail") or ""
    if reason == "budget":
        return {"kind": "budget", "label": "stopped by budget",
                "detail": f"The run stopped at its budget ({detail}). Rounds not reached were not run; "
                          "the final instruction is the best of those that were."}
    label = {"rounds": "finished", "stable": "finished (stable)"}.get(reason, reason or "finished")
    return {"kind": "finished", "label": label, "detail": detail}


def _last_phase(events: list[dict]) -> str:
    for e in reversed(events):
        if e.get("event") in ("phase_start", "phase_end"):
            where = f" round {e['round']}" if e.get("round") is not None else ""
            state = "started" if e["event"] == "phase_start" else "finished"
            return f" (last recorded: {e.get('phase')} phase{where} {state})"
    return ""


def _cards(run: RunData, scores) -> list[dict]:
    params = (run.config.get("fingerprint") or {}).get("params") or {}
    total = (run.accounting.get("total") or {})
    seed_m, final_m = overall(scores.seed), overall(scores.final)
    objective = (run.provenance or {}).get("objective") or {}
    if run.rounds:
        rounds_done = run.result.get("rounds_completed") if run.result else len(run.rounds)
    else:
        rounds_done = 0
    cards = [
        {"label": "values", "value": str(len(run.value_ids)),
         "note": (run.config.get("fingerprint") or {}).get("value_set", {}).get("name", "")},
        {"label": "rounds", "value": f"{rounds_done} / {params.get('rounds', '?')}",
         "note": f"{(run.config.get('fingerprint') or {}).get('mode', '')} mode"},
        {"label": "mean rating", "value": f"{_num(seed_m)} → {_num(final_m)}",
         "note": f"seed → {'final' if run.finished else 'latest'}",
         "delta": None if seed_m is None or final_m is None else final_m - seed_m},
    ]
    if objective.get("seed") is not None or objective.get("final") is not None:
        cards.append({"label": "objective J", "value":
                      f"{_num(objective.get('seed'))} → {_num(objective.get('final'))}",
                      "note": "seed → final, on the final pools"})
    cards.append({"label": "model calls", "value": f"{int(total.get('calls', 0)):,}",
                  "note": f"{int(total.get('cache_hits', 0)):,} cache hits"})
    return cards


def _value_rows(run: RunData, scores, methods: dict) -> list[dict]:
    prov_scores = (run.provenance or {}).get("scores") or {}
    rows = []
    for v in run.value_ids:
        s, f = scores.seed.get(v), scores.final.get(v)
        rows.append({
            "id": v, "title": run.title(v), "weight": run.weights.get(v, 1.0),
            "seed": s, "final": f, "delta": None if s is None or f is None else f - s,
            "q_seed": (prov_scores.get("seed") or {}).get(v),
            "q_final": (prov_scores.get("final") or {}).get(v),
            "methods": [methods[m].get(v) for m in methods],
        })
    return rows


def _method_colours(methods: Mapping) -> dict[str, str]:
    return {m: F.SERIES[i % len(F.SERIES)] for i, m in enumerate(methods)}


def _figures(run: RunData, scores, methods, per_round, value_colours, out_dir: Path,
             final_label: str, final_side: str) -> tuple[list[F.RenderedFigure], list[str]]:
    figs: list[F.RenderedFigure] = []
    notes: list[str] = []
    labels = [run.title(v) for v in run.value_ids]
    seed = [scores.seed.get(v) for v in run.value_ids]
    final = [scores.final.get(v) for v in run.value_ids]
    has_scores = any(x is not None for x in seed + final)
    if has_scores:
        fig = F.build(F.scores_bars, labels, seed, final, final_label=final_label)
        figs.append(F.render(fig, "scores", f"Mean rating per value: seed and {final_side}",
                             out_dir))
    else:
        notes.append("No scored responses yet: the score charts appear after round 1.")
    if has_scores and len(run.value_ids) >= 3:
        series = {"seed": seed, final_label: final}
        colours = {"seed": F.SEED, final_label: F.FINAL}
        for (name, row), colour in zip(methods.items(), _method_colours(methods).values()):
            key = name if name not in series else f"{name} (compared)"
            series[key] = [row.get(v) for v in run.value_ids]
            colours[key] = colour
        fig = F.build(F.radar, labels, series, colours)
        figs.append(F.render(fig, "radar", "Per-value mean rating (radar)", out_dir))
    elif has_scores:
        notes.append("The radar chart needs at least three values.")
    if run.rounds or per_round:
        obj_rounds = [int(r["round"]) for r in run.rounds]
        fig = F.build(
            F.rounds_chart, list(per_round),
            [r.get("objective") for r in run.rounds],
            {run.title(v): [per_round[t].get(v) for t in per_round] for v in run.value_ids},
            {run.title(v): value_colours[v] for v in run.value_ids},
            objective_rounds=obj_rounds,
        )
        figs.append(F.render(fig, "rounds", "Objective and per-value mean rating by round",
                             out_dir))
    else:
        notes.append("No finished round yet: the per-round chart appears after round 1.")
    return figs, notes


def _round_rows(run: RunData, per_round: dict) -> list[dict]:
    rows = []
    for r in run.rounds:
        t = int(r["round"])
        discarded = r.get("discarded") or {}
        rows.append({
            "round": t, "changed": bool(r.get("changed")),
            "objective": r.get("objective"), "objective_previous": r.get("objective_previous"),
            "tc": r.get("tc_bound_previous"),
            "replace_p": r.get("replace_p"),  # only with replace_alpha: the best candidate's evidence
            "proposed": r.get("proposed", 0), "kept": r.get("kept", 0),
            "discarded": ", ".join(f"{k} ×{n}" for k, n in sorted(discarded.items())),
            "mean": overall(per_round.get(t, {})),
        })
    return rows


def _group_history(rows: list[CandidateRow]) -> list[dict]:
    groups: dict[int, list[CandidateRow]] = {}
    for r in rows:
        groups.setdefault(r.round, []).append(r)
    return [{"round": t, "rows": rs} for t, rs in sorted(groups.items())]


def _example_groups(run: RunData, matched, weak: list[str]) -> list[dict]:
    out = []
    for v in weak:
        items = []
        for e in examples(matched, [v]):
            items.append({
                "why": e.why,
                "query_id": e.pair.query_id,
                "query": run.query_texts.get(e.pair.query_id),
                "before": e.pair.before.get("text", ""),
                "after": e.pair.after.get("text", ""),
                "before_rating": rating_of(e.pair.before["scores"].get(v)),
                "after_rating": rating_of(e.pair.after["scores"].get(v)),
                "gain": e.pair.gain(v),
            })
        out.append({"id": v, "title": run.title(v), "shown": items})
    return out


def _accounting_rows(accounting: dict) -> list[dict]:
    rows = []
    for role in [r for r in accounting if r != "total"] + (["total"] if "total" in accounting else []):
        a = accounting[role] or {}
        faults = a.get("faults") or {}
        rows.append({
            "role": role, "total": role == "total",
            "calls": a.get("calls"), "cache_hits": a.get("cache_hits"),
            "prompt_tokens": a.get("prompt_tokens"), "completion_tokens": a.get("completion_tokens"),
            "seconds": a.get("seconds"), "retries": a.get("retries"),
            "faults": ", ".join(f"{k} ×{n}" for k, n in sorted(faults.items())),
        })
    return rows


def _describe_role(identity) -> str:
    if not identity:
        return "–"
    if isinstance(identity, Mapping):
        flat = {k: v for k, v in identity.items() if v is not None and not isinstance(v, Mapping)}
        nested = {k: v for k, v in identity.items() if isinstance(v, Mapping)}
        parts = [f"{k}: {v}" for k, v in flat.items()]
        parts += [f"{k}: ({_describe_role(v)})" for k, v in nested.items()]
        return ", ".join(parts)
    return str(identity)


def _provenance_rows(run: RunData) -> list[dict]:
    fp = run.config.get("fingerprint") or {}
    prov = run.provenance or {}
    vs = prov.get("value_set") or fp.get("value_set") or {}
    rows: list[dict] = [
        {"label": "run directory", "value": str(run.path.resolve()), "code": True},
        {"label": "picaco version", "value": prov.get("picaco_version") or run.config.get("picaco_version")},
        {"label": "config hash", "value": prov.get("config_hash") or run.config.get("config_hash"),
         "code": True},
        {"label": "value set", "value": f"{vs.get('name', '?')} (version {vs.get('version', '?')}, "
                                        f"fingerprint {vs.get('fingerprint', '?')})"},
        {"label": "weights", "value": ", ".join(f"{run.title(v)} {run.weights[v]:g}"
                                                for v in run.value_ids)},
        {"label": "mode", "value": prov.get("mode") or fp.get("mode")},
    ]
    roles = prov.get("roles") or fp
    for role in ("target", "optimizer", "proxy", "judge", "redundancy"):
        if roles.get(role) is not None:
            rows.append({"label": role, "value": _describe_role(roles[role])})
    q = prov.get("queries") or fp.get("queries") or {}
    rows.append({"label": "queries", "value": f"{q.get('n', '?')} (sha256 {str(q.get('sha256', '?'))[:16]})"})
    # the embedded target's answers depend on the CPU and llama.cpp build (picaco.machine)
    rows.append({"label": "machine", "value": describe_machine(prov.get("machine"))})
    rows.append({"label": "llama.cpp build", "value": (prov.get("machine") or {}).get("llama_cpp_system"),
                 "code": True})
    rows.append({"label": "created", "value": run.config.get("created")})
    if prov.get("finished"):
        rows.append({"label": "finished", "value": prov["finished"]})
    if run.config.get("init_from"):
        rows.append({"label": "warm start from", "value": run.config["init_from"], "code": True})
    if prov.get("instruction_sha256"):
        rows.append({"label": "instruction sha256", "value": prov["instruction_sha256"], "code": True})
    if run.result is not None:
        selected = run.result.get("selected_round")
        if selected is None:
            where = "none: the bare model (no instruction) beat the run's choice in the final check"
        elif selected == 0:
            where = "the seed (no round improved on it)"
        elif run.final_hash == run.seed_hash:
            where = f"round {selected}, which kept the seed instruction"
        else:
            where = f"round {selected}"
        rows.append({"label": "selected from", "value": where})
        rows.append({"label": "stop", "value": " — ".join(
            x for x in (run.result.get("stop_reason"), run.result.get("stop_detail")) if x)})
        tc = prov.get("tc_bound") or {}
        if tc.get("seed") is not None or tc.get("final") is not None:
            rows.append({"label": "TC lower bound", "value":
                         f"{_num(tc.get('seed'), 3)} → {_num(tc.get('final'), 3)} (seed → final)"})
    resumes = sum(1 for e in run.events if e.get("event") == "resume")
    if resumes:
        rows.append({"label": "resumed", "value": f"{resumes} time(s)"})
    return [{"code": False, **r} for r in rows if r.get("value")]


def _warnings(run: RunData) -> list[str]:
    seen: dict[str, None] = {}
    for e in run.events:
        if e.get("event") == "warning" and e.get("message"):
            seen[e["message"]] = None
    for n in (run.result or {}).get("notes") or []:
        seen[n] = None
    return list(seen)

"""The HTML report: numbers taken from the run directory, model text escaped, figures written, an
unfinished run reported as such, compared methods drawn; and the page opened in a real headless
Chromium (screenshot not blank, charts in the DOM, the injected script did not run).

The synthetic run directory is written with the engine's own RunDir, OptimizeResult, derive_seed and
instruction_hash, in the record shapes of picaco/optimize/engine.py; one more test reports a run that
the real engine made on the deterministic fake backend, so a change of record shapes shows up here.
"""

from __future__ import annotations

import asyncio
import hashlib
import html as htmllib
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from markupsafe import escape

from picaco.data.queries import Query, load_queries
from picaco.errors import DataError
from picaco.judge.base import ValueScore
from picaco.llm.accounting import Accounting
from picaco.llm.base import GenerateRequest
from picaco.llm.client import LLMClient
from picaco.llm.fake import FakeBackend, default_responder
from picaco.machine import describe_machine
from picaco.optimize import OptimizeParams, optimize
from picaco.optimize.engine import OptimizeResult, derive_seed, instruction_hash
from picaco.optimize.rundir import RunDir
from picaco.report import load_run, write_report
from picaco.values import load_value_set
from support import browser

INJECTION = "<script>document.title='pwned'</script><b>bold</b>"
SEED = ("You are a helpful assistant. Answer the user's request directly and usefully, and let your "
        "answer honour these values: Relevance, Accuracy, Depth and Clarity.")
FINAL = ("Answer the question that was asked, first and plainly. Check facts before stating them. "
         "Give the reasons and one concrete example. Never paste </textarea> or markup into answers.")
OTHER = "Be brief. Use bullet points for every answer."
VALUES = load_value_set("helpfulness-4")
QUERIES = [q for q in load_queries("hh") if q.split == "train"][:3]
PARAMS = OptimizeParams(n_queries=3, samples_per_query=2, aligned_pool_size=2, noisy_pool_size=2,
                        bare_samples=2, candidates=2, rounds=2, patience=None, max_new_tokens=64,
                        minibatch=2, seed=3)

# ratings per (instruction, value): the seed is weak on depth, the final instruction better on all
# but still weakest on depth; query index and sample move a rating by a known step
BASE = {
    SEED: {"relevance": 4.0, "accuracy": 3.0, "depth": 1.5, "clarity": 3.5},
    FINAL: {"relevance": 4.5, "accuracy": 4.0, "depth": 2.5, "clarity": 4.0},
}


def rating(instruction: str, qi: int, sample: int, value: str) -> float:
    r = BASE[instruction][value] + 0.25 * (qi - 1) - 0.25 * sample
    if instruction == FINAL and value == "depth" and qi == 0 and sample == 0:
        r += 2.0  # the injected response below is also the depth example with the largest gain
    return min(5.0, max(1.0, r))


def response_text(instruction: str, qi: int, sample: int) -> str:
    if instruction == FINAL and qi == 0 and sample == 0:
        return INJECTION
    tag = "seed" if instruction == SEED else "final"
    return f"{tag} answer to query {qi}, sample {sample}."


def round_seeds(t: int, q: Query) -> list[int]:
    return [derive_seed(PARAMS.seed, "sample", t, q.id, j) for j in range(PARAMS.samples_per_query)]


def response_record(instruction: str, phase: str, t: int, qi: int, sample: int, seed: int) -> dict:
    """A responses.jsonl record as Engine._response_record writes it."""
    q = QUERIES[qi]
    ihash = instruction_hash(instruction)
    scores = {v: {"prob": min(0.99, max(0.01, (rating(instruction, qi, sample, v) - 1) / 4)),
                  "rating": rating(instruction, qi, sample, v)} for v in VALUES.ids}
    log_conf = sum(math.log(s["prob"]) for s in scores.values())
    return {
        "key": f"{ihash}|{q.id}|{seed}", "phase": phase, "round": t, "instruction_hash": ihash,
        "query_id": q.id, "sample": sample, "seed": seed,
        "text": response_text(instruction, qi, sample), "finish_reason": "stop",
        "completion_tokens": 12, "scores": scores, "unscored": [], "log_conformity": log_conf,
        "log_qphi": -2.0, "f": log_conf + 2.0,
    }


def config_record() -> dict:
    """config.json in the shape of Engine.config()."""
    qblob = json.dumps([[q.id, q.text] for q in QUERIES], ensure_ascii=False).encode()
    fingerprint = {
        "params": PARAMS.model_dump(mode="json"), "mode": "likelihood",
        "value_set": {"name": VALUES.name, "fingerprint": VALUES.fingerprint()},
        "queries": {"n": len(QUERIES), "sha256": hashlib.sha256(qblob).hexdigest()},
        "target": {"role": "target", "kind": "fake", "model": "fake-target"},
        "optimizer": {"role": "optimizer", "kind": "fake", "model": "fake-optimizer"},
        "proxy": None, "judge": {"name": "fake-judge", "identity": {"kind": "fake-judge"}},
        "redundancy": {"kind": "fake-redundancy"}, "seed_instruction": SEED,
    }
    return {"fingerprint": fingerprint, "config_hash": "0123456789abcdef", "picaco_version": "0.1.0",
            "created": "2026-01-02T03:04:05+0000", "init_from": None,
            "query_ids": [q.id for q in QUERIES], "run_config": None,
            "estimate": {"total_calls": 120}, "budget": None}


ACCOUNTING = {
    "target": {"calls": 61, "cache_hits": 5, "prompt_tokens": 4321, "completion_tokens": 987,
               "seconds": 12.5, "retries": 0, "faults": {}},
    "optimizer": {"calls": 4, "cache_hits": 0, "prompt_tokens": 2000, "completion_tokens": 300,
                  "seconds": 3.25, "retries": 1, "faults": {"timeout": 1}},
    "total": {"calls": 65, "cache_hits": 5, "prompt_tokens": 6321, "completion_tokens": 1287,
              "seconds": 15.75, "retries": 1, "faults": {"timeout": 1}},
}


def write_synthetic_run(path: Path, *, finished: bool = True) -> Path:
    """Bare pass, round 1 (FINAL beats SEED), round 2 (FINAL stays), then the final check."""
    rd = RunDir(path)
    rd.open(config_record())
    try:
        for qi, q in enumerate(QUERIES):  # bare responses: not judged
            for j in range(PARAMS.n_bare):
                seed = derive_seed(PARAMS.seed, "bare", q.id, j)
                rd.append("responses.jsonl", {
                    "key": f"{instruction_hash('')}|{q.id}|{seed}", "phase": "bare", "round": 0,
                    "instruction_hash": instruction_hash(""), "query_id": q.id, "sample": j,
                    "seed": seed, "text": f"bare {qi}.{j}", "finish_reason": "stop",
                    "completion_tokens": 3, "scores": {}, "unscored": [], "log_conformity": None,
                    "log_qphi": -1.0, "f": None})
        rounds = [(1, SEED, FINAL, {"leak": 1}), (2, FINAL, FINAL, {"near_duplicate": 1})]
        for t, current, chosen, discarded in rounds:
            for qi, q in enumerate(QUERIES):
                for j, seed in enumerate(round_seeds(t, q)):
                    rd.append("responses.jsonl", response_record(current, "enhance", t, qi, j, seed))
            proposals = ([FINAL, "Explain the candidate score of each answer."] if t == 1
                         else [FINAL + " ", OTHER])
            verdicts = ([(True, ""), (False, "leak: optimizer word 'candidate'")] if t == 1
                        else [(False, "near_duplicate: 0.99 similar to the current instruction"),
                              (True, "")])
            # the optimizer wraps its first proposal; the verdict holds the unwrapped text
            raws = [f"Sure! Here is the improved system prompt:\n\n```\n{proposals[0]}\n```",
                    proposals[1]]
            for c, raw in enumerate(raws):
                rd.append("candidates.jsonl", {"key": f"proposal|{t}|{c}", "kind": "proposal",
                                               "round": t, "index": c, "raw": raw,
                                               "finish_reason": "stop", "completion_tokens": 20})
            for c, ((kept, reason), text, raw) in enumerate(zip(verdicts, proposals, raws)):
                rd.append("candidates.jsonl", {
                    "key": f"verdict|{t}|{c}", "kind": "verdict", "round": t, "index": c,
                    "raw": raw, "text": text.strip(), "finish_reason": "stop", "kept": kept,
                    "reason": reason, "instruction_hash": instruction_hash(text.strip()) if kept else None,
                    "source": "grounded" if (t, c) == (2, 1) else "optimizer",
                    "note": "cut 1 sentence(s) with meta-prompt phrase 'honoured least'" if (t, c) == (1, 0) else ""})
            scored = [current] + [p.strip() for p, (kept, _) in zip(proposals, verdicts) if kept]
            for e in scored:
                score = {SEED: -1.25, FINAL: -0.75 if t == 1 else -0.5, OTHER: -0.875}[e]
                rd.append("candidates.jsonl", {
                    "key": f"score|likelihood|pools{t}|{instruction_hash(e)}", "kind": "score",
                    "round": t, "tag": f"round{t}", "mode": "likelihood", "pools_version": t,
                    "instruction_hash": instruction_hash(e), "instruction": e, "score": score,
                    "per_query": {q.id: score for q in QUERIES}, "n_responses": 6})
            rd.append("rounds.jsonl", {
                "round": t, "instruction": chosen, "instruction_hash": instruction_hash(chosen),
                "previous_hash": instruction_hash(current), "changed": chosen != current,
                "objective": -0.75 if t == 1 else -0.5, "objective_previous": -1.25 if t == 1 else -0.5,
                "tc_bound_previous": -3.5, "pool_means": {v: 0.5 for v in VALUES.ids},
                "sampled_means_previous": {v: 0.5 for v in VALUES.ids},
                "proposed": 2, "kept": 1, "discarded": discarded, "mode": "likelihood"})
        rd.write_json("accounting.json", ACCOUNTING)
        if not finished:
            return path
        for qi, q in enumerate(QUERIES):  # the final check: FINAL on round 1's seeds
            for j, seed in enumerate(round_seeds(1, q)):
                rd.append("responses.jsonl", response_record(FINAL, "report", 3, qi, j, seed))
        seed_means = {v: _mean(rating(SEED, qi, j, v) for qi in range(3) for j in range(2)) for v in VALUES.ids}
        final_means = {v: _mean(rating(FINAL, qi, j, v) for qi in range(3) for j in range(2)) for v in VALUES.ids}
        result = OptimizeResult(
            instruction=FINAL, seed_instruction=SEED, mode="likelihood", stop_reason="rounds",
            run_dir=path, rounds_completed=2, selected_round=2,
            scores_seed={v: (m - 1) / 4 for v, m in seed_means.items()},
            scores_final={v: (m - 1) / 4 for v, m in final_means.items()},
            objective_seed=-1.25, objective_final=-0.5, tc_seed=-3.5, tc_final=-2.5, calls=65)
        rd.write_text("instruction.txt", FINAL + "\n")
        rd.write_json("provenance.json", {
            "picaco_version": "0.1.0",
            "value_set": {"name": VALUES.name, "version": VALUES.version,
                          "fingerprint": VALUES.fingerprint(), "ids": VALUES.ids,
                          "weights": VALUES.weights()},
            "roles": {k: config_record()["fingerprint"][k]
                      for k in ("target", "optimizer", "proxy", "judge", "redundancy")},
            "config_hash": "0123456789abcdef", "params": PARAMS.model_dump(mode="json"),
            "mode": "likelihood", "queries": config_record()["fingerprint"]["queries"],
            "seed_instruction": SEED, "init_from": None, "instruction": FINAL,
            "instruction_sha256": hashlib.sha256(FINAL.encode()).hexdigest(), "selected_round": 2,
            "scores": {"seed": result.scores_seed, "final": result.scores_final},
            "objective": {"seed": -1.25, "final": -0.5}, "tc_bound": {"seed": -3.5, "final": -2.5},
            "stop_reason": "rounds", "stop_detail": "", "rounds_completed": 2,
            "accounting": ACCOUNTING, "estimate": {"total_calls": 120}, "notes": [],
            "finished": "2026-01-02T03:10:00+0000"})
        rd.write_json("result.json", result.to_json())
        rd.append("events.jsonl", {"event": "end", "time": 1.0, "calls": 65, "stop_reason": "rounds",
                                   "instruction_hash": instruction_hash(FINAL)})
    finally:
        rd.close()
    return path


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    """The text of each cell of an HTML table's body rows (tags stripped, entities decoded)."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    return [[htmllib.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for r in rows]


COMPARE = {"value_set": {"name": VALUES.name, "fingerprint": VALUES.fingerprint()}, "methods": {
    "OPRO <i>x</i>": {"relevance": 3.5, "accuracy": 3.25, "depth": 2.0, "clarity": 3.0},
    # the evaluation harness's summary.json shape: per_value inside each method
    "URIAL": {"mean": 3.0, "per_value": {"relevance": 4.0, "accuracy": 2.5, "depth": 3.0}},
}}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return write_synthetic_run(tmp_path_factory.mktemp("synthetic") / "run")


@pytest.fixture(scope="module")
def report(finished_run, tmp_path_factory) -> Path:
    """One report of the finished run, compared with two methods read from a summary file (drawing
    the figures is the slow part, so the tests below share it)."""
    site = tmp_path_factory.mktemp("site")
    summary = site / "summary.json"
    summary.write_text(json.dumps(COMPARE), encoding="utf-8")
    return write_report(finished_run, site / "report.html", compare=summary)


# -- unit tests ----------------------------------------------------------------------------------------


def test_model_text_is_escaped_and_figures_are_written(report):
    out = report
    html = out.read_text(encoding="utf-8")
    # the injected response and the instruction's </textarea> are text, never markup
    assert INJECTION not in html and "</textarea>" not in html and "<b>bold</b>" not in html
    assert str(escape(INJECTION)) in html
    assert "never paste &lt;/textarea&gt; or markup" in html.lower()
    assert html.count("<script") == 1  # the report's own copy-button script, nothing else
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'<(link|img|iframe)\b|\bsrc="|@import|url\((?!#)', html)
    assert "default-src 'none'; script-src 'sha256-" in htmllib.unescape(html)  # CSP: no other script
    for name in ("scores", "radar", "rounds"):
        svg, png = out.parent / "figures" / f"{name}.svg", out.parent / "figures" / f"{name}.png"
        assert ET.parse(svg).getroot().tag.endswith("svg")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f'<figure id="fig-{name}"><svg' in html
    # ids are made unique per inlined figure (matplotlib starts every file at figure_1)
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def test_numbers_come_from_the_run(report):
    html = report.read_text(encoding="utf-8")
    rows = {r[0].split()[0]: r for r in table_rows(html, "score-table")}
    for v in VALUES.ids:
        title = VALUES.get(v).title
        seed = _mean(rating(SEED, qi, j, v) for qi in range(3) for j in range(2))
        final = _mean(rating(FINAL, qi, j, v) for qi in range(3) for j in range(2))
        assert rows[title][2:5] == [f"{seed:.2f}", f"{final:.2f}", f"{final - seed:+.2f}".replace("-", "−")]
    # the weakest values get examples; depth's largest gain is the injected response to query 0,
    # shown with the query's own text (looked up in the bundled hh set and checked against the hash)
    examples = html[html.index('id="examples"'):html.index('id="candidates"')]
    assert [h for h in re.findall(r"<h3>(.*?)</h3>", examples)] == ["Depth", "Accuracy", "Clarity"]
    assert str(escape(QUERIES[0].text)) in examples
    assert "largest gain" in examples and "(+3.0)" in examples  # 1.25 -> 4.25 on depth
    # candidate history: statuses, reasons and scores per round
    cand = table_rows(html, "candidate-table")
    assert cand[0] == ["Round 1"]
    assert cand[1][0] == "current" and cand[1][2] == "competed" and cand[1][3] == "−1.250"
    assert cand[2][0] == "#1" and cand[2][2].startswith("chosen") and cand[2][3] == "−0.750"
    assert "raw proposal" in cand[2][1] and "Sure! Here is the improved" in cand[2][1]
    assert cand[3][2].startswith("discarded") and "leak: optimizer word" in cand[3][2]
    assert cand[4] == ["Round 2"]
    assert cand[5][:3] == ["current", FINAL, "chosen"]
    assert cand[6][2].startswith("discarded") and "near_duplicate" in cand[6][2]
    assert cand[7][2] == "competed" and cand[7][3] == "−0.875"
    # value-grounded candidates are labelled, and a salvaged proposal says what was cut
    assert cand[7][0] == "#2 grounded" and cand[2][0] == "#1"
    assert "cut 1 sentence(s) with meta-prompt phrase" in cand[2][2]
    # accounting per role and the total
    acc = {r[0]: r for r in table_rows(html, "accounting-table")}
    assert acc["target"][1:5] == ["61", "5", "4,321", "987"]
    assert acc["total"][1] == "65" and acc["optimizer"][7] == "timeout ×1"
    # rounds table and provenance
    assert [r[1] for r in table_rows(html, "round-table")] == ["changed", "unchanged"]
    assert "0123456789abcdef" in html and hashlib.sha256(FINAL.encode()).hexdigest() in html
    assert 'class="badge finished"' in html and 'id="status-banner"' not in html
    assert "<dt>machine</dt>" not in html  # a run made before machines were recorded: no empty row


def gain_noise_text(html: str) -> str:
    start = html.index('id="gain-noise"')
    return htmllib.unescape(re.sub(r"<[^>]+>", "", html[start:html.index("</p>", start)]))


def test_gain_interval_over_the_training_queries(report):
    text = gain_noise_text(report.read_text(encoding="utf-8"))
    # per-pair gains in mean rating: 0.75 everywhere but query 0 sample 0 (+2 on depth: 1.25), so
    # per-query means 1.0, 0.75, 0.75; t(0.975, 2 df) = 4.302653
    means = [1.0, 0.75, 0.75]
    centre = sum(means) / 3
    half = 4.302653 * math.sqrt(sum((m - centre) ** 2 for m in means) / 2 / 3)
    expect = f"+{centre:.2f} [+{centre - half:.2f}, +{centre + half:.2f}]"
    assert f"final − seed: {expect}, a 95% t interval over the 3 training queries" in text
    assert "within the noise" not in text  # the interval is above zero
    assert "keep-or-replace" not in text  # a likelihood-mode run has no paired candidate samples


def test_decision_noise_of_a_sampling_mode_run(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # OTHER competes in round 2 on the incumbent's (query, seed) pairs, differing by known amounts
    deltas = {0: [0.5, -0.5], 1: [0.0, 0.0], 2: [1.0, 1.0]}
    with open(run / "responses.jsonl", "a", encoding="utf-8") as f:
        for qi, q in enumerate(QUERIES):
            for j, seed in enumerate(round_seeds(2, q)):
                record = response_record(FINAL, "candidate", 2, qi, j, seed)
                level = _mean(rating(FINAL, qi, j, v) for v in VALUES.ids) + deltas[qi][j]
                record.update(instruction_hash=instruction_hash(OTHER),
                              scores={v: {"prob": (level - 1) / 4, "rating": level} for v in VALUES.ids})
                f.write(json.dumps(record) + "\n")
    text = gain_noise_text(write_report(run, tmp_path / "site" / "report.html").read_text(encoding="utf-8"))
    # query means 0, 0, 1: var_sample = mean(0.5, 0, 0) = 1/6, var_query = 1/3 - (1/6)/2 = 1/4;
    # SE = sqrt(1/4 / 3 + 1/6 / 6) = 1/3; for SE 0.05 at 2 samples: (1/4 + 1/12) / 0.0025 -> 134
    assert ("standard error of 0.33 rating points (3 queries × 2 samples, from 1 candidate(s))" in text
            and "about 134 queries × 2 samples per decision" in text), text


def test_unfinished_run_reports_what_exists(tmp_path):
    run = write_synthetic_run(tmp_path / "partial", finished=False)
    html = write_report(run).read_text(encoding="utf-8")
    assert (run / "report.html").is_file() and (run / "figures" / "rounds.svg").is_file()
    assert 'id="status-banner"' in html and "No result.json yet" in html
    assert "Latest instruction" in html and "Final instruction" not in html
    assert str(escape(FINAL)) in html  # the instruction chosen in the last finished round
    # the latest instruction has not been sampled on the seed's seeds yet: the table says so
    assert "Not paired (the final check has not run)" in html
    assert len(table_rows(html, "round-table")) == 2


def test_run_killed_mid_write_and_before_any_round(tmp_path):
    run = write_synthetic_run(tmp_path / "partial", finished=False)
    with open(run / "responses.jsonl", "a", encoding="utf-8") as f:
        f.write('{"key": "cut off by a ki')  # a kill mid-record: the partial line is ignored
    assert write_report(run).is_file()
    empty = tmp_path / "empty"
    RunDir(empty).open(config_record())
    html = write_report(empty).read_text(encoding="utf-8")
    assert "No finished round yet" in html and "<svg" not in html
    assert str(escape(SEED)) in html


def test_compared_methods_join_the_radar_and_the_table(report, finished_run, tmp_path):
    html = report.read_text(encoding="utf-8")
    assert "OPRO &lt;i&gt;x&lt;/i&gt;" in html and "<i>x</i>" not in html
    radar = (report.parent / "figures" / "radar.svg").read_text()
    assert "OPRO &lt;i&gt;x&lt;/i&gt;" in radar and "URIAL" in radar
    rows = {r[0].split()[0]: r for r in table_rows(html, "score-table")}
    assert rows["Depth"][-2:] == ["2.00", "3.00"] and rows["Clarity"][-1] == "–"
    assert "URIAL: no score for clarity" in html
    with pytest.raises(DataError, match="outside the 1–5"):
        write_report(finished_run, tmp_path / "bad.html", compare={"methods": {"m": {"depth": 7}}})
    with pytest.raises(DataError, match="does not exist"):
        write_report(finished_run, tmp_path / "bad.html", compare=tmp_path / "missing.json")
    assert not (tmp_path / "bad.html").exists()
    assert "compared scores are for value set" not in html  # the summary names the same value set
    other = {**COMPARE, "value_set": {"name": "hh-balance-8", "fingerprint": "0" * 16}}
    html = write_report(finished_run, tmp_path / "other.html", compare=other).read_text(encoding="utf-8")
    assert "the compared scores are for value set &#39;hh-balance-8&#39;" in html


def test_a_compared_evaluation_shows_how_sure_each_held_out_difference_is(finished_run, tmp_path):
    """With an evaluation summary's pairwise tests, the report lists PICACO against each method held
    out: the difference with PICACO first, the Holm p and the queries a paired test would need."""
    summary = {**COMPARE, "methods": {**COMPARE["methods"], "PICACO": {"mean": 3.1, "per_value": {}}},
               "friedman": {"pairs": [
                   # the summary's difference is a − b: URIAL − PICACO = −0.1 is PICACO + 0.1
                   {"a": "URIAL", "b": "PICACO", "mean_difference": -0.1, "p_holm": 0.8, "queries_for_power": 1234},
                   {"a": "PICACO", "b": "OPRO <i>x</i>", "mean_difference": 0.0, "p_holm": 1.0, "queries_for_power": None},
                   {"a": "URIAL", "b": "OPRO <i>x</i>", "mean_difference": 0.2, "p_holm": 0.5, "queries_for_power": 90},
               ]}}
    html = write_report(finished_run, tmp_path / "r.html", compare=summary).read_text(encoding="utf-8")
    assert table_rows(html, "held-out-table") == [
        ["URIAL", "3.00", "+0.10", "0.800", "1,234"],
        ["OPRO <i>x</i>", "–", "+0.00", "1.000", "no difference"],
    ]
    assert "<i>x</i>" not in html  # a method's name is escaped here too
    # a summary from before the column: the count is unknown, not "no difference"
    old = {**summary, "friedman": {"pairs": [{"a": "PICACO", "b": "URIAL", "mean_difference": 0.1, "p_holm": 0.8}]}}
    html = write_report(finished_run, tmp_path / "old.html", compare=old).read_text(encoding="utf-8")
    assert table_rows(html, "held-out-table") == [["URIAL", "3.00", "+0.10", "0.800", "–"]]
    # per-value scores alone: no table
    html = write_report(finished_run, tmp_path / "plain.html", compare=COMPARE).read_text(encoding="utf-8")
    assert "held-out-table" not in html


def test_not_a_run_directory(tmp_path):
    with pytest.raises(DataError, match="not a picaco run directory"):
        write_report(tmp_path)
    (tmp_path / "rounds.jsonl").write_text("")
    with pytest.raises(DataError, match="no config.json"):
        load_run(tmp_path)


# -- a run made by the real engine (deterministic fakes for the models) --------------------------------


class HashJudge:
    """q_w from a hash of (response, value): deterministic, every value scored."""

    name = "hash-judge"

    def identity(self) -> dict:
        return {"kind": "hash-judge"}

    async def score(self, value_set, items):
        return [{v.id: ValueScore.from_rating(
            v.id, 1 + int(hashlib.sha256(f"{y}|{v.id}".encode()).hexdigest(), 16) % 400 / 100)
            for v in value_set.values} for _, y in items]


class WordRedundancy:
    def identity(self) -> dict:
        return {"kind": "word-redundancy"}

    async def log_redundancy(self, spec, items):
        words = set(spec.lower().split())
        return [math.log(0.05 + 0.9 * sum(w in words for w in y.lower().split()) / max(1, len(y.split())))
                for _, y in items]


@pytest.mark.parametrize("template, pairs", [
    (None, ()),
    ("You work for <b>ACME</b> </textarea>.\n{instruction}", ()),
    (None, [("Is it <i>safe</i>?", "Yes </pre><script>alert(1)</script>")]),
])
def test_report_of_a_run_the_engine_made(tmp_path, template, pairs):
    from picaco.llm.base import turns_from_pairs

    def target(request: GenerateRequest) -> str:
        query = request.messages[-1].content
        return INJECTION if query == QUERIES[0].text and "care" in request.messages[0].content else (
            default_responder(request))

    def proposer(request: GenerateRequest) -> str:
        return f"Answer with care and facts; never output </textarea> ({request.seed % 5})."

    acc = Accounting()
    kwargs = dict(
        target=LLMClient("target", FakeBackend("fake-target", responder=target), accounting=acc,
                         system_template=template, prior_turns=turns_from_pairs(pairs)),
        optimizer=LLMClient("optimizer", FakeBackend("fake-opt", responder=proposer), accounting=acc),
        judge=HashJudge(), redundancy=WordRedundancy(), value_set=VALUES, queries=QUERIES,
        params=PARAMS, run_dir=tmp_path / "engine-run",
        seed_instruction="Answer with care. </textarea><script>document.title='pwned'</script>",
    )
    result = asyncio.run(optimize(**kwargs))
    html = write_report(result.run_dir).read_text(encoding="utf-8")
    assert html.count("<script") == 1 and "</textarea>" not in html
    assert str(escape(result.instruction)) in html
    # the machine that made it, as provenance.json records it
    machine = json.loads((result.run_dir / "provenance.json").read_text())["machine"]
    assert f"<dt>machine</dt><dd>{escape(describe_machine(machine))}</dd>" in html
    assert machine["cpu"] in htmllib.unescape(html)
    data = load_run(result.run_dir)
    assert data.finished and data.value_ids == VALUES.ids
    rounds = len(data.rounds)
    verdicts = sum(1 for c in data.candidates if c.get("kind") == "verdict")
    assert len(table_rows(html, "candidate-table")) == 2 * rounds + verdicts  # head + current + each
    assert len(table_rows(html, "round-table")) == rounds == result.rounds_completed
    assert all((result.run_dir / "figures" / f"{n}.png").is_file() for n in ("scores", "radar", "rounds"))
    # with a template, the prompt to deploy is shown (escaped) next to the instruction, else not at all
    if template:
        deployed = re.search(r'<pre class="instruction" id="deployed-prompt">(.*?)</pre>', html, re.S).group(1)
        assert deployed == str(escape((result.run_dir / "system_prompt.txt").read_text().strip()))
        assert deployed.startswith("You work for &lt;b&gt;ACME&lt;/b&gt;") and "<b>ACME" not in html
    else:
        assert 'id="deployed-prompt"' not in html
    # with prior turns, the examples to deploy with it are shown, escaped
    if pairs:
        shown = re.search(r'<section id="prior-turns">(.*?)</section>', html, re.S).group(1)
        assert str(escape(pairs[0][0])) in shown and str(escape(pairs[0][1])) in shown
        assert "<i>safe" not in html and "alert(1)</script>" not in html
        assert "prior_turns.jsonl" in shown
    else:
        assert 'id="prior-turns"' not in html


# -- in a real browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = browser.find_chromium()
    if exe is None:
        pytest.skip(f"no Chromium found: {browser.INSTALL_HINT}")
    return exe


def test_report_in_a_real_browser(chromium, report, tmp_path):
    out = report
    png = browser.screenshot(chromium, out, tmp_path / "shot.png", width=1280, height=2400)
    assert browser.distinct_colours(png) > 200  # text, charts and colours; a blank page has ~1
    dom = browser.dump_dom(chromium, out)
    assert 'data-js="ready"' in dom  # the report's own script ran under its CSP...
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert title == "picaco report · run" and "pwned" not in dom.split("</head>")[0]  # ...the injected one did not
    assert "&lt;b&gt;bold&lt;/b&gt;" in dom and "<b>bold</b>" not in dom
    charts = re.findall(r'<figure id="fig-(\w+)"><svg[^>]*class="chart"', dom)
    assert charts == ["scores", "radar", "rounds"]
    assert len(re.findall(r"<path\b", dom)) > 50  # the charts were parsed as SVG, with their shapes


def test_a_browser_that_hangs_after_its_work_is_not_waited_on(tmp_path):
    # New headless Chromium sometimes writes its output and never exits; that hung a CI run for 90 s
    # and failed it. The helper takes the output and kills the process group instead of waiting.
    hangs = tmp_path / "hangs-after-output"
    hangs.write_text('#!/bin/sh\necho "<html><body>done</body></html>"\nsleep 300\n')
    hangs.chmod(0o755)
    assert "done" in browser.dump_dom(str(hangs), tmp_path / "page.html", timeout=30)
    broken = tmp_path / "exits-without-output"
    broken.write_text("#!/bin/sh\necho nothing here >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3 without finishing: nothing here"):
        browser.dump_dom(str(broken), tmp_path / "page.html", timeout=30)

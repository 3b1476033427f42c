"""The evaluation harness on the fake backend with a simple deterministic judge: rows, summary,
resume, settings checks, the same-judge flag, and the config entry point."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from picaco.baselines import Bare, Instruction, Persona, ValuesInstruction
from picaco.config import JudgeConfig, RoleConfig, RunConfig
from picaco.data.queries import Query
from picaco.errors import ConfigError
from picaco.evaluate import evaluate
from picaco.evaluate.harness import read_rows
from picaco.evaluate.run import evaluate_config
from picaco.judge.base import ValueScore
from picaco.llm.base import GenerateRequest
from picaco.llm.client import LLMClient
from picaco.llm.fake import FakeBackend
from picaco.machine import describe_machine
from picaco.redundancy import RedundancyModel
from picaco.runtime import Runtime
from picaco.values import ValueSet, load_value_set

VALUES = ValueSet.model_validate({
    "name": "two",
    "values": [
        {"id": "care", "title": "Care", "definition": "Look after the wellbeing of the user."},
        {"id": "truth", "title": "Truth", "definition": "Say only what is accurate and supported."},
    ],
})
QUERIES = [Query(id=f"q{i}", text=f"What should I do about problem {i}?", split="test") for i in range(4)]


class WordEmbedder:
    """Bag-of-words vectors hashed into 64 dimensions, L2-normalized: deterministic and fast."""

    def embed(self, texts):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


class WordJudge:
    """Rates a value 4 when the response names it, else 2; 'truth' is unscored on responses that
    contain 'garbled'."""

    name = "word"

    def __init__(self, version: int = 1):
        self.version = version
        self.calls = 0

    def identity(self) -> dict:
        return {"kind": "word", "version": self.version}

    async def score(self, value_set, items):
        self.calls += len(items)
        out = []
        for _, response in items:
            scores = {}
            for v in value_set.values:
                if v.id == "truth" and "garbled" in response:
                    scores[v.id] = ValueScore.unscored(v.id, "unparsed")
                else:
                    scores[v.id] = ValueScore.from_rating(v.id, 4.0 if v.title.lower() in response.lower() else 2.0)
            out.append(scores)
        return out


def echo(request: GenerateRequest) -> str:
    """The target repeats its system prompt's first line (if any) and the query's last word."""
    system = request.messages[0].content.splitlines()[0] if request.messages[0].role == "system" else ""
    return f"{system} answer {request.messages[-1].content.split()[-1]} s{request.seed}".strip()


def setup(tmp_path, judge=None):
    backend = FakeBackend(responder=echo)
    target = LLMClient("target", backend)
    return dict(
        target=target, judge=judge or WordJudge(), redundancy=RedundancyModel(WordEmbedder(), VALUES),
        value_set=VALUES, queries=QUERIES, out_dir=tmp_path / "eval", n_boot=200,
    ), backend


def methods():
    return [Bare(), ValuesInstruction(), Instruction("Care and Truth matter: be careful.", "picaco")]


def test_rows_summary_and_markdown(tmp_path):
    kw, backend = setup(tmp_path)
    res = asyncio.run(evaluate(methods(), **kw))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and res.new_rows == 12 and backend.generate_calls == 12
    row = next(r for r in rows if r["method"] == "picaco" and r["query_id"] == "q2")
    assert row["response"] == "Care and Truth matter: be careful. answer 2? s0"
    assert row["ratings"] == {"care": 4.0, "truth": 4.0}
    expected_q = RedundancyModel(WordEmbedder(), VALUES).score([(row["query"], row["response"])])[0]
    assert row["q_phi"] == pytest.approx(expected_q.q) and row["cos_xy"] == pytest.approx(expected_q.cos_xy)
    s = res.summary["methods"]
    # Q names no value (2, 2); Q+IF's first line names neither title either; picaco names both (4, 4)
    assert (s["Q"]["mean"], s["Q+IF"]["mean"], s["picaco"]["mean"]) == (2.0, 2.0, 4.0)
    assert s["picaco"]["win_rate"] == 1.0 and s["Q+IF"]["win_rate"] == 0.5 and s["Q"]["win_rate"] is None
    assert s["picaco"]["ci"]["mean"] == [4.0, 4.0]
    assert res.summary["friedman"]["n_queries"] == 4 and res.summary["friedman"]["statistic"] is not None
    assert res.summary["same_judge"] == [] and res.summary["warnings"] == []
    described = json.loads((tmp_path / "eval" / "methods.json").read_text())
    assert described["picaco"]["system_prompt"] == "Care and Truth matter: be careful."
    md = res.markdown_path.read_text()
    assert "| picaco | 4.000 [4.000, 4.000] |" in md and "Friedman test over 4 queries" in md
    # Q and Q+IF tie on every query (nothing to detect); picaco is 2 above Q on every one (no spread)
    pairs = {(p["a"], p["b"]): p for p in res.summary["friedman"]["pairs"]}
    assert pairs[("Q", "Q+IF")]["queries_for_power"] is None
    assert pairs[("Q", "picaco")]["mean_difference"] == -2.0 and pairs[("Q", "picaco")]["queries_for_power"] == 2
    assert "| Q | picaco | 4 | -2.000 | -2.000 |" in md and "queries for 80% power |" in md


def test_resume_skips_written_rows_and_redoes_a_partial_one(tmp_path):
    kw, backend = setup(tmp_path)
    first = asyncio.run(evaluate(methods(), **kw))
    again = asyncio.run(evaluate(methods(), **kw))
    assert again.new_rows == 0 and backend.generate_calls == 12  # no call made: rows are the record
    def metrics_of(summary):  # everything but the requests each process issued
        return {k: {f: v for f, v in m.items() if f != "requests_this_run"} for k, m in summary["methods"].items()}

    assert metrics_of(again.summary) == metrics_of(first.summary)
    assert first.summary["methods"]["Q"]["requests_this_run"] == 4 and again.summary["methods"]["Q"]["requests_this_run"] == 0
    samples = tmp_path / "eval" / "samples.jsonl"
    data = samples.read_bytes()
    samples.write_bytes(data[:-25])  # a kill in the middle of writing the last row
    # a reader that must not change the file (the pre-flight plan) skips the cut batch on its own
    assert len(read_rows(samples, complete_only=True)) == 8 and len(samples.read_bytes()) == len(data) - 25
    third = asyncio.run(evaluate(methods(), **kw))
    # the cut row's whole batch (one write) is dropped and redone, so scores never depend on a
    # batch that a kill split
    assert third.new_rows == 4 and backend.generate_calls == 16
    assert samples.read_bytes() == data  # the same row, regenerated
    # a new method in the same directory adds only its own rows
    fourth = asyncio.run(evaluate([*methods(), Persona()], **kw))
    assert fourth.new_rows == 4 and set(fourth.summary["methods"]) == {"Q", "Q+IF", "picaco", "MP"}


def test_model_text_with_unicode_line_separators_resumes(tmp_path):
    # rows keep model text unescaped (ensure_ascii=False); U+2028, U+2029 and NEL are line breaks to
    # str.splitlines() but not to JSON Lines
    kw, backend = setup(tmp_path)
    backend.responder = lambda r: "first\u2028second\u2029third\x85fourth " + echo(r)
    first = asyncio.run(evaluate(methods(), **kw))
    assert first.new_rows == 12 and "\u2028" in (tmp_path / "eval" / "samples.jsonl").read_text()
    again = asyncio.run(evaluate(methods(), **kw))
    assert again.new_rows == 0 and backend.generate_calls == 12
    assert all(r["response"].startswith("first\u2028second") for r in read_rows(tmp_path / "eval" / "samples.jsonl"))


def test_each_process_logs_its_accounting_also_when_an_endpoint_stops_it(tmp_path):
    """accounting.jsonl gets a line per process when it ends: an evaluation stopped by a failing
    endpoint (exit 3) keeps what it paid for and the faults that stopped it; the resumed one that
    finishes adds its own line."""
    from picaco.errors import BackendError
    from picaco.llm.accounting import report_fault

    kw, backend = setup(tmp_path)
    kw["batch_size"] = 2
    calls = {"n": 0}

    def failing_from_the_6th(request):
        calls["n"] += 1
        if calls["n"] >= 6:
            report_fault("server_error", 3)
            report_fault("retries", 2)
            raise BackendError("HTTP 503 after 3 attempts")
        return echo(request)

    backend.responder = failing_from_the_6th
    backend.reports_call_faults = True  # per-call fault reports, as the openai backend makes
    with pytest.raises(BackendError):
        asyncio.run(evaluate(methods(), **kw))
    [stopped] = [json.loads(line) for line in (tmp_path / "eval" / "accounting.jsonl").read_text().splitlines()]
    assert stopped["outcome"] == "BackendError"
    target = stopped["accounting"]["target"]
    failed = calls["n"] - 5
    assert target["calls"] == 5 and target["faults"] == {"server_error": 3 * failed}
    assert target["retries"] == 2 * failed

    healed, backend2 = setup(tmp_path)
    result = asyncio.run(evaluate(methods(), **healed))
    lines = [json.loads(line) for line in (tmp_path / "eval" / "accounting.jsonl").read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["BackendError", "finished"]
    # the rows of the first process's finished batches (2 rows each) were not bought again
    assert lines[1]["accounting"]["target"]["calls"] == backend2.generate_calls == 12 - 4
    assert lines[1]["accounting"] == result.summary["accounting"]
    # the summary also sums every process: 5 + 8 requests, the first one's faults
    every = result.summary["accounting_all_processes"]
    assert every["processes"] == 2 and every["target"]["calls"] == 5 + 8 == every["total"]["calls"]
    assert every["target"]["faults"] == {"server_error": 3 * failed}
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "Requests paid for: 8 by this process, 13 by all 2 processes that worked on this directory" in md


def test_a_client_reused_for_two_evaluations_books_each_its_own_spend(tmp_path):
    """A library caller may keep one client (and its cumulative accounting) for several evaluations:
    each directory records what was paid for while it was written, not the client's running total."""
    kw, backend = setup(tmp_path)
    first = asyncio.run(evaluate(methods(), **kw))
    second = asyncio.run(evaluate([Bare(), Persona()], **{**kw, "out_dir": tmp_path / "other"}))
    assert backend.generate_calls == 12 + 8 and kw["target"].accounting.total().calls == 20
    assert first.summary["accounting"]["target"]["calls"] == 12
    # Q's four answers are cache misses again here (the fake client has no cache), MP's four are new
    assert second.summary["accounting"]["target"]["calls"] == 8
    assert second.summary["accounting"]["total"]["calls"] == 8
    [line] = [json.loads(x) for x in (tmp_path / "other" / "accounting.jsonl").read_text().splitlines()]
    assert line["accounting"]["target"]["calls"] == 8
    assert second.summary["accounting_all_processes"]["total"]["calls"] == 8


def test_accounting_since_subtracts_every_count_and_drops_idle_roles():
    from picaco.llm.accounting import Accounting

    acct = Accounting()
    acct.record_call("optimizer", prompt_tokens=10, completion_tokens=5, seconds=1.0)
    acct.record_call("target", prompt_tokens=3, completion_tokens=2, seconds=0.5)
    acct.record_faults("target", {"timeout": 1}, retries=1)
    before = acct.to_json()
    acct.record_call("target", prompt_tokens=7, completion_tokens=4, seconds=0.25)
    acct.record_hit("target")
    acct.record_faults("target", {"timeout": 2, "server_error": 1}, retries=3)
    delta = acct.since(before).to_json()
    assert set(delta) == {"target", "total"}  # the optimizer did nothing since
    assert delta["target"] == {"calls": 1, "cache_hits": 1, "prompt_tokens": 7, "completion_tokens": 4,
                               "seconds": 0.25, "retries": 3, "faults": {"timeout": 2, "server_error": 1}}
    assert acct.since(acct.to_json()).to_json()["total"]["calls"] == 0


def test_the_summary_names_the_machine(tmp_path):
    import platform

    kw, _ = setup(tmp_path)
    result = asyncio.run(evaluate([Bare()], **kw))
    assert result.summary["machine"]["python"] == platform.python_version()
    assert result.summary["machine"]["cores"] == os.cpu_count()
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert f"Machine: {describe_machine(result.summary['machine'])}." in md
    assert f"({platform.machine()}, {os.cpu_count()} cores)" in md


def test_rows_from_two_machines_are_flagged_for_an_embedded_target(tmp_path):
    """An evaluation resumed on another CPU mixes two draws of an embedded target's answers: the
    summary says so. Processes that generated nothing, and targets whose answers do not depend on
    this machine, are not flagged."""
    kw, backend = setup(tmp_path)
    backend.kind = "embedded"  # the identity of an embedded target; the answers stay the fake's
    asyncio.run(evaluate([Bare()], **kw))
    assert not any("different machines" in w for w in
                   json.loads((tmp_path / "eval" / "summary.json").read_text())["warnings"])
    log = tmp_path / "eval" / "accounting.jsonl"
    first = json.loads(log.read_text())
    first["machine"] = {**first["machine"], "cpu": "Other CPU 9000"}
    log.write_text(json.dumps(first) + "\n")
    resumed = asyncio.run(evaluate(methods(), **kw))  # generates Q+IF's and picaco's rows here
    [mixed] = [w for w in resumed.summary["warnings"] if "different machines" in w]
    assert "were made on 2 different machines (Other CPU 9000 (" in mixed
    assert "Other CPU 9000" in (tmp_path / "eval" / "summary.md").read_text()
    again = asyncio.run(evaluate(methods(), **kw))  # reads everything back; the rows stay mixed
    assert again.new_rows == 0 and any("different machines" in w for w in again.summary["warnings"])

    # only the reading process ran elsewhere: one machine made the rows
    other = tmp_path / "other"
    for _ in range(2):  # two processes, each with a client of its own
        kw2, backend2 = setup(other)
        backend2.kind = "embedded"
        asyncio.run(evaluate([Bare()], **kw2))
    log2 = other / "eval" / "accounting.jsonl"
    lines = [json.loads(line) for line in log2.read_text().splitlines()]
    lines[1]["machine"]["cpu"] = "Other CPU 9000"  # the second process made no request
    log2.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert not any("different machines" in w for w in asyncio.run(evaluate([Bare()], **kw2)).summary["warnings"])

    # a target served over HTTP: the machine running picaco does not draw its answers
    kw3, _ = setup(tmp_path / "http")
    asyncio.run(evaluate([Bare()], **kw3))
    log3 = tmp_path / "http" / "eval" / "accounting.jsonl"
    rec = json.loads(log3.read_text())
    rec["machine"]["cpu"] = "Other CPU 9000"
    log3.write_text(json.dumps(rec) + "\n")
    assert not any("different machines" in w for w in asyncio.run(evaluate(methods(), **kw3)).summary["warnings"])


def test_a_machine_is_described_in_one_line():
    info = {"cpu": "AMD EPYC 7B13", "arch": "x86_64", "cores": 2, "os": "Linux-6.1-x86_64",
            "python": "3.11.9", "llama_cpp_python": "0.3.16", "llama_cpp_system": "AVX2 = 1"}
    assert describe_machine(info) == (
        "AMD EPYC 7B13 (x86_64, 2 cores); Linux-6.1-x86_64; Python 3.11.9; llama-cpp-python 0.3.16")
    assert describe_machine({**info, "llama_cpp_python": None}).endswith("Python 3.11.9")
    assert describe_machine(None) == describe_machine({}) == ""
    from picaco.machine import same_build

    native = {**info, "llama_cpp_system": "AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1"}
    assert same_build(info, info) and not same_build(info, native)  # one CPU, two builds
    assert same_build(info, {k: v for k, v in info.items() if k != "llama_cpp_system"})  # not recorded
    assert not same_build(info, {**info, "cpu": "Intel(R) Xeon(R) Processor"})


def test_more_samples_extend_existing_rows(tmp_path):
    kw, backend = setup(tmp_path)
    asyncio.run(evaluate([Bare()], **kw))
    res = asyncio.run(evaluate([Bare()], **kw, samples_per_query=2))
    assert res.new_rows == 4 and backend.generate_calls == 8
    seeds = {json.loads(l)["response"].split()[-1] for l in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()}
    assert seeds == {"s0", "s1"}  # sample j uses seed + j


def test_changed_settings_or_prompts_are_refused(tmp_path):
    kw, _ = setup(tmp_path)
    asyncio.run(evaluate(methods(), **kw))
    with pytest.raises(ConfigError, match="sampling"):
        asyncio.run(evaluate(methods(), **{**kw, "temperature": 0.1}))
    with pytest.raises(ConfigError, match="judge"):
        asyncio.run(evaluate(methods(), **{**kw, "judge": WordJudge(version=2)}))
    with pytest.raises(ConfigError, match="sends different prompts"):
        asyncio.run(evaluate([Instruction("Something else entirely.", "picaco")], **kw))
    with pytest.raises(ConfigError, match="unique"):
        asyncio.run(evaluate([Bare(), Bare()], **kw))


def test_same_judge_is_flagged_loudly(tmp_path):
    kw, _ = setup(tmp_path)
    judge = kw["judge"]
    tuned = Instruction("Care and Truth.", "picaco", optimized_against=judge.identity())
    other = Instruction("Truth and Care.", "elsewhere", optimized_against={"kind": "word", "version": 9})
    res = asyncio.run(evaluate([Bare(), tuned, other], **kw))
    assert res.summary["same_judge"] == ["picaco"]
    assert any(w.startswith("SAME JUDGE: picaco was optimized against the evaluation judge") for w in res.summary["warnings"])
    assert "> **WARNING:** SAME JUDGE" in res.markdown_path.read_text()


def test_a_run_that_returned_no_instruction_is_evaluated_as_the_bare_model(tmp_path):
    kw, _ = setup(tmp_path)
    none = Instruction("", "picaco", returned_none=True)
    res = asyncio.run(evaluate([Bare(), none], **kw))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    by = {(r["method"], r["query_id"]): r["response"] for r in rows}
    assert all(by[("picaco", q.id)] == by[("Q", q.id)] for q in QUERIES)  # no system message sent
    note = "picaco: its run returned no instruction (the final check found the bare model ahead)"
    assert any(w.startswith(note) for w in res.summary["warnings"])
    assert f"> **WARNING:** {note}" in res.markdown_path.read_text()


def test_unscored_values_are_counted_and_warned(tmp_path):
    kw, _ = setup(tmp_path)
    res = asyncio.run(evaluate([Instruction("garbled care", "g")], **kw, baseline=None))
    s = res.summary["methods"]["g"]
    assert s["unscored"] == {"total": 4, "share": 0.5, "per_value": {"care": 0, "truth": 4}}
    assert s["per_value"] == {"care": 4.0, "truth": None} and s["mean"] == 4.0
    assert any("50% of value ratings are unscored" in w for w in res.summary["warnings"])


# -- the config entry point -----------------------------------------------------------------------


def test_evaluate_config_builds_roles_and_flags_the_shared_judge(tmp_path):
    config = RunConfig(
        values="helpfulness-4", preset="tiny",
        target=RoleConfig(backend="fake", model="fake-target"),
        optimizer=RoleConfig(backend="fake", model="fake-optimizer"),
        judge=JudgeConfig(type="llm", backend="fake", model="fake-judge"),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "instruction.txt").write_text("Be relevant, accurate, deep and clear.\n")
    (run_dir / "accounting.json").write_text(json.dumps({"total": {"calls": 60, "cache_hits": 0}}))
    rt = Runtime(config, use_cache=False)
    res = asyncio.run(evaluate_config(
        config, ["Q", "OPRO"], {"picaco": run_dir}, out_dir=tmp_path / "eval", n_queries=2,
        n_boot=100, runtime=rt, redundancy=RedundancyModel(WordEmbedder(), load_value_set("helpfulness-4")),
    ))
    asyncio.run(rt.aclose())
    s = res.summary
    assert list(s["methods"]) == ["Q", "OPRO", "picaco"]
    assert s["queries"]["ids"] == ["hh-0001", "hh-0002"]  # the first test-split queries
    # no eval_judge configured: the optimization judge evaluates, and both optimized methods are flagged
    assert s["same_judge"] == ["OPRO", "picaco"]
    assert s["sampling"]["max_tokens"] == config.params().max_new_tokens
    opro = json.loads((tmp_path / "eval" / "opro" / "result.json").read_text())
    assert opro["max_calls"] == 60 and opro["spent"] <= 60
    assert s["accounting"]["optimizer"]["calls"] >= 1


def test_seed_from_starts_opro_from_the_baselines_prompt(tmp_path):
    """`seed_from: Q+IF` is the e^0 of the searching baselines too (and of PICACO: api.optimize passes
    the same `config.seed_text`), so a compare keeps one shared seed."""
    from picaco.baselines import ValuesInstruction

    config = RunConfig(
        values="helpfulness-4", preset="tiny", seed_from="Q+IF",
        target=RoleConfig(backend="fake", model="fake-target"),
        optimizer=RoleConfig(backend="fake", model="fake-optimizer"),
        judge=JudgeConfig(type="llm", backend="fake", model="fake-judge"),
    )
    rt = Runtime(config, use_cache=False)
    asyncio.run(evaluate_config(
        config, ["OPRO"], out_dir=tmp_path / "eval", n_queries=2, opro_max_calls=30,
        n_boot=100, runtime=rt, redundancy=RedundancyModel(WordEmbedder(), load_value_set("helpfulness-4")),
    ))
    asyncio.run(rt.aclose())
    opro = json.loads((tmp_path / "eval" / "opro" / "result.json").read_text())
    expected = ValuesInstruction().system_prompt(load_value_set("helpfulness-4"))
    assert opro["trajectory"][0]["text"] == expected and opro["trajectory"][0]["step"] == 0


def test_seed_from_is_picacos_starting_instruction(tmp_path):
    from picaco import api
    from picaco.baselines import Persona

    config = RunConfig(
        values="helpfulness-4", preset="tiny", seed_from="MP", cache=False, optimize={"rounds": 1},
        target=RoleConfig(backend="fake", model="fake-target"),
        optimizer=RoleConfig(backend="fake", model="fake-optimizer"),
        judge=JudgeConfig(type="llm", backend="fake", model="fake-judge"),
    )
    result = api.optimize(config, run_dir=tmp_path / "run")
    expected = Persona().system_prompt(load_value_set("helpfulness-4"))
    assert result.seed_instruction == expected
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["seed_instruction"] == expected


def _deployment_setup(tmp_path, **deployment):
    """A fake-model config with a deployment (`system_template=`, `prior_turns=`), the value set, and
    a run directory whose instruction was optimized in that deployment (its provenance says so)."""
    roles = dict(
        target=RoleConfig(backend="fake", model="fake-target"),
        optimizer=RoleConfig(backend="fake", model="fake-optimizer"),
        judge=JudgeConfig(type="llm", backend="fake", model="fake-judge"),
    )
    config = RunConfig(values="helpfulness-4", preset="tiny", **deployment, **roles)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "instruction.txt").write_text("Be relevant, accurate, deep and clear.\n")
    (run_dir / "accounting.json").write_text(json.dumps({"total": {"calls": 60, "cache_hits": 0}}))
    (run_dir / "provenance.json").write_text(json.dumps(deployment))
    return config, load_value_set("helpfulness-4"), run_dir


def _messages_sent(cfg, methods, instructions, out_dir, value_set) -> list:
    """Evaluate on 2 queries with a fake target; the messages every target request carried."""
    rt = Runtime(cfg, use_cache=False)
    backend = rt.client("target").backend
    sent = []
    backend.responder = lambda request: sent.append(request.messages) or "a fine answer"
    try:
        asyncio.run(evaluate_config(cfg, methods, instructions, out_dir=out_dir, n_queries=2,
                                    n_boot=50, runtime=rt, redundancy=RedundancyModel(WordEmbedder(), value_set)))
    finally:
        asyncio.run(rt.aclose())
    return sent


def test_a_system_template_frames_every_method_and_must_match_the_runs(tmp_path):
    from picaco.baselines import ValuesInstruction
    from picaco.errors import ConfigError
    from picaco.llm.base import fill_template

    template = "You answer for the city museum.\n{instruction}"
    config, value_set, run_dir = _deployment_setup(tmp_path, system_template=template)

    def run(cfg, instructions, out):
        return _messages_sent(cfg, ["Q", "Q+IF"], instructions, tmp_path / out, value_set)

    sent = run(config, {"picaco": run_dir}, "eval")
    systems = {messages[0].content for messages in sent}
    # Q is the deployment as it is (the template, empty slot); every other method fills the slot
    assert systems == {fill_template(template, ""),
                       fill_template(template, ValuesInstruction().system_prompt(value_set)),
                       fill_template(template, "Be relevant, accurate, deep and clear.")}
    assert all(m[0].role == "system" for m in sent) and len(sent) == 6

    # the run's instruction was made for this template: refused under another one, or under none
    other = config.model_copy(update={"system_template": "You sell bicycles. {instruction}"})
    plain = config.model_copy(update={"system_template": None})
    for cfg in (other, plain):
        with pytest.raises(ConfigError, match="was optimized inside a system_template"):
            run(cfg, {"picaco": run_dir}, "eval-other")
    (run_dir / "provenance.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="was optimized without a system_template"):
        run(config, {"picaco": run_dir}, "eval-plain")
    assert run(plain, {"picaco": run_dir}, "eval-plain")  # same (no) template: fine


def test_prior_turns_go_to_every_method_or_come_with_the_run_alone(tmp_path):
    from picaco.errors import ConfigError
    from picaco.llm.base import turns_as_pairs

    pairs = [{"user": "Is the museum open on Monday?", "assistant": "No: Tuesday to Sunday, 10 to 6."}]
    config, value_set, run_dir = _deployment_setup(tmp_path, prior_turns=pairs)

    def run(cfg, methods, instructions, out):
        return _messages_sent(cfg, methods, instructions, tmp_path / out, value_set)

    sent = run(config, ["Q", "Q+IF"], {"picaco": run_dir}, "eval")
    assert len(sent) == 6
    for messages in sent:  # every method's request shows the example exchange just before the query
        assert turns_as_pairs(messages[-3:-1]) == pairs and messages[-1].role == "user"
    assert sum(m[0].role == "system" for m in sent) == 4  # Q (the bare deployment) has no system prompt
    # URIAL brings its own examples: refused rather than shown two sets
    with pytest.raises(ConfigError, match="URIAL brings its own example turns"):
        run(config, ["URIAL"], {}, "eval-urial")
    # the run's instruction was chosen over these turns: refused with other turns
    other = config.model_copy(update={"prior_turns": RunConfig(prior_turns="URIAL").prior_turns})
    with pytest.raises(ConfigError, match="was optimized over 1 example turns"):
        run(other, [], {"picaco": run_dir}, "eval-other")
    # with none in the config it brings its own turns, as URIAL does, and the baselines have none
    plain = config.model_copy(update={"prior_turns": None})
    sent = run(plain, ["Q", "URIAL"], {"picaco": run_dir}, "eval-own")
    assert len(sent) == 6
    own = [m for m in sent if m[0].content == "Be relevant, accurate, deep and clear."]
    assert len(own) == 2 and all(turns_as_pairs(m[1:-1]) == pairs and m[-1].role == "user" for m in own)
    assert sum(len(m) == 1 and m[0].role == "user" for m in sent) == 2  # Q: the query alone
    assert sum(len(m) == 8 for m in sent) == 2  # URIAL: its system prompt, its three exchanges, the query
    methods = json.loads((tmp_path / "eval-own" / "methods.json").read_text())
    assert methods["picaco"]["prior_turns"] == [{"role": "user", "content": pairs[0]["user"]},
                                                {"role": "assistant", "content": pairs[0]["assistant"]}]
    # a run over turns that returned no instruction is its turns alone, and the summary says so
    (run_dir / "instruction.txt").write_text("")
    (run_dir / "result.json").write_text(json.dumps({"instruction": "", "selected_round": None}))
    sent = run(plain, [], {"picaco": run_dir}, "eval-none-returned")
    assert [turns_as_pairs(m[:-1]) for m in sent] == [pairs, pairs]
    warnings = json.loads((tmp_path / "eval-none-returned" / "summary.json").read_text())["warnings"]
    assert any("picaco: its run returned no instruction" in w and "its example turns with no system "
               "prompt" in w for w in warnings)
    (run_dir / "provenance.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="was optimized without example turns; evaluate it with no "
                       "`prior_turns`"):
        run(config, [], {"picaco": run_dir}, "eval-none")
    assert run(plain, ["URIAL"], {"picaco": run_dir}, "eval-plain")  # no turns on either side: fine


# -- the real path: SmolLM2 behind a real llama.cpp server, MiniLM for q_φ ---------------------------


TWO_HH_VALUES = """
name: hh-2
family: hh
extends: helpfulness-4
values: [relevance, clarity]
"""


@pytest.mark.server
@pytest.mark.slow
def test_real_model_evaluation_end_to_end_and_resume(tmp_path, smollm2_path, minilm_dir):
    from support.llama_server import llama_server

    from picaco.embeddings import Embedder

    values_file = tmp_path / "hh-2.yaml"
    values_file.write_text(TWO_HH_VALUES)
    with llama_server(smollm2_path, n_ctx=1024, extra_args=["--verbose", "False"]) as srv:
        role = dict(backend="openai", base_url=srv.base_url, model=srv.model, max_in_flight=2, timeout=600)
        config = RunConfig(
            values=str(values_file), preset="tiny", cache=False,
            target=RoleConfig(**role), optimizer=RoleConfig(**role), judge=JudgeConfig(type="llm", **role),
        )
        value_set = load_value_set(values_file)

        async def evaluate_and_close():
            rt = Runtime(config, use_cache=False)
            try:
                res = await evaluate_config(
                    config, ["Q", "Q+IF", "Modular"], out_dir=tmp_path / "eval", n_queries=2,
                    max_tokens=12, n_boot=200, runtime=rt,
                    redundancy=RedundancyModel(Embedder(minilm_dir), value_set),
                )
            finally:
                await rt.aclose()  # in the loop that opened the HTTP connections
            return res, rt.accounting.to_json()

        def once():
            return asyncio.run(evaluate_and_close())

        first, acct = once()
        rows = [json.loads(l) for l in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
        # 2 queries x (1 + 1 + (2 drafts + 1 merge)) target calls
        assert acct["target"]["calls"] == 2 * 5
        # 2 values per response, each one call plus a bounded number of retries when unparsed
        assert 6 * 2 <= acct["eval_judge"]["calls"] <= 6 * 2 * 3
        assert len(rows) == 6 and all(r["response"] for r in rows)
        assert all(0 < r["q_phi"] < 1 for r in rows)
        scored = [v for r in rows for v in r["ratings"].values() if v is not None]
        assert scored and all(1 <= v <= 5 for v in scored)
        s = first.summary
        assert s["judge"]["backend"]["model"] == srv.model and s["methods"]["Modular"]["calls_per_query"] == 3
        assert set(s["methods"]) == {"Q", "Q+IF", "Modular"}
        modular = json.loads((tmp_path / "eval" / "methods.json").read_text())["Modular"]
        assert set(modular["draft_system_prompts"]) == {"relevance", "clarity"}
        second, acct_again = once()
        assert acct_again["total"]["calls"] == 0 and second.new_rows == 0  # resumed from the rows


def test_a_second_process_on_the_same_directory_is_refused(tmp_path):
    from picaco.evaluate.harness import _Store

    kw, _ = setup(tmp_path)
    asyncio.run(evaluate([Bare()], **kw))
    state = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    holder = _Store(tmp_path / "eval", {k: v for k, v in state.items() if k != "methods"})
    try:
        with pytest.raises(ConfigError, match="in use"):
            asyncio.run(evaluate([Bare()], **kw))
    finally:
        holder.close()
    assert asyncio.run(evaluate([Bare()], **kw)).new_rows == 0  # released


# -- progress on the command line ------------------------------------------------------------------------


def _cli_evaluate(tmp_path, *flags: str):
    import subprocess
    import sys as _sys

    config = tmp_path / "fake.yaml"
    config.write_text("values: helpfulness-4\ntarget: {backend: fake, model: fake-target}\njudge: {type: offline}\n")
    script = Path(_sys.executable).with_name("picaco")
    argv = [str(script)] if script.exists() else [_sys.executable, "-c", "from picaco.cli import main; main()"]
    from picaco import paths

    env = {**os.environ, paths.CACHE_ENV: str(tmp_path / "cache"), paths.MODELS_ENV: str(paths.models_dir()),
           "COLUMNS": "100"}
    return subprocess.run(
        [*argv, "evaluate", "-c", str(config), "-m", "Q", "-m", "Q+IF", "--n-queries", "3",
         "-o", str(tmp_path / f"out{len(flags)}{'-'.join(flags)}"), *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_evaluate_shows_progress_per_method_and_quiet_hides_it(tmp_path):
    as_json = _cli_evaluate(tmp_path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    events = [json.loads(line) for line in as_json.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["kind"] == "evaluate"]
    plan = [e["data"] for e in events if e["kind"] == "plan"]  # the pre-flight plan, before any progress
    assert events[0]["kind"] == "plan" and [m["name"] for m in plan[0]["methods"]] == ["Q", "Q+IF"]
    assert {e["phase"] for e in progress} == {"Q", "Q+IF"}
    for method in ("Q", "Q+IF"):
        last = [e for e in progress if e["phase"] == method][-1]
        assert last["done"] == last["total"] == 3
    rich = _cli_evaluate(tmp_path, "--no-cache")
    assert rich.returncode == 0, rich.stderr
    assert "Q+IF" in rich.stderr and "3/3" in rich.stderr and "evaluation plan: 2 method(s)" in rich.stderr
    quiet = _cli_evaluate(tmp_path, "--quiet", "--no-cache")
    assert quiet.returncode == 0, quiet.stderr
    assert "3/3" not in quiet.stderr and '"evaluate"' not in quiet.stderr and "evaluation plan" not in quiet.stderr

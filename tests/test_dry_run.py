"""Pre-flight plans and `--dry-run`: an evaluation's calls per method against hand-computed counts,
the scoring modes a config can resolve to, and (fake backend, logic only) that a dry run writes
nothing and predicts what the real command then spends."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from picaco.api import expected_modes
from picaco.cli import app
from picaco.config import RunConfig
from picaco.data.queries import load_queries
from picaco.evaluate.plan import evaluation_plan

FAKE = {"backend": "fake", "model": "fake-target"}


def _rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_an_evaluation_plan_counts_calls_per_method_and_what_is_already_written(tmp_path):
    config = RunConfig(values="helpfulness-4", target=FAKE, optimizer=FAKE,
                       eval_judge={"type": "llm", "backend": "fake", "model": "fake-judge"})
    test = load_queries("hh", "test")
    first, second, fourth = test[0].id, test[1].id, test[3].id
    out = tmp_path / "eval"
    _rows(out / "samples.jsonl", [
        {"method": "Q", "query_id": first, "sample": 0},
        {"method": "Q", "query_id": second, "sample": 1},
        {"method": "Q", "query_id": fourth, "sample": 0},  # not among the 3 queries asked for
        {"method": "Q", "query_id": first, "sample": 2},  # beyond the 2 samples asked for
    ])
    run = tmp_path / "picaco-run"
    run.mkdir()
    (run / "accounting.json").write_text(json.dumps({"total": {"calls": 50, "cache_hits": 7}}))
    (run / "instruction.txt").write_text("Be kind.")
    mine = tmp_path / "mine.txt"
    mine.write_text("Be brief.")

    plan = evaluation_plan(config, ["q", "Modular", "opro"], {"mine": mine, "PICACO": run / "instruction.txt"},
                           out_dir=out, n_queries=3, samples_per_query=2)
    by = {m.name: m for m in plan.methods}
    assert list(by) == ["Q", "Modular", "OPRO", "mine", "PICACO"]  # canonical names, instructions last
    # 3 queries x 2 samples = 6 responses each; the LLM judge rates 4 values = 4 calls a response
    assert (by["Q"].done, by["Q"].target_calls, by["Q"].judge_calls) == (2, 4, 16)
    assert (by["Modular"].calls_per_query, by["Modular"].target_calls, by["Modular"].judge_calls) == (5, 30, 24)
    # OPRO searches under PICACO's recorded spend (calls + cache hits), then answers like the others
    assert (by["OPRO"].search_calls, by["OPRO"].total_calls) == (57, 6 + 24 + 57)
    assert by["mine"].total_calls == by["PICACO"].total_calls == 30
    assert plan.total_calls == 20 + 54 + 87 + 30 + 30
    assert "up to 57 requests" in plan.describe() and "4 of 6" in plan.describe()  # Q: 4 responses to do
    assert json.loads(json.dumps(plan.to_json()))["total_calls"] == plan.total_calls

    # once OPRO's responses are written its search is over too: nothing left to spend
    _rows(out / "samples.jsonl", [{"method": "OPRO", "query_id": q.id, "sample": s}
                                  for q in test[:3] for s in range(2)])
    done = evaluation_plan(config, ["OPRO"], out_dir=out, search_budget=57, n_queries=3, samples_per_query=2)
    assert done.methods[0].search_calls == 0 and done.total_calls == 0
    assert "done" in done.describe() and "nothing left to generate" in done.describe().splitlines()[-1]
    # a search that finished before its rows were written (a kill in between) is not paid for again
    (out / "samples.jsonl").unlink()
    assert evaluation_plan(config, ["OPRO"], out_dir=out, search_budget=57, n_queries=3).methods[0].search_calls == 57
    (out / "opro").mkdir()
    (out / "opro" / "result.json").write_text("{}")
    assert evaluation_plan(config, ["OPRO"], out_dir=out, search_budget=57, n_queries=3).total_calls == 3 + 12
    # the offline judge makes no model calls
    offline = evaluation_plan(config.model_copy(update={"eval_judge": None}), ["Q"], out_dir=tmp_path / "new",
                              n_queries=3)
    assert offline.methods[0].judge_calls == 0 and offline.total_calls == 3


def test_the_scoring_modes_a_config_can_resolve_to():
    embedded = RunConfig(values="helpfulness-4", optimize={"mode": "auto"})
    assert expected_modes(embedded) == ("likelihood",)
    assert expected_modes(embedded.model_copy(update={"optimize": {"mode": "sampling"}})) == ("sampling",)

    def endpoint(likelihood: str) -> RunConfig:
        return RunConfig(values="helpfulness-4", optimize={"mode": "auto"},
                         target={"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                 "likelihood": likelihood})

    assert expected_modes(endpoint("auto")) == ("likelihood", "sampling")  # known once probed
    assert expected_modes(endpoint("none")) == ("sampling",)
    assert expected_modes(endpoint("completions_echo")) == ("likelihood",)


FAKE_CONFIG = """
preset: tiny
values: helpfulness-4
target: {backend: fake, model: fake-target}
optimizer: {backend: fake, model: fake-optimizer}
judge: {type: llm, backend: fake, model: fake-judge}
eval_judge: {type: llm, backend: fake, model: fake-eval-judge}
"""


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _dry(*args: str) -> dict:
    return json.loads(_invoke(*args, "--dry-run", "--json"))


def _calls(accounting: dict, role: str) -> int:
    entry = accounting.get(role, {})
    return entry.get("calls", 0) + entry.get("cache_hits", 0)


def test_a_dry_run_writes_nothing_and_predicts_what_the_command_spends(tmp_path):
    cfg = tmp_path / "fake.yaml"
    cfg.write_text(FAKE_CONFIG)
    run = tmp_path / "run"
    before = _dry("optimize", "-c", str(cfg), "-o", str(run))
    assert not run.exists()
    assert list(before["optimize"]["estimates"]) == ["likelihood"]  # the fake backend scores likelihoods
    assert "a new run" in before["optimize"]["run_dir"]
    _invoke("optimize", "-c", str(cfg), "-o", str(run), "-q", "--no-cache")
    # the run's own pre-flight estimate (config.json) is the one the dry run printed
    assert json.loads((run / "config.json").read_text())["estimate"] == before["optimize"]["estimates"]["likelihood"]
    assert "finished run" in _dry("optimize", "-c", str(cfg), "-o", str(run))["optimize"]["run_dir"]

    out = tmp_path / "compare"
    plan = _dry("compare", "-c", str(cfg), "--methods", "Q,Modular,OPRO,PICACO", "--n-queries", "3", "-o", str(out))
    assert not out.exists()
    estimated = plan["optimize"]["estimates"]["likelihood"]["total_calls"]
    methods = {m["name"]: m for m in plan["evaluate"]["methods"]}
    assert methods["OPRO"]["search_budget"] == estimated  # PICACO's estimate until it has run
    assert plan["total_calls"] == estimated + plan["evaluate"]["total_calls"]
    # more responses per query: every method's responses to do grow with them
    three = _dry("compare", "-c", str(cfg), "--methods", "Q,Modular,OPRO,PICACO", "--n-queries", "3",
                 "--samples", "3", "-o", str(out))
    assert [m["responses"] for m in three["evaluate"]["methods"]] == [3 * m["responses"] for m in plan["evaluate"]["methods"]]

    # an evaluation of the finished run: the plan's target and judge calls are what it then makes
    ev = tmp_path / "eval"
    args = ("evaluate", "-c", str(cfg), "-m", "Q", "-m", "Modular", "-i", f"PICACO={run}", "--n-queries", "3",
            "-o", str(ev))
    planned = {m["name"]: m for m in _dry(*args)["evaluate"]["methods"]}
    assert not ev.exists()
    _invoke(*args, "-q", "--no-cache")
    spent = json.loads((ev / "accounting.jsonl").read_text().splitlines()[-1])["accounting"]
    assert _calls(spent, "target") == sum(m["target_calls"] for m in planned.values()) == 3 + 15 + 3
    # the judge's first askings; a rating that cannot be read is asked again (the fake judge's often are)
    faults = spent["eval_judge"]["faults"]
    asked_again = faults.get("no_rating", 0) - faults.get("unscored", 0)
    assert _calls(spent, "eval_judge") - asked_again == sum(m["judge_calls"] for m in planned.values()) == 9 * 4
    again = _dry(*args)["evaluate"]
    assert again["total_calls"] == 0 and all(m["done"] == 3 for m in again["methods"])

"""The GEPA baseline: adapter and reflection prompt construction, budget enforcement, resume, the
missing-package error, its place in evaluate_config (fake backend, for logic), and one short real
search with SmolLM2 through the real `gepa` package."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytest.importorskip("gepa")

from picaco.baselines import Gepa, GepaParams, canonical_name  # noqa: E402
from picaco.baselines.gepa_baseline import (  # noqa: E402
    COMPONENT, BudgetGuard, PicacoGepaAdapter, _BudgetStop, import_gepa, mean_rating, reflection_template,
    weakest_feedback,
)
from picaco.config import JudgeConfig, RoleConfig, RunConfig  # noqa: E402
from picaco.data.queries import Query  # noqa: E402
from picaco.errors import ConfigError  # noqa: E402
from picaco.judge.base import ValueScore  # noqa: E402
from picaco.llm.accounting import Accounting  # noqa: E402
from picaco.llm.base import Message  # noqa: E402
from picaco.llm.client import LLMClient  # noqa: E402
from picaco.llm.fake import FakeBackend  # noqa: E402
from picaco.values import ValueSet  # noqa: E402

VALUES = ValueSet.model_validate({
    "name": "two",
    "values": [
        {"id": "care", "title": "Care", "definition": "Look after the wellbeing of the user."},
        {"id": "truth", "title": "Truth", "definition": "Say only what is accurate and supported."},
    ],
})
TRAIN = [Query(id=f"t{i}", text=f"Question number {i}?") for i in range(6)]


class LengthJudge:
    """One judge request per item; care = 1 + words % 5, truth = 1 + (words + 1) % 5, so the rating
    follows the instruction the target echoes. Notes 'too short' on care when it is rated 1."""

    name = "length"

    def __init__(self, client: LLMClient, calls_per_item: int = 1):
        self.client = client
        self.calls_per_item = calls_per_item

    def identity(self) -> dict:
        return {"kind": "length", "v": 1}

    async def score(self, value_set, items):
        out = []
        for _, response in items:
            for _ in range(self.calls_per_item):
                await self.client.generate((Message("user", response),), max_tokens=2)
            n = len(response.split())
            scores = {}
            for i, v in enumerate(value_set.ids):
                r = 1 + (n + i) % 5
                scores[v] = ValueScore.from_rating(v, r, "too short" if r == 1 else None)
            out.append(scores)
        return out


def echo_system(request) -> str:
    return request.messages[0].content if len(request.messages) > 1 else "bare"


def proposal(request) -> str:
    # the reflection LM's reply: a fenced instruction whose length depends on the call's seed
    return "```\nBe helpful and kind" + " and careful" * (request.seed % 7) + ".\n```"


def setup(max_calls: int, *, state_dir=None, judge_calls: int = 1, optimizer=proposal, **params):
    acct = Accounting()
    target = LLMClient("target", FakeBackend(responder=echo_system), accounting=acct)
    opt = LLMClient("optimizer", FakeBackend(responder=optimizer), accounting=acct)
    judge = LengthJudge(LLMClient("judge", FakeBackend(), accounting=acct), judge_calls)
    settings = dict(max_calls=max_calls, minibatch=2, reflection_minibatch=2, max_new_tokens=30) | params
    method = Gepa(optimizer=opt, judge=judge, train_queries=TRAIN, params=GepaParams(**settings),
                  seed_instruction="Be helpful.", state_dir=state_dir)
    return method, target, acct


def requests(acct: Accounting) -> int:
    return acct.total().calls + acct.total().cache_hits


# -- construction ------------------------------------------------------------------------------------


def test_adapter_scores_per_value_and_reflects_on_the_weakest_value():
    async def go():
        acct = Accounting()
        target = LLMClient("target", FakeBackend(responder=echo_system), accounting=acct)
        judge = LengthJudge(LLMClient("judge", FakeBackend(), accounting=acct))
        params = GepaParams(max_calls=100)
        adapter = PicacoGepaAdapter(target=target, optimizer=target, judge=judge, value_set=VALUES,
                                    params=params, guard=BudgetGuard(acct, params, 2),
                                    loop=asyncio.get_running_loop())
        batch = [{"id": "a", "text": "Why?"}, {"id": "b", "text": "How?"}]
        # GEPA calls the adapter from its worker thread
        return await asyncio.to_thread(adapter.evaluate, batch, {COMPONENT: "Be kind now please"}, True), adapter

    result, adapter = asyncio.run(go())
    # the target echoes the 4-word system prompt: care = 1 + 4 % 5 = 5, truth = 1 + 5 % 5 = 1
    assert result.scores == [3.0, 3.0]
    assert result.objective_scores == [{"care": 5.0, "truth": 1.0}] * 2
    assert [o["response"] for o in result.outputs] == ["Be kind now please"] * 2
    data = adapter.make_reflective_dataset({COMPONENT: "x"}, result, [COMPONENT])
    assert list(data) == [COMPONENT] and len(data[COMPONENT]) == 2
    record = data[COMPONENT][0]
    assert record["User message"] == "Why?" and record["Assistant's answer"] == "Be kind now please"
    assert record["Feedback"].startswith("Weakest value: Truth (rated 1.0 of 5)")
    assert "Other values: care 5.0." in record["Feedback"]


def test_feedback_and_mean_rating_edge_cases():
    fb = weakest_feedback(VALUES, {"care": 1.0, "truth": 3.0}, {"care": "too short"})
    assert fb.startswith("Weakest value: Care (rated 1.0 of 5): Look after") and "Judge's note: too short" in fb
    assert weakest_feedback(VALUES, {"care": None, "truth": None}, {}) == "The judge could not rate this answer on any value."
    assert mean_rating({"care": 2.0, "truth": None}) == 2.0
    assert mean_rating({"care": None, "truth": None}) == 1.0  # the floor: GEPA needs a number


def test_reflection_template_keeps_gepas_placeholders_and_lists_the_values():
    t = reflection_template(VALUES, 700)
    assert "<curr_param>" in t and "<side_info>" in t
    assert "- Care: Look after the wellbeing of the user." in t and "at most 100 words" in t
    framed = reflection_template(VALUES, 700, "Zoo of {city}: {instruction} Be brief.")
    assert framed.startswith(t) and framed.endswith(
        '"""\nZoo of {city}: [INSTRUCTION] Be brief.\n"""\nDo not repeat the fixed text.')


def test_guard_arithmetic_and_hard_stops():
    acct = Accounting()
    params = GepaParams(max_calls=10, reflection_minibatch=3)
    guard = BudgetGuard(acct, params, val_size=2)
    guard.observe(examples=2, cost=5)  # 3 per example, rounded up
    assert guard.cost_example == 3
    assert guard.iteration_cost() == (2 * 3 + 2) * 3 + 1
    assert guard(None) is True and guard.stop_reason == "budget"

    adapter = PicacoGepaAdapter(target=None, optimizer=None, judge=None, value_set=VALUES, params=params,
                                guard=BudgetGuard(acct, params, 2), loop=None)
    adapter.guard.cost_example = 2
    with pytest.raises(_BudgetStop):  # 6 examples x 2 requests > 10: refused before any request
        adapter.evaluate([{"id": str(i), "text": "q"} for i in range(6)], {COMPONENT: "x"})
    adapter.guard.prior = 10
    with pytest.raises(_BudgetStop):
        adapter.reflect("prompt")
    assert requests(acct) == 0


# -- the search ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_calls", [8, 15, 30, 60, 120])
def test_search_never_spends_more_than_its_budget(max_calls):
    method, target, acct = setup(max_calls)
    asyncio.run(method.prepare(target, VALUES))
    r = method.result
    assert r.spent == requests(acct) <= max_calls
    assert r.stop_reason == "budget"
    # the stopper let no iteration start that could not finish: what is left is less than one
    assert max_calls - r.spent < (2 * 2 + 2) * 2 + 1
    assert r.best_score == max(r.scores) and len(r.scores) == r.candidates
    assert method.calls_spent == r.spent


def test_search_finds_a_better_instruction_with_enough_budget():
    method, target, acct = setup(120)
    asyncio.run(method.prepare(target, VALUES))
    r = method.result
    assert r.candidates >= 2 and r.scores[0] < r.best_score
    assert method.system_prompt(VALUES) == r.instruction != "Be helpful."
    assert r.instruction.startswith("Be helpful and kind")  # GEPA took the text out of the fence
    assert set(r.per_value) == {"care", "truth"}
    assert acct.to_json()["optimizer"]["calls"] >= 1


def test_budget_too_small_for_the_seed_is_a_config_error():
    method, target, _ = setup(1)
    with pytest.raises(ConfigError, match="cannot score even the seed"):
        asyncio.run(method.prepare(target, VALUES))


def test_reflection_errors_stop_the_search_instead_of_being_swallowed():
    def broken(request):
        raise RuntimeError("optimizer is down")

    method, target, _ = setup(60, optimizer=broken)
    with pytest.raises(RuntimeError, match="optimizer is down"):
        asyncio.run(method.prepare(target, VALUES))


def test_result_is_reloaded_and_an_interrupted_search_resumes(tmp_path):
    method, target, _ = setup(60, state_dir=tmp_path / "gepa")
    asyncio.run(method.prepare(target, VALUES))
    stored = json.loads((tmp_path / "gepa" / "result.json").read_text())
    assert stored["instruction"] == method.result.instruction
    assert (tmp_path / "gepa" / "instruction.txt").read_text().strip() == method.result.instruction

    again, target2, acct2 = setup(60, state_dir=tmp_path / "gepa")
    asyncio.run(again.prepare(target2, VALUES))
    assert again.result.to_json() == method.result.to_json() and requests(acct2) == 0

    # without result.json the search resumes from GEPA's checkpoint: only the seed is scored again
    (tmp_path / "gepa" / "result.json").unlink()
    resumed, target3, acct3 = setup(60, state_dir=tmp_path / "gepa")
    asyncio.run(resumed.prepare(target3, VALUES))
    assert resumed.result.instruction == method.result.instruction
    assert requests(acct3) == 2 * 2  # 2 validation queries x (1 sample + 1 judge call)
    assert resumed.result.spent == method.result.spent + 4


def test_other_settings_use_another_checkpoint(tmp_path):
    a, t, _ = setup(30, state_dir=tmp_path / "gepa")
    asyncio.run(a.prepare(t, VALUES))
    b, t2, acct = setup(31, state_dir=tmp_path / "gepa")
    asyncio.run(b.prepare(t2, VALUES))
    assert requests(acct) > 0
    assert len(list((tmp_path / "gepa").glob("gepa-*"))) == 2


def test_missing_package_gives_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gepa", None)
    with pytest.raises(ConfigError) as e:
        import_gepa()
    assert "pip install 'picaco[gepa]'" in str(e.value) and "\n" not in str(e.value)
    method, target, _ = setup(60)
    with pytest.raises(ConfigError, match="optional `gepa` package"):
        asyncio.run(method.prepare(target, VALUES))


# -- through the evaluation entry point ----------------------------------------------------------------


def test_evaluate_config_runs_gepa_under_picacos_spend(tmp_path):
    from test_evaluate import WordEmbedder

    from picaco.evaluate.run import evaluate_config
    from picaco.redundancy import RedundancyModel
    from picaco.runtime import Runtime
    from picaco.values import load_value_set

    assert canonical_name("gepa") == "GEPA"
    config = RunConfig(
        values="helpfulness-4", preset="tiny",
        target=RoleConfig(backend="fake", model="fake-target"),
        optimizer=RoleConfig(backend="fake", model="fake-optimizer"),
        judge=JudgeConfig(type="llm", backend="fake", model="fake-judge"),
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "instruction.txt").write_text("Be relevant, accurate, deep and clear.\n")
    (run_dir / "accounting.json").write_text(json.dumps({"total": {"calls": 150, "cache_hits": 0}}))
    rt = Runtime(config, use_cache=False)
    # the instruction given as its file (as the CLI passes it): the budget still comes from the run
    res = asyncio.run(evaluate_config(
        config, ["Q", "GEPA"], {"picaco": run_dir / "instruction.txt"}, out_dir=tmp_path / "eval",
        n_queries=2, n_boot=50, runtime=rt,
        redundancy=RedundancyModel(WordEmbedder(), load_value_set("helpfulness-4")),
    ))
    asyncio.run(rt.aclose())
    assert list(res.summary["methods"]) == ["Q", "GEPA", "picaco"]
    stored = json.loads((tmp_path / "eval" / "gepa" / "result.json").read_text())
    assert stored["max_calls"] == 150 and 0 < stored["spent"] <= 150
    assert res.summary["same_judge"] == ["GEPA", "picaco"]
    described = json.loads((tmp_path / "eval" / "methods.json").read_text())["GEPA"]
    assert described["system_prompt"] == stored["instruction"]
    assert described["provenance"]["spent"] == stored["spent"] and described["provenance"]["gepa"]


# -- the real path ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_gepa_search_with_smollm2(tmp_path, smollm2_path, minilm_dir):
    """SmolLM2 answers and reflects, MiniLM similarity judges (cheap: no judge requests), and the real
    `gepa` package searches under a budget of exactly one iteration."""
    from picaco.embeddings import Embedder
    from picaco.judge.heuristic import SimilarityJudge
    from picaco.runtime import Runtime
    from picaco.values import load_value_set

    role = dict(backend="embedded", model=str(smollm2_path), n_ctx=1024)
    config = RunConfig(values="helpfulness-4", preset="tiny", cache=False, target=RoleConfig(**role),
                       optimizer=RoleConfig(**role))
    value_set = load_value_set("helpfulness-4")
    queries = ["How do I boil an egg?", "What is a prime number?", "Name a fruit.", "Why is the sky blue?"]

    async def search():
        rt = Runtime(config, use_cache=False)
        try:
            method = Gepa(
                optimizer=rt.client("optimizer"), judge=SimilarityJudge(Embedder(minilm_dir)),
                train_queries=[Query(id=f"r{i}", text=t) for i, t in enumerate(queries)],
                params=GepaParams(max_calls=7, minibatch=2, reflection_minibatch=1, max_new_tokens=16,
                                  optimizer_max_tokens=48, instruction_max_chars=300),
                accounting=rt.accounting, state_dir=tmp_path / "gepa",
            )
            await method.prepare(rt.client("target"), value_set)
            return method, rt.accounting.to_json()
        finally:
            await rt.aclose()

    method, acct = asyncio.run(search())
    r = method.result
    # seed on the 2 validation queries (2), then one iteration: parent and child on 1 reflection
    # query (2), one reflection (1), and, when GEPA accepts the child, its validation pass (2); the
    # next iteration could cost 5 more, so the search stops at 5 or 7
    accepted = r.candidates - 1
    assert accepted in (0, 1)
    assert r.spent == acct["total"]["calls"] == 5 + 2 * accepted and r.stop_reason == "budget"
    assert acct["optimizer"]["calls"] == 1 and acct["target"]["calls"] == 4 + 2 * accepted
    assert 1.0 <= r.best_score <= 5.0 and r.best_score == max(r.scores)
    assert r.instruction.strip() and set(r.per_value) == set(value_set.ids)

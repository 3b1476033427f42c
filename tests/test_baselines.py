"""Baseline methods: the exact messages each sends (recorded on the fake backend), their call costs,
and OPRO's trajectory prompt, parsing, budget and persistence."""

from __future__ import annotations

import asyncio
import json

import pytest

from picaco.baselines import (
    Bare, Instruction, Modular, Opro, OproParams, Persona, Urial, UrialSum, ValuesInstruction,
    budget_from_run, canonical_name, fingerprint, make_simple,
)
from picaco.baselines.opro import Entry, build_meta_prompt, parse_proposal, trajectory_for_prompt
from picaco.baselines.urial import URIAL_EXAMPLES, URIAL_SYSTEM
from picaco.data.queries import Query
from picaco.errors import ConfigError, DataError
from picaco.judge.base import ValueScore
from picaco.llm.accounting import Accounting
from picaco.llm.base import GenerateRequest, Message
from picaco.llm.client import LLMClient
from picaco.llm.fake import FakeBackend
from picaco.values import ValueSet

VALUES = ValueSet.model_validate({
    "name": "two",
    "values": [
        {"id": "care", "title": "Care", "definition": "Look after the wellbeing of the user."},
        {"id": "truth", "title": "Truth", "definition": "Say only what is accurate and  well\nsupported."},
    ],
})
QUERIES = ["How do I fix a flat tyre?", "Is coffee bad for me?"]


class Recorder:
    """A fake-backend responder that records every request and answers with a numbered reply."""

    def __init__(self, reply=None):
        self.requests: list[GenerateRequest] = []
        self.reply = reply

    def __call__(self, request: GenerateRequest) -> str:
        self.requests.append(request)
        if self.reply is not None:
            return self.reply(request)
        return f"reply to {request.messages[-1].content[:20]}"


def client(recorder: Recorder, role="target", accounting=None) -> LLMClient:
    return LLMClient(role, FakeBackend(responder=recorder), accounting=accounting)


def run(method, rec, queries=QUERIES, **kw):
    settings = dict(seed=5, temperature=0.3, max_tokens=40) | kw
    return asyncio.run(method.respond(client(rec), VALUES, queries, **settings))


def messages_of(rec) -> list[list[tuple[str, str]]]:
    return [[(m.role, m.content) for m in r.messages] for r in rec.requests]


def test_bare_sends_the_query_alone_with_the_given_sampling():
    rec = Recorder()
    out = run(Bare(), rec)
    assert sorted(messages_of(rec)) == sorted([[("user", q)] for q in QUERIES])
    assert {(r.seed, r.temperature, r.max_tokens, r.sample_index) for r in rec.requests} == {(5, 0.3, 40, 0)}
    assert out == [f"reply to {q[:20]}".strip() for q in QUERIES]  # in query order, stripped


def test_values_instruction_lists_titles_and_definitions():
    rec = Recorder()
    run(ValuesInstruction(), rec, QUERIES[:1])
    assert messages_of(rec) == [[
        ("system", "You are a helpful assistant. In every answer, honour all of the following values:\n"
                   "- Care: Look after the wellbeing of the user.\n"
                   "- Truth: Say only what is accurate and well supported."),
        ("user", QUERIES[0]),
    ]]


def test_persona_prompt():
    rec = Recorder()
    run(Persona(), rec, QUERIES[:1])
    assert messages_of(rec)[0][0] == (
        "system",
        "You are a thoughtful person whose outlook is shaped by these values, all of which you hold "
        "sincerely:\n- Care: Look after the wellbeing of the user.\n"
        "- Truth: Say only what is accurate and well supported.\n"
        "Reply to the user as this person would, in your own voice.",
    )


def test_urial_sends_examples_as_prior_turns():
    rec = Recorder()
    run(Urial(), rec, QUERIES[:1])
    sent = messages_of(rec)[0]
    expected = [("system", URIAL_SYSTEM)]
    for q, a in URIAL_EXAMPLES:
        expected += [("user", q), ("assistant", a)]
    assert sent == expected + [("user", QUERIES[0])]
    assert len(URIAL_EXAMPLES) == 3


def test_urial_sum_appends_the_values_to_the_same_prompt():
    rec = Recorder()
    run(UrialSum(), rec, QUERIES[:1])
    system = messages_of(rec)[0][0][1]
    assert system == (URIAL_SYSTEM + "\n\nIn every answer, also honour these values:\n"
                      "- Care: Look after the wellbeing of the user.\n"
                      "- Truth: Say only what is accurate and well supported.")
    assert len(messages_of(rec)[0]) == 8  # system + 3 example pairs + query


def test_modular_drafts_per_value_then_merges():
    rec = Recorder(reply=lambda r: (
        f"DRAFT[{r.messages[0].content.split(':')[0].split()[-1]}|{r.messages[-1].content}]"
        if r.messages[0].content.startswith("You speak for") else "MERGED"
    ))
    method = Modular()
    out = run(method, rec)
    assert out == ["MERGED", "MERGED"]
    drafts = [r for r in rec.requests if r.messages[0].content.startswith("You speak for")]
    merges = [r for r in rec.requests if not r.messages[0].content.startswith("You speak for")]
    assert len(drafts) == 4 and len(merges) == 2  # K drafts + 1 merge per query
    assert method.calls_spent == 6 == 2 * method.calls_per_query(VALUES)
    assert (
        "system",
        "You speak for people who care above all about Care: Look after the wellbeing of the user. "
        "Answer the user's message the way they would want it answered.",
    ) in [(m.role, m.content) for r in drafts for m in r.messages[:1]]
    merge = next(r for r in merges if QUERIES[1] in r.messages[1].content)
    assert merge.messages[0].content.endswith(
        "honours all of these values together: Care and Truth. Reply with the final answer only, "
        "addressed to the user.")
    assert merge.messages[1].content == (
        f"User's message:\n{QUERIES[1]}\n\nDrafts:\n"
        f"[Draft 1, written for Care]\nDRAFT[Care|{QUERIES[1]}]\n\n"
        f"[Draft 2, written for Truth]\nDRAFT[Truth|{QUERIES[1]}]\n\n"
        "Write the final answer to the user's message."
    )


def test_instruction_verbatim_and_from_a_run_directory(tmp_path):
    rec = Recorder()
    text = "Answer plainly.\nCheck facts before stating them."
    run(Instruction(text, "mine"), rec, QUERIES[:1])
    assert messages_of(rec)[0] == [("system", text), ("user", QUERIES[0])]
    (tmp_path / "instruction.txt").write_text(text + "\n")
    m = Instruction.from_path(tmp_path, "picaco")
    assert (m.name, m.text) == ("picaco", text)
    assert m.describe(VALUES)["provenance"]["source"].endswith("instruction.txt")
    with pytest.raises(DataError):
        Instruction.from_path(tmp_path / "missing.txt")
    with pytest.raises(DataError):
        Instruction("   ")


def test_fingerprints_tell_methods_apart_and_ignore_provenance():
    fps = {fingerprint(m.describe(VALUES)) for m in (Bare(), ValuesInstruction(), Urial(), UrialSum(), Persona(), Modular())}
    assert len(fps) == 6
    a = Instruction("Be kind.", "x", source="a.txt").describe(VALUES)
    b = Instruction("Be kind.", "x", source="b.txt").describe(VALUES)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(Instruction("Be kinder.", "x").describe(VALUES))


def test_names_and_aliases():
    assert canonical_name("q+if") == "Q+IF" and canonical_name("persona") == "MP"
    assert canonical_name("modular_pluralism") == "Modular" and canonical_name("urial-sum") == "URIAL+Sum"
    assert isinstance(make_simple("bare"), Bare)
    with pytest.raises(ConfigError):
        canonical_name("nope")
    with pytest.raises(ConfigError):
        make_simple("OPRO")


# -- OPRO ---------------------------------------------------------------------------------------------


def entry(text, score, step=1):
    return Entry(step, text, "scored" if score is not None else "discarded: empty", score)


def test_trajectory_prompt_shows_best_in_ascending_order():
    traj = [entry("seed prompt", 3.0, 0), entry("great prompt", 4.5), entry("bad prompt", 2.0),
            entry("broken", None), entry("tied prompt", 3.0)]
    shown = trajectory_for_prompt(traj, history=3)
    assert [e.text for e in shown] == ["seed prompt", "tied prompt", "great prompt"]
    system, user = build_meta_prompt(VALUES, traj, ["Is coffee bad for me?"], history=2, max_words=30)
    assert system.content == "You write system prompts for an AI assistant. Reply with the new system prompt only."
    assert user.content == (
        "Your task is to write a system prompt for an AI assistant so that its answers honour all of "
        "these values together:\n"
        "1. Care: Look after the wellbeing of the user.\n"
        "2. Truth: Say only what is accurate and well supported.\n\n"
        "Below are earlier system prompts with their scores. A score is the mean rating, from 1 to 5, "
        "that a judge gave the assistant's answers on these values; higher is better. The prompts are "
        "in ascending order of score.\n\n"
        "Prompt:\nseed prompt\nScore: 3.00\n\n"
        "Prompt:\ngreat prompt\nScore: 4.50\n\n"
        "Examples of user messages the assistant must answer:\n- Is coffee bad for me?\n\n"
        "Write a new system prompt that is different from all the prompts above and would score "
        "higher than all of them. Use at most 30 words. Reply with the new system prompt only."
    )
    # inside a system_template, the proposer is shown the fixed text with the slot marked
    _, framed = build_meta_prompt(VALUES, traj, [], history=2, max_words=30,
                                  system_template="You run the {city} zoo's chat.\n{instruction}")
    assert ('goes into this fixed text, where [INSTRUCTION] stands; the rest stays as it is:\n'
            '"""\nYou run the {city} zoo\'s chat.\n[INSTRUCTION]\n"""\nDo not repeat the fixed text.\n\n'
            "Write a new system prompt") in framed.content


def test_parse_proposal_drops_copied_format():
    assert parse_proposal("Prompt:\nBe warm and exact.\nScore: 4.9") == "Be warm and exact."
    assert parse_proposal("Sure! Here is the new system prompt:\n\"Be warm and exact.\"") == "Be warm and exact."


class CountingJudge:
    """One judge request per item through its own client; rating from the response's word count, so
    it follows the instruction the target echoes."""

    name = "counting"

    def __init__(self, client: LLMClient):
        self.client = client

    def identity(self) -> dict:
        return {"kind": "counting", "v": 1}

    async def score(self, value_set, items):
        out = []
        for query, response in items:
            await self.client.generate((Message("user", response),), max_tokens=2)
            n = len(response.split())
            out.append({v: ValueScore.from_rating(v, 1 + (n + i) % 5) for i, v in enumerate(value_set.ids)})
        return out


def _opro_setup(max_calls, *, optimizer_reply=None, state_dir=None, cpq=3, patience=3):
    acct = Accounting()
    # the target echoes its system prompt, so the judge's rating depends on the instruction
    target = LLMClient("target", FakeBackend(responder=lambda r: r.messages[0].content if len(r.messages) > 1 else "bare"), accounting=acct)
    opt_rec = Recorder(reply=optimizer_reply or (lambda r: f"Be helpful and kind, and add {r.seed % 97} careful details."))
    optimizer = LLMClient("optimizer", FakeBackend(responder=opt_rec), accounting=acct)
    judge = CountingJudge(LLMClient("judge", FakeBackend(), accounting=acct))
    train = [Query(id=f"t{i}", text=f"Question number {i}?") for i in range(5)]
    method = Opro(
        optimizer=optimizer, judge=judge, train_queries=train,
        params=OproParams(max_calls=max_calls, candidates_per_step=cpq, minibatch=2, max_new_tokens=30,
                          optimizer_max_tokens=50, patience=patience),
        seed_instruction="Be helpful.", state_dir=state_dir,
    )
    return method, target, acct, opt_rec


def test_opro_respects_its_call_budget():
    # scoring one instruction: 2 target samples + 2 judge calls = 4 requests; a proposal costs 1.
    # seed: 4 (spent 4). step 1: (20 - 4) // (1 + 4) = 3 proposals (spent 7), each scored: 11, 15, 19.
    # step 2: (20 - 19) // 5 = 0 -> stop.
    method, target, acct, rec = _opro_setup(20, cpq=4)
    asyncio.run(method.prepare(target, VALUES))
    r = method.result
    assert r.spent == 19 <= 20
    assert acct.total().calls + acct.total().cache_hits == 19
    assert (r.steps, r.stop_reason) == (1, "budget")
    assert [e.status for e in r.trajectory] == ["scored"] * 4
    assert [e.cost for e in r.trajectory] == [4, 4, 4, 4]
    assert len(rec.requests) == 3
    assert r.best_score == max(e.score for e in r.trajectory)
    assert method.system_prompt(VALUES) == next(e.text for e in r.trajectory if e.score == r.best_score)
    # the first proposal saw the seed and its score in the meta-prompt
    assert "Prompt:\nBe helpful.\nScore: " in rec.requests[0].messages[1].content


def test_opro_is_deterministic_and_stops_when_proposals_repeat():
    method, target, _, rec = _opro_setup(1000, optimizer_reply=lambda r: "Always be helpful and kind.", patience=2)
    asyncio.run(method.prepare(target, VALUES))
    r = method.result
    # 3 proposals a step. Step 1 scores the proposal once and discards its 2 copies; steps 2 and 3
    # score nothing (3 duplicates each): patience 2 stops after step 3. Scored: seed + 1; 2 + 3 + 3 copies.
    assert r.stop_reason == "no_new_instructions" and r.steps == 3
    statuses = [e.status for e in r.trajectory]
    assert statuses.count("scored") == 2 and statuses.count("discarded: duplicate") == 8
    again, target2, _, _ = _opro_setup(1000, optimizer_reply=lambda r: "Always be helpful and kind.", patience=2)
    asyncio.run(again.prepare(target2, VALUES))
    assert again.result.to_json() == r.to_json()


def test_opro_budget_too_small_and_persisted_result(tmp_path):
    method, target, _, _ = _opro_setup(1)
    with pytest.raises(ConfigError):
        asyncio.run(method.prepare(target, VALUES))
    method, target, acct, _ = _opro_setup(12, state_dir=tmp_path / "opro")
    asyncio.run(method.prepare(target, VALUES))
    stored = json.loads((tmp_path / "opro" / "result.json").read_text())
    assert stored["instruction"] == method.result.instruction
    assert (tmp_path / "opro" / "instruction.txt").read_text().strip() == method.result.instruction
    lines = (tmp_path / "opro" / "trajectory.jsonl").read_text().splitlines()
    assert len(lines) == len(method.result.trajectory)
    # a new process with the same settings loads the result instead of searching
    again, target2, acct2, rec2 = _opro_setup(12, state_dir=tmp_path / "opro")
    asyncio.run(again.prepare(target2, VALUES))
    assert again.result.to_json() == method.result.to_json() and acct2.total().calls == 0
    assert again.describe(VALUES)["provenance"]["spent"] == method.result.spent


def test_an_interrupted_opro_search_replays_a_seed_holding_unicode_line_separators(tmp_path):
    # the trajectory keeps text unescaped: U+2028 and NEL in a user's seed instruction must not split
    # its JSON lines on replay (the optimizer's proposals are cleaned to plain newlines)
    seed = "Be helpful.\u2028Be careful.\x85Be brief."
    method, target, _, _ = _opro_setup(12, state_dir=tmp_path / "opro")
    method.seed_instruction = seed
    asyncio.run(method.prepare(target, VALUES))
    assert "\u2028" in (tmp_path / "opro" / "trajectory.jsonl").read_text()
    (tmp_path / "opro" / "result.json").unlink()  # as if killed before the search ended
    again, target2, acct2, rec2 = _opro_setup(12, state_dir=tmp_path / "opro")
    again.seed_instruction = seed
    asyncio.run(again.prepare(target2, VALUES))
    assert again.result.to_json() == method.result.to_json()
    assert target2.backend.generate_calls == 0  # every score came back from the trajectory


def test_budget_from_run_counts_calls_and_hits(tmp_path):
    (tmp_path / "accounting.json").write_text(json.dumps({"total": {"calls": 120, "cache_hits": 30}}))
    assert budget_from_run(tmp_path) == 150
    with pytest.raises(DataError):
        budget_from_run(tmp_path / "nope")

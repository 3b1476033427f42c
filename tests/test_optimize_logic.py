"""Logic of the optimizer on the deterministic fake backend: pools, proposal parsing, the leak check,
mode selection, candidate scoring with hand-computed numbers, the budget cap, resume after a kill,
warm starts and the run directory. (The real-model run is in test_optimize_e2e.py.)"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from picaco import objective as obj
from picaco.data.queries import Query
from picaco.errors import BudgetExhausted, ConfigError, DataError
from picaco.judge.base import ValueScore
from picaco.llm.accounting import Accounting, Budget
from picaco.llm.base import Capabilities, CapabilityMissing, GenerateRequest, Message
from picaco.llm.client import LLMClient
from picaco.llm.fake import FakeBackend, default_responder
from picaco.optimize import (
    ListProgress,
    OptimizeParams,
    PRESETS,
    estimate,
    instruction_hash,
    optimize,
    select_mode,
)
from picaco.optimize import proposer
from picaco.optimize.engine import UNFINISHED, fingerprint_params
from picaco.optimize.params import preset
from picaco.optimize.pools import Pools, Scored
from picaco.optimize.rundir import RunDir
from picaco.optimize.scoring import likelihood_score, sampling_score
from picaco.values import Value, ValueSet

# -- fixtures and fakes ----------------------------------------------------------------------------

VALUES = ValueSet(
    name="test-3",
    values=(
        Value(id="care", title="Care", definition="Look after the wellbeing of the people involved."),
        Value(id="honesty", title="Honesty", definition="Say what is true and admit what is unknown."),
        Value(id="caution", title="Caution", definition="Avoid risky advice and mention real dangers.",
              weight=2.0),
    ),
)
QUERIES = [
    Query(id="q1", text="How should I tell my friend I cannot lend her money?"),
    Query(id="q2", text="Is it fine to climb a mountain alone in winter?"),
    Query(id="q3", text="My boss asked me to hide a defect from a client. What now?"),
    Query(id="t1", text="A held-out question.", split="test"),
]
SMALL = OptimizeParams(
    n_queries=3, samples_per_query=2, aligned_pool_size=2, noisy_pool_size=2, bare_samples=3,
    candidates=2, rounds=3, patience=None, max_new_tokens=20, optimizer_max_tokens=60,
    instruction_max_chars=400, minibatch=2, seed=7, grounded=0,
)


class Killed(Exception):
    """Stands for a process kill in the middle of a phase."""


class Tripwire:
    """Counts model calls across all fakes and raises Killed at call number `at` (None = never)."""

    def __init__(self, at: int | None = None, only: str | None = None):
        self.at, self.only = at, only
        self.counts: dict[str, int] = {}

    def tick(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.only is not None and kind != self.only:
            return
        n = self.counts[kind] if self.only else sum(self.counts.values())
        if self.at is not None and n == self.at:
            raise Killed(f"killed at {kind} call {n}")


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


class FakeJudge:
    """A deterministic q_w: a hash of (response, value); every 13th (response, value) is unscored."""

    name = "fake-judge"

    def __init__(self, trip: Tripwire | None = None):
        self.trip = trip or Tripwire()
        self.items = 0
        self.batches = 0

    def identity(self) -> dict:
        return {"kind": "fake-judge", "version": 1}

    async def score(self, value_set, items):
        self.trip.tick("judge")
        self.batches += 1
        self.items += len(items)
        out = []
        for _, response in items:
            scores = {}
            for v in value_set.values:
                h = _h(response, v.id)
                if h % 13 == 0:
                    scores[v.id] = ValueScore.unscored(v.id, "unparsed")
                else:
                    scores[v.id] = ValueScore.from_prob(v.id, 0.1 + 0.8 * (h % 1000) / 1000)
            out.append(scores)
        return out


class FakeRedundancy:
    """log q_phi from word overlap: the share of the response's words that appear in s."""

    def __init__(self):
        self.items = 0

    def identity(self) -> dict:
        return {"kind": "fake-redundancy"}

    async def log_redundancy(self, spec, items):
        self.items += len(items)
        spec_words = set(spec.lower().split())
        out = []
        for _, y in items:
            words = y.lower().split() or [""]
            share = sum(w in spec_words for w in words) / len(words)
            out.append(math.log(0.05 + 0.9 * share))
        return out


_CANDIDATE_TEMPLATES = [
    "You are a careful assistant. Look after people, tell the truth and warn about dangers.",
    "Answer plainly. Care about {a}, stay honest about {b}, and be cautious with risky plans.",
    "Be kind and truthful; when a plan is risky, say so and suggest a safer way about {a}.",
    "Sure! Here is the improved system prompt:\n\n```\nYou help people. Be honest about {a}.\n```",
    "<instruction>Think of the wellbeing of everyone involved, {a} and {b}, and be truthful.</instruction>",
    "Explain the candidate score of each answer.",  # leaks: discarded
]


def optimizer_responder(trip: Tripwire):
    def respond(request: GenerateRequest) -> str:
        trip.tick("optimizer")
        h = _h(json.dumps(request.key_payload(), sort_keys=True))
        words = ["kindness", "safety", "truth", "friends", "money", "winter", "clients"]
        return _CANDIDATE_TEMPLATES[h % len(_CANDIDATE_TEMPLATES)].format(
            a=words[h % 7], b=words[(h // 7) % 7])
    return respond


def target_backend(trip: Tripwire, caps: Capabilities | None = None) -> FakeBackend:
    def respond(request: GenerateRequest) -> str:
        trip.tick("target")
        return default_responder(request)

    def score(messages, response):
        # per-token log-probabilities that depend on (system prompt, word) through a hash, so that
        # different instructions prefer different pool responses and candidates do win rounds
        trip.tick("likelihood")
        system = messages[0].content if messages[0].role == "system" else ""
        return [-1.0 - (_h(system, w) % 100) / 100 for w in response.split()] or [-1.0]

    return FakeBackend("fake-target", responder=respond, scorer=score, capabilities=caps)


class Setup:
    """Everything one optimize() call needs, with fresh fakes and counters."""

    def __init__(self, trip: Tripwire | None = None, caps: Capabilities | None = None,
                 proxy: bool = False):
        self.trip = trip or Tripwire()
        self.accounting = Accounting()
        self.target_backend = target_backend(self.trip, caps)
        self.optimizer_backend = FakeBackend("fake-optimizer", responder=optimizer_responder(self.trip))
        self.target = LLMClient("target", self.target_backend, accounting=self.accounting)
        self.optimizer = LLMClient("optimizer", self.optimizer_backend, accounting=self.accounting)
        self.proxy_backend = target_backend(self.trip) if proxy else None
        self.proxy = (LLMClient("proxy", FakeBackend("fake-proxy", scorer=self.proxy_backend.scorer),
                                accounting=self.accounting) if proxy else None)
        self.judge = FakeJudge(self.trip)
        self.redundancy = FakeRedundancy()
        self.progress = ListProgress()

    def kwargs(self, run_dir: Path, params: OptimizeParams = SMALL, **extra) -> dict:
        return dict(target=self.target, optimizer=self.optimizer, judge=self.judge,
                    redundancy=self.redundancy, value_set=VALUES, queries=QUERIES, params=params,
                    run_dir=run_dir, proxy=self.proxy, progress=self.progress, **extra)

    def run(self, run_dir: Path, params: OptimizeParams = SMALL, **extra):
        return asyncio.run(optimize(**self.kwargs(run_dir, params, **extra)))


def _records(run_dir: Path, name: str) -> list[dict]:
    return RunDir(run_dir).records(name)


def _comparable(result) -> dict:
    d = result.to_json()
    for k in ("calls", "accounting", "run_dir", "notes"):
        d.pop(k)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, the yardstick of the resume tests."""
    run_dir = tmp_path_factory.mktemp("reference")
    s = Setup()
    result = s.run(run_dir)
    return run_dir, result, s


# -- pools ---------------------------------------------------------------------------------------------


def _s(q, text, f, lq=-1.0, rnd=1, sample=0, probs=None):
    return Scored(q, text, f, lq, probs or {"care": 0.5}, rnd, sample, "h")


def test_aligned_pool_keeps_top_m1_across_rounds_and_dedups():
    pools = Pools(["q"], aligned_size=2, noisy_size=1)
    pools.merge_aligned([_s("q", "a", -2.0), _s("q", "b", -1.0), _s("q", "c", None),
                         _s("q", "   ", 5.0)])
    assert [e.text for e in pools["q"].aligned] == ["b", "a"]  # unscored and empty left out
    # round 2: "b " is the same text as "b" (whitespace only): not added twice
    pools.merge_aligned([_s("q", "b ", 3.0, rnd=2), _s("q", "d", -1.5, rnd=2)])
    assert [e.text for e in pools["q"].aligned] == ["b", "d"]
    assert pools["q"].aligned[0].f == -1.0


def test_pool_ties_do_not_depend_on_record_order():
    a = [_s("q", "x", -1.0, sample=1), _s("q", "y", -1.0, sample=0), _s("q", "z", -1.0, sample=2)]
    p1, p2 = Pools(["q"], 2, 0), Pools(["q"], 2, 0)
    p1.merge_aligned(a)
    p2.merge_aligned(reversed(a))
    assert [e.text for e in p1["q"].aligned] == [e.text for e in p2["q"].aligned] == ["y", "x"]


def test_noisy_pool_takes_the_most_parroting_bare_responses():
    pools = Pools(["q"], 2, 2)
    pools.set_noisy([_s("q", "a", None, lq=-2.0, rnd=0), _s("q", "b", None, lq=-0.1, rnd=0),
                     _s("q", "c", None, lq=-0.5, rnd=0, sample=1), _s("q", "b", None, lq=-0.1, rnd=0)])
    assert [e.text for e in pools["q"].noisy] == ["b", "c"]


def test_union_marks_texts_in_both_pools():
    pools = Pools(["q"], 3, 3)
    pools.merge_aligned([_s("q", "a", -1.0), _s("q", "b", -2.0)])
    pools.set_noisy([_s("q", "b", None, lq=-0.1, rnd=0), _s("q", "n", None, lq=-0.2, rnd=0)])
    texts, aligned_f, in_noisy = pools["q"].union()
    assert texts == ["a", "b", "n"]
    assert aligned_f == [-1.0, -2.0, None]
    assert in_noisy == [False, True, True]


def test_value_means_and_best():
    pools = Pools(["q", "r"], 2, 0)
    pools.merge_aligned([_s("q", "a", -1.0, probs={"care": 0.2, "honesty": None}),
                         _s("q", "b", -2.0, probs={"care": 0.4, "honesty": 0.6}),
                         _s("r", "c", -0.5, probs={"care": 0.9, "honesty": 0.8})])
    means = pools.value_means(["care", "honesty", "caution"])
    assert means["care"] == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3
    assert means["honesty"] == pytest.approx(0.7)  # unscored left out: (0.6 + 0.8) / 2
    assert means["caution"] is None
    assert [e.text for e in pools.best(2)] == ["c", "a"]  # best per query, by f


# -- proposal parsing -----------------------------------------------------------------------------------

CLEAN = "Answer with care for everyone involved, be truthful, and point out real dangers."


@pytest.mark.parametrize(
    "raw",
    [
        CLEAN,
        f"<instruction>{CLEAN}</instruction>",
        f"<prompt>\n{CLEAN}\n</prompt>\nI made it shorter.",
        f"```\n{CLEAN}\n```",
        f"```text\n{CLEAN}\n```\n\nExplanation: this version adds caution.",
        f"Sure! Here is the improved system prompt:\n\n{CLEAN}",
        f"Instruction: {CLEAN}",
        f"**New system prompt:** {CLEAN}",
        f"Improved prompt - {CLEAN}",
        f'"{CLEAN}"',
        f"\u201c{CLEAN}\u201d",
        f"<think>the user wants a prompt</think>\n{CLEAN}",
        f"{CLEAN}\n\nThis revised prompt keeps every value visible.",
        f"{CLEAN}\n\nNote: I kept it short.",
        f'"""\n{CLEAN}\n"""',
        f"```\n{CLEAN}",  # fence never closed
    ],
)
def test_parse_candidate_recovers_the_instruction(raw):
    assert proposer.parse_candidate(raw) == CLEAN


@pytest.mark.parametrize(
    "raw,ended",
    [
        (CLEAN, False),
        (f"Sure! Here is the improved system prompt:\n\n{CLEAN}", False),
        (f"```\n{CLEAN}", False),  # fence never closed: the cap may have cut the instruction
        (f'"""\n{CLEAN}', False),
        (f"<instruction>{CLEAN}", False),
        (f"<instruction>{CLEAN}</instruction>", True),
        (f"```text\n{CLEAN}\n```\n\nExplanation: this version adds", True),
        (f'"""\n{CLEAN}\n"""\n\nA strong answer (keep this behaviour):\nQuestion: How do I', True),
        (f"{CLEAN}\n\nThis revised prompt keeps every value visible and", True),
    ],
)
def test_parse_reply_says_whether_the_instruction_ended_before_the_reply(raw, ended):
    assert proposer.parse_reply(raw) == (CLEAN, ended)


def test_a_reply_cut_by_the_cap_after_its_instruction_closed_is_kept():
    """Seen on liberalism-4 (session 20): the 1.5B optimizer closed the instruction's triple quotes,
    went on to copy a strong answer from its prompt, and hit `optimizer_max_tokens`; a third of the
    replies discarded as truncated over the session-19 runs were whole instructions like this."""
    whole = f'"""\n{CLEAN}\n"""\n\nA strong answer (keep this behaviour):\nQuestion: How do I'
    cut = f'"""\n{CLEAN} Also make sure that'
    verdicts = proposer.check_candidates([(whole, "length"), (cut, "length")], current="Be kind.", max_chars=300)
    assert [(v.kept, v.reason) for v in verdicts] == [(True, ""), (False, "truncated")]
    assert verdicts[0].text == CLEAN and "ran on to the length cap" in verdicts[0].note
    # OPRO applies the same rule; a copied "Score:" line also ends its instruction
    from picaco.baselines.opro import check_proposal, read_proposal

    for raw, why in [(whole, ""), (cut, "truncated"), (f"{CLEAN}\nScore: 4.9\n\nPrompt: Be", "")]:
        text, ended = read_proposal(raw)
        assert check_proposal(text, "length", set(), 300, ended=ended) == why
    assert check_proposal(CLEAN, "length", set(), 300) == "truncated"


def test_parse_candidate_keeps_multi_paragraph_instructions():
    text = "You are a kind assistant.\n\nAlways tell the truth, even when it is unwelcome."
    assert proposer.parse_candidate(text) == text
    assert proposer.parse_candidate("") == ""
    assert proposer.parse_candidate("```\n```") == ""


@pytest.mark.parametrize(
    "text,leak",
    [
        ("Rewrite the system prompt so that answers honour values.", "system prompt"),
        ("Care for people. Candidate answers must be honest.", "candidate"),
        ("Maximize your score on every value.", "score"),
        ("Question: how to be honest?\nAnswer: always.", "Question:/Answer:"),
        ("Be like the strong answer above.", "strong/weak answer"),
        ("Care for the values honoured least so far.", "honoured least"),
        ('Be kind """ and honest.', "delimiter"),
    ],
)
def test_leak_check_flags_meta_prompt_text(text, leak):
    found = proposer.find_leak(text)
    assert found is not None and leak in found


def test_leak_check_flags_copied_example_text_and_passes_clean_instructions():
    ex = proposer.Example("How do I save money?",
                          "Start by writing down every expense for one month and then cut the largest")
    copied = "Be honest. Start by writing down every expense for one month and then decide."
    assert proposer.find_leak(copied, [ex]) == "copies an example shown to the optimizer"
    assert proposer.find_leak(CLEAN, [ex]) is None
    assert proposer.find_leak("Give scores? No: give honest, careful answers.") is not None
    assert proposer.find_leak("Keep your answers scored by nobody.") is not None


def test_check_candidates_discards_and_says_why():
    current = "You are a helpful assistant. Be honest."
    proposals = [
        (CLEAN, "stop"),
        (CLEAN + " Also", "length"),  # truncated
        ("   ", "stop"),  # empty
        ("ok", "stop"),  # too short: empty
        ("x" * 50 + " be kind", "stop"),  # fine length-wise but see max_chars below
        ("Be kind. " * 80, "stop"),  # too long
        ("Tell me the candidate you like.", "stop"),  # leak
        ("You are a helpful assistant. Be honest.", "stop"),  # unchanged
        (CLEAN.replace("real dangers", "real danger"), "stop"),  # near-duplicate of the first
    ]
    verdicts = proposer.check_candidates(proposals, current=current, max_chars=300)
    reasons = [v.reason.split(":")[0] for v in verdicts]
    assert reasons == ["", "truncated", "empty", "empty", "", "too_long", "leak", "unchanged",
                       "near_duplicate"]
    assert [v.kept for v in verdicts] == [r == "" for r in reasons]


def test_meta_prompt_lists_weakest_values_first_and_stays_short():
    means = {"care": 0.8, "honesty": 0.3, "caution": None}
    standings = proposer.order_weakest_first(VALUES, means)
    assert [s.id for s in standings] == ["honesty", "care", "caution"]
    msgs = proposer.build_meta_prompt(
        "Be helpful.", standings, [proposer.Example("Q?", "a good answer")],
        [proposer.Example("Q2?", "care honesty caution")], max_chars=700)
    assert msgs[0].role == "system" and msgs[1].role == "user"
    user = msgs[1].content
    assert user.index("Honesty") < user.index("Care") < user.index("Caution")
    assert "Honoured least so far: Honesty, Care." in user
    assert "at most 100 words" in user
    assert len(user.split()) < 250
    # the default seed instruction lists every value by title, without the definitions the Q+IF
    # prompt adds (the default by decision: docs/method.md, "The seed instruction and warm starts"),
    # and passes the leak check
    seed = proposer.default_seed_instruction(VALUES)
    assert "Care, Honesty and Caution" in seed
    assert not any(v.definition in seed for v in VALUES.values)
    assert proposer.find_leak(seed) is None


# -- mode selection -----------------------------------------------------------------------------------


def _client(**caps) -> LLMClient:
    return LLMClient("target", FakeBackend(capabilities=Capabilities(**caps)))


def test_mode_follows_capabilities():
    lik = _client(continuation_logprobs=True)
    black_box = _client(continuation_logprobs=False)
    assert select_mode("auto", lik) == "likelihood"
    assert select_mode("auto", black_box) == "sampling"
    assert select_mode("auto", black_box, proxy=lik) == "proxy"
    assert select_mode("auto", black_box, proxy=_client(continuation_logprobs=False)) == "sampling"
    assert select_mode("sampling", lik) == "sampling"
    assert select_mode("proxy", lik, proxy=lik) == "proxy"
    with pytest.raises(CapabilityMissing, match="log-likelihood of a given response"):
        select_mode("likelihood", black_box)
    with pytest.raises(ConfigError, match="needs a proxy"):
        select_mode("proxy", lik)


# -- candidate scoring by hand -----------------------------------------------------------------------


def test_likelihood_score_by_hand():
    pools = Pools(["q"], 2, 1)
    pools.merge_aligned([_s("q", "good answer", -1.0), _s("q", "meh", -3.0)])
    pools.set_noisy([_s("q", "parrot text here", None, lq=-0.1, rnd=0)])
    # per-token log-probs scripted per (system prompt, response)
    table = {
        ("A", "good answer"): [-1.0, -1.0], ("A", "meh"): [-2.0],
        ("A", "parrot text here"): [-1.0, -1.0, -1.0],
        ("B", "good answer"): [-0.5, -0.5], ("B", "meh"): [-2.0],
        ("B", "parrot text here"): [-3.0, -3.0, -3.0],
    }
    backend = FakeBackend(scorer=lambda msgs, y: table[(msgs[0].content, y)])
    client = LLMClient("target", backend)
    q = [Query(id="q", text="a question")]

    async def go(instr):
        return await likelihood_score(client, instr, q, pools, lam=0.5, temperature=1.0)

    a = asyncio.run(go("A"))
    b = asyncio.run(go("B"))
    # A: l/|y| = (-1, -2, -1); pi = (.422319, .155362, .422319); w = (1, 0); .422319 - .5 * .422319
    assert a.score == pytest.approx(0.2111593991)
    # B: l/|y| = (-.5, -2, -3); pi = (.766157, .170953, .062890); .766157 - .5 * .062890
    assert b.score == pytest.approx(0.7347121999)
    assert a.per_query == {"q": pytest.approx(0.2111593991)}
    assert a.n_responses == 3
    assert backend.likelihood_calls == 2  # one batch per candidate


def test_sampling_score_is_mean_f_without_unscored():
    rs = [_s("q", "a", -1.0), _s("q", "b", -3.0), _s("r", "c", -2.0), _s("r", "d", None)]
    s = sampling_score(rs)
    assert s.score == pytest.approx(-2.0)  # (-1 - 3 - 2) / 3
    assert s.per_query == {"q": pytest.approx(-2.0), "r": pytest.approx(-2.0)}
    assert sampling_score([_s("q", "x", None)]).score == float("-inf")


# -- estimate ------------------------------------------------------------------------------------------


def test_estimate_counts_calls_per_role():
    tiny = PRESETS["tiny"]  # N=2 n=1 M1=2 M2=2 bare=2 C=2 T=2, 2 value-grounded candidates
    est = estimate(tiny, n_queries=2, n_values=3, mode="likelihood", judge_calls_per_response=3)
    roles = est.roles
    # bare 2*2 + rounds 2*(2*1) + report 2*1 = 10
    assert roles["target generate"].calls == 10
    # (C+G+1) * N * (M1+M2) per round = 5*2*4 = 40; two rounds + final (T+1)*N*pool = 3*2*4 = 24
    assert roles["target likelihood"].calls == 104
    assert roles["optimizer"].calls == 4  # grounded candidates cost no optimizer call
    # judged: rounds 2*2 + report 2 = 6 responses, 3 calls each
    assert roles["judge"].calls == 18
    assert est.total_calls == 136
    assert est.first_round_calls == 4 + (2 * (1 + 3) + 2 + 40)
    paper_only = tiny.model_copy(update={"grounded": 0})
    est0 = estimate(paper_only, n_queries=2, n_values=3, mode="likelihood", judge_calls_per_response=3)
    assert est0.roles["target likelihood"].calls == 72  # (C+1)*N*pool = 24 per round, + 24 final
    samp = estimate(tiny, n_queries=2, n_values=3, mode="sampling", judge_calls_per_response=0)
    # bare 4 + rounds 4 + final check 3*2 (the seed, the last instruction and the bare model on
    # fresh seeds) + per round (C+G+1)*min(minibatch, N)*n = 5*2*1 = 10, twice
    assert samp.roles["target generate"].calls == 34
    no_bare = tiny.model_copy(update={"weigh_bare": False})
    assert estimate(no_bare, n_queries=2, n_values=3, mode="sampling",
                    judge_calls_per_response=0).roles["target generate"].calls == 32
    assert "target likelihood" not in samp.roles
    # the cpu preset's final check: 3 arms x 12 kept-aside queries x final_samples = 1
    kept = tiny.model_copy(update={"final_queries": 12, "final_samples": 1, "samples_per_query": 2})
    assert estimate(kept, n_queries=2, n_values=3, mode="sampling",
                    judge_calls_per_response=0).roles["target generate"].calls == (
        2 * 2 + 2 * 2 * 2 + 3 * 12 * 1 + 2 * 5 * 2 * 2)
    assert "pre-flight estimate" in est.describe()
    # a deployment frame (template, prior turns) costs its tokens on every target request only
    framed = estimate(tiny, n_queries=2, n_values=3, mode="likelihood", judge_calls_per_response=3,
                      frame_tokens=350)
    for role in ("target generate", "target likelihood"):
        assert framed.roles[role].calls == roles[role].calls
        assert framed.roles[role].tokens == roles[role].tokens + 350 * roles[role].calls
    assert framed.roles["judge"] == roles["judge"] and framed.roles["optimizer"] == roles["optimizer"]


# -- run directory ---------------------------------------------------------------------------------------


def test_rundir_ignores_and_cuts_a_partial_last_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.open({"fingerprint": {"a": 1}})
    rd.append("events.jsonl", {"n": 1})
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"n": 2, "trunc')
    assert rd.records("events.jsonl") == [{"n": 1}]
    rd.close()
    rd2 = RunDir(tmp_path)
    assert rd2.open({"fingerprint": {"a": 1}}) is True
    rd2.append("events.jsonl", {"n": 3})
    assert rd2.records("events.jsonl") == [{"n": 1}, {"n": 3}]
    rd2.close()


def test_rundir_refuses_another_configuration_a_second_process_and_damage(tmp_path):
    rd = RunDir(tmp_path)
    rd.open({"fingerprint": {"params": {"rounds": 3}, "seed": "x"}})
    with pytest.raises(ConfigError, match="in use"):
        RunDir(tmp_path).open({"fingerprint": {"params": {"rounds": 3}, "seed": "x"}})
    rd.close()
    with pytest.raises(ConfigError, match=r"params\.rounds: 3 -> 4"):
        RunDir(tmp_path).open({"fingerprint": {"params": {"rounds": 4}, "seed": "x"}})
    (tmp_path / "rounds.jsonl").write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(DataError, match="rounds.jsonl:2"):
        RunDir(tmp_path).records("rounds.jsonl")


# -- the engine on fakes ---------------------------------------------------------------------------------


def test_full_run_writes_the_run_directory(reference):
    run_dir, result, s = reference
    for name in ("config.json", "events.jsonl", "responses.jsonl", "candidates.jsonl",
                 "rounds.jsonl", "accounting.json", "instruction.txt", "provenance.json",
                 "result.json", "pools/round-00.json", "pools/round-03.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "instruction.txt").read_text().strip() == result.instruction
    assert result.mode == "likelihood" and result.stop_reason == "rounds"
    assert result.rounds_completed == 3 and len(result.history) == 3
    assert any(r["changed"] for r in result.history)  # candidates won rounds
    # the returned instruction never loses to the seed on fresh samples (same queries and seeds);
    # when the pooled objective's pick does, the seed comes back and the run says why
    assert result.tc_final >= result.tc_seed
    if result.instruction == result.seed_instruction:
        assert result.selected_round == 0
        assert any("below the seed on fresh samples" in n for n in result.notes)
    else:
        assert result.tc_final > result.tc_seed or result.tc_final == result.tc_seed
    # the test-split query is not used
    config = json.loads((run_dir / "config.json").read_text())
    assert config["query_ids"] == ["q1", "q2", "q3"]
    responses = _records(run_dir, "responses.jsonl")
    assert {r["query_id"] for r in responses} == {"q1", "q2", "q3"}
    bare = [r for r in responses if r["phase"] == "bare"]
    assert len(bare) == 3 * 3 and all(r["f"] is None and r["scores"] == {} for r in bare)
    enhanced = [r for r in responses if r["phase"] == "enhance"]
    assert len(enhanced) == 3 * 3 * 2
    assert all(set(r["scores"]) == {"care", "honesty", "caution"} for r in enhanced)
    # the fake judge leaves some values unscored: recorded, and f still defined (imputed)
    assert any(r["unscored"] for r in enhanced)
    assert all(r["f"] is not None for r in enhanced if len(r["unscored"]) < 3)
    # every proposal has a verdict; discarded ones say why
    cands = _records(run_dir, "candidates.jsonl")
    verdicts = [c for c in cands if c["kind"] == "verdict"]
    assert len(verdicts) == 3 * 2
    assert all(v["kept"] == (v["reason"] == "") for v in verdicts)
    # in every round the chosen instruction has the highest score among those scored
    scores = [c for c in cands if c["kind"] == "score"]
    for rnd in _records(run_dir, "rounds.jsonl"):
        mine = [c for c in scores if c["pools_version"] == rnd["round"]]
        assert rnd["objective"] == max(c["score"] for c in mine)
        assert rnd["objective"] >= rnd["objective_previous"]
    # never worse than the seed on the final pools, both recorded
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert result.objective_final >= result.objective_seed
    assert prov["objective"] == {"seed": result.objective_seed, "final": result.objective_final}
    assert prov["value_set"]["fingerprint"] == VALUES.fingerprint()
    assert prov["roles"]["target"]["model"] == "fake-target"
    assert prov["roles"]["judge"]["identity"] == {"kind": "fake-judge", "version": 1}
    assert set(prov["scores"]["seed"]) == set(prov["scores"]["final"]) == {"care", "honesty",
                                                                          "caution"}
    assert prov["mode"] == "likelihood" and prov["config_hash"] == config["config_hash"]
    acc = json.loads((run_dir / "accounting.json").read_text())
    assert acc["total"]["calls"] == result.calls == s.accounting.total().calls
    # progress: estimate first, then phases and rounds, then the end
    kinds = s.progress.kinds()
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("round_end") == 3
    assert s.progress.events[0].data["estimate"]["total_calls"] > 0


def test_rerunning_a_finished_run_makes_no_calls(reference, tmp_path):
    run_dir, result, _ = reference
    s = Setup()
    again = s.run(run_dir)
    assert _comparable(again) == _comparable(result)
    assert s.target_backend.generate_calls == 0 and s.target_backend.likelihood_calls == 0
    assert s.optimizer_backend.generate_calls == 0 and s.judge.items == 0


def test_refinish_keeps_the_rounds_redoes_the_end_and_keeps_the_old_outputs(reference, tmp_path):
    # a run finished by an older picaco whose end chose differently (here: it returned the seed)
    ref_dir, result, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    old = json.loads((run_dir / "result.json").read_text())
    old.update(instruction=old["seed_instruction"], selected_round=0)
    (run_dir / "result.json").write_text(json.dumps(old))
    (run_dir / "instruction.txt").write_text(old["seed_instruction"] + "\n")
    rounds_before = (run_dir / "rounds.jsonl").read_text()

    s = Setup()
    assert s.run(run_dir).instruction == old["seed_instruction"]  # without the flag: the stored result
    again = s.run(run_dir, refinish=True)
    assert _comparable(again) == _comparable(result)  # this code's end, on the recorded rounds
    assert s.optimizer_backend.generate_calls == 0  # no round was redone
    assert (run_dir / "rounds.jsonl").read_text() == rounds_before
    assert json.loads((run_dir / "previous" / "1" / "result.json").read_text()) == old
    assert (run_dir / "previous" / "1" / "instruction.txt").read_text() == old["seed_instruction"] + "\n"
    assert (run_dir / "instruction.txt").read_text().strip() == result.instruction
    assert [e for e in _records(run_dir, "events.jsonl") if e["event"] == "refinish"][-1]["archived"] == (
        "previous/1")
    Setup().run(run_dir, refinish=True)
    assert (run_dir / "previous" / "2" / "result.json").exists()  # each refinish keeps what it replaced

    with pytest.raises(ConfigError, match="refinish: .* holds no finished run"):
        Setup().run(tmp_path / "never-ran", refinish=True)
    assert not (tmp_path / "never-ran").exists()


def test_same_seed_same_result_in_a_new_directory(reference, tmp_path):
    _, result, _ = reference
    assert _comparable(Setup().run(tmp_path)) | {"run_dir": None} == _comparable(result) | {
        "run_dir": None}


def _count_records(run_dir: Path) -> dict:
    responses = _records(run_dir, "responses.jsonl")
    cands = _records(run_dir, "candidates.jsonl")
    return {
        "responses": len(responses),
        "judged": sum(1 for r in responses if r["scores"] and r["text"].strip()),
        "proposals": sum(1 for c in cands if c["kind"] == "proposal"),
        "scores": sum(1 for c in cands if c["kind"] == "score"),
        "keys": {r["key"] for r in responses},
    }


@pytest.mark.parametrize(
    "where,only",
    # where: the share of the uninterrupted run's calls of that kind after which the kill comes
    [(0.0, "target"), (0.15, "target"), (0.4, "target"), (0.75, "target"), (0.99, "target"),
     (0.1, "judge"), (0.6, "judge"), (0.0, "optimizer"), (0.7, "optimizer"),
     (0.05, "likelihood"), (0.5, "likelihood"), (0.97, "likelihood")],
)
def test_resume_after_a_kill_ends_like_an_uninterrupted_run(reference, tmp_path, where, only):
    ref_dir, ref_result, ref_setup = reference
    at = 1 + int(where * (ref_setup.trip.counts[only] - 1))
    killed = Setup(Tripwire(at, only))
    with pytest.raises(Killed):
        killed.run(tmp_path)
    before = _count_records(tmp_path)
    # a kill can also tear the record being written: a partial last line
    with open(tmp_path / "responses.jsonl", "a") as f:
        f.write('{"key": "torn", "text": "half a rec')

    resumed = Setup()
    result = resumed.run(tmp_path)
    assert _comparable(result) == _comparable(ref_result)
    assert (tmp_path / "instruction.txt").read_text() == (ref_dir / "instruction.txt").read_text()
    after = _count_records(tmp_path)
    ref = _count_records(ref_dir)
    assert after["keys"] == ref["keys"]
    # no model call for finished work: the resumed run made exactly the calls for the new records
    assert resumed.target_backend.generate_calls == after["responses"] - before["responses"]
    assert resumed.judge.items == after["judged"] - before["judged"]
    assert resumed.optimizer_backend.generate_calls == after["proposals"] - before["proposals"]
    assert resumed.target_backend.likelihood_calls == after["scores"] - before["scores"]
    assert resumed.target_backend.generate_calls < ref_setup.target_backend.generate_calls or (
        before["responses"] == 0)
    events = [e["event"] for e in _records(tmp_path, "events.jsonl")]
    assert events[0] == "start" and "resume" in events


def test_a_failing_endpoint_leaves_its_paid_calls_and_faults_in_accounting_json(reference, tmp_path):
    """Exit 3 (a BackendError) mid-run: accounting.json shows the calls paid for by the units that
    failed and the faults that stopped the run, in its "unfinished units" row, apart from the totals
    (which stay those of the finished work, as after a kill); the row survives the resume."""
    from picaco.errors import BackendError
    from picaco.llm.accounting import report_fault

    _, ref_result, ref_setup = reference
    fail_from = ref_setup.trip.counts["target"] // 4  # in round 1, where each unit samples anew
    seen = {"calls": 0, "failures": 0}
    asked: dict[str, int] = {}

    def flaky(request):
        # from then on, a query's second sample under an instruction fails: its
        # unit has paid for the first one when it fails
        seen["calls"] += 1
        prompt = json.dumps([[m.role, m.content] for m in request.messages])
        asked[prompt] = asked.get(prompt, 0) + 1
        if seen["calls"] >= fail_from and asked[prompt] >= 2:
            seen["failures"] += 1
            report_fault("server_error", 3)
            report_fault("retries", 2)
            raise BackendError("HTTP 503 after 3 attempts")
        return default_responder(request)

    broken = Setup()
    broken.target_backend.responder = flaky
    broken.target_backend.reports_call_faults = True  # faults reported per call, as the openai backend does
    with pytest.raises(BackendError):
        broken.run(tmp_path)
    acc = json.loads((tmp_path / "accounting.json").read_text())
    paid = broken.accounting.total().calls
    unfinished = acc[UNFINISHED]
    assert seen["failures"] >= 1 and 0 < acc["total"]["calls"] < paid
    # every call paid for is in a finished unit's record or in the failed units' row
    assert acc["total"]["calls"] + unfinished["calls"] == paid
    assert unfinished["faults"] == {"server_error": 3 * seen["failures"]}
    assert unfinished["retries"] == 2 * seen["failures"]
    assert acc["total"]["faults"] == {}  # the faults are not in the finished work's total
    failed = [e for e in _records(tmp_path, "events.jsonl") if e["event"] == "unit_failed"]
    assert failed and {e["error"] for e in failed} <= {"BackendError", "CancelledError"}

    healed = Setup()
    result = healed.run(tmp_path)
    assert _comparable(result) == _comparable(ref_result)
    after = json.loads((tmp_path / "accounting.json").read_text())
    assert after[UNFINISHED] == unfinished
    # the totals are those of the uninterrupted run: what OPRO's budget is read from
    assert after["total"]["calls"] == ref_result.accounting["total"]["calls"]


def test_budget_cap_is_never_exceeded_and_the_run_stops_cleanly(reference, tmp_path):
    _, ref_result, ref_setup = reference
    total = ref_setup.accounting.total().calls
    for cap in (5, 20, total // 2, total - 1):
        s = Setup()
        run_dir = tmp_path / f"cap{cap}"
        result = s.run(run_dir, budget=Budget(max_calls=cap))
        used = s.accounting.total().calls
        assert used <= cap, (cap, used)
        assert result.stop_reason == "budget" and "budget" in result.stop_detail
        assert (run_dir / "instruction.txt").read_text().strip() == result.instruction
        assert json.loads((run_dir / "result.json").read_text())["stop_reason"] == "budget"
        events = [e["event"] for e in _records(run_dir, "events.jsonl")]
        assert "stop" in events and events[-1] == "end"
        # the instruction returned is the seed or one chosen by a finished round
        chosen = [ref_result.seed_instruction] + [r["instruction"] for r in result.history]
        assert result.instruction in chosen
    # a warning when the budget cannot finish one round
    assert any("cannot finish one round" in e.data.get("message", "")
               for e in s.progress.events if e.kind == "warning") is False
    small = Setup()
    small.run(tmp_path / "tiny-budget", budget=Budget(max_calls=3))
    assert any("cannot finish one round" in e.data.get("message", "")
               for e in small.progress.events if e.kind == "warning")


def test_token_budget_is_never_exceeded(tmp_path):
    s = Setup()
    budget = Budget(max_tokens=3000)
    result = s.run(tmp_path, budget=budget)
    assert result.stop_reason == "budget"
    t = s.accounting.total()
    assert t.prompt_tokens + t.completion_tokens <= 3000
    assert budget.tokens <= 3000


def test_budget_stopped_run_continues_with_a_larger_budget(reference, tmp_path):
    _, ref_result, ref_setup = reference
    total = ref_setup.accounting.total().calls
    first = Setup()
    assert first.run(tmp_path, budget=Budget(max_calls=total // 2)).stop_reason == "budget"
    second = Setup()
    result = second.run(tmp_path, budget=Budget(max_calls=total))
    assert _comparable(result) == _comparable(ref_result)
    # calls of the first process count against the run's budget: together no more than `total`
    assert first.accounting.total().calls + second.accounting.total().calls <= total
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["total"]["calls"] == first.accounting.total().calls + second.accounting.total().calls


def test_config_mismatch_on_resume_is_a_clear_error(reference):
    run_dir, _, _ = reference
    with pytest.raises(ConfigError, match="different configuration.*params.rounds: 3 -> 4"):
        Setup().run(run_dir, SMALL.model_copy(update={"rounds": 4}))
    with pytest.raises(ConfigError, match="seed_instruction"):
        Setup().run(run_dir, seed_instruction="Be nice.")


def test_warm_start_from_a_run_directory_and_from_a_text_file(reference, tmp_path):
    run_dir, result, _ = reference
    s = Setup()
    warm = s.run(tmp_path / "warm", SMALL.model_copy(update={"rounds": 1}), init_from=run_dir)
    assert warm.seed_instruction == result.instruction
    prov = json.loads((tmp_path / "warm" / "provenance.json").read_text())
    assert prov["init_from"] == str(run_dir) and prov["seed_instruction"] == result.instruction
    text = tmp_path / "seed.txt"
    text.write_text("  Be kind and careful.\n")
    warm2 = Setup().run(tmp_path / "warm2", SMALL.model_copy(update={"rounds": 1}), init_from=text)
    assert warm2.seed_instruction == "Be kind and careful."
    with pytest.raises(ConfigError, match="either seed_instruction or init_from"):
        Setup().run(tmp_path / "x", init_from=text, seed_instruction="Hi there, be nice.")
    with pytest.raises(ConfigError, match="neither a run directory nor a text file"):
        Setup().run(tmp_path / "y", init_from=tmp_path / "missing")


def test_a_copied_meta_prompt_sentence_is_cut_and_the_rest_kept():
    raw = ("You are a helpful assistant. Answer directly and usefully. Honoured least so far: Clarity. "
           "Use simple language and explain your reasons.")
    (v,) = proposer.check_candidates([(raw, "stop")], current="Be good.", max_chars=500)
    assert v.kept and v.text == ("You are a helpful assistant. Answer directly and usefully. "
                                 "Use simple language and explain your reasons.")
    assert v.note == "cut 1 sentence(s) with meta-prompt phrase 'honoured least'"
    # nothing usable left, or a leak that is not a copied phrase: discarded as before
    only = proposer.check_candidates([("Honoured least so far: Depth.", "stop")], current="Be good.",
                                     max_chars=500)
    assert not only[0].kept and only[0].reason.startswith("leak")
    # a bulleted instruction keeps its lines
    bullets = "Answer well:\n- Be accurate. Honoured least so far: Depth.\n- Be clear and brief."
    (b,) = proposer.check_candidates([(bullets, "stop")], current="Be good.", max_chars=500)
    assert b.kept and b.text == "Answer well:\n- Be accurate.\n- Be clear and brief."
    marker = "Be clear and kind to everyone.\nQuestion: what now?"
    (m,) = proposer.check_candidates([(marker, "stop")], current="Be good.", max_chars=500)
    assert not m.kept and m.reason == "leak: example marker 'Question:/Answer:'"


def test_grounded_candidates_are_written_from_the_value_spec():
    vs = VALUES
    standings = proposer.order_weakest_first(vs, {vs.values[-1].id: 0.1, vs.values[0].id: 0.9})
    weakest = vs.values[-1]
    standards, focus = proposer.grounded_candidates(vs, standings, "Be good.", max_chars=2000, n=2)
    lines = standards.splitlines()
    # every value's behaviour, weakest first
    assert lines[1].startswith(f"- {weakest.title}: ")
    assert all(any(line.startswith(f"- {v.title}: ") for line in lines) for v in vs.values)
    assert focus == f"Be good.\nAbove all, {weakest.title}: {proposer._behaviour(weakest)}"
    # too long for max_chars, and no description can be cut by a clause: the strongest values keep
    # only their titles, and it still fits
    short = proposer.grounded_candidates(vs, standings, "Be good.", max_chars=len(standards) - 1, n=1)
    assert len(short) == 1 and len(short[0]) < len(standards) and "Also honour" in short[0]
    assert short[0].splitlines()[1].startswith(f"- {weakest.title}: ")
    assert proposer.grounded_candidates(vs, standings, "Be good.", max_chars=2000, n=0) == []
    # they pass the same checks as the optimizer's proposals
    verdicts = proposer.check_candidates([(standards, "stop"), (focus, "stop")], current="Be good.",
                                         max_chars=2000)
    assert all(v.kept for v in verdicts), verdicts


def test_a_focus_candidate_replaces_the_focus_line_of_an_earlier_round():
    vs = VALUES
    care, honesty = vs.values[0], vs.values[1]
    earlier = f"Be good.\nAbove all, {care.title}: {proposer._behaviour(care)}"
    weakest_honesty = proposer.order_weakest_first(vs, {honesty.id: 0.1, care.id: 0.5})
    (_, focus) = proposer.grounded_candidates(vs, weakest_honesty, earlier, max_chars=2000, n=2)
    assert focus == f"Be good.\nAbove all, {honesty.title}: {proposer._behaviour(honesty)}"
    # the same value weakest again: the focus candidate is the current instruction, not a second line
    weakest_care = proposer.order_weakest_first(vs, {care.id: 0.1, honesty.id: 0.5})
    (_, same) = proposer.grounded_candidates(vs, weakest_care, earlier, max_chars=2000, n=2)
    assert same == earlier
    (v,) = proposer.check_candidates([(same, "stop")], current=earlier, max_chars=2000)
    assert v.reason == "unchanged"
    # a sentence in the middle of a line that starts differently is not a focus line
    inline = "Be good. Above all, Care: look after people."
    (_, kept_inline) = proposer.grounded_candidates(vs, weakest_care, inline, max_chars=2000, n=2)
    assert kept_inline.startswith(inline + "\nAbove all, Care: ")


def test_clause_prefixes_cut_only_before_a_new_verb_clause():
    text = ("Gives correct facts, flags estimates plainly, and points the user to a check "
            "where the stakes are high.")
    assert proposer.clause_prefixes(text) == [
        "Gives correct facts.", "Gives correct facts, flags estimates plainly.", text]
    # lists of nouns are not clauses: no cut inside them
    nouns = "Offers concrete steps, numbers, examples, or trade-offs, explains why they matter."
    assert proposer.clause_prefixes(nouns) == [
        "Offers concrete steps, numbers, examples, or trade-offs.", nouns]
    customs = "Suggests honouring the customs, rituals and elders, and looks for ways to adapt them."
    assert proposer.clause_prefixes(customs) == ["Suggests honouring the customs, rituals and elders.", customs]
    assert proposer.clause_prefixes("Advises the user how to take charge, build influence.") == [
        "Advises the user how to take charge, build influence."]


def test_standards_cut_the_longest_description_before_any_value_loses_it():
    long_ = ("Turns down the harmful part without lecturing, points to a safe way to meet the goal, "
             "and adds a source of help where someone may be at risk.")
    vs = ValueSet(name="cut-3", values=(
        Value(id="a", title="Alpha", definition="Alpha is valued here.", conforming="Answers the question."),
        Value(id="b", title="Beta", definition="Beta is valued here.", conforming=long_),
        Value(id="c", title="Gamma", definition="Gamma is valued here.",
              conforming="Uses a courteous tone, describes people fairly."),
    ))
    standings = proposer.order_weakest_first(vs, {"a": 0.1, "b": 0.5, "c": 0.9})
    (full,) = proposer.grounded_candidates(vs, standings, "x", max_chars=2000, n=1)
    assert full.splitlines()[2] == f"- Beta: {long_}"
    # one character short: the longest description loses its last clause; every value keeps one
    (cut,) = proposer.grounded_candidates(vs, standings, "x", max_chars=len(full) - 1, n=1)
    assert cut.splitlines()[1:] == [
        "- Alpha: Answers the question.",
        "- Beta: Turns down the harmful part without lecturing, points to a safe way to meet the goal.",
        "- Gamma: Uses a courteous tone, describes people fairly.",
    ]
    # tighter: of two equally long descriptions the stronger value's is cut first
    lines = [line for line in full.splitlines()]
    head = lines[0]
    both = "\n".join([head, "- Alpha: Answers the question.", "- Beta: Turns down the harmful part without lecturing.",
                      "- Gamma: Uses a courteous tone, describes people fairly."])
    (tight,) = proposer.grounded_candidates(vs, standings, "x", max_chars=len(both), n=1)
    assert tight == both
    (tighter,) = proposer.grounded_candidates(vs, standings, "x", max_chars=len(both) - 1, n=1)
    assert tighter.splitlines()[3] == "- Gamma: Uses a courteous tone."
    # every description at its first clause and still too long: the strongest keeps only its title
    floor = "\n".join([head, "- Alpha: Answers the question.", "- Beta: Turns down the harmful part without lecturing.",
                       "- Gamma: Uses a courteous tone."])
    (titles,) = proposer.grounded_candidates(vs, standings, "x", max_chars=len(floor) - 1, n=1)
    assert titles.splitlines()[-1] == "- Also honour Gamma." and len(titles) < len(floor)
    assert proposer.grounded_candidates(vs, standings, "x", max_chars=20, n=1) == []
    # focus: the weakest value's description, cut by clauses to fit after the current text; left
    # out when not even its first clause fits
    weak = ValueSet(name="cut-2", values=(vs.values[1], vs.values[0]))
    order = proposer.order_weakest_first(weak, {"b": 0.1, "a": 0.9})
    current = "Be good. " * 10
    whole = f"{current.strip()}\nAbove all, Beta: {long_}"
    _, focus = proposer.grounded_candidates(weak, order, current, max_chars=len(whole), n=2)
    assert focus == whole
    (cut_focus,) = proposer.grounded_candidates(weak, order, current, max_chars=len(whole) - 1, n=2)[1:]
    assert cut_focus == (f"{current.strip()}\nAbove all, Beta: Turns down the harmful part without "
                         "lecturing, points to a safe way to meet the goal.")
    first = f"{current.strip()}\nAbove all, Beta: Turns down the harmful part without lecturing."
    assert proposer.grounded_candidates(weak, order, current, max_chars=len(first), n=2)[1] == first
    assert len(proposer.grounded_candidates(weak, order, current, max_chars=len(first) - 1, n=2)) == 1


def test_a_resumed_round_keeps_its_recorded_grounded_candidates(tmp_path, monkeypatch):
    """A run started before a change to how grounded candidates are written resumes to the result it
    would have had: the texts come from the recorded verdicts, not from the changed code."""
    params = SMALL.model_copy(update={"grounded": 2})
    ref = Setup()
    ref_result = ref.run(tmp_path / "ref", params)
    kill_at = ref.trip.counts["likelihood"] - 2  # in the final check: every round has proposed
    killed = Setup(Tripwire(kill_at, "likelihood"))
    with pytest.raises(Killed):
        killed.run(tmp_path / "run", params)
    before = [c for c in _records(tmp_path / "run", "candidates.jsonl") if c["kind"] == "verdict"]
    assert {v["source"] for v in before} == {"optimizer", "grounded"}

    calls = []

    def changed(*args, **kwargs):
        calls.append(1)
        return ["You are a different checklist now."]  # and no focus candidate at all

    monkeypatch.setattr(proposer, "grounded_candidates", changed)
    result = Setup().run(tmp_path / "run", params)
    assert calls  # the changed code ran and was overruled by the records
    assert _comparable(result) == _comparable(ref_result)
    after = [c for c in _records(tmp_path / "run", "candidates.jsonl") if c["kind"] == "verdict"]
    assert after == before


def test_a_resumed_round_keeps_its_recorded_verdicts(tmp_path, monkeypatch):
    """A change to the candidate checks does not change which candidates a round that was started
    before it competes with: the recorded keep-or-discard verdicts stand."""
    params = SMALL.model_copy(update={"grounded": 2})
    ref = Setup()
    ref_result = ref.run(tmp_path / "ref", params)
    kill_at = ref.trip.counts["likelihood"] - 2
    killed = Setup(Tripwire(kill_at, "likelihood"))
    with pytest.raises(Killed):
        killed.run(tmp_path / "run", params)
    before = [c for c in _records(tmp_path / "run", "candidates.jsonl") if c["kind"] == "verdict"]
    assert any(v["kept"] for v in before)
    real = proposer.check_candidates
    calls = []

    def stricter(*args, **kwargs):  # a check that would now discard every candidate
        calls.append(1)
        return [dataclasses.replace(v, kept=False, reason="empty") for v in real(*args, **kwargs)]

    monkeypatch.setattr(proposer, "check_candidates", stricter)
    result = Setup().run(tmp_path / "run", params)
    assert calls
    assert _comparable(result) == _comparable(ref_result)
    after = [c for c in _records(tmp_path / "run", "candidates.jsonl") if c["kind"] == "verdict"]
    assert after == before


def test_grounded_candidates_are_not_checked_for_copying_an_example():
    """The target may repeat the value text it was given; a grounded candidate written from that text
    shares its words but copied nothing, while an optimizer proposal with the same words did."""
    vs = VALUES
    standings = proposer.order_weakest_first(vs, {v.id: 0.5 for v in vs.values})
    (standards,) = proposer.grounded_candidates(vs, standings, "Be good.", max_chars=2000, n=1)
    parroting = proposer.Example("How do I save money?", "Sure. " + standards.splitlines()[1])
    proposals = [(standards, "stop"), (standards.replace("You are", "You're"), "stop")]
    optimizer_copy, grounded = proposer.check_candidates(
        proposals, current="Be good.", max_chars=2000, examples=[parroting], grounded_from=1)
    assert optimizer_copy.reason == "leak: copies an example shown to the optimizer"
    assert grounded.kept, grounded
    # without the marker both are checked as proposals
    both = proposer.check_candidates(proposals, current="Be good.", max_chars=2000, examples=[parroting])
    assert [v.kept for v in both] == [False, False]


TAILORED = ("Be kind, truthful and careful in every answer. "
            "If you plan to climb a mountain in winter, check the weather first.")


def test_a_sentence_written_for_one_training_query_is_cut():
    """With a handful of training queries, a sentence that answers one of them wins that query's
    samples and nothing held out (harmlessness-4: "... obtaining medical records ..." won round 3)."""
    (v,) = proposer.check_candidates([(TAILORED, "stop")], current="Be good.", max_chars=500,
                                     queries=QUERIES)
    assert v.kept
    assert v.text == "Be kind, truthful and careful in every answer."
    assert v.note == "cut 1 sentence(s) tailored to training query q2 (climb mountain winter)"
    # one entry per query, however many of its sentences were cut
    two = TAILORED + " Climb a mountain in winter with a friend. Lend money to a friend if you can."
    (v2,) = proposer.check_candidates([(two, "stop")], current="Be good.", max_chars=500, queries=QUERIES)
    assert v2.text == "Be kind, truthful and careful in every answer."
    assert v2.note == ("cut 3 sentence(s) tailored to training queries q2 (climb mountain winter), "
                       "q1 (friend lend money)")
    # without the training queries nothing marks the sentence
    (plain,) = proposer.check_candidates([(TAILORED, "stop")], current="Be good.", max_chars=500)
    assert plain.text == TAILORED and plain.note == ""


def test_query_words_the_value_set_or_the_instruction_already_use_are_not_tailoring():
    known = "Caution: avoid risky advice; mention dangers of a winter mountain trip."
    (by_known,) = proposer.check_candidates([(TAILORED, "stop")], current="Be good.", max_chars=500,
                                            queries=QUERIES, known=known)
    assert by_known.text == TAILORED  # only "climb" is new: one word is not a topic
    (by_current,) = proposer.check_candidates([(TAILORED, "stop")], max_chars=500, queries=QUERIES,
                                              current="Be good, even on a mountain in winter.")
    assert by_current.text == TAILORED
    # generic words ("someone", "money" is not generic) and short ones do not count
    assert proposer.tailored_to("Tell someone how you feel.", QUERIES, set()) is None
    assert proposer.tailored_to("Lend money to a friend only if you can.", QUERIES, set()) == (
        "q1", ["friend", "lend", "money"])
    assert proposer.content_words("Records for the boss, and a bus") == {"record", "boss"}


def test_a_proposal_that_only_answers_a_training_query_is_discarded():
    only = "If you plan to climb a mountain in winter, check the weather first."
    (v,) = proposer.check_candidates([(only, "stop")], current="Be good.", max_chars=500, queries=QUERIES)
    assert not v.kept
    assert v.reason == "tailored: nothing left without the sentences for q2 (climb mountain winter)"


def test_the_optimizer_checks_proposals_against_its_training_queries(tmp_path):
    s = Setup()
    s.optimizer_backend.responder = lambda req: TAILORED
    s.run(tmp_path, SMALL.model_copy(update={"rounds": 1}))
    (first, *_) = [c for c in _records(tmp_path, "candidates.jsonl") if c["kind"] == "verdict"]
    assert first["kept"] and first["text"] == "Be kind, truthful and careful in every answer."
    assert "tailored to training query q2" in first["note"]
    (round1,) = _records(tmp_path, "rounds.jsonl")
    assert round1["discarded"] == {"near_duplicate": 1}  # the second proposal is the same text


def test_grounded_candidates_compete_when_the_optimizer_offers_nothing(tmp_path):
    s = Setup()
    # an optimizer that only repeats the current instruction: only grounded candidates are left
    s.optimizer_backend.responder = lambda req: req.messages[1].content.split('"""')[1].strip()
    params = SMALL.model_copy(update={"rounds": 1, "grounded": 2})
    s.run(tmp_path, params)
    cands = _records(tmp_path, "candidates.jsonl")
    verdicts = [c for c in cands if c["kind"] == "verdict"]
    assert [v["source"] for v in verdicts] == ["optimizer", "optimizer", "grounded", "grounded"]
    assert [v["kept"] for v in verdicts] == [False, False, True, True]
    assert sum(c["kind"] == "proposal" for c in cands) == 2  # no optimizer call for grounded ones
    scored = {c["instruction"] for c in cands if c["kind"] == "score" and c["tag"] == "round1"}
    assert {v["text"] for v in verdicts if v["kept"]} <= scored
    (round1,) = _records(tmp_path, "rounds.jsonl")
    best = max(c["score"] for c in cands if c["kind"] == "score" and c["tag"] == "round1")
    assert round1["objective"] == pytest.approx(best)


def test_prompt_examples_resolve_render_and_split_exactly():
    from picaco.baselines.urial import URIAL_EXAMPLES
    from picaco.examples import EXAMPLES_HEADER, split_examples, with_examples

    params = SMALL.model_copy(update={"prompt_examples": None})
    assert params.examples_block is None and "prompt_examples" not in fingerprint_params(params)
    urial = OptimizeParams.model_validate({**SMALL.model_dump(), "prompt_examples": "URIAL"})
    assert [(t.user, t.assistant) for t in urial.prompt_examples] == list(URIAL_EXAMPLES)
    block = urial.examples_block
    q, a = URIAL_EXAMPLES[2]
    assert block.startswith(EXAMPLES_HEADER + "\n\nUser: " + URIAL_EXAMPLES[0][0] + "\nAssistant: ")
    assert block.endswith(f"\n\nUser: {q}\nAssistant: {a}")
    assert fingerprint_params(urial)["prompt_examples"][0]["user"] == URIAL_EXAMPLES[0][0]
    text = with_examples("Be kind.", block)
    assert split_examples(text, block) == ("Be kind.", True)
    # only the exact block counts: one changed character leaves it instruction text
    assert split_examples(text[:-1], block) == (text[:-1], False)
    assert split_examples(text, None) == (text, False)
    pairs = OptimizeParams.model_validate({**SMALL.model_dump(),
                                           "prompt_examples": [{"user": "Hi", "assistant": "Hello."}]})
    assert pairs.examples_block == f"{EXAMPLES_HEADER}\n\nUser: Hi\nAssistant: Hello."
    # one more candidate a round, and the block's tokens on every target request
    plain = estimate(SMALL, n_queries=3, n_values=3, mode="sampling", judge_calls_per_response=0)
    more = estimate(urial, n_queries=3, n_values=3, mode="sampling", judge_calls_per_response=0)
    assert (more.roles["target generate"].calls - plain.roles["target generate"].calls
            == SMALL.rounds * min(SMALL.minibatch, 3) * SMALL.samples_per_query)
    per_call = len(block) // 4
    assert more.roles["target generate"].tokens == (
        plain.roles["target generate"].tokens
        + more.roles["target generate"].calls * per_call
        + (more.roles["target generate"].calls - plain.roles["target generate"].calls)
        * (plain.roles["target generate"].tokens // plain.roles["target generate"].calls))


def test_bad_prompt_examples_are_one_line_config_errors(tmp_path):
    from picaco.config import load_config

    for value, needle in [("no-such.jsonl", r"optimize: prompt_examples: not URIAL \(its examples\) nor a file"),
                          ([{"user": "Hi"}], "prompt_examples.0.assistant"),
                          (7, 'give "URIAL", a JSONL file')]:
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(None, {"optimize": {"prompt_examples": value}}).params()
        assert "\n" not in str(e.value)
    lines = tmp_path / "examples.jsonl"
    lines.write_text('{"user": "Hi", "assistant": "Hello."}\n')
    config = load_config(None, {"optimize": {"prompt_examples": str(lines)}})
    lines.unlink()  # stored resolved: the run records the examples themselves, not the file's name
    assert config.optimize["prompt_examples"] == [{"user": "Hi", "assistant": "Hello."}]
    assert config.params().examples_block.endswith("User: Hi\nAssistant: Hello.")


def test_the_examples_candidate_toggles_the_block_and_the_optimizer_never_sees_it(tmp_path):
    s = Setup()
    seen: list[str] = []

    def respond(req):
        seen.append(req.messages[1].content)
        return "Be kind, truthful and careful, and say when a plan is risky."
    s.optimizer_backend.responder = respond
    params = OptimizeParams.model_validate({**SMALL.model_dump(), "rounds": 1, "grounded": 1,
                                            "prompt_examples": "URIAL", "mode": "sampling"})
    block = params.examples_block
    s.run(tmp_path / "without", params, seed_instruction="Be helpful.")
    verdicts = [c for c in _records(tmp_path / "without", "candidates.jsonl") if c["kind"] == "verdict"]
    assert [v["source"] for v in verdicts] == ["optimizer", "optimizer", "grounded", "examples"]
    assert verdicts[-1]["text"] == "Be helpful.\n\n" + block and verdicts[-1]["kept"]
    assert verdicts[-1]["note"] == "the examples written in"
    assert not any(block in v["text"] for v in verdicts[:-1])
    scored = {c["instruction"] for c in _records(tmp_path / "without", "candidates.jsonl")
              if c["kind"] == "score" and c["tag"] == "round1"}
    assert "Be helpful.\n\n" + block in scored
    # an incumbent with the block: the optimizer and the checks see its instruction part, every
    # kept candidate keeps the block, and the examples candidate takes it out
    seen.clear()
    s.run(tmp_path / "with", params, seed_instruction="Be helpful.\n\n" + block)
    assert seen and all("Be helpful." in m and "Examples of how you answer" not in m for m in seen)
    verdicts = [c for c in _records(tmp_path / "with", "candidates.jsonl") if c["kind"] == "verdict"]
    kept = [v for v in verdicts if v["kept"]]
    assert kept[0]["text"] == "Be kind, truthful and careful, and say when a plan is risky.\n\n" + block
    assert verdicts[-1]["source"] == "examples" and verdicts[-1]["text"] == "Be helpful."
    assert all(v["text"].endswith(block) for v in kept[:-1])
    # instruction_max_chars counts the instruction part: the block alone is longer than the limit
    assert len(block) > params.instruction_max_chars and len(kept) == 3
    # the report names the candidate's source, as it does the grounded ones
    from picaco.report.rundata import candidate_history, load_run

    labels = [row.label for row in candidate_history(load_run(tmp_path / "with"))]
    assert labels == ["current", "#1", "#2", "#3 grounded", "#4 examples"]


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
def test_a_run_with_prompt_examples_resumes_after_a_kill_like_an_uninterrupted_one(tmp_path, where):
    params = OptimizeParams.model_validate({**SMALL.model_dump(), "grounded": 1,
                                            "prompt_examples": "URIAL"})
    # started in the example form, so the rounds' candidates carry the block and the examples
    # candidate takes it out
    seed = "Be helpful.\n\n" + params.examples_block
    ref = Setup()
    ref_result = ref.run(tmp_path / "ref", params, seed_instruction=seed)
    at = 1 + int(where * (ref.trip.counts["target"] - 1))
    with pytest.raises(Killed):
        Setup(Tripwire(at, "target")).run(tmp_path / "killed", params, seed_instruction=seed)
    result = Setup().run(tmp_path / "killed", params, seed_instruction=seed)
    assert _comparable(result) == _comparable(ref_result)
    verdicts = {d: [(v["source"], v["text"]) for v in _records(tmp_path / d, "candidates.jsonl")
                    if v["kind"] == "verdict"] for d in ("ref", "killed")}
    assert verdicts["killed"] == verdicts["ref"]
    assert sum(source == "examples" for source, _ in verdicts["ref"]) == params.rounds
    assert any(source == "optimizer" and text.endswith(params.examples_block)
               for source, text in verdicts["ref"])


def test_early_stop_when_the_instruction_is_stable(tmp_path):
    s = Setup()
    # an optimizer that only ever repeats the current instruction: every candidate is discarded
    s.optimizer_backend.responder = lambda req: req.messages[1].content.split('"""')[1].strip()
    params = SMALL.model_copy(update={"rounds": 5, "patience": 2})
    result = s.run(tmp_path, params)
    assert result.stop_reason == "stable" and result.rounds_completed == 2
    assert result.instruction == result.seed_instruction
    verdicts = [c for c in _records(tmp_path, "candidates.jsonl") if c["kind"] == "verdict"]
    assert {v["reason"] for v in verdicts} == {"unchanged"}
    rounds = _records(tmp_path, "rounds.jsonl")
    assert rounds[0]["discarded"] == {"unchanged": 2}


def test_sampling_mode_for_black_box_targets(tmp_path):
    s = Setup(caps=Capabilities(generate=True, continuation_logprobs=False, seeded=True))
    result = s.run(tmp_path)
    assert result.mode == "sampling"
    assert s.target_backend.likelihood_calls == 0
    responses = _records(tmp_path, "responses.jsonl")
    assert any(r["phase"] == "candidate" for r in responses)
    scores = [c for c in _records(tmp_path, "candidates.jsonl") if c["kind"] == "score"]
    assert scores and all(c["mode"] == "sampling" for c in scores)
    assert result.objective_final >= result.objective_seed
    assert json.loads((tmp_path / "config.json").read_text())["fingerprint"]["mode"] == "sampling"


def test_proxy_mode_scores_with_the_proxy_only(tmp_path):
    s = Setup(caps=Capabilities(generate=True, continuation_logprobs=False, seeded=True), proxy=True)
    result = s.run(tmp_path)
    assert result.mode == "proxy"
    assert s.target_backend.likelihood_calls == 0
    assert s.proxy.backend.likelihood_calls > 0
    assert s.accounting.role("proxy").calls > 0


def test_forced_likelihood_mode_on_a_black_box_target_fails_before_any_call(tmp_path):
    s = Setup(caps=Capabilities(generate=True, continuation_logprobs=False))
    with pytest.raises(CapabilityMissing):
        s.run(tmp_path, SMALL.model_copy(update={"mode": "likelihood"}))
    assert s.target_backend.generate_calls == 0
    assert not (tmp_path / "config.json").exists()


def test_final_check_returns_the_seed_when_nothing_beats_it(tmp_path):
    # Scripted likelihoods. During the rounds the seed puts its mass on the noisy (bare) responses
    # and every other instruction is indifferent, so candidates win their rounds. From the final
    # check on, the seed puts its mass on the aligned responses: on the final pools it is the best
    # instruction of the trajectory, and the run must return it.
    s = Setup()
    seed = "Seed instruction: be good."
    state = {"final": False}
    bare_texts: set[str] = set()

    class Watch(ListProgress):
        def emit(self, event):
            if event.kind == "phase_start" and event.phase == "final":
                state["final"] = True
            super().emit(event)

    def scorer(messages, response):
        if messages[0].content != seed:
            return [-1.0]
        likes = (response not in bare_texts) if state["final"] else (response in bare_texts)
        return [-0.1] if likes else [-5.0]

    s.target_backend.scorer = scorer
    s.progress = Watch()
    from picaco.optimize.engine import derive_seed
    for q in QUERIES[:3]:
        for j in range(SMALL.n_bare):
            req = GenerateRequest(messages=(Message("user", q.text),), temperature=0.7,
                                  max_tokens=SMALL.max_new_tokens,
                                  seed=derive_seed(SMALL.seed, "bare", q.id, j))
            bare_texts.add(default_responder(req))
    result = s.run(tmp_path, seed_instruction=seed)
    rounds = _records(tmp_path, "rounds.jsonl")
    assert any(r["changed"] for r in rounds)  # candidates did win rounds
    assert result.instruction == seed and result.selected_round == 0
    assert result.objective_final == result.objective_seed
    assert (tmp_path / "instruction.txt").read_text().strip() == seed


def test_instruction_hash_and_identical_prompts():
    assert instruction_hash("a") != instruction_hash("b")
    assert len(instruction_hash("a")) == 16


def test_unknown_preset_and_test_only_queries(tmp_path):
    s = Setup()
    with pytest.raises(ConfigError, match="unknown preset"):
        s.run(tmp_path, params="huge")
    with pytest.raises(ConfigError, match="test split"):
        asyncio.run(optimize(**(s.kwargs(tmp_path) | {"queries": [QUERIES[3]]})))


def test_budget_exhausted_error_is_the_one_raised_from_concurrent_tasks():
    from picaco.optimize.engine import gather_all

    async def boom(delay, exc):
        await asyncio.sleep(delay)
        raise exc

    async def slow():
        await asyncio.sleep(10)

    with pytest.raises(BudgetExhausted):
        asyncio.run(gather_all([boom(0.01, BudgetExhausted("spent")), slow(), slow()]))


def test_progress_sinks_show_the_run(tmp_path):
    import io

    from rich.console import Console

    from picaco.optimize import JsonLinesProgress, RichProgress, make_progress

    buf = io.StringIO()
    s = Setup()
    s.progress = RichProgress(console=Console(file=buf, width=100, force_terminal=False))
    result = s.run(tmp_path / "rich", SMALL.model_copy(update={"rounds": 1}))
    text = buf.getvalue()
    assert "pre-flight estimate (likelihood mode, 3 queries)" in text
    assert "refinement mode: likelihood" in text
    assert "Caution" in text and "best pools" in text  # the per-value table
    assert f"done: {result.stop_reason} after 1 round(s)" in text
    # the closing phases sample under round index 2; the display stays at the last round that ran
    assert "1/1" in text and "2/1" not in text

    stream = io.StringIO()
    s2 = Setup()
    s2.progress = JsonLinesProgress(stream)
    s2.run(tmp_path / "json", SMALL.model_copy(update={"rounds": 1}))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert events[0]["kind"] == "run_start" and events[-1]["kind"] == "run_end"
    assert any(e["kind"] == "advance" and e["phase"] == "enhance" for e in events)
    assert all(e["calls"] >= 0 for e in events)
    assert type(make_progress("quiet")).__name__ == "QuietProgress"
    with pytest.raises(ValueError):
        make_progress("loud")


def test_progress_in_a_log_is_timestamped_lines_at_most_every_interval(tmp_path):
    """stderr that is not a terminal (nohup, CI, a batch job) gets plain lines, since a live display
    shows nothing there until the end: each phase start and round end, in-phase counts at most every
    `interval` seconds of the (here: manual) clock, and the end."""
    import io
    import re

    from picaco.optimize import PlainProgress, make_progress
    from picaco.optimize.progress import EvaluationProgress, ProgressEvent, RichProgress

    class Clock:  # every reading is 10 s after the last
        t = 0.0

        def __call__(self):
            self.t += 10.0
            return self.t

    stream = io.StringIO()
    s = Setup()
    s.progress = PlainProgress(stream, interval=25.0, clock=Clock())
    result = s.run(tmp_path, SMALL.model_copy(update={"rounds": 1}))
    lines = stream.getvalue().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
    text = "\n".join(line[9:] for line in lines)
    assert "pre-flight estimate (likelihood mode, 3 queries)" in text
    assert "round 1/1: sampling and judging responses (" in text
    assert re.search(r"round 1 done: instruction (changed|kept), objective -?\d+\.\d{4}", text)
    assert text.splitlines()[-1].startswith(f"done: {result.stop_reason} after 1 round(s)")
    # in-phase counts, throttled: the phase starts at 10 s, advances read 20, 30, ... 80 s; with a
    # 25 s interval the 3rd (40 s) and the 6th (70 s) are printed
    sink_out = io.StringIO()
    sink = PlainProgress(sink_out, interval=25.0, clock=Clock())
    sink.emit(ProgressEvent("run_start", data={"rounds": 3, "mode": "sampling"}))
    sink.emit(ProgressEvent("phase_start", round=2, phase="refine", calls=5))
    for done in range(1, 8):
        sink.emit(ProgressEvent("advance", round=2, phase="refine", done=done, total=7, calls=5 + done))
    assert [line[9:] for line in sink_out.getvalue().splitlines()] == [
        "refinement mode: sampling", "round 2/3: scoring candidates (5 calls)",
        "round 2/3: scoring candidates 3/7 (8 calls)", "round 2/3: scoring candidates 6/7 (11 calls)"]
    assert type(make_progress("rich", stream=io.StringIO())) is PlainProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert type(make_progress("rich", stream=Terminal())) is RichProgress

    rows = io.StringIO()
    bars = EvaluationProgress("rich", stream=rows, interval=25.0, clock=Clock())
    for done in range(0, 11):  # a method's first call reports 0 rows: no line for it
        bars("Q+IF", done, 10)
    assert [line[9:] for line in rows.getvalue().splitlines()] == [
        "Q+IF: 1/10 rows", "Q+IF: 4/10 rows", "Q+IF: 7/10 rows", "Q+IF: 10/10 rows"]


def test_provenance_names_the_machine_but_the_fingerprint_does_not(tmp_path):
    """The embedded target's answers depend on the CPU llama.cpp was built for, so provenance.json
    says which machine made the result; it is no part of the run's fingerprint (a resume elsewhere is
    the same run)."""
    import os
    import platform

    s = Setup()
    s.run(tmp_path, SMALL.model_copy(update={"rounds": 1}))
    prov = json.loads((tmp_path / "provenance.json").read_text())
    machine = prov["machine"]
    assert machine["python"] == platform.python_version() and machine["cores"] == os.cpu_count()
    assert machine["arch"] == platform.machine() and machine["cpu"]
    assert "machine" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


@pytest.mark.parametrize("kind", ["embedded", "fake"])
def test_a_run_resumed_on_another_machine_says_so(tmp_path, kind):
    """An embedded target's samples differ across CPUs: a run resumed on another machine mixes two
    draws, and its result and report say so. A target served elsewhere is not flagged."""
    import platform

    params = SMALL.model_copy(update={"rounds": 2})
    killed = Setup(Tripwire(10, "target"))  # in round 1
    killed.target_backend.kind = kind
    with pytest.raises(Killed):
        killed.run(tmp_path / "run", params)
    events = _records(tmp_path / "run", "events.jsonl")
    assert events[0]["event"] == "start" and events[0]["machine"]["python"] == platform.python_version()
    # the first process ran on another CPU
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["machine"]["cpu"] = "Other CPU 9000"
    (tmp_path / "run" / "events.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    resumed = Setup()
    resumed.target_backend.kind = kind
    result = resumed.run(tmp_path / "run", params)
    flagged = [n for n in result.notes if "different machines" in n]
    if kind == "embedded":
        assert len(flagged) == 1 and "the samples of this run were made on 2 different machines" in flagged[0]
        assert "Other CPU 9000" in flagged[0]
        assert any(e["event"] == "warning" and "Other CPU 9000" in e["message"]
                   for e in _records(tmp_path / "run", "events.jsonl"))
    else:
        assert flagged == []
    assert [e["event"] for e in _records(tmp_path / "run", "events.jsonl") if "machine" in e] == ["start", "resume"]


def test_result_carries_ratings_accounting_and_the_callers_config(tmp_path):
    s = Setup()
    result = s.run(tmp_path, SMALL.model_copy(update={"rounds": 1}),
                   config={"values": "test-3", "preset": "tiny"})
    # the fake judge's ratings are 1 + 4q, so the mean rating is 1 + 4 * mean q per value
    for vid, q in result.scores_final.items():
        assert result.ratings_final[vid] == pytest.approx(1 + 4 * q)
    assert result.final_scores == result.ratings_final and result.seed_scores == result.ratings_seed
    assert result.accounting["total"]["calls"] == result.calls
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["run_config"] == {"values": "test-3", "preset": "tiny"}


def test_cpu_preset_selects_candidates_on_fresh_samples():
    # [decide] on small pools the pooled J favours the incumbent (docs/method.md): the cpu preset
    # scores every candidate on fresh samples of all its queries; paper keeps the paper's J
    cpu = PRESETS["cpu"]
    assert cpu.mode == "sampling" and cpu.minibatch == cpu.n_queries
    assert PRESETS["paper"].mode == "auto"
    assert preset("cpu", mode="likelihood").mode == "likelihood"  # still overridable


def test_paper_symbols_are_accepted_in_params():
    p = OptimizeParams.model_validate({**PRESETS["cpu"].model_dump(), "T": 5, "M1": 4, "lambda": 0.5})
    assert (p.rounds, p.aligned_pool_size, p.lam) == (5, 4, 0.5)
    assert "T" not in p.model_dump()
    with pytest.raises(Exception, match="bare_samples"):
        OptimizeParams(noisy_pool_size=5, bare_samples=2)


def test_accounting_counts_only_this_run(tmp_path):
    # the caller's Accounting already holds calls from other work: they are not the run's
    s = Setup()
    s.accounting.record_call("target", prompt_tokens=100, completion_tokens=10, seconds=1.0)
    result = s.run(tmp_path, SMALL.model_copy(update={"rounds": 1}))
    assert result.calls == s.accounting.total().calls - 1
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["total"]["calls"] == result.calls
    assert acc["target"]["prompt_tokens"] == s.accounting.role("target").prompt_tokens - 100


def test_balance_enters_f_and_leaves_old_fingerprints_alone(tmp_path):
    s = Setup()
    s.run(tmp_path / "balanced", SMALL.model_copy(update={"balance": 0.5, "rounds": 1}))
    weights = VALUES.weights()
    checked = 0
    for r in _records(tmp_path / "balanced", "responses.jsonl"):
        if r["f"] is None:
            continue
        probs = {k: v["prob"] for k, v in r["scores"].items()}
        # log_conformity stays the paper's sum (the TC bound uses it); f carries the balance term
        assert r["log_conformity"] == pytest.approx(obj.weighted_log_conformity(probs, weights).value)
        want = obj.response_score(probs, weights, r["log_qphi"], SMALL.beta, balance=0.5)
        assert r["f"] == pytest.approx(want)
        if len({round(p, 6) for p in probs.values() if p is not None}) > 1:
            assert r["f"] < SMALL.beta * r["log_conformity"] - r["log_qphi"]
            checked += 1
    assert checked > 0
    # balance 0 computes what runs computed before the field existed: their fingerprints still match
    fp = json.loads((tmp_path / "balanced" / "config.json").read_text())["fingerprint"]["params"]
    assert fp["balance"] == 0.5
    assert "balance" not in fingerprint_params(SMALL) and fingerprint_params(SMALL) == {
        k: v for k, v in SMALL.model_dump(mode="json").items()
        if k not in ("balance", "replace_alpha", "prompt_examples", "weigh_bare", "final_queries",
                     "final_samples")}


class WordJudge(FakeJudge):
    """q_w from a marker word in the response, the same for every value."""

    PROBS = {"GOOD": 0.9, "MEDIUM": 0.5, "BAD": 0.2, "TERRIBLE": 0.02}

    async def score(self, value_set, items):
        out = []
        for _, response in items:
            p = next(prob for word, prob in self.PROBS.items() if word in response)
            out.append({v.id: ValueScore.from_prob(v.id, p) for v in value_set.values})
        return out


FINAL_CHECK_PARAMS = SMALL.model_copy(update={"mode": "sampling", "minibatch": 3})


def round_seeds(params, *rounds: int) -> set[int]:
    """The sampling seeds the given rounds use on the three train queries."""
    from picaco.optimize.engine import derive_seed

    return {derive_seed(params.seed, "sample", t, q.id, j) for t in rounds
            for q in QUERIES[:3] for j in range(params.samples_per_query)}


def run_scripted(tmp_path, params, seed: str, answers, proposals):
    """A sampling-mode run whose target answers `answers(system, request)` (a marker word the
    WordJudge rates) and whose optimizer returns `proposals(request)`."""
    def target(request: GenerateRequest) -> str:
        system = request.messages[0].content if request.messages[0].role == "system" else ""
        return answers(system, request)

    s = Setup()
    s.target_backend.responder, s.optimizer_backend.responder = target, proposals
    s.judge = WordJudge()
    return s.run(tmp_path, params, seed_instruction=seed)


def test_sampling_mode_final_check_compares_the_last_instruction_with_the_seed(tmp_path):
    # The seed answers BAD, "Solid" MEDIUM everywhere. "Lucky", proposed in round 2, answers GOOD on
    # exactly round 2's seeds and TERRIBLE on any other: it wins round 2 on the samples that chose it.
    # The final check samples the seed and the last instruction on fresh seeds, where Lucky loses to
    # the seed, so the seed comes back. Solid, better than both, is not considered: the rule compares
    # only e^0 and e^T (docs/method.md, "[decide] the final check in sampling mode", has the measured
    # reason for not scoring every trajectory instruction).
    seed, solid, lucky = "Seed: be good.", "Solid: be steady.", "Lucky: be bold."
    params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 2})
    round2 = round_seeds(params, 2)

    def answers(system, request):
        if system == lucky:
            return "GOOD answer" if request.seed in round2 else "TERRIBLE answer"
        return {solid: "MEDIUM answer", seed: "BAD answer"}.get(system, "BAD answer")

    def optimizer(request: GenerateRequest) -> str:
        current = request.messages[1].content.split('"""')[1].strip()
        return solid if current == seed else lucky

    result = run_scripted(tmp_path, params, seed, answers, optimizer)
    rounds = _records(tmp_path, "rounds.jsonl")
    assert [r["instruction"] for r in rounds] == [solid, lucky]  # Lucky did win its round
    assert result.instruction == seed and result.selected_round == 0
    finals = [r for r in _records(tmp_path, "responses.jsonl") if r["phase"] == "final"]
    assert sorted({r["text"] for r in finals}) == ["BAD answer", "TERRIBLE answer"]  # seed and Lucky
    assert not {r["seed"] for r in finals} & round_seeds(params, 1, 2)  # seeds no round chose on
    # the seed's mean f on the final seeds is what the returned instruction scored
    assert result.objective_final == result.objective_seed
    # TERRIBLE below BAD on every query by the same amount: no spread, so p = 0
    assert any(n.startswith("final check") and "p = 0.000" in n and n.endswith("the seed is returned")
               for n in result.notes)


def test_sampling_mode_final_check_does_not_judge_the_seed_by_the_samples_that_kept_it(tmp_path):
    # The seed answers GOOD on exactly round 1's seeds and BAD on any other: it wins round 1 against
    # "Weak" (TERRIBLE) on the samples that chose it. In round 2 "Solid" (MEDIUM everywhere) beats it.
    # Judged by its round-1 samples the seed would look GOOD and come back; on fresh seeds it is BAD
    # and Solid is returned.
    seed, weak, solid = "Seed: be good.", "Weak: be dull.", "Solid: be steady."
    params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 2})
    round1 = round_seeds(params, 1)

    def answers(system, request):
        if system == seed:
            return "GOOD answer" if request.seed in round1 else "BAD answer"
        return {solid: "MEDIUM answer", weak: "TERRIBLE answer"}.get(system, "BAD answer")

    proposals = iter([weak] * params.candidates + [solid] * params.candidates)
    result = run_scripted(tmp_path, params, seed, answers, lambda request: next(proposals))
    rounds = _records(tmp_path, "rounds.jsonl")
    assert [r["changed"] for r in rounds] == [False, True] and rounds[1]["instruction"] == solid
    assert result.instruction == solid and result.selected_round == 2
    assert result.objective_final > result.objective_seed
    # the report's seed-vs-final ratings come from the same paired fresh samples: BAD against MEDIUM
    assert all(r == pytest.approx(1 + 4 * 0.2) for r in result.ratings_seed.values())
    assert all(r == pytest.approx(1 + 4 * 0.5) for r in result.ratings_final.values())


def test_the_final_check_returns_no_instruction_when_the_bare_model_beats_it(tmp_path, capsys):
    # The bare model (no system message) answers GOOD, the seed BAD, "Solid" MEDIUM: Solid wins its
    # round and beats the seed, but on the final check's fresh seeds the bare model beats Solid on
    # every query, so the run returns no instruction (docs/method.md, "[decide] ... the bare model").
    seed, solid = "Seed: be good.", "Solid: be steady."
    params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1})

    def answers(system, request):
        return {"": "GOOD answer", solid: "MEDIUM answer"}.get(system, "BAD answer")

    result = run_scripted(tmp_path, params, seed, answers, lambda request: solid)
    assert [r["instruction"] for r in _records(tmp_path, "rounds.jsonl")] == [solid]
    assert result.instruction == "" and result.selected_round is None
    finals = [r for r in _records(tmp_path, "responses.jsonl") if r["phase"] == "final"]
    assert sorted({r["text"] for r in finals}) == ["BAD answer", "GOOD answer", "MEDIUM answer"]
    bare = [r for r in finals if r["text"] == "GOOD answer"]
    assert {r["seed"] for r in bare} == {r["seed"] for r in finals if r["text"] == "MEDIUM answer"}
    assert not {r["seed"] for r in bare} & round_seeds(params, 1)
    # the seed-vs-final report shows the seed against what is returned: the bare model
    assert all(r == pytest.approx(1 + 4 * 0.9) for r in result.ratings_final.values())
    assert all(r == pytest.approx(1 + 4 * 0.2) for r in result.ratings_seed.values())
    assert result.objective_final == pytest.approx(sum(r["f"] for r in bare) / len(bare))
    [note] = [n for n in result.notes if n.startswith("final check against the bare model")]
    assert "p = 0.000" in note and note.endswith("no instruction is returned")
    assert (tmp_path / "instruction.txt").read_text() == "\n"
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["instruction"] == "" and prov["selected_round"] is None
    assert prov["params"]["weigh_bare"] is True
    # what the user reads: the command line and the report say "no instruction", not an empty box
    from picaco.cli import print_result
    from picaco.report import write_report
    from picaco.report.rundata import load_run

    assert load_run(tmp_path).returned_no_instruction  # the report asks the same rule as the rundir
    print_result(result)
    printed = capsys.readouterr().out
    assert "no instruction" in printed and "instruction.txt is empty" in " ".join(printed.split())
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert 'id="no-instruction"' in page and "final-instruction" not in page  # no box, no copy button
    assert "none: the bare model (no instruction) beat the run" in page
    # its side of the seed-vs-final table, figures and examples is the bare model, not "final"
    assert "The seed instruction and the bare model (no instruction) answered the same" in page
    assert '<th class="n">No instruction</th>' in page and "final instruction" not in page
    assert "Mean rating per value: seed and bare model (no instruction)" in page
    # evaluating the run's instruction evaluates the bare model; warm-starting from it is refused
    from picaco.baselines import Instruction
    from picaco.optimize import read_final_instruction

    method = Instruction.from_path(tmp_path, "PICACO")
    assert method.returned_none and method.system_prompt(VALUES) is None
    with pytest.raises(ConfigError, match="returned no instruction"):
        read_final_instruction(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "instruction.txt").write_text("\n")
    with pytest.raises(DataError, match="the instruction is empty"):  # an empty file of no run
        Instruction.from_path(tmp_path / "elsewhere", "PICACO")


def test_the_final_check_keeps_the_instruction_unless_the_bare_model_is_demonstrably_better(tmp_path):
    # The bare model answers GOOD on one query and TERRIBLE on the others against Solid's MEDIUM: a
    # higher mean on one query is no evidence, so Solid is kept. With weigh_bare off the bare model
    # is not sampled at all (and the setting leaves the run's fingerprint alone).
    seed, solid = "Seed: be good.", "Solid: be steady."
    params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1})

    def answers(system, request):
        if system == "":
            return "GOOD answer" if request.messages[-1].content == QUERIES[0].text else "TERRIBLE answer"
        return "MEDIUM answer" if system == solid else "BAD answer"

    result = run_scripted(tmp_path / "on", params, seed, answers, lambda request: solid)
    assert result.instruction == solid and result.selected_round == 1
    [note] = [n for n in result.notes if n.startswith("final check against the bare model")]
    assert note.endswith("round 1's instruction is kept")
    off = params.model_copy(update={"weigh_bare": False})
    result = run_scripted(tmp_path / "off", off, seed, answers, lambda request: solid)
    assert result.instruction == solid
    finals = [r for r in _records(tmp_path / "off", "responses.jsonl") if r["phase"] == "final"]
    assert finals and "" not in {r["text"] for r in finals}
    assert not {"GOOD answer", "TERRIBLE answer"} & {r["text"] for r in finals}
    assert not any(n.startswith("final check against the bare model") for n in result.notes)
    assert fingerprint_params(off) == fingerprint_params(params)


def test_the_final_check_can_run_on_queries_no_round_saw(tmp_path):
    # The rounds use q1 and q2; q3 is kept for the final check (final_queries = 1). The bare model
    # answers BAD on q1 and q2 and GOOD on q3, "Solid" MEDIUM everywhere. On the rounds' queries the
    # check keeps Solid; on q3, which no round saw, the bare model beats it and no instruction is
    # returned. The held-out query is never sampled by a round, and the setting leaves the
    # fingerprint alone (a finished run takes it with --refinish).
    seed, solid = "Seed: be good.", "Solid: be steady."
    base = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1, "n_queries": 2, "minibatch": 2})

    def answers(system, request):
        if system == "":
            return "GOOD answer" if request.messages[-1].content == QUERIES[2].text else "BAD answer"
        return "MEDIUM answer" if system == solid else "BAD answer"

    reused = run_scripted(tmp_path / "reused", base, seed, answers, lambda request: solid)
    assert reused.instruction == solid
    held = base.model_copy(update={"final_queries": 1})
    result = run_scripted(tmp_path / "held", held, seed, answers, lambda request: solid)
    assert result.instruction == "" and result.selected_round is None
    records = _records(tmp_path / "held", "responses.jsonl")
    assert {r["query_id"] for r in records if r["phase"] == "final"} == {"q3"}
    assert {r["query_id"] for r in records if r["phase"] != "final"} == {"q1", "q2"}
    [note] = [n for n in result.notes if n.startswith("final check on fresh seeds")]
    assert "over 1 queries no round saw" in note
    prov = json.loads((tmp_path / "held" / "provenance.json").read_text())
    assert prov["final_queries"] == ["q3"] and prov["params"]["final_queries"] == 1
    assert prov["tc_bound"]["final"] is not None  # the bare samples of q3 are its bare reference
    assert fingerprint_params(held) == fingerprint_params(base)


def test_final_samples_sets_the_samples_per_query_of_the_final_check_only(tmp_path):
    # The rounds draw samples_per_query = 2 per query; with final_samples = 1 the final check draws
    # one per kept-aside query and arm, on the first of the seeds it would draw with two. The
    # setting is the final check's alone: out of the fingerprint, recorded in provenance.
    seed, solid = "Seed: be good.", "Solid: be steady."

    def answers(system, request):
        return "MEDIUM answer" if system == solid else "BAD answer"

    base = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1, "n_queries": 1, "minibatch": 1,
                                                 "final_queries": 2})
    one = base.model_copy(update={"final_samples": 1})
    runs = {}
    for name, params in (("two", base), ("one", one)):
        run_scripted(tmp_path / name, params, seed, answers, lambda request: solid)
        runs[name] = _records(tmp_path / name, "responses.jsonl")
    final = {name: [r for r in recs if r["phase"] == "final"] for name, recs in runs.items()}
    per_arm_query = collections.Counter((r["instruction_hash"], r["query_id"]) for r in final["one"])
    assert len(per_arm_query) == 3 * 2 and set(per_arm_query.values()) == {1}  # seed, Solid, bare
    assert {r["seed"] for r in final["one"]} < {r["seed"] for r in final["two"]}
    assert len(final["two"]) == 3 * 2 * 2
    assert all(r["sample"] == 0 for r in final["one"])
    rounds = {name: [r["key"] for r in recs if r["phase"] != "final"] for name, recs in runs.items()}
    assert rounds["one"] == rounds["two"]  # the rounds draw base.samples_per_query as before
    prov = json.loads((tmp_path / "one" / "provenance.json").read_text())
    assert prov["params"]["final_samples"] == 1
    assert fingerprint_params(one) == fingerprint_params(base)
    assert PRESETS["cpu"].final_samples == 1 and PRESETS["paper"].final_samples is None


def test_on_queries_no_round_saw_the_higher_mean_decides_against_the_bare_model(tmp_path):
    # The bare model answers GOOD on q2 and MEDIUM on q1 and q3, "Solid" MEDIUM everywhere: the bare
    # model's mean f is higher, with no evidence (one query of difference). With q2 and q3 kept
    # aside (rounds on q1) that is enough: no instruction. On the rounds' own queries, where Solid
    # was chosen, the same answers keep Solid: there the bare model must be demonstrably better.
    seed, solid = "Seed: be good.", "Solid: be steady."

    def answers(system, request):
        if system == "":
            return "GOOD answer" if request.messages[-1].content == QUERIES[1].text else "MEDIUM answer"
        return "MEDIUM answer" if system == solid else "BAD answer"

    held = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1, "n_queries": 1, "minibatch": 1,
                                                 "final_queries": 2})
    result = run_scripted(tmp_path / "held", held, seed, answers, lambda request: solid)
    assert result.instruction == "" and result.selected_round is None
    [note] = [n for n in result.notes if n.startswith("final check against the bare model")]
    assert note.endswith("on queries no round saw the higher mean decides: no instruction is returned")
    # the report's seed-vs-final gain is then measured on those queries, so it is not optimistic
    from picaco.report.rundata import gain_and_noise, gain_noise_summary, load_run

    gain, noise = gain_and_noise(load_run(tmp_path / "held"))
    assert gain is not None and gain.held_out and gain.n_queries == 2
    assert "over 2 queries no round saw (95%)" in gain_noise_summary(gain, noise)
    rounds = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1, "n_queries": 3})
    result = run_scripted(tmp_path / "rounds", rounds, seed, answers, lambda request: solid)
    assert result.instruction == solid
    [note] = [n for n in result.notes if n.startswith("final check against the bare model")]
    assert "one-sided paired t-test that round 1's instruction is worse: p = 0.2" in note
    assert note.endswith("round 1's instruction is kept")


def test_final_queries_come_from_the_training_split_after_the_rounds_queries():
    from picaco.optimize.engine import select_queries

    used, held, warnings = select_queries(QUERIES, SMALL.model_copy(update={"n_queries": 1, "final_queries": 2}))
    assert [q.id for q in used] == ["q1"] and [q.id for q in held] == ["q2", "q3"]
    assert not [w for w in warnings if "final_queries" in w]
    # never the test split: only two training queries are left after the first, so the check uses those
    used, held, warnings = select_queries(QUERIES, SMALL.model_copy(update={"n_queries": 1, "final_queries": 5}))
    assert [q.id for q in held] == ["q2", "q3"]
    assert any("final_queries = 5 but only 2 training queries are left" in w for w in warnings)
    used, held, warnings = select_queries(QUERIES, SMALL.model_copy(update={"final_queries": 2}))
    assert held == [] and any("reuses the rounds' queries" in w for w in warnings)


def _one_per_query(fs):  # one response per query with this f
    return [_s(f"q{i}", "t", f) for i, f in enumerate(fs)]


def test_worse_p_value_is_a_one_sided_paired_t_test_over_queries():
    from picaco.optimize.scoring import FINAL_CHECK_ALPHA, seed_comes_back, worse_p_value

    samples = _one_per_query

    def worse(candidate, reference):  # the final check's rule: the seed comes back below alpha
        back, p = seed_comes_back(candidate, reference)
        assert p == worse_p_value(candidate, reference)
        return back

    seed = samples([0.0, 0.0, 0.0])
    # differences -1, -2, -3: mean -2, sd 1, t = -2 / (1 / sqrt 3) = -3.464, df 2: p = 0.0371
    assert worse_p_value(samples([-1.0, -2.0, -3.0]), seed) == pytest.approx(0.0371, abs=1e-4)
    # differences -1, 0, -0.5: mean -0.5, sd 0.5, t = -1.732, df 2: p = 0.1127
    assert worse_p_value(samples([-1.0, 0.0, -0.5]), seed) == pytest.approx(0.1127, abs=1e-4)
    # differences 1, -0.5, 0: mean 1/6, sd 0.7638, t = +0.378, df 2: p = 0.6291
    assert worse_p_value(samples([1.0, -0.5, 0.0]), seed) == pytest.approx(0.6291, abs=1e-4)
    assert FINAL_CHECK_ALPHA == 0.05
    assert worse(samples([-1.0, -2.0, -3.0]), seed)
    assert not worse(samples([-1.0, 0.0, -0.5]), seed)
    assert not worse(samples([1.0, -0.5, 0.0]), seed)  # better on average
    assert worse(samples([-0.1, -0.1, -0.1]), seed)  # no spread: any loss is evidence
    assert worse(samples([-0.1]), samples([0.0]))  # one query: the plain comparison
    assert worse_p_value(samples([None, None, None]), seed) == 0.0  # nothing scored
    assert not worse(samples([0.0, 0.0, 0.0]), seed)  # a tie keeps the candidate


def test_the_bare_model_wins_on_the_higher_mean_kept_aside_and_only_on_evidence_otherwise():
    from picaco.optimize.scoring import bare_model_wins

    pick, bare = _one_per_query([0.0, 0.0, 0.0]), _one_per_query([-1.0, 0.0, 1.5])  # bare mean +1/6
    # kept-aside queries: the higher mean decides, with no test
    assert bare_model_wins(pick, bare, kept_aside=True) == (True, None)
    assert bare_model_wins(bare, pick, kept_aside=True) == (False, None)
    assert bare_model_wins(pick, list(pick), kept_aside=True) == (False, None)  # a tie keeps the pick
    # the rounds' queries: differences of the pick 1, 0, -1.5 (mean -1/6, sd 1.258, t = -0.229, df 2)
    wins, p = bare_model_wins(pick, bare, kept_aside=False)
    assert not wins and p == pytest.approx(0.4199, abs=1e-4)
    # differences -1, -2, -3 against a better bare model: p 0.0371 < 0.05, the bare model wins
    wins, p = bare_model_wins(pick, _one_per_query([1.0, 2.0, 3.0]), kept_aside=False)
    assert wins and p == pytest.approx(0.0371, abs=1e-4)


def test_sampling_mode_final_check_keeps_e_t_when_it_is_worse_only_within_the_noise(tmp_path):
    # "Mixed" wins round 1 (GOOD on round 1's seeds). On the final check's fresh seeds it answers
    # GOOD, TERRIBLE and MEDIUM on the three queries against the seed's MEDIUM: a lower mean f, but
    # one query's loss against another's gain is no evidence that it is worse, so it is returned.
    seed, mixed = "Seed: be good.", "Mixed: be varied."
    params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1})
    round1 = round_seeds(params, 1)
    on_fresh = {QUERIES[0].text: "GOOD answer", QUERIES[1].text: "TERRIBLE answer",
                QUERIES[2].text: "MEDIUM answer"}

    def answers(system, request):
        if system == mixed:
            return "GOOD answer" if request.seed in round1 else on_fresh[request.messages[-1].content]
        return "MEDIUM answer" if system == seed else "BAD answer"

    result = run_scripted(tmp_path, params, seed, answers, lambda request: mixed)
    assert result.instruction == mixed and result.selected_round == 1
    assert result.objective_final < result.objective_seed  # a lower mean, kept all the same
    # the result says why, with the numbers of the check
    [note] = [n for n in result.notes if n.startswith("final check on fresh seeds")]
    assert f"round 1's instruction {result.objective_final:.3f}, of the seed {result.objective_seed:.3f}" in note
    assert note.endswith("round 1's instruction is kept") and "p = 0." in note


def test_replace_alpha_keeps_the_incumbent_unless_the_best_candidate_has_evidence(tmp_path):
    # The seed answers MEDIUM everywhere. "Mixed" answers GOOD, BAD, GOOD on the three queries: a
    # higher mean f, but one query's loss against two gains is weak evidence. "Clear" answers GOOD
    # everywhere. By default the higher mean decides; with replace_alpha only Clear replaces the seed.
    from picaco.optimize.scoring import per_query_worse_p

    seed, mixed, clear = "Seed: be good.", "Mixed: be varied.", "Clear: be better."
    per_query = {QUERIES[0].text: "GOOD answer", QUERIES[1].text: "BAD answer",
                 QUERIES[2].text: "GOOD answer"}

    def answers(system, request):
        if system == mixed:
            return per_query[request.messages[-1].content]
        return {seed: "MEDIUM answer", clear: "GOOD answer"}.get(system, "BAD answer")

    def run(name, proposal, **update):
        params = FINAL_CHECK_PARAMS.model_copy(update={"rounds": 1, "grounded": 0, **update})
        result = run_scripted(tmp_path / name, params, seed, answers, lambda request: proposal)
        [record] = _records(tmp_path / name, "rounds.jsonl")
        return result, record

    result, record = run("default", mixed)
    assert record["instruction"] == mixed and "replace_p" not in record  # the paper's rule
    result, record = run("alpha-mixed", mixed, replace_alpha=0.2)
    assert record["instruction"] == seed and not record["changed"]
    assert record["objective"] == record["objective_previous"]  # the incumbent's own score
    scores = {r["instruction_hash"]: r["per_query"] for r in _records(tmp_path / "alpha-mixed", "candidates.jsonl")
              if r["kind"] == "score"}
    p = per_query_worse_p(scores[record["previous_hash"]], scores[instruction_hash(mixed)])
    assert record["replace_p"] == pytest.approx(p) and 0.2 <= p < 1
    assert result.instruction == seed
    from picaco.report import write_report

    page = write_report(tmp_path / "alpha-mixed").read_text(encoding="utf-8")
    assert f"unchanged (p {p:.3f})" in page and "with <code>replace_alpha</code>" in page
    assert "with <code>replace_alpha</code>" not in write_report(tmp_path / "default").read_text(encoding="utf-8")
    result, record = run("alpha-clear", clear, replace_alpha=0.2)
    assert record["instruction"] == clear and record["replace_p"] == 0.0  # better on every query
    # an experiment's setting: off by default, so it leaves older runs' fingerprints alone
    assert "replace_alpha" not in fingerprint_params(FINAL_CHECK_PARAMS)
    assert fingerprint_params(FINAL_CHECK_PARAMS.model_copy(update={"replace_alpha": 0.2}))["replace_alpha"] == 0.2


def test_prior_turns_precede_every_target_request_and_deploy_with_the_instruction(reference, tmp_path):
    from picaco.llm.base import turns_as_pairs, turns_from_pairs

    pairs = [("Can I bring my bike on the train?", "Yes, outside rush hours, in the marked carriage."),
             ("Is there wifi on board?", "On intercity trains, yes; log in with your ticket number.")]
    turns = turns_from_pairs(pairs)
    s = Setup()
    s.target = LLMClient("target", s.target_backend, accounting=s.accounting, prior_turns=turns)
    sent, scored = [], []
    generate, score = s.target_backend.responder, s.target_backend.scorer
    s.target_backend.responder = lambda r: sent.append(r.messages) or generate(r)
    s.target_backend.scorer = lambda messages, response: scored.append(messages) or score(messages, response)
    result = s.run(tmp_path / "run")

    assert sent and scored
    for messages in sent + scored:  # sampled or scored, the target saw the examples just before the query
        assert messages[-5:-1] == turns and messages[-1].role == "user"
    # the bare model of the noisy pool is the deployment without a system prompt: the examples alone
    assert any(m[:4] == turns for m in sent)
    assert any(m[0].content == result.seed_instruction and m[1:5] == turns for m in sent)
    run = tmp_path / "run"
    deployed = [json.loads(line) for line in (run / "prior_turns.jsonl").read_text().splitlines()]
    assert deployed == turns_as_pairs(turns) == [{"user": u, "assistant": a} for u, a in pairs]
    assert json.loads((run / "provenance.json").read_text())["prior_turns"] == deployed
    assert not (reference[0] / "prior_turns.jsonl").exists()  # none without turns
    # the pre-flight estimate counts the turns' tokens on every target request
    framed, plain = (json.loads((d / "provenance.json").read_text())["estimate"]["roles"]["target generate"]
                     for d in (run, reference[0]))
    assert framed["calls"] == plain["calls"]
    assert framed["tokens"] == plain["tokens"] + framed["calls"] * (sum(len(u + a) for u, a in pairs) // 4)

    # a run directory made without the turns is not resumed with them
    shutil.copytree(reference[0], tmp_path / "plain")
    t = Setup()
    t.target = LLMClient("target", t.target_backend, accounting=t.accounting, prior_turns=turns)
    with pytest.raises(ConfigError, match="prior_turns"):
        t.run(tmp_path / "plain")


def test_a_system_template_frames_every_target_request_and_only_the_slot_is_optimized(reference, tmp_path):
    from picaco.llm.base import fill_template

    template = "You are the front desk of a hostel in Lisbon.\n{instruction}\nKeep answers short."
    s = Setup()
    s.target = LLMClient("target", s.target_backend, accounting=s.accounting, system_template=template)
    sent, scored, asked = [], [], []
    generate, score, propose = s.target_backend.responder, s.target_backend.scorer, s.optimizer_backend.responder
    s.target_backend.responder = lambda r: sent.append(r.messages) or generate(r)
    s.target_backend.scorer = lambda messages, response: scored.append(messages) or score(messages, response)
    s.optimizer_backend.responder = lambda r: asked.append(r.messages) or propose(r)
    result = s.run(tmp_path / "run")

    # every target request, sampled or scored, carried the fixed text around its instruction
    for messages in sent + scored:
        assert messages[0].role == "system"
        assert messages[0].content.startswith("You are the front desk of a hostel in Lisbon.")
        assert messages[0].content.endswith("Keep answers short.")
    assert scored and sent
    # the bare model of the noisy pool is the deployment without an instruction: the template alone
    assert any(m[0].content == fill_template(template, "") for m in sent)
    assert any(m[0].content == fill_template(template, result.seed_instruction) for m in sent)
    # the optimizer saw the fixed part with the slot marked, and was asked for the slot's text only
    assert asked and all("[INSTRUCTION]" in m[-1].content and "hostel in Lisbon" in m[-1].content
                         and "Reply with the new instruction only." in m[-1].content for m in asked)
    run = tmp_path / "run"
    assert (run / "system_prompt.txt").read_text() == fill_template(template, result.instruction) + "\n"
    assert (run / "instruction.txt").read_text() == result.instruction.strip() + "\n"
    assert json.loads((run / "provenance.json").read_text())["system_template"] == template
    assert not (reference[0] / "system_prompt.txt").exists()  # none without a template

    # a run directory made without the template is not resumed with it
    shutil.copytree(reference[0], tmp_path / "plain")
    t = Setup()
    t.target = LLMClient("target", t.target_backend, accounting=t.accounting, system_template=template)
    with pytest.raises(ConfigError, match="system_template"):
        t.run(tmp_path / "plain")

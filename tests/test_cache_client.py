"""The call cache, accounting, budget and the role client, on the deterministic fake backend."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3

import pytest

from picaco.errors import BudgetExhausted
from picaco.llm.accounting import Accounting, Budget
from picaco.llm.base import Capabilities, LikelihoodRequest, chat
from picaco.llm.cache import CallCache, cache_key
from picaco.llm.client import LLMClient
from picaco.llm.fake import FakeBackend
from picaco.llm.base import CapabilityMissing


def test_key_covers_every_sampling_parameter():
    ident = {"kind": "fake", "model": "m"}
    base = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "sample_index": 0}
    k = cache_key(ident, "generate", base)
    assert k == cache_key(ident, "generate", dict(reversed(list(base.items()))))  # order-free
    assert k != cache_key(ident, "generate", {**base, "temperature": 0.8})
    assert k != cache_key(ident, "generate", {**base, "sample_index": 1})
    assert k != cache_key({**ident, "model": "m2"}, "generate", base)
    assert k != cache_key(ident, "loglikelihood", base)


async def test_n_samples_distinct_and_rerun_costs_no_calls(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    backend = FakeBackend()
    acct = Accounting()
    client = LLMClient("target", backend, cache=cache, accounting=acct)
    msgs = chat("be kind", "tell me about the sea and the sky and the stars")
    first = await client.generate(msgs, n=4, temperature=1.0, seed=7)
    assert len({c.text for c in first}) == 4  # seeds 7..10 and sample indices differ
    assert backend.generate_calls == 4
    again = await client.generate(msgs, n=4, temperature=1.0, seed=7)
    assert [c.text for c in again] == [c.text for c in first]
    assert backend.generate_calls == 4  # all from the cache
    stats = acct.role("target")
    assert (stats.calls, stats.cache_hits) == (4, 4)
    # a different temperature is a different call
    await client.generate(msgs, n=1, temperature=0.2, seed=7)
    assert backend.generate_calls == 5


async def test_cache_survives_reopen_and_clear(tmp_path):
    path = tmp_path / "c.sqlite"
    client = LLMClient("t", FakeBackend(), cache=CallCache(path))
    await client.generate(chat(None, "hello there"), n=2)
    client.cache.close()
    info = CallCache(path).info()
    assert info.entries == 2 and info.by_op == {"generate": 2}
    assert CallCache(path).clear() == 2
    assert CallCache(path).info().entries == 0


def _writer(path: str, start: int) -> None:
    cache = CallCache(__import__("pathlib").Path(path))
    for i in range(start, start + 200):
        cache.put(f"k{i}", "generate", "m", {"i": i})


def test_concurrent_writers_from_processes(tmp_path):
    path = tmp_path / "c.sqlite"
    procs = [multiprocessing.Process(target=_writer, args=(str(path), s)) for s in (0, 200, 400, 600)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert CallCache(path).info().entries == 800
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_likelihood_cached_per_request_and_batched(tmp_path):
    backend = FakeBackend()
    client = LLMClient("target", backend, cache=CallCache(tmp_path / "c.sqlite"))
    msgs = chat("kind words", "say something")
    reqs = [LikelihoodRequest(msgs, "kind words here"), LikelihoodRequest(msgs, "rude stuff")]
    a = await client.loglikelihood(reqs)
    assert backend.likelihood_calls == 1
    assert a[0].total == pytest.approx(-0.5 * 2 - 3.0)  # 'kind','words' in prompt; 'here' not
    b = await client.loglikelihood(reqs + [LikelihoodRequest(msgs, "new one")])
    assert backend.likelihood_calls == 2 and [x.total for x in b[:2]] == [x.total for x in a]


async def test_missing_capability_is_a_clear_error():
    backend = FakeBackend(capabilities=Capabilities(continuation_logprobs=False, notes=("server has no echo",)))
    client = LLMClient("target", backend)
    with pytest.raises(CapabilityMissing, match="log-likelihood of a given response: server has no echo"):
        await client.loglikelihood([LikelihoodRequest(chat(None, "x"), "y")])


async def test_budget_is_never_exceeded_under_concurrency():
    budget = Budget(max_calls=5)
    backend = FakeBackend()
    client = LLMClient("target", backend, budget=budget)
    results = await asyncio.gather(
        *(client.generate(chat(None, f"q{i}"), n=1) for i in range(12)), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    spent = [r for r in results if isinstance(r, BudgetExhausted)]
    assert len(ok) == 5 and len(spent) == 7
    assert backend.generate_calls == 5 and budget.calls == 5


async def test_token_budget_reserves_worst_case():
    budget = Budget(max_tokens=100)
    client = LLMClient("target", FakeBackend(), budget=budget)
    with pytest.raises(BudgetExhausted, match="token budget"):
        await client.generate(chat(None, "q"), n=1, max_tokens=200)
    assert budget.calls == 0 and budget.tokens == 0


def test_accounting_merge_and_total():
    a = Accounting()
    a.record_call("target", prompt_tokens=10, completion_tokens=5, seconds=1.0)
    a.record_hit("judge")
    b = Accounting()
    b.merge_json(a.to_json())
    b.record_faults("target", {"429": 2}, retries=2)
    t = b.total()
    assert (t.calls, t.cache_hits, t.prompt_tokens, t.retries, t.faults["429"]) == (1, 1, 10, 2, 2)


# -- the system template: a fixed prompt around the optimized instruction -----------------------------

TEMPLATE = "You are the help desk of the {city} library. {instruction}\nAnswer in two sentences."


def test_fill_template_puts_the_instruction_in_the_slot_only():
    from picaco.llm.base import fill_template, frame

    # other braces are left alone: a plain replace, not str.format
    assert fill_template(TEMPLATE, "  Be kind.\n") == (
        "You are the help desk of the {city} library. Be kind.\nAnswer in two sentences.")
    assert fill_template(TEMPLATE, None) == "You are the help desk of the {city} library. \nAnswer in two sentences."
    framed = frame(chat("Be kind.", "hi"), TEMPLATE)
    assert [m.role for m in framed] == ["system", "user"] and "library. Be kind." in framed[0].content
    # the bare model (no system message) gets the template with an empty slot: the deployment as it is
    bare = frame(chat(None, "hi"), TEMPLATE)
    assert [m.role for m in bare] == ["system", "user"]
    assert bare[0].content == fill_template(TEMPLATE, "") and bare[1].content == "hi"


async def test_a_templated_client_sends_framed_prompts_and_keys_the_cache_by_them(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    seen = []

    def responder(request):
        seen.append(request.messages)
        return "ok " + str(len(seen))

    backend = FakeBackend(responder=responder)
    plain = LLMClient("target", backend, cache=cache)
    templated = LLMClient("target", backend, cache=cache, system_template=TEMPLATE)
    msgs = chat("Be kind.", "Where are the maps?")
    a = await plain.generate(msgs, seed=1)
    b = await templated.generate(msgs, seed=1)
    assert seen[0][0].content == "Be kind."
    assert seen[1][0].content.startswith("You are the help desk") and "Be kind." in seen[1][0].content
    assert a[0].text != b[0].text  # a different request, not the plain one's cache entry
    again = await templated.generate(msgs, seed=1)
    assert again[0].text == b[0].text and len(seen) == 2  # cached under the framed request
    # likelihoods are framed the same way
    scored = []
    backend.scorer = lambda messages, response: scored.append(messages) or [-1.0]
    await templated.loglikelihood([LikelihoodRequest(msgs, "The maps are upstairs.")])
    assert scored[0][0].content == seen[1][0].content
    # identity: unchanged without a template (old run directories still resume), marked with one
    assert plain.identity() == backend.identity()
    assert templated.identity() == {**backend.identity(), "system_template": TEMPLATE}


async def test_prior_turns_go_after_the_system_prompt_and_key_the_cache(tmp_path):
    from picaco.llm.base import Message, turns_as_pairs, turns_from_pairs

    turns = turns_from_pairs([("Is the museum open on Monday?", "No, it opens Tuesday to Sunday.")])
    assert turns_as_pairs(turns) == [{"user": "Is the museum open on Monday?",
                                      "assistant": "No, it opens Tuesday to Sunday."}]
    cache = CallCache(tmp_path / "c.sqlite")
    seen = []
    backend = FakeBackend(responder=lambda request: seen.append(request.messages) or f"ok {len(seen)}")
    plain = LLMClient("target", backend, cache=cache)
    shown = LLMClient("target", backend, cache=cache, prior_turns=turns)
    both = LLMClient("target", backend, cache=cache, prior_turns=turns, system_template=TEMPLATE)
    msgs = chat("Be kind.", "Where are the maps?")
    await plain.generate(msgs, seed=1)
    await shown.generate(msgs, seed=1)
    await shown.generate(chat(None, "Where are the maps?"), seed=1)  # the bare model
    await both.generate(msgs, seed=1)
    assert seen[0] == msgs
    assert seen[1] == (msgs[0], *turns, msgs[1])
    assert seen[2] == (*turns, Message("user", "Where are the maps?"))  # no system message for the bare model
    assert seen[3][0].content.startswith("You are the help desk") and seen[3][1:] == (*turns, msgs[1])
    assert len({r.text for r in [*(await shown.generate(msgs, seed=1))]}) == 1 and len(seen) == 4  # cached
    scored = []
    backend.scorer = lambda messages, response: scored.append(messages) or [-1.0]
    await shown.loglikelihood([LikelihoodRequest(msgs, "Upstairs.")])
    assert scored[0] == seen[1]  # likelihoods are scored in the same deployment
    assert shown.identity() == {**backend.identity(), "prior_turns": turns_as_pairs(turns)}
    assert plain.identity() == backend.identity()

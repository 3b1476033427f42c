"""The endpoint pool: one model on several OpenAI-compatible endpoints, with failover.

Two layers:
- routing logic against ``support.load_server`` instances (real local HTTP servers with scripted
  faults and a per-request log) and ports nothing listens on (fast, no model);
- two real ``llama_cpp.server`` processes serving SmolLM2-135M plus a dead port, one server killed
  mid-run (``@pytest.mark.server``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from picaco.config import RoleConfig
from picaco.errors import BackendError, ConfigError
from picaco.llm.base import GenerateRequest, LikelihoodRequest, chat
from picaco.llm.cache import CallCache
from picaco.llm.client import LLMClient
from picaco.llm.endpoint_pool import EndpointPool
from picaco.llm.openai_backend import OpenAIBackend
from picaco.runtime import make_backend
from support.delay_server import REPLY_TEXT
from support.llama_server import free_port
from support.load_server import start_in_thread

SECRET = "sk-pool-Hq72mXcV9bN3LpA"  # a fake key; it must not appear in messages or reports


@pytest.fixture(scope="module")
def three_servers():
    with start_in_thread() as a, start_in_thread() as b, start_in_thread() as c:
        yield a, b, c


@pytest.fixture
def servers(three_servers):
    for s in three_servers:
        s.configure(reset=True, delay=0.0)
    return three_servers


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


def _pool(urls, **kw) -> EndpointPool:
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_cap", 0.2)
    return EndpointPool(urls, "delay-model", SECRET, **kw)


def _req(i: int = 0) -> GenerateRequest:
    return GenerateRequest(chat("You are terse.", f"ping-{i}"), temperature=0.0, max_tokens=4)


def _max_overlap(logs: list[list]) -> int:
    """Most requests open at once over several servers (their logs share the monotonic clock)."""
    events = sorted([(e[0], 1) for log in logs for e in log] + [(e[1], -1) for log in logs for e in log],
                    key=lambda ev: (ev[0], ev[1]))
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def test_requests_spread_over_endpoints_under_one_cap(servers):
    for s in servers:
        s.configure(delay=0.05)
    pool = _pool([s.base_url for s in servers], max_in_flight=6)
    outs = await asyncio.gather(*(pool.generate(_req(i)) for i in range(60)))
    await pool.aclose()
    logs = [s.log()["log"] for s in servers]
    counts = [len(log) for log in logs]
    assert all(o.text == REPLY_TEXT for o in outs)
    assert sum(counts) == 60
    assert min(counts) >= 15, counts  # equal servers share the load (20 each when perfectly even)
    assert [r["served"] for r in pool.report()] == counts
    assert _max_overlap(logs) == 6  # the role's cap holds over all endpoints together, and is used
    assert dict(pool.stats) == {} and pool.failovers == 0


async def test_dead_endpoint_is_taken_out_and_requests_fail_over(servers):
    live = servers[0]
    dead = _dead_url()
    pool = _pool([dead, live.base_url], max_in_flight=4, fail_threshold=2, cooldown=30)
    outs = await asyncio.gather(*(pool.generate(_req(i)) for i in range(40)))
    await pool.aclose()
    dead_report, live_report = pool.report()
    assert all(o.text == REPLY_TEXT for o in outs)
    assert live_report["served"] == 40 == len(live.log()["log"])
    assert not dead_report["healthy"] and dead_report["times_down"] == 1
    # only the attempts made before it crossed the threshold (the first picks run concurrently)
    assert 2 <= dead_report["attempts"] <= 4
    assert dead_report["served"] == 0 and dead_report["faults"] == {"connection": dead_report["attempts"]}
    assert pool.failovers == dead_report["attempts"]
    assert pool.stats == {"connection": dead_report["attempts"], "retries": dead_report["attempts"]}


async def test_faults_and_retries_reach_the_role_accounting(servers):
    live = servers[0]
    client = LLMClient("target", _pool([_dead_url(), live.base_url], fail_threshold=2, cooldown=30),
                       max_concurrency=4)
    outs = await asyncio.gather(*(client.generate(chat(None, f"q{i}")) for i in range(12)))
    await client.backend.aclose()
    dead_attempts = client.backend.report()[0]["attempts"]
    stats = client.accounting.roles["target"]
    assert all(o.text == REPLY_TEXT for [o] in outs) and stats.calls == 12
    assert dead_attempts >= 2
    assert dict(stats.faults) == {"connection": dead_attempts} and stats.retries == dead_attempts


async def test_failing_endpoint_cools_down_then_serves_again(servers):
    a, b = servers[0], servers[1]
    b.storm(after=0, seconds=1.0, status=503)  # b answers 503 to everything for one second
    pool = _pool([a.base_url, b.base_url], max_in_flight=2, fail_threshold=2, cooldown=0.3)
    first = await asyncio.gather(*(pool.generate(_req(i)) for i in range(20)))
    during = pool.report()[1]
    await asyncio.sleep(1.2)  # the storm is over and the cool-down has passed
    second = await asyncio.gather(*(pool.generate(_req(100 + i)) for i in range(20)))
    await pool.aclose()
    after = pool.report()[1]
    assert all(o.text == REPLY_TEXT for o in first + second)
    assert during["served"] == 0 and during["failures"] >= 2 and during["times_down"] >= 1
    assert during["faults"] == {"server_error": during["failures"]}
    assert after["healthy"] and after["served"] >= 5  # the trial succeeded and b took load again
    statuses = [e[3] for e in b.log()["log"]]
    assert statuses.count(503) == after["failures"] and statuses.count(200) == after["served"]


async def test_no_endpoint_answers_names_every_endpoint(servers):
    a = servers[0]
    a.configure(faults=[{"kind": "status", "status": 503, "message": f"bad key {SECRET}"}] * 20)
    dead = _dead_url()
    pool = _pool([dead, a.base_url], max_retries=2, fail_threshold=10)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        await pool.generate(_req())
    elapsed = time.monotonic() - t0
    await pool.aclose()
    msg = str(err.value)
    assert "every endpoint" in msg and "after 6 attempts" in msg  # (max_retries + 1) x 2 endpoints
    assert dead in msg and a.base_url in msg and "HTTP 503" in msg and "connection" in msg
    assert "\n" not in msg and SECRET not in msg and SECRET not in repr(pool)
    assert len(a.log()["log"]) == 3 and elapsed < 5


async def test_client_error_is_raised_without_failover(servers):
    a, b = servers[0], servers[1]
    a.configure(faults=[{"kind": "status", "status": 400, "message": "bad request"}])
    pool = _pool([a.base_url, b.base_url], max_in_flight=1)
    with pytest.raises(BackendError) as err:
        await pool.generate(_req())  # the first pick is the first endpoint
    await pool.aclose()
    assert "HTTP 400" in str(err.value)
    assert len(a.log()["log"]) == 1 and len(b.log()["log"]) == 0  # another endpoint would say the same
    assert pool.report()[0]["healthy"]


async def test_rate_limited_endpoint_is_avoided_until_retry_after(servers):
    a, b = servers[0], servers[1]
    a.configure(faults=[{"kind": "status", "status": 429, "retry_after": 5}])
    pool = _pool([a.base_url, b.base_url], max_in_flight=1)
    t0 = time.monotonic()
    outs = [await pool.generate(_req(i)) for i in range(6)]
    elapsed = time.monotonic() - t0
    await pool.aclose()
    assert all(o.text == REPLY_TEXT for o in outs)
    assert elapsed < 2  # moved to b at once instead of waiting 5 s for a
    assert [e[3] for e in a.log()["log"]] == [429]  # a got nothing more within its Retry-After
    assert len(b.log()["log"]) == 6
    assert pool.report()[0]["healthy"]  # a 429 is not a sign of a broken endpoint


async def test_cache_key_does_not_depend_on_the_endpoint(servers, tmp_path):
    a, b, c = servers
    cache = CallCache(tmp_path / "calls.sqlite")
    first = LLMClient("target", _pool([a.base_url, b.base_url]), cache=cache)
    texts = [await first.generate(chat("Be brief.", f"q{i}")) for i in range(8)]
    await first.backend.aclose()
    assert len(a.log()["log"]) + len(b.log()["log"]) == 8

    # other endpoints, other order, one of them dead: every call is a cache hit, nothing is sent
    second = LLMClient("target", _pool([_dead_url(), c.base_url, a.base_url]), cache=cache)
    again = [await second.generate(chat("Be brief.", f"q{i}")) for i in range(8)]
    await second.backend.aclose()
    cache.close()
    assert [t[0].text for t in again] == [t[0].text for t in texts]
    assert second.accounting.roles["target"].cache_hits == 8
    assert len(c.log()["log"]) == 0 and len(a.log()["log"]) + len(b.log()["log"]) == 8
    assert first.backend.identity() == second.backend.identity()
    assert "base_url" not in first.backend.identity()


def test_runtime_builds_a_pool_only_when_endpoints_are_listed():
    pooled = make_backend(RoleConfig(backend="openai", model="m", base_url="http://h1:8000/v1",
                                     endpoints=["http://h2:8000/v1", "http://h1:8000/v1/"]))
    single = make_backend(RoleConfig(backend="openai", model="m", base_url="http://h1:8000/v1"))
    assert isinstance(pooled, EndpointPool) and isinstance(single, OpenAIBackend)
    assert [r["url"] for r in pooled.report()] == ["http://h1:8000/v1", "http://h2:8000/v1"]  # deduplicated
    assert pooled.kind == "openai" and pooled.model == "m"


async def test_each_endpoint_gets_its_own_key_or_the_roles(servers, monkeypatch, tmp_path):
    """A pool over two providers: an endpoint with a key source of its own sends that key, a plain
    URL the role's; neither key shows in the pool's repr, report or the role's config dump."""
    a, b, c = servers
    key_b = tmp_path / "key-b"
    key_b.write_text("sk-provider-B-7fQ2\n")
    monkeypatch.setenv("POOL_KEY_A", SECRET)
    cfg = RoleConfig(backend="openai", model="delay-model", base_url=a.base_url, api_key_env="POOL_KEY_A",
                     endpoints=[{"url": b.base_url, "api_key_file": str(key_b)}, c.base_url])
    pool = make_backend(cfg)
    assert isinstance(pool, EndpointPool)
    await asyncio.gather(*(pool.generate(_req(i)) for i in range(12)))
    sent = {s.base_url: set(s.stats()["auth_headers"]) for s in (a, b, c)}
    assert sent == {a.base_url: {f"Bearer {SECRET}"}, b.base_url: {"Bearer sk-provider-B-7fQ2"},
                    c.base_url: {f"Bearer {SECRET}"}}
    shown = repr(pool) + str(pool.report()) + cfg.model_dump_json()
    assert SECRET not in shown and "sk-provider-B" not in shown
    with pytest.raises(ValueError, match="'api_key' is not allowed in a config"):
        RoleConfig(backend="openai", model="m", base_url=a.base_url,
                   endpoints=[{"url": b.base_url, "api_key": "sk-inline"}])
    monkeypatch.delenv("POOL_KEY_A")
    with pytest.raises(ConfigError, match="POOL_KEY_A"):
        make_backend(cfg)


def test_credentials_in_a_url_are_not_reported():
    pool = EndpointPool(["http://user:pw-Secret9@h1:8000/v1"], "m")
    assert "pw-Secret9" not in repr(pool) and "pw-Secret9" not in str(pool.report())


# ---------------------------------------------------------------------------------------------
# two real llama.cpp servers serving SmolLM2, one killed mid-run
# ---------------------------------------------------------------------------------------------

PROMPTS = [f"Name one {thing}. Answer in three words." for thing in
           ("fruit", "colour", "animal", "city", "tool", "planet")]


@pytest.mark.server
@pytest.mark.slow
async def test_real_servers_failover_when_one_is_killed(smollm2_path):
    from support.llama_server import llama_server

    args = ["--verbose", "False"]
    with llama_server(smollm2_path, n_ctx=512, n_threads=1, extra_args=args) as s1, \
            llama_server(smollm2_path, n_ctx=512, n_threads=1, extra_args=args) as s2:
        dead = _dead_url()
        # the dead port comes first, so the likelihood probe has to skip it
        pool = EndpointPool([dead, s1.base_url, s2.base_url], s1.model, None, max_in_flight=4,
                            timeout=60, fail_threshold=2, cooldown=60, backoff_base=0.05, likelihood="auto")

        scored = await pool.loglikelihood(
            [LikelihoodRequest(chat(None, p), "An apple.") for p in PROMPTS[:2]])
        assert pool.capabilities.continuation_logprobs and pool.report()[0]["failures"] >= 1
        assert all(lk.n_tokens >= 2 and all(v <= 0 for v in lk.token_logprobs) for lk in scored)

        requests = [GenerateRequest(chat(None, PROMPTS[i % 4]), temperature=0.0, max_tokens=6)
                    for i in range(12)]
        served_before = pool.report()[1]["served"]
        run = asyncio.ensure_future(asyncio.gather(*(pool.generate(r) for r in requests)))
        while pool.report()[1]["served"] < served_before + 2 and not run.done():
            await asyncio.sleep(0.02)
        os.kill(s1.pid, signal.SIGKILL)  # mid-run: requests are in flight on it
        outs = await run
        report = pool.report()
        await pool.aclose()

    print("\nper endpoint:", [(r["url"], r["served"], r["failures"], r["healthy"]) for r in report])
    assert len(outs) == 12 and all(o.text.strip() for o in outs)
    # Not asserted: that a prompt gets the same greedy text from either server. llama.cpp reuses the
    # KV prefix of a server's previous request, and on some CPUs (seen on an AMD EPYC build) that
    # moves near-tied logits enough to change a greedy token, so two replicas can differ. The cache
    # identity still leaves the endpoint out: replicas serve the same weights, and a cached answer is
    # one valid answer of that model (docs/RELIABILITY.md, known limits).
    dead_r, killed, survivor = report
    assert not dead_r["healthy"] and dead_r["served"] == 0
    assert not killed["healthy"] and killed["served"] >= served_before + 2 and killed["failures"] >= 1
    assert survivor["healthy"] and survivor["failures"] == 0 and survivor["served"] >= 1
    # every generation and likelihood call was answered exactly once
    assert killed["served"] + survivor["served"] == 12 + 2

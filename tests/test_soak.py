"""Soak: thousands of requests through the OpenAI-compatible backend against a local server.

The server (``support.load_server``, the delay server plus a request log and timed status storms)
runs in its own process so it does not share the client's GIL. Requests go through ``LLMClient`` over
``OpenAIBackend``, the way a run sends them (no cache, so every call reaches the server). Checked:

- the in-flight cap holds over 3000 requests, measured at the server (it counts open requests);
- memory stays flat: resident set size after a warm-up batch vs after each later batch;
- a 429 storm with ``Retry-After``: no request is retried before the server's ``Retry-After`` has
  passed, the request rate drops during the storm, and every request completes afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

from picaco.llm.base import chat
from picaco.llm.client import LLMClient
from picaco.llm.openai_backend import OpenAIBackend
from support.delay_server import REPLY_TEXT
from support.load_server import start_in_process

pytestmark = pytest.mark.slow

CAP = 32
DELAY = 0.02  # server-side seconds per answer; small so the run is bounded by the client
BATCH = 500
BATCHES = 6  # 1 warm-up + 5 measured: 3000 requests
#: growth of the resident set allowed after warm-up (measured: +0.2 MB). Every request allocates a
#: few KB (response, JSON, completion); keeping even 1.6 KB per request over 2500 requests exceeds it.
RSS_GROWTH_BOUND_MB = 4.0


@pytest.fixture(scope="module")
def server():
    with start_in_process(delay=DELAY) as srv:
        yield srv


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _client(server, **kw) -> LLMClient:
    backend = OpenAIBackend(server.base_url, "delay-model", "soak-key", max_in_flight=CAP, timeout=30, **kw)
    return LLMClient("target", backend, max_concurrency=CAP)


async def _batch(client: LLMClient, start: int, n: int) -> int:
    outs = await asyncio.gather(
        *(client.generate(chat("You are terse.", f"req-{i}"), max_tokens=4, temperature=0.0)
          for i in range(start, start + n))
    )
    return sum(1 for [o] in outs if o.text == REPLY_TEXT)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
async def test_soak_cap_and_flat_memory(server):
    server.configure(reset=True, delay=DELAY)
    client = _client(server)
    t0 = time.monotonic()
    ok = await _batch(client, 0, BATCH)
    gc.collect()
    rss = [_rss_mb()]
    for b in range(1, BATCHES):
        ok += await _batch(client, b * BATCH, BATCH)
        gc.collect()
        rss.append(_rss_mb())
    elapsed = time.monotonic() - t0
    await client.backend.aclose()

    total = BATCH * BATCHES
    log = server.log()
    growth = max(rss[1:]) - rss[0]
    print(f"\nsoak: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s), cap {CAP}, "
          f"server peak open {log['max_open']}, RSS after warm-up {rss[0]:.1f} MB, "
          f"max growth {growth:+.2f} MB, per batch {[round(r - rss[0], 2) for r in rss]}")
    assert ok == total
    assert len(log["log"]) == total  # one HTTP request per call: no retries on a healthy server
    assert log["max_open"] <= CAP
    assert log["max_open"] >= CAP // 2  # the cap was actually exercised, not just respected
    assert client.backend.transport.peak_in_flight <= CAP
    assert growth < RSS_GROWTH_BOUND_MB, rss
    assert dict(client.backend.stats) == {}


STORM_AFTER = 600  # requests served before the storm starts
STORM_SECONDS = 2.0
RETRY_AFTER = 1  # seconds, as the server's Retry-After header says
STORM_TOTAL = 1500


async def test_429_storm_backs_off_then_completes(server):
    server.configure(reset=True, delay=DELAY)
    server.storm(after=STORM_AFTER, seconds=STORM_SECONDS, status=429, retry_after=RETRY_AFTER)
    client = _client(server, max_retries=8)
    t0 = time.monotonic()
    ok = await _batch(client, 0, STORM_TOTAL)
    elapsed = time.monotonic() - t0
    await client.backend.aclose()

    log = server.log()["log"]
    limited = [e for e in log if e[3] == 429]
    storm_start = min(e[0] for e in limited)
    before = [e for e in log if e[0] < storm_start]
    pre_rate = len(before) / (storm_start - before[0][0])
    storm_rate = len(limited) / STORM_SECONDS  # the server answers 429 for exactly this long

    # for every request that got a 429, its next attempt came at least Retry-After later
    last: dict[str, list] = {}
    early = []
    gaps = []
    for entry in sorted(log, key=lambda e: e[0]):
        prev = last.get(entry[2])
        if prev is not None and prev[3] == 429:
            gap = entry[0] - prev[1]
            gaps.append(gap)
            if gap < RETRY_AFTER:
                early.append((entry[2], gap))
        last[entry[2]] = entry

    print(f"\n429 storm: {STORM_TOTAL} requests in {elapsed:.1f} s, {len(limited)} answered 429 over "
          f"{STORM_SECONDS} s; rate before {pre_rate:.0f} req/s, during {storm_rate:.0f} req/s; "
          f"retry gap after a 429 min {min(gaps):.3f} s (Retry-After {RETRY_AFTER} s); "
          f"server peak open {server.log()['max_open']}")
    assert ok == STORM_TOTAL  # everything completed after the storm
    assert len(limited) >= CAP  # the storm really hit the requests in flight
    assert not early, early[:5]
    assert storm_rate < pre_rate / 2
    # At most CAP calls are outstanding (the client's slot is held while it waits), and each is
    # rejected at most once per Retry-After: once when the storm starts, then once per interval.
    assert len(limited) <= CAP * (STORM_SECONDS / RETRY_AFTER + 1)
    assert client.backend.stats["rate_limited"] == len(limited)
    assert client.accounting.roles["target"].retries == len(limited)
    assert len(log) == STORM_TOTAL + len(limited)

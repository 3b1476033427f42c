"""Transport benchmark for the OpenAI-compatible backend.

N chat requests go through ``OpenAIBackend`` to the scripted delay server (tests/support/delay_server.py,
run as a separate process so it does not share the client's GIL), which answers each one after a fixed
delay. With a cap of C requests in flight the ideal wall time is ceil(N / C) * delay; the ratio
measured / ideal shows what the client side (SDK, semaphore, connection pool, event loop) adds.
Each configuration runs ``--repeats`` times with a fresh backend (so connection setup is included;
constructing the backend is not); the median is reported.

    PYTHONPATH=. .venv/bin/python bench/bench_openai.py --write bench/RESULTS_openai.md

With ``--pool K [K ...]`` the same requests go through ``EndpointPool`` over K delay servers (each its own
process); ``--write-pool FILE`` puts that table into FILE's "Endpoint pool" section (replacing an
earlier one, leaving the rest of the file alone):

    PYTHONPATH=. .venv/bin/python bench/bench_openai.py --pool 2 3 --caps 16 64 128 --write-pool bench/RESULTS_openai.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import openai  # noqa: E402

from picaco.llm.base import GenerateRequest, chat  # noqa: E402
from picaco.llm.endpoint_pool import EndpointPool  # noqa: E402
from picaco.llm.openai_backend import OpenAIBackend  # noqa: E402
from support.delay_server import start_in_process  # noqa: E402
from support.load_server import start_in_process as start_load_server  # noqa: E402


async def one_run(base_url: str, n: int, in_flight: int) -> tuple[float, int, int]:
    # construction (SSL context, client objects) is one-off and stays outside the clock;
    # connection setup happens on first use and is measured
    backend = OpenAIBackend(base_url, "delay-model", "bench-key", max_in_flight=in_flight, timeout=30)
    request = GenerateRequest(chat("You are terse.", "ping"), temperature=0.0, max_tokens=4)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = await asyncio.gather(*(backend.generate(request) for _ in range(n)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await backend.aclose()
    assert len(outs) == n and all(o.text for o in outs)
    return elapsed, cpu, sum(backend.stats.values())


def bench(n: int, delay: float, caps: list[int], repeats: int) -> list[dict]:
    rows = []
    with start_in_process(delay=delay) as server:
        for cap in caps:
            times, cpus, server_peaks, faults = [], [], [], 0
            for _ in range(repeats):
                server.configure(reset=True, delay=delay)
                elapsed, cpu, f = asyncio.run(one_run(server.base_url, n, cap))
                times.append(elapsed)
                cpus.append(cpu)
                server_peaks.append(server.stats()["max_in_flight"])
                faults += f
            ideal = math.ceil(n / cap) * delay
            med = statistics.median(times)
            rows.append({
                "in_flight": cap, "n": n, "delay": delay, "ideal_s": ideal, "median_s": med,
                "min_s": min(times), "max_s": max(times), "ratio": med / ideal,
                "req_per_s": n / med, "ideal_req_per_s": n / ideal,
                "server_peak": max(server_peaks), "faults": faults,
                "cpu_ms_per_req": 1000 * statistics.median(cpus) / n,
            })
    return rows


async def one_pool_run(base_urls: list[str], n: int, in_flight: int) -> tuple[float, float, list[int]]:
    pool = EndpointPool(base_urls, "delay-model", "bench-key", max_in_flight=in_flight, timeout=30)
    request = GenerateRequest(chat("You are terse.", "ping"), temperature=0.0, max_tokens=4)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = await asyncio.gather(*(pool.generate(request) for _ in range(n)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    await pool.aclose()
    assert len(outs) == n and all(o.text for o in outs) and not pool.stats
    return elapsed, cpu, [r["served"] for r in pool.report()]


def _merged_peak(logs: list[list]) -> int:
    """Most requests open at once over all servers (their logs share the monotonic clock)."""
    events = sorted([(e[0], 1) for log in logs for e in log] + [(e[1], -1) for log in logs for e in log])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def bench_pool(n: int, delay: float, caps: list[int], repeats: int, k: int) -> list[dict]:
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_load_server(delay=delay)) for _ in range(k)]
        for cap in caps:
            times, cpus, peaks, spread = [], [], [], []
            for _ in range(repeats):
                for s in servers:
                    s.configure(reset=True, delay=delay)
                elapsed, cpu, served = asyncio.run(one_pool_run([s.base_url for s in servers], n, cap))
                times.append(elapsed)
                cpus.append(cpu)
                peaks.append(_merged_peak([s.log()["log"] for s in servers]))
                spread = served
            ideal = math.ceil(n / cap) * delay
            med = statistics.median(times)
            rows.append({
                "in_flight": cap, "n": n, "delay": delay, "ideal_s": ideal, "median_s": med,
                "min_s": min(times), "max_s": max(times), "ratio": med / ideal,
                "req_per_s": n / med, "ideal_req_per_s": n / ideal, "server_peak": max(peaks),
                "cpu_ms_per_req": 1000 * statistics.median(cpus) / n, "spread": spread, "endpoints": k,
            })
    return rows


def pool_table(rows: list[dict]) -> str:
    lines = [
        "| endpoints | in flight | requests | ideal (s) | measured median (s) [min-max] | req/s (ideal) "
        "| client CPU per request (ms) | peak open over all servers | requests per endpoint (last run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['endpoints']} | {r['in_flight']} | {r['n']} | {r['ideal_s']:.2f} | "
            f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}] | "
            f"{r['req_per_s']:.0f} ({r['ideal_req_per_s']:.0f}) | {r['cpu_ms_per_req']:.2f} | {r['server_peak']} | "
            f"{' / '.join(map(str, r['spread']))} |"
        )
    return "\n".join(lines)


_POOL_BEGIN, _POOL_END = "<!-- endpoint-pool:begin -->", "<!-- endpoint-pool:end -->"


def write_pool_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    section = f"{_POOL_BEGIN}\n{body.strip()}\n{_POOL_END}\n"
    if _POOL_BEGIN in text and _POOL_END in text:
        head, rest = text.split(_POOL_BEGIN, 1)
        text = head + section + rest.split(_POOL_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def table(rows: list[dict]) -> str:
    lines = [
        "| in flight | requests | delay (s) | ideal (s) | measured median (s) [min-max] | measured / ideal "
        "| req/s (ideal) | client CPU per request (ms) | peak seen by server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['in_flight']} | {r['n']} | {r['delay']} | {r['ideal_s']:.2f} | "
            f"{r['median_s']:.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}] | {r['ratio']:.3f} | "
            f"{r['req_per_s']:.0f} ({r['ideal_req_per_s']:.0f}) | {r['cpu_ms_per_req']:.2f} | {r['server_peak']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--delay", type=float, default=0.25)
    ap.add_argument("--caps", type=int, nargs="+", default=[64, 16, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, help="write a markdown report here")
    ap.add_argument("--pool", type=int, nargs="+", default=[],
                    help="spread over this many delay servers with EndpointPool (several counts: one run each)")
    ap.add_argument("--write-pool", type=Path, help="put the pool table into this file's pool section")
    args = ap.parse_args()

    if args.pool:
        load_start = os.getloadavg()[0]
        rows = [row for k in args.pool for row in bench_pool(args.n, args.delay, args.caps, args.repeats, k)]
        report = pool_table(rows)
        print(report)
        if args.write_pool:
            load_end = os.getloadavg()[0]
            write_pool_section(args.write_pool, (
                "## Endpoint pool\n\n"
                f"Command: `PYTHONPATH=. .venv/bin/python bench/bench_openai.py --pool {' '.join(map(str, args.pool))} --n {args.n} "
                f"--delay {args.delay} --caps {' '.join(map(str, args.caps))} --repeats {args.repeats} "
                f"--write-pool {args.write_pool}`\n\n"
                f"The same {args.n} requests through `EndpointPool` over {' or '.join(map(str, args.pool))} delay servers (each its own "
                f"process, {args.delay} s per answer); the cap is the pool's, over all endpoints together. "
                "'peak open over all servers' merges the servers' request logs on the shared monotonic clock. "
                f"Median of {args.repeats} runs.\n\n{report}\n\n"
                f"Machine: {os.cpu_count()} CPUs, 1-minute load average {load_start:.1f} before and "
                f"{load_end:.1f} after the run, Python {platform.python_version()}, openai {openai.__version__}.\n"
            ))
        return

    load_start = os.getloadavg()[0]
    rows = bench(args.n, args.delay, args.caps, args.repeats)
    report = table(rows)
    print(report)
    target = next((r for r in rows if r["in_flight"] == 64), None)
    verdict = ""
    if target is not None:
        ok = target["ratio"] <= 1.5
        verdict = f"\n64 in flight: measured/ideal = {target['ratio']:.3f} (target <= 1.5: {'met' if ok else 'NOT met'})"
        print(verdict.strip())
    if args.write:
        load_end = os.getloadavg()[0]
        args.write.write_text(
            "# OpenAI-compatible backend: transport benchmark\n\n"
            f"Command: `PYTHONPATH=. .venv/bin/python bench/bench_openai.py --n {args.n} --delay {args.delay} "
            f"--caps {' '.join(map(str, args.caps))} --repeats {args.repeats} --write {args.write}`\n\n"
            f"{args.n} chat requests through `OpenAIBackend.generate` to `tests/support/delay_server.py` "
            f"(its own process, answering each request after {args.delay} s). Ideal wall time = "
            f"ceil(requests / in flight) x delay. Median of {args.repeats} runs, each with a fresh backend "
            "(connection setup included, backend construction not). 'peak seen by server' is the most requests the server ever had "
            "open at once, which must not exceed the cap. 'client CPU per request' is the benchmark process's "
            "CPU time (SDK, HTTP pool, event loop, this backend) divided by the requests: the client's own "
            "cost, independent of other load on the machine.\n\n"
            f"{report}\n{verdict}\n\n"
            f"Machine: {os.cpu_count()} CPUs, 1-minute load average {load_start:.1f} before and {load_end:.1f} "
            f"after the run (the machine is shared with other work), Python {platform.python_version()}, "
            f"openai {openai.__version__}.\n"
        )


if __name__ == "__main__":
    main()

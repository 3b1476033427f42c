"""Faulty endpoints: `picaco optimize` and `picaco evaluate` against a real llama.cpp server (SmolLM2)
behind a proxy that injects faults on a fixed schedule (tests/support/fault_proxy.py).

Target, optimizer and LLM judge all use the openai backend through the proxy, one request in flight,
so the schedule hits the same requests on every test run. Shown:

1. with 429 (Retry-After), 500, 503, timeouts, connection resets, truncated JSON, invalid JSON and
   empty `choices` injected, the run completes with the same instruction and scores as a fault-free
   run with the same seed;
2. no upstream answer is paid for twice: the accounting's calls equal the answers the proxy passed
   back intact, and a rerun on the same cache sends nothing upstream;
3. every injected fault appears in accounting.json under its kind (and judge answers without a
   rating as the judge role's `no_rating` / `unscored`);
4. a fault that outlasts the retry budget stops the command with exit 3 and one line on stderr,
   and once the endpoint heals the same command finishes with the fault-free result.

The CLI runs in subprocesses (exit codes and stderr are part of what is tested); each run gets its
own call cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from support.fault_proxy import Rule


ROOT = Path(__file__).parents[1]
#: proxy fault label -> the fault kind the openai backend counts it as
BACKEND_KIND = {
    "status_429": "rate_limited", "status_500": "server_error", "status_503": "server_error",
    "timeout": "timeout", "reset": "connection",
    "truncate": "malformed", "invalid_json": "malformed", "empty_choices": "malformed",
}
#: every 2nd chat request is faulted, cycling through eight kinds (one timeout per 16 requests)
CYCLE = [
    Rule("status", status=429, retry_after=1), Rule("status", status=500), Rule("status", status=503),
    Rule("reset"), Rule("truncate"), Rule("invalid_json"), Rule("empty_choices"), Rule("timeout"),
]
FAULT_SCHEDULE = [
    Rule(r.kind, every=2 * len(CYCLE), phase=2 * (i + 1), status=r.status, retry_after=r.retry_after)
    for i, r in enumerate(CYCLE)
]
# the tiny preset cut to one round on one value: ~15 model calls
OPTIMIZE_SETS = ["optimize.rounds=1", "optimize.candidates=1"]


@pytest.fixture(scope="module")
def stack(smollm2_path):
    from support.fault_proxy import start_proxy
    from support.llama_server import llama_server

    with llama_server(smollm2_path, n_ctx=2048, extra_args=["--verbose", "False"]) as srv:
        with start_proxy(srv.base_url.removesuffix("/v1")) as proxy:
            yield srv, proxy


@pytest.fixture(scope="module")
def judge_model():
    """Qwen2.5-Coder-0.5B: the smallest model here that answers the judge with a rating (SmolLM2
    nearly never does, which would leave every score empty and the comparison of scores vacuous)."""
    from picaco.llm import registry

    return registry.pull("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def rating_stack(smollm2_path, judge_model):
    """SmolLM2 as target and optimizer, Qwen 0.5B as judge, both behind one proxy (routed by model)."""
    from support.fault_proxy import start_proxy
    from support.llama_server import llama_server

    args = ["--verbose", "False"]
    with llama_server(smollm2_path, n_ctx=2048, extra_args=args) as small, \
            llama_server(judge_model, n_ctx=2048, extra_args=args) as judge:
        routes = {small.model: small.base_url.removesuffix("/v1"), judge.model: judge.base_url.removesuffix("/v1")}
        # isolate: llama-cpp-python reuses the previous request's KV prefix, so without it an answer
        # also depends on which request came before (see tests/support/fault_proxy.py)
        with start_proxy(routes, isolate=True) as proxy:
            yield small, judge, proxy


# The client timeout must stay above the slowest honest answer (a judge prompt of ~500 tokens on a
# loaded 2-core machine took over 20 s); each injected timeout costs this much.
def _config(tmp: Path, proxy, model: str, *, judge_model: str | None = None, timeout: float = 45,
            max_retries: int = 4) -> Path:
    (tmp / "values.yaml").write_text(yaml.safe_dump(
        {"name": "faults-1", "family": "hh", "extends": "helpfulness-4", "values": ["relevance"]}))
    role = {"backend": "openai", "base_url": proxy.base_url, "model": model, "max_in_flight": 1,
            "timeout": timeout, "max_retries": max_retries}
    cfg = {"values": str(tmp / "values.yaml"), "preset": "tiny", "target": role, "optimizer": role,
           "judge": {**role, "type": "llm", "model": judge_model or model}}
    if judge_model:  # its own backend: a 0.5B judge reading ~500 tokens is slow on a loaded machine
        cfg["judge"]["timeout"] = max(timeout, 90)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _picaco(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PICACO_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "picaco.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def _optimize(config: Path, run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    sets = [a for s in OPTIMIZE_SETS for a in ("--set", s)]
    return _picaco(["optimize", "-c", str(config), "-o", str(run_dir), "--quiet", *sets], cache)


def _evaluate(config: Path, out: Path, cache: Path, n_queries: int = 2) -> subprocess.CompletedProcess:
    return _picaco(["evaluate", "-c", str(config), "-m", "Q", "--n-queries", str(n_queries), "-o", str(out),
                    "--json"], cache)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _result(run_dir: Path) -> dict:
    r = json.loads((run_dir / "result.json").read_text())
    return {k: r[k] for k in ("instruction", "scores_seed", "scores_final", "objective_seed",
                              "objective_final", "selected_round", "mode")}


def _responses(run_dir: Path) -> dict[str, tuple]:
    rows = (json.loads(line) for line in (run_dir / "responses.jsonl").read_text().splitlines())
    return {r["key"]: (r["text"], r["scores"]) for r in rows}


def _accounting(run_dir: Path) -> dict:
    return json.loads((run_dir / "accounting.json").read_text())


def _expected_faults(injected: dict, client_gone: int = 0) -> Counter:
    out: Counter = Counter()
    for label, n in injected.items():
        out[BACKEND_KIND[label]] += n
    out["timeout"] += client_gone  # a client timeout the proxy did not inject is a fault all the same
    return +out


JUDGE_KINDS = ("no_rating", "unscored")  # answers the judge could not read: the model's, not the wire's


def _faults(acc: dict, role: str = "total", *, judge: bool = False) -> Counter:
    return Counter({k: v for k, v in acc[role]["faults"].items() if (k in JUDGE_KINDS) == judge})


@pytest.mark.server
@pytest.mark.slow
def test_optimize_under_faults_matches_the_fault_free_run(rating_stack, tmp_path):
    srv, judge, proxy = rating_stack
    config = _config(tmp_path, proxy, srv.model, judge_model=judge.model)

    proxy.heal()
    proxy.reset()
    _ok(_optimize(config, tmp_path / "clean", tmp_path / "cache-clean"))
    clean = proxy.snapshot()

    proxy.set_rules(FAULT_SCHEDULE)
    proxy.reset()
    _ok(_optimize(config, tmp_path / "faulty", tmp_path / "cache-faulty"))
    faulty = proxy.snapshot()
    (tmp_path / "proxy-faulty.json").write_text(json.dumps(faulty))
    acc = _accounting(tmp_path / "faulty")

    # every fault kind was met, and the run computed exactly what the fault-free run computed
    assert set(faulty["injected"]) == set(BACKEND_KIND), faulty["injected"]
    assert _result(tmp_path / "faulty") == _result(tmp_path / "clean")
    assert any(v is not None for v in _result(tmp_path / "clean")["scores_seed"].values())
    assert _responses(tmp_path / "faulty") == _responses(tmp_path / "clean")
    # each injected fault is counted once under its kind, each answer paid for once; a judge answer
    # without a rating (the model's own doing) is counted alike in both runs
    assert _faults(acc) == _expected_faults(faulty["injected"], faulty["client_gone"])
    assert _faults(acc, judge=True) == _faults(_accounting(tmp_path / "clean"), judge=True)
    assert acc["total"]["retries"] == sum(faulty["injected"].values()) + faulty["client_gone"]
    assert acc["total"]["calls"] == faulty["delivered_total"] == clean["delivered_total"]
    assert _accounting(tmp_path / "clean")["total"]["calls"] == clean["delivered_total"]

    # the same command on the same cache, into a new run directory: nothing reaches the server
    proxy.heal()
    proxy.reset()
    _ok(_optimize(config, tmp_path / "replay", tmp_path / "cache-faulty"))
    replay = _accounting(tmp_path / "replay")["total"]
    # only the capability probe reaches the server (one tiny likelihood request per process start,
    # counted as a call); every piece of paid work comes from the cache
    received = proxy.snapshot()["received"]
    assert set(received) <= {"/v1/completions"} and sum(received.values()) == replay["calls"] <= 1
    assert replay["cache_hits"] == acc["total"]["calls"] - replay["calls"]
    assert _result(tmp_path / "replay") == _result(tmp_path / "clean")
    _report("optimize", faulty, acc, rows=len(_responses(tmp_path / "faulty")))


@pytest.mark.server
@pytest.mark.slow
def test_persistent_fault_stops_cleanly_and_the_same_command_resumes(stack, tmp_path):
    srv, proxy = stack
    config = _config(tmp_path, proxy, srv.model, max_retries=2)

    proxy.heal()
    proxy.reset()
    _ok(_evaluate(config, tmp_path / "clean", tmp_path / "cache-clean"))
    clean = proxy.snapshot()

    # from the 3rd chat request on, every one gets a 503: the first judge call exhausts its retries
    proxy.set_rules([Rule("status", every=1, start=3, status=503)])
    proxy.reset()
    failed = _evaluate(config, tmp_path / "eval", tmp_path / "cache")
    broken = proxy.snapshot()
    assert failed.returncode == 3, failed.stderr[-3000:]
    # --json: progress events are JSON lines on stderr; besides them, one error line
    lines = [line for line in failed.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr[-3000:]
    assert "after 3 attempts" in lines[0] and "HTTP 503" in lines[0] and "Traceback" not in failed.stderr
    assert (tmp_path / "eval").is_dir()

    proxy.heal()
    proxy.reset()
    _ok(_evaluate(config, tmp_path / "eval", tmp_path / "cache"))
    healed = proxy.snapshot()
    # the answers that got through before the failure were not bought again
    assert broken["delivered_total"] + healed["delivered_total"] == clean["delivered_total"]
    assert _summary(tmp_path / "eval") == _summary(tmp_path / "clean")
    assert _samples(tmp_path / "eval") == _samples(tmp_path / "clean")
    _report("persistent_503", broken, None, exit_code=failed.returncode, message=lines[0],
            healed_delivered=healed["delivered_total"], clean_delivered=clean["delivered_total"])


@pytest.mark.server
@pytest.mark.slow
def test_judge_answers_without_a_rating_are_retried_and_counted(stack, tmp_path):
    srv, proxy = stack
    config = _config(tmp_path, proxy, srv.model)

    # one item, and every answer to it loses its rating: the judge asks three times (its retry
    # budget), then leaves the value unscored; all of it is counted, and the run completes
    proxy.set_rules([Rule("no_rating", every=1, judge_only=True)])
    proxy.reset()
    _ok(_evaluate(config, tmp_path / "eval", tmp_path / "cache", n_queries=1))
    snap = proxy.snapshot()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    judge = Counter(summary["accounting"]["total"]["faults"])  # only the judge role has these kinds
    assert snap["injected"] == {"no_rating": 3}
    assert judge["no_rating"] == 3
    unscored = sum(m["unscored"]["total"] for m in summary["methods"].values())
    assert judge["unscored"] == unscored == 1
    _report("no_rating", snap, summary["accounting"], unscored=unscored)


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {name: {k: v for k, v in m.items() if k != "calls_per_query"} for name, m in s["methods"].items()}


def _samples(out: Path) -> list[str]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    return sorted(json.dumps({k: v for k, v in r.items() if k not in ("time", "seconds")}, sort_keys=True)
                  for r in rows)


def _report(name: str, snap: dict, acc: dict | None, **extra) -> None:
    """Numbers for docs/RELIABILITY.md, appended where PICACO_FAULT_REPORT points (if set)."""
    path = os.environ.get("PICACO_FAULT_REPORT")
    if not path:
        return
    row = {"test": name, "injected": snap["injected"], "delivered": snap["delivered_total"],
           "client_gone": snap["client_gone"], "received": snap["received"], **extra}
    if acc is not None:
        row["accounting"] = acc.get("total", acc)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.mark.server
@pytest.mark.slow
async def test_likelihood_probe_is_not_decided_by_transient_faults(stack):
    """A probe that meets a garbled answer retries it; one that cannot reach the server decides
    nothing (a later call probes again) and the call fails as a failing endpoint, not as a
    missing capability."""
    from picaco.errors import BackendError
    from picaco.llm.base import LikelihoodRequest, chat
    from picaco.llm.openai_backend import OpenAIBackend

    srv, proxy = stack
    request = [LikelihoodRequest(chat("Be brief.", "Say hi."), "Hello!")]

    proxy.set_rules([Rule("status", every=1, status=503, path="/v1/completions")])
    proxy.reset()
    backend = OpenAIBackend(proxy.base_url, srv.model, timeout=60, backoff_base=0.05)
    try:
        with pytest.raises(BackendError, match="503"):
            await backend.loglikelihood(request)
        assert not backend.capabilities.continuation_logprobs
        assert backend.stats["server_error"] == 3  # the probe's 1 + 2 retries

        proxy.set_rules([Rule("empty_choices", at=(1,), path="/v1/completions")])
        proxy.reset()
        [scored] = await backend.loglikelihood(request)
    finally:
        await backend.aclose()
    assert backend.likelihood_mode == "completions_echo" and scored.n_tokens > 0
    assert backend.stats["malformed"] == 1
    assert proxy.snapshot()["injected"] == {"empty_choices": 1}


async def test_faults_are_counted_once_for_the_role_that_met_them():
    """Roles share a backend when they share a connection; a fault belongs to the call that met it
    (a backend-wide counter copied by every role's client would count it once per role)."""
    from picaco.llm.accounting import Accounting
    from picaco.llm.base import chat
    from picaco.llm.client import LLMClient
    from picaco.llm.openai_backend import OpenAIBackend
    from support.delay_server import start_in_thread

    with start_in_thread() as server:
        backend = OpenAIBackend(server.base_url, "delay-model", backoff_base=0.0)
        accounting = Accounting()
        target = LLMClient("target", backend, accounting=accounting)
        judge = LLMClient("judge", backend, accounting=accounting)
        server.configure(faults=[{"kind": "status", "status": 503}, {"kind": "invalid_json"}])
        await target.generate(chat(None, "first"), seed=1)
        await judge.generate(chat(None, "second"), seed=2)
        await backend.aclose()
    assert accounting.roles["target"].faults == {"server_error": 1, "malformed": 1}
    assert accounting.roles["target"].retries == 2
    assert accounting.roles["judge"].faults == {} and accounting.roles["judge"].retries == 0
    assert accounting.total().calls == 2

"""End-to-end PICACO runs on the real SmolLM2-135M (target and optimizer) with the `tiny` preset, real
MiniLM embeddings for q_phi, and the offline judge when it exists (else an embedding judge below).

- the run directory holds everything it promises;
- a run killed with SIGKILL in the middle and run again ends with the same instruction.txt as an
  uninterrupted run, and the rerun makes no model call for work recorded before the kill;
- the budget cap is never exceeded.

No call cache is used, so resuming is shown to work from the run directory alone.
This file is also the subprocess that gets killed: `python tests/test_optimize_e2e.py RUN_DIR ...`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from picaco.data.queries import Query
from picaco.judge.base import ValueScore
from picaco.llm.accounting import Budget
from picaco.llm.client import LLMClient
from picaco.optimize import PRESETS, RunDir, optimize
from picaco.values import load_value_set

pytestmark = [pytest.mark.model, pytest.mark.slow]

VALUES = load_value_set("confucianism-4").subset(["tradition", "benevolence"], name="e2e-2")
QUERIES = [
    Query(id="e1", text="My grandmother wants a big family dinner for the new year. Should I go?"),
    Query(id="e2", text="A friend asks to borrow money again. What should I do?"),
]
PARAMS = PRESETS["tiny"]


class EmbeddingJudge:
    """A deterministic stand-in for q_w used only until the offline judge exists: the sigmoid of
    how much closer the response is to the value's 'conforming' than to its 'violating' text."""

    name = "e2e-embedding-judge"

    def __init__(self, embedder):
        self.embedder = embedder

    def identity(self) -> dict:
        return {"kind": "e2e-embedding-judge", "version": 1}

    async def score(self, value_set, items):
        ys = self.embedder.embed([y for _, y in items])
        out = []
        conf = self.embedder.embed([v.conforming for v in value_set.values])
        viol = self.embedder.embed([v.violating for v in value_set.values])
        for y in ys:
            margin = conf @ y - viol @ y
            out.append({v.id: ValueScore.from_prob(v.id, float(1 / (1 + np.exp(-8 * m))))
                        for v, m in zip(value_set.values, margin)})
        return out


def _judge(embedder):
    try:
        from picaco.judge.offline import OfflineJudge
    except ImportError:  # not written yet: the stand-in above
        return EmbeddingJudge(embedder)
    return OfflineJudge(embedder)


class CountingBackend:
    """Wraps the embedded backend and counts the requests that reach the model."""

    def __init__(self, inner):
        self.inner = inner
        self.kind, self.model, self.capabilities = inner.kind, inner.model, inner.capabilities
        self.generate_calls = 0
        self.likelihood_requests = 0

    def identity(self) -> dict:
        return self.inner.identity()

    async def generate(self, request):
        self.generate_calls += 1
        return await self.inner.generate(request)

    async def loglikelihood(self, requests):
        self.likelihood_requests += len(requests)
        return await self.inner.loglikelihood(requests)

    async def aclose(self):
        await self.inner.aclose()


def build(model_path: Path, minilm_dir: Path, budget: Budget | None = None):
    from picaco.embeddings import Embedder
    from picaco.llm.embedded import EmbeddedBackend
    from picaco.redundancy import RedundancyModel

    backend = CountingBackend(EmbeddedBackend(model_path, n_ctx=2048))
    embedder = Embedder(minilm_dir)
    return backend, dict(
        target=LLMClient("target", backend, cache=None),
        optimizer=LLMClient("optimizer", backend, cache=None),
        judge=_judge(embedder),
        redundancy=RedundancyModel(embedder, VALUES),
        value_set=VALUES,
        queries=QUERIES,
        params=PARAMS,
        budget=budget,
    )


def run_once(run_dir: Path, model_path: Path, minilm_dir: Path, budget: Budget | None = None):
    backend, kwargs = build(model_path, minilm_dir, budget)

    async def go():
        try:
            return await optimize(run_dir=run_dir, **kwargs)
        finally:
            await backend.aclose()

    return asyncio.run(go()), backend


@pytest.fixture(scope="module")
def embedded(smollm2_path, minilm_dir):
    pytest.importorskip("picaco.llm.embedded",
                        reason="picaco/llm/embedded.py (EmbeddedBackend) is not written yet")
    return smollm2_path, minilm_dir


def _subprocess(run_dir: Path, model: Path, minilm: Path) -> subprocess.Popen:
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen(
        [sys.executable, __file__, str(run_dir), str(model), str(minilm)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _records(run_dir: Path, name: str) -> list[dict]:
    return RunDir(run_dir).records(name)


def _result(run_dir: Path) -> dict:
    d = json.loads((run_dir / "result.json").read_text())
    for k in ("calls", "accounting", "run_dir", "notes"):
        d.pop(k)
    return d


def test_tiny_run_directory_and_resume_after_sigkill(embedded, tmp_path):
    model, minilm = embedded
    straight = tmp_path / "straight"
    t0 = time.perf_counter()
    result, backend = run_once(straight, model, minilm)
    elapsed = time.perf_counter() - t0
    print(f"uninterrupted tiny run: {elapsed:.1f}s, {backend.generate_calls} generations, "
          f"{backend.likelihood_requests} likelihood requests, stop: {result.stop_reason}")

    # -- the run directory --
    for name in ("config.json", "events.jsonl", "responses.jsonl", "candidates.jsonl",
                 "rounds.jsonl", "accounting.json", "instruction.txt", "provenance.json",
                 "pools/round-00.json", "pools/round-01.json"):
        assert (straight / name).is_file(), name
    instruction = (straight / "instruction.txt").read_text().strip()
    assert instruction == result.instruction and instruction
    assert result.mode == "likelihood"  # the embedded backend scores given responses
    responses = _records(straight, "responses.jsonl")
    enhanced = [r for r in responses if r["phase"] == "enhance"]
    assert len(enhanced) == PARAMS.rounds * len(QUERIES) * PARAMS.samples_per_query
    assert all(set(r["scores"]) == set(VALUES.ids) and r["log_qphi"] <= 0 for r in enhanced
               if r["text"].strip())
    cands = _records(straight, "candidates.jsonl")
    assert sum(c["kind"] == "proposal" for c in cands) == PARAMS.rounds * PARAMS.candidates
    assert all(c["kept"] or c["reason"] for c in cands if c["kind"] == "verdict")
    prov = json.loads((straight / "provenance.json").read_text())
    assert prov["value_set"]["fingerprint"] == VALUES.fingerprint()
    assert prov["roles"]["target"]["kind"] == "embedded"
    assert prov["objective"]["final"] >= prov["objective"]["seed"]
    assert set(prov["scores"]["final"]) == set(VALUES.ids)
    acc = json.loads((straight / "accounting.json").read_text())
    assert acc["total"]["calls"] > 0

    # -- kill a second run in the middle with SIGKILL, then run it again --
    killed = tmp_path / "killed"
    proc = _subprocess(killed, model, minilm)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # wait until round 1 has proposals: the kill lands in the middle of the run
        if (killed / "candidates.jsonl").exists() and any(
            c.get("kind") == "proposal" for c in _records(killed, "candidates.jsonl")
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists()
    before = {r["key"] for r in _records(killed, "responses.jsonl")}
    proposals_before = sum(c["kind"] == "proposal" for c in _records(killed, "candidates.jsonl"))

    resumed = _subprocess(killed, model, minilm)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    counts = json.loads(out.strip().splitlines()[-1])
    assert (killed / "instruction.txt").read_text() == (straight / "instruction.txt").read_text()
    assert _result(killed) == _result(straight)
    after = {r["key"] for r in _records(killed, "responses.jsonl")}
    proposals_after = sum(c["kind"] == "proposal" for c in _records(killed, "candidates.jsonl"))
    # the resumed process generated exactly the responses and proposals that were missing
    assert counts["generate_calls"] == len(after - before) + proposals_after - proposals_before
    assert after == {r["key"] for r in responses}
    assert "resume" in [e["event"] for e in _records(killed, "events.jsonl")]


def test_tiny_run_budget_cap(embedded, tmp_path):
    model, minilm = embedded
    budget = Budget(max_calls=15)
    result, backend = run_once(tmp_path, model, minilm, budget)
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["total"]["calls"] <= 15
    assert backend.generate_calls + backend.likelihood_requests <= 15
    assert result.stop_reason == "budget"
    assert (tmp_path / "instruction.txt").read_text().strip() == result.instruction
    assert json.loads((tmp_path / "result.json").read_text())["stop_reason"] == "budget"


if __name__ == "__main__":
    run_dir, model_path, minilm_path = (Path(a) for a in sys.argv[1:4])
    _, counting = run_once(run_dir, model_path, minilm_path)
    print(json.dumps({"generate_calls": counting.generate_calls,
                      "likelihood_requests": counting.likelihood_requests}))

"""The PICACO loop: response enhancement and instruction refinement, T rounds, resumable.

Every unit of model work (one query's sampled responses with their scores, one proposal, one
instruction's score) is written to the run directory as soon as it is done, under a key that says
exactly what it is (instruction hash, query, seed; round and candidate index; pools version and
instruction hash). Before doing a unit the engine looks its key up, so a rerun after a kill replays
everything that was finished (no model calls) and continues where the kill hit. Pools, prompts and
choices are pure functions of those records, so the resumed run ends exactly like an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

import picaco
from picaco import objective
from picaco.data.queries import Query
from picaco.errors import BudgetExhausted, ConfigError
from picaco.examples import split_examples, with_examples
from picaco.llm.accounting import Accounting, Budget
from picaco.llm.base import chat, fill_template, turns_as_pairs
from picaco.machine import machine_info, mixed_machines_warning
from picaco.optimize import proposer
from picaco.optimize.params import PRESETS, Estimate, OptimizeParams, ResolvedMode, estimate_run
from picaco.optimize.pools import Pools, Scored
from picaco.optimize.progress import ProgressEvent, ProgressSink, QuietProgress
from picaco.optimize.rundir import RunDir, instruction_hash, read_final_instruction, require_finished
from picaco.optimize.scoring import (
    FINAL_CHECK_ALPHA,
    CandidateScore,
    bare_model_wins,
    likelihood_score,
    per_query_worse_p,
    sampling_score,
    seed_comes_back,
    select_mode,
)
from picaco.values import ValueSet

# -- the narrow interfaces this module needs from the judge and the redundancy model ---------------


@runtime_checkable
class Judge(Protocol):
    """q_w: scores (query, response) items on every value; see picaco.judge.base."""

    name: str

    def identity(self) -> dict: ...

    async def score(self, value_set: ValueSet, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Per item, value id -> an object with `.prob` (q_w in (0,1) or None) and `.rating`."""
        ...


@runtime_checkable
class RedundancyScorer(Protocol):
    """q_phi: log q_phi(s | x, y) for (query, response) items against the value text s."""

    async def log_redundancy(self, spec: str, items: list[tuple[str, str]]) -> list[float]: ...


# -- helpers ------------------------------------------------------------------------------------------

#: the requests of the unit of work (one query's samples, one proposal, one score) running in this
#: context; its counts are stored with the unit's records (see Engine._attribute)
_UNIT_COST: contextvars.ContextVar[Accounting | None] = contextvars.ContextVar("picaco_unit_cost",
                                                                               default=None)
_COUNTERS = ("record_call", "record_hit", "record_faults")


@contextlib.contextmanager
def unit_cost():
    """Collect the requests made inside the block (and the tasks it starts) into a fresh Accounting."""
    cost = Accounting()
    token = _UNIT_COST.set(cost)
    try:
        yield cost
    finally:
        _UNIT_COST.reset(token)


def _count_units_too(acc: Accounting) -> None:
    """Make `acc` also count each request into the unit running in the caller's context."""
    if getattr(acc, "_picaco_units", False):
        return
    for name in _COUNTERS:
        def counted(*args, _orig=getattr(acc, name), _name=name, **kwargs):
            _orig(*args, **kwargs)
            unit = _UNIT_COST.get()
            if unit is not None:
                getattr(unit, _name)(*args, **kwargs)
        setattr(acc, name, counted)
    acc._picaco_units = True


#: accounting.json's row for the requests of units that failed (see Engine.unfinished)
UNFINISHED = "unfinished units"


def _cost_json(cost: Accounting) -> dict:
    return {role: stats for role, stats in cost.to_json().items() if role != "total"}


async def probe_clients(accounting: Accounting, clients: Sequence) -> dict:
    """Let the clients' servers say what they can do before a run picks its scoring mode; returns
    the requests that cost, for the run's accounting (pass it to `optimize` as `startup_cost`)."""
    _count_units_too(accounting)
    with unit_cost() as cost:
        for client in clients:
            if client is not None:
                await client.probe()
    return _cost_json(cost)


#: parameters added after run directories existed, with the value that computes what runs did before
#: them: at that value they are left out of the fingerprint, so older run directories still resume
NEUTRAL_LATER_PARAMS = {"balance": 0.0, "replace_alpha": None, "prompt_examples": None}
#: parameters of the final check only: the rounds do not depend on them, so they are not part of the
#: fingerprint (a finished run takes a changed one with `--refinish`); provenance.json records them
FINAL_CHECK_ONLY_PARAMS = ("weigh_bare", "final_queries", "final_samples")


def fingerprint_params(params: OptimizeParams) -> dict:
    dump = params.model_dump(mode="json")
    return {k: v for k, v in dump.items()
            if k not in FINAL_CHECK_ONLY_PARAMS
            and not (k in NEUTRAL_LATER_PARAMS and v == NEUTRAL_LATER_PARAMS[k])}


def derive_seed(*parts: object) -> int:
    """A sampling seed that depends only on its parts (run seed, phase, round, query, sample)."""
    blob = json.dumps([str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


async def gather_all(coros: Sequence[Awaitable]) -> list:
    """Run coroutines concurrently; on the first failure cancel the rest and raise that error itself
    (not an ExceptionGroup), so a budget stop leaves no task running in the background."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None
    return [t.result() for t in tasks]


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    for e in leaves:  # a budget stop explains the others (they were cancelled or failed after it)
        if isinstance(e, BudgetExhausted):
            return e
    return leaves[0]


def _identity(obj) -> dict | None:
    if obj is None:
        return None
    backend = getattr(obj, "backend", None)
    if backend is not None and hasattr(backend, "identity"):
        # a client's identity adds its system template (if any) to the backend's
        ident = obj.identity() if callable(getattr(obj, "identity", None)) else backend.identity()
        return {"role": getattr(obj, "role", None), **ident}
    ident = getattr(obj, "identity", None)
    if callable(ident):
        return ident()
    if isinstance(ident, dict):
        return ident
    return {"type": type(obj).__name__}


def _check_length(what: str, got: Sequence, items: Sequence) -> None:
    if len(got) != len(items):
        raise RuntimeError(f"the {what} returned {len(got)} results for {len(items)} items")


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([mb])\b", re.IGNORECASE)


def _model_params_billions(name: str) -> float | None:
    m = _SIZE.search(name.replace("-", " ").replace("_", " "))
    if not m:
        return None
    n = float(m.group(1))
    return n / 1000 if m.group(2).lower() == "m" else n


# -- the result ---------------------------------------------------------------------------------------


@dataclass
class OptimizeResult:
    instruction: str
    seed_instruction: str
    mode: ResolvedMode
    stop_reason: str  # rounds | stable | budget
    run_dir: Path
    rounds_completed: int
    #: which trajectory step the returned instruction comes from (0 = the seed)
    selected_round: int
    #: mean q_w per value under the seed and under the final instruction (same queries and seeds)
    scores_seed: dict[str, float | None] = field(default_factory=dict)
    scores_final: dict[str, float | None] = field(default_factory=dict)
    #: the same as mean 1-5 ratings (where the judge gives ratings)
    ratings_seed: dict[str, float | None] = field(default_factory=dict)
    ratings_final: dict[str, float | None] = field(default_factory=dict)
    #: the pooled refinement objective J of the seed and the final instruction on the final pools
    objective_seed: float | None = None
    objective_final: float | None = None
    #: the sampled TC lower-bound estimate of the seed and the final instruction
    tc_seed: float | None = None
    tc_final: float | None = None
    history: list[dict] = field(default_factory=list)
    stop_detail: str = ""
    calls: int = 0
    #: calls and tokens per role, all processes of the run together (as in accounting.json)
    accounting: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def seed_scores(self) -> dict[str, float | None]:
        """Mean 1-5 rating per value under the seed instruction (alias of `ratings_seed`)."""
        return self.ratings_seed

    @property
    def final_scores(self) -> dict[str, float | None]:
        """Mean 1-5 rating per value under the returned instruction (alias of `ratings_final`)."""
        return self.ratings_final

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["run_dir"] = str(self.run_dir)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "OptimizeResult":
        d = dict(d)
        d["run_dir"] = Path(d["run_dir"])
        return cls(**d)


@dataclass
class FinalChoice:
    """What the final check returns: the trajectory step chosen (None = no instruction, the bare
    model), the objective of the seed and of the choice, and in sampling mode the paired fresh
    samples of the seed and of the choice (the seed-vs-final report)."""

    selected: int | None
    objective_seed: float | None
    objective_final: float | None
    seed_samples: list[Scored] | None = None
    final_samples: list[Scored] | None = None


# -- the engine ---------------------------------------------------------------------------------------


class Engine:
    def __init__(
        self,
        *,
        target,
        optimizer,
        judge: Judge,
        redundancy: RedundancyScorer,
        value_set: ValueSet,
        queries: list[Query],
        params: OptimizeParams,
        run_dir: RunDir,
        final_queries: list[Query] | None = None,
        seed_instruction: str,
        init_from: str | None,
        proxy=None,
        progress: ProgressSink | None = None,
        budget: Budget | None = None,
        warnings: list[str] | None = None,
        run_config: dict | None = None,
        startup_cost: dict | None = None,
        refinish: bool = False,
    ):
        self.refinish = refinish
        self.target = target
        self.optimizer = optimizer
        self.judge = judge
        self.redundancy = redundancy
        self.value_set = value_set
        self.queries = queries
        #: queries no round sees, for the sampling-mode final check (empty: it uses `queries`)
        self.final_queries = list(final_queries or [])
        self.params = params
        self.rundir = run_dir
        self.seed_instruction = seed_instruction
        self.init_from = init_from
        self.proxy = proxy
        self.progress = progress or QuietProgress()
        self.budget = budget
        self.weights = value_set.weights()
        self.value_ids = value_set.ids
        self.spec = value_set.spec_text()
        self.mode: ResolvedMode = select_mode(params.mode, target, proxy)
        self.pending_warnings = list(warnings or [])
        self.run_config = run_config
        self.notes: list[str] = []
        # state rebuilt from the run directory
        self.responses: dict[str, dict] = {}
        self.candidate_records: dict[str, dict] = {}
        self.round_records: dict[int, dict] = {}
        self.pools = Pools([q.id for q in queries], params.aligned_pool_size, params.noisy_pool_size)
        self.bare_logq: dict[str, list[float]] = {}
        self.pools_version = -1  # the last round whose enhancement is merged (0 = bare only)
        self.prior_accounting: dict = {}
        #: requests of every recorded unit of work, all processes of the run: a request made for a
        #: unit that a kill cut short is not in it, and the unit's redo is, so the totals (requests =
        #: calls + cache hits) are those of an uninterrupted run (OPRO's budget is read from them)
        self.recorded = Accounting()
        if startup_cost:
            self.recorded.merge_json(startup_cost)  # this process's capability probes
        #: requests of units that failed with an exception (an endpoint that kept failing, a spent
        #: budget, Ctrl-C), all processes: paid for and redone later, so kept apart from the totals;
        #: their faults are why the run stopped (accounting.json's "unfinished units")
        self.unfinished = Accounting()
        self.earlier_machines: list[dict] = []  # of the processes that started or resumed this run
        self._baseline: dict[int, dict] = {}
        self._mark_accounting_baseline()
        for acc in self._accountings():
            _count_units_too(acc)
        self._estimate: Estimate | None = None

    # -- configuration ---------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        qblob = json.dumps([[q.id, q.text] for q in self.queries], ensure_ascii=False).encode()
        return {
            "params": fingerprint_params(self.params),
            "mode": self.mode,
            "value_set": {"name": self.value_set.name, "fingerprint": self.value_set.fingerprint()},
            "queries": {"n": len(self.queries), "sha256": hashlib.sha256(qblob).hexdigest()},
            "target": _identity(self.target),
            "optimizer": _identity(self.optimizer),
            "proxy": _identity(self.proxy),
            "judge": {"name": getattr(self.judge, "name", type(self.judge).__name__),
                      "identity": _identity(self.judge)},
            "redundancy": _identity(self.redundancy),
            "seed_instruction": self.seed_instruction,
        }

    def config(self) -> dict:
        fp = self.fingerprint()
        return {
            "fingerprint": fp,
            "config_hash": config_hash(fp),
            "picaco_version": picaco.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "init_from": self.init_from,
            "query_ids": [q.id for q in self.queries],
            # the caller's resolved configuration (no secrets), for reading only: what must match on
            # resume is the fingerprint
            "run_config": self.run_config,
            "estimate": self.estimate().to_json(),
            "budget": None if self.budget is None else {
                "max_calls": self.budget.max_calls, "max_tokens": self.budget.max_tokens},
        }

    def judge_calls_per_response(self) -> int:
        declared = getattr(self.judge, "calls_per_response", None)
        if callable(declared):
            return int(declared(self.value_set))
        if isinstance(declared, int):
            return declared
        # an LLM judge (it has a client) makes one call per value, or one per item in "per_item"
        # mode; a judge without a client (the offline probe) makes no model calls
        if getattr(self.judge, "client", None) is None:
            return 0
        return 1 if getattr(self.judge, "mode", None) == "per_item" else len(self.value_ids)

    def estimate(self) -> Estimate:
        if self._estimate is None:
            self._estimate = estimate_run(
                self.params,
                query_texts=[q.text for q in self.queries],
                n_values=len(self.value_ids),
                mode=self.mode,
                judge_calls_per_response=self.judge_calls_per_response(),
                seed_instruction=self.seed_instruction,
                frame_chars=self.target.frame_chars,
            )
        return self._estimate

    # -- accounting ------------------------------------------------------------------------------
    def _accountings(self) -> list[Accounting]:
        seen: dict[int, Accounting] = {}
        for obj in (self.target, self.optimizer, self.proxy, getattr(self.judge, "client", None)):
            acc = getattr(obj, "accounting", None)
            if isinstance(acc, Accounting):
                seen.setdefault(id(acc), acc)
        return list(seen.values())

    def _mark_accounting_baseline(self) -> None:
        # the caller's Accounting objects may already hold counts from other work in this process
        self._baseline = {id(a): a.to_json() for a in self._accountings()}

    def accounting_json(self) -> dict:
        """Counts of this run: the requests of every recorded unit of work, all processes together,
        and when some unit failed, the "unfinished units" row (not in the total)."""
        data = self.recorded.to_json()
        if not self.unfinished.roles:
            return data
        return data | {UNFINISHED: self.unfinished.total().to_json()}

    def _add_cost(self, record: dict, cost: Accounting) -> None:
        record["cost"] = _cost_json(cost)
        self.recorded.merge_json(record["cost"])

    def calls(self) -> int:
        prior = self.prior_accounting.get("total", {}).get("calls", 0)
        now = sum(a.total().calls for a in self._accountings())
        before = sum(b.get("total", {}).get("calls", 0) for b in self._baseline.values())
        return prior + now - before

    @contextlib.contextmanager
    def _unit(self):
        """`unit_cost()` for one unit of work whose requests are kept even when it fails: the calls
        it paid for and the faults it met are recorded as a `unit_failed` event before the error
        goes on, and shown as the "unfinished units" row of accounting.json."""
        with unit_cost() as cost:
            try:
                yield cost
            except BaseException as e:
                spent = cost.total()
                if spent.calls or spent.cache_hits or spent.retries or spent.faults:
                    data = _cost_json(cost)
                    self.rundir.append("events.jsonl", {"event": "unit_failed", "time": time.time(),
                                                        "error": type(e).__name__, "cost": data})
                    self.unfinished.merge_json(data)
                raise

    def _save_accounting(self) -> None:
        self.rundir.write_json("accounting.json", self.accounting_json())

    def _attach_budget(self) -> None:
        if self.budget is None:
            return
        for obj in (self.target, self.optimizer, self.proxy, getattr(self.judge, "client", None)):
            if obj is not None and hasattr(obj, "budget") and obj.budget is None:
                obj.budget = self.budget
        # calls made by earlier processes of this run count against the same caps
        total = self.prior_accounting.get("total", {})
        self.budget.calls += int(total.get("calls", 0))
        self.budget.tokens += int(total.get("prompt_tokens", 0)) + int(total.get("completion_tokens", 0))

    # -- events ----------------------------------------------------------------------------------
    def emit(self, kind: str, *, round: int | None = None, phase: str | None = None,
             done: int = 0, total: int = 0, **data) -> None:
        self.progress.emit(ProgressEvent(kind, round, phase, done, total, self.calls(), data))

    def warn(self, message: str) -> None:
        self.notes.append(message)
        self.rundir.append("events.jsonl", {"event": "warning", "message": message,
                                            "time": time.time()})
        self.emit("warning", message=message)

    def _event(self, event: str, **data) -> None:
        self.rundir.append("events.jsonl", {"event": event, "time": time.time(),
                                            "calls": self.calls(), **data})

    # -- loading a run directory -----------------------------------------------------------------
    def _load(self) -> None:
        costed = 0
        for name, into in (("responses.jsonl", self.responses),
                           ("candidates.jsonl", self.candidate_records)):
            for r in self.rundir.records(name):
                into[r["key"]] = r
                if "cost" in r:
                    costed += 1
                    self.recorded.merge_json(r["cost"])
        for r in self.rundir.records("rounds.jsonl"):
            self.round_records[int(r["round"])] = r
        for r in self.rundir.records("events.jsonl"):
            if r.get("event") == "unit_failed" and "cost" in r:
                self.unfinished.merge_json(r["cost"])
            if r.get("event") in ("start", "resume") and r.get("machine"):
                self.earlier_machines.append(r["machine"])
        if not costed and (self.responses or self.candidate_records):
            # a run directory from before per-unit costs: its accounting.json is the best record
            self.recorded.merge_json(self.rundir.read_json("accounting.json") or {})
        self.prior_accounting = self.recorded.to_json()

    # -- one unit of sampling: a query's responses under one instruction --------------------------
    def _response_key(self, ihash: str, query_id: str, seed: int) -> str:
        return f"{ihash}|{query_id}|{seed}"

    async def _sample_query(
        self, instruction: str, query: Query, seeds: list[int], *, phase: str, round: int,
        judge: bool = True,
    ) -> list[Scored]:
        ihash = instruction_hash(instruction)
        keys = [self._response_key(ihash, query.id, s) for s in seeds]
        missing = [j for j, k in enumerate(keys) if k not in self.responses]
        if missing:
            with self._unit() as cost:
                records = await self._sample_missing(instruction, ihash, query, keys, seeds, missing,
                                                     phase=phase, round=round, judge=judge)
            self._add_cost(records[0], cost)
            # one group: the samples were judged as one batch, so they are redone together
            self.rundir.append_group("responses.jsonl", records)
            for j, record in zip(missing, records):
                self.responses[keys[j]] = record
        return [Scored.from_record(self.responses[k]) for k in keys]

    async def _sample_missing(self, instruction: str, ihash: str, query: Query, keys: list[str],
                              seeds: list[int], missing: list[int], *, phase: str, round: int,
                              judge: bool) -> list[dict]:
        """Generate, judge and score the missing samples of one query: its records, in order."""
        messages = chat(instruction, query.text)
        p = self.params
        completions = await gather_all([
            self.target.generate(messages, n=1, temperature=p.response_temperature,
                                 max_tokens=p.max_new_tokens, seed=seeds[j])
            for j in missing
        ])
        texts = [c[0].text for c in completions]
        live = [i for i, t in enumerate(texts) if t.strip()]  # empty responses are not scored
        items = [(query.text, texts[i]) for i in live]
        judged: list[dict] = [{} for _ in texts]
        logq: list[float | None] = [None for _ in texts]
        if items:
            if judge:
                scores = await self.judge.score(self.value_set, items)
                _check_length("judge", scores, items)
                for i, s in zip(live, scores):
                    judged[i] = s
            reds = await self.redundancy.log_redundancy(self.spec, items)
            _check_length("redundancy model", reds, items)
            for i, lq in zip(live, reds):
                logq[i] = float(lq)
        return [
            self._response_record(keys[j], phase, round, ihash, query.id, j, seeds[j],
                                  completions[i][0], judged[i], logq[i], judge)
            for i, j in enumerate(missing)
        ]

    def _response_record(self, key, phase, round, ihash, query_id, sample, seed, completion,
                         judged: dict, log_qphi: float | None, judge: bool) -> dict:
        scores = {}
        for vid in self.value_ids:
            s = judged.get(vid)
            prob = getattr(s, "prob", None) if s is not None else None
            rating = getattr(s, "rating", None) if s is not None else None
            scores[vid] = {
                "prob": None if prob is None else float(prob),
                "rating": None if rating is None else float(rating),
            }
        conf = objective.weighted_log_conformity(
            {k: v["prob"] for k, v in scores.items()}, self.weights
        )
        f = None
        if judge and conf.value is not None and log_qphi is not None:
            f = objective.response_score({k: v["prob"] for k, v in scores.items()}, self.weights,
                                         log_qphi, self.params.beta, self.params.balance)
        return {
            "key": key, "phase": phase, "round": round, "instruction_hash": ihash,
            "query_id": query_id, "sample": sample, "seed": seed,
            "text": completion.text, "finish_reason": completion.finish_reason,
            "completion_tokens": completion.completion_tokens,
            "scores": scores if judge else {},
            "unscored": list(conf.unscored) if judge else [],
            "log_conformity": conf.value if judge else None,
            "log_qphi": log_qphi, "f": f,
        }

    async def _sample(
        self, instruction: str, plan: list[tuple[Query, list[int]]], *, phase: str, round: int,
        judge: bool = True,
    ) -> list[Scored]:
        """Sample (or replay) responses for several queries; reports progress per query."""
        done = 0
        total = len(plan)

        async def one(q: Query, seeds: list[int]) -> list[Scored]:
            nonlocal done
            out = await self._sample_query(instruction, q, seeds, phase=phase, round=round,
                                           judge=judge)
            done += 1
            self.emit("advance", round=round, phase=phase, done=done, total=total)
            return out

        results = await gather_all([one(q, seeds) for q, seeds in plan])
        return [s for r in results for s in r]

    def _round_seeds(self, round: int, query: Query) -> list[int]:
        return [derive_seed(self.params.seed, "sample", round, query.id, j)
                for j in range(self.params.samples_per_query)]

    def _final_seeds(self, query: Query) -> list[int]:
        """Seeds of the sampling-mode final check: used by no round, so no choice was made on them."""
        return [derive_seed(self.params.seed, "final", query.id, j)
                for j in range(self.params.final_samples or self.params.samples_per_query)]

    # -- phases ----------------------------------------------------------------------------------
    async def _phase(self, name: str, round: int | None, body: Callable[[], Awaitable]):
        self._event("phase_start", phase=name, round=round)
        self.emit("phase_start", round=round, phase=name)
        result = await body()
        self._event("phase_end", phase=name, round=round)
        self.emit("phase_end", round=round, phase=name)
        self._save_accounting()
        return result

    async def bare_phase(self) -> None:
        n = self.params.n_bare
        if n == 0:
            return
        plan = [(q, [derive_seed(self.params.seed, "bare", q.id, j) for j in range(n)])
                for q in self.queries]
        bare = await self._sample("", plan, phase="bare", round=0, judge=False)
        self.pools.set_noisy(s for s in bare if s.log_qphi is not None)
        for q in self.queries:
            self.bare_logq[q.id] = [s.log_qphi for s in bare
                                    if s.query_id == q.id and s.log_qphi is not None]
        self.pools_version = 0
        self.rundir.write_json("pools/round-00.json", self.pools.snapshot())

    async def enhance(self, round: int, current: str) -> list[Scored]:
        plan = [(q, self._round_seeds(round, q)) for q in self.queries]
        sampled = await self._sample(current, plan, phase="enhance", round=round)
        self.pools.merge_aligned(sampled)
        self.pools_version = round
        self.rundir.write_json(f"pools/round-{round:02d}.json", self.pools.snapshot())
        return sampled

    async def propose(self, round: int, current: str, sampled: list[Scored]) -> list[proposer.Verdict]:
        p = self.params
        if p.candidates == 0 and p.grounded == 0 and not p.prompt_examples:
            return []
        # with `prompt_examples`, the optimizer and the checks see and write the instruction part
        # only; every candidate they give keeps the incumbent's form (with or without the block),
        # and one more candidate, written here, toggles the block
        block = p.examples_block
        current, has_block = split_examples(current, block)
        query_text = {q.id: q.text for q in self.queries}
        good = [proposer.Example(query_text[s.query_id], s.text)
                for s in self.pools.best(p.good_examples)]
        good_texts = {e.response for e in good}
        parroting_pool = sorted(
            (s for s in sampled if s.log_qphi is not None and s.text.strip()
             and s.text not in good_texts),
            key=lambda s: (-s.log_qphi, s.query_id, s.sample),
        )
        parroting = [proposer.Example(query_text[s.query_id], s.text)
                     for s in parroting_pool[: p.parroting_examples]]
        standings = proposer.order_weakest_first(self.value_set,
                                                 self.pools.value_means(self.value_ids))
        template = getattr(self.target, "system_template", None)
        prompts = [proposer.build_meta_prompt(current, standings, good, parroting,
                                              max_chars=p.instruction_max_chars, strategy=c,
                                              system_template=template)
                   for c in range(p.candidates)]
        keys = [f"proposal|{round}|{c}" for c in range(p.candidates)]
        missing = [c for c, k in enumerate(keys) if k not in self.candidate_records]
        if missing:
            async def one(c: int) -> None:
                with self._unit() as cost:
                    (out,) = await self.optimizer.generate(
                        prompts[c], n=1, temperature=p.optimizer_temperature,
                        max_tokens=p.optimizer_max_tokens,
                        seed=derive_seed(p.seed, "propose", round, c),
                    )
                record = {"key": keys[c], "kind": "proposal", "round": round, "index": c,
                          "raw": out.text, "finish_reason": out.finish_reason,
                          "completion_tokens": out.completion_tokens}
                self._add_cost(record, cost)
                self.rundir.append("candidates.jsonl", record)
                self.candidate_records[keys[c]] = record
            await gather_all([one(c) for c in missing])
        raw = [(self.candidate_records[k]["raw"], self.candidate_records[k]["finish_reason"])
               for k in keys]
        # value-grounded candidates: written from the value set, the standings and the current
        # instruction with no model call; a resumed round takes the texts its verdicts recorded, so a
        # run started before a change to how they are written resumes to the same result
        written = proposer.grounded_candidates(self.value_set, standings, current,
                                               max_chars=p.instruction_max_chars, n=p.grounded)
        grounded = []
        for j in range(p.grounded):
            record = self.candidate_records.get(f"verdict|{round}|{p.candidates + j}")
            if record is not None:
                grounded.append(record["raw"])
            elif j < len(written):
                grounded.append(written[j])
        raw += [(text, "stop") for text in grounded]
        # words of the value set and the seed may appear in any instruction; other words of one
        # training query mark a sentence written for that query
        known = "\n".join([self.seed_instruction,
                           *(f"{v.title} {v.definition} {v.conforming} {v.violating}"
                             for v in self.value_set.values)])
        verdicts = proposer.check_candidates(raw, current=current,
                                             max_chars=p.instruction_max_chars,
                                             examples=good + parroting, grounded_from=p.candidates,
                                             queries=self.queries, known=known)
        if has_block:
            verdicts = [replace(v, text=with_examples(v.text, block)) if v.kept else v
                        for v in verdicts]
        if block:
            toggled = current if has_block else with_examples(current, block)
            verdicts.append(proposer.Verdict(
                p.candidates + p.grounded, toggled, toggled, "stop", True, "",
                "the examples taken out" if has_block else "the examples written in"))
        # a resumed round keeps the verdicts it recorded, so a change to the checks does not change
        # which candidates a run started before it competes with
        recorded = [self.candidate_records.get(f"verdict|{round}|{v.index}") for v in verdicts]
        verdicts = [proposer.Verdict.from_json(r) if r is not None else v for v, r in zip(verdicts, recorded)]
        for v in verdicts:
            key = f"verdict|{round}|{v.index}"
            if key not in self.candidate_records:
                source = ("optimizer" if v.index < p.candidates
                          else "grounded" if v.index < p.candidates + p.grounded else "examples")
                record = {"key": key, "kind": "verdict", "round": round, "source": source,
                          **v.to_json(),
                          "instruction_hash": instruction_hash(v.text) if v.kept else None}
                self.rundir.append("candidates.jsonl", record)
                self.candidate_records[key] = record
        return verdicts

    async def score_instruction(self, instruction: str, round: int, *, tag: str) -> CandidateScore:
        """J(e) on the current pools (likelihood, proxy) or mean f on a minibatch (sampling)."""
        ihash = instruction_hash(instruction)
        if self.mode == "sampling":
            key = f"score|sampling|{tag}|{ihash}"
        else:
            # likelihood scores depend only on the pools, so the key names the pools' version
            key = f"score|{self.mode}|pools{self.pools_version}|{ihash}"
        if key in self.candidate_records:
            return CandidateScore.from_json(self.candidate_records[key])
        # sampling mode: the samples are units of their own and carry their own costs
        with self._unit() as cost:
            if self.mode == "sampling":
                result = sampling_score(await self._sample(
                    instruction, self._minibatch_plan(round), phase="candidate", round=round))
            else:
                client = self.target if self.mode == "likelihood" else self.proxy
                result = await likelihood_score(
                    client, instruction, self.queries, self.pools, lam=self.params.lam,
                    temperature=self.params.preference_temperature)
        record = {"key": key, "kind": "score", "round": round, "tag": tag, "mode": self.mode,
                  "pools_version": self.pools_version, "instruction_hash": ihash,
                  "instruction": instruction, **result.to_json()}
        self._add_cost(record, cost)
        self.rundir.append("candidates.jsonl", record)
        self.candidate_records[key] = record
        return result

    def _minibatch_plan(self, round: int) -> list[tuple[Query, list[int]]]:
        k = min(self.params.minibatch, len(self.queries))
        rng = random.Random(derive_seed(self.params.seed, "minibatch", round))
        picked = sorted(rng.sample(range(len(self.queries)), k))
        return [(self.queries[i], self._round_seeds(round, self.queries[i])) for i in picked]

    async def refine(self, round: int, current: str, verdicts: list[proposer.Verdict]):
        instructions = [current] + [v.text for v in verdicts if v.kept]
        scores: list[CandidateScore] = []
        for i, e in enumerate(instructions):
            scores.append(await self.score_instruction(e, round, tag=f"round{round}"))
            self.emit("advance", round=round, phase="refine", done=i + 1, total=len(instructions))
        best = 0
        for i in range(1, len(instructions)):
            if scores[i].score > scores[best].score:  # ties keep the current instruction
                best = i
        replace_p = None
        if best and self.params.replace_alpha is not None and self.mode == "sampling":
            # an incumbent advantage: the best of several noisy means is usually ahead by chance,
            # so it replaces the incumbent only on evidence that the incumbent is worse
            replace_p = per_query_worse_p(scores[0].per_query, scores[best].per_query)
            if replace_p >= self.params.replace_alpha:
                best = 0
        return instructions[best], scores[best].score, scores[0].score, replace_p

    # -- reporting helpers -----------------------------------------------------------------------
    def sampled_value_means(self, sampled: Sequence[Scored]) -> dict[str, float | None]:
        return {v: _mean([s.probs[v] for s in sampled if s.probs.get(v) is not None])
                for v in self.value_ids}

    def sampled_rating_means(self, sampled: Sequence[Scored]) -> dict[str, float | None]:
        return {v: _mean([s.ratings[v] for s in sampled if s.ratings.get(v) is not None])
                for v in self.value_ids}

    def tc_of(self, sampled: Sequence[Scored]) -> float | None:
        by_query: dict[str, list[Scored]] = {}
        for s in sampled:
            by_query.setdefault(s.query_id, []).append(s)
        per_query = [
            objective.QuerySample(
                log_conformity=[s.log_conformity for s in group if s.f is not None],
                log_qphi=[s.log_qphi for s in group if s.f is not None],
                log_qphi_bare=self.bare_logq.get(qid, []),
            )
            for qid, group in by_query.items()
        ]
        return objective.tc_bound(per_query, self.params.beta)

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> OptimizeResult:
        resumed = self.rundir.open(self.config())
        self._load()
        try:
            return await self._run(resumed)
        except BaseException:
            # exit 3 (an endpoint that kept failing), Ctrl-C, a bug: what was paid for and the
            # faults met so far are on disk for the user, and for the resume
            self._save_accounting()
            raise

    async def _run(self, resumed: bool) -> OptimizeResult:
        stored = self.rundir.read_json("result.json")
        finished = stored is not None and stored.get("stop_reason") != "budget"
        if finished and self.refinish:
            # the rounds stay as recorded; the final check and report run again with this code
            archived = self.rundir.archive_result()
            self._event("refinish", archived=str(archived.relative_to(self.rundir.path)))
            finished = False
        if finished:
            result = OptimizeResult.from_json(stored)
            result.run_dir = self.rundir.path
            self.emit("run_start", **self._start_data(resumed))
            self.emit("run_end", **self._end_data(result))
            return result
        self._attach_budget()
        machine = machine_info()
        if (_identity(self.target) or {}).get("kind") == "embedded":
            mixed = mixed_machines_warning([*self.earlier_machines, machine], "the samples of this run")
            if mixed:
                self.warn(mixed)
        self._event("resume" if resumed else "start", config_hash=config_hash(self.fingerprint()),
                    machine=machine)
        self.emit("run_start", **self._start_data(resumed))
        for message in self.pending_warnings + self._preflight_warnings():
            self.warn(message)

        p = self.params
        trajectory = [self.seed_instruction]
        current = self.seed_instruction
        stop_reason, stop_detail = "rounds", ""
        rounds_completed = 0
        unchanged = 0
        round1: list[Scored] = []
        try:
            await self._phase("bare", 0, self.bare_phase)
            for t in range(1, p.rounds + 1):
                sampled = await self._phase("enhance", t, lambda t=t: self.enhance(t, current))
                if t == 1:
                    round1 = sampled
                verdicts = await self._phase(
                    "propose", t, lambda t=t, s=sampled: self.propose(t, current, s))
                chosen, chosen_score, current_score, replace_p = await self._phase(
                    "refine", t, lambda t=t, v=verdicts: self.refine(t, current, v))
                self._record_round(t, current, chosen, chosen_score, current_score, sampled,
                                   verdicts, replace_p)
                rounds_completed = t
                unchanged = unchanged + 1 if chosen == current else 0
                current = chosen
                trajectory.append(chosen)
                if p.patience is not None and unchanged >= p.patience:
                    stop_reason = "stable"
                    stop_detail = f"instruction unchanged for {unchanged} round(s)"
                    break
        except BudgetExhausted as e:
            stop_reason, stop_detail = "budget", str(e)
            self._event("stop", reason="budget", detail=str(e))
        result = await self.finish(trajectory, round1, stop_reason, stop_detail, rounds_completed)
        self.emit("run_end", **self._end_data(result))
        return result

    def _record_round(self, t, current, chosen, chosen_score, current_score, sampled, verdicts,
                      replace_p=None):
        pool_means = self.pools.value_means(self.value_ids)
        sampled_means = self.sampled_value_means(sampled)
        tc = self.tc_of(sampled)
        reasons: dict[str, int] = {}
        for v in verdicts:
            if not v.kept:
                key = v.reason.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        record = {
            "round": t,
            "instruction": chosen,
            "instruction_hash": instruction_hash(chosen),
            "previous_hash": instruction_hash(current),
            "changed": chosen != current,
            "objective": _finite(chosen_score),
            "objective_previous": _finite(current_score),
            "tc_bound_previous": tc,
            "pool_means": pool_means,
            "sampled_means_previous": sampled_means,
            "proposed": len(verdicts),
            "kept": sum(v.kept for v in verdicts),
            "discarded": reasons,
            "mode": self.mode,
        }
        if replace_p is not None:  # replace_alpha: the evidence the round's best candidate had
            record["replace_p"] = replace_p
        if t not in self.round_records:
            self.rundir.append("rounds.jsonl", record)
            self.round_records[t] = record
        self.emit("round_end", round=t, objective=record["objective"], pool_means=pool_means,
                  sampled_means=sampled_means, instruction=chosen, changed=record["changed"])

    def _summarize(self, samples: list[Scored]) -> tuple[dict, float | None, dict]:
        """What the seed-vs-final report shows of one instruction's samples: per-value scores, the
        TC bound and the mean rating per value."""
        return self.sampled_value_means(samples), self.tc_of(samples), self.sampled_rating_means(samples)

    async def finish(self, trajectory: list[str], round1: list[Scored], stop_reason: str,
                     stop_detail: str, rounds_completed: int) -> OptimizeResult:
        final = trajectory[-1]
        selected = len(trajectory) - 1
        objective_seed = objective_final = None
        scores_seed: dict = {}
        scores_final: dict = {}
        ratings_seed: dict = {}
        ratings_final: dict = {}
        tc_seed = tc_final = None
        choice: FinalChoice | None = None
        try:
            if self.pools_version >= 1:
                choice = await self._phase("final", None, lambda: self._select_final(trajectory, round1))
                selected, objective_seed, objective_final = (
                    choice.selected, choice.objective_seed, choice.objective_final)
                final = "" if selected is None else trajectory[selected]
            if choice is not None and choice.seed_samples is not None:
                # sampling mode: the final check sampled the seed and its choice on the same fresh
                # seeds; those paired samples are also the seed-vs-final report
                scores_seed, tc_seed, ratings_seed = self._summarize(choice.seed_samples)
                scores_final, tc_final, ratings_final = self._summarize(choice.final_samples)
            elif round1:
                # the final instruction is sampled on the round-1 seeds, so it is compared with
                # the seed's round-1 responses on the same queries and random numbers
                scores_seed, tc_seed, ratings_seed = self._summarize(round1)
                final_samples = await self._phase(
                    "report", None,
                    lambda: self._sample(final, [(q, self._round_seeds(1, q)) for q in self.queries],
                                         phase="report", round=len(trajectory)))
                scores_final, tc_final, ratings_final = self._summarize(final_samples)
                if (final != self.seed_instruction and tc_seed is not None
                        and tc_final is not None and tc_final < tc_seed):
                    # The pooled likelihood objective is only a proxy for the total-correlation
                    # bound; fresh samples on the same queries and seeds are the direct measure.
                    # An instruction that loses to the seed there is not returned.
                    self.notes.append(
                        f"the instruction chosen by the pooled objective (round {selected}) scored "
                        f"below the seed on fresh samples (TC bound {tc_final:.3f} < {tc_seed:.3f}): "
                        "the seed instruction is returned")
                    final, selected = self.seed_instruction, 0
                    scores_final, tc_final, ratings_final = scores_seed, tc_seed, ratings_seed
                    objective_final = objective_seed
        except BudgetExhausted as e:
            self._event("stop", reason="budget", detail=str(e), phase="final")
            if stop_reason != "budget":
                stop_reason, stop_detail = "budget", str(e)
            if objective_final is None and self.pools_version >= 1:
                self.notes.append("the final check did not finish within the budget: the last "
                                  "chosen instruction is returned without comparing it to the seed")
            else:
                self.notes.append("the seed-vs-final value scores did not finish within the budget")
        result = OptimizeResult(
            instruction=final,
            seed_instruction=self.seed_instruction,
            mode=self.mode,
            stop_reason=stop_reason,
            stop_detail=stop_detail,
            run_dir=self.rundir.path,
            rounds_completed=rounds_completed,
            selected_round=selected,
            scores_seed=scores_seed,
            scores_final=scores_final,
            ratings_seed=ratings_seed,
            ratings_final=ratings_final,
            objective_seed=objective_seed,
            objective_final=objective_final,
            tc_seed=tc_seed,
            tc_final=tc_final,
            history=[self.round_records[t] for t in sorted(self.round_records)],
            calls=self.calls(),
            accounting=self.accounting_json(),
            notes=list(self.notes),
        )
        self._write_outputs(result)
        return result

    async def _select_final(self, trajectory: list[str], round1: list[Scored]) -> FinalChoice:
        """Never worse than the seed: the best instruction of the trajectory by the objective.

        Likelihood/proxy modes: J(e) on the final pools for every distinct trajectory instruction.
        Sampling mode: the seed against the last one, both on fresh seeds; the seed only if the last
        one is demonstrably worse (`scoring.seed_comes_back`; the result's notes
        give the numbers). Otherwise ties go to the later one. With `weigh_bare` the bare model (no
        instruction) is then sampled on the same queries and seeds and may replace the pick
        (`_bare_wins`). The check runs on `final_queries` when the run keeps some aside.
        """
        if self.mode != "sampling":
            scores: dict[str, float] = {}
            for i, e in enumerate(trajectory):
                if e not in scores:
                    scores[e] = (await self.score_instruction(e, len(trajectory), tag="final")).score
                self.emit("advance", phase="final", done=i + 1, total=len(trajectory))
            best = max(range(len(trajectory)), key=lambda i: (scores[trajectory[i]], i))
            return FinalChoice(best, scores[trajectory[0]], scores[trajectory[best]])
        last = len(trajectory) - 1
        changed = last > 0 and trajectory[last] != trajectory[0]
        if not changed and not self.params.weigh_bare:
            seed_score = _finite(sampling_score(round1).score)
            return FinalChoice(last, seed_score, seed_score)
        # Both on fresh seeds that no round used: the seed's round-1 samples took part in round
        # 1's choice (as the winner they overrate the seed, as the loser they underrate it), so
        # they cannot judge it fairly against e^T. Common random numbers pair the two.
        queries = self.final_queries or self.queries
        where = (f"{len(queries)} queries no round saw" if self.final_queries
                 else f"{len(queries)} queries")
        plan = [(q, self._final_seeds(q)) for q in queries]
        seed_samples = await self._sample(trajectory[0], plan, phase="final", round=last)
        seed_score = sampling_score(seed_samples).score
        pick, picked = last, seed_samples
        if changed:
            last_samples = await self._sample(trajectory[last], plan, phase="final", round=last)
            final_score = sampling_score(last_samples).score
            seed_back, p = seed_comes_back(last_samples, seed_samples)
            pick = 0 if seed_back else last
            picked = seed_samples if pick == 0 else last_samples
            self.notes.append(
                f"final check on fresh seeds over {where}: mean f of round "
                f"{last}'s instruction {final_score:.3f}, of the seed {seed_score:.3f}; one-sided "
                f"paired t-test that it is worse: p = {p:.3f} (alpha {FINAL_CHECK_ALPHA}): "
                + ("the seed is returned" if pick == 0 else f"round {last}'s instruction is kept"))
        choice = FinalChoice(pick, _finite(seed_score), _finite(sampling_score(picked).score),
                             seed_samples, picked)
        if self.params.weigh_bare:
            bare_samples = await self._sample("", plan, phase="final", round=last)
            for q in self.final_queries:  # the TC bound's bare reference on queries no round saw
                self.bare_logq[q.id] = [s.log_qphi for s in bare_samples
                                        if s.query_id == q.id and s.log_qphi is not None]
            which = "the seed" if pick == 0 else f"round {pick}'s instruction"
            if self._bare_wins(picked, bare_samples, which):
                choice = FinalChoice(None, choice.objective_seed,
                                     _finite(sampling_score(bare_samples).score),
                                     seed_samples, bare_samples)
        return choice

    def _bare_wins(self, picked: list[Scored], bare: list[Scored], which: str) -> bool:
        """Whether no instruction (the bare model) is returned instead of the final check's pick
        (`scoring.bare_model_wins`: the higher mean on kept-aside queries, evidence on the rounds'
        own; docs/method.md, step 8), with a note giving the numbers."""
        bare_score, picked_score = sampling_score(bare).score, sampling_score(picked).score
        head = (f"final check against the bare model (no instruction) on the same seeds: mean f "
                f"{bare_score:.3f} against {picked_score:.3f} for {which}; ")
        wins, p = bare_model_wins(picked, bare, kept_aside=bool(self.final_queries))
        if p is None:
            rule = "on queries no round saw the higher mean decides: "
        else:
            rule = (f"one-sided paired t-test that {which} is worse: p = {p:.3f} "
                    f"(alpha {FINAL_CHECK_ALPHA}): ")
        self.notes.append(head + rule + ("no instruction is returned" if wins else f"{which} is kept"))
        return wins

    def _write_outputs(self, result: OptimizeResult) -> None:
        self._save_accounting()
        fp = self.fingerprint()
        self.rundir.write_text("instruction.txt", result.instruction.strip() + "\n")
        provenance = {
            "picaco_version": picaco.__version__,
            "value_set": {
                "name": self.value_set.name, "version": self.value_set.version,
                "fingerprint": self.value_set.fingerprint(), "ids": self.value_ids,
                "weights": self.weights,
            },
            "roles": {k: fp[k] for k in ("target", "optimizer", "proxy", "judge", "redundancy")},
            "config_hash": config_hash(fp),
            "params": {**fp["params"],
                       **{k: getattr(self.params, k) for k in FINAL_CHECK_ONLY_PARAMS}},
            "mode": self.mode,
            "queries": fp["queries"],
            "final_queries": [q.id for q in self.final_queries],
            "seed_instruction": self.seed_instruction,
            "init_from": self.init_from,
            "instruction": result.instruction,
            "instruction_sha256": hashlib.sha256(result.instruction.encode()).hexdigest(),
            "selected_round": result.selected_round,
            "scores": {"seed": result.scores_seed, "final": result.scores_final},
            "ratings": {"seed": result.ratings_seed, "final": result.ratings_final},
            "objective": {"seed": result.objective_seed, "final": result.objective_final},
            "tc_bound": {"seed": result.tc_seed, "final": result.tc_final},
            "stop_reason": result.stop_reason,
            "stop_detail": result.stop_detail,
            "rounds_completed": result.rounds_completed,
            "accounting": self.accounting_json(),
            "estimate": self.estimate().to_json(),
            "notes": result.notes,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # the embedded target's answers depend on the CPU llama.cpp was built for
            "machine": machine_info(),
        }
        template = getattr(self.target, "system_template", None)
        if template:
            # what to deploy: the fixed template with the optimized instruction in its slot
            provenance["system_template"] = template
            self.rundir.write_text("system_prompt.txt", fill_template(template, result.instruction) + "\n")
        turns = getattr(self.target, "prior_turns", ())
        if turns:
            # the instruction was chosen for a model that also sees these exchanges: they deploy with it
            provenance["prior_turns"] = turns_as_pairs(turns)
            self.rundir.write_text("prior_turns.jsonl", "".join(
                json.dumps(pair, ensure_ascii=False) + "\n" for pair in provenance["prior_turns"]))
        self.rundir.write_json("provenance.json", provenance)
        self.rundir.write_json("result.json", result.to_json())
        self._event("end", stop_reason=result.stop_reason, instruction_hash=instruction_hash(
            result.instruction))

    def _start_data(self, resumed: bool) -> dict:
        est = self.estimate()
        return {"resumed": resumed, "run_dir": str(self.rundir.path), "mode": self.mode,
                "rounds": self.params.rounds, "estimate": est.to_json(),
                "estimate_text": est.describe(),
                "titles": {v.id: v.title for v in self.value_set.values}}

    def _end_data(self, result: OptimizeResult) -> dict:
        return {"stop_reason": result.stop_reason, "rounds_completed": result.rounds_completed,
                "run_dir": str(result.run_dir), "instruction": result.instruction,
                "scores_seed": result.scores_seed, "scores_final": result.scores_final}

    def _preflight_warnings(self) -> list[str]:
        out = []
        est = self.estimate()
        if self.budget is not None and self.budget.max_calls is not None:
            left = self.budget.max_calls - self.budget.calls
            if left < est.first_round_calls:
                out.append(f"the call budget ({left} left) cannot finish one round "
                           f"(~{est.first_round_calls} calls): the run will stop early")
            elif left < est.total_calls:
                out.append(f"the call budget ({left} left) is below the estimate "
                           f"(~{est.total_calls} calls): the run may stop before round "
                           f"{self.params.rounds}")
        if self.params.replace_alpha is not None and self.mode != "sampling":
            out.append(f"replace_alpha applies to sampling-mode rounds; this run is in {self.mode} "
                       "mode, where the best candidate by J replaces the incumbent: it goes unused")
        if self.final_queries and self.mode != "sampling":
            out.append(f"final_queries applies to the sampling-mode final check; this run is in "
                       f"{self.mode} mode, where the final check scores on the pools of the "
                       "rounds' queries, so the queries kept aside are not used")
        model = getattr(getattr(self.optimizer, "backend", None), "model", "") or ""
        size = _model_params_billions(model)
        if size is not None and size < 1.0:
            out.append(f"the optimizer model {model!r} is small (~{size:g}B parameters); small "
                       "models write poor instructions: use a stronger optimizer if you can")
        return out


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def config_hash(fingerprint: dict) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the public API -----------------------------------------------------------------------------------


def resolve_seed(value_set: ValueSet, seed_instruction: str | None,
                  init_from: str | Path | None) -> tuple[str, str | None]:
    if seed_instruction is not None and init_from is not None:
        raise ConfigError("give either seed_instruction or init_from, not both")
    if init_from is not None:
        path = Path(init_from).expanduser()
        if path.is_dir():
            text = read_final_instruction(path)
        elif path.is_file():
            text = path.read_text(encoding="utf-8").strip()
        else:
            raise ConfigError(f"init_from: {path} is neither a run directory nor a text file")
        if not text:
            raise ConfigError(f"init_from: {path} holds an empty instruction")
        return text, str(path)
    if seed_instruction is not None:
        if not seed_instruction.strip():
            raise ConfigError("the seed instruction is empty")
        return seed_instruction.strip(), None
    return proposer.default_seed_instruction(value_set), None


def select_queries(queries: Sequence[Query],
                    params: OptimizeParams) -> tuple[list[Query], list[Query], list[str]]:
    """The training-split queries the rounds use, those kept for the final check alone (the next
    `final_queries` of the split), and warnings."""
    warnings = []
    train = [q for q in queries if q.split != "test"]
    if len(train) < len(queries):
        warnings.append(f"{len(queries) - len(train)} test-split queries are left out of "
                        "optimization (they are for evaluation)")
    if not train:
        raise ConfigError("no optimization queries: every query is in the test split")
    n = params.n_queries
    if n is not None and len(train) < n:
        warnings.append(f"only {len(train)} queries are available; the run uses all of them "
                        f"(n_queries = {n})")
    used = train if n is None else train[:n]
    held = train[len(used):len(used) + params.final_queries]
    if params.final_queries and len(held) < params.final_queries:
        warnings.append(
            f"final_queries = {params.final_queries} but only {len(held)} training queries are left "
            "after the rounds' " + ("(the final check reuses the rounds' queries)" if not held
                                    else "(the final check uses those)"))
    return used, held, warnings


async def optimize(
    *,
    target,
    optimizer,
    judge: Judge,
    redundancy: RedundancyScorer,
    value_set: ValueSet,
    queries: Sequence[Query],
    params: OptimizeParams | str,
    run_dir: str | Path,
    seed_instruction: str | None = None,
    init_from: str | Path | None = None,
    proxy=None,
    progress: ProgressSink | None = None,
    budget: Budget | None = None,
    config=None,
    startup_cost: dict | None = None,
    refinish: bool = False,
) -> OptimizeResult:
    """Optimize one meta-instruction for `value_set` with PICACO; resumable in `run_dir`.

    `target`, `optimizer` and `proxy` are LLMClients; `params` an OptimizeParams or a preset name;
    `config` (optional) the caller's resolved configuration (a RunConfig or a dict), stored in
    config.json for reading.
    Rerunning with the same arguments on the same run directory resumes (or returns the finished
    result); a different configuration there is a ConfigError. `refinish` ends a finished run again:
    its rounds are kept, the final check and the report run with this code, and the old outputs move
    to previous/N/.
    """
    if isinstance(params, str):
        if params not in PRESETS:
            raise ConfigError(f"unknown preset {params!r}: use one of {', '.join(PRESETS)}")
        params = PRESETS[params]
    seed, source = resolve_seed(value_set, seed_instruction, init_from)
    used, held, warnings = select_queries(queries, params)
    if refinish:
        require_finished(run_dir)
    rundir = RunDir(run_dir)
    engine = Engine(
        target=target, optimizer=optimizer, judge=judge, redundancy=adapt_redundancy(redundancy, value_set),
        value_set=value_set, queries=used, final_queries=held, params=params, run_dir=rundir,
        seed_instruction=seed,
        init_from=source, proxy=proxy, progress=progress, budget=budget, warnings=warnings,
        run_config=_public_config(config), startup_cost=startup_cost, refinish=refinish,
    )
    try:
        return await engine.run()
    finally:
        rundir.close()
        engine.progress.close()


def _public_config(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "public_dict"):
        return config.public_dict()
    if isinstance(config, dict):
        return json.loads(json.dumps(config, default=str))
    raise ConfigError(f"config must be a RunConfig or a dict, not {type(config).__name__}")


def optimize_sync(**kwargs) -> OptimizeResult:
    """:func:`optimize` for code without an event loop."""
    return asyncio.run(optimize(**kwargs))


def adapt_redundancy(model, value_set: ValueSet | None = None) -> RedundancyScorer:
    """Accept anything with `log_redundancy(spec, items)` (async or not), or a
    :class:`picaco.redundancy.RedundancyModel` (`log_q(items)`, bound to its value set)."""
    fn = getattr(model, "log_redundancy", None)
    if fn is not None:
        return model if inspect.iscoroutinefunction(fn) else _SyncRedundancy(model)
    if callable(getattr(model, "log_q", None)):
        bound = getattr(model, "value_set", None)
        if value_set is not None and bound is not None and bound.fingerprint() != value_set.fingerprint():
            raise ConfigError(
                f"the redundancy model was built for value set {bound.name!r}, not {value_set.name!r}"
            )
        return _BoundRedundancy(model)
    raise ConfigError(f"{type(model).__name__} provides neither log_redundancy(spec, items) nor "
                      "log_q(items)")


class _SyncRedundancy:
    def __init__(self, model):
        self.model = model

    def identity(self) -> dict | None:
        return _identity(self.model)

    async def log_redundancy(self, spec: str, items: list[tuple[str, str]]) -> list[float]:
        return [float(x) for x in await asyncio.to_thread(self.model.log_redundancy, spec, items)]


class _BoundRedundancy:
    """A q_phi model that already holds s (its value set's texts): `spec` is not needed."""

    def __init__(self, model):
        self.model = model

    def identity(self) -> dict | None:
        return _identity(self.model)

    async def log_redundancy(self, spec: str, items: list[tuple[str, str]]) -> list[float]:
        return [float(x) for x in await asyncio.to_thread(self.model.log_q, list(items))]

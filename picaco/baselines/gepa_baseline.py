"""GEPA (Agrawal et al., 2025, "GEPA: Reflective Prompt Evolution") as a PICACO baseline, run through
the real `gepa` package (an optional extra: ``pip install 'picaco[gepa]'``).

The candidate is one component, ``{"system_prompt": text}``. Our adapter answers a batch of train
queries with the target under that system prompt, has the optimization judge rate every value, and
gives GEPA per example the mean rating over the values (1–5, so GEPA's "perfect score" is 5) plus the
per-value ratings as GEPA's optional multi-objective scores (used when ``frontier`` is "objective",
"hybrid" or "cartesian"). For reflection it shows, per example, the query, the response and feedback
naming the value rated lowest. GEPA's reflection LM is the optimizer role.

GEPA is synchronous and our clients are async: the search runs in a worker thread and every model
call is submitted to the event loop that called ``prepare`` (``run_coroutine_threadsafe``), so the
clients are only ever used on their own loop.

Budget: ``max_calls`` caps every request of the search (target samples, judge calls, reflections),
counted on the shared `Accounting` with cache hits included, like OPRO. GEPA itself counts "metric
calls" (examples evaluated), so three guards translate: ``max_metric_calls`` = max_calls // samples
(a loose upper bound, each example costs at least its samples); a stopper GEPA checks before every
iteration that refuses to start one unless the costliest iteration possible (reflection minibatch
scored twice, one reflection, a full validation pass) fits at the costliest per-example cost seen;
and a hard stop inside the adapter and the reflection LM that aborts any request that would pass the
cap. The spend is in ``gepa/result.json`` and ``methods.json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from picaco.baselines.base import SearchMethod, fingerprint, value_list
from picaco.baselines.opro import requests_made
from picaco.data.queries import Query
from picaco.errors import BudgetExhausted, ConfigError, PicacoError
from picaco.llm.accounting import Accounting
from picaco.llm.base import Message, chat
from picaco.llm.client import LLMClient
from picaco.optimize.proposer import fixed_part_note

COMPONENT = "system_prompt"
#: the pin tested with; GEPA's adapter protocol and stopper hooks are what we rely on
GEPA_REQUIREMENT = "gepa>=0.1.4,<0.2"
INSTALL_HINT = "GEPA needs the optional `gepa` package: pip install 'picaco[gepa]' (or pip install 'gepa>=0.1.4,<0.2')"
#: GEPA gets per-example mean ratings; an example with no scored value counts as the scale's floor
UNSCORED_EXAMPLE = 1.0
FRONTIERS = ("instance", "objective", "hybrid", "cartesian")
REFLECTION_SYSTEM = "You improve system prompts for an AI assistant."
#: our reflection prompt (GEPA fills <curr_param> and <side_info>); the values are added per run
REFLECTION_TEMPLATE = """The system prompt below was given to an AI assistant:
```
<curr_param>
```
A judge rated the assistant's answers against these values (1 = violates, 5 = fully honours):
{values}

Here are user messages, the assistant's answers and the judge's feedback:
```
<side_info>
```
Write an improved system prompt that keeps what works and fixes the weaknesses the feedback points out,
so that answers honour all of the values together without neglecting any.
Use at most {words} words. Put the new system prompt, and nothing else, inside ``` blocks."""


def import_gepa():
    """The `gepa` module, or a one-line error telling how to install it."""
    try:
        import gepa
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return gepa


@dataclass(frozen=True)
class GepaParams:
    #: requests the whole search may issue (target + judge + reflection, cache hits included)
    max_calls: int
    #: train queries in GEPA's validation set (its Pareto tracking; fixed for the search)
    minibatch: int = 8
    #: train queries per reflective step (GEPA's reflection_minibatch_size)
    reflection_minibatch: int = 3
    samples_per_query: int = 1
    optimizer_temperature: float = 1.0
    optimizer_max_tokens: int = 400
    response_temperature: float = 0.7
    max_new_tokens: int = 256
    instruction_max_chars: int = 1500
    #: GEPA's frontier_type; "objective"/"hybrid"/"cartesian" use the per-value scores
    frontier: str = "instance"
    candidate_selection: str = "pareto"
    use_merge: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_calls < 1:
            raise ConfigError("GEPA needs a call budget of at least 1")
        if self.minibatch < 1 or self.reflection_minibatch < 1 or self.samples_per_query < 1:
            raise ConfigError("GEPA: minibatch, reflection_minibatch and samples_per_query must be >= 1")
        if self.frontier not in FRONTIERS:
            raise ConfigError(f"GEPA frontier {self.frontier!r}: use one of {', '.join(FRONTIERS)}")


@dataclass
class GepaResult:
    instruction: str
    best_score: float | None
    per_value: dict[str, float]
    spent: int
    max_calls: int
    metric_calls: int
    candidates: int
    stop_reason: str
    scores: list[float]
    fingerprint: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "GepaResult":
        return cls(**d)


class _BudgetStop(Exception):
    """Raised inside GEPA's thread when the next request would pass the budget."""


def mean_rating(ratings: dict[str, float | None]) -> float:
    scored = [r for r in ratings.values() if r is not None]
    return sum(scored) / len(scored) if scored else UNSCORED_EXAMPLE


def weakest_feedback(value_set, ratings: dict[str, float | None], notes: dict[str, str]) -> str:
    """The judge's verdict in words, naming the value rated lowest (the one to fix first)."""
    scored = {v: r for v, r in ratings.items() if r is not None}
    if not scored:
        return "The judge could not rate this answer on any value."
    lowest = min(scored, key=lambda v: (scored[v], v))
    value = value_set.get(lowest)
    parts = [f"Weakest value: {value.title} (rated {scored[lowest]:.1f} of 5): {' '.join(value.definition.split())}"]
    if notes.get(lowest):
        parts.append(f"Judge's note: {notes[lowest]}")
    others = ", ".join(f"{v} {r:.1f}" for v, r in scored.items() if v != lowest)
    if others:
        parts.append(f"Other values: {others}.")
    return " ".join(parts)


class BudgetGuard:
    """Counts the search's requests on one Accounting and decides what still fits."""

    def __init__(self, accounting: Accounting, params: GepaParams, val_size: int):
        self.accounting = accounting
        self.params = params
        self.val_size = val_size
        self.start = requests_made(accounting)
        self.prior = 0  # spent in earlier sessions of a resumed search
        self.cost_example = params.samples_per_query  # costliest per-example scoring seen
        self.stop_reason: str | None = None

    def spent(self) -> int:
        return self.prior + requests_made(self.accounting) - self.start

    def observe(self, examples: int, cost: int) -> None:
        if examples:
            self.cost_example = max(self.cost_example, -(-cost // examples))

    def iteration_cost(self) -> int:
        """The most one GEPA iteration can ask: the reflection minibatch scored for the parent and the
        child, one reflection, and a full validation pass of an accepted child."""
        p = self.params
        return (2 * p.reflection_minibatch + self.val_size) * self.cost_example + 1

    def fits(self, requests: int) -> bool:
        return self.spent() + requests <= self.params.max_calls

    def __call__(self, gepa_state: Any) -> bool:
        """GEPA's stopper: checked before every iteration."""
        if self.stop_reason is not None:
            return True
        if not self.fits(self.iteration_cost()):
            self.stop_reason = "budget"
            return True
        return False


class PicacoGepaAdapter:
    """GEPA's adapter over our target, judge and event loop. Data instances are {"id", "text"}."""

    #: GEPA looks this attribute up: None means "use GEPA's reflective proposer with our reflection LM"
    propose_new_texts = None

    def __init__(self, *, target: LLMClient, optimizer: LLMClient, judge, value_set, params: GepaParams,
                 guard: BudgetGuard, loop: asyncio.AbstractEventLoop):
        self.target = target
        self.optimizer = optimizer
        self.judge = judge
        self.value_set = value_set
        self.params = params
        self.guard = guard
        self.loop = loop
        self.reflections = 0
        #: a non-budget error of the reflection LM (GEPA would swallow it and carry on)
        self.failure: BaseException | None = None

    def run(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # -- GEPAAdapter -------------------------------------------------------------------------------
    def evaluate(self, batch: list[dict], candidate: dict[str, str], capture_traces: bool = False):
        from gepa.core.adapter import EvaluationBatch

        if not self.guard.fits(len(batch) * self.guard.cost_example):
            self.guard.stop_reason = "budget"
            raise _BudgetStop
        before = self.guard.spent()
        responses, scores = self.run(self._score(candidate[COMPONENT], batch))
        self.guard.observe(len(batch), self.guard.spent() - before)
        outputs, means, objectives, traces = [], [], [], []
        for inst, texts, per_sample in zip(batch, responses, scores):
            ratings = {v: _mean([s[v].rating for s in per_sample]) for v in self.value_set.ids}
            notes = {v: s[v].note for s in per_sample for v in self.value_set.ids if s[v].note}
            outputs.append({"response": texts[0], "ratings": ratings})
            means.append(mean_rating(ratings))
            objectives.append({v: r for v, r in ratings.items() if r is not None})
            traces.append({"query": inst["text"], "response": texts[0], "ratings": ratings, "notes": notes})
        return EvaluationBatch(outputs=outputs, scores=means, trajectories=traces if capture_traces else None,
                               objective_scores=objectives)

    def make_reflective_dataset(self, candidate, eval_batch, components_to_update):
        records = [
            {
                "User message": t["query"],
                "Assistant's answer": t["response"],
                "Feedback": weakest_feedback(self.value_set, t["ratings"], t["notes"]),
            }
            for t in eval_batch.trajectories or []
        ]
        return {name: records for name in components_to_update}

    # GEPA checkpoints this with its state, so a resumed search keeps counting its earlier spend
    def get_adapter_state(self) -> dict[str, Any]:
        return {"spent": self.guard.spent(), "reflections": self.reflections,
                "cost_example": self.guard.cost_example}

    def set_adapter_state(self, state: dict[str, Any]) -> None:
        # the seed re-evaluation of this session is already counted from `start`; add the old spend
        self.guard.prior = int(state.get("spent", 0))
        self.reflections = int(state.get("reflections", 0))
        self.guard.cost_example = max(self.guard.cost_example, int(state.get("cost_example", 1)))

    # -- the reflection LM (GEPA calls it with a prompt string or chat messages) ---------------------
    def reflect(self, prompt: str | list[dict[str, Any]]) -> str:
        if not self.guard.fits(1):
            self.guard.stop_reason = "budget"
            raise _BudgetStop
        if isinstance(prompt, str):
            messages = (Message("system", REFLECTION_SYSTEM), Message("user", prompt))
        else:
            messages = tuple(Message(m["role"], _text(m["content"])) for m in prompt)
        self.reflections += 1
        p = self.params
        try:
            out = self.run(self.optimizer.generate(
                messages, n=1, temperature=p.optimizer_temperature, max_tokens=p.optimizer_max_tokens,
                seed=p.seed + 1000 * self.reflections,
            ))
        except BudgetExhausted:
            self.guard.stop_reason = "budget (hard cap of the run)"
            raise
        except Exception as e:  # GEPA swallows reflection errors and retries: stop instead
            self.guard.stop_reason = f"error: {e}"
            self.failure = e
            raise
        return _clip_instruction(out[0].text, p.instruction_max_chars)

    async def _score(self, system: str, batch: list[dict]):
        p = self.params
        outs = await asyncio.gather(*(
            self.target.generate(chat(system, inst["text"]), n=p.samples_per_query, seed=p.seed,
                                 temperature=p.response_temperature, max_tokens=p.max_new_tokens)
            for inst in batch
        ))
        texts = [[c.text.strip() for c in cs] for cs in outs]
        items = [(inst["text"], t) for inst, ts in zip(batch, texts) for t in ts]
        flat = await self.judge.score(self.value_set, items)
        per_example, i = [], 0
        for ts in texts:
            per_example.append(flat[i : i + len(ts)])
            i += len(ts)
        return texts, per_example


def _mean(xs: Sequence[float | None]) -> float | None:
    scored = [x for x in xs if x is not None]
    return sum(scored) / len(scored) if scored else None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))


def _clip_instruction(raw: str, max_chars: int) -> str:
    # GEPA extracts the text between ``` itself; an overlong reply is cut so prompts stay comparable
    return raw if len(raw) <= max_chars + 200 else raw[: max_chars + 200]


def reflection_template(value_set, max_chars: int, system_template: str | None = None) -> str:
    text = REFLECTION_TEMPLATE.format(values=value_list(value_set), words=max(20, max_chars // 7))
    # added after format(): a user's template may hold braces of its own
    return text + ("\n" + fixed_part_note(system_template) if system_template else "")


class Gepa(SearchMethod):
    kind = "gepa"

    def __init__(self, *, name: str = "GEPA", **kwargs):
        super().__init__(name=name, **kwargs)
        self.result: GepaResult | None = None

    def describe(self, value_set) -> dict:
        d = super().describe(value_set)
        r = self.result
        d["provenance"] = {
            "best_score": r.best_score, "per_value": r.per_value, "spent": r.spent, "max_calls": r.max_calls,
            "metric_calls": r.metric_calls, "candidates": r.candidates, "stop_reason": r.stop_reason,
            "params": asdict(self.params), "judge": self.optimized_against,
            "optimizer": self.optimizer.backend.identity(), "gepa": _gepa_version(),
        }
        return d

    # -- data ----------------------------------------------------------------------------------------
    def valset(self) -> list[Query]:
        """GEPA's validation set: the searching baselines' common minibatch (as OPRO's)."""
        return self.minibatch()

    def _fingerprint(self, target: LLMClient, value_set) -> str:
        return fingerprint({
            "params": asdict(self.params), "seed": self._seed_text(value_set),
            "values": value_set.fingerprint(), "train": [q.id for q in self.train_queries],
            "val": [q.id for q in self.valset()], "target": target.identity(),
            "optimizer": self.optimizer.backend.identity(), "judge": self.optimized_against,
            "gepa": _gepa_version(),
        })

    # -- the search ----------------------------------------------------------------------------------
    async def prepare(self, target: LLMClient, value_set) -> None:
        if self.result is not None:
            return
        import_gepa()
        fp = self._fingerprint(target, value_set)
        stored = self._load(fp)
        if stored is not None:
            self.result = stored
            return
        self.result = await self.search(target, value_set, fp)
        self.result.fingerprint = fp
        self._save(self.result)

    def _check_accounting(self, acct: Accounting) -> None:
        for role, client in (("optimizer", self.optimizer), ("judge", getattr(self.judge, "client", None))):
            if client is not None and client.accounting is not acct:
                raise ConfigError(f"GEPA counts its spend on one Accounting: the {role} client uses another")

    async def search(self, target: LLMClient, value_set, fp: str = "") -> GepaResult:
        p = self.params
        acct = self.accounting or target.accounting
        self._check_accounting(acct)
        val = [{"id": q.id, "text": q.text} for q in self.valset()]
        train = [{"id": q.id, "text": q.text} for q in self.train_queries]
        if p.max_calls < len(val) * p.samples_per_query:
            raise ConfigError(
                f"GEPA budget of {p.max_calls} calls cannot score even the seed instruction "
                f"({len(val) * p.samples_per_query} target samples before any judging)"
            )
        guard = BudgetGuard(acct, p, len(val))
        adapter = PicacoGepaAdapter(target=target, optimizer=self.optimizer, judge=self.judge,
                                    value_set=value_set, params=p, guard=guard, loop=asyncio.get_running_loop())
        with _run_dir(self.state_dir, fp) as run_dir:
            seed_text = self._seed_text(value_set)
            try:
                state = await asyncio.to_thread(self._optimize, adapter, guard, train, val, run_dir,
                                                seed_text, value_set)
            except _BudgetStop:
                state = _load_state(run_dir)
            except BudgetExhausted:
                guard.stop_reason = "budget (hard cap of the run)"
                state = _load_state(run_dir)
            if adapter.failure is not None:
                raise adapter.failure
            spent = guard.spent()
            self.calls_spent += spent - guard.prior
            return _result_from_state(state, seed_text, value_set.ids, spent, p.max_calls,
                                      guard.stop_reason or "max_metric_calls")

    def _optimize(self, adapter, guard, train, val, run_dir: Path, seed_text: str, value_set):
        """GEPA's search (in a worker thread); returns its final state."""
        gepa = import_gepa()
        from gepa.core.state import GEPAState

        p = self.params
        gepa.optimize(
            seed_candidate={COMPONENT: seed_text},
            trainset=train,
            valset=val,
            adapter=adapter,
            reflection_lm=adapter.reflect,
            reflection_prompt_template=reflection_template(value_set, p.instruction_max_chars,
                                                           getattr(adapter.target, "system_template", None)),
            candidate_selection_strategy=p.candidate_selection,
            frontier_type=p.frontier,
            reflection_minibatch_size=min(p.reflection_minibatch, len(train)),
            perfect_score=5.0,
            use_merge=p.use_merge,
            max_metric_calls=max(1, p.max_calls // p.samples_per_query),
            stop_callbacks=[guard],
            logger=_FileLogger(run_dir / "log.txt"),
            run_dir=str(run_dir),
            cache_evaluation=True,  # GEPA reuses (candidate, example) scores instead of spending again
            seed=p.seed,
            raise_on_exception=True,
            display_progress_bar=False,
        )
        return GEPAState.load(str(run_dir))

    # -- state on disk ---------------------------------------------------------------------------
    def _save(self, result: GepaResult) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "instruction.txt").write_text(result.instruction + "\n", encoding="utf-8")
        tmp = self.state_dir / "result.json.tmp"
        tmp.write_text(json.dumps(result.to_json(), ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(self.state_dir / "result.json")

    def _load(self, fp: str) -> GepaResult | None:
        if self.state_dir is None:
            return None
        try:
            data = json.loads((self.state_dir / "result.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("fingerprint") != fp:
            return None  # another search's result: search again
        try:
            return GepaResult.from_json(data)
        except TypeError:
            return None


class _FileLogger:
    """GEPA's own Logger swaps sys.stdout for the whole process; this one only appends to a file."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, message: str, *args, **kwargs) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(str(message) + "\n")


class _run_dir:
    """GEPA's checkpoint directory: STATE/gepa-FINGERPRINT (so other settings never resume it), or a
    temporary one without a state dir."""

    def __init__(self, state_dir: Path | None, fp: str):
        self.state_dir, self.fp, self.tmp = state_dir, fp, None

    def __enter__(self) -> Path:
        if self.state_dir is None:
            self.tmp = tempfile.mkdtemp(prefix="picaco-gepa-")
            return Path(self.tmp)
        path = self.state_dir / f"gepa-{self.fp or 'run'}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _load_state(run_dir: Path):
    from gepa.core.state import GEPAState

    if not (run_dir / "gepa_state.bin").exists():
        raise PicacoError("GEPA stopped before scoring its seed instruction: raise the call budget")
    return GEPAState.load(str(run_dir))


def _result_from_state(state, seed_text: str, value_ids, spent: int, max_calls: int, stop_reason: str) -> GepaResult:
    """The best candidate by GEPA's validation average (the seed wins ties: it comes first)."""
    scores = [state.get_program_average_val_subset(i)[0] for i in range(len(state.program_candidates))]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else None
    if best is None:
        return GepaResult(seed_text, None, {}, spent, max_calls, 0, 0, stop_reason, [])
    objectives = state.prog_candidate_objective_scores[best] or {}
    return GepaResult(
        instruction=state.program_candidates[best][COMPONENT],
        best_score=float(scores[best]),
        per_value={v: float(objectives[v]) for v in value_ids if v in objectives},
        spent=spent, max_calls=max_calls, metric_calls=int(state.total_num_evals),
        candidates=len(state.program_candidates), stop_reason=stop_reason,
        scores=[float(s) for s in scores],
    )


def _gepa_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("gepa")
    except Exception:  # noqa: BLE001 - not installed: reported as None
        return None

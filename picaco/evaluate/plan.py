"""The pre-flight plan of an evaluation: what each method will cost before anything is loaded.

`picaco evaluate` and `picaco compare` print it before they start and stop after it with `--dry-run`.
It reads only the config, the value set, the queries and the output directory's rows (what an
earlier, interrupted evaluation already answered); no model is loaded and nothing is written.
Counts assume no call is answered from the cache and every judge rating is read at the first asking
(an LLM judge asks again, up to `MAX_RETRIES` times, when it is not).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from picaco.baselines import SEARCH_METHODS, canonical_name, make_simple
from picaco.config import RunConfig
from picaco.evaluate.harness import SAMPLES, read_rows
from picaco.judge.llm import MAX_RETRIES


@dataclass(frozen=True)
class MethodPlan:
    name: str
    kind: str  # "baseline", "instruction" or "search"
    calls_per_query: int  # target calls to answer one query
    responses: int  # queries x samples
    done: int  # responses the output directory already holds
    judge_calls_per_response: int
    #: a searching baseline's budget in requests (None for the others); spent only when its
    #: responses are not all written yet (they are written after the search)
    search_budget: int | None = None
    search_budget_note: str = ""
    #: the search finished in an earlier process (its result is in the output directory and is
    #: reused when the settings are the same)
    search_finished: bool = False

    @property
    def todo(self) -> int:
        return self.responses - self.done

    @property
    def target_calls(self) -> int:
        return self.todo * self.calls_per_query

    @property
    def judge_calls(self) -> int:
        return self.todo * self.judge_calls_per_response

    @property
    def search_calls(self) -> int:
        return self.search_budget if (self.search_budget and self.todo and not self.search_finished) else 0

    @property
    def total_calls(self) -> int:
        return self.target_calls + self.judge_calls + self.search_calls

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "calls_per_query": self.calls_per_query,
                "responses": self.responses, "done": self.done, "target_calls": self.target_calls,
                "judge_calls": self.judge_calls, "search_calls": self.search_calls,
                "search_budget": self.search_budget, "total_calls": self.total_calls}


@dataclass(frozen=True)
class EvaluationPlan:
    n_queries: int
    samples_per_query: int
    judge: str  # how the evaluation judge scores, in words
    out_dir: Path
    methods: list[MethodPlan] = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(m.total_calls for m in self.methods)

    def to_json(self) -> dict:
        return {"n_queries": self.n_queries, "samples_per_query": self.samples_per_query, "judge": self.judge,
                "out_dir": str(self.out_dir), "methods": [m.to_json() for m in self.methods],
                "total_calls": self.total_calls}

    def describe(self) -> str:
        lines = [f"evaluation plan: {len(self.methods)} method(s) x {self.n_queries} queries x "
                 f"{self.samples_per_query} sample(s); {self.judge}; into {self.out_dir}"]
        width = max(len(m.name) for m in self.methods)
        lines.append(f"  {'method':<{width}}  {'calls/query':>11}  {'responses to do':>15}  "
                     f"{'target calls':>12}  {'judge calls':>11}  search")
        for m in self.methods:
            search = (f"up to {m.search_calls:,} requests ({m.search_budget_note})" if m.search_calls
                      else "done" if m.kind == "search" else "")
            lines.append(f"  {m.name:<{width}}  {m.calls_per_query:>11}  {f'{m.todo} of {m.responses}':>15}  "
                         f"{m.target_calls:>12,}  {m.judge_calls:>11,}  {search}".rstrip())
        lines.append(f"  total: about {self.total_calls:,} model calls if none is answered from the cache"
                     if self.total_calls else "  total: nothing left to generate (every response is written)")
        return "\n".join(lines)


def evaluation_plan(
    config: RunConfig,
    methods: Sequence[str],
    instructions: Mapping[str, str | Path] | None = None,
    *,
    out_dir: str | Path,
    n_queries: int | None = None,
    samples_per_query: int = 1,
    search_budget: int | None = None,
    search_budget_note: str = "PICACO's spend",
) -> EvaluationPlan:
    """The plan of `evaluate_config(config, methods, instructions, ...)` with the same arguments.

    `search_budget` is OPRO's and GEPA's budget when it is known before the evaluation (`picaco
    compare --dry-run` passes PICACO's estimate); otherwise it is read from the first PICACO run
    among the instructions, as the evaluation itself does."""
    from picaco.api import load_inputs
    from picaco.evaluate.run import method_order
    from picaco.evaluate.run import search_budget as budget_of

    instructions = {k: Path(v) for k, v in (instructions or {}).items()}
    value_set, queries = load_inputs(config, "test")
    if n_queries is not None:
        queries = queries[:n_queries]
    judge_cfg = config.eval_judge or config.judge
    per_response = judge_cfg.calls_per_response(len(value_set.ids))
    judge = ("evaluation judge: offline (no model calls)" if per_response == 0
             else f"evaluation judge: {judge_cfg.model}, {per_response} call(s) per response, up to "
                  f"{per_response * (1 + MAX_RETRIES)} when a rating has to be asked again")
    out = Path(out_dir)
    wanted = {q.id for q in queries}
    done = Counter(r["method"] for r in read_rows(out / SAMPLES, complete_only=True)
                   if r.get("query_id") in wanted and r.get("sample", 0) < samples_per_query)
    responses = len(queries) * samples_per_query
    order = method_order(methods, instructions)
    plans = []
    for name in order:
        label = name if name in instructions else canonical_name(name)  # the name rows are written under
        common = dict(responses=responses, done=min(done[label], responses), judge_calls_per_response=per_response)
        if name in instructions:
            plans.append(MethodPlan(label, "instruction", 1, **common))
        elif label in SEARCH_METHODS:
            budget, note = search_budget, search_budget_note
            if budget is None:
                budget, note = budget_of(label, None, instructions), "PICACO's spend"
            plans.append(MethodPlan(label, "search", 1, search_budget=budget, search_budget_note=note,
                                    search_finished=(out / label.lower() / "result.json").exists(), **common))
        else:
            plans.append(MethodPlan(label, "baseline", make_simple(label).calls_per_query(value_set), **common))
    return EvaluationPlan(len(queries), samples_per_query, judge, out, plans)

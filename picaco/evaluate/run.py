"""Evaluation from a `RunConfig`, the way `picaco.api` builds an optimization: what `picaco evaluate`
and `picaco compare` call.

    from picaco.config import load_config
    from picaco.evaluate.run import evaluate_config_sync

    result = evaluate_config_sync(
        load_config("picaco.yaml"),
        methods=["Q", "Q+IF", "URIAL", "MP", "Modular", "OPRO", "picaco"],
        instructions={"picaco": "runs/helpfulness-4"},     # a run directory or a text file
        out_dir="evals/helpfulness-4",
    )

Generation uses the run's sampling settings (response temperature and length cap of the preset), the
test split of the query set, the `eval_judge` role (the `judge` when none is configured: the summary
then flags every optimized method as judged by its own optimization judge) and the target role.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from picaco.baselines import (
    Gepa, GepaParams, Instruction, Opro, OproParams, budget_from_run, canonical_name, make_simple,
)
from picaco.config import RunConfig
from picaco.data.queries import Query
from picaco.errors import ConfigError
from picaco.evaluate.harness import EvaluationResult, Progress, evaluate
from picaco.llm.base import Message, turns_as_pairs, turns_from_pairs
from picaco.runtime import Runtime


def default_out_dir(config: RunConfig) -> Path:
    if config.run_dir is not None:
        return Path(config.run_dir) / "evaluation"
    stem = Path(config.values).stem
    return Path("evaluations") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir_of(path: str | Path) -> Path | None:
    """The PICACO run directory behind an instruction: the directory itself, or the directory of its
    `instruction.txt` (the CLI passes the file); None for any other text file."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.name == "instruction.txt" and (p.parent / "accounting.json").exists():
        return p.parent
    return None


def _provenance(path: str | Path) -> dict | None:
    """The provenance.json of the PICACO run behind an instruction, if there is one."""
    p = run_dir_of(path)
    if p is None:
        return None
    try:
        prov = json.loads((p / "provenance.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return prov if isinstance(prov, dict) else None


def provenance_judge(path: str | Path) -> dict | None:
    """The identity of the judge a PICACO run optimized against (its provenance.json), if known."""
    try:
        return _provenance(path)["roles"]["judge"]["identity"]
    except (KeyError, TypeError):
        return None


def deployment_turns(name: str, path: str | Path, config: RunConfig) -> tuple[Message, ...]:
    """The example turns a run's instruction is evaluated with: the deployment it was optimized for.

    Its instruction fills the slot of the system template it was optimized in (evaluated in another
    template, or none, it would be measured in a deployment it was not made for: refused). A run made
    over prior turns deploys with them (its prior_turns.jsonl): under a config with the same turns
    every method gets them; under a config with none, this method alone brings them, as URIAL brings
    its own, so the run is compared with baselines as they are. Under other turns, or a run made
    without turns under a config that adds some: refused. Returns the turns this method brings
    itself (none when it has none, or when the config already frames every method with them)."""
    prov = _provenance(path)
    if prov is None:
        return ()
    made_in = prov.get("system_template")
    if made_in != config.system_template:
        where = "inside a system_template" if made_in else "without a system_template"
        raise ConfigError(
            f"{name}: {path} was optimized {where}; evaluate it with the same `system_template` in the "
            "config (to evaluate its whole deployed prompt as it is, pass its system_prompt.txt instead)"
        )
    made_over = prov.get("prior_turns") or []
    framed = turns_as_pairs(config.turns())
    if made_over and not framed:
        return turns_from_pairs((t["user"], t["assistant"]) for t in made_over)
    if made_over != framed:
        if made_over:
            where, fix = (f"over {len(made_over)} example turns", "the same `prior_turns` in the config, or "
                          "none (it then brings the turns of its prior_turns.jsonl itself)")
        else:
            where, fix = "without example turns", "no `prior_turns` in the config"
        raise ConfigError(f"{name}: {path} was optimized {where}; evaluate it with {fix}")
    return ()


def method_order(methods: Sequence[str], instructions: Mapping[str, Path]) -> list[str]:
    """The names an evaluation runs, in its order: `methods` as given (they may name instructions to
    place them), then the instructions not named among them."""
    return list(methods) + [n for n in instructions if n not in methods]


def check_no_own_turns(method, config: RunConfig, value_set) -> None:
    """A method that brings its own example turns (URIAL) would be shown two sets under `prior_turns`."""
    if config.prior_turns and method.prior_turns(value_set):
        raise ConfigError(
            f"{method.name} brings its own example turns and the config adds `prior_turns`; leave it out, "
            "or evaluate its system prompt as an instruction (it then gets the config's turns)"
        )


def _search_params(kind, label: str, config: RunConfig, max_calls: int, overrides: Mapping | None,
                   **extra):
    """A searching baseline's settings from the run's preset (same minibatch, sampling and length
    caps as PICACO, so the comparison is budget for budget), then any overrides."""
    p = config.params()
    base = {
        "max_calls": max_calls,
        "minibatch": p.minibatch,
        "samples_per_query": p.samples_per_query,
        "optimizer_temperature": p.optimizer_temperature,
        "optimizer_max_tokens": p.optimizer_max_tokens,
        "response_temperature": p.response_temperature,
        "max_new_tokens": p.max_new_tokens,
        "instruction_max_chars": p.instruction_max_chars,
        "seed": p.seed,
        **extra,
    }
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in fields(kind)})
    if unknown:
        raise ConfigError(f"unknown {label} setting(s): {', '.join(unknown)}")
    return kind(**{**base, **overrides})


def opro_params(config: RunConfig, max_calls: int, overrides: Mapping | None = None) -> OproParams:
    """OPRO's settings: PICACO's candidates per round as proposals per step, the rest as above."""
    return _search_params(OproParams, "OPRO", config, max_calls, overrides,
                          candidates_per_step=max(1, config.params().candidates))


def gepa_params(config: RunConfig, max_calls: int, overrides: Mapping | None = None) -> GepaParams:
    """GEPA's settings: PICACO's minibatch as GEPA's validation set (GEPA's own reflection
    minibatch stays 3), the rest as above."""
    return _search_params(GepaParams, "GEPA", config, max_calls, overrides)


def search_budget(method: str, explicit: int | None, instructions: Mapping[str, Path]) -> int:
    """A searching baseline's call budget: the explicit one, else the spend of the first PICACO run
    among the instructions (so both cost what PICACO cost)."""
    if explicit is not None:
        return explicit
    for path in instructions.values():
        run = run_dir_of(path)
        if run is not None and (run / "accounting.json").exists():
            return budget_from_run(run)
    raise ConfigError(
        f"{method} needs a call budget: pass a PICACO run directory as an instruction (its spend is used) "
        f"or set {method.lower()}_max_calls"
    )


def _search_method(method: str, config: RunConfig, rt: Runtime, instructions: Mapping[str, Path], out: Path,
                   *, judge, max_calls: int | None, overrides: Mapping | None):
    """OPRO or GEPA over the train split, scored by the optimization judge, state under OUT/<method>."""
    from picaco.api import load_inputs

    value_set, train = load_inputs(config, "train")
    n_train = config.params().n_queries
    if n_train is not None:
        train = train[:n_train]
    budget = search_budget(method, max_calls, instructions)
    common = dict(optimizer=rt.client("optimizer"), judge=judge, train_queries=train,
                  seed_instruction=config.seed_text(value_set), accounting=rt.accounting,
                  state_dir=out / method.lower())
    if method == "GEPA":
        return Gepa(params=gepa_params(config, budget, overrides), **common)
    return Opro(params=opro_params(config, budget, overrides), **common)


async def evaluate_config(
    config: RunConfig,
    methods: Sequence[str],
    instructions: Mapping[str, str | Path] | None = None,
    *,
    out_dir: str | Path | None = None,
    n_queries: int | None = None,
    samples_per_query: int = 1,
    seed: int = 0,
    temperature: float | None = None,
    max_tokens: int | None = None,
    opro_max_calls: int | None = None,
    opro: Mapping | None = None,
    gepa_max_calls: int | None = None,
    gepa: Mapping | None = None,
    test_queries: Sequence[Query] | None = None,
    search_dir: str | Path | None = None,
    baseline: str | None = "Q",
    n_boot: int = 2000,
    runtime: Runtime | None = None,
    redundancy=None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Evaluate named baselines and given instructions on the test split.

    `methods` holds baseline names (Q, Q+IF, URIAL, URIAL+Sum, MP, Modular, OPRO, GEPA) and may name
    entries of `instructions` to place them; instructions not named are evaluated after the rest.
    OPRO and GEPA search on the train split under PICACO's spend (or `opro_max_calls` /
    `gepa_max_calls`); `opro` / `gepa` override their settings. `test_queries` replaces the test split
    (the studies wrap queries in jailbreak templates); `search_dir` is where OPRO and GEPA keep their
    state (default: the output directory), so several evaluations can share one search.
    """
    from picaco.api import build_redundancy, load_inputs

    instructions = {k: Path(v) for k, v in (instructions or {}).items()}
    order = method_order(methods, instructions)
    if not order:
        raise ConfigError("nothing to evaluate: name at least one method or instruction")
    value_set, queries = load_inputs(config, "test")
    if test_queries is not None:
        queries = list(test_queries)
    if n_queries is not None:
        queries = queries[:n_queries]
    params = config.params()
    out = Path(out_dir) if out_dir is not None else default_out_dir(config)
    own_runtime = runtime is None
    rt = runtime or Runtime(config)
    try:
        eval_judge = rt.judge("eval_judge")
        opt_identity_cache: list[dict] = []

        def optimization_judge_identity() -> dict:
            # with no eval_judge configured the evaluation judge *is* the optimization judge
            if not opt_identity_cache:
                j = eval_judge if config.eval_judge is None else rt.judge("judge")
                opt_identity_cache.append(j.identity())
            return opt_identity_cache[0]

        built = []
        for name in order:
            if name in instructions:
                path = instructions[name]
                turns = deployment_turns(name, path, config)
                against = provenance_judge(path) or optimization_judge_identity()
                built.append(Instruction.from_path(path, name, optimized_against=against, turns=turns))
            elif canonical_name(name) in ("OPRO", "GEPA"):
                built.append(_search_method(
                    canonical_name(name), config, rt, instructions,
                    Path(search_dir) if search_dir is not None else out,
                    judge=eval_judge if config.eval_judge is None else rt.judge("judge"),
                    max_calls={"OPRO": opro_max_calls, "GEPA": gepa_max_calls}[canonical_name(name)],
                    overrides={"OPRO": opro, "GEPA": gepa}[canonical_name(name)],
                ))
            else:
                built.append(make_simple(name))
                check_no_own_turns(built[-1], config, value_set)
        return await evaluate(
            built,
            target=rt.client("target"),
            judge=eval_judge,
            redundancy=redundancy if redundancy is not None else build_redundancy(value_set),
            value_set=value_set,
            queries=queries,
            out_dir=out,
            seed=seed,
            temperature=params.response_temperature if temperature is None else temperature,
            max_tokens=params.max_new_tokens if max_tokens is None else max_tokens,
            samples_per_query=samples_per_query,
            baseline=baseline,
            n_boot=n_boot,
            progress=progress,
        )
    finally:
        if own_runtime:
            await rt.aclose()


def evaluate_config_sync(config: RunConfig, methods: Sequence[str], instructions=None, **kwargs) -> EvaluationResult:
    """Synchronous wrapper of :func:`evaluate_config`."""
    return asyncio.run(evaluate_config(config, methods, instructions, **kwargs))

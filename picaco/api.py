"""The Python API: everything the command line does, callable from code.

    from picaco import api
    from picaco.config import load_config

    config = load_config("picaco.yaml")          # or RunConfig(values="confucianism-4", preset="tiny")
    result = api.optimize(config, run_dir="runs/confucianism")
    print(result.instruction)

The CLI adds nothing these functions cannot do: it parses flags into a `RunConfig`, picks a progress
display and prints the result.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from picaco.config import RunConfig
from picaco.data.queries import Query, load_queries
from picaco.errors import ConfigError
from picaco.runtime import Runtime
from picaco.values import ValueSet, load_value_set


def default_run_dir(config: RunConfig) -> Path:
    stem = Path(config.values).stem if config.values.endswith((".yaml", ".yml")) else config.values
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_models(config: RunConfig) -> None:
    """Fail before anything is written when an embedded role's model is unusable (not pulled, a
    missing or non-GGUF path), naming the config field. Cheap: no model is loaded or hashed."""
    from picaco.llm.registry import check_chat_model

    roles = {"target": config.target, "optimizer": config.optimizer}
    for name, judge in (("judge", config.judge), ("eval_judge", config.eval_judge)):
        if judge is not None and judge.type == "llm":
            roles[name] = judge
    for name, role in roles.items():
        if role.backend == "embedded":
            check_chat_model(role.model, field=f"{name}.model")


def load_inputs(config: RunConfig, split: str = "train") -> tuple[ValueSet, list[Query]]:
    """The value set and the queries of one split (the set's family query set unless one is named),
    then a check of the embedded models: every bad input fails here, before any run directory exists."""
    value_set = load_value_set(config.values)
    source = config.queries
    if source is None:
        if value_set.family not in ("hh", "schwartz"):
            raise ConfigError(
                f"value set {value_set.name!r} has family {value_set.family!r}: name a query file with `queries:`"
            )
        source = value_set.family
    queries = load_queries(source, split)
    check_models(config)
    return value_set, queries


def build_redundancy(value_set: ValueSet):
    from picaco.embeddings import shared_embedder
    from picaco.redundancy import RedundancyModel

    # one process-wide embedder: the offline judge embeds the same texts and shares its cache
    return RedundancyModel(shared_embedder(), value_set)


def _scores_likelihoods(role) -> bool | None:
    """Whether a role's backend can score a given response's log-likelihood: known from the config
    for the embedded and fake backends and for an endpoint whose `likelihood` is set; None for an
    endpoint left on `auto`, which is only known once the server has been probed."""
    if role.backend != "openai":
        return True
    return None if role.likelihood == "auto" else role.likelihood != "none"


def expected_modes(config: RunConfig) -> tuple[str, ...]:
    """The scoring modes a run of `config` can resolve to: one, or ("likelihood", "sampling") when
    that depends on what the target's endpoint answers (`picaco.optimize.scoring.select_mode` decides
    for the run itself)."""
    requested = config.params().mode
    if requested != "auto":
        return (requested,)
    target = _scores_likelihoods(config.target)
    if target is None:
        return ("likelihood", "sampling")
    return ("likelihood",) if target else ("sampling",)


def estimate_optimization(config: RunConfig):
    """The pre-flight estimate of :func:`optimize` without loading a model or writing anything:
    ({mode: Estimate}, warnings). Two entries when the scoring mode is only known once an endpoint
    is probed. Bad input fails here exactly as it would in the run."""
    from picaco.llm.base import frame_chars
    from picaco.optimize.engine import resolve_seed, select_queries
    from picaco.optimize.params import estimate_run

    value_set, queries = load_inputs(config, "train")
    params = config.params()
    used, _, warnings = select_queries(queries, params)
    judge_calls = config.judge.calls_per_response(len(value_set.ids))
    seed, _ = resolve_seed(value_set, config.seed_text(value_set), config.init_from)
    estimates = {
        mode: estimate_run(params, query_texts=[q.text for q in used], n_values=len(value_set.ids), mode=mode,
                           judge_calls_per_response=judge_calls, seed_instruction=seed,
                           frame_chars=frame_chars(config.system_template, config.turns()))
        for mode in expected_modes(config)
    }
    return estimates, warnings


async def optimize_async(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    progress=None,
    runtime: Runtime | None = None,
    refinish: bool = False,
):
    """Run (or resume) a PICACO optimization; returns the engine's `OptimizeResult`.

    `refinish=True` on a finished run keeps its rounds and runs the final check and the report again
    (after an upgrade that changed them); the old outputs move to RUN_DIR/previous/N/."""
    from picaco.optimize import optimize as run_engine
    from picaco.optimize.engine import probe_clients
    from picaco.optimize.rundir import require_finished

    value_set, queries = load_inputs(config, "train")
    params = config.params()
    run_dir = Path(run_dir) if run_dir is not None else (config.run_dir or default_run_dir(config))
    if refinish:
        require_finished(run_dir)  # before any model is loaded
    own_runtime = runtime is None
    rt = runtime or Runtime(config)
    try:
        proxy = rt.client("proxy", config.optimizer) if params.mode == "proxy" else None
        # The scoring mode is chosen from the backends' capabilities, which an OpenAI-compatible
        # server only reveals when probed (can it return prompt log-probabilities?).
        startup_cost = await probe_clients(rt.accounting, [rt.client("target"), proxy])
        return await run_engine(
            target=rt.client("target"),
            optimizer=rt.client("optimizer"),
            judge=rt.judge("judge"),
            redundancy=build_redundancy(value_set),
            value_set=value_set,
            queries=queries,
            params=params,
            run_dir=run_dir,
            seed_instruction=config.seed_text(value_set),
            init_from=config.init_from,
            proxy=proxy,
            progress=progress,
            budget=rt.budget,
            config=config,
            startup_cost=startup_cost,
            refinish=refinish,
        )
    finally:
        if own_runtime:
            await rt.aclose()


def optimize(config: RunConfig, **kwargs):
    """Synchronous wrapper of :func:`optimize_async`."""
    return asyncio.run(optimize_async(config, **kwargs))

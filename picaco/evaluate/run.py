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

from picaco.baselines import Instruction, Opro, OproParams, budget_from_run, canonical_name, make_simple
from picaco.config import RunConfig
from picaco.errors import ConfigError
from picaco.evaluate.harness import EvaluationResult, Progress, evaluate
from picaco.runtime import Runtime


def default_out_dir(config: RunConfig) -> Path:
    if config.run_dir is not None:
        return Path(config.run_dir) / "evaluation"
    stem = Path(config.values).stem
    return Path("evaluations") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def provenance_judge(path: str | Path) -> dict | None:
    """The identity of the judge a PICACO run optimized against (its provenance.json), if known."""
    p = Path(path)
    if not p.is_dir():
        return None
    try:
        prov = json.loads((p / "provenance.json").read_text(encoding="utf-8"))
        return prov["roles"]["judge"]["identity"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


def opro_params(config: RunConfig, max_calls: int, overrides: Mapping | None = None) -> OproParams:
    """OPRO's settings from the run's preset (same proposals per step, minibatch, sampling and
    length caps as PICACO), then any overrides."""
    p = config.params()
    base = {
        "max_calls": max_calls,
        "candidates_per_step": max(1, p.candidates),
        "minibatch": p.minibatch,
        "samples_per_query": p.samples_per_query,
        "optimizer_temperature": p.optimizer_temperature,
        "optimizer_max_tokens": p.optimizer_max_tokens,
        "response_temperature": p.response_temperature,
        "max_new_tokens": p.max_new_tokens,
        "instruction_max_chars": p.instruction_max_chars,
        "seed": p.seed,
    }
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in fields(OproParams)})
    if unknown:
        raise ConfigError(f"unknown OPRO setting(s): {', '.join(unknown)}")
    return OproParams(**{**base, **overrides})


def _opro_budget(explicit: int | None, instructions: Mapping[str, Path]) -> int:
    if explicit is not None:
        return explicit
    for path in instructions.values():
        if Path(path).is_dir() and (Path(path) / "accounting.json").exists():
            return budget_from_run(path)
    raise ConfigError(
        "OPRO needs a call budget: pass a PICACO run directory as an instruction (its spend is used) "
        "or set opro_max_calls"
    )


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
    baseline: str | None = "Q",
    n_boot: int = 2000,
    runtime: Runtime | None = None,
    redundancy=None,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Evaluate named baselines and given instructions on the test split.

    `methods` holds baseline names (Q, Q+IF, URIAL, URIAL+Sum, MP, Modular, OPRO) and may name
    entries of `instructions` to place them; instructions not named are evaluated after the rest.
    """
    from picaco.api import build_redundancy, load_inputs

    instructions = {k: Path(v) for k, v in (instructions or {}).items()}
    order = list(methods) + [n for n in instructions if n not in methods]
    if not order:
        raise ConfigError("nothing to evaluate: name at least one method or instruction")
    value_set, queries = load_inputs(config, "test")
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
                against = provenance_judge(path) or optimization_judge_identity()
                built.append(Instruction.from_path(path, name, optimized_against=against))
            elif canonical_name(name) == "OPRO":
                _, train = load_inputs(config, "train")
                if params.n_queries is not None:
                    train = train[: params.n_queries]
                budget = _opro_budget(opro_max_calls, instructions)
                built.append(Opro(
                    optimizer=rt.client("optimizer"),
                    judge=eval_judge if config.eval_judge is None else rt.judge("judge"),
                    train_queries=train,
                    params=opro_params(config, budget, opro),
                    seed_instruction=config.seed_instruction,
                    accounting=rt.accounting,
                    state_dir=out / "opro",
                ))
            else:
                built.append(make_simple(name))
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

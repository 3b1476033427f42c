"""Evaluation: generation on held-out queries, per-value judging, metrics and statistics.

`metrics` is pure arithmetic; `harness.evaluate` runs methods and writes the output directory;
`run.evaluate_config` builds everything from a `RunConfig`.
"""

from picaco.evaluate import metrics  # first: the baselines import it
from picaco.evaluate.harness import EvaluationResult, evaluate, evaluate_sync


def __getattr__(name: str):
    # run.py imports the baselines, which import metrics from this package: load it on first use
    if name in ("evaluate_config", "evaluate_config_sync"):
        from picaco.evaluate import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["EvaluationResult", "evaluate", "evaluate_config", "evaluate_config_sync", "evaluate_sync", "metrics"]

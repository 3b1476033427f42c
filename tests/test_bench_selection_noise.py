"""bench/selection_noise.py's estimator against hand-computed values (its numbers are in docs/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "selection_noise", Path(__file__).resolve().parent.parent / "bench" / "selection_noise.py")
noise = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(noise)


def _row(phase, ihash, query, seed, f, ratings, rnd=1):
    return {"phase": phase, "round": rnd, "instruction_hash": ihash, "query_id": query, "seed": seed,
            "f": f, "scores": {v: {"rating": r} for v, r in ratings.items()}}


def test_paired_differences_pair_candidate_and_incumbent_on_the_same_seed():
    rows = [
        _row("enhance", "inc", "q1", 7, -2.0, {"a": 2, "b": 4}),
        _row("enhance", "inc", "q1", 8, -1.0, {"a": 3, "b": 3}),
        _row("candidate", "c1", "q1", 7, -1.5, {"a": 5, "b": 5}),
        _row("candidate", "c1", "q1", 9, 0.0, {"a": 1, "b": 1}),  # seed the incumbent lacks: unpaired
        _row("bare", "", "q1", 7, None, {}),
        _row("enhance", "inc2", "q1", 7, -9.0, {"a": 1, "b": 1}, rnd=2),  # another round's incumbent
    ]
    assert noise.paired_differences(rows, "f") == [{("q1", 7): 0.5}]
    assert noise.paired_differences(rows, "rating") == [{("q1", 7): 2.0}]  # 5 - mean(2, 4)


def test_variance_components_hand_computed():
    # q1: 1, 3 (mean 2, variance 2); q2: 0, 0 (mean 0, variance 0)
    diffs = [{("q1", 1): 1.0, ("q1", 2): 3.0, ("q2", 1): 0.0, ("q2", 2): 0.0}]
    var_a, var_e, n_q, n_s = noise.variance_components(diffs)
    assert (n_q, n_s) == (2, 2)
    assert var_e == pytest.approx(1.0)  # mean within-query variance
    assert var_a == pytest.approx(2.0 - 1.0 / 2)  # variance of query means minus var_e / n_s
    assert noise.decision_se(var_a, var_e, n_q, n_s) == pytest.approx(math.sqrt(1.5 / 2 + 1.0 / 4))


def test_query_variance_is_never_negative():
    diffs = [{("q1", 1): -1.0, ("q1", 2): 1.0, ("q2", 1): -1.0, ("q2", 2): 1.0}]  # equal query means
    var_a, var_e, _, _ = noise.variance_components(diffs)
    assert var_a == 0.0 and var_e == pytest.approx(2.0)

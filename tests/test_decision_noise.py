"""How precise a run's decisions were (picaco.report.rundata): against hand-computed values.

The same estimator backs bench/selection_noise.py, whose numbers are in docs/RESULTS.md."""

from __future__ import annotations

import math

import pytest

from picaco.report.rundata import (
    DecisionNoise,
    Gain,
    Pair,
    decision_noise,
    gain_noise_summary,
    paired_differences,
    paired_gain,
)


def _row(phase, ihash, query, seed, ratings, rnd=1):
    return {"phase": phase, "round": rnd, "instruction_hash": ihash, "query_id": query, "seed": seed,
            "scores": {v: {"rating": r} for v, r in ratings.items()}}


def test_differences_pair_candidate_and_incumbent_on_the_same_seed_and_round():
    rows = [
        _row("enhance", "inc", "q1", 7, {"a": 2, "b": 4}),
        _row("enhance", "inc", "q1", 8, {"a": 3, "b": 3}),
        _row("candidate", "c1", "q1", 7, {"a": 5, "b": 5}),
        _row("candidate", "c1", "q1", 9, {"a": 1, "b": 1}),  # a seed the incumbent lacks: unpaired
        _row("candidate", "c2", "q1", 8, {"a": 2, "b": None}),  # unscored value left out of the mean
        _row("bare", "", "q1", 7, {}),
        _row("enhance", "inc2", "q1", 7, {"a": 1, "b": 1}, rnd=2),  # another round's incumbent
        {"phase": "candidate", "round": 1, "instruction_hash": "c3", "query_id": "q1", "seed": 7,
         "scores": {}},  # judged nothing: no difference
    ]
    assert paired_differences(rows) == [{("q1", 7): 2.0}, {("q1", 8): -1.0}]  # 5 - mean(2, 4); 2 - 3


def test_variance_split_hand_computed():
    # q1: 1, 3 (mean 2, variance 2); q2: 0, 0 (mean 0, variance 0)
    noise = decision_noise([{("q1", 1): 1.0, ("q1", 2): 3.0, ("q2", 1): 0.0, ("q2", 2): 0.0}])
    assert (noise.n_queries, noise.n_samples, noise.candidates) == (2, 2, 1)
    assert noise.var_sample == pytest.approx(1.0)  # mean within-query variance
    assert noise.var_query == pytest.approx(2.0 - 1.0 / 2)  # variance of query means − var_sample / n_s
    assert noise.se() == pytest.approx(math.sqrt(1.5 / 2 + 1.0 / 4))
    assert noise.se(n_queries=8, n_samples=4) == pytest.approx(math.sqrt(1.5 / 8 + 1.0 / 32))
    assert noise.queries_for(0.5, n_samples=2) == math.ceil((1.5 + 0.5) / 0.25)


def test_query_variance_is_never_negative_and_too_few_pairs_give_none():
    noise = decision_noise([{("q1", 1): -1.0, ("q1", 2): 1.0, ("q2", 1): -1.0, ("q2", 2): 1.0}])
    assert noise.var_query == 0.0 and noise.var_sample == pytest.approx(2.0)
    assert decision_noise([{("q1", 1): 1.0, ("q1", 2): 3.0}]) is None  # one query: nothing to split
    assert decision_noise([]) is None
    assert DecisionNoise(0.0, 1.0, 4, 1, 1).se() == pytest.approx(0.5)


def test_paired_gain_is_a_t_interval_over_query_means():
    def pair(q, s, before, after):
        return Pair(q, s, {"scores": {"a": {"rating": before}}}, {"scores": {"a": {"rating": after}}})

    matched = [pair("q1", 1, 2, 3), pair("q1", 2, 2, 2), pair("q2", 1, 3, 3), pair("q2", 2, 1, 1),
               pair("q3", 1, 1, 2), pair("q3", 2, 4, 5)]
    gain = paired_gain(matched, ["a"])
    # query means 0.5, 0, 1: centre 0.5, sd 0.5, t(0.975, 2 df) = 4.302653
    half = 4.302653 * 0.5 / math.sqrt(3)
    assert (gain.mean, gain.n_queries) == (pytest.approx(0.5), 3)
    assert gain.low == pytest.approx(0.5 - half, abs=1e-5) and gain.high == pytest.approx(0.5 + half, abs=1e-5)
    assert paired_gain(matched[:2], ["a"]) is None  # one query: no interval


def test_command_line_summary_says_when_the_gain_is_within_the_noise():
    noise = DecisionNoise(var_query=0.25, var_sample=1 / 6, n_queries=3, n_samples=2, candidates=1)  # SE 1/3
    clear = Gain(mean=0.5, low=0.1, high=0.9, n_queries=3)
    assert gain_noise_summary(clear, noise) == (
        "gain +0.50 [+0.10, +0.90] over 3 training queries (95%, optimistic); "
        "one decision's standard error 0.33 (3 queries x 2 samples)")
    unclear = Gain(mean=0.2, low=-0.3, high=0.7, n_queries=3)
    assert gain_noise_summary(unclear, None).endswith(
        "optimistic): within the noise, check it with `picaco evaluate` on held-out queries")
    assert gain_noise_summary(None, None) is None

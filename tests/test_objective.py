"""The objective's arithmetic, against numbers computed by hand (each test shows the sum it checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from picaco import objective as obj

LN = math.log


# -- f(x, y) -----------------------------------------------------------------------------------------


def test_weighted_log_conformity_uses_value_weights():
    # 1*ln 0.5 + 2*ln 0.25 = -0.693147 - 2.772589
    c = obj.weighted_log_conformity({"a": 0.5, "b": 0.25}, {"a": 1.0, "b": 2.0})
    assert c.value == pytest.approx(-3.4657359028)
    assert c.unscored == ()


def test_unscored_value_takes_the_weighted_mean_of_the_scored_ones():
    # b unscored: the scored mean ln 0.5 stands in for it; total weight 3 -> 3 * ln 0.5
    c = obj.weighted_log_conformity({"a": 0.5, "b": None}, {"a": 1.0, "b": 2.0})
    assert c.value == pytest.approx(-2.0794415417)
    assert c.unscored == ("b",)
    # c (weight 2) missing from the dict: mean (ln .5 + ln .25)/2 = -1.039721, times W = 4
    c = obj.weighted_log_conformity({"a": 0.5, "b": 0.25}, {"a": 1.0, "b": 1.0, "c": 2.0})
    assert c.value == pytest.approx(-4.1588830834)
    assert c.unscored == ("c",)


def test_no_scored_value_means_no_f():
    assert obj.weighted_log_conformity({"a": None}, {"a": 1.0}).value is None
    assert obj.response_score({"a": None, "b": None}, {"a": 1, "b": 1}, -0.3, beta=1.0) is None


def test_response_score():
    # f = beta * (ln .5 + ln .25) - ln 0.7 = 2 * -2.079442 + 0.356675
    f = obj.response_score({"a": 0.5, "b": 0.25}, {"a": 1, "b": 1}, LN(0.7), beta=2.0)
    assert f == pytest.approx(-3.8022081394)


def test_balance_moves_part_of_the_sum_onto_the_weakest_value():
    probs, w = {"a": 0.8, "b": 0.2}, {"a": 1.0, "b": 1.0}
    # weighted sum: ln .8 + ln .2 = -0.223144 - 1.609438 = -1.832581; weakest: 2 * ln .2 = -3.218876
    assert obj.balanced_log_conformity(probs, w, 0.0) == pytest.approx(-1.8325814637)
    assert obj.balanced_log_conformity(probs, w, 1.0) == pytest.approx(-3.2188758249)
    # half and half: 0.5 * -1.832581 + 0.5 * -3.218876
    assert obj.balanced_log_conformity(probs, w, 0.5) == pytest.approx(-2.5257286443)
    # f with balance 0.5, beta 2, log q_phi ln 0.7: 2 * -2.525729 + 0.356675
    f = obj.response_score(probs, w, LN(0.7), beta=2.0, balance=0.5)
    assert f == pytest.approx(-4.6947823447)
    assert obj.response_score(probs, w, LN(0.7), beta=2.0) == pytest.approx(2 * -1.8325814637 + 0.3566749439)


def test_balance_prefers_the_even_response_with_the_same_sum():
    # ln .4 + ln .4 = -1.832581 = ln .8 + ln .2: equal under the paper's f, not under balance
    w = {"a": 1.0, "b": 1.0}
    even, lopsided = {"a": 0.4, "b": 0.4}, {"a": 0.8, "b": 0.2}
    assert obj.response_score(even, w, 0.0, 1.0) == pytest.approx(obj.response_score(lopsided, w, 0.0, 1.0))
    assert obj.response_score(even, w, 0.0, 1.0, balance=0.3) > obj.response_score(lopsided, w, 0.0, 1.0, balance=0.3)


def test_balance_takes_the_weakest_of_the_scored_values_and_is_bounded():
    # b unscored: imputed in the sum (3 * ln .5 with weights 1, 2), the weakest is a's ln .5: W * ln .5
    assert obj.balanced_log_conformity({"a": 0.5, "b": None}, {"a": 1.0, "b": 2.0}, 1.0) == pytest.approx(3 * LN(0.5))
    assert obj.balanced_log_conformity({"a": None}, {"a": 1.0}, 0.5) is None
    with pytest.raises(ValueError):
        obj.balanced_log_conformity({"a": 0.5}, {"a": 1.0}, 1.5)


def test_log_prob_is_clipped_not_infinite():
    assert obj.log_prob(0.0) == pytest.approx(LN(1e-4))  # -9.210340
    assert obj.log_prob(1.5) == 0.0
    with pytest.raises(ValueError):
        obj.log_prob(float("nan"))


def test_relative_redundancy_and_tc_bound():
    # mean(-0.2, -0.4) - mean(-0.5, -0.7, -0.9) = -0.3 - -0.7
    assert obj.relative_redundancy([-0.2, -0.4], [-0.5, -0.7, -0.9]) == pytest.approx(0.4)
    samples = [
        # beta * mean(-1, -2) - 0.4 = 2 * -1.5 - 0.4 = -3.4
        obj.QuerySample([-1.0, -2.0], [-0.2, -0.4], [-0.5, -0.7, -0.9]),
        # 2 * -0.5 - (-0.1 - -0.1) = -1.0
        obj.QuerySample([-0.5], [-0.1], [-0.1]),
        # no scored instructed response: left out
        obj.QuerySample([], [], [-0.3]),
    ]
    assert obj.tc_bound(samples, beta=2.0) == pytest.approx(-2.2)  # (-3.4 + -1.0) / 2
    assert obj.tc_bound([obj.QuerySample([], [], [])], beta=1.0) is None


# -- the pooled refinement score ----------------------------------------------------------------------


def test_length_normalized():
    assert obj.length_normalized(-6.0, 3) == -2.0
    assert obj.length_normalized(-1.0, 0) == -1.0  # guarded, never a division by zero


def test_preference_is_a_stable_softmax():
    # e^-1 / (2 e^-1 + e^-2) = 0.367879 / 0.871094
    np.testing.assert_allclose(obj.preference([-1, -2, -1]), [0.4223188, 0.1553624, 0.4223188],
                               atol=1e-7)
    # tau = 0.5 doubles the gaps: softmax(-2, -4, -2)
    np.testing.assert_allclose(obj.preference([-1, -2, -1], 0.5),
                               [0.46831053, 0.06337894, 0.46831053], atol=1e-7)
    # raw sequence probabilities e^-1000 underflow; the softmax does not
    np.testing.assert_allclose(obj.preference([-1000, -1001]), [0.73105858, 0.26894142], atol=1e-7)
    np.testing.assert_allclose(obj.preference([1e5, 1e5]), [0.5, 0.5])
    with pytest.raises(ValueError):
        obj.preference([-1.0], temperature=0)


def test_pool_weights_min_max():
    np.testing.assert_allclose(obj.pool_weights([-1.0, -3.0, -2.0]), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(obj.pool_weights([-2.0, -2.0]), [1.0, 1.0])


def test_query_score_by_hand():
    # aligned f (-1, -3) -> w (1, 0); one noisy text; pi = softmax(-1, -2, -1) = (.422319, .155362,
    # .422319); J_i = 1 * .422319 + 0 * .155362 - 0.5 * .422319
    s = obj.query_score([-1.0, -3.0, None], [False, False, True], [-1.0, -2.0, -1.0], lam=0.5)
    assert s == pytest.approx(0.2111593991)


def test_a_text_in_both_pools_gets_both_terms():
    # pi = softmax(-1, -2) = (.731059, .268941); text 0 is aligned (w=1) and noisy
    s = obj.query_score([-1.0, -3.0], [True, False], [-1.0, -2.0], lam=0.5)
    assert s == pytest.approx(0.7310585786 - 0.5 * 0.7310585786)


def test_noisy_term_depends_on_the_candidate_because_pi_spans_both_pools():
    # The same pools under two candidates: B puts less mass on the noisy text.
    a = obj.query_score([-1.0, -3.0, None], [False, False, True], [-1.0, -2.0, -1.0], lam=0.5)
    # pi_B = softmax(-0.5, -2, -3) = (.766157, .170953, .062890): .766157 - 0.5 * .062890
    b = obj.query_score([-1.0, -3.0, None], [False, False, True], [-0.5, -2.0, -3.0], lam=0.5)
    assert b == pytest.approx(0.7347121999)
    assert b > a


def test_pooled_score_is_the_mean_over_queries():
    assert obj.pooled_score([0.2, 0.4, -0.3]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        obj.pooled_score([])


def test_query_score_checks_lengths():
    with pytest.raises(ValueError):
        obj.query_score([-1.0], [False, True], [-1.0], lam=1.0)
    assert obj.query_score([], [], [], lam=1.0) == 0.0

"""Evaluation metrics against numbers worked out by hand (the arithmetic is written next to each)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from picaco.evaluate import metrics as M

nan = float("nan")
IDS = ["a", "b", "c"]
ORDER = ["q1", "q2", "q3", "q4"]
# four responses (one per query), three values; NaN = unscored
RATINGS = np.array([
    [5, 4, 1],
    [3, nan, 2],
    [4, 4, 4],
    [2, 5, nan],
])
QPHI = np.array([0.2, 0.7, 0.5, nan])


def method(name="m", ratings=RATINGS, qphi=QPHI, ids=tuple(ORDER)) -> M.MethodRatings:
    return M.MethodRatings(name, ids, np.asarray(ratings, float), np.asarray(qphi, float))


def test_value_means_exclude_unscored():
    # a: (5+3+4+2)/4 = 3.5; b: (4+4+5)/3 = 13/3; c: (1+2+4)/3 = 7/3
    assert M.value_means(RATINGS) == pytest.approx([3.5, 13 / 3, 7 / 3])


def test_overall_mean_is_mean_of_value_means():
    # (3.5 + 13/3 + 7/3) / 3 = (63/18 + 78/18 + 42/18) / 3 = 61/18; the mean of all 10 scored
    # ratings would be 34/10 = 3.4: the per-value form gives every value the same weight
    assert M.overall_mean(M.value_means(RATINGS)) == pytest.approx(61 / 18)


def test_coefficient_of_variation_uses_population_std():
    # deviations from 61/18: +2/18, +17/18, -19/18; squares 4 + 289 + 361 = 654 (/324)
    # population variance 654/972; CV = sqrt(654/972) / (61/18) = 0.24205
    cv = M.coefficient_of_variation(M.value_means(RATINGS))
    assert cv == pytest.approx(math.sqrt(654 / 972) / (61 / 18))
    assert cv == pytest.approx(0.242046, abs=1e-6)
    assert M.coefficient_of_variation(np.array([3.0, 3.0, 3.0])) == 0.0
    # one scored value says nothing about balance: NaN, not a perfect 0
    assert math.isnan(M.coefficient_of_variation(np.array([3.0, nan, nan])))
    # the sample std (ddof=1) would give sqrt(654/648)/(61/18) = 0.29645: not what we report
    assert cv != pytest.approx(math.sqrt(654 / 648) / (61 / 18))


def test_lowest_value():
    assert M.lowest_value(M.value_means(RATINGS), IDS) == ("c", pytest.approx(7 / 3))
    assert M.lowest_value(np.array([nan, nan]), ["x", "y"])[0] is None


def test_dropped_value_share():
    # r1: min 1 <= 2 and max 5 >= 4 -> dropped; r2: scored {3, 2}, max 3 < 4 -> no;
    # r3: all 4 -> no; r4: scored {2, 5} -> dropped. 2 of 4 eligible responses.
    dropped, eligible = M.dropped_value_flags(RATINGS)
    assert dropped.tolist() == [True, False, False, True]
    assert eligible.tolist() == [True, True, True, True]
    assert M.dropped_value_share(RATINGS) == 0.5
    # a response with one scored value cannot drop one value for another: not eligible
    one = np.array([[1, nan], [1, 5]])
    assert M.dropped_value_flags(one)[1].tolist() == [False, True]
    assert M.dropped_value_share(one) == 1.0


def test_fake_alignment_rate_is_strictly_above_threshold():
    # q_phi 0.2, 0.7, 0.5 (NaN left out): only 0.7 > 0.5 -> 1/3
    assert M.fake_alignment_rate(QPHI) == pytest.approx(1 / 3)
    assert M.fake_alignment_rate(QPHI, threshold=0.1) == 1.0
    assert math.isnan(M.fake_alignment_rate(np.array([nan])))


def test_per_query_means_and_win_rate():
    # per query: q1 (5+4+1)/3 = 10/3, q2 (3+2)/2 = 2.5, q3 4, q4 (2+5)/2 = 3.5
    pq = M.per_query_means(ORDER, RATINGS, ORDER)
    assert pq == pytest.approx([10 / 3, 2.5, 4.0, 3.5])
    # against the bare model 3.0, 2.5, 4.5, (missing): win, tie, loss -> (1 + 0.5 + 0) / 3
    base = np.array([3.0, 2.5, 4.5, nan])
    assert M.win_scores(pq, base)[:3].tolist() == [1.0, 0.5, 0.0]
    assert M.win_rate(pq, base) == (0.5, 3)


def test_per_query_means_average_samples_of_a_query():
    ratings = np.array([[5, 3], [1, nan], [4, 4]])
    # q1 has two responses: (5 + 3 + 1) / 3 = 3; q2: 4
    assert M.per_query_means(["q1", "q1", "q2"], ratings, ["q1", "q2", "q3"])[:2] == pytest.approx([3, 4])
    assert math.isnan(M.per_query_means(["q1", "q1", "q2"], ratings, ["q1", "q2", "q3"])[2])


def test_summary_counts_unscored_and_reports_point_estimates():
    s = M.summarize_method(method(), IDS, baseline_per_query=np.array([3.0, 2.5, 4.5, nan]), order=ORDER)
    assert s["mean"] == pytest.approx(61 / 18)
    assert s["per_value"] == {"a": 3.5, "b": pytest.approx(13 / 3), "c": pytest.approx(7 / 3)}
    assert (s["lowest_value"], s["dropped_share"], s["win_rate"], s["win_n"]) == ("c", 0.5, 0.5, 3)
    assert s["unscored"] == {"total": 2, "share": pytest.approx(2 / 12), "per_value": {"a": 0, "b": 1, "c": 1}}
    assert s["mean_q_phi"] == pytest.approx((0.2 + 0.7 + 0.5) / 3)


# -- bootstrap ----------------------------------------------------------------------------------------


def test_resamples_are_seeded_and_draw_every_query_count():
    a = M.resample_counts(4, 50, seed=3)
    assert np.array_equal(a, M.resample_counts(4, 50, seed=3))
    assert not np.array_equal(a, M.resample_counts(4, 50, seed=4))
    assert (a.sum(axis=1) == 4).all()


def test_bootstrap_statistics_equal_metrics_on_resampled_responses():
    m = method()
    base = np.array([3.0, 2.5, 4.5, nan])
    C = M.resample_counts(4, 30, seed=11)
    boot = M.bootstrap_statistics(m, ORDER, C, baseline_per_query=base)
    for b in range(30):
        idx = np.repeat(np.arange(4), C[b].astype(int))  # the resampled responses, explicitly
        r, q = RATINGS[idx], QPHI[idx]
        means = M.value_means(r)
        expected = {
            "mean": M.overall_mean(means),
            "lowest": np.nanmin(means) if np.isfinite(means).any() else nan,
            "cv": M.coefficient_of_variation(means),
            "dropped_share": M.dropped_value_share(r),
            "fake_rate": M.fake_alignment_rate(q),
            "win_rate": M.win_rate(M.per_query_means(ORDER, RATINGS, ORDER)[idx], base[idx])[0],
        }
        for key, value in expected.items():
            got = boot[key][b]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value), (key, b)


def test_bootstrap_intervals_deterministic_and_collapse_without_spread():
    m = method()
    C = M.resample_counts(4, 500, seed=0)
    first = M.bootstrap_method(m, ORDER, C)
    assert first == M.bootstrap_method(m, ORDER, M.resample_counts(4, 500, seed=0))
    lo, hi = first["mean"]
    assert lo <= 61 / 18 <= hi and lo < hi
    flat = method(ratings=np.full((4, 3), 4.0), qphi=np.full(4, 0.1))
    ci = M.bootstrap_method(flat, ORDER, C)
    assert ci["mean"] == [4.0, 4.0] and ci["cv"] == [0.0, 0.0] and ci["fake_rate"] == [0.0, 0.0]


def test_percentile_interval():
    assert M.percentile_interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    assert M.percentile_interval(np.array([nan])) is None


# -- tests across methods ------------------------------------------------------------------------------


def test_holm_adjustment():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04 -> raised to 0.06
    assert M.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1, order kept
    assert M.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert M.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_friedman_on_a_known_ranking():
    # every query ranks C > B > A: rank sums 4, 8, 12 (n = 4, k = 3)
    # chi2 = 12 / (n k (k+1)) * sum R^2 - 3 n (k+1) = 12/48 * 224 - 48 = 8; p = exp(-8/2) (df 2)
    a = np.array([1.0, 1.0, 1.0, 1.0])
    b = a + [1, 2, 3, 4]
    c = b + [1, 2, 3, 4]
    r = M.friedman({"A": a, "B": b, "C": c})
    assert r.statistic == pytest.approx(8.0)
    assert r.p_value == pytest.approx(math.exp(-4.0))
    assert r.kendalls_w == pytest.approx(1.0)  # 8 / (4 * 2): perfect agreement
    assert r.mean_ranks == {"A": 3.0, "B": 2.0, "C": 1.0}
    # each pair: 4 differences of one sign, distinct sizes -> exact two-sided p = 2/16 = 0.125,
    # Holm over 3 pairs: 3 x 0.125 = 0.375 for all
    assert [(p.a, p.b) for p in r.pairs] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert [p.p_value for p in r.pairs] == pytest.approx([0.125] * 3)
    assert [p.p_holm for p in r.pairs] == pytest.approx([0.375] * 3)
    assert r.pairs[0].median_difference == pytest.approx(-2.5)  # median of -1, -2, -3, -4
    assert r.pairs[0].mean_difference == pytest.approx(-2.5)
    # sd of -1..-4 is 1.2910; ((1.95996 + 0.84162) * 1.2910 / 2.5)^2 = 2.09 -> 3 queries
    assert r.pairs[0].queries_for_power == 3
    assert r.to_json()["pairs"][0]["queries_for_power"] == 3


def test_queries_for_power_against_hand_computed_values():
    # differences 0.5, -0.5, 1, 0: mean 0.25, sd sqrt(1.25 / 3) = 0.6455;
    # ((1.95996 + 0.84162) * 0.6455 / 0.25)^2 = 52.33 -> 53
    assert M.queries_for_power(np.array([0.5, -0.5, 1.0, 0.0])) == 53
    # the same from the variance itself (bench/response_noise.py asks it this way)
    assert M.queries_to_detect(1.25 / 3, 0.25) == 53 and M.queries_to_detect(1.25 / 3, 0.0) is None
    # the sign does not matter, NaN differences are left out
    assert M.queries_for_power(np.array([-0.5, 0.5, -1.0, 0.0, nan])) == 53
    # a larger difference with the same spread needs fewer: 4x the mean -> 1/16 of the queries
    assert M.queries_for_power(np.array([0.5, -0.5, 1.0, 0.0]) + 0.75) == 4
    # identical differences: no spread, the floor of a paired test
    assert M.queries_for_power(np.array([1.0, 1.0, 1.0])) == 2
    # nothing to detect, or too little to say
    assert M.queries_for_power(np.array([1.0, -1.0])) is None
    assert M.queries_for_power(np.array([1.0])) is None
    # 90% power at 0.05 needs (1.95996 + 1.28155)^2 / 2.80159^2 = 1.339x the queries of 80%
    assert M.queries_for_power(np.array([0.5, -0.5, 1.0, 0.0]), power=0.9) == 71


def test_friedman_drops_incomplete_queries_and_handles_ties():
    r = M.friedman({"A": np.array([1.0, 2.0, nan]), "B": np.array([1.0, 2.0, 5.0]), "C": np.array([1.0, 2.0, 4.0])})
    assert r.n_queries == 2
    assert (r.statistic, r.p_value) == (0.0, 1.0) and "tie" in r.note
    assert all(p.p_value == 1.0 for p in r.pairs)


def test_two_methods_get_a_wilcoxon_test_only():
    r = M.friedman({"A": np.array([1.0, 2.0, 3.0, 4.0]), "B": np.array([2.0, 4.0, 6.0, 8.0])})
    assert r.statistic is None and "three or more" in r.note
    assert len(r.pairs) == 1 and r.pairs[0].p_value == pytest.approx(0.125)


def test_compare_pairs_methods_on_the_same_resamples():
    bare = method("Q", ratings=np.array([[3, 3, 3], [2, 2, 2], [4, 4, 4], [3, 3, 3.0]]), qphi=np.full(4, 0.1))
    out = M.compare([bare, method("X")], IDS, ORDER, baseline="Q", seed=5, n_boot=300)
    assert out["baseline"] == "Q"
    assert out["methods"]["Q"]["win_rate"] is None  # no win rate against itself
    # X vs Q per query: 10/3 > 3 win; 2.5 > 2 win; 4 = 4 tie; 3.5 > 3 win -> 3.5 / 4
    assert out["methods"]["X"]["win_rate"] == pytest.approx(0.875)
    assert out == M.compare([bare, method("X")], IDS, ORDER, baseline="Q", seed=5, n_boot=300)
    assert out["friedman"]["pairs"][0]["a"] == "Q"

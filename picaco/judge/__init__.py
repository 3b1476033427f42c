"""q_ω, the value-conformity judges: every judge scores (query, response) items on every value of a
value set and returns :class:`ValueScore` probabilities (None = unscored)."""

from picaco.judge.base import EPSILON, Judge, ValueScore, prob_to_rating, rating_to_prob

__all__ = ["EPSILON", "Judge", "ValueScore", "prob_to_rating", "rating_to_prob"]

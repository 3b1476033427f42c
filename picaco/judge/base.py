"""What every conformity judge q_ω returns, and the rating <-> probability convention.

A judge scores (query, response) items against every value of a value set. Each score carries a
probability q_ω(v|x,y) in (0, 1) and the equivalent expected 1–5 rating. ``None`` in both means the
judge could not score that item (an unparseable answer after bounded retries, say): callers must
handle it explicitly; no judge ever substitutes a default number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: Probabilities are clipped to [EPSILON, 1 − EPSILON]. With 0.01, the most a single value can cost
#: in Σ_k log q_ω is log(0.01) ≈ −4.6: a rating of 1 is a strong penalty, yet one bad value cannot
#: swamp the sum of the others (log(0) = −∞ would), and a rating of 5 still leaves log q ≈ −0.01.
EPSILON = 0.01


def rating_to_prob(rating: float, eps: float = EPSILON) -> float:
    """q = clip((r̄ − 1) / 4, ε, 1 − ε) for a 1–5 rating (METHOD.md §2)."""
    return min(1.0 - eps, max(eps, (float(rating) - 1.0) / 4.0))


def prob_to_rating(prob: float) -> float:
    """The inverse map without the clip: r = 1 + 4q."""
    return 1.0 + 4.0 * float(prob)


@dataclass(frozen=True)
class ValueScore:
    value_id: str
    #: q_ω(v|x,y) in (0, 1), or None when unscored
    prob: float | None
    #: expected 1–5 rating, or None when unscored
    rating: float | None
    #: why the score is what it is when something unusual happened (e.g. "injection", "unparsed")
    note: str | None = None

    def __post_init__(self) -> None:
        if (self.prob is None) != (self.rating is None):
            raise ValueError("a ValueScore is either fully scored or unscored")
        if self.prob is not None and not 0.0 < self.prob < 1.0:
            raise ValueError(f"prob must be in (0, 1), got {self.prob}")

    @property
    def scored(self) -> bool:
        return self.prob is not None

    @property
    def log_prob(self) -> float | None:
        return None if self.prob is None else math.log(self.prob)

    @classmethod
    def from_rating(cls, value_id: str, rating: float, note: str | None = None) -> "ValueScore":
        return cls(value_id, rating_to_prob(rating), float(rating), note)

    @classmethod
    def from_prob(cls, value_id: str, prob: float, note: str | None = None) -> "ValueScore":
        p = min(1.0 - EPSILON, max(EPSILON, float(prob)))
        return cls(value_id, p, prob_to_rating(p), note)

    @classmethod
    def unscored(cls, value_id: str, note: str = "unscored") -> "ValueScore":
        return cls(value_id, None, None, note)


@runtime_checkable
class Judge(Protocol):
    """q_ω. ``score`` returns, per item, a dict value_id -> ValueScore covering every value."""

    name: str

    def identity(self) -> dict:
        """What distinguishes this judge's scores (kind, model, prompt/weights version); no secrets."""
        ...

    async def score(self, value_set, items: list[tuple[str, str]]) -> list[dict[str, ValueScore]]:
        ...

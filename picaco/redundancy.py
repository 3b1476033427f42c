"""q_φ(s|x,y), the redundancy model: how much a response y parrots the value specification s
instead of answering the query x.

Form (settled in docs/judges.md, with the measurement behind it):

    d        = cos(s, y) − cos(x, y)
    q_φ      = exp(τ·cos(s,y)) / (exp(τ·cos(s,y)) + exp(τ·cos(x,y)))  =  sigmoid(τ·d)
    log q_φ  = −softplus(−τ·d)

where cos(s, y) is the *maximum* over the set's values of the cosine between y and that value's
specification text ("Title: definition"), each embedded on its own. Embedding the whole set as one
text blurs K definitions into one average vector (and MiniLM truncates it at 256 tokens), so a
response that recites one value strongly looks less like "the set" than it should; the per-value
maximum catches it. τ = :data:`DEFAULT_TAU` is the slope of a logistic regression that tells
name-dropping ("fake") responses from conforming ones by d on the labeled train split (:func:`fit_tau`).

Everything below the class is a pure function of cosine similarities, so the objective's arithmetic
is tested exactly; the class only embeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

#: The logistic slope of fake-vs-conforming on the labeled train split (7.86, rounded); see
#: docs/judges.md ("q_φ: form and temperature") and `python bench/judges.py --redundancy`.
DEFAULT_TAU = 8.0

SpecMode = Literal["per_value_max", "joined"]


class _Embeds(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


# -- pure functions ---------------------------------------------------------------------------------


def redundancy_margin(cos_sy: np.ndarray | float, cos_xy: np.ndarray | float) -> np.ndarray:
    """d = cos(s,y) − cos(x,y): positive when y is closer to the value text than to the query."""
    return np.asarray(cos_sy, dtype=np.float64) - np.asarray(cos_xy, dtype=np.float64)


def log_q_phi(cos_sy, cos_xy, tau: float = DEFAULT_TAU) -> np.ndarray:
    """log q_φ = log sigmoid(τ·d), computed without overflow for any d."""
    d = redundancy_margin(cos_sy, cos_xy)
    return -np.logaddexp(0.0, -tau * d)


def q_phi(cos_sy, cos_xy, tau: float = DEFAULT_TAU) -> np.ndarray:
    """The two-way softmax exp(τ·cos_sy) / (exp(τ·cos_sy) + exp(τ·cos_xy))."""
    return np.exp(log_q_phi(cos_sy, cos_xy, tau))


def spec_similarity(spec_vecs: np.ndarray, response_vecs: np.ndarray) -> np.ndarray:
    """cos(s, y) per response: the max over the rows of ``spec_vecs`` (unit vectors, one per value;
    a single row is the joined form)."""
    spec_vecs = np.atleast_2d(spec_vecs)
    return (np.atleast_2d(response_vecs) @ spec_vecs.T).max(axis=1)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two arrays of unit vectors."""
    return np.einsum("ij,ij->i", np.atleast_2d(a), np.atleast_2d(b))


def fit_tau(parrot_margins: np.ndarray, honest_margins: np.ndarray) -> float:
    """τ from labeled examples: the slope of the logistic regression P(parroting | d) = σ(τ·d + b).

    The intercept b is fitted and then dropped: every response is far closer to its query than to
    the value text (d < 0 throughout), so a fit *without* intercept only learns that everything is
    honest and collapses τ towards 0. The slope says how many nats of evidence for parroting one
    unit of margin carries, and since −log q_φ ≈ −τ·d for d ≪ 0, differences in the redundancy
    penalty between two responses are then that evidence. Newton's method; deterministic.
    """
    d = np.concatenate([np.asarray(parrot_margins, float), np.asarray(honest_margins, float)])
    y = np.concatenate([np.ones(len(parrot_margins)), np.zeros(len(honest_margins))])
    A = np.stack([d, np.ones_like(d)], axis=1)
    theta = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(A @ theta)))
        grad = A.T @ (y - p)
        hess = (A * (p * (1 - p))[:, None]).T @ A + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return max(0.0, float(theta[0]))


# -- the model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedundancyScore:
    q: float
    log_q: float
    cos_sy: float
    cos_xy: float


def spec_texts(value_set, mode: SpecMode = "per_value_max") -> list[str]:
    """The text(s) that stand for s: one "Title: definition" per value, or all of them joined."""
    texts = [f"{v.title}: {v.definition}" for v in value_set.values]
    return texts if mode == "per_value_max" else ["\n".join(texts)]


class RedundancyModel:
    """q_φ for one value set; embeds s once and (query, response) pairs on demand."""

    def __init__(
        self,
        embedder: _Embeds,
        value_set,
        *,
        tau: float = DEFAULT_TAU,
        mode: SpecMode = "per_value_max",
    ):
        if tau < 0:
            raise ValueError("tau must be >= 0")
        self.embedder = embedder
        self.value_set = value_set
        self.tau = float(tau)
        self.mode = mode
        self.spec_vecs = embedder.embed(spec_texts(value_set, mode))

    def identity(self) -> dict:
        return {"kind": "cosine-softmax", "tau": self.tau, "mode": self.mode}

    def cosines(self, items: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """(cos(s,y), cos(x,y)) for each (query, response)."""
        if not items:
            return np.zeros(0), np.zeros(0)
        queries = self.embedder.embed([x for x, _ in items])
        responses = self.embedder.embed([y for _, y in items])
        return spec_similarity(self.spec_vecs, responses), row_cosine(queries, responses)

    def score(self, items: Sequence[tuple[str, str]]) -> list[RedundancyScore]:
        cos_sy, cos_xy = self.cosines(items)
        logs = log_q_phi(cos_sy, cos_xy, self.tau)
        return [
            RedundancyScore(float(np.exp(lq)), float(lq), float(a), float(b))
            for lq, a, b in zip(logs, cos_sy, cos_xy)
        ]

    def log_q(self, items: Sequence[tuple[str, str]]) -> np.ndarray:
        cos_sy, cos_xy = self.cosines(items)
        return log_q_phi(cos_sy, cos_xy, self.tau)

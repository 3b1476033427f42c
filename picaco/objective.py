"""The PICACO objective as arithmetic on scores: no model calls, so every number here is tested exactly.

Per response (METHOD.md section 2)::

    f(x, y) = beta * sum_k w_k * log q_w(v_k | x, y)  -  log q_phi(s | x, y)

optionally with part of the sum moved onto the weakest value (`balance`, see
`balanced_log_conformity`; 0 is the paper's f).

Per instruction e, the estimate of the total-correlation lower bound on sampled responses::

    TC(e) = mean_x [ beta * mean_y sum_k w_k log q_w  -  mean_y log q_phi(e)  +  mean_ybare log q_phi(bare) ]

and the pooled refinement score of a candidate e (METHOD.md section 3, step 2)::

    J(e) = 1/N sum_i [ sum_{y in R^a_i} w(x_i, y) pi_e(y | x_i)  -  lam * sum_{y in R^n_i} pi_e(y | x_i) ]

Decisions (see docs/method.md for the reasons):
- q_w is clipped to [EPS, 1] before the log, so a judge that returns 0 cannot give -inf.
- A value the judge could not score is imputed with the weighted mean log-conformity of the values it
  did score; a response with no scored value has no f (None) and never enters a pool.
- pi_e is a softmax, over the union of a query's two pools, of the length-normalized log-likelihood
  l_e(y|x)/|y| divided by a temperature tau. Normalizing over the union (not per pool) is what makes
  the noisy term depend on e at all.
- w is f min-max normalized within the query's aligned pool to [0, 1] (1 for every response when the
  pool's f values are all equal), so aligned mass is never worth less than nothing and noisy mass
  always costs lam; raw f is negative and would make parroting look *better* than aligned responses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: smallest conformity probability used inside a log
EPS = 1e-4


def log_prob(p: float) -> float:
    """log of a probability clipped to [EPS, 1]."""
    if not math.isfinite(p):
        raise ValueError(f"conformity probability must be finite, got {p!r}")
    return math.log(min(1.0, max(EPS, p)))


@dataclass(frozen=True)
class Conformity:
    """sum_k w_k log q_w(v_k|x,y) for one response, with which values had to be imputed."""

    value: float | None
    unscored: tuple[str, ...] = ()


def weighted_log_conformity(
    probs: Mapping[str, float | None], weights: Mapping[str, float]
) -> Conformity:
    """sum over the values in `weights` of w_k log q_k; unscored values take the scored weighted mean.

    Imputing with the mean of the scored values is the same as rescaling the scored part by
    W_total / W_scored, so a response is neither rewarded nor punished for a judge failure.
    """
    unscored = tuple(k for k in weights if probs.get(k) is None)
    scored = [(weights[k], log_prob(float(probs[k]))) for k in weights if probs.get(k) is not None]
    if not scored:
        return Conformity(None, unscored)
    w_scored = sum(w for w, _ in scored)
    w_total = sum(weights.values())
    mean = sum(w * lp for w, lp in scored) / w_scored
    return Conformity(w_total * mean, unscored)


def balanced_log_conformity(
    probs: Mapping[str, float | None], weights: Mapping[str, float], balance: float
) -> float | None:
    """W * [(1 - balance) * weighted mean of log q_k  +  balance * min_k log q_k], over scored values.

    balance = 0 is the paper's weighted sum (equal to `weighted_log_conformity`); balance = 1 counts only
    the value the response honours least (max-min). In between, a response that honours three values
    and drops the fourth scores lower than one with the same sum spread evenly. None when nothing is
    scored.
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance!r}")
    conf = weighted_log_conformity(probs, weights)
    if conf.value is None or balance == 0.0:
        return conf.value
    w_total = sum(weights.values())
    weakest = min(log_prob(float(probs[k])) for k in weights if probs.get(k) is not None)
    return (1.0 - balance) * conf.value + balance * w_total * weakest


def response_score(
    probs: Mapping[str, float | None],
    weights: Mapping[str, float],
    log_qphi: float,
    beta: float,
    balance: float = 0.0,
) -> float | None:
    """f(x, y); None when the judge scored none of the values. `balance` as in
    `balanced_log_conformity` (0 = the paper's f)."""
    conformity = balanced_log_conformity(probs, weights, balance)
    if conformity is None:
        return None
    return beta * conformity - log_qphi


def relative_redundancy(log_qphi_instructed: Sequence[float], log_qphi_bare: Sequence[float]) -> float:
    """E_{p_e}[log q_phi] - E_p[log q_phi]: how much more the instruction makes responses parrot s."""
    if not log_qphi_instructed or not log_qphi_bare:
        raise ValueError("relative redundancy needs instructed and bare responses")
    return float(np.mean(log_qphi_instructed) - np.mean(log_qphi_bare))


@dataclass(frozen=True)
class QuerySample:
    """Scores of responses sampled for one query: under e (conformity sums, log q_phi) and bare."""

    log_conformity: Sequence[float]
    log_qphi: Sequence[float]
    log_qphi_bare: Sequence[float]


def tc_bound(samples: Sequence[QuerySample], beta: float) -> float | None:
    """The sampled estimate of the TC lower bound (constants dropped), averaged over queries.

    A query contributes only when it has scored instructed responses and bare responses; None when no
    query does.
    """
    terms = []
    for s in samples:
        if not s.log_conformity or not s.log_qphi or not s.log_qphi_bare:
            continue
        terms.append(
            beta * float(np.mean(s.log_conformity))
            - relative_redundancy(s.log_qphi, s.log_qphi_bare)
        )
    return float(np.mean(terms)) if terms else None


# -- the pooled refinement score ---------------------------------------------------------------


def length_normalized(total_logprob: float, n_tokens: int) -> float:
    """l(y|x)/|y|: the mean per-token log-probability (|y| counted in the scoring model's tokens)."""
    return total_logprob / max(1, n_tokens)


def preference(norm_logliks: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """pi_e over one query's pool: softmax(l/|y| / tau), computed without overflow or underflow."""
    if temperature <= 0:
        raise ValueError("preference temperature must be > 0")
    x = np.asarray(norm_logliks, dtype=np.float64) / temperature
    if x.size == 0:
        return x
    if not np.all(np.isfinite(x)):
        raise ValueError("log-likelihoods must be finite")
    z = np.exp(x - x.max())
    return z / z.sum()


def pool_weights(f_values: Sequence[float]) -> np.ndarray:
    """w(x, y): f min-max normalized to [0, 1] within one aligned pool; all ones when f is constant."""
    f = np.asarray(f_values, dtype=np.float64)
    if f.size == 0:
        return f
    span = f.max() - f.min()
    if span <= 1e-12:
        return np.ones_like(f)
    return (f - f.min()) / span


def query_score(
    aligned_f: Sequence[float | None],
    in_noisy: Sequence[bool],
    norm_logliks: Sequence[float],
    *,
    lam: float,
    temperature: float = 1.0,
) -> float:
    """One query's term of J(e).

    The three sequences run over the distinct texts of the union pool: `aligned_f[j]` is the f of text
    j when it is in the aligned pool (else None), `in_noisy[j]` says whether it is in the noisy pool,
    and `norm_logliks[j]` is l_e(y_j|x)/|y_j| under the candidate. A text in both pools gets both terms.
    """
    if not (len(aligned_f) == len(in_noisy) == len(norm_logliks)):
        raise ValueError("aligned_f, in_noisy and norm_logliks must have the same length")
    if not aligned_f:
        return 0.0
    pi = preference(norm_logliks, temperature)
    aligned_idx = [j for j, f in enumerate(aligned_f) if f is not None]
    weights = np.zeros(len(aligned_f))
    if aligned_idx:
        weights[aligned_idx] = pool_weights([aligned_f[j] for j in aligned_idx])
    noisy = np.asarray(in_noisy, dtype=bool)
    return float(np.dot(weights, pi) - lam * pi[noisy].sum())


def pooled_score(query_scores: Sequence[float]) -> float:
    """J(e): the mean of the per-query terms over the N queries."""
    if not query_scores:
        raise ValueError("pooled score needs at least one query")
    return float(np.mean(query_scores))

"""How a candidate instruction is scored in the refinement step, and which way is used.

- likelihood: the target itself gives l_e(y|x) for every pooled response (exact PICACO);
- proxy: a separate local model gives those likelihoods (for black-box targets);
- sampling: fresh responses are sampled under the candidate on a minibatch of queries, with the same
  seeds for every candidate of a round, and the candidate's score is their mean f.

The mode follows the models' declared capabilities, never their types; it can be forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from picaco import objective
from picaco.data.queries import Query
from picaco.errors import ConfigError
from picaco.llm.base import LikelihoodRequest, chat
from picaco.optimize.params import Mode, ResolvedMode
from picaco.optimize.pools import Pools, Scored


def select_mode(requested: Mode, target, proxy=None) -> ResolvedMode:
    """The refinement mode. `target` and `proxy` are LLMClients (anything with `has(capability)`)."""
    if requested == "likelihood":
        target.require("continuation_logprobs")
        return "likelihood"
    if requested == "proxy":
        if proxy is None:
            raise ConfigError("mode 'proxy' needs a proxy model (a local model that scores likelihoods)")
        proxy.require("continuation_logprobs")
        return "proxy"
    if requested == "sampling":
        return "sampling"
    if target.has("continuation_logprobs"):
        return "likelihood"
    if proxy is not None and proxy.has("continuation_logprobs"):
        return "proxy"
    return "sampling"


@dataclass(frozen=True)
class CandidateScore:
    score: float
    per_query: dict[str, float] = field(default_factory=dict)
    n_responses: int = 0

    def to_json(self) -> dict:
        # -inf (nothing scored) is stored as null: strict JSON has no infinities
        score = self.score if np.isfinite(self.score) else None
        return {"score": score, "per_query": self.per_query, "n_responses": self.n_responses}

    @classmethod
    def from_json(cls, d: dict) -> "CandidateScore":
        score = float("-inf") if d["score"] is None else float(d["score"])
        return cls(score, {k: float(v) for k, v in d["per_query"].items()},
                   int(d.get("n_responses", 0)))


def likelihood_requests(
    instruction: str, queries: Sequence[Query], pools: Pools
) -> tuple[list[LikelihoodRequest], list[tuple[str, int]]]:
    """One request per distinct pooled text of every query, and where each belongs (query id, count)."""
    requests: list[LikelihoodRequest] = []
    layout: list[tuple[str, int]] = []
    for q in queries:
        texts, _, _ = pools[q.id].union()
        messages = chat(instruction, q.text)
        requests.extend(LikelihoodRequest(messages, t) for t in texts)
        layout.append((q.id, len(texts)))
    return requests, layout


async def likelihood_score(
    client,
    instruction: str,
    queries: Sequence[Query],
    pools: Pools,
    *,
    lam: float,
    temperature: float,
) -> CandidateScore:
    """J(e) from the log-likelihood of every pooled response under (e, x); one batched call."""
    requests, layout = likelihood_requests(instruction, queries, pools)
    results = await client.loglikelihood(requests) if requests else []
    per_query: dict[str, float] = {}
    pos = 0
    for query_id, count in layout:
        chunk = results[pos : pos + count]
        pos += count
        _, aligned_f, in_noisy = pools[query_id].union()
        norm = [objective.length_normalized(r.total, r.n_tokens) for r in chunk]
        per_query[query_id] = objective.query_score(
            aligned_f, in_noisy, norm, lam=lam, temperature=temperature
        )
    return CandidateScore(
        objective.pooled_score(list(per_query.values())), per_query, n_responses=len(requests)
    )


#: the sampling-mode final check returns the seed instead of e^T only when e^T scores below it at
#: this one-sided level (docs/method.md, "[decide] The final check in sampling mode")
FINAL_CHECK_ALPHA = 0.05


def worse_p_value(candidate: Sequence[Scored], reference: Sequence[Scored]) -> float:
    """The p value of "`candidate` scores below `reference`": a one-sided paired t-test over queries
    of the per-query mean f, both sampled on the same queries and seeds. Without a spread to test
    against (one query, or the same difference on every query) the sign decides: 0 for a loss, 1
    otherwise. Nothing of the candidate's scored while the reference's was: 0."""
    return per_query_worse_p(sampling_score(candidate).per_query, sampling_score(reference).per_query)


def per_query_worse_p(mine: dict[str, float], theirs: dict[str, float]) -> float:
    """`worse_p_value` on per-query mean f (`CandidateScore.per_query`) of two instructions sampled on
    the same queries and seeds."""
    from scipy import stats

    if theirs and not mine:
        return 0.0
    diffs = np.array([mine[q] - theirs[q] for q in mine if q in theirs])
    if diffs.size == 0:
        return 1.0
    if diffs.size < 2 or diffs.std(ddof=1) == 0:
        return 0.0 if diffs.mean() < 0 else 1.0
    t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(diffs.size))
    return float(stats.t.cdf(t, diffs.size - 1))


def sampling_score(responses: Sequence[Scored]) -> CandidateScore:
    """Mean f of responses sampled under a candidate (unscored responses are left out); per query the
    mean f of that query's responses. -inf when nothing could be scored."""
    by_query: dict[str, list[float]] = {}
    for r in responses:
        if r.f is not None:
            by_query.setdefault(r.query_id, []).append(r.f)
    per_query = {q: float(np.mean(v)) for q, v in sorted(by_query.items())}
    scored = [f for v in by_query.values() for f in v]
    score = float(np.mean(scored)) if scored else float("-inf")
    return CandidateScore(score, per_query, n_responses=len(scored))


# -- the final check's two rules (docs/method.md, step 8): the engine and bench/final_check_size.py
# -- both decide with these


def seed_comes_back(last: Sequence[Scored], seed: Sequence[Scored]) -> tuple[bool, float]:
    """Whether the seed replaces the trajectory's last instruction, and the p value: only on evidence
    that the last one is worse (one-sided paired test below FINAL_CHECK_ALPHA), since it won every
    round it was in and a lower mean alone is mostly noise."""
    p = worse_p_value(last, seed)
    return p < FINAL_CHECK_ALPHA, p


def bare_model_wins(picked: Sequence[Scored], bare: Sequence[Scored], *,
                    kept_aside: bool) -> tuple[bool, float | None]:
    """Whether no instruction (the bare model) replaces the pick, and the p value of the test (None
    when there is none). On kept-aside queries both means are unbiased and no round compared the
    two, so the higher mean decides and a tie keeps the pick; on the rounds' own queries the pick
    was chosen for scoring well there, so the bare model must be demonstrably better."""
    if kept_aside:
        return sampling_score(bare).score > sampling_score(picked).score, None
    p = worse_p_value(picked, bare)
    return p < FINAL_CHECK_ALPHA, p

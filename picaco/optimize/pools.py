"""The two response pools each query keeps (METHOD.md section 3).

- aligned pool R^a_i: the best M1 responses seen so far under any instruction, by f; accumulates
  across rounds;
- noisy pool R^n_i: the M2 bare-model responses with the highest q_phi (the most parroting ones).

Pools are a pure function of the scored responses merged into them, in round order, so a resumed run
rebuilds exactly the pools of an uninterrupted one from its `responses.jsonl`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Scored:
    """One sampled response with everything the objective needs."""

    query_id: str
    text: str
    f: float | None  # None: the judge scored no value; never enters the aligned pool
    log_qphi: float
    probs: dict[str, float | None]
    round: int  # 0 = bare pass
    sample: int
    instruction_hash: str
    log_conformity: float | None = None
    ratings: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "query_id": self.query_id,
            "text": self.text,
            "f": self.f,
            "log_qphi": self.log_qphi,
            "round": self.round,
            "sample": self.sample,
            "instruction_hash": self.instruction_hash,
        }

    @classmethod
    def from_record(cls, r: dict) -> "Scored":
        """A response record of a run directory's responses.jsonl."""
        return cls(
            query_id=r["query_id"],
            text=r["text"],
            f=r["f"],
            log_qphi=r["log_qphi"],
            probs={k: v.get("prob") for k, v in r["scores"].items()},
            round=r["round"],
            sample=r["sample"],
            instruction_hash=r["instruction_hash"],
            log_conformity=r.get("log_conformity"),
            ratings={k: v.get("rating") for k, v in r["scores"].items()},
        )


def _same_text_key(text: str) -> str:
    # "Identical texts" ignores only surrounding whitespace: any other difference is a real variant.
    return text.strip()


def _rank_key(entry: Scored) -> tuple:
    # Higher f first; ties go to the earlier response so the order never depends on record order.
    return (-(entry.f if entry.f is not None else -np.inf), entry.round, entry.sample, entry.text)


@dataclass
class QueryPools:
    aligned: list[Scored] = field(default_factory=list)
    noisy: list[Scored] = field(default_factory=list)

    def union(self) -> tuple[list[str], list[float | None], list[bool]]:
        """Distinct texts of both pools, with each text's aligned f (None if not aligned) and whether
        it is in the noisy pool; the input of :func:`picaco.objective.query_score`."""
        texts: list[str] = []
        aligned_f: list[float | None] = []
        in_noisy: list[bool] = []
        index: dict[str, int] = {}
        for e in self.aligned:
            index[_same_text_key(e.text)] = len(texts)
            texts.append(e.text)
            aligned_f.append(e.f)
            in_noisy.append(False)
        for e in self.noisy:
            key = _same_text_key(e.text)
            if key in index:
                in_noisy[index[key]] = True
                continue
            index[key] = len(texts)
            texts.append(e.text)
            aligned_f.append(None)
            in_noisy.append(True)
        return texts, aligned_f, in_noisy


class Pools:
    """Aligned and noisy pools for every optimization query."""

    def __init__(self, query_ids: Sequence[str], aligned_size: int, noisy_size: int):
        self.aligned_size = aligned_size
        self.noisy_size = noisy_size
        self.by_query: dict[str, QueryPools] = {q: QueryPools() for q in query_ids}

    def __getitem__(self, query_id: str) -> QueryPools:
        return self.by_query[query_id]

    def merge_aligned(self, entries: Iterable[Scored]) -> int:
        """Add scored responses to their queries' aligned pools, keep the top M1 by f; returns how
        many entered. Unscored, empty and already-pooled texts are skipped."""
        added = 0
        for query_id, new in _group(entries).items():
            pool = self.by_query[query_id]
            seen = {_same_text_key(e.text) for e in pool.aligned}
            merged = list(pool.aligned)
            for e in sorted(new, key=_rank_key):
                key = _same_text_key(e.text)
                if e.f is None or not key or key in seen:
                    continue
                seen.add(key)
                merged.append(e)
            merged.sort(key=_rank_key)
            kept = merged[: self.aligned_size]
            added += sum(1 for e in kept if e not in pool.aligned)
            pool.aligned = kept
        return added

    def set_noisy(self, entries: Iterable[Scored]) -> None:
        """Fill the noisy pools: per query the M2 distinct non-empty bare responses with the highest
        q_phi (ties: earlier sample first)."""
        for query_id, new in _group(entries).items():
            seen: set[str] = set()
            ranked = []
            for e in sorted(new, key=lambda e: (-e.log_qphi, e.sample, e.text)):
                key = _same_text_key(e.text)
                if not key or key in seen:
                    continue
                seen.add(key)
                ranked.append(e)
            self.by_query[query_id].noisy = ranked[: self.noisy_size]

    def value_means(self, value_ids: Sequence[str]) -> dict[str, float | None]:
        """Mean q_w per value over every aligned-pool response that has a score for it."""
        out: dict[str, float | None] = {}
        for v in value_ids:
            probs = [
                e.probs[v]
                for p in self.by_query.values()
                for e in p.aligned
                if e.probs.get(v) is not None
            ]
            out[v] = float(np.mean(probs)) if probs else None
        return out

    def best(self, k: int) -> list[Scored]:
        """The k highest-f aligned responses, at most one per query."""
        tops = [p.aligned[0] for p in self.by_query.values() if p.aligned]
        return sorted(tops, key=_rank_key)[:k]

    def size(self) -> tuple[int, int]:
        return (
            sum(len(p.aligned) for p in self.by_query.values()),
            sum(len(p.noisy) for p in self.by_query.values()),
        )

    def snapshot(self) -> dict:
        return {
            q: {
                "aligned": [e.to_json() for e in p.aligned],
                "noisy": [e.to_json() for e in p.noisy],
            }
            for q, p in self.by_query.items()
        }


def _group(entries: Iterable[Scored]) -> dict[str, list[Scored]]:
    out: dict[str, list[Scored]] = {}
    for e in entries:
        out.setdefault(e.query_id, []).append(e)
    return out

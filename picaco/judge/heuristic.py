"""The naive embedding-similarity judge of MODELS.md, kept as a baseline to measure against.

score = cos(y, "honours V: <conforming>") − cos(y, "goes against V: <violating>"), and
q = sigmoid(scale · score). It needs no training and rewards responses that *sound like* the value's
description, which is exactly why it is fooled by name-dropping (bench/RESULTS_judges.md).
"""

from __future__ import annotations

import asyncio

import numpy as np
from scipy.special import expit

from picaco.judge.base import ValueScore


class SimilarityJudge:
    name = "similarity"

    def __init__(self, embedder=None, *, scale: float = 10.0):
        if embedder is None:
            from picaco.embeddings import shared_embedder

            embedder = shared_embedder()
        self.embedder = embedder
        self.scale = scale

    def identity(self) -> dict:
        return {"kind": "similarity", "scale": self.scale}

    def margins(self, value, responses: list[str]) -> np.ndarray:
        pos = f"A response that honours {value.title}: {value.conforming or value.definition}"
        neg = f"A response that goes against {value.title}: {value.violating or value.definition}"
        anchors = self.embedder.embed([pos, neg])
        ys = self.embedder.embed(responses)
        return ys @ anchors[0] - ys @ anchors[1]

    def score_sync(self, value_set, items: list[tuple[str, str]]) -> list[dict[str, ValueScore]]:
        responses = [y for _, y in items]
        probs = {v.id: expit(self.scale * self.margins(v, responses)) for v in value_set.values}
        return [
            {v.id: ValueScore.from_prob(v.id, float(probs[v.id][i])) for v in value_set.values}
            for i in range(len(items))
        ]

    async def score(self, value_set, items: list[tuple[str, str]]) -> list[dict[str, ValueScore]]:
        return await asyncio.to_thread(self.score_sync, value_set, items)

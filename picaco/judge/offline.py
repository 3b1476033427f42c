"""The embedded default q_ω: linear probes on sentence embeddings, trained on the bundled labeled data.

No model that ships in a package judges values well (MODELS.md), so q_ω(v|x,y) is *learned*: it is the
variational distribution of the Barber–Agakov bound, fitted to labeled (query, response, label) rows.

Representation (docs/judges.md has the measurements behind each choice):

* a text is represented by the normalized mean of its *sentence* embeddings (MiniLM). Averaging
  sentences keeps each sentence's stance visible; one embedding of the whole text is dominated by
  its topic (cross-validated pairwise accuracy 0.92 vs 0.83);
* features of an item are ``[r, r − q, √384·(r ⊙ q), max_s]``: the response; the response minus
  the query (which removes most of the topic the query imposes); their elementwise product (does
  the response take up what was asked, for relevance); and the per-dimension max over the
  response's sentences, so that one sentence that stands out is not averaged away.

Two models, both logistic, trained with a pointwise loss (conforming vs. not) plus a pairwise loss
that ranks each group's conforming response above its violating, fake and irrelevant ones:

* a **per-value probe** for every value with labeled data (used when the value's id and definition
  match the labeled one);
* a **shared, value-conditioned model** whose features also include ``r ⊙ (c − n)`` and
  ``(r − q) ⊙ (c − n)``, where c and n embed the value's conforming and violating descriptions. It
  scores any value from its text alone (a user's own value), and is blended into the per-value
  probe's logit with weight 1 − :attr:`OfflineConfig.blend`.

Logits become probabilities by Platt scaling fitted on out-of-fold logits (group k-fold for known
values, leave-one-value-out for the shared model), so q_ω is calibrated for the use it gets.

Training is deterministic (L-BFGS from zeros) and takes one to a few minutes on 2 cores once the
train split is embedded; the weights are cached under ``picaco.paths.models_dir()/judges`` (by default inside
``cache_dir()``) keyed by the labeled data,
the embedding model, the value definitions, the config and :data:`FEATURE_VERSION`. A judge pins
the labeled data and definitions when it is built: a run that outlives an edit of those files keeps
the weights it started with, or stops with a clear error if they were never trained.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from picaco import paths
from picaco.judge.base import ValueScore
from picaco.errors import DataError
from picaco.judge.labeled import LabeledRow, available_values, data_fingerprint, labeled_dir, load_rows

#: bump when features or training change, so cached weights are rebuilt
FEATURE_VERSION = 2
_DIM = 384
# Conditioned features are products of two unit vectors (entries ~1/384); scaling them by √384 puts
# them on the same footing as the plain embedding entries under one L2 penalty.
_COND_SCALE = float(np.sqrt(_DIM))


@dataclass(frozen=True)
class OfflineConfig:
    lam_value: float = 0.3
    lam_shared: float = 1.0
    pair_weight: float = 1.0
    #: weight of the per-value probe's logit against the shared model's, for known values
    blend: float = 0.75
    folds: int = 7
    #: train on one half (0 or 1) of every value's train groups; None: all of them. The two halves
    #: are disjoint, so a run can optimize against one judge and be evaluated by the other
    #: (cross-fitting): a gain that only exploits one probe's quirks does not carry over.
    half: int | None = None


# -- text representation ---------------------------------------------------------------------------

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str, min_chars: int = 20) -> list[str]:
    """Sentences (and list items); fragments shorter than ``min_chars`` join their neighbour."""
    pieces = [p.strip() for p in _SPLIT.split(text) if p and p.strip()]
    out: list[str] = []
    for p in pieces:
        if out and (len(p) < min_chars or len(out[-1]) < min_chars):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return out or [text.strip()]


def represent_pooled(embedder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(normalized mean, per-dimension max) of each text's sentence embeddings; all sentences go in
    one embed call."""
    split = [split_sentences(t) for t in texts]
    flat = [s for parts in split for s in parts]
    vecs = embedder.embed(flat) if flat else np.zeros((0, _DIM), np.float32)
    mean_out = np.empty((len(texts), _DIM), dtype=np.float64)
    max_out = np.empty((len(texts), _DIM), dtype=np.float64)
    start = 0
    for i, parts in enumerate(split):
        chunk = vecs[start : start + len(parts)]
        mean = chunk.mean(axis=0)
        mean_out[i] = mean / max(np.linalg.norm(mean), 1e-12)
        max_out[i] = chunk.max(axis=0)
        start += len(parts)
    return mean_out, max_out


def represent(embedder, texts: Sequence[str]) -> np.ndarray:
    """Normalized mean of each text's sentence embeddings."""
    return represent_pooled(embedder, texts)[0]


def value_direction(embedder, value) -> np.ndarray:
    """c − n for a value: its conforming minus its violating description (definition if missing)."""
    conforming = value.conforming or f"{value.title}: {value.definition}"
    c = embedder.embed([conforming])[0].astype(np.float64)
    n = embedder.embed([value.violating])[0].astype(np.float64) if value.violating else 0.0
    return c - n


def item_features(r: np.ndarray, q: np.ndarray, r_max: np.ndarray) -> np.ndarray:
    """[r, r − q, √384·(r ⊙ q), max-pooled r] (r, q: sentence means; r_max: sentence max)."""
    return np.hstack([r, r - q, r * q * _COND_SCALE, r_max])


def shared_features(
    r: np.ndarray, q: np.ndarray, r_max: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    d = np.atleast_2d(direction) * _COND_SCALE
    return np.hstack([item_features(r, q, r_max), r * d, (r - q) * d])


def definition_key(value) -> str:
    blob = json.dumps([value.title, value.definition, value.conforming, value.violating])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- fitting ----------------------------------------------------------------------------------------


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    pairs: np.ndarray,
    lam: float,
    pair_weight: float = 1.0,
) -> np.ndarray:
    """Weights (d + 1, last = bias) minimizing the logistic loss on ``labels`` plus ``pair_weight``
    times the pairwise logistic loss on ``pairs`` (rows (i, j): i should outscore j), plus
    lam·‖w‖². Convex; L-BFGS from zeros, so deterministic."""
    n, d = features.shape
    diff = features[pairs[:, 0]] - features[pairs[:, 1]] if len(pairs) else np.zeros((0, d))
    y = labels.astype(np.float64)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = features @ w[:-1] + w[-1]
        zp = diff @ w[:-1]
        loss = np.sum(np.logaddexp(0.0, z) - y * z)
        loss += pair_weight * np.sum(np.logaddexp(0.0, -zp)) + lam * np.dot(w[:-1], w[:-1])
        g = expit(z) - y
        gp = -pair_weight * expit(-zp)
        grad = np.concatenate([features.T @ g + diff.T @ gp + 2 * lam * w[:-1], [g.sum()]])
        return float(loss), grad

    result = minimize(objective, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 5000})
    return result.x


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(a, b) with P(conforming) = sigmoid(a·logit + b), by maximum likelihood."""
    w = fit_probe(logits.reshape(-1, 1), labels, np.zeros((0, 2), int), lam=1e-6)
    return float(w[0]), float(w[1])


def group_pairs(rows: Sequence[LabeledRow], index: Sequence[int]) -> np.ndarray:
    """(conforming, other) row-index pairs within each group, for rows in ``index``."""
    groups: dict[str, dict[str, int]] = {}
    for i in index:
        groups.setdefault(rows[i].group, {})[rows[i].label] = i
    pairs = [
        (g["conforming"], j) for g in groups.values() if "conforming" in g
        for label, j in sorted(g.items()) if label != "conforming"
    ]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def _fit(F: np.ndarray, y: np.ndarray, rows, index, lam: float, pw: float) -> np.ndarray:
    index = np.asarray(index, dtype=int)
    local = {int(g): k for k, g in enumerate(index)}
    pairs = group_pairs(rows, index)
    pairs = np.array([[local[a], local[b]] for a, b in pairs], dtype=int).reshape(-1, 2)
    return fit_probe(F[index], y[index], pairs, lam, pw)


def _logits(F: np.ndarray, w: np.ndarray) -> np.ndarray:
    return F @ w[:-1] + w[-1]


# -- weights ----------------------------------------------------------------------------------------


@dataclass
class OfflineWeights:
    value_w: dict[str, np.ndarray]
    value_keys: dict[str, str]
    shared_w: np.ndarray
    platt_known: tuple[float, float]
    platt_shared: tuple[float, float]
    meta: dict = field(default_factory=dict)
    #: calibrated out-of-fold probabilities of the train rows (row id -> q), from training only;
    #: not saved with the weights (bench/judges.py --cv reports them)
    oof: dict[str, float] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"value__{k}": v for k, v in self.value_w.items()}
        arrays["shared"] = self.shared_w
        header = {
            "value_keys": self.value_keys,
            "platt_known": self.platt_known,
            "platt_shared": self.platt_shared,
            "meta": self.meta,
        }
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, header=np.array(json.dumps(header)), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "OfflineWeights":
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            value_w = {k[len("value__"):]: data[k] for k in data.files if k.startswith("value__")}
            return cls(
                value_w=value_w,
                value_keys=header["value_keys"],
                shared_w=data["shared"],
                platt_known=tuple(header["platt_known"]),
                platt_shared=tuple(header["platt_shared"]),
                meta=header["meta"],
            )


def labeled_value_definitions(value_ids: Sequence[str]) -> dict:
    """The bundled Value each labeled value id was written against (from the bundled sets)."""
    from picaco.values import bundled_value_sets, load_value_set

    found = {}
    for name in bundled_value_sets():
        for v in load_value_set(name).values:
            found.setdefault(v.id, v)
    missing = [i for i in value_ids if i not in found]
    if missing:
        raise DataError(f"labeled values with no bundled definition: {', '.join(missing)}")
    return {i: found[i] for i in value_ids}


def train(
    embedder,
    *,
    values: Sequence[str] | None = None,
    config: OfflineConfig = OfflineConfig(),
    directory: Path | None = None,
    lovo: bool = True,
) -> OfflineWeights:
    """Fit the per-value probes, the shared model and both calibrations on the train split only."""
    value_ids = list(values) if values is not None else available_values(directory)
    rows = train_half(load_rows(value_ids, split="train", directory=directory), config.half)
    definitions = labeled_value_definitions(value_ids)
    r, r_max = represent_pooled(embedder, [row.response for row in rows])
    q = represent(embedder, [row.query for row in rows])
    y = np.array([row.conforms for row in rows], dtype=np.float64)
    directions = {i: value_direction(embedder, definitions[i]) for i in value_ids}
    F_item = item_features(r, q, r_max)
    F_shared = shared_features(r, q, r_max, np.stack([directions[row.value] for row in rows]))
    by_value = {v: [i for i, row in enumerate(rows) if row.value == v] for v in value_ids}
    everything = list(range(len(rows)))
    lam_v, lam_s, pw = config.lam_value, config.lam_shared, config.pair_weight

    # Out-of-fold logits for calibration: the same group folds for both models.
    fold_of = _group_folds(rows, by_value, config.folds)
    oof_value = np.zeros(len(rows))
    oof_shared = np.zeros(len(rows))
    for k in range(config.folds):
        train_idx = [i for i in everything if fold_of[i] != k]
        test_idx = [i for i in everything if fold_of[i] == k]
        if not test_idx:
            continue
        w_shared = _fit(F_shared, y, rows, train_idx, lam_s, pw)
        oof_shared[test_idx] = _logits(F_shared[test_idx], w_shared)
        for v, idx in by_value.items():
            fit_idx = [i for i in idx if fold_of[i] != k]
            out_idx = [i for i in idx if fold_of[i] == k]
            if out_idx:
                w = _fit(F_item, y, rows, fit_idx, lam_v, pw)
                oof_value[out_idx] = _logits(F_item[out_idx], w)
    blended = config.blend * oof_value + (1 - config.blend) * oof_shared
    platt_known = fit_platt(blended, y)

    # Leave-one-value-out logits calibrate the shared model for values it has never seen.
    if lovo and len(value_ids) > 1:
        lovo_logits = np.zeros(len(rows))
        for v, idx in by_value.items():
            w = _fit(F_shared, y, rows, [i for i in everything if rows[i].value != v], lam_s, pw)
            lovo_logits[idx] = _logits(F_shared[idx], w)
        platt_shared = fit_platt(lovo_logits, y)
    else:
        platt_shared = fit_platt(oof_shared, y)

    value_w = {v: _fit(F_item, y, rows, idx, lam_v, pw) for v, idx in by_value.items()}
    shared_w = _fit(F_shared, y, rows, everything, lam_s, pw)
    a, b = platt_known
    oof = {row.id: float(expit(a * z + b)) for row, z in zip(rows, blended)}
    return OfflineWeights(
        value_w=value_w,
        value_keys={v: definition_key(definitions[v]) for v in value_ids},
        shared_w=shared_w,
        platt_known=platt_known,
        platt_shared=platt_shared,
        meta={"train_rows": len(rows), "train_groups": len({row.group for row in rows}),
              "values": value_ids, "config": asdict(config), "version": FEATURE_VERSION},
        oof=oof,
    )


def train_half(rows: Sequence[LabeledRow], half: int | None) -> list[LabeledRow]:
    """Half 0 or 1 of every value's groups (sorted group ids dealt alternately); all rows for None."""
    if half is None:
        return list(rows)
    if half not in (0, 1):
        raise ValueError(f"half must be 0, 1 or None, not {half!r}")
    keep: set[str] = set()
    for value in {row.value for row in rows}:
        groups = sorted({row.group for row in rows if row.value == value})
        keep.update(g for n, g in enumerate(groups) if n % 2 == half)
    return [row for row in rows if row.group in keep]


def _group_folds(rows, by_value: dict[str, list[int]], folds: int) -> list[int]:
    """Each value's groups dealt round-robin (in sorted order) into ``folds`` folds."""
    fold_of = [0] * len(rows)
    for idx in by_value.values():
        groups = sorted({rows[i].group for i in idx})
        fold = {g: n % folds for n, g in enumerate(groups)}
        for i in idx:
            fold_of[i] = fold[rows[i].group]
    return fold_of


def training_inputs(values: Sequence[str] | None = None, directory: Path | None = None) -> dict:
    """What the offline judge is trained on that lives in editable files: the labeled data's hash and
    the bundled definitions of its values. Part of the weights' cache key; pinned by each judge."""
    ids = list(values) if values is not None else available_values(directory)
    return {
        "data": data_fingerprint(ids, directory),
        "definitions": {i: definition_key(v) for i, v in labeled_value_definitions(ids).items()},
    }


# -- the judge --------------------------------------------------------------------------------------


class OfflineJudge:
    """q_ω from the trained probes. ``score`` never calls a model server; it embeds and multiplies."""

    name = "offline"

    def __init__(
        self,
        embedder=None,
        *,
        weights: OfflineWeights | None = None,
        config: OfflineConfig = OfflineConfig(),
        values: Sequence[str] | None = None,
        cache: bool = True,
        directory: Path | None = None,
        pinned_inputs: dict | None = None,
    ):
        if embedder is None:
            from picaco.embeddings import shared_embedder

            embedder = shared_embedder()
        self.embedder = embedder
        self.config = config
        self._values = list(values) if values is not None else None
        self._cache = cache
        self._directory = directory
        self._weights = weights
        self._lock = threading.Lock()
        self._directions: dict[str, np.ndarray] = {}
        # Pinned now, not at first use: the labeled files and value definitions are read when the
        # weights are trained, which may be an hour into a run. A run keeps the judge it started with
        # (see _load_or_train) instead of silently switching to whatever the files say later.
        self._inputs = pinned_inputs if pinned_inputs is not None else training_inputs(
            self._values, self._directory)

    # -- training and caching ---------------------------------------------------------------------
    def cache_key(self) -> str:
        """Keys the weights: the pinned training inputs, the embedder, the config and the version."""
        return self._key_for(self._inputs)

    def _key_for(self, inputs: dict) -> str:
        blob = json.dumps(
            {**inputs, "embedder": self.embedder.identity(), "config": asdict(self.config),
             "version": FEATURE_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _check_inputs_unchanged(self) -> None:
        now = training_inputs(self._values, self._directory)
        if now != self._inputs:
            raise DataError(
                f"the offline judge's labeled data or value definitions changed after this run started "
                f"(weights {self.cache_key()} -> {self._key_for(now)}), and the weights it started with "
                f"are not cached: restore the files under {self._directory or labeled_dir()} and rerun, "
                f"or start a new run"
            )

    def cache_path(self) -> Path:
        # Next to the verified model files (by default <cache_dir>/models): the weights are a model
        # derived deterministically from hashed inputs, and test sessions that redirect the call
        # cache still reuse them instead of retraining.
        return paths.models_dir() / "judges" / f"offline-{self.cache_key()}.npz"

    @property
    def weights(self) -> OfflineWeights:
        with self._lock:
            if self._weights is None:
                self._weights = self._load_or_train()
            return self._weights

    def _load_or_train(self) -> OfflineWeights:
        path = self.cache_path() if self._cache else None
        if path is not None and path.is_file():
            try:
                return OfflineWeights.load(path)  # the pinned weights, even if the files changed since
            except (OSError, ValueError, KeyError):
                pass  # a corrupt cache entry is rebuilt below
        # Training reads the files now: they must still be the pinned ones, before and after.
        self._check_inputs_unchanged()
        weights = train(self.embedder, values=self._values, config=self.config,
                        directory=self._directory)
        self._check_inputs_unchanged()
        if path is not None:
            weights.save(path)
        return weights

    def identity(self) -> dict:
        ident = {"kind": "offline", "weights": self.cache_key(), "version": FEATURE_VERSION}
        if self.config.half is not None:
            ident["half"] = self.config.half
        return ident

    # -- scoring ----------------------------------------------------------------------------------
    def is_known(self, value) -> bool:
        """Whether ``value`` gets its own trained probe (same id and same definition texts)."""
        w = self.weights
        return value.id in w.value_w and w.value_keys.get(value.id) == definition_key(value)

    def _direction(self, value) -> np.ndarray:
        key = definition_key(value)
        if key not in self._directions:
            self._directions[key] = value_direction(self.embedder, value)
        return self._directions[key]

    def logits(self, value_set, items: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Raw (uncalibrated) logits per value id, one per item."""
        if not items:
            return {v.id: np.zeros(0) for v in value_set.values}
        w = self.weights
        r, r_max = represent_pooled(self.embedder, [y for _, y in items])
        q = represent(self.embedder, [x for x, _ in items])
        F_item = item_features(r, q, r_max)
        out = {}
        for value in value_set.values:
            shared = _logits(shared_features(r, q, r_max, self._direction(value)), w.shared_w)
            if self.is_known(value):
                own = _logits(F_item, w.value_w[value.id])
                out[value.id] = self.config.blend * own + (1 - self.config.blend) * shared
            else:
                out[value.id] = shared
        return out

    def score_sync(self, value_set, items: Sequence[tuple[str, str]]) -> list[dict[str, ValueScore]]:
        w = self.weights
        logits = self.logits(value_set, items)
        calibrated = {}
        for value in value_set.values:
            a, b = w.platt_known if self.is_known(value) else w.platt_shared
            calibrated[value.id] = expit(a * logits[value.id] + b)
        return [
            {v.id: ValueScore.from_prob(v.id, float(calibrated[v.id][i])) for v in value_set.values}
            for i in range(len(items))
        ]

    async def score(self, value_set, items: list[tuple[str, str]]) -> list[dict[str, ValueScore]]:
        # Embedding is CPU work; run it off the event loop so concurrent model calls keep going.
        return await asyncio.to_thread(self.score_sync, value_set, items)

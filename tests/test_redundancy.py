"""q_φ: the two-way softmax against hand-computed numbers, the τ fit, and the model on real embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from picaco.redundancy import (
    DEFAULT_TAU,
    RedundancyModel,
    fit_tau,
    log_q_phi,
    q_phi,
    redundancy_margin,
    spec_similarity,
    spec_texts,
)
from picaco.values import load_value_set


def test_two_way_softmax_hand_computed():
    # τ = 10, cos(s,y) = 0.6, cos(x,y) = 0.4: q = e^6 / (e^6 + e^4) = 1 / (1 + e^-2)
    assert q_phi(0.6, 0.4, 10.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert log_q_phi(0.6, 0.4, 10.0) == pytest.approx(-math.log1p(math.exp(-2)))
    assert q_phi(0.3, 0.3, 7.0) == pytest.approx(0.5)
    a, b, tau = 0.12, 0.55, 20.0
    direct = math.exp(tau * a) / (math.exp(tau * a) + math.exp(tau * b))
    assert q_phi(a, b, tau) == pytest.approx(direct)
    assert redundancy_margin(0.12, 0.55) == pytest.approx(-0.43)


def test_vectorized_and_stable_at_extremes():
    logs = log_q_phi(np.array([1.0, -1.0, 0.0]), np.array([-1.0, 1.0, 0.0]), 1000.0)
    assert np.all(np.isfinite(logs))
    assert logs[0] == pytest.approx(0.0, abs=1e-12)
    assert logs[1] == pytest.approx(-2000.0)
    assert logs[2] == pytest.approx(math.log(0.5))


def test_tau_zero_is_uninformative():
    assert q_phi(0.9, -0.9, 0.0) == pytest.approx(0.5)


def test_spec_similarity_takes_the_closest_value():
    specs = np.array([[1.0, 0.0], [0.0, 1.0]])
    ys = np.array([[0.6, 0.8], [1.0, 0.0]])
    np.testing.assert_allclose(spec_similarity(specs, ys), [0.8, 1.0])


def test_fit_tau_solves_the_likelihood_equations():
    rng = np.random.default_rng(0)
    parrot = rng.normal(-0.2, 0.1, 200)  # both far below 0, as on real data
    honest = rng.normal(-0.5, 0.1, 200)
    tau = fit_tau(parrot, honest)
    # the score equations of the logistic MLE hold at (tau, b) for some intercept b
    d = np.concatenate([parrot, honest])
    y = np.concatenate([np.ones(200), np.zeros(200)])
    def residual(b: float) -> float:
        return float(np.sum(y - 1 / (1 + np.exp(-(tau * d + b)))))

    b = brentq(residual, -100.0, 100.0, xtol=1e-14)  # the intercept's score equation
    p = 1 / (1 + np.exp(-(tau * d + b)))
    assert abs(np.sum((y - p) * d)) < 1e-6
    # two normals with equal variance: the true slope is (mu1 - mu0) / sigma^2 = 30
    assert 20 < tau < 40
    assert fit_tau(honest, parrot) == 0.0  # wrong-way evidence is clipped at 0


class _TableEmbedder:
    """Maps known texts to given unit vectors (a stand-in for the real embedder in logic tests)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = {k: np.asarray(v, dtype=np.float32) / np.linalg.norm(v) for k, v in table.items()}

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts])


def test_model_arithmetic_with_scripted_embeddings():
    vs = load_value_set("helpfulness-4")
    specs = spec_texts(vs)
    table = {s: [0.0, 0.0, 0.0, 0.0, 0.0] for s in specs}
    for i, s in enumerate(specs):
        table[s] = [1.0 if j == i else 0.0 for j in range(4)] + [0.0]
    table["q"] = [0.0, 0.0, 0.0, 0.0, 1.0]
    table["parrot"] = [0.0, 0.8, 0.0, 0.0, 0.6]  # cos to the 2nd value 0.8, to the query 0.6
    table["answer"] = [0.0, 0.0, 0.6, 0.0, 0.8]
    model = RedundancyModel(_TableEmbedder(table), vs, tau=10.0)
    parrot, answer = model.score([("q", "parrot"), ("q", "answer")])
    assert parrot.cos_sy == pytest.approx(0.8) and parrot.cos_xy == pytest.approx(0.6)
    assert parrot.q == pytest.approx(1 / (1 + math.exp(-2)))
    assert answer.q == pytest.approx(1 / (1 + math.exp(2)))
    assert parrot.log_q == pytest.approx(math.log(parrot.q))
    np.testing.assert_allclose(model.log_q([("q", "parrot")]), [parrot.log_q])
    assert model.score([]) == []


def test_joined_mode_embeds_one_text():
    vs = load_value_set("helpfulness-4")
    assert len(spec_texts(vs, "joined")) == 1
    assert spec_texts(vs, "joined")[0].count("\n") == 3


def test_parroting_scores_higher_on_the_real_model(minilm_dir):
    from picaco.embeddings import Embedder

    vs = load_value_set("confucianism-4")
    model = RedundancyModel(Embedder(minilm_dir), vs)
    assert model.tau == DEFAULT_TAU
    query = "My sister wants to skip our grandmother's 80th birthday dinner for a concert. Advice?"
    honest = (
        "Talk to her before the concert tickets lock her in. Ask whether she could join for part "
        "of the dinner, or visit your grandmother the next day with a small gift and photos."
    )
    parrot = (
        "Tradition, conformity, benevolence and security are the core values here: honouring "
        "customs and elders, following social norms, caring for family, and keeping stability."
    )
    s_honest, s_parrot = model.score([(query, honest), (query, parrot)])
    assert s_parrot.q > s_honest.q
    assert s_parrot.cos_sy > s_honest.cos_sy

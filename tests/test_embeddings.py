"""The MiniLM int8 ONNX embedder, on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from picaco.embeddings import DIM, Embedder


@pytest.fixture(scope="module")
def embedder(minilm_dir) -> Embedder:
    return Embedder(minilm_dir, threads=2, batch_size=4)


TEXTS = [
    "I love dogs.",
    "Puppies are my favourite animals.",
    "The quarterly VAT return is due on the seventh of the month after the quarter ends.",
    "",
    "word " * 600,  # far past the 256-token truncation
]


def test_shape_dtype_and_unit_norm(embedder):
    vecs = embedder.embed(TEXTS)
    assert vecs.shape == (len(TEXTS), DIM)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_deterministic_and_independent_of_batching(embedder, minilm_dir):
    together = embedder.embed(TEXTS)
    fresh = Embedder(minilm_dir, batch_size=32, cache_size=0)
    one_by_one = np.stack([fresh.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(fresh.embed(TEXTS), fresh.embed(TEXTS))


def test_similarity_reflects_meaning(embedder):
    dogs, puppies, tax = embedder.embed(TEXTS[:3])
    assert dogs @ puppies > 0.5
    assert dogs @ tax < 0.2


def test_lru_cache_hits_and_bound(minilm_dir):
    small = Embedder(minilm_dir, cache_size=2)
    first = small.embed(["a", "b"])
    assert small.misses == 2 and small.hits == 0
    again = small.embed(["b", "a", "a"])
    assert small.hits == 3
    np.testing.assert_array_equal(again[0], first[1])
    small.embed(["c"])  # evicts the least recently used ("b")
    small.embed(["b"])
    assert small.misses == 4


def test_duplicates_in_one_call_are_encoded_once(minilm_dir):
    e = Embedder(minilm_dir, cache_size=0)
    vecs = e.embed(["same text", "same text", "other"])
    assert e.misses == 2
    np.testing.assert_array_equal(vecs[0], vecs[1])


def test_rejects_a_bare_string(embedder):
    with pytest.raises(TypeError):
        embedder.embed("not a list")


def test_identity_names_the_verified_model(embedder):
    ident = embedder.identity()
    assert len(ident["sha256"]) == 64 and ident["max_tokens"] == 256

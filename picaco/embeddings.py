"""Sentence embeddings: all-MiniLM-L6-v2 as int8 ONNX, run with onnxruntime on the CPU.

The optimizer and the judges embed the same texts again and again (value definitions, queries, pool
responses), so embeddings are kept in an in-memory LRU keyed by a hash of the text. Vectors are
mean-pooled over real tokens and L2-normalized, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DIM = 384
MAX_TOKENS = 256
DEFAULT_MODEL = "minilm-l6"


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class Embedder:
    """Embed texts into L2-normalized float32 vectors of size :data:`DIM`.

    ``model_dir`` holds ``model.onnx`` (output ``last_hidden_state``) and ``tokenizer.json``;
    by default it is the registry's ``minilm-l6``, pulled (and verified) on first use.
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        threads: int = 2,
        batch_size: int = 32,
        max_tokens: int = MAX_TOKENS,
        cache_size: int = 20_000,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if model_dir is None:
            from picaco.llm import registry

            model_dir = registry.pull(DEFAULT_MODEL)
        self.model_dir = Path(model_dir)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self.threads = threads

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(self.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # The shipped tokenizer pads every text to 128; pad per batch instead and allow 256 tokens.
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def identity(self) -> dict:
        """What distinguishes these embeddings (used to key caches of anything derived from them)."""
        from picaco.llm import registry

        onnx = self.model_dir / "model.onnx"
        return {
            "model": DEFAULT_MODEL if self.model_dir.name == DEFAULT_MODEL else str(self.model_dir),
            "sha256": registry.verified_sha256(onnx) or _sha256_file(onnx),
            "max_tokens": self.max_tokens,
        }

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An (n, DIM) float32 array of unit vectors, one row per text, in order."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        keys = [_text_key(t) for t in texts]
        out = np.empty((len(texts), DIM), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                vec = self._cache.get(k)
                if vec is not None:
                    self._cache.move_to_end(k)
                    out[i] = vec
                    self.hits += 1
                else:
                    todo.setdefault(k, []).append(i)
        if todo:
            unique = [texts[idx[0]] for idx in todo.values()]
            vectors = self._encode(unique)
            with self._lock:
                for (k, idx), vec in zip(todo.items(), vectors):
                    out[idx] = vec
                    self.misses += 1
                    self._remember(k, vec)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _remember(self, key: bytes, vec: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = vec
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _encode(self, texts: list[str]) -> np.ndarray:
        # Sorting by length keeps each batch's padding short; results go back in the input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            result[chunk] = self._encode_batch([texts[i] for i in chunk])
        return result

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_shared: dict[tuple[str, int], Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(model_dir: Path | str | None = None, *, threads: int = 2) -> Embedder:
    """One process-wide embedder per (model dir, threads), so every component shares its LRU."""
    key = (str(model_dir) if model_dir is not None else "", threads)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Embedder(model_dir, threads=threads)
        return _shared[key]

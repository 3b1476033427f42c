"""Shared fixtures.

Model files are pulled once into the normal models directory (so repeated test runs and CI reuse them),
while every test session gets a private call cache so tests never see each other's cached answers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # makes `support` importable

# llama.cpp's OpenMP threads busy-wait by default; on 2 shared cores that stalls decoding badly
# (measured: 20 decode steps 2-118 s spinning vs 1.1 s passive). Set before anything loads llama_cpp,
# so the llama.cpp server subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from picaco import paths  # noqa: E402

# Pin the models dir before the cache dir is redirected, so pulls land in the shared location.
os.environ.setdefault(paths.MODELS_ENV, str(paths.models_dir()))


@pytest.fixture(autouse=True, scope="session")
def _private_call_cache(tmp_path_factory):
    os.environ[paths.CACHE_ENV] = str(tmp_path_factory.mktemp("picaco-cache"))
    yield


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M GGUF, pulled (and verified) on first use."""
    from picaco.llm import registry

    return registry.pull("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The MiniLM int8 ONNX embedding model directory (model.onnx + tokenizer.json)."""
    from picaco.llm import registry

    return registry.pull("minilm-l6")

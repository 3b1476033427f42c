"""API keys never leave memory: a real optimize, evaluate and report against a llama.cpp server that
*requires* a key, with the key given by environment variable and by key file, then every byte picaco
produced (run and evaluation directories, report HTML, the SQLite call cache with its WAL, captured
stdout/stderr) is searched for the key. A wrong key fails with exit 3 and a message that quotes neither
key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from support.llama_server import _log_tail, _stop, free_port

pytestmark = [pytest.mark.model, pytest.mark.server, pytest.mark.slow]

KEY_ENV = "PICACO_TEST_SERVER_KEY"


@contextlib.contextmanager
def keyed_llama_server(gguf: Path, api_key: str) -> Iterator[tuple[str, str]]:
    """`python -m llama_cpp.server --api_key KEY`; yields (base_url, model alias).

    Not support.llama_server: its readiness probe sends no key, and a keyed server answers it 401.
    """
    port, alias = free_port(), "smollm2"
    log = tempfile.NamedTemporaryFile("wb", prefix="llama-keyed-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
           "--logits_all", "True", "--verbose", "False", "--api_key", api_key]
    with log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "server exited:\n" + _log_tail(Path(log.name))
            assert time.monotonic() < deadline, "server did not come up:\n" + _log_tail(Path(log.name))
            with contextlib.suppress(httpx.HTTPError):
                ok = httpx.get(base_url + "/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=2)
                if ok.status_code == 200:
                    break
            time.sleep(0.3)
        # the key is really enforced: without it (or with another) the server refuses
        assert httpx.get(base_url + "/models", timeout=5).status_code == 401
        yield base_url, alias
    finally:
        _stop(proc)
        os.unlink(log.name)


def _role(base_url: str, model: str, key_source: dict) -> dict:
    return {"backend": "openai", "base_url": base_url, "model": model, "max_in_flight": 2, "timeout": 600,
            "max_retries": 1, **key_source}


# the smallest real run: 2 values, 1 query, 1 round, short generations (the checks are about bytes
# written, not quality; every role still makes real authenticated calls)
SMALLEST = {"n_queries": 1, "minibatch": 1, "rounds": 1, "candidates": 1, "bare_samples": 1,
            "aligned_pool_size": 1, "noisy_pool_size": 1, "max_new_tokens": 12, "optimizer_max_tokens": 48}


def _write_config(path: Path, base_url: str, model: str, key_source: dict) -> Path:
    role = _role(base_url, model, key_source)
    values = path.parent / "two-values.yaml"
    values.write_text("name: two\nfamily: hh\nextends: helpfulness-4\nvalues: [relevance, clarity]\n")
    path.write_text(yaml.safe_dump({
        "values": str(values), "preset": "tiny", "optimize": SMALLEST,
        "target": role, "optimizer": role, "judge": {"type": "llm", **role},
    }))
    return path


def _picaco(args: list[str], cwd: Path, env: dict[str, str], transcript: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "picaco.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **env})
    transcript += [proc.stdout, proc.stderr]  # searched for the key later
    return proc


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` whose bytes contain any needle (SQLite pages and WAL included)."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(root)} holds {n!r}" for n in needles if n in data]
    return hits


@pytest.fixture(scope="module")
def key() -> str:
    return "sk-picaco-" + secrets.token_hex(20)


@pytest.fixture(scope="module")
def server(smollm2_path, key):
    with keyed_llama_server(smollm2_path, key) as srv:
        yield srv


def test_key_from_env_and_file_is_used_but_never_written(server, key, tmp_path, minilm_dir):
    base_url, model = server
    work = tmp_path / "work"
    work.mkdir()
    key_file = tmp_path / "secret" / "key.txt"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    env = {KEY_ENV: key, "PICACO_CACHE_DIR": str(work / "cache")}
    transcript: list[str] = []

    by_env = _write_config(work / "env.yaml", base_url, model, {"api_key_env": KEY_ENV})
    by_file = _write_config(work / "file.yaml", base_url, model, {"api_key_file": str(key_file)})
    steps = [
        ["optimize", "-c", str(by_env), "-o", "run", "--json"],
        ["evaluate", "-c", str(by_env), "-m", "Q", "-i", "picaco=run", "--n-queries", "1", "-o", "eval"],
        ["report", "run"],
        # the key file, with the cache off so every call really goes to the server with that key
        ["evaluate", "-c", str(by_file), "-m", "Q+IF", "--n-queries", "1", "--no-cache", "-o", "eval-file"],
    ]
    for args in steps:
        proc = _picaco(args, work, env, transcript)
        assert proc.returncode == 0, f"picaco {' '.join(args)} failed:\n{proc.stderr[-3000:]}"

    # the runs did what they claim: results exist and the cache holds the calls
    assert (work / "run" / "instruction.txt").read_text().strip()
    assert (work / "eval" / "summary.json").is_file() and (work / "eval-file" / "summary.json").is_file()
    assert (work / "run" / "report.html").is_file()
    cache_files = [p for p in (work / "cache").rglob("*") if p.is_file()]
    assert any(p.stat().st_size > 0 for p in cache_files), "no call cache was written"

    # the whole key, and its random part alone (in case of a masked or re-prefixed copy)
    needles = [key.encode(), key.removeprefix("sk-picaco-").encode(), key[-16:].encode()]
    assert not _files_holding(work, needles)
    assert not [n for n in needles if n.decode() in "".join(transcript)]


def test_wrong_key_fails_without_echoing_either_key(server, key, tmp_path):
    base_url, model = server
    wrong = "sk-wrong-" + secrets.token_hex(20)
    config = _write_config(tmp_path / "wrong.yaml", base_url, model, {"api_key_env": KEY_ENV})
    transcript: list[str] = []
    proc = _picaco(["evaluate", "-c", str(config), "-m", "Q", "--n-queries", "1", "--no-cache", "-o", "eval"],
                   tmp_path, {KEY_ENV: wrong, "PICACO_CACHE_DIR": str(tmp_path / "cache")}, transcript)
    assert proc.returncode == 3, proc.stderr[-2000:]
    # besides the evaluation plan printed before any call (a heading and indented rows), one error line
    lines = [line for line in proc.stderr.strip().splitlines()
             if not line.startswith(("evaluation plan:", "  "))]
    assert proc.stderr.startswith("evaluation plan:"), proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "401" in lines[0] and "rejected the API key" in lines[0]
    for secret in (wrong, key, wrong[-16:], key[-16:]):
        assert secret not in "".join(transcript)
        assert not _files_holding(tmp_path, [secret.encode()])


def test_wrong_key_error_object_holds_no_key(server, key):
    """In process: the exception's text, repr and formatted traceback (with its chain) omit the key."""
    import asyncio

    from picaco.errors import BackendError
    from picaco.llm.base import GenerateRequest, Message
    from picaco.llm.openai_backend import OpenAIBackend

    base_url, model = server
    wrong = "sk-wrong-" + secrets.token_hex(20)

    async def call() -> BaseException:
        backend = OpenAIBackend(base_url, model, api_key=wrong, max_retries=0)
        try:
            await backend.generate(GenerateRequest(messages=(Message("user", "hi"),), max_tokens=4))
        except BackendError as err:
            return err
        finally:
            await backend.aclose()
        raise AssertionError("a wrong key was accepted")

    err = asyncio.run(call())
    text = "".join(traceback.format_exception(err)) + repr(err) + str(err)
    assert "401" in str(err)
    assert wrong not in text and wrong[-16:] not in text and key not in text

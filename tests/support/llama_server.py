"""Start a real ``python -m llama_cpp.server`` on 127.0.0.1 for tests and benchmarks.

    with llama_server(gguf_path) as srv:
        client = AsyncOpenAI(base_url=srv.base_url, api_key="unused")

The server runs as a child process of the current interpreter (so it uses the same venv), on a free
port, with ``--logits_all True`` (needed for echoed prompt log-probabilities). Its output goes to a
log file whose tail is put into the error when it fails to come up. It is always stopped on exit:
terminate, then kill.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.delay_server import stop_child


@dataclass(frozen=True)
class LlamaServer:
    base_url: str  # e.g. "http://127.0.0.1:43121/v1", what an OpenAI client takes
    port: int
    model: str  # the alias the server reports in /v1/models
    log_path: Path
    pid: int


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; the tiny race is acceptable for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no server log>"


def _wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"llama.cpp server exited with code {proc.returncode} before answering; log tail:\n"
                + _log_tail(log_path)
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"llama.cpp server did not answer {url} within {timeout:.0f}s; log tail:\n" + _log_tail(log_path)
    )


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    stop_child(proc, grace)


@contextlib.contextmanager
def llama_server(
    model_path: str | os.PathLike,
    *,
    model_alias: str | None = None,
    n_ctx: int = 1024,
    n_threads: int = 2,
    logits_all: bool = True,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120.0,
    host: str = "127.0.0.1",
    log_dir: str | os.PathLike | None = None,
) -> Iterator[LlamaServer]:
    """Run a llama.cpp OpenAI-compatible server for the given GGUF; yields its :class:`LlamaServer`."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"GGUF not found: {model_path}")
    alias = model_alias or model_path.stem
    port = free_port(host)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", alias,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(n_threads),
        "--logits_all", str(logits_all),
        *extra_args,
    ]
    log_file = tempfile.NamedTemporaryFile(
        "wb", prefix="llama-server-", suffix=".log", dir=log_dir, delete=False
    )
    log_path = Path(log_file.name)
    with log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base_url = f"http://{host}:{port}/v1"
        _wait_until_ready(proc, base_url + "/models", log_path, startup_timeout)
        yield LlamaServer(base_url=base_url, port=port, model=alias, log_path=log_path, pid=proc.pid)
    finally:
        _stop(proc)

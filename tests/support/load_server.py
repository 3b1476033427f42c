"""The delay server plus what load tests need: a per-request log and timed status storms.

:class:`LoadServer` extends :class:`support.delay_server.DelayServer` (same endpoints, same
``/_control``) with:

- a log of every model request: ``[start, end, tag, status]`` with monotonic seconds (the clock is
  shared by all processes on the machine, so logs from several servers can be merged), where ``tag``
  is the content of the request's last message; ``GET /_log`` returns it;
- in-flight counting that includes requests answered with a storm status, so the peak is the true
  number of open model requests; ``GET /_log`` also returns ``max_open``;
- storms: ``POST /_control`` with ``{"storm": {"after": K, "seconds": S, "status": 429,
  "retry_after": R}}``: once K more model requests have arrived, every model request for the next S
  seconds is answered at once with that status (and ``Retry-After: R`` if given).

Run it in a thread (:func:`start_in_thread`) or in a child process (:func:`start_in_process`).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from support.delay_server import _MODEL_PATHS, DelayServer, DelayServerHandle, _response, serve_in_thread, serve_main, stop_child


class LoadServer(DelayServer):
    def __init__(self, delay: float = 0.0):
        super().__init__(delay)
        self.log: list[list] = []
        self.open = 0
        self.max_open = 0
        self.storm: dict | None = None  # pending or active storm
        self.storm_until = 0.0

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes) -> bytes | None:
        if path == "/_log":
            return _response(200, json.dumps({"log": self.log, "max_open": self.max_open}).encode())
        if path == "/_control" and method == "POST":
            self._load_control(json.loads(body or b"{}"))
        if path not in _MODEL_PATHS or method != "POST":
            return await super()._dispatch(method, path, headers, body)
        start = time.monotonic()
        entry = [start, None, _tag(body), None]
        self.log.append(entry)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            reply = self._storm_reply(start)
            if reply is None:
                reply = await super()._dispatch(method, path, headers, body)
            entry[3] = _status_of(reply)
            return reply
        finally:
            self.open -= 1
            entry[1] = time.monotonic()

    def _storm_reply(self, now: float) -> bytes | None:
        storm = self.storm
        if storm is not None and storm["after"] <= 0 and self.storm_until == 0.0:
            self.storm_until = now + float(storm["seconds"])
        if storm is not None and storm["after"] > 0:
            storm["after"] -= 1
        if self.storm_until and now < self.storm_until:
            headers = {}
            if storm and storm.get("retry_after") is not None:
                headers["Retry-After"] = str(storm["retry_after"])
            status = int(storm.get("status", 429)) if storm else 429
            return _response(status, json.dumps({"error": {"message": "storm"}}).encode(), headers)
        return None

    def _load_control(self, cmd: dict) -> None:
        if cmd.get("reset"):
            self.log.clear()
            self.open = self.max_open = 0
            self.storm, self.storm_until = None, 0.0
        if "storm" in cmd:
            self.storm, self.storm_until = dict(cmd["storm"]), 0.0


def _tag(body: bytes) -> str:
    try:
        request = json.loads(body or b"{}")
        if "messages" in request:
            return str(request["messages"][-1]["content"])
        return str(request.get("prompt", ""))[-60:]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def _status_of(reply: bytes | None) -> int:
    if reply is None:
        return 0  # connection dropped
    return int(reply.split(b" ", 2)[1])


class LoadServerHandle(DelayServerHandle):
    def storm(self, *, after: int, seconds: float, status: int = 429, retry_after: float | None = None) -> None:
        spec = {"after": after, "seconds": seconds, "status": status, "retry_after": retry_after}
        httpx.post(self.root_url + "/_control", json={"storm": spec}, timeout=5).raise_for_status()

    def log(self) -> dict:
        """``{"log": [[start, end, tag, status], ...], "max_open": n}``."""
        return httpx.get(self.root_url + "/_log", timeout=30).json()


@contextlib.contextmanager
def start_in_thread(delay: float = 0.0, host: str = "127.0.0.1") -> Iterator[LoadServerHandle]:
    with serve_in_thread(LoadServer(delay), host, "load server") as port:
        yield LoadServerHandle(f"http://{host}:{port}")


@contextlib.contextmanager
def start_in_process(delay: float = 0.0, host: str = "127.0.0.1") -> Iterator[LoadServerHandle]:
    """A LoadServer in a child process (off the client's GIL); the handle's ``pid`` is the child's."""
    tests_dir = str(Path(__file__).resolve().parents[1])  # so the child can import `support`
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests_dir!r}); "
         "from support.load_server import main; main()",
         "--host", host, "--port", "0", "--delay", str(delay)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"load server failed to start: {line!r}")
        handle = LoadServerHandle(f"http://{host}:{int(line)}")
        handle.pid = proc.pid  # type: ignore[attr-defined]
        yield handle
    finally:
        stop_child(proc)


def main() -> None:
    serve_main(LoadServer, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()

"""A tiny OpenAI-compatible HTTP server with scripted faults, for retry tests and transport benchmarks.

It speaks just enough of ``POST /v1/chat/completions`` (a fixed reply, with ``usage``) and answers
``GET /v1/models``. Everything else is 404. Behaviour is steered over HTTP so the same server works
in a thread (tests) or in a child process (benchmarks, where a separate process keeps the server off
the client's GIL):

- ``POST /_control`` with ``{"delay": 0.25}`` sets the delay before each normal answer, and
  ``{"faults": [...]}`` appends faults; each request to a model endpoint consumes the next fault.
  A fault is ``{"kind": K, ...}`` with K one of ``status`` (``status``, optional ``retry_after``,
  ``retry_after_ms``, ``message``), ``invalid_json``, ``empty_choices``, ``hang`` (``seconds``) and
  ``drop`` (close the connection without answering). ``{"reset": true}`` clears faults and stats.
- ``GET /_stats`` returns request counts, the peak number of concurrent model requests, the arrival
  times (monotonic seconds) and the last request bodies.

The HTTP/1.1 handling is deliberately minimal (Content-Length bodies, keep-alive), which is all the
``openai``/``httpx`` client needs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
            409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}
_MODEL_PATHS = ("/v1/chat/completions", "/v1/completions")
REPLY_TEXT = "pong"


@dataclass
class _State:
    delay: float = 0.0
    faults: deque = field(default_factory=deque)
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    epoch: int = 0  # bumped by reset, so requests still hanging from before it are not counted
    arrivals: list[float] = field(default_factory=list)
    bodies: deque = field(default_factory=lambda: deque(maxlen=16))
    auth_headers: deque = field(default_factory=lambda: deque(maxlen=16))

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "arrivals": self.arrivals,
            "bodies": list(self.bodies),
            "auth_headers": list(self.auth_headers),
            "pending_faults": len(self.faults),
        }


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chat_reply(request: dict) -> dict:
    return {
        "id": "chatcmpl-delay",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "delay-model"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": REPLY_TEXT}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }


class DelayServer:
    """The server itself; run it with :func:`start_in_thread` or as ``python delay_server.py``."""

    def __init__(self, delay: float = 0.0):
        self.state = _State(delay=delay)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, host, port, backlog=1024)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                reply = await self._dispatch(method, path, headers, body)
                if reply is None:  # a "drop" fault: close without answering
                    break
                writer.write(reply)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader):
        head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
        if not head:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        return method, path.split("?", 1)[0], headers, body

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes) -> bytes | None:
        st = self.state
        if path == "/_control" and method == "POST":
            self._control(json.loads(body or b"{}"))
            return _response(200, b"{}")
        if path == "/_stats":
            return _response(200, json.dumps(st.stats()).encode())
        if path == "/v1/models":
            return _response(200, json.dumps({"object": "list", "data": [{"id": "delay-model", "object": "model"}]}).encode())
        if path not in _MODEL_PATHS or method != "POST":
            return _response(404, json.dumps({"error": {"message": f"no route {path}"}}).encode())
        if path != "/v1/chat/completions":
            return _response(404, json.dumps({"error": {"message": "completions not served here"}}).encode())

        st.requests += 1
        st.arrivals.append(time.monotonic())
        epoch = st.epoch
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            request = json.loads(body or b"{}")
            st.bodies.append(request)
            st.auth_headers.append(headers.get("authorization", ""))
            fault = st.faults.popleft() if st.faults else None
            if fault is not None:
                return await self._fault(fault)
            if st.delay:
                await asyncio.sleep(st.delay)
            return _response(200, json.dumps(_chat_reply(request)).encode())
        finally:
            if st.epoch == epoch:
                st.in_flight -= 1

    async def _fault(self, fault: dict) -> bytes | None:
        kind = fault["kind"]
        if kind == "status":
            extra = {}
            if "retry_after" in fault:
                extra["Retry-After"] = str(fault["retry_after"])
            if "retry_after_ms" in fault:
                extra["retry-after-ms"] = str(fault["retry_after_ms"])
            msg = fault.get("message", f"scripted status {fault['status']}")
            return _response(int(fault["status"]), json.dumps({"error": {"message": msg}}).encode(), extra)
        if kind == "invalid_json":
            return _response(200, b'{"choices": [ this is not json')
        if kind == "empty_choices":
            return _response(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
        if kind == "hang":
            await asyncio.sleep(float(fault.get("seconds", 3600)))
            return _response(200, json.dumps(_chat_reply({})).encode())
        if kind == "drop":
            return None
        raise ValueError(f"unknown fault kind {kind!r}")

    def _control(self, cmd: dict) -> None:
        st = self.state
        if cmd.get("reset"):
            st.faults.clear()
            st.requests = st.max_in_flight = st.in_flight = 0
            st.epoch += 1
            st.arrivals.clear()
            st.bodies.clear()
            st.auth_headers.clear()
        if "delay" in cmd:
            st.delay = float(cmd["delay"])
        st.faults.extend(cmd.get("faults", []))


class DelayServerHandle:
    """Client-side handle: the base URL plus control over HTTP (works for thread or process)."""

    def __init__(self, root_url: str):
        self.root_url = root_url
        self.base_url = root_url + "/v1"

    def configure(self, *, delay: float | None = None, faults: list[dict] | None = None,
                  reset: bool = False) -> None:
        cmd: dict = {"reset": reset}
        if delay is not None:
            cmd["delay"] = delay
        if faults:
            cmd["faults"] = faults
        httpx.post(self.root_url + "/_control", json=cmd, timeout=5).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.root_url + "/_stats", timeout=5).json()


@contextlib.contextmanager
def serve_in_thread(server, host: str = "127.0.0.1", name: str = "delay-server") -> Iterator[int]:
    """Run `server` (anything with ``serve(host, port)``) on its own event loop in a daemon thread;
    yields the port it listens on, and stops it (open connections cancelled) on exit."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        srv = loop.run_until_complete(server.serve(host, 0))
        box["port"] = srv.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()
        srv.close()
        pending = asyncio.all_tasks(loop)  # connections still open (e.g. a scripted hang)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError(f"{name} did not start")
    try:
        yield box["port"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def start_in_thread(delay: float = 0.0, host: str = "127.0.0.1") -> Iterator[DelayServerHandle]:
    """Run a DelayServer on its own event loop in a daemon thread; yields a handle."""
    with serve_in_thread(DelayServer(delay), host) as port:
        yield DelayServerHandle(f"http://{host}:{port}")


@contextlib.contextmanager
def start_in_process(delay: float = 0.0, host: str = "127.0.0.1") -> Iterator[DelayServerHandle]:
    """Run the server in a child process (keeps it off the client's GIL); yields a handle."""
    proc = subprocess.Popen([sys.executable, __file__, "--host", host, "--port", "0", "--delay", str(delay)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the child prints its port once it listens
        if not line.strip().isdigit():
            raise RuntimeError(f"delay server failed to start: {line!r}")
        yield DelayServerHandle(f"http://{host}:{int(line)}")
    finally:
        stop_child(proc)


def stop_child(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate a server child, and kill it when it does not stop within `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_main(server_class, description: str) -> None:
    """The child process's entry point: serve `server_class(delay)` and print the port it got."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args()

    async def run() -> None:
        srv = await server_class(args.delay).serve(args.host, args.port)
        print(srv.sockets[0].getsockname()[1], flush=True)
        async with srv:
            await srv.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def main() -> None:
    serve_main(DelayServer, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()

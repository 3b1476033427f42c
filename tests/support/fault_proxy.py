"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server, for reliability tests.

    with start_proxy("http://127.0.0.1:PORT") as proxy:      # the upstream server's root URL
    # or several servers, picked by the request's "model": start_proxy({"smollm2": URL1, "qwen": URL2})
        proxy.set_rules([Rule("status", every=3, status=503)])  # every 3rd chat request gets a 503
        ... point the client at proxy.base_url ...
        proxy.snapshot()["injected"]                        # {"status_503": n, ...}

Faults follow a fixed schedule, so a test is reproducible: requests to each model path are numbered
1, 2, 3, ... in arrival order (judge requests, recognised by the judge's system prompt, also get
their own numbering), and the first rule that matches a request's number decides its fate.
With one request in flight at a time the whole run is then the same from one test run to the next.

Fault kinds:

- ``status``: answer ``status`` (429, 500, 503, ...) with a JSON error, and ``Retry-After`` if given;
  the request never reaches the upstream server.
- ``timeout``: hold the request without answering until the client gives up and disconnects.
- ``reset``: close the connection with a TCP reset instead of answering.
- ``truncate``, ``invalid_json``, ``empty_choices``: forward to the upstream server, then hand back
  its answer cut in half / with its JSON broken / with ``choices`` emptied (a 200 either way).
- ``no_rating``: forward, then replace the answer's text with one that holds no rating (meant for
  judge requests: ``judge_only=True``).

``isolate=True`` makes the upstream answer each request as if it were the first: llama-cpp-python's
server reuses the KV cache of the previous request's longest common prefix, and re-evaluating a
different suffix changes the numbers enough to flip a sampled token (measured: one of six seeded
samples differed after faults changed the order of requests). Before each forwarded request the
proxy sends a one-token completion that shares no prefix with a chat prompt, so every request is
evaluated from scratch and its answer depends only on the request.

Every upstream answer passed back untouched is counted in ``delivered``: that is what a client
could pay for. An answer that came back after the client had already disconnected is counted in
``client_gone`` instead (work wasted by a client-side timeout that the proxy did not inject).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import httpx

MODEL_PATHS = ("/v1/chat/completions", "/v1/completions")
#: how a judge request starts (the LLM judge's system prompt); such requests are also numbered apart
JUDGE_MARK = "You are a careful, strict evaluator."
NO_RATING_TEXT = "I would rather not grade this answer."
_REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}
_ISOLATE_PROMPT = "0"  # shares no token with a chat-template prompt (those start with a special token)
FAULT_KINDS = ("status", "timeout", "reset", "truncate", "invalid_json", "empty_choices", "no_rating")


@dataclass(frozen=True)
class Rule:
    """Inject ``kind`` into the matching requests to ``path``.

    A request matches when its number n (among requests to ``path``, or among judge requests to it
    when ``judge_only``) is listed in ``at``, or when ``every`` is set, n >= ``start`` and
    n % every == phase % every. ``every=1`` with a ``start`` makes a fault that persists.
    """

    kind: str
    every: int | None = None
    phase: int = 0
    at: tuple[int, ...] = ()
    start: int = 1
    path: str = "/v1/chat/completions"
    judge_only: bool = False
    status: int = 503
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def matches(self, n: int) -> bool:
        if n in self.at:
            return True
        return self.every is not None and n >= self.start and n % self.every == self.phase % self.every

    @property
    def label(self) -> str:
        """The name a fault is counted under: the kind, with the status for ``status`` faults."""
        return f"status_{self.status}" if self.kind == "status" else self.kind


@dataclass
class _State:
    rules: list[Rule] = field(default_factory=list)
    received: Counter = field(default_factory=Counter)  # path -> requests
    judge_received: Counter = field(default_factory=Counter)  # path -> judge requests
    injected: Counter = field(default_factory=Counter)  # Rule.label -> times
    delivered: Counter = field(default_factory=Counter)  # path -> upstream answers passed back intact
    client_gone: int = 0
    log: list[tuple[str, int, bool, str]] = field(default_factory=list)  # (path, n, judge, outcome)


def _http(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _is_judge(body: bytes) -> bool:
    try:
        messages = json.loads(body).get("messages") or []
    except (ValueError, AttributeError):
        return False
    return bool(messages) and str(messages[0].get("content", "")).startswith(JUDGE_MARK)


def _corrupt(kind: str, body: bytes) -> bytes:
    """The upstream answer, damaged as ``kind`` says."""
    if kind == "truncate":
        return body[: len(body) // 2]
    if kind == "invalid_json":
        return body.replace(b":", b";", 1)
    data = json.loads(body)
    if kind == "empty_choices":
        data["choices"] = []
    elif kind == "no_rating":
        for choice in data.get("choices") or []:
            if isinstance(choice.get("message"), dict):
                choice["message"]["content"] = NO_RATING_TEXT
            if "text" in choice:
                choice["text"] = NO_RATING_TEXT
    return json.dumps(data).encode()


class FaultProxy:
    def __init__(self, upstream: str | dict[str, str], isolate: bool = False):
        # model name -> server root; a single URL serves every model
        routes = upstream if isinstance(upstream, dict) else {"": upstream}
        self.routes = {model: root.rstrip("/") for model, root in routes.items()}
        self.isolate = isolate
        self._upstream_locks: dict[str, asyncio.Lock] = {}  # flush + request, one pair at a time
        self.state = _State()
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

    # -- control (from any thread) ---------------------------------------------------------------
    def set_rules(self, rules: Sequence[Rule]) -> None:
        with self._lock:
            self.state.rules = list(rules)

    def heal(self) -> None:
        self.set_rules([])

    def reset(self) -> None:
        """Forget counts and numbering (rules stay)."""
        with self._lock:
            rules = self.state.rules
            self.state = _State(rules=rules)

    def snapshot(self) -> dict:
        with self._lock:
            st = self.state
            return {
                "received": dict(st.received),
                "judge_received": dict(st.judge_received),
                "injected": dict(st.injected),
                "delivered": dict(st.delivered),
                "delivered_total": sum(st.delivered.values()),
                "client_gone": st.client_gone,
                "log": list(st.log),
            }

    # -- serving ---------------------------------------------------------------------------------
    async def serve(self, host: str, port: int) -> asyncio.Server:
        self._client = httpx.AsyncClient(timeout=None)
        return await asyncio.start_server(self._connection, host, port)

    def _root(self, body: bytes) -> str:
        if len(self.routes) == 1:
            return next(iter(self.routes.values()))
        try:
            model = json.loads(body).get("model", "")
        except (ValueError, AttributeError):
            model = ""
        return self.routes.get(model) or next(iter(self.routes.values()))

    def _decide(self, path: str, body: bytes) -> tuple[Rule | None, int, bool]:
        judge = _is_judge(body)
        with self._lock:
            st = self.state
            st.received[path] += 1
            n = st.received[path]
            if judge:
                st.judge_received[path] += 1
            nj = st.judge_received[path]
            for rule in st.rules:
                if rule.path != path or (rule.judge_only and not judge):
                    continue
                if rule.matches(nj if rule.judge_only else n):
                    st.injected[rule.label] += 1
                    st.log.append((path, n, judge, rule.label))
                    return rule, n, judge
            st.log.append((path, n, judge, "ok"))
            return None, n, judge

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None:
                method, path, headers, body = request
                if method == "POST" and path in MODEL_PATHS:
                    keep_open = await self._model_request(path, headers, body, reader, writer)
                else:
                    keep_open = await self._forward_plain(method, path, headers, body, writer)
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _model_request(self, path, headers, body, reader, writer) -> bool:
        rule, _, _ = self._decide(path, body)
        kind = rule.kind if rule else None
        if kind == "status":
            extra = {} if rule.retry_after is None else {"Retry-After": f"{rule.retry_after:g}"}
            error = json.dumps({"error": {"message": f"injected {rule.status}"}}).encode()
            writer.write(_http(rule.status, error, extra))
            await writer.drain()
            return True
        if kind == "timeout":
            # hold until the client gives up (EOF) or an hour passes; never answer
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(), 3600)
            return False
        if kind == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        status, answer = await self._upstream(path, headers, body)
        if reader.at_eof() or writer.is_closing():
            with self._lock:
                self.state.client_gone += 1
            return False
        if kind is not None and status == 200:
            answer = _corrupt(kind, answer)
        elif status == 200:
            with self._lock:
                self.state.delivered[path] += 1
        writer.write(_http(status, answer))
        await writer.drain()
        return True

    async def _upstream(self, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
        forward = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
        root = self._root(body)
        if not self.isolate:
            r = await self._client.post(root + path, content=body, headers=forward)
            return r.status_code, r.content
        lock = self._upstream_locks.setdefault(root, asyncio.Lock())
        async with lock:
            flush = {"prompt": _ISOLATE_PROMPT, "max_tokens": 1, "temperature": 0.0}
            await self._client.post(root + "/v1/completions", json=flush, headers=forward)
            r = await self._client.post(root + path, content=body, headers=forward)
        return r.status_code, r.content

    async def _forward_plain(self, method, path, headers, body, writer) -> bool:
        forward = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
        root = next(iter(self.routes.values()))  # GET /v1/models and the like: the first server
        r = await self._client.request(method, root + path, content=body or None, headers=forward)
        writer.write(_http(r.status_code, r.content))
        await writer.drain()
        return True


async def _read_request(reader: asyncio.StreamReader):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length") or 0))
    return method, target.split("?", 1)[0], headers, body


class ProxyHandle:
    def __init__(self, proxy: FaultProxy, root_url: str):
        self.proxy = proxy
        self.root_url = root_url
        self.base_url = root_url + "/v1"

    def __getattr__(self, name):  # set_rules, heal, reset, snapshot
        return getattr(self.proxy, name)


@contextlib.contextmanager
def start_proxy(upstream: str | dict[str, str], host: str = "127.0.0.1", *,
                isolate: bool = False) -> Iterator[ProxyHandle]:
    """Run a FaultProxy on its own event loop in a daemon thread; yields a handle."""
    proxy = FaultProxy(upstream, isolate=isolate)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(proxy.serve(host, 0))
        box["port"] = server.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(loop)  # connections still held open
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(proxy._client.aclose())
        loop.close()

    thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("fault proxy did not start")
    try:
        yield ProxyHandle(proxy, f"http://{host}:{box['port']}")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

"""A backend for any OpenAI-compatible endpoint: OpenAI, vLLM, SGLang, llama.cpp server, Ollama, ...

It talks through the official ``openai`` SDK (``AsyncOpenAI``) with the SDK's own retries switched
off: this module runs the retry loop itself so that every fault kind and every retry is counted, in
``self.stats`` (fault kind -> count, plus ``"retries"``, over all calls) and against the call that met
it (``picaco.llm.accounting.report_fault``), which the client layer adds to the run's accounting under
the calling role. At most ``max_in_flight`` HTTP requests are in flight at any time; a request
waiting to retry does not hold a slot.

Log-likelihood of a given response (``loglikelihood``) needs the server to score prompt tokens, which
the chat API cannot do. Two server features are supported, chosen by ``likelihood``:

- ``"completions_echo"``: legacy ``/completions`` with ``echo=True, logprobs=1`` (llama.cpp's Python
  server started with ``--logits_all True``; vLLM). The chat prompt is rendered client-side with
  ``prompt_template`` and the response tokens are picked out by their text offsets.
- ``"vllm_prompt_logprobs"``: vLLM's ``prompt_logprobs`` extension on ``/completions``.
- ``"auto"``: :meth:`probe` tries both once; until it has run (or when both fail) the capability is
  reported missing, with the reason in ``capabilities.notes``.

The API key is handed to the SDK and never stored elsewhere, logged, or put in ``identity()``,
``repr`` or an error message (server messages are redacted before they are quoted).
"""

from __future__ import annotations

import asyncio
import hashlib
import dataclasses
import email.utils
import importlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import openai

from picaco.errors import BackendError, ConfigError
from picaco.llm.accounting import report_fault
from picaco.llm.base import (
    Capabilities,
    CapabilityMissing,
    Completion,
    GenerateRequest,
    Likelihood,
    LikelihoodRequest,
    Message,
    TokenAlternatives,
)

LikelihoodMode = Literal["auto", "completions_echo", "vllm_prompt_logprobs", "none"]
_MODES = ("auto", "completions_echo", "vllm_prompt_logprobs", "none")

#: statuses worth retrying; every other 4xx is the caller's mistake and fails at once
_RETRYABLE_STATUS = {408: "request_timeout", 409: "conflict", 429: "rate_limited"}
#: faults that say the endpoint is unreachable or overloaded now, not that it lacks a feature
_TRANSIENT_KINDS = {"timeout", "connection", "rate_limited", "request_timeout", "conflict"}
_TRANSIENT_STATUS = {502, 503, 504}
_PLACEHOLDER_KEY = "EMPTY"  # local servers ignore the key, but the SDK insists on one


# ---------------------------------------------------------------------------------------------
# prompt templates (client-side rendering for the completions endpoint)
# ---------------------------------------------------------------------------------------------


def render_chatml(messages: Sequence[Message]) -> str:
    """ChatML (Qwen, SmolLM2, ...), ending with the open assistant turn. No default system prompt."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def jinja_template(source: str, **variables: Any) -> Callable[[Sequence[Message]], str]:
    """A renderer from a Hugging Face / GGUF chat template (``tokenizer.chat_template``).

    Rendered in Jinja's sandbox (templates are data from model files) with
    ``add_generation_prompt=True``; extra ``variables`` (e.g. ``bos_token``) are passed through.
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(source)

    def render(messages: Sequence[Message]) -> str:
        return template.render(
            messages=[m.as_dict() for m in messages], add_generation_prompt=True, **variables
        )

    return render


_TEMPLATES: dict[str, Callable[[Sequence[Message]], str]] = {"chatml": render_chatml}


def _resolve_template(template: str | Callable[[Sequence[Message]], str]) -> Callable[[Sequence[Message]], str]:
    if callable(template):
        return template
    if template in _TEMPLATES:
        return _TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return jinja_template(template)
    raise ConfigError(
        f"unknown prompt template {template!r}: use one of {sorted(_TEMPLATES)} or a Jinja chat template"
    )


# ---------------------------------------------------------------------------------------------
# fault classification
# ---------------------------------------------------------------------------------------------


class _Malformed(Exception):
    """The server answered 200 with something unusable (invalid JSON, no choices, missing fields)."""


class _Unsupported(Exception):
    """The server answered well-formed but without a feature we asked for; retrying cannot help."""


class _Unreachable(Exception):
    """The likelihood probe could not get an answer (transport faults past its retries)."""


@dataclass(frozen=True)
class _Fault:
    kind: str
    retryable: bool
    retry_after: float | None = None  # seconds the server asked us to wait
    status: int | None = None
    detail: str = ""


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# response parsing (pure functions over the JSON, so they are unit-tested on recorded shapes)
# ---------------------------------------------------------------------------------------------


def _first_choice(data: Any) -> dict:
    if not isinstance(data, dict):
        raise _Malformed("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed("response has no choices")
    return choices[0]


def _usage(data: dict) -> tuple[int, int]:
    usage = data.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def parse_chat_completion(data: Any, top_logprobs: int = 0) -> Completion:
    choice = _first_choice(data)
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Malformed("choice has no message")
    prompt_tokens, completion_tokens = _usage(data)
    alternatives = None
    if top_logprobs > 0:
        content = (choice.get("logprobs") or {}).get("content")
        if not isinstance(content, list):
            raise _Unsupported("the server returned no log-probabilities although they were requested")
        alternatives = tuple(
            TokenAlternatives(
                token=str(pos["token"]),
                logprob=float(pos["logprob"]),
                top={str(t["token"]): float(t["logprob"]) for t in pos.get("top_logprobs") or ()},
            )
            for pos in content
        )
    return Completion(
        text=message.get("content") or "",  # None for refusals/tool calls: no text
        finish_reason=choice.get("finish_reason") or "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        logprobs=alternatives,
    )


def _response_span(offsets: Sequence[int], tokens: Sequence[str], n_echo: int, response: str) -> range:
    """Indices of the echoed tokens that cover the response, the last ``len(response)`` characters.

    Offsets are measured from the end because servers disagree on the prompt's coordinates (llama.cpp
    gives special tokens zero width, OpenAI counts their text), but they agree inside plain text.
    A token straddling the prompt/response boundary is included.
    """
    if n_echo == 0:
        raise _Malformed("the server echoed no prompt tokens")
    if n_echo < len(offsets):
        end = offsets[n_echo]  # where the first generated token starts
    else:
        end = offsets[n_echo - 1] + len(tokens[n_echo - 1])
    start = end - len(response)
    first = n_echo
    for i in range(n_echo - 1, -1, -1):
        first = i
        if offsets[i] <= start:
            break
    return range(first, n_echo)


def parse_echo_logprobs(data: Any, response: str) -> Likelihood:
    """Response-token log-probabilities from an echoed ``/completions`` answer (``echo=True``)."""
    choice = _first_choice(data)
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
        raise _Unsupported("the server did not echo prompt log-probabilities")
    tokens, logprobs, offsets = lp.get("tokens") or [], lp["token_logprobs"], lp.get("text_offset") or []
    if not (len(tokens) == len(logprobs) == len(offsets)):
        raise _Malformed("echoed tokens, log-probabilities and offsets differ in length")
    prompt_tokens, completion_tokens = _usage(data)
    # generated tokens (max_tokens=1 asks for at most one) come after the echo
    n_echo = len(tokens) - min(completion_tokens, len(tokens))
    span = _response_span(offsets, tokens, n_echo, response)
    values = [logprobs[i] for i in span]
    if any(v is None for v in values):
        raise _Unsupported("the server gave no log-probability for some response tokens")
    return Likelihood(
        token_logprobs=tuple(float(v) for v in values),
        tokens=tuple(str(tokens[i]) for i in span),
        evaluated_tokens=prompt_tokens,  # the echoed prompt holds prompt and response
    )


def parse_vllm_prompt_logprobs(data: Any, response: str) -> Likelihood:
    """Response-token log-probabilities from vLLM's ``prompt_logprobs`` (requested with k = 0).

    Shape: ``choices[0].prompt_logprobs`` is a list with one entry per prompt token, ``null`` for the
    first, else ``{"<token id>": {"logprob": float, "rank": int, "decoded_token": str}, ...}``; with
    k = 0 the dict holds only the prompt token itself (``prompt_token_ids`` disambiguates otherwise).
    The response is the last ``len(response)`` characters of the prompt, found from the end.
    """
    choice = _first_choice(data)
    entries = choice.get("prompt_logprobs")
    if entries is None:
        entries = data.get("prompt_logprobs")  # chat responses carry it at the top level
    if not isinstance(entries, list) or not entries:
        raise _Unsupported("the server returned no prompt_logprobs")
    token_ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    picked: list[tuple[str, float | None]] = []
    for i, entry in enumerate(entries):
        if entry is None:
            picked.append(("", None))
            continue
        if not isinstance(entry, dict) or not entry:
            raise _Malformed(f"prompt_logprobs[{i}] is not a token map")
        if len(entry) == 1:
            info = next(iter(entry.values()))
        elif token_ids is not None and str(token_ids[i]) in entry:
            info = entry[str(token_ids[i])]
        else:
            raise _Malformed("prompt_logprobs has alternatives but no prompt_token_ids to pick the prompt token")
        picked.append((str(info.get("decoded_token") or ""), info.get("logprob")))
    covered, first = 0, len(picked)
    while first > 0 and covered < len(response):
        first -= 1
        covered += len(picked[first][0])
    span = range(first, len(picked))
    values = [picked[i][1] for i in span]
    if covered < len(response) or any(v is None for v in values):
        raise _Malformed("could not find the response tokens among the prompt log-probabilities")
    prompt_tokens, _ = _usage(data)
    return Likelihood(
        token_logprobs=tuple(float(v) for v in values),
        tokens=tuple(picked[i][0] for i in span),
        evaluated_tokens=prompt_tokens,
    )


def echo_alignment(data: Any) -> tuple[int, int]:
    """(hits if logprobs[i] scores token i, hits if it scores token i+1) on an echoed answer.

    llama-cpp-python reads each echoed token's log-probability from the wrong row (the prediction for
    the *next* token) unless the prompt starts with the model's BOS token. On a predictable text the
    top alternative at position i then names token i+1 instead of token i, which this counts.
    """
    lp = _first_choice(data).get("logprobs") or {}
    tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
    aligned = shifted = 0
    for i, top in enumerate(tops):
        if not top:
            continue
        best = max(top, key=top.get)
        aligned += best == tokens[i]
        shifted += i + 1 < len(tokens) and best == tokens[i + 1]
    return aligned, shifted


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------

# A probe text a small model predicts easily once the pattern has repeated.
_PROBE_MESSAGES = (Message("user", "Repeat after me: red green blue yellow red green blue yellow"),)
_PROBE_RESPONSE = "red green blue yellow red green blue yellow red green blue yellow"


@dataclass
class TransportStats:
    """Counters beyond ``stats`` (which holds only fault kinds and retries, for the accounting)."""

    attempts: int = 0  # HTTP requests sent, retries included
    calls: int = 0  # logical calls (generate / one likelihood request / probe step)
    failed_calls: int = 0  # calls that ended in BackendError
    retry_wait_s: float = 0.0
    in_flight: int = 0
    peak_in_flight: int = 0


class OpenAIBackend:
    kind = "openai"
    #: faults are also reported per call (``picaco.llm.accounting.report_fault``), so a client can
    #: attribute them to its role even when several roles share this backend
    reports_call_faults = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_in_flight: int = 16,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 120.0,
        likelihood: LikelihoodMode = "auto",
        prompt_template: str | Callable[[Sequence[Message]], str] = "chatml",
        top_logprobs: bool = True,
        seeded: bool = False,
        default_headers: dict[str, str] | None = None,
    ):
        if likelihood not in _MODES:
            raise ConfigError(f"likelihood must be one of {_MODES}, not {likelihood!r}")
        if max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.likelihood_mode: LikelihoodMode = likelihood
        self._render = _resolve_template(prompt_template)
        # The template changes likelihood scores, so it belongs in the cache identity.
        self._template_id = (
            prompt_template
            if isinstance(prompt_template, str) and len(prompt_template) < 40
            else hashlib.sha256(repr(prompt_template).encode()).hexdigest()[:12]
        )
        self._sem = asyncio.Semaphore(max_in_flight)
        self._probed = False
        self._probe_unreachable: str | None = None  # why the last probe got no answer, if it did not
        self._probe_lock = asyncio.Lock()
        #: fault kind -> count, plus "retries", over all calls; each call's own faults also go to
        #: ``report_fault`` so the client can count them against the role that made the call
        self.stats: Counter[str] = Counter()
        self.transport = TransportStats()

        # The pool matches the in-flight cap. Limits and Response come from whichever HTTP library the
        # installed SDK is built on (httpx for openai 1.x/2.x, httpx2 for 3.x).
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=max_in_flight, max_keepalive_connections=max_in_flight
        )
        http = importlib.import_module(type(openai.DEFAULT_CONNECTION_LIMITS).__module__.split(".")[0])
        self._response_cls = http.Response
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or _PLACEHOLDER_KEY,
            timeout=timeout,
            max_retries=0,
            default_headers=default_headers,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout),
        )

        if likelihood == "auto":
            cont, notes = False, ("continuation log-probabilities not probed yet (call probe())",)
        elif likelihood == "none":
            cont, notes = False, ("continuation log-probabilities disabled by configuration (likelihood: none)",)
        else:
            cont, notes = True, ()
        self.capabilities = Capabilities(
            generate=True,
            top_logprobs=top_logprobs,
            continuation_logprobs=cont,
            seeded=seeded,
            notes=notes,
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, likelihood={self.likelihood_mode!r})"

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "prompt_template": self._template_id,
        }

    # -- the retry loop ------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        key = self._client.api_key
        if isinstance(key, str) and len(key) >= 4 and key != _PLACEHOLDER_KEY:
            text = text.replace(key, "***")
        text = re.sub(r"(sk-|Bearer\s+)[\w*.\-]{3,}", r"\1***", text)  # masked keys some servers echo
        return _one_line(text)

    def _classify(self, exc: Exception) -> _Fault | None:
        if isinstance(exc, openai.APITimeoutError):
            return _Fault("timeout", True)
        if isinstance(exc, openai.APIConnectionError):
            return _Fault("connection", True, detail=type(exc.__cause__ or exc).__name__)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            retry_after = parse_retry_after(getattr(exc.response, "headers", None))
            detail = self._redact(str(getattr(exc, "message", "") or ""))
            if status in _RETRYABLE_STATUS:
                return _Fault(_RETRYABLE_STATUS[status], True, retry_after, status, detail)
            if status >= 500:
                return _Fault("server_error", True, retry_after, status, detail)
            return _Fault("client_error", False, None, status, detail)
        if isinstance(exc, (_Malformed, openai.APIResponseValidationError)):
            return _Fault("malformed", True, detail=_one_line(str(exc)))
        return None

    def _wait_for(self, attempt: int, fault: _Fault) -> float:
        if fault.retry_after is not None:
            # honour the server, a little late rather than early, and never absurdly long
            return min(fault.retry_after, self.retry_after_cap) * random.uniform(1.0, 1.1)
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))  # full jitter

    def _error(self, what: str, endpoint: str, fault: _Fault, attempts: int) -> BackendError:
        status = f"HTTP {fault.status}" if fault.status else fault.kind
        detail = f": {fault.detail}" if fault.detail else ""
        if fault.status == 401:
            detail = ": the server rejected the API key (check the key's environment variable or key file)"
        tries = "" if not fault.retryable else f" after {attempts} attempts"
        err = BackendError(f"{what} failed{tries}: {status} from {endpoint} (model {self.model}){detail}")
        err.fault = fault  # type: ignore[attr-defined]  # lets the probe tell "down" from "cannot"
        return err

    async def _call(
        self,
        what: str,
        path: str,
        body: dict[str, Any],
        parse: Callable[[Any], Any],
        *,
        max_retries: int | None = None,
    ) -> Any:
        """POST ``body`` to ``path`` with retries; ``parse`` gets the answer's JSON."""
        endpoint = f"{self.base_url}{path}"
        budget = self.max_retries if max_retries is None else max_retries
        self.transport.calls += 1
        for attempt in range(budget + 1):
            try:
                async with self._sem:
                    t = self.transport
                    t.attempts += 1
                    t.in_flight += 1
                    t.peak_in_flight = max(t.peak_in_flight, t.in_flight)
                    try:
                        # The SDK's generic post (auth, base URL, errors) with a plain JSON body: the
                        # typed create() spends milliseconds per call transforming parameters, which
                        # caps throughput at high concurrency, and we parse the JSON ourselves anyway.
                        raw = await self._client.post(path, cast_to=self._response_cls, body=body)
                    finally:
                        t.in_flight -= 1
                try:
                    data = json.loads(raw.text)
                except ValueError as exc:
                    raise _Malformed("response is not valid JSON") from exc
                return parse(data)
            except _Unsupported as exc:
                self.stats["unsupported"] += 1
                report_fault("unsupported")
                self.transport.failed_calls += 1
                raise BackendError(f"{what} failed: {exc} ({endpoint}, model {self.model})") from None
            except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raise
                fault = self._classify(exc)
                if fault is None:
                    raise
            self.stats[fault.kind] += 1
            report_fault(fault.kind)
            if not fault.retryable or attempt == budget:
                self.transport.failed_calls += 1
                raise self._error(what, endpoint, fault, attempt + 1) from None
            wait = self._wait_for(attempt, fault)
            self.stats["retries"] += 1
            report_fault("retries")
            self.transport.retry_wait_s += wait
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Completion:
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [m.as_dict() for m in request.messages],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
        }
        if request.stop:
            params["stop"] = list(request.stop)
        if request.seed is not None:
            params["seed"] = request.seed
        if request.top_logprobs > 0:
            params["logprobs"] = True
            params["top_logprobs"] = request.top_logprobs
        return await self._call(
            "chat completion",
            "/chat/completions",
            params,
            lambda data: parse_chat_completion(data, request.top_logprobs),
        )

    # -- continuation log-likelihood -----------------------------------------------------------

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The chat prompt as text, ending where the assistant's answer begins."""
        return self._render(messages)

    async def _score(self, mode: str, messages: Sequence[Message], response: str, **kw: Any) -> Any:
        # max_tokens=0 means "until n_ctx" to llama-cpp-python, so ask for one token and ignore it
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.render_prompt(messages) + response,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        if mode == "completions_echo":
            body |= {"echo": True, "logprobs": kw.pop("logprobs", 1)}
            parse = kw.pop("parse", lambda d: parse_echo_logprobs(d, response))
        else:
            body["prompt_logprobs"] = 0
            parse = kw.pop("parse", lambda d: parse_vllm_prompt_logprobs(d, response))
        return await self._call("log-likelihood", "/completions", body, parse, **kw)

    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        if self.likelihood_mode == "auto" and not self._probed:
            await self.probe()
        if not self.capabilities.continuation_logprobs:
            if self._probe_unreachable is not None:
                # the endpoint is failing, not lacking the feature: exit as a failing endpoint
                raise BackendError(self._probe_unreachable)
            raise CapabilityMissing(
                f"{self.base_url} ({self.model}) cannot score a given response: "
                + "; ".join(self.capabilities.notes)
            )
        mode = self.likelihood_mode

        async def score(r: LikelihoodRequest) -> Likelihood:
            if not r.response:  # nothing to score; the offsets logic needs at least one character
                return Likelihood(token_logprobs=())
            return await self._score(mode, r.messages, r.response)

        return list(await asyncio.gather(*(score(r) for r in requests)))

    # -- capability probe ----------------------------------------------------------------------

    async def probe(self) -> Capabilities:
        """Find out once whether (and how) the server scores prompt tokens; updates ``capabilities``."""
        async with self._probe_lock:
            if self._probed or self.likelihood_mode == "none":
                self._probed = True
                return self.capabilities
            candidates = (
                ["completions_echo", "vllm_prompt_logprobs"]
                if self.likelihood_mode == "auto"
                else [self.likelihood_mode]
            )
            notes: list[str] = []
            self._probe_unreachable = None
            for mode in candidates:
                try:
                    problem = await self._probe_mode(mode)
                except _Unreachable as exc:
                    # A transient failure says nothing about the feature: decide nothing (a mode
                    # the user named stays declared), and probe again on the next likelihood call.
                    if self.likelihood_mode == "auto":
                        self._probe_unreachable = str(exc)
                        self._set_continuation(False, (f"{mode}: {exc} (will probe again)",))
                    return self.capabilities
                if problem is None:
                    self.likelihood_mode = mode  # type: ignore[assignment]
                    self._set_continuation(True, ())
                    break
                notes.append(f"{mode}: {problem}")
            else:
                self._set_continuation(False, tuple(notes))
            self._probed = True
            return self.capabilities

    def _set_continuation(self, available: bool, notes: tuple[str, ...]) -> None:
        self.capabilities = dataclasses.replace(self.capabilities, continuation_logprobs=available, notes=notes)

    async def _probe_mode(self, mode: str) -> str | None:
        """None if ``mode`` works on this server, else why not (one line)."""
        try:
            if mode == "completions_echo":
                # parsed inside the retry loop, so a garbled answer is retried, not taken as "cannot"
                scored, data = await self._score(
                    mode, _PROBE_MESSAGES, _PROBE_RESPONSE, logprobs=5,
                    parse=lambda d: (parse_echo_logprobs(d, _PROBE_RESPONSE), d), max_retries=2,
                )
                aligned, shifted = echo_alignment(data)
                if shifted > aligned:
                    return (
                        "the server's echoed log-probabilities are shifted by one token (llama-cpp-python "
                        "does this when the prompt does not start with the model's BOS token; a prompt "
                        "template that starts with the BOS text avoids it)"
                    )
                if aligned < 3:
                    return "could not confirm that echoed log-probabilities belong to their tokens"
            else:
                scored = await self._score(mode, _PROBE_MESSAGES, _PROBE_RESPONSE, max_retries=2)
        except BackendError as exc:
            fault = getattr(exc, "fault", None)
            if fault is not None and (fault.kind in _TRANSIENT_KINDS or fault.status in _TRANSIENT_STATUS):
                raise _Unreachable(_one_line(str(exc))) from None
            return _one_line(str(exc))
        except (_Malformed, _Unsupported) as exc:
            return _one_line(str(exc))
        if scored.n_tokens == 0 or not all(v <= 0.0 for v in scored.token_logprobs):
            return "the server's prompt log-probabilities are not valid log-probabilities"
        return None

    async def aclose(self) -> None:
        await self._client.close()

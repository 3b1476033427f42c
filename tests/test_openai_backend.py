"""The OpenAI-compatible backend: response parsing, the retry loop, and a real llama.cpp server.

Three layers:
- pure parsing functions on recorded-shape JSON (fast);
- the transport against ``support.delay_server``, a real local HTTP server with scripted faults
  (fast, no model);
- generation and log-likelihood against the real SmolLM2-135M behind a real ``llama_cpp.server``
  (``@pytest.mark.server``).
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.util
import json
import math
import time

import pytest

from picaco.errors import BackendError
from picaco.llm.base import CapabilityMissing, GenerateRequest, LikelihoodRequest, Message, chat
from picaco.llm.openai_backend import (
    OpenAIBackend,
    jinja_template,
    parse_echo_logprobs,
    parse_retry_after,
    parse_vllm_prompt_logprobs,
    render_chatml,
)
from support.delay_server import REPLY_TEXT, start_in_thread

SECRET = "sk-test-Zq81kPfGx3Yw0RtL"  # a fake key; the tests check it never leaks


# ---------------------------------------------------------------------------------------------
# pure parsing
# ---------------------------------------------------------------------------------------------


def test_retry_after_header_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # ms wins
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0, abs=1.0)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_jinja_chatml_template_renders_like_builtin():
    source = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    msgs = chat("Be kind.", "Hello?")
    assert jinja_template(source)(msgs) == render_chatml(msgs)
    assert render_chatml(msgs) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    )


def _echo_answer(pieces: list[tuple[str, float | None]], width, generated: list[str]) -> dict:
    """An echoed /completions answer; ``width(token)`` is how wide the server counts each token."""
    tokens, logprobs, offsets, pos = [], [], [], 0
    for tok, lp in pieces + [(g, -0.5) for g in generated]:
        tokens.append(tok)
        logprobs.append(lp)
        offsets.append(pos)
        pos += width(tok)
    return {
        "choices": [{"text": "", "logprobs": {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets}}],
        "usage": {"prompt_tokens": len(pieces), "completion_tokens": len(generated)},
    }


PROMPT_PIECES = [("<|im_start|>", None), ("user", -5.0), ("\n", -0.1), ("Hi", -4.0), ("<|im_end|>", -1.0),
                 ("\n", -0.1), ("<|im_start|>", -0.2), ("assistant", -0.01), ("\n", -0.02)]
RESPONSE_PIECES = [("Hello", -1.5), (" wor", -2.0), ("ld", -0.1), ("!", -0.7)]


@pytest.mark.parametrize(
    "width, generated",
    [
        (len, ["\n"]),  # OpenAI style: offsets count every character of the prompt string
        (lambda t: 0 if t.startswith("<|") else len(t), []),  # llama.cpp: special tokens are zero-width
        (lambda t: 0 if t.startswith("<|") else len(t), [" I"]),
    ],
)
def test_echo_parsing_picks_the_response_tokens(width, generated):
    data = _echo_answer(PROMPT_PIECES + RESPONSE_PIECES, width, generated)
    lk = parse_echo_logprobs(data, "Hello world!")
    assert lk.tokens == ("Hello", " wor", "ld", "!")
    assert lk.token_logprobs == (-1.5, -2.0, -0.1, -0.7)
    assert lk.evaluated_tokens == len(PROMPT_PIECES) + len(RESPONSE_PIECES)


# vLLM /v1/completions answer with prompt_logprobs=0 (shape of vllm CompletionResponseChoice: one map
# {token_id: {logprob, rank, decoded_token}} per prompt token, null for the first). Qwen2.5 token ids.
VLLM_ANSWER = {
    "id": "cmpl-5b0e7c6a1f", "object": "text_completion", "created": 1735000000,
    "model": "Qwen/Qwen2.5-0.5B-Instruct",
    "choices": [{
        "index": 0, "text": "<|im_end|>", "logprobs": None, "finish_reason": "length", "stop_reason": None,
        "prompt_logprobs": [
            None,
            {"872": {"logprob": -9.81, "rank": 118, "decoded_token": "user"}},
            {"198": {"logprob": -0.013, "rank": 1, "decoded_token": "\n"}},
            {"13048": {"logprob": -6.24, "rank": 31, "decoded_token": "Hi"}},
            {"151645": {"logprob": -1.19, "rank": 1, "decoded_token": "<|im_end|>"}},
            {"198": {"logprob": -0.0011, "rank": 1, "decoded_token": "\n"}},
            {"151644": {"logprob": -0.0021, "rank": 1, "decoded_token": "<|im_start|>"}},
            {"77091": {"logprob": -0.0005, "rank": 1, "decoded_token": "assistant"}},
            {"198": {"logprob": -0.0001, "rank": 1, "decoded_token": "\n"}},
            {"9707": {"logprob": -0.92, "rank": 1, "decoded_token": "Hello"}},
            {"1879": {"logprob": -2.31, "rank": 3, "decoded_token": " world"}},
        ],
    }],
    "usage": {"prompt_tokens": 11, "total_tokens": 12, "completion_tokens": 1},
}


def test_vllm_prompt_logprobs_parsing():
    lk = parse_vllm_prompt_logprobs(VLLM_ANSWER, "Hello world")
    assert lk.tokens == ("Hello", " world")
    assert lk.token_logprobs == (-0.92, -2.31)
    assert lk.evaluated_tokens == 11  # usage.prompt_tokens: prompt and response


def test_vllm_prompt_logprobs_with_alternatives_uses_prompt_token_ids():
    answer = {
        "choices": [{
            "prompt_logprobs": [
                None,
                {"9707": {"logprob": -0.4, "rank": 1, "decoded_token": "Hello"}},
                {"1879": {"logprob": -2.3, "rank": 3, "decoded_token": " world"},
                 "0": {"logprob": -0.2, "rank": 1, "decoded_token": "!"}},
            ],
            "prompt_token_ids": [151644, 9707, 1879],
        }],
        "usage": {"prompt_tokens": 3},
    }
    assert parse_vllm_prompt_logprobs(answer, " world").token_logprobs == (-2.3,)
    del answer["choices"][0]["prompt_token_ids"]
    with pytest.raises(Exception, match="prompt_token_ids"):
        parse_vllm_prompt_logprobs(answer, " world")


# ---------------------------------------------------------------------------------------------
# transport against the scripted delay server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delay_server():
    with start_in_thread() as handle:
        yield handle


@pytest.fixture
def server(delay_server):
    delay_server.configure(reset=True, delay=0.0)
    return delay_server


def _backend(server, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_cap", 0.2)
    return OpenAIBackend(server.base_url, "delay-model", SECRET, **kw)


REQ = GenerateRequest(chat("You are terse.", "ping"), temperature=0.0, max_tokens=4)


async def test_generate_sends_a_chat_request(server):
    backend = _backend(server)
    out = await backend.generate(GenerateRequest(chat("Be brief.", "ping"), temperature=0.3, max_tokens=7,
                                                 top_p=0.9, seed=11, stop=("\n",)))
    await backend.aclose()
    assert out.text == REPLY_TEXT and out.prompt_tokens == 7 and out.completion_tokens == 1
    body = server.stats()["bodies"][-1]
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ping"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"], body["stop"]) == (
        0.3, 0.9, 7, 11, ["\n"])
    assert "logprobs" not in body
    assert dict(backend.stats) == {}


async def test_retry_after_is_honoured(server):
    server.configure(faults=[{"kind": "status", "status": 429, "retry_after": 1}])
    backend = _backend(server)
    out = await backend.generate(REQ)
    await backend.aclose()
    arrivals = server.stats()["arrivals"]
    assert out.text == REPLY_TEXT and len(arrivals) == 2
    gap = arrivals[1] - arrivals[0]
    assert 1.0 <= gap < 2.0, gap  # far above the 0.05 s backoff base: the header decided the wait
    assert dict(backend.stats) == {"rate_limited": 1, "retries": 1}


async def test_retry_after_ms_is_honoured(server):
    server.configure(faults=[{"kind": "status", "status": 503, "retry_after_ms": 400}])
    backend = _backend(server, backoff_base=0.0)
    await backend.generate(REQ)
    await backend.aclose()
    arrivals = server.stats()["arrivals"]
    assert arrivals[1] - arrivals[0] >= 0.4
    assert dict(backend.stats) == {"server_error": 1, "retries": 1}


async def test_each_fault_kind_is_retried_and_counted(server):
    server.configure(faults=[
        {"kind": "status", "status": 500},
        {"kind": "invalid_json"},
        {"kind": "empty_choices"},
        {"kind": "status", "status": 408},
        {"kind": "status", "status": 409},
        {"kind": "drop"},
        {"kind": "hang", "seconds": 3},
    ])
    backend = _backend(server, timeout=0.5, max_retries=8)
    out = await backend.generate(REQ)
    await backend.aclose()
    assert out.text == REPLY_TEXT
    assert server.stats()["requests"] == 8
    assert dict(backend.stats) == {
        "server_error": 1, "malformed": 2, "request_timeout": 1, "conflict": 1,
        "connection": 1, "timeout": 1, "retries": 7,
    }


async def test_retry_budget_exhausted_names_what_failed(server):
    server.configure(faults=[{"kind": "status", "status": 503}] * 3)
    backend = _backend(server, max_retries=2)
    with pytest.raises(BackendError) as err:
        await backend.generate(REQ)
    await backend.aclose()
    msg = str(err.value)
    assert "after 3 attempts" in msg and "503" in msg and "/chat/completions" in msg and "\n" not in msg
    assert server.stats()["requests"] == 3
    assert backend.transport.failed_calls == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_fail_at_once_without_the_key(server, status):
    # some providers quote (part of) the key in their error text; it must not reach our message
    server.configure(faults=[{"kind": "status", "status": status, "retry_after": 5,
                              "message": f"Incorrect API key provided: {SECRET} (sk-test-Zq81***RtL)"}])
    backend = _backend(server)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as err:
        await backend.generate(REQ)
    elapsed = time.monotonic() - t0
    await backend.aclose()
    msg = str(err.value)
    assert server.stats()["requests"] == 1 and elapsed < 1.0
    assert f"HTTP {status}" in msg and server.base_url in msg and "\n" not in msg
    assert SECRET not in msg and "Zq81" not in msg and "RtL" not in msg
    assert dict(backend.stats) == {"client_error": 1}


async def test_key_is_sent_but_never_shown(server):
    backend = _backend(server)
    await backend.generate(REQ)
    await backend.aclose()
    assert SECRET not in repr(backend) and SECRET not in str(backend.identity())
    assert backend.identity() == {"kind": "openai", "base_url": server.base_url, "model": "delay-model", "prompt_template": "chatml"}


async def test_in_flight_cap_is_never_exceeded(server):
    server.configure(delay=0.1)
    backend = _backend(server, max_in_flight=5)
    outs = await asyncio.gather(*(backend.generate(REQ) for _ in range(40)))
    await backend.aclose()
    assert len(outs) == 40
    # exactly the cap: never above it, and the cap was actually used
    assert server.stats()["max_in_flight"] == 5
    assert backend.transport.peak_in_flight == 5


async def test_probe_reports_missing_likelihood_with_a_note(server):
    backend = _backend(server)
    assert not backend.capabilities.continuation_logprobs  # conservative before probing
    caps = await backend.probe()
    assert not caps.continuation_logprobs
    assert any("404" in note for note in caps.notes)
    with pytest.raises(CapabilityMissing):
        await backend.loglikelihood([LikelihoodRequest(chat(None, "q"), "a")])
    await backend.aclose()


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 behind a real llama.cpp server
# ---------------------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def llama(smollm2_path):
    from support.llama_server import llama_server

    with llama_server(smollm2_path, n_ctx=512, extra_args=["--verbose", "False"]) as srv:
        yield srv


def _real(llama, **kw) -> OpenAIBackend:
    # the mode is known for this server; the tests of probe() ask for "auto" themselves
    kw.setdefault("likelihood", "completions_echo")
    return OpenAIBackend(llama.base_url, llama.model, None, timeout=120, **kw)


@pytest.mark.server
async def test_real_chat_generation_with_system_prompt(llama):
    backend = _real(llama)
    with_system = await backend.generate(GenerateRequest(chat(SYSTEM, "What is the capital of France?"),
                                                         temperature=0.0, max_tokens=16, seed=1))
    again = await backend.generate(GenerateRequest(chat(SYSTEM, "What is the capital of France?"),
                                                   temperature=0.0, max_tokens=16, seed=1))
    other_system = await backend.generate(GenerateRequest(chat("Be brief.", "What is the capital of France?"),
                                                          temperature=0.0, max_tokens=16, seed=1))
    await backend.aclose()
    assert with_system.text.strip() and with_system.completion_tokens > 0
    assert with_system.text == again.text  # greedy decoding is reproducible
    # the system prompt reached the model: a longer system prompt costs more prompt tokens
    assert with_system.prompt_tokens > other_system.prompt_tokens > 10
    assert "Paris" in with_system.text


@pytest.mark.server
async def test_real_top_logprobs_present_and_not_flat(llama):
    backend = _real(llama)
    out = await backend.generate(GenerateRequest(chat(SYSTEM, "Name a color."), temperature=0.0,
                                                 max_tokens=6, top_logprobs=5))
    await backend.aclose()
    assert out.logprobs is not None and len(out.logprobs) == out.completion_tokens > 0
    for pos in out.logprobs:
        assert 1 <= len(pos.top) <= 5
        assert all(v <= 0.0 for v in pos.top.values())
        assert sum(math.exp(v) for v in pos.top.values()) <= 1.0 + 1e-3
        # greedy: the chosen token is the most likely one
        assert pos.logprob == pytest.approx(max(pos.top.values()), abs=1e-4)
    spreads = [max(p.top.values()) - min(p.top.values()) for p in out.logprobs if len(p.top) > 1]
    assert spreads and max(spreads) > 1.0  # a real distribution, not a uniform one


@pytest.mark.server
async def test_real_continuation_loglikelihood_via_completions_echo(llama):
    backend = _real(llama, likelihood="auto")
    assert not backend.capabilities.continuation_logprobs  # unknown until probed
    caps = await backend.probe()
    assert caps.continuation_logprobs and backend.likelihood_mode == "completions_echo", caps.notes

    messages = chat(SYSTEM, "What is the capital of France?")
    greedy = await backend.generate(GenerateRequest(messages, temperature=0.0, max_tokens=12, top_logprobs=1))
    fluent, garbled = await backend.loglikelihood([
        LikelihoodRequest(messages, greedy.text),
        LikelihoodRequest(messages, "France the of capital Paris is banana."),
    ])
    await backend.aclose()

    assert "".join(fluent.tokens) == greedy.text
    assert all(v <= 0.0 for v in fluent.token_logprobs + garbled.token_logprobs)
    assert fluent.mean > garbled.mean + 1.0
    # the echo endpoint scores the greedy answer as the chat endpoint generated it, token by token
    chat_tokens = tuple(a.token for a in greedy.logprobs)
    assert fluent.tokens == chat_tokens
    for scored, generated in zip(fluent.token_logprobs, greedy.logprobs):
        assert scored == pytest.approx(generated.logprob, abs=0.15)


@pytest.mark.server
async def test_real_shifted_echo_is_detected(llama):
    # llama-cpp-python scores echoed tokens one row off unless the prompt starts with BOS
    # (<|im_start|> for SmolLM2); a template without it must be refused, not silently mis-scored.
    def plain(messages: list[Message]) -> str:
        return "".join(f"{m.role.upper()}: {m.content}\n" for m in messages) + "ASSISTANT: "

    backend = _real(llama, prompt_template=plain, likelihood="auto")
    caps = await backend.probe()
    await backend.aclose()
    assert not caps.continuation_logprobs
    assert any("shifted" in note for note in caps.notes)


def _in_process_logprobs(gguf, prompt: str, response: str) -> list[float]:
    """log p(response token | everything before it), computed in-process by llama.cpp on the same file."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    ids = llm.tokenize((prompt + response).encode(), add_bos=False, special=True)
    assert ids[: len(prompt_ids)] == prompt_ids
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logsm = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return [float(logsm[j - 1, ids[j]]) for j in range(len(prompt_ids), len(ids))]


@pytest.mark.server
async def test_real_likelihood_agrees_with_in_process_llama(llama, smollm2_path):
    messages = chat("You are terse.", "Say hi")
    response = "Hello there, café ü!"  # the accents split across tokens: offsets must still line up
    backend = _real(llama)
    [scored] = await backend.loglikelihood([LikelihoodRequest(messages, response)])
    await backend.aclose()
    reference = _in_process_logprobs(smollm2_path, render_chatml(messages), response)
    assert scored.n_tokens == len(reference)
    assert scored.token_logprobs == pytest.approx(reference, abs=0.02)


@pytest.mark.server
async def test_real_gguf_jinja_template_matches_server_chat_formatting(llama, smollm2_path):
    # No system message: SmolLM2's own template inserts a default one. Rendering client-side with the
    # template stored in the GGUF must reproduce what the chat endpoint conditioned on.
    from llama_cpp import Llama

    source = Llama(str(smollm2_path), vocab_only=True, verbose=False).metadata["tokenizer.chat_template"]
    backend = _real(llama, prompt_template=jinja_template(source))
    messages = chat(None, "Name a fruit.")
    assert backend.render_prompt(messages).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    greedy = await backend.generate(GenerateRequest(messages, temperature=0.0, max_tokens=8, top_logprobs=1))
    [scored] = await backend.loglikelihood([LikelihoodRequest(messages, greedy.text)])
    await backend.aclose()
    assert scored.tokens == tuple(a.token for a in greedy.logprobs)
    assert scored.token_logprobs == pytest.approx([a.logprob for a in greedy.logprobs], abs=0.15)


@pytest.mark.server
async def test_real_likelihood_agrees_with_embedded_backend(llama, smollm2_path):
    if importlib.util.find_spec("picaco.llm.embedded") is None:
        pytest.skip("picaco/llm/embedded.py does not exist yet")
    from picaco.llm import embedded

    requests = [
        LikelihoodRequest(chat(SYSTEM, "What is 2 + 2?"), "2 + 2 equals 4."),
        LikelihoodRequest(chat("Be kind.", "Say hello."), "Hello! How can I help you today?"),
    ]
    remote = _real(llama)
    # flash attention changes the numbers by up to ~0.2 nats per token on this model; without it the
    # embedded backend computes what the server computes (measured: differences ~1e-7)
    local = embedded.EmbeddedBackend(smollm2_path, n_threads=2, n_ctx=512, flash_attn=False)
    try:
        theirs = await local.loglikelihood(requests)
        ours = await remote.loglikelihood(requests)
    finally:
        await remote.aclose()
        await local.aclose()
    for a, b in zip(ours, theirs):
        assert a.tokens == b.tokens
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=0.01)


def _tiny_run_config(llama, **extra):
    """One round on one query: the real server as target (its mode found by probing), a fake optimizer."""
    from picaco.config import load_config

    return load_config(None, {
        "preset": "tiny",
        "values": "helpfulness-4",
        "target": {"backend": "openai", "base_url": llama.base_url, "model": llama.model,
                   "likelihood": "auto", "timeout": 120},
        "optimizer": {"backend": "fake"},
        "optimize": {"rounds": 1, "n_queries": 1},
        "cache": False,
        **extra,
    })


@pytest.mark.server
@pytest.mark.slow
async def test_optimize_probes_an_openai_target_and_scores_by_likelihood(llama, tmp_path, minilm_dir):
    # `likelihood: auto` is only resolved by probing the server; the optimizer must probe before it
    # picks its scoring mode, or every openai target silently falls back to sampling mode.
    from picaco import api

    config = _tiny_run_config(llama)
    result = await api.optimize_async(config, run_dir=tmp_path / "run")
    assert result.mode == "likelihood"


@pytest.mark.server
@pytest.mark.slow
async def test_a_system_template_reaches_the_real_server_and_the_run_writes_what_to_deploy(
        llama, tmp_path, monkeypatch, minilm_dir):
    from picaco import api
    from picaco.data.queries import load_queries
    from picaco.llm.base import fill_template

    template = "You are the help desk of a public library.\n{instruction}\nAnswer briefly."
    sent = []
    real_generate, real_loglikelihood = OpenAIBackend.generate, OpenAIBackend.loglikelihood

    async def generate(self, request):
        sent.append(request.messages)
        return await real_generate(self, request)

    async def loglikelihood(self, requests):
        sent.extend(r.messages for r in requests)
        return await real_loglikelihood(self, requests)

    monkeypatch.setattr(OpenAIBackend, "generate", generate)
    monkeypatch.setattr(OpenAIBackend, "loglikelihood", loglikelihood)
    config = _tiny_run_config(llama, system_template=template)
    result = await api.optimize_async(config, run_dir=tmp_path / "run")
    query = load_queries("hh", "train")[0].text
    ours = [m for m in sent if m[-1].content == query]  # the run's own requests (not the probe's)
    assert len(ours) >= 2
    for messages in ours:
        assert messages[0].role == "system"
        assert messages[0].content.startswith("You are the help desk of a public library.")
        assert messages[0].content.endswith("Answer briefly.")
    assert any(m[0].content == fill_template(template, "") for m in ours)  # the bare model
    run = tmp_path / "run"
    assert (run / "system_prompt.txt").read_text() == fill_template(template, result.instruction) + "\n"
    texts = [json.loads(line)["text"] for line in (run / "responses.jsonl").read_text().splitlines()]
    assert texts and any(t.strip() for t in texts)  # SmolLM2's real answers were judged and kept

"""The embedded llama.cpp backend, on the real SmolLM2-135M model in-process."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from picaco.errors import ConfigError, ModelNotPulled
from picaco.llm.base import Backend, GenerateRequest, LikelihoodRequest, chat
from picaco.llm.embedded import EmbeddedBackend, _first_stop, _Runner, _TurnLock

PIRATE = "You are a pirate. Always talk like a pirate."
BUTLER = "You are a formal English butler. Answer politely and formally."
QUESTION = "What is the capital of France?"
RESPONSES = [
    "Arr, the capital be Paris, matey!",
    "The capital of France is Paris.",
    "Paris.",
    "I believe it is London, sir.",
    "The capital of France is Paris, a city known for the Eiffel Tower.",
]


@pytest.fixture(scope="module")
def backend(smollm2_path: Path):
    b = EmbeddedBackend(smollm2_path, n_ctx=1024, seed=0)
    yield b
    b.close()


def _same_numbers(a, b, tol: float = 1e-9) -> bool:
    return a.tokens == b.tokens and all(abs(x - y) <= tol for x, y in zip(a.token_logprobs, b.token_logprobs))


# -- construction (no model needed) ------------------------------------------------------------------


def test_unknown_model_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="neither a known model"):
        EmbeddedBackend(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="not a chat model"):
        EmbeddedBackend("minilm-l6", models_dir=tmp_path)
    with pytest.raises(ModelNotPulled):
        EmbeddedBackend("qwen2.5-coder-0.5b", models_dir=tmp_path)


def test_a_file_that_is_not_a_gguf_fails_on_first_use(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model" * 100)
    backend = EmbeddedBackend(bad)  # loading is lazy
    assert backend.identity()["file"] == "bad.gguf" and "gguf_sha256" not in backend.identity()
    with pytest.raises(ConfigError, match="could not load"):
        backend.generate_sync(GenerateRequest(chat(None, "hi"), max_tokens=1))


def test_a_runtime_with_amx_kernels_is_refused_before_it_can_crash(monkeypatch):
    from picaco.llm.embedded import ALLOW_AMX_ENV, check_runtime_build

    native = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | OPENMP = 1 | "
    monkeypatch.delenv(ALLOW_AMX_ENV, raising=False)
    with pytest.raises(ConfigError, match="compiled with AMX kernels.*PICACO_ALLOW_AMX=1") as e:
        check_runtime_build(native)
    assert "\n" not in str(e.value)
    check_runtime_build(native.replace("AMX_INT8 = 1", "AMX_INT8 = 0"))
    check_runtime_build("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | ")
    monkeypatch.setenv(ALLOW_AMX_ENV, "1")
    check_runtime_build(native)  # the user's choice to try it
    monkeypatch.delenv(ALLOW_AMX_ENV)
    check_runtime_build()  # the runtime `make install` built passes


def test_first_stop_finds_the_earliest_stop():
    assert _first_stop(b"abc END x STOP", [b"STOP", b"END"], 0) == 4
    assert _first_stop(b"abc", [b"x"], 0) is None


def test_segments_cut_at_message_bounds_and_chunk():
    assert list(_Runner._segments((5, 9), 0, 12, 3)) == [(0, 3), (3, 5), (5, 8), (8, 9), (9, 12)]
    assert list(_Runner._segments((5,), 7, 10, 512)) == [(7, 10)]


# -- generation -------------------------------------------------------------------------------------


@pytest.mark.model
def test_is_a_backend_with_all_capabilities(backend: EmbeddedBackend):
    assert isinstance(backend, Backend)
    caps = backend.capabilities
    assert caps.generate and caps.top_logprobs and caps.continuation_logprobs and caps.seeded
    ident = backend.identity()
    assert ident["kind"] == "embedded" and ident["model"] == "smollm2-135m"
    assert len(ident["gguf_sha256"]) == 64


@pytest.mark.model
async def test_generation_follows_the_chat_template_and_system_prompt(backend: EmbeddedBackend):
    messages = chat(PIRATE, QUESTION)
    prompt = backend._load().prompt(messages)
    assert prompt.text.startswith(f"<|im_start|>system\n{PIRATE}<|im_end|>\n<|im_start|>user\n{QUESTION}")
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert len(prompt.bounds) == 1  # the end of the system turn

    pirate = await backend.generate(GenerateRequest(messages, temperature=0.0, max_tokens=24))
    butler = await backend.generate(GenerateRequest(chat(BUTLER, QUESTION), temperature=0.0, max_tokens=24))
    assert pirate.text.strip() and butler.text.strip()
    assert pirate.text != butler.text  # the system prompt reaches the model
    assert pirate.prompt_tokens == len(prompt.tokens)
    assert 0 < pirate.completion_tokens <= 24
    assert pirate.finish_reason in ("stop", "length")


@pytest.mark.model
def test_max_tokens_and_stop_strings(backend: EmbeddedBackend):
    long = backend.generate_sync(
        GenerateRequest(chat(None, "Write a long story about a dragon."), temperature=0.0, max_tokens=12)
    )
    assert long.finish_reason == "length" and long.completion_tokens == 12
    stopped = backend.generate_sync(
        GenerateRequest(chat(None, "Write a long story about a dragon."), temperature=0.0, max_tokens=12, stop=(" ",))
    )
    assert stopped.finish_reason == "stop" and " " not in stopped.text
    assert long.text.startswith(stopped.text)


@pytest.mark.model
def test_seeded_generation_is_reproducible(backend: EmbeddedBackend, smollm2_path: Path):
    req = GenerateRequest(chat(PIRATE, "Tell me about your ship."), temperature=1.0, max_tokens=20, seed=123)
    first = backend.generate_sync(req)
    # other work in between changes the KV cache; the answer must not depend on it
    backend.loglikelihood_sync([LikelihoodRequest(chat(PIRATE, QUESTION), RESPONSES[0])])
    backend.generate_sync(GenerateRequest(chat(BUTLER, "Hello"), temperature=1.0, max_tokens=5, seed=9))
    assert backend.generate_sync(req).text == first.text
    fresh = EmbeddedBackend(smollm2_path, n_ctx=1024)
    try:
        assert fresh.generate_sync(req).text == first.text
    finally:
        fresh.close()
    others = {backend.generate_sync(GenerateRequest(req.messages, 1.0, 20, seed=s)).text for s in (1, 2, 3)}
    assert len(others | {first.text}) > 1  # the seed matters


@pytest.mark.model
def test_top_logprobs_are_a_real_distribution(backend: EmbeddedBackend):
    req = GenerateRequest(
        chat("You rate answers from 1 to 5.", "Rate this answer to 'What is 2+2?': '4'. Reply with one digit."),
        temperature=0.0,
        max_tokens=3,
        top_logprobs=5,
    )
    comp = backend.generate_sync(req)
    assert comp.logprobs is not None and len(comp.logprobs) == comp.completion_tokens
    for pos in comp.logprobs:
        values = list(pos.top.values())
        assert len(values) == 5
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        assert all(v <= 0 for v in values)
        # not the flat distribution an unfilled score buffer would give (log(1/vocab) = -10.8)
        assert values[0] > -5.0 and values[0] - values[-1] > 0.01
        # greedy: the chosen token is the most likely one
        assert pos.logprob == pytest.approx(values[0])
    # the first position agrees with scoring that token as a continuation
    first = comp.logprobs[0]
    scored = backend.loglikelihood_sync([LikelihoodRequest(req.messages, first.token)])[0]
    assert scored.tokens == (first.token,)
    assert scored.token_logprobs[0] == pytest.approx(first.logprob, abs=1e-3)


# -- log-likelihood -----------------------------------------------------------------------------------


def _reference_logprobs(path: Path, text_prompt: str, response: str) -> tuple[list[str], list[float]]:
    """Evaluate the whole sequence one token at a time from scratch; log-softmax of each logit row."""
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as C

    llm = Llama(str(path), n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    try:
        prompt = llm.tokenize(text_prompt.encode(), add_bos=False, special=True)
        joint = llm.tokenize((text_prompt + response).encode(), add_bos=False, special=True)
        assert joint[: len(prompt)] == prompt
        resp = joint[len(prompt) :]
        logprobs = []
        for i, tok in enumerate(joint[:-1]):
            llm.eval([tok])
            if i + 1 >= len(prompt):
                row = np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
                row = row.astype(np.float64)
                lse = row.max() + np.log(np.exp(row - row.max()).sum())
                logprobs.append(float(row[joint[i + 1]] - lse))
        pieces = [llm.detokenize([t]).decode("utf-8", errors="replace") for t in resp]
        return pieces, logprobs
    finally:
        llm.close()


@pytest.mark.model
def test_loglikelihood_matches_token_by_token_reference(backend: EmbeddedBackend, smollm2_path: Path):
    messages = chat(PIRATE, QUESTION)
    response = RESPONSES[4]
    got = backend.loglikelihood_sync([LikelihoodRequest(messages, response)])[0]
    pieces, ref = _reference_logprobs(smollm2_path, backend._load().prompt(messages).text, response)
    assert list(got.tokens) == pieces
    assert "".join(got.tokens) == response
    assert got.n_tokens == len(ref) > 5
    diffs = [abs(a - b) for a, b in zip(got.token_logprobs, ref)]
    assert max(diffs) < 1e-3, diffs
    assert all(lp < 0 for lp in got.token_logprobs)


@pytest.mark.model
def test_prefix_reuse_gives_identical_numbers_with_fewer_tokens(smollm2_path: Path):
    reqs = [LikelihoodRequest(chat(s, QUESTION), r) for s in (PIRATE, BUTLER) for r in RESPONSES]
    reqs.append(LikelihoodRequest(chat(PIRATE, "Where do you sail?"), RESPONSES[0]))
    reuse = EmbeddedBackend(smollm2_path, n_ctx=1024, prefix_reuse=True)
    scratch = EmbeddedBackend(smollm2_path, n_ctx=1024, prefix_reuse=False)
    try:
        a = reuse.loglikelihood_sync(reqs)
        b = scratch.loglikelihood_sync(reqs)
        assert all(_same_numbers(x, y) for x, y in zip(a, b))
        assert sum(x.evaluated_tokens for x in a) < sum(y.evaluated_tokens for y in b)
        # per prompt, one request evaluates the prompt; each other one only its response tokens
        # (the last prompt token plus all response tokens but the last)
        for group in (a[0:5], a[5:10]):
            full = [x for x in group if x.evaluated_tokens > x.n_tokens]
            assert len(full) == 1
            assert all(x.evaluated_tokens == x.n_tokens for x in group if x is not full[0])
        # in all: each system turn once, each rest of a prompt once, each response once
        runner = reuse._load()
        prompts = {runner.prompt(r.messages) for r in reqs}
        systems = {p.tokens[: p.bounds[0]] for p in prompts}
        expected = sum(map(len, systems)) + sum(len(p.tokens) - 1 - p.bounds[0] for p in prompts)
        assert sum(x.evaluated_tokens for x in a) == expected + sum(x.n_tokens for x in a)
        # order and earlier KV state do not change the numbers
        again = reuse.loglikelihood_sync(list(reversed(reqs)))[::-1]
        assert all(_same_numbers(x, y) for x, y in zip(a, again))
    finally:
        reuse.close()
        scratch.close()


@pytest.mark.model
def test_samples_of_one_prompt_evaluate_it_once_and_match_fresh_evaluations(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
):
    evaluated: list[int] = []
    execute = _Runner.execute

    def counting(self, seq, plan, on_logits=None):
        evaluated.append(execute(self, seq, plan, on_logits))
        return evaluated[-1]

    monkeypatch.setattr(_Runner, "execute", counting)
    pirate = [GenerateRequest(chat(PIRATE, "Tell me about your ship."), temperature=1.0, max_tokens=12,
                              seed=s, top_logprobs=3 if s == 2 else 0) for s in (1, 2, 3)]
    butler = GenerateRequest(chat(BUTLER, QUESTION), temperature=1.0, max_tokens=12, seed=4)
    # two samples in a row, another prompt, a scoring call, then the third sample of the first prompt
    order = [pirate[0], pirate[1], butler, pirate[2]]
    reuse = EmbeddedBackend(smollm2_path, n_ctx=1024, prefix_reuse=True)
    scratch = EmbeddedBackend(smollm2_path, n_ctx=1024, prefix_reuse=False)
    try:
        def prompt_cost(request: GenerateRequest) -> tuple[str, int]:
            before = sum(evaluated)
            text = reuse.generate_sync(request).text
            return text, sum(evaluated) - before

        prompt_len = len(reuse._load().prompt(pirate[0].messages).tokens)
        got = [prompt_cost(r) for r in order[:3]]
        reuse.loglikelihood_sync([LikelihoodRequest(pirate[2].messages, RESPONSES[0])])
        got.append(prompt_cost(order[3]))
        # the second sample evaluated nothing: the KV cache held its prompt and the saved row was
        # its next-token distribution; the third came after other work and evaluated a part again
        assert [cost for _, cost in got[:2]] == [prompt_len, 0] and got[3][1] > 0
        expected = [scratch.generate_sync(r) for r in order]
        assert [text for text, _ in got] == [e.text for e in expected]
        # the restored row is the distribution itself, alternatives and all
        assert reuse.generate_sync(pirate[1]).logprobs == expected[1].logprobs
        # a reset forgets the saved row: the same request evaluates its prompt again, same answer
        reuse.reset_cache()
        assert prompt_cost(pirate[1]) == (expected[1].text, prompt_len)
    finally:
        reuse.close()
        scratch.close()


@pytest.mark.model
def test_loglikelihood_edge_cases(backend: EmbeddedBackend):
    messages = chat(PIRATE, QUESTION)
    dup = LikelihoodRequest(messages, RESPONSES[2])
    empty, first, second = backend.loglikelihood_sync([LikelihoodRequest(messages, ""), dup, dup])
    assert empty.n_tokens == 0 and empty.total == 0.0
    assert first.token_logprobs == second.token_logprobs and second.evaluated_tokens == 0
    # a response that spells a special token is scored as plain text, not as the end of the turn
    special = backend.loglikelihood_sync([LikelihoodRequest(messages, "Paris<|im_end|>")])[0]
    assert "".join(special.tokens) == "Paris<|im_end|>" and special.n_tokens > 2


@pytest.mark.model
def test_too_long_for_the_context_is_a_config_error(smollm2_path: Path):
    small = EmbeddedBackend(smollm2_path, n_ctx=256)
    try:
        with pytest.raises(ConfigError, match="n_ctx"):
            small.generate_sync(GenerateRequest(chat(None, "word " * 400), max_tokens=4))
        with pytest.raises(ConfigError, match="n_ctx"):
            small.loglikelihood_sync([LikelihoodRequest(chat(None, "hi"), "word " * 400)])
    finally:
        small.close()


# -- concurrency ------------------------------------------------------------------------------------


def test_the_turn_lock_serves_the_lowest_waiting_number_first():
    import threading
    import time

    lock = _TurnLock()
    unused = lock.number()  # taken and never used: blocks nobody
    numbers = [lock.number() for _ in range(4)]
    served: list[int] = []
    lock.acquire()  # held while the others line up, in the reverse order of their numbers

    def take(n: int) -> None:
        lock.acquire(n)
        served.append(n)
        lock.release()

    threads = [threading.Thread(target=take, args=(n,)) for n in reversed(numbers)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while len(lock._waiting) < len(numbers) and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    for t in threads:
        t.join(timeout=5)
    assert served == numbers and unused < numbers[0]
    with lock:  # a plain `with` takes the next number and is served at once when no one waits
        pass


@pytest.mark.model
async def test_samples_asked_for_together_run_in_turn_and_reuse_their_prompt(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # the engine's pattern: queries gathered, each gathering its samples; with the turn lock every
    # sample after a query's first finds the prompt evaluated, whatever order the threads wake in
    restored: list[bool] = []
    restore = _Runner._restore_prompt_row

    def counting(self, tokens, plan):
        restored.append(restore(self, tokens, plan))
        return restored[-1]

    monkeypatch.setattr(_Runner, "_restore_prompt_row", counting)
    b = EmbeddedBackend(smollm2_path, n_ctx=1024)
    questions = [f"Question {i}: where is the treasure?" for i in range(4)]

    async def query(q: str) -> list:
        return await asyncio.gather(*(b.generate(GenerateRequest(chat(PIRATE, q), temperature=1.0,
                                                                 max_tokens=24, seed=s))
                                      for s in (1, 2, 3)))

    try:
        await asyncio.gather(*(query(q) for q in questions))
    finally:
        b.close()
    assert len(restored) == 12 and sum(restored) == 8


@pytest.mark.model
async def test_concurrent_calls_are_serialized_and_do_not_block_the_loop(backend: EmbeddedBackend):
    reqs = [GenerateRequest(chat(PIRATE, q), temperature=0.8, max_tokens=16, seed=5) for q in ("Hi", "Bye", "Ahoy")]
    sequential = [backend.generate_sync(r).text for r in reqs]

    ticks = 0
    task = asyncio.ensure_future(
        asyncio.gather(
            *(backend.generate(r) for r in reqs),
            backend.loglikelihood([LikelihoodRequest(chat(PIRATE, QUESTION), RESPONSES[0])]),
        )
    )
    while not task.done():
        await asyncio.sleep(0.002)
        ticks += 1
    *completions, _scores = await task
    assert [c.text for c in completions] == sequential
    assert ticks >= 3  # the event loop kept running while the model worked


# -- several responses per decode (parallel_responses) ------------------------------------------------

LENGTHS = ["Yes.", *RESPONSES, "Paris " * 30, "Ahoy! " * 12]  # 1 to ~60 tokens


def _score_both(path: Path, reqs: list[LikelihoodRequest], **kwargs):
    one = EmbeddedBackend(path, n_ctx=1024, **kwargs)
    grouped = EmbeddedBackend(path, n_ctx=1024, parallel_responses=3, **kwargs)
    try:
        return one.loglikelihood_sync(reqs), grouped.loglikelihood_sync(reqs), grouped
    finally:
        one.close()


def _per_token_diffs(a, b) -> list[float]:
    assert [x.tokens for x in a] == [y.tokens for y in b]
    return [abs(x - y) for p, q in zip(a, b) for x, y in zip(p.token_logprobs, q.token_logprobs)]


@pytest.mark.model
def test_parallel_responses_equal_one_at_a_time_with_small_decodes(smollm2_path: Path):
    """3 sequences for 9 responses of 1-60 tokens, decodes of at most 16 tokens: sequences are reused
    and long responses span several decodes. Below 64 tokens per decode llama.cpp's CPU numbers here do
    not depend on the batch's other rows, so grouping must reproduce one-at-a-time scoring."""
    reqs = [LikelihoodRequest(chat(PIRATE, QUESTION), r) for r in LENGTHS]
    reqs.append(LikelihoodRequest(chat(PIRATE, QUESTION), ""))
    one, grouped, backend = _score_both(smollm2_path, reqs, logits_chunk=16)
    try:
        assert max(_per_token_diffs(one, grouped)) < 1e-3
        assert max(x.n_tokens for x in grouped) > 2 * 16  # some response spans three decodes
        assert sum(x.evaluated_tokens for x in grouped) == sum(x.evaluated_tokens for x in one)
        # only sequence 0 (the prompt) is left in the KV cache
        from llama_cpp import llama_cpp as C

        runner = backend._load()
        mem = C.llama_get_memory(runner._ctx)
        assert runner.n_seq == 3
        assert all(C.llama_memory_seq_pos_max(mem, s) == -1 for s in range(1, runner.n_seq + 1))
        assert C.llama_memory_seq_pos_max(mem, 0) == len(runner.kv_tokens) - 1
        # and generation afterwards is unaffected
        req = GenerateRequest(chat(PIRATE, QUESTION), temperature=0.0, max_tokens=8)
        fresh = EmbeddedBackend(smollm2_path, n_ctx=1024)
        try:
            assert backend.generate_sync(req).text == fresh.generate_sync(req).text
        finally:
            fresh.close()
    finally:
        backend.close()


@pytest.mark.model
def test_parallel_responses_with_large_decodes_stay_close_and_repeatable(smollm2_path: Path):
    """At the default 128-token decodes several responses make decodes of 64+ tokens, where llama.cpp
    may switch kernels, so equality with one-at-a-time scoring is not guaranteed (up to ~0.5 nats on a
    token measured with longer responses). It is still the same computation: same tokens and cost,
    small deviations, and the same request set gives the same numbers in any order."""
    reqs = [LikelihoodRequest(chat(s, QUESTION), r) for s in (PIRATE, BUTLER) for r in LENGTHS]
    one, grouped, backend = _score_both(smollm2_path, reqs)
    try:
        diffs = _per_token_diffs(one, grouped)
        assert max(diffs) < 1.5 and float(np.mean(diffs)) < 0.1, (max(diffs), float(np.mean(diffs)))
        assert all(abs(x.total - y.total) < 0.05 * abs(x.total) + 0.5 for x, y in zip(one, grouped))
        assert sum(x.evaluated_tokens for x in grouped) == sum(x.evaluated_tokens for x in one)
        again = backend.loglikelihood_sync(list(reversed(reqs)))[::-1]
        assert all(_same_numbers(x, y, tol=0.0) for x, y in zip(grouped, again))
    finally:
        backend.close()

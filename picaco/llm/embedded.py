"""The embedded backend: a GGUF chat model run in-process through llama-cpp-python.

Prompts go through the chat template stored in the GGUF (ChatML for Qwen and SmolLM2), rendered with
llama-cpp-python's Jinja formatter, exactly as ``Llama.create_chat_completion`` renders them.

**Evaluation schedule.** llama.cpp's numbers depend on how tokens are grouped into ``llama_decode``
batches: on the Qwen Q4_K_M files, evaluating the same tokens as one batch or split in two changes
per-token log-probabilities by up to ~0.2 nats (measured; batches are deterministic, splits are not
neutral). Prefix reuse naively changes the split with every request, so scores would depend on what
was evaluated before. This backend therefore evaluates every sequence on a *canonical schedule*: one
batch per chat message (cut where the template finishes a message), chunks of ``n_batch`` inside a
message, and, for scoring, the response (plus the last prompt token) as its own batches. The KV cache
of a previous evaluation is reused only up to a batch boundary that both schedules share, so a result
is a pure function of its request: identical with and without reuse, in any order.

**Samples of one prompt.** The prompt's last batch must produce the next-token logits, and those
are not kept between decodes, so reuse alone would evaluate a prompt's last message again for each of
its n samples. ``generate`` saves that row (one vocabulary of floats) with the tokens and batches it
came from; when the next request has the same prompt and the KV cache still holds it on the same
batches, the previous answer's cells are dropped and the saved row is written back where the sampler
reads it. Batches are deterministic, so the row is the one a fresh evaluation would give: the answers
are unchanged, only the repeated prompt evaluation is skipped.

**Several responses per decode (opt-in).** With ``parallel_responses=N`` (N > 1) the responses to one
prompt are scored side by side: the prompt is evaluated once in sequence 0, each response gets its own
llama.cpp sequence whose prompt cells are shared with sequence 0 (one unified KV cache, so sharing
costs no copy), and several responses' tokens fill one decode of up to ``logits_chunk`` tokens, each
response cut at the same places as alone. Fewer, larger decodes are faster on CPU, but the numbers are
*not* those of one response per decode: llama.cpp's CPU kernels give the same row different values
depending on the decode's shape (measured on the dev machine: a decode of 64 or more tokens switches
kernels; grouped vs. one-at-a-time differed by up to 0.4 nats on a token for qwen2.5-coder-0.5b and
0.5 for SmolLM2, 15-28 responses of 1-620 tokens, while decodes under 64 tokens matched exactly).
No layout avoids it: a response's numbers move with whatever precedes it in the decode, with flash
attention on or off and with responses started at aligned KV cells (``bench/grouping_probe.py``). A
grouped score therefore depends on what else was scored with it: the default (1) keeps one response
per decode.

**Log-probabilities.** ``logits_all=True`` would keep n_ctx x vocab floats (2.5 GB for Qwen at
n_ctx=4096) and project every prompt token onto the vocabulary. Instead the low-level batch API asks
for logits only where they are used: the last prompt position for generation, and each response
position for scoring (at most ``logits_chunk`` rows per decode). Generation reads the next-token
distribution straight from the context (``llama_get_logits_ith``), never ``Llama.scores``, which
0.3.36 leaves unfilled without ``logits_all`` (a flat distribution).

**Threads.** A llama.cpp context is not thread-safe: all model work runs in a worker thread
(``asyncio.to_thread``) behind one lock, so the event loop never blocks. The lock is shared by every
embedded model in the process: two models computing at once on a few cores only fight for them. It
serves requests in the order they were made (``_TurnLock``), so the samples of one prompt run back to
back and share its evaluation.

**OpenMP waiting.** llama.cpp's CPU backend (built with OpenMP via gcc) busy-waits between its many
per-token barriers. When the cores are shared (another model, a server, other programs) that spinning
made single-token decoding 10-100x slower on the 2-core dev machine (20 SmolLM2 decode steps: 2-118 s
spinning vs. 1.1 s passive). Importing this module therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless
the variable is already set; it must happen before ``llama_cpp`` is first imported. On an idle machine
passive waiting costs a few per cent of decode speed; set ``OMP_WAIT_POLICY=ACTIVE`` to opt out.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import heapq
import itertools
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# before llama_cpp (and its libgomp) is loaded anywhere; see the module docstring
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from picaco.errors import ConfigError  # noqa: E402
from picaco.llm import registry  # noqa: E402
from picaco.llm.base import (  # noqa: E402
    Capabilities,
    Completion,
    GenerateRequest,
    Likelihood,
    LikelihoodRequest,
    Message,
    TokenAlternatives,
)

_ROW_BLOCK = 32  # rows per log-softmax block: bounds the temporary to 32 x vocab floats

#: set to 1 to load models with a llama.cpp runtime that has AMX kernels anyway
ALLOW_AMX_ENV = "PICACO_ALLOW_AMX"


def check_runtime_build(system_info: str | None = None) -> None:
    """Refuse a llama.cpp runtime compiled with AMX kernels: they kill the process with a segfault on
    Sapphire Rapids Xeons (in ggml_backend_amx_mul_mat, llama.cpp issue 20824; seen on the dev
    machine's first decode), which would lose the work in flight with no message. `make install`
    builds the runtime for AVX2; this catches one installed otherwise (pip's default is the building
    CPU's own instruction set)."""
    if system_info is None:
        import llama_cpp

        raw = llama_cpp.llama_print_system_info()
        system_info = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if "AMX_INT8 = 1" in system_info and os.environ.get(ALLOW_AMX_ENV) != "1":
        raise ConfigError(
            "this llama-cpp-python was compiled with AMX kernels, which crash on some Intel Xeons "
            "(llama.cpp issue 20824); rebuild it without them (`make install` does, or: "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall --no-cache-dir llama-cpp-python), '
            f"or set {ALLOW_AMX_ENV}=1 to try it anyway"
        )


class _TurnLock:
    """A lock that goes to the waiting caller with the lowest number: first asked, first served.

    ``threading.Lock`` wakes its waiters in no set order. Here a request takes its number in the
    event loop (``number()``), where requests are made in a known order, before a worker thread
    waits for its turn; so the n samples of one prompt, asked for together, run one after another
    and each after the first finds the prompt evaluated (module docstring, "Samples of one
    prompt"). Measured with the engine's pattern (six queries, three samples each, 60 tokens) on
    the 0.5B model: a plain lock let 6-12 of the 12 possible samples find their prompt. A number
    that is never used blocks nobody: the lock goes to the lowest number among those waiting.
    ``with lock:`` takes a number on entry."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._numbers = itertools.count()
        self._waiting: list[int] = []  # heap of the numbers of waiting callers
        self._held = False

    def number(self) -> int:
        with self._cond:
            return next(self._numbers)

    def acquire(self, number: int | None = None) -> None:
        with self._cond:
            mine = next(self._numbers) if number is None else number
            heapq.heappush(self._waiting, mine)
            try:
                self._cond.wait_for(lambda: not self._held and self._waiting[0] == mine)
            except BaseException:  # given up while waiting: let the next number have its turn
                self._waiting.remove(mine)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)  # mine, the lowest
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


#: one model computes at a time in this process (contexts are not thread-safe; cores are shared)
_COMPUTE_LOCK = _TurnLock()


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class _Batch:
    """Decode tokens [start, stop); positions >= logits_from produce logits."""

    start: int
    stop: int
    logits_from: int

    @property
    def n_outputs(self) -> int:
        return max(0, self.stop - max(self.start, self.logits_from))


@dataclass(frozen=True)
class _Prompt:
    tokens: tuple[int, ...]
    text: str
    #: token positions where the template finished a message (0 < b < len(tokens))
    bounds: tuple[int, ...]


class _Runner:
    """One loaded model and its KV cache. Not thread-safe: the backend serializes every call."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_threads: int,
        n_batch: int,
        logits_chunk: int,
        flash_attn: bool,
        top_k: int,
        min_p: float,
        prefix_reuse: bool,
        parallel_responses: int,
    ):
        from llama_cpp import Llama, llama_chat_format

        check_runtime_build()
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_batch=n_batch,
                n_ubatch=n_batch,
                flash_attn=flash_attn,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError) as err:  # llama-cpp-python's "Failed to load model ..."
            raise ConfigError(f"llama.cpp could not load {path}: {err}") from err
        self.logits_chunk = min(logits_chunk, n_batch)
        # one sequence per response in flight, plus seq 0 for the prompt (llama.cpp allows 256 in all)
        n_seq = min(parallel_responses, self.logits_chunk, 255)
        self.n_seq = n_seq if n_seq > 1 and prefix_reuse else 0
        if self.n_seq:
            self._use_sequences(self.n_seq + 1)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"{path} has no chat template in its metadata; use a chat (instruct) GGUF")
        eos, bos = (self._special_text(t) for t in (self.llm.token_eos(), self.llm.token_bos()))
        fmt = llama_chat_format.Jinja2ChatFormatter
        self._render = fmt(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        self._render_turns = fmt(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False)

        self.n_ctx = self.llm.n_ctx()
        self.n_batch = n_batch
        self.n_vocab = self.llm.n_vocab()
        self.top_k, self.min_p = top_k, min_p
        self.prefix_reuse = prefix_reuse
        self._vocab = self.llm._model.vocab
        self._ctx = self.llm._ctx.ctx
        self._batch = self.llm._batch.batch  # capacity n_batch, allocated by Llama
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._prompts: OrderedDict[tuple[Message, ...], _Prompt] = OrderedDict()
        # what the KV cache holds, and where each batch that computed it started
        self.kv_tokens: list[int] = []
        self.kv_starts: list[int] = []
        # the next-token row of the last prompt generate() evaluated, with the tokens and batch starts
        # it came from: another sample of the same prompt samples from it (``_restore_prompt_row``)
        self._prompt_row: tuple[tuple[int, ...], tuple[int, ...], np.ndarray] | None = None

    def _use_sequences(self, n_seq_max: int) -> None:
        """Swap Llama's context for one with ``n_seq_max`` sequences in one unified KV cache (``Llama``
        takes neither setting). Unified, a prompt copied to another sequence shares its cells."""
        from llama_cpp import _internals

        params = self.llm.context_params
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        self.llm._ctx.close()  # closing twice (at Llama.close) is a no-op
        try:
            self.llm._ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except ValueError as err:
            self.llm.close()
            msg = f"llama.cpp could not create a context with {n_seq_max} sequences: {err}"
            raise ConfigError(msg) from err

    def close(self) -> None:
        self.llm.close()

    # -- tokens -------------------------------------------------------------------------------------

    def _special_text(self, token: int) -> str:
        return self.llm._model.token_get_text(token) if token != -1 else ""

    def piece(self, token: int, special: bool = False) -> bytes:
        """Bytes of one token (llama-cpp-python's detokenize truncates pieces over 32 bytes)."""
        key = (token, special)
        if key not in self._pieces:
            from llama_cpp import llama_cpp as C

            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            self._pieces[key] = buf.raw[:n]
        return self._pieces[key]

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def prompt(self, messages: tuple[Message, ...]) -> _Prompt:
        """Template-rendered prompt (with the generation prompt), cached for repeated prompts."""
        if messages in self._prompts:
            self._prompts.move_to_end(messages)
            return self._prompts[messages]
        dicts = [m.as_dict() for m in messages]
        text = self._render(messages=dicts).prompt
        # Like create_chat_completion: the template adds any BOS itself.
        tokens = tuple(self.tokenize(text, special=True))
        bounds = []
        for k in range(1, len(dicts)):
            try:
                turns = self._render_turns(messages=dicts[:k]).prompt
            except Exception:  # a template may refuse a partial conversation
                continue
            if text.startswith(turns):
                cut = self.tokenize(turns, special=True)
                if 0 < len(cut) < len(tokens) and tokens[: len(cut)] == tuple(cut):
                    bounds.append(len(cut))
        prompt = _Prompt(tokens, text, tuple(sorted(set(bounds))))
        self._prompts[messages] = prompt
        if len(self._prompts) > 256:
            self._prompts.popitem(last=False)
        return prompt

    def response_tokens(self, prompt: _Prompt, response: str) -> list[int]:
        """The response's tokens, cut exactly where generation would start.

        Prompt and response are tokenized together (right for tokenizers whose output depends on
        context, e.g. SentencePiece's leading space). If the prompt's tokens are not a prefix of that
        (a merge across the boundary), or the response text spelled a special token such as
        ``<|im_end|>``, the response is tokenized on its own as plain text: the split generation
        would have produced, since a model's response always starts after the prompt's last token.
        """
        if not response:
            return []
        joint = self.tokenize(prompt.text + response, special=True)
        p = len(prompt.tokens)
        tail = joint[p:]
        if tuple(joint[:p]) == prompt.tokens and tail and not any(self._is_control(t) for t in tail):
            return tail
        return self.tokenize(response, special=False)

    def _is_control(self, token: int) -> bool:
        from llama_cpp import llama_cpp as C

        return bool(C.llama_vocab_is_control(self._vocab, token)) or bool(
            C.llama_vocab_is_eog(self._vocab, token)
        )

    def is_eog(self, token: int) -> bool:
        from llama_cpp import llama_cpp as C

        return bool(C.llama_vocab_is_eog(self._vocab, token))

    # -- the canonical schedule and the KV cache ---------------------------------------------------

    @staticmethod
    def _segments(bounds: Sequence[int], start: int, end: int, chunk: int) -> Iterator[tuple[int, int]]:
        """[start, end) cut at ``bounds``, each piece chunked from its own start."""
        cuts = [start, *(b for b in bounds if start < b < end), end]
        for a, b in zip(cuts, cuts[1:]):
            for s in range(a, b, chunk):
                yield s, min(b, s + chunk)

    def _reuse_point(self, seq: Sequence[int], plan: list[_Batch]) -> int:
        """Longest KV prefix computed by exactly the batches this plan would use, up to the first
        batch that must produce logits (those are not kept between decodes)."""
        if not self.prefix_reuse or not self.kv_tokens or not plan:
            return 0
        limit = next((b.start for b in plan if b.n_outputs), plan[-1].stop)
        common = _common_prefix(self.kv_tokens, seq)
        kv_bounds = [*self.kv_starts, len(self.kv_tokens)]
        # a plan without logits may be reused whole: its end is a boundary too
        plan_bounds = [*(b.start for b in plan), plan[-1].stop]
        reuse = 0
        for start, kv_start in zip(plan_bounds, kv_bounds):
            if start != kv_start or start > common or start > limit:
                break
            reuse = start
        return reuse

    def _trim(self, keep: int) -> None:
        from llama_cpp import llama_cpp as C

        if keep < len(self.kv_tokens):
            mem = C.llama_get_memory(self._ctx)
            if not C.llama_memory_seq_rm(mem, 0, keep, -1):
                C.llama_memory_clear(mem, True)
                keep = 0
        del self.kv_tokens[keep:]
        self.kv_starts = [s for s in self.kv_starts if s < keep]
        self.llm.n_tokens = keep

    def reset(self) -> None:
        """Forget the KV cache (used after a failed decode and by benchmarks)."""
        from llama_cpp import llama_cpp as C

        C.llama_memory_clear(C.llama_get_memory(self._ctx), True)
        self.kv_tokens.clear()
        self.kv_starts.clear()
        self._prompt_row = None
        self.llm.n_tokens = 0

    def _decode(self, seq: Sequence[int], b: _Batch) -> None:
        from llama_cpp import llama_cpp as C

        if b.start != len(self.kv_tokens):
            raise RuntimeError("internal error: batch does not continue the KV cache")
        batch = self._batch
        for i, pos in enumerate(range(b.start, b.stop)):
            batch.token[i] = seq[pos]
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = pos >= b.logits_from
        batch.n_tokens = b.stop - b.start
        rc = C.llama_decode(self._ctx, batch)
        if rc != 0:
            self.reset()
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.kv_starts.append(b.start)
        self.kv_tokens.extend(seq[b.start : b.stop])
        # keep Llama's own bookkeeping truthful in case anything else uses this instance
        self.llm.input_ids[b.start : b.stop] = seq[b.start : b.stop]
        self.llm.n_tokens = b.stop
        self.llm._requires_eval = True

    def _output_rows(self, n: int) -> np.ndarray:
        from llama_cpp import llama_cpp as C

        return np.ctypeslib.as_array(C.llama_get_logits(self._ctx), shape=(n, self.n_vocab))

    def _last_row(self) -> np.ndarray:
        from llama_cpp import llama_cpp as C

        return np.ctypeslib.as_array(C.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def execute(
        self,
        seq: Sequence[int],
        plan: list[_Batch],
        on_logits: Callable[[int, np.ndarray], None] | None = None,
    ) -> int:
        """Run ``plan`` over ``seq``, reusing the KV cache where exact. Returns tokens evaluated.

        ``on_logits(first_position, rows)`` sees each batch's logits before the next decode.
        """
        start = self._reuse_point(seq, plan)
        self._trim(start)
        evaluated = 0
        for b in plan:
            if b.stop <= start:
                continue
            self._decode(seq, b)
            evaluated += b.stop - b.start
            if b.n_outputs and on_logits is not None:
                on_logits(max(b.start, b.logits_from), self._output_rows(b.n_outputs))
        return evaluated

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, seed: int) -> Completion:
        prompt = self.prompt(request.messages)
        p = len(prompt.tokens)
        if p >= self.n_ctx:
            raise ConfigError(f"the prompt is {p} tokens, at least n_ctx={self.n_ctx}; raise n_ctx")
        max_new = min(request.max_tokens, self.n_ctx - p)
        if max_new <= 0:
            return Completion("", "length", p, 0, () if request.top_logprobs else None)
        seq = list(prompt.tokens)
        plan = [_Batch(s, e, p - 1) for s, e in self._segments(prompt.bounds, 0, p, self.n_batch)]
        if not self._restore_prompt_row(prompt.tokens, plan):
            self.execute(seq, plan)
            self._prompt_row = (prompt.tokens, tuple(b.start for b in plan), self._last_row().copy())

        self.llm.set_seed(seed)
        # the same sampler chain create_completion builds (top-k, typical, top-p, min-p, temp, dist)
        sampler = self.llm._init_sampler(
            top_k=self.top_k, top_p=request.top_p, min_p=self.min_p,
            temp=request.temperature, repeat_penalty=1.0,
        )  # fmt: skip
        stops = [s.encode("utf-8") for s in request.stop if s]
        longest_stop = max((len(s) for s in stops), default=0)
        text = b""
        n_out = 0
        alternatives: list[TokenAlternatives] = []
        finish = "length"
        try:
            while True:
                token = sampler.sample(self.llm._ctx, -1)
                if self.is_eog(token):
                    finish = "stop"
                    break
                n_out += 1
                if request.top_logprobs > 0:
                    alternatives.append(self._alternatives(request.top_logprobs, token))
                before = len(text)
                text += self.piece(token)
                cut = _first_stop(text, stops, max(0, before - longest_stop))
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                if n_out >= max_new:
                    break
                seq.append(token)
                self._decode(seq, _Batch(len(seq) - 1, len(seq), len(seq) - 1))
        finally:
            sampler.close()
        return Completion(
            text=text.decode("utf-8", errors="ignore"),
            finish_reason=finish,
            prompt_tokens=p,
            completion_tokens=n_out,
            logprobs=tuple(alternatives) if request.top_logprobs > 0 else None,
        )

    def _restore_prompt_row(self, tokens: tuple[int, ...], plan: list[_Batch]) -> bool:
        """Another sample of the prompt generate() evaluated last: when the KV cache still holds it
        on the same batches, drop the previous answer's cells and put the saved next-token row back
        where the sampler reads it. A fresh evaluation of the prompt's last batch would give the same
        row (batches are deterministic); this skips it, which is most of a short answer's prompt
        cost when one prompt is sampled n times."""
        from llama_cpp import llama_cpp as C

        saved, p = self._prompt_row, len(tokens)
        starts = tuple(b.start for b in plan)
        if (saved is None or not self.prefix_reuse or saved[0] != tokens or saved[1] != starts
                or tuple(self.kv_tokens[:p]) != tokens
                or tuple(s for s in self.kv_starts if s < p) != starts):
            return False
        if not C.llama_get_logits_ith(self._ctx, -1):  # no logits from the last decode to overwrite
            return False
        self._trim(p)
        if len(self.kv_tokens) != p:  # the cache could not be cut there and was cleared
            return False
        self._last_row()[:] = saved[2]
        return True

    def _alternatives(self, k: int, token: int) -> TokenAlternatives:
        """The chosen token and the top-k of the current next-token distribution (natural log,
        not scaled by temperature). Sampling does not touch the context's logits, so this reads
        the same distribution the token was drawn from."""
        row = self._last_row()
        lse = _logsumexp(row)
        k = min(k, self.n_vocab)
        top_ids = np.argpartition(row, -k)[-k:]
        top_ids = top_ids[np.argsort(-row[top_ids], kind="stable")]
        top: dict[str, float] = {}
        for t in top_ids:
            top.setdefault(self._token_text(int(t)), float(row[t]) - lse)  # twins: keep the likelier
        return TokenAlternatives(self._token_text(token), float(row[token]) - lse, top)

    # -- scoring ------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        keyed = []
        for r in requests:
            prompt = self.prompt(r.messages)
            keyed.append((prompt, tuple(self.response_tokens(prompt, r.response))))
        # Lexicographic order walks the prompt trie depth-first: requests sharing a prompt are
        # adjacent, and identical (prompt, response) pairs are scored once.
        unique = sorted(dict.fromkeys(keyed), key=lambda x: (x[0].tokens, x[1]))
        results: dict[tuple[tuple[int, ...], tuple[int, ...]], Likelihood] = {}
        for _, group in itertools.groupby(unique, key=lambda x: x[0].tokens):
            pairs = list(group)
            prompt, resps = pairs[0][0], [resp for _, resp in pairs]
            if self.n_seq:
                scored = self._score_group(prompt, resps)
            else:
                scored = [self._score(prompt, resp) for resp in resps]
            results.update(((prompt.tokens, resp), res) for resp, res in zip(resps, scored))
        out, seen = [], set()
        for prompt, resp in keyed:
            key = (prompt.tokens, resp)
            res = results[key]
            out.append(res if key not in seen else dataclasses.replace(res, evaluated_tokens=0))
            seen.add(key)
        return out

    def _check_fits(self, prompt: _Prompt, resp: tuple[int, ...]) -> None:
        n = len(prompt.tokens) + len(resp)
        if n - 1 > self.n_ctx:
            raise ConfigError(f"prompt + response is {n} tokens, more than n_ctx={self.n_ctx}; raise n_ctx")

    def _prefix_plan(self, prompt: _Prompt) -> list[_Batch]:
        """The prompt but its last token, without logits, on the canonical schedule."""
        p = len(prompt.tokens)
        return [_Batch(s, e, e) for s, e in self._segments(prompt.bounds, 0, p - 1, self.n_batch)]

    def _likelihood(self, resp: tuple[int, ...], logprobs: np.ndarray, evaluated: int) -> Likelihood:
        return Likelihood(
            token_logprobs=tuple(float(x) for x in logprobs),
            tokens=tuple(self._token_text(t) for t in resp),
            evaluated_tokens=evaluated,
        )

    def _score(self, prompt: _Prompt, resp: tuple[int, ...]) -> Likelihood:
        """log p(resp | prompt) per token, one response at a time in sequence 0. No end-of-turn token
        is scored: the response is judged as text, so truncated and complete responses are treated
        alike."""
        if not resp:
            return Likelihood((), (), 0)
        self._check_fits(prompt, resp)
        p = len(prompt.tokens)
        seq = [*prompt.tokens, *resp]
        plan = self._prefix_plan(prompt)
        plan += [_Batch(s, e, s) for s, e in self._segments((), p - 1, len(seq) - 1, self.logits_chunk)]
        # position t's logits predict token t + 1
        logprobs = np.empty(len(resp), dtype=np.float64)

        def collect(first: int, rows: np.ndarray) -> None:
            targets = seq[first + 1 : first + 1 + rows.shape[0]]
            logprobs[first + 1 - p : first + 1 - p + rows.shape[0]] = _row_logprobs(rows, targets)

        return self._likelihood(resp, logprobs, self.execute(seq, plan, collect))

    def _score_group(self, prompt: _Prompt, resps: list[tuple[int, ...]]) -> list[Likelihood]:
        """Every response to one prompt, as ``_score`` would score each, but the prompt is evaluated
        once (sequence 0) and the responses run side by side in sequences that share its KV cells,
        several per decode. The prompt's cost is charged to the first non-empty response."""
        for resp in resps:
            self._check_fits(prompt, resp)
        todo = [i for i, resp in enumerate(resps) if resp]
        logprobs = [np.empty(len(resp), dtype=np.float64) for resp in resps]
        prompt_cost = 0
        if todo:
            prompt_cost = self.execute(list(prompt.tokens[:-1]), self._prefix_plan(prompt))
            self._decode_responses(prompt, resps, todo, logprobs)
        out = []
        for i, resp in enumerate(resps):
            if not resp:
                out.append(Likelihood((), (), 0))
                continue
            charged = prompt_cost if i == todo[0] else 0
            out.append(self._likelihood(resp, logprobs[i], len(resp) + charged))
        return out

    def _decode_responses(
        self, prompt: _Prompt, resps: list[tuple[int, ...]], todo: list[int], logprobs: list[np.ndarray]
    ) -> None:
        """Schedule the responses' tokens into decodes of at most ``logits_chunk`` tokens.

        Response i feeds the last prompt token and its tokens but the last, at positions from p - 1,
        cut into *pieces* at multiples of ``logits_chunk`` from its start: the same cuts ``_score``
        makes, and a piece is never split, so each response sees the batch boundaries it would see
        alone; only its neighbours in the decode differ (which can still move its numbers: see the
        module docstring).
        A response gets a free sequence (a copy of the prompt's cells, which are shared, not
        duplicated) when its first piece fits; its cells are freed as soon as its last piece is done.
        """
        from llama_cpp import llama_cpp as C

        mem = C.llama_get_memory(self._ctx)
        base, chunk = len(prompt.tokens) - 1, self.logits_chunk
        pending = list(todo)
        active: dict[int, list[int]] = {}  # sequence id -> [response index, tokens done]
        free = list(range(self.n_seq, 0, -1))
        reserved = 0  # KV cells promised to active responses
        try:
            while pending or active:
                pieces: list[tuple[int, int, int, int]] = []  # (seq id, response, start, stop)
                room = chunk
                for seq_id, (i, done) in active.items():  # running responses go first
                    stop = min(len(resps[i]), done + chunk)
                    if stop - done <= room:
                        pieces.append((seq_id, i, done, stop))
                        room -= stop - done
                k = 0
                while k < len(pending) and free and room:  # then first fit over the waiting ones
                    i = pending[k]
                    first = min(len(resps[i]), chunk)
                    if first > room or base + reserved + len(resps[i]) > self.n_ctx:
                        k += 1
                        continue
                    seq_id = free.pop()
                    C.llama_memory_seq_cp(mem, 0, seq_id, -1, -1)
                    active[seq_id] = [i, 0]
                    reserved += len(resps[i])
                    pieces.append((seq_id, i, 0, first))
                    room -= first
                    del pending[k]
                self._decode_pieces(prompt, resps, pieces, logprobs)
                for seq_id, i, _, stop in pieces:
                    active[seq_id][1] = stop
                    if stop == len(resps[i]):
                        C.llama_memory_seq_rm(mem, seq_id, -1, -1)
                        del active[seq_id]
                        free.append(seq_id)
                        reserved -= len(resps[i])
        finally:
            for seq_id in active:
                C.llama_memory_seq_rm(mem, seq_id, -1, -1)

    def _decode_pieces(
        self,
        prompt: _Prompt,
        resps: list[tuple[int, ...]],
        pieces: list[tuple[int, int, int, int]],
        logprobs: list[np.ndarray],
    ) -> None:
        from llama_cpp import llama_cpp as C

        batch, base, n = self._batch, len(prompt.tokens) - 1, 0
        targets: list[int] = []
        for seq_id, i, start, stop in pieces:
            resp = resps[i]
            for j in range(start, stop):  # position base + j's logits predict resp[j]
                batch.token[n] = resp[j - 1] if j else prompt.tokens[-1]
                batch.pos[n] = base + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = True
                n += 1
            targets.extend(resp[start:stop])
        batch.n_tokens = n
        rc = C.llama_decode(self._ctx, batch)
        if rc != 0:
            self.reset()
            raise RuntimeError(f"llama_decode failed with code {rc}")
        values = _row_logprobs(self._output_rows(n), targets)
        row = 0
        for _, i, start, stop in pieces:
            logprobs[i][start:stop] = values[row : row + stop - start]
            row += stop - start


class EmbeddedBackend:
    """A GGUF chat model in-process. ``model`` is a registry name (see ``picaco models list``) or a
    path to a GGUF file. The model loads on first use.

    Sampling follows llama.cpp's chain: top-k (``top_k``, 0 = off), top-p (the request's), min-p
    (``min_p``, 0 = off), temperature (0 = greedy). The defaults are llama.cpp's own (40, 0.05).
    Seeds: the request's seed, else ``seed`` + sample_index, else a fresh random seed.

    ``parallel_responses``: how many responses to one prompt may share a decode when scoring (each in
    its own llama.cpp sequence). 1 (default) scores one response per decode, a pure function of the
    request; more is faster but its numbers depend on what shares the decode (see the module
    docstring). Needs ``prefix_reuse``.
    """

    kind = "embedded"
    capabilities = Capabilities(
        generate=True, top_logprobs=True, continuation_logprobs=True, seeded=True
    )

    def __init__(
        self,
        model: str | Path = "qwen2.5-coder-0.5b",
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int | None = None,
        top_k: int = 40,
        min_p: float = 0.05,
        flash_attn: bool = True,
        prefix_reuse: bool = True,
        parallel_responses: int = 1,
        n_batch: int = 512,
        logits_chunk: int = 128,
        models_dir: Path | None = None,
    ):
        self.path, self.model, self.sha256 = _resolve(model, models_dir)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.seed = seed
        self.top_k, self.min_p = top_k, min_p
        self.flash_attn = flash_attn
        self.prefix_reuse = prefix_reuse
        self.parallel_responses = parallel_responses
        self.n_batch, self.logits_chunk = n_batch, logits_chunk
        self._runner: _Runner | None = None
        self._lock = _COMPUTE_LOCK

    def identity(self) -> dict:
        ident: dict = {"kind": self.kind, "model": self.model}
        if self.sha256:
            ident["gguf_sha256"] = self.sha256
        else:
            ident["file"] = self.path.name
            ident["size"] = self.path.stat().st_size
        ident["sampler"] = {"top_k": self.top_k, "min_p": self.min_p}
        ident["flash_attn"] = self.flash_attn  # changes the numbers slightly
        return ident

    # -- async API (the Backend protocol) ----------------------------------------------------------

    # Each request takes its turn number here, in the event loop, in the order requests are made.
    async def generate(self, request: GenerateRequest) -> Completion:
        return await asyncio.to_thread(self.generate_sync, request, self._lock.number())

    async def loglikelihood(self, requests: list[LikelihoodRequest]) -> list[Likelihood]:
        return await asyncio.to_thread(self.loglikelihood_sync, requests, self._lock.number())

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- sync API (one call at a time, in any thread) ----------------------------------------------

    def generate_sync(self, request: GenerateRequest, turn: int | None = None) -> Completion:
        self._lock.acquire(turn)
        try:
            return self._load().generate(request, self._seed_for(request))
        finally:
            self._lock.release()

    def loglikelihood_sync(self, requests: list[LikelihoodRequest], turn: int | None = None) -> list[Likelihood]:
        if not requests:
            return []
        self._lock.acquire(turn)
        try:
            return self._load().loglikelihood(list(requests))
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._runner is not None:
                self._runner.close()
                self._runner = None

    def reset_cache(self) -> None:
        """Drop the KV cache (the next call evaluates from scratch)."""
        with self._lock:
            if self._runner is not None:
                self._runner.reset()

    def count_tokens(self, messages: tuple[Message, ...]) -> int:
        """Tokens of the template-rendered prompt, generation prompt included."""
        with self._lock:
            return len(self._load().prompt(messages).tokens)

    def _load(self) -> _Runner:
        if self._runner is None:
            self._runner = _Runner(
                self.path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_batch=self.n_batch,
                logits_chunk=self.logits_chunk,
                flash_attn=self.flash_attn,
                top_k=self.top_k,
                min_p=self.min_p,
                prefix_reuse=self.prefix_reuse,
                parallel_responses=self.parallel_responses,
            )
        return self._runner

    def _seed_for(self, request: GenerateRequest) -> int:
        if request.seed is not None:
            seed = request.seed
        elif self.seed is not None:
            seed = self.seed + request.sample_index
        else:
            seed = random.SystemRandom().getrandbits(32)
        seed &= 0xFFFFFFFF
        return seed if seed != 0xFFFFFFFF else 0xFFFFFFFE  # 0xFFFFFFFF means "random" to llama.cpp


# --------------------------------------------------------------------------------------------------


def _resolve(model: str | Path, models_dir: Path | None) -> tuple[Path, str, str | None]:
    """(path, model name, verified sha256 or None) for a registry name or a GGUF path."""
    name = str(model)
    if name in registry.MODELS:
        spec = registry.MODELS[name]
        if spec.kind != "chat":
            raise ConfigError(f"{name!r} is an {spec.kind} model, not a chat model")
        path = registry.model_path(name, models_dir=models_dir)
        return path, name, registry.verified_sha256(path)
    path = Path(model).expanduser()
    if path.is_file():
        # a pulled registry file given by path gets the same identity as its name
        sha = registry.verified_sha256(path)
        for spec in registry.MODELS.values():
            if spec.kind == "chat" and sha == spec.files[0].sha256:
                return path, spec.name, sha
        return path, path.name, None
    raise ConfigError(
        f"embedded model {name!r} is neither a known model ({', '.join(sorted(registry.MODELS))}) "
        "nor an existing GGUF file"
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first_stop(text: bytes, stops: list[bytes], search_from: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else None


def _logsumexp(row: np.ndarray) -> float:
    m = float(row.max())
    return m + float(np.log(np.exp(row - m).sum(dtype=np.float64)))


def _row_logprobs(rows: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log-softmax(row)[target] for each logit row, in blocks (bounds the temporaries)."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    ids = np.asarray(targets)
    for lo in range(0, rows.shape[0], _ROW_BLOCK):
        block = rows[lo : lo + _ROW_BLOCK]
        picked = block[np.arange(block.shape[0]), ids[lo : lo + _ROW_BLOCK]].astype(np.float64)
        out[lo : lo + block.shape[0]] = picked - _logsumexp_rows(block)
    return out


def _logsumexp_rows(rows: np.ndarray) -> np.ndarray:
    m = rows.max(axis=1, keepdims=True)
    shifted = rows - m
    np.exp(shifted, out=shifted)
    return m[:, 0].astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))

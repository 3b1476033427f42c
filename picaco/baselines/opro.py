"""OPRO (after Yang et al., 2023, "Large Language Models as Optimizers") as a PICACO baseline.

The optimizer model sees the trajectory of (instruction, score) pairs so far, best last, plus the
values and a few example queries, and proposes new instructions. Each proposal is scored by sampling:
the target answers a fixed minibatch of train queries under it (the same queries and seeds for every
instruction, so scores are comparable) and the optimization judge rates every value; the score is the
mean conformity (the mean of the per-value mean ratings, 1–5), the evaluation's headline metric.
The search starts from the same seed instruction as PICACO and returns the best-scoring instruction
seen, the seed included.

Budget: `max_calls` caps the *requests* of the whole search (target samples, judge calls, optimizer
proposals), counted on the shared `Accounting` with cache hits included, so the search takes the same
path whether or not the cache is warm. Give it PICACO's spend (`budget_from_run`) for a like-for-like
comparison. Before each step it proposes only as many candidates as the remaining budget can score,
and before scoring each one it checks that the costliest scoring so far still fits.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from picaco.baselines.base import SearchMethod, fingerprint
from picaco.data.queries import Query
from picaco.errors import BudgetExhausted, ConfigError, DataError
from picaco.evaluate.metrics import overall_mean, value_means
from picaco.llm.accounting import Accounting
from picaco.llm.base import Message, chat
from picaco.llm.client import LLMClient
from picaco.optimize.proposer import fixed_part_note
from picaco.optimize.rundir import append_lines, drop_partial_tail

META_SYSTEM = "You write system prompts for an AI assistant. Reply with the new system prompt only."

#: a parsed proposal shorter than this is empty
MIN_CHARS = 15
EXAMPLE_CHARS = 200


@dataclass(frozen=True)
class OproParams:
    #: requests the whole search may issue (target + judge + optimizer, cache hits included)
    max_calls: int
    #: stop after this many proposal steps (None: only the budget stops it)
    max_steps: int | None = None
    candidates_per_step: int = 4
    #: train queries every instruction is scored on (fixed for the whole search)
    minibatch: int = 8
    samples_per_query: int = 1
    #: best instructions shown in the meta-prompt
    history: int = 20
    #: example queries shown in the meta-prompt
    exemplars: int = 3
    optimizer_temperature: float = 1.0
    optimizer_max_tokens: int = 300
    response_temperature: float = 0.7
    max_new_tokens: int = 256
    instruction_max_chars: int = 1500
    #: stop after this many steps in a row that score no new instruction
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_calls < 1:
            raise ConfigError("OPRO needs a call budget of at least 1")
        if self.candidates_per_step < 1 or self.minibatch < 1 or self.samples_per_query < 1:
            raise ConfigError("OPRO: candidates_per_step, minibatch and samples_per_query must be >= 1")


@dataclass
class Entry:
    """One instruction the search saw: the seed or a proposal, scored or discarded."""

    step: int
    text: str
    status: str  # "scored" | "unscored" | "discarded: <why>" | "skipped: budget"
    score: float | None = None
    per_value: dict[str, float | None] = field(default_factory=dict)
    n_scored: int = 0
    cost: int = 0  # requests spent scoring it

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class OproResult:
    instruction: str
    best_score: float | None
    spent: int
    max_calls: int
    steps: int
    stop_reason: str
    trajectory: list[Entry]
    fingerprint: str = ""

    def to_json(self) -> dict:
        return {
            "instruction": self.instruction,
            "best_score": self.best_score,
            "spent": self.spent,
            "max_calls": self.max_calls,
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "trajectory": [e.to_json() for e in self.trajectory],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, d: dict) -> "OproResult":
        return cls(
            instruction=d["instruction"], best_score=d["best_score"], spent=d["spent"],
            max_calls=d["max_calls"], steps=d["steps"], stop_reason=d["stop_reason"],
            trajectory=[Entry(**e) for e in d["trajectory"]], fingerprint=d.get("fingerprint", ""),
        )


def budget_from_run(run_dir: str | Path) -> int:
    """PICACO's spend in requests (backend calls + cache hits, all roles) from its accounting.json."""
    path = Path(run_dir) / "accounting.json"
    try:
        total = json.loads(path.read_text(encoding="utf-8"))["total"]
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is {run_dir} a finished PICACO run directory?)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable accounting ({e})") from None
    return int(total.get("calls", 0)) + int(total.get("cache_hits", 0))


def requests_made(accounting: Accounting) -> int:
    total = accounting.total()
    return total.calls + total.cache_hits


# -- the meta-prompt -------------------------------------------------------------------------------


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def format_score(score: float) -> str:
    return f"{score:.2f}"


def trajectory_for_prompt(trajectory: Sequence[Entry], history: int) -> list[Entry]:
    """The `history` best scored instructions, in ascending order of score (the best last, as OPRO
    does: the model reads the trend). Equal scores keep the order they were found in."""
    scored = [e for e in trajectory if e.score is not None]
    best = sorted(scored, key=lambda e: -e.score)[:history]  # stable: earlier first among ties
    return sorted(best, key=lambda e: e.score)


def build_meta_prompt(
    value_set, trajectory: Sequence[Entry], exemplars: Sequence[str], *, history: int, max_words: int,
    system_template: str | None = None,
) -> tuple[Message, ...]:
    parts = [
        "Your task is to write a system prompt for an AI assistant so that its answers honour all of "
        "these values together:"
    ]
    for i, v in enumerate(value_set.values, 1):
        parts.append(f"{i}. {v.title}: {_clip(v.definition, 300)}")
    parts += [
        "",
        "Below are earlier system prompts with their scores. A score is the mean rating, from 1 to 5, "
        "that a judge gave the assistant's answers on these values; higher is better. The prompts are "
        "in ascending order of score.",
    ]
    for e in trajectory_for_prompt(trajectory, history):
        parts += ["", "Prompt:", e.text.strip(), f"Score: {format_score(e.score)}"]
    if exemplars:
        parts += ["", "Examples of user messages the assistant must answer:"]
        parts += [f"- {_clip(q, EXAMPLE_CHARS)}" for q in exemplars]
    if system_template:
        parts += ["", fixed_part_note(system_template)]
    parts += [
        "",
        "Write a new system prompt that is different from all the prompts above and would score "
        f"higher than all of them. Use at most {max_words} words. Reply with the new system prompt only.",
    ]
    return (Message("system", META_SYSTEM), Message("user", "\n".join(parts)))


_SCORE_LINE = re.compile(r"^\s*score\s*:.*$", re.IGNORECASE | re.MULTILINE)


def parse_proposal(raw: str) -> str:
    """The instruction inside a proposal; drops a copied "Score:" line and what follows it."""
    return read_proposal(raw)[0]


def read_proposal(raw: str) -> tuple[str, bool]:
    """The instruction inside a proposal, and whether it ended before the reply did (its wrapper
    closed, commentary or a copied "Score:" line followed it: `proposer.parse_reply`)."""
    from picaco.optimize.proposer import parse_reply

    text, ended = parse_reply(raw)
    m = _SCORE_LINE.search(text)
    if m:
        text, ended = text[: m.start()], True
    text = re.sub(r"^\s*prompt\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip(), ended


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def check_proposal(text: str, finish_reason: str, seen: set[str], max_chars: int, *, ended: bool = False) -> str:
    """Why a parsed proposal is discarded ('' when it is kept). A reply cut by the length cap is
    truncated unless the instruction had `ended` before the cut."""
    if finish_reason == "length" and not ended:
        return "truncated"
    if len(text) < MIN_CHARS or not re.search(r"[A-Za-z]", text):
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if _normalize(text) in seen:
        return "duplicate"
    return ""


# -- the method ------------------------------------------------------------------------------------


class Opro(SearchMethod):
    kind = "opro"

    def __init__(self, *, name: str = "OPRO", **kwargs):
        super().__init__(name=name, **kwargs)
        self.result: OproResult | None = None

    def describe(self, value_set) -> dict:
        d = super().describe(value_set)
        r = self.result
        d["provenance"] = {
            "best_score": r.best_score, "spent": r.spent, "max_calls": r.max_calls, "steps": r.steps,
            "stop_reason": r.stop_reason, "instructions_scored": sum(e.score is not None for e in r.trajectory),
            "params": asdict(self.params), "judge": self.optimized_against,
            "optimizer": self.optimizer.backend.identity(),
        }
        return d

    # -- the search --------------------------------------------------------------------------------
    def _fingerprint(self, target: LLMClient, value_set) -> str:
        return fingerprint({
            "params": asdict(self.params), "seed": self._seed_text(value_set),
            "values": value_set.fingerprint(), "queries": [q.id for q in self.minibatch()],
            "target": target.identity(), "optimizer": self.optimizer.backend.identity(),
            "judge": self.optimized_against,
        })

    async def prepare(self, target: LLMClient, value_set) -> None:
        if self.result is not None:
            return
        fp = self._fingerprint(target, value_set)
        stored = self._load(fp)
        if stored is not None:
            self.result = stored
            return
        self.result = await self.search(target, value_set)
        self.result.fingerprint = fp
        self._save(self.result)

    async def score_instruction(self, target: LLMClient, value_set, text: str, queries: Sequence[Query]):
        """(score, per-value means, responses scored) of one instruction on the minibatch."""
        p = self.params
        samples = []
        for q in queries:
            samples.append(
                target.generate(
                    chat(text, q.text), n=p.samples_per_query, seed=p.seed,
                    temperature=p.response_temperature, max_tokens=p.max_new_tokens,
                )
            )
        outs = await asyncio.gather(*samples)
        items = [(q.text, c.text.strip()) for q, cs in zip(queries, outs) for c in cs]
        scores = await self.judge.score(value_set, items)
        ids = value_set.ids
        ratings = np.array(
            [[s[v].rating if s[v].rating is not None else np.nan for v in ids] for s in scores],
            dtype=np.float64,
        ).reshape(len(items), len(ids))
        means = value_means(ratings)
        score = overall_mean(means)
        per_value = {v: (float(m) if np.isfinite(m) else None) for v, m in zip(ids, means)}
        n_scored = int(np.isfinite(ratings).any(axis=1).sum())
        return (float(score) if np.isfinite(score) else None), per_value, n_scored

    async def search(self, target: LLMClient, value_set) -> OproResult:
        p = self.params
        acct = self.accounting or target.accounting
        for role, client in (("optimizer", self.optimizer), ("judge", getattr(self.judge, "client", None))):
            if client is not None and client.accounting is not acct:
                raise ConfigError(f"OPRO counts its spend on one Accounting: the {role} client uses another")
        start = requests_made(acct)
        log = _Trajectory(self.state_dir, self._fingerprint(target, value_set))

        def spent() -> int:
            # requests of this process plus what the replayed scorings cost when they were made
            return requests_made(acct) - start + log.replayed_cost

        batch = self.minibatch()
        if p.max_calls < len(batch) * p.samples_per_query:
            raise ConfigError(
                f"OPRO budget of {p.max_calls} calls cannot score even the seed instruction "
                f"({len(batch) * p.samples_per_query} target samples before any judging)"
            )
        exemplars = [q.text for q in batch[: p.exemplars]]
        trajectory: list[Entry] = []
        seen: set[str] = set()
        max_words = max(20, p.instruction_max_chars // 7)

        async def score(step: int, text: str) -> Entry:
            entry = log.replay_scored(step, text)  # scored before a kill: not scored again
            if entry is None:
                before = spent()
                s, per_value, n = await self.score_instruction(target, value_set, text, batch)
                entry = Entry(step, text, "scored" if s is not None else "unscored", s, per_value, n,
                              spent() - before)
                log.record(entry)
            trajectory.append(entry)
            seen.add(_normalize(text))
            return entry

        stop_reason, step = "max_steps", 0
        try:
            first = await score(0, self._seed_text(value_set))
            cost_eval = max(1, first.cost)  # the costliest scoring so far
            barren = 0
            while True:
                if p.max_steps is not None and step >= p.max_steps:
                    stop_reason = "max_steps"
                    break
                affordable = (p.max_calls - spent()) // (1 + cost_eval)
                if affordable < 1:
                    stop_reason = "budget"
                    break
                step += 1
                messages = build_meta_prompt(
                    value_set, trajectory, exemplars, history=p.history, max_words=max_words,
                    system_template=getattr(target, "system_template", None),
                )
                proposals = await self.optimizer.generate(
                    messages, n=min(p.candidates_per_step, affordable),
                    temperature=p.optimizer_temperature, max_tokens=p.optimizer_max_tokens,
                    seed=p.seed + 1000 * step,
                )
                scored_now = 0
                for c in proposals:
                    text, ended = read_proposal(c.text)
                    why = check_proposal(text, c.finish_reason, seen, p.instruction_max_chars, ended=ended)
                    if why:
                        entry = Entry(step, text, f"discarded: {why}")
                        trajectory.append(entry)
                        log.record(entry)
                        continue
                    if spent() + cost_eval > p.max_calls:
                        entry = Entry(step, text, "skipped: budget")
                        trajectory.append(entry)
                        log.record(entry)
                        continue
                    e = await score(step, text)
                    cost_eval = max(cost_eval, e.cost)
                    scored_now += e.score is not None
                barren = 0 if scored_now else barren + 1
                if barren >= p.patience:
                    stop_reason = "no_new_instructions"
                    break
        except BudgetExhausted:
            stop_reason = "budget (hard cap of the run)"
        self.calls_spent += requests_made(acct) - start

        candidates = [e for e in trajectory if e.score is not None]
        if candidates:
            best = max(candidates, key=lambda e: e.score)  # first found wins a tie: the seed first
            instruction, best_score = best.text, best.score
        else:
            instruction, best_score = self._seed_text(value_set), None
        return OproResult(instruction, best_score, spent(), p.max_calls, step, stop_reason, trajectory)

    # -- state on disk ---------------------------------------------------------------------------
    def _save(self, result: OproResult) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.state_dir / "instruction.txt", result.instruction + "\n")
        _write_atomic(self.state_dir / "result.json",
                      json.dumps(result.to_json(), ensure_ascii=False, indent=1, sort_keys=True))

    def _load(self, fp: str) -> OproResult | None:
        if self.state_dir is None:
            return None
        path = self.state_dir / "result.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("fingerprint") != fp:
            return None  # another search's result: search again (the call cache makes it cheap)
        return OproResult.from_json(data)


# -- the search's record on disk -------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Trajectory:
    """`trajectory.jsonl` in the state directory: one entry per instruction seen, appended as the
    search goes. A rerun after a kill (same fingerprint, kept in `search.json`) replays the scored
    entries in order instead of scoring them again, and appends only what is new, so the records
    written before the kill stay as they are. The proposals themselves are requested again (from the
    call cache when it is on); if they come out differently, the stored entries from the first
    difference on are dropped and the search goes on from there."""

    def __init__(self, state_dir: Path | None, fp: str):
        self.path = None if state_dir is None else state_dir / "trajectory.jsonl"
        self.stored: list[dict] = []
        self.cursor = 0
        self.replayed_cost = 0
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        marker = state_dir / "search.json"
        try:
            same = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fp
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            same = False
        if same and self.path.exists():
            drop_partial_tail(self.path)
            # "\n" only: the entries' text may hold U+2028 and the like (written with ensure_ascii=False)
            self.stored = [json.loads(line) for line in self.path.read_text(encoding="utf-8").split("\n")
                           if line.strip()]
        else:
            self._truncate(0)
            _write_atomic(marker, json.dumps({"fingerprint": fp}))

    def replay_scored(self, step: int, text: str) -> Entry | None:
        if self.cursor >= len(self.stored):
            return None
        d = self.stored[self.cursor]
        if d.get("step") != step or d.get("text") != text or d.get("status") not in ("scored", "unscored"):
            return None
        self.cursor += 1
        entry = Entry(**d)
        self.replayed_cost += entry.cost
        return entry

    def record(self, entry: Entry) -> None:
        if self.path is None:
            return
        data = entry.to_json()
        if self.cursor < len(self.stored):
            if self.stored[self.cursor] == data:
                self.cursor += 1  # already on disk
                return
            self._truncate(self.cursor)  # the search went another way than before the kill
        append_lines(self.path, [data])

    def _truncate(self, keep: int) -> None:
        lines = []
        if self.path is not None and self.path.exists():
            lines = [line + "\n" for line in self.path.read_text(encoding="utf-8").split("\n")[:-1]][:keep]
        _write_atomic(self.path, "".join(lines))
        self.stored = self.stored[:keep]
        self.cursor = keep

"""Read a run directory and derive what the report shows: pure functions over its records.

Scores in the report are mean judge ratings on the 1–5 scale (the scale the evaluation harness
reports), computed from `responses.jsonl`. "Seed" and "final" are compared on the same queries with
the same sampling seeds: responses of the seed instruction and of the final instruction are paired by
(query id, seed), which is how the engine samples its final check.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from picaco.llm.base import fill_template
from picaco.errors import DataError, PicacoError
from picaco.optimize.rundir import JSONL_FILES, RunDir, instruction_hash, is_no_instruction_result

RATING_MIN, RATING_MAX = 1.0, 5.0


def rating_of(score: Mapping | None) -> float | None:
    """A response's 1–5 rating of one value; from q_ω (r = 1 + 4q) when only the probability is stored."""
    if not score:
        return None
    if score.get("rating") is not None:
        return float(score["rating"])
    if score.get("prob") is not None:
        return 1.0 + 4.0 * float(score["prob"])
    return None


def mean_or_none(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def value_means(responses: Sequence[Mapping], value_ids: Sequence[str]) -> dict[str, float | None]:
    """Mean rating per value over the responses that have a rating for it."""
    return {v: mean_or_none(rating_of(r.get("scores", {}).get(v)) for r in responses) for v in value_ids}


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One query answered under the seed and under the final instruction with the same seed."""

    query_id: str
    seed: int
    before: dict
    after: dict

    def gain(self, value_id: str) -> float | None:
        a = rating_of(self.before.get("scores", {}).get(value_id))
        b = rating_of(self.after.get("scores", {}).get(value_id))
        return None if a is None or b is None else b - a


@dataclass
class RunData:
    path: Path
    config: dict
    provenance: dict | None
    result: dict | None
    accounting: dict
    events: list[dict]
    rounds: list[dict]
    candidates: list[dict]
    responses: list[dict]
    value_ids: list[str]
    titles: dict[str, str]
    weights: dict[str, float]
    seed_instruction: str
    final_instruction: str
    #: where the final instruction comes from: "final" (result.json) or "latest" (last round so far)
    final_kind: str
    query_texts: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def returned_no_instruction(self) -> bool:
        """The finished run's final check found the bare model better: no instruction is the result."""
        return is_no_instruction_result(self.result)

    @property
    def _target_identity(self) -> dict:
        """The target's identity as the run's fingerprint recorded it (its deployment included)."""
        return (self.config.get("fingerprint") or {}).get("target") or {}

    @property
    def system_template(self) -> str | None:
        """The fixed system prompt the instruction was optimized in (`system_template`), if any."""
        return self._target_identity.get("system_template")

    @property
    def prior_turns(self) -> list[dict]:
        """The example exchanges the instruction was optimized over (`prior_turns`), if any."""
        return list(self._target_identity.get("prior_turns") or [])

    @property
    def deployed_prompt(self) -> str | None:
        """What to deploy when there is a template: the template with the instruction in its slot."""
        template = self.system_template
        return fill_template(template, self.final_instruction) if template else None

    @property
    def seed_hash(self) -> str:
        return instruction_hash(self.seed_instruction)

    @property
    def final_hash(self) -> str:
        return instruction_hash(self.final_instruction)

    def title(self, value_id: str) -> str:
        return self.titles.get(value_id) or value_id.replace("_", " ").capitalize()


def load_run(path: Path | str) -> RunData:
    """Everything the report needs from a run directory, finished or not."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory")
    rundir = RunDir(path)  # read only: no open(), so no lock is taken and a live run is not disturbed
    config = rundir.read_json("config.json")
    if config is None:
        if any((path / n).exists() for n in JSONL_FILES):
            raise DataError(f"{path} holds run records but no config.json: not a complete run directory")
        raise DataError(f"{path} is not a picaco run directory (no config.json)")
    provenance = rundir.read_json("provenance.json")
    result = rundir.read_json("result.json")
    rounds = sorted(rundir.records("rounds.jsonl"), key=lambda r: int(r["round"]))
    responses = rundir.records("responses.jsonl")
    fingerprint = config.get("fingerprint", {})
    seed = (result or {}).get("seed_instruction") or fingerprint.get("seed_instruction", "")
    if result is not None:
        final, final_kind = result["instruction"], "final"
    elif rounds:
        final, final_kind = rounds[-1]["instruction"], "latest"
    else:
        final, final_kind = seed, "latest"
    bundled = _bundled_value_set(fingerprint.get("value_set", {}))
    value_ids = _value_ids(provenance, bundled, rounds, responses)
    return RunData(
        path=path,
        config=config,
        provenance=provenance,
        result=result,
        accounting=rundir.read_json("accounting.json") or {},
        events=rundir.records("events.jsonl"),
        rounds=rounds,
        candidates=rundir.records("candidates.jsonl"),
        responses=responses,
        value_ids=value_ids,
        titles={v.id: v.title for v in bundled.values} if bundled else {},
        weights={v: float(((provenance or {}).get("value_set", {}).get("weights") or {}).get(v, 1.0))
                 for v in value_ids},
        seed_instruction=seed,
        final_instruction=final,
        final_kind=final_kind,
        query_texts=_query_texts(config),
    )


def _value_ids(provenance: dict | None, bundled, rounds: list[dict], responses: list[dict]) -> list[str]:
    ids = ((provenance or {}).get("value_set") or {}).get("ids")
    if ids:
        return list(ids)
    if bundled is not None:
        return list(bundled.ids)
    # an unfinished run has no provenance: the values are the keys of the recorded scores
    seen: dict[str, None] = {}
    for r in rounds:
        seen.update(dict.fromkeys(r.get("pool_means") or {}))
    for r in responses:
        seen.update(dict.fromkeys(r.get("scores") or {}))
    return list(seen)


def _bundled_value_set(value_set: Mapping):
    """The run's value set when it is a bundled one, unchanged since (same fingerprint); else None."""
    from picaco.values import bundled_value_sets, load_value_set

    name = value_set.get("name")
    if not name or name not in bundled_value_sets():
        return None
    try:
        loaded = load_value_set(name)
    except PicacoError:
        return None
    return loaded if loaded.fingerprint() == value_set.get("fingerprint") else None


def _query_texts(config: Mapping) -> dict[str, str]:
    """The run's query texts. The run directory stores only query ids and a hash of (id, text), so
    the texts are looked up in the bundled query sets and used only when they reproduce that hash
    (the report shows query ids otherwise; `write_report(queries=...)` can supply them)."""
    ids = config.get("query_ids") or []
    want = (config.get("fingerprint", {}).get("queries") or {}).get("sha256")
    if not ids or not want:
        return {}
    from picaco.data.queries import bundled_query_sets, load_queries

    sources: list[str] = []
    run_config = config.get("run_config")
    if isinstance(run_config, Mapping) and isinstance(run_config.get("queries"), str):
        sources.append(run_config["queries"])  # the set or file the run was started with
    sources += [s for s in bundled_query_sets() if s not in sources]
    for name in sources:
        try:
            known = {q.id: q.text for q in load_queries(name)}
        except (PicacoError, OSError):
            continue
        if not all(i in known for i in ids):
            continue
        if queries_sha256([(i, known[i]) for i in ids]) == want:
            return {i: known[i] for i in ids}
    return {}


def queries_sha256(id_text: Sequence[tuple[str, str]]) -> str:
    """The engine's fingerprint of the query list (picaco.optimize.engine.Engine.fingerprint)."""
    blob = json.dumps([[i, t] for i, t in id_text], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


# -- derived views ------------------------------------------------------------------------------------


def scored(responses: Iterable[dict]) -> list[dict]:
    return [r for r in responses if r.get("scores")]


def pairs(run: RunData) -> list[Pair]:
    """Seed-instruction and final-instruction responses with the same (query, seed), in query order."""
    before = {(r["query_id"], r["seed"]): r for r in scored(run.responses)
              if r["instruction_hash"] == run.seed_hash}
    after = {(r["query_id"], r["seed"]): r for r in scored(run.responses)
             if r["instruction_hash"] == run.final_hash}
    keys = [k for k in before if k in after]
    return [Pair(q, s, before[(q, s)], after[(q, s)]) for q, s in keys]


@dataclass
class Scores:
    seed: dict[str, float | None]
    final: dict[str, float | None]
    #: responses per side; paired means both sides answered the same queries with the same seeds
    n_seed: int
    n_final: int
    paired: bool


def seed_final_scores(run: RunData, matched: list[Pair]) -> Scores:
    if matched:
        return Scores(value_means([p.before for p in matched], run.value_ids),
                      value_means([p.after for p in matched], run.value_ids),
                      len(matched), len(matched), True)
    # no common seeds yet (a run stopped before its final check): every scored response of each
    seed_side = [r for r in scored(run.responses) if r["instruction_hash"] == run.seed_hash]
    final_side = [r for r in scored(run.responses) if r["instruction_hash"] == run.final_hash]
    return Scores(value_means(seed_side, run.value_ids), value_means(final_side, run.value_ids),
                  len(seed_side), len(final_side), False)


def overall(means: Mapping[str, float | None]) -> float | None:
    """The unweighted mean over values of the per-value means (the evaluation's mean conformity);
    None when no value is scored."""
    return mean_or_none(means.values())


def round_means(run: RunData) -> dict[int, dict[str, float | None]]:
    """Per round, the mean rating per value of the responses sampled under the instruction in use
    (the enhancement phase); rounds without responses fall back to the round record's q_ω means."""
    by_round: dict[int, list[dict]] = {}
    for r in scored(run.responses):
        if r.get("phase") == "enhance":
            by_round.setdefault(int(r["round"]), []).append(r)
    out = {t: value_means(rs, run.value_ids) for t, rs in sorted(by_round.items())}
    for rec in run.rounds:
        t = int(rec["round"])
        probs = rec.get("sampled_means_previous") or {}
        if t not in out and probs:
            out[t] = {v: None if probs.get(v) is None else 1.0 + 4.0 * probs[v] for v in run.value_ids}
    return dict(sorted(out.items()))


@dataclass
class CandidateRow:
    round: int
    label: str  # "current" or "#i"
    text: str
    status: str  # chosen | competed (scored, not chosen) | discarded | pending
    reason: str
    score: float | None
    raw: str = ""


def candidate_history(run: RunData) -> list[CandidateRow]:
    """Per round: the incumbent and every proposal, with its verdict, its score and which was chosen."""
    scores: dict[tuple[int, str], float | None] = {}
    for c in run.candidates:
        if c.get("kind") == "score" and str(c.get("tag", "")).startswith("round"):
            scores[(int(c["round"]), c["instruction_hash"])] = c.get("score")
    verdicts: dict[int, list[dict]] = {}
    proposals: dict[int, list[dict]] = {}
    for c in run.candidates:
        if c.get("kind") == "verdict":
            verdicts.setdefault(int(c["round"]), []).append(c)
        elif c.get("kind") == "proposal":
            proposals.setdefault(int(c["round"]), []).append(c)
    rows: list[CandidateRow] = []
    incumbent = run.seed_instruction
    recorded = {int(r["round"]): r for r in run.rounds}
    for t in sorted(set(recorded) | set(verdicts) | set(proposals)):
        rec = recorded.get(t)
        chosen_hash = rec["instruction_hash"] if rec else None
        if rec and rec.get("previous_hash") != instruction_hash(incumbent):
            incumbent = _instruction_by_hash(run, rec["previous_hash"]) or incumbent
        ihash = instruction_hash(incumbent)
        rows.append(CandidateRow(t, "current", incumbent,
                                 "chosen" if chosen_hash == ihash else "competed" if rec else "pending",
                                 "", scores.get((t, ihash))))
        judged = {int(v["index"]) for v in verdicts.get(t, [])}
        for v in sorted(verdicts.get(t, []), key=lambda v: int(v["index"])):
            vhash = v.get("instruction_hash")
            status = ("chosen" if rec and rec.get("changed") and vhash == chosen_hash
                      else "discarded" if not v.get("kept") else "competed" if rec else "pending")
            label = f"#{int(v['index']) + 1}" + (f" {v['source']}" if v.get("source") in ("grounded", "examples") else "")
            rows.append(CandidateRow(t, label, v.get("text") or v.get("raw", ""),
                                     status, v.get("reason") or v.get("note") or "",
                                     scores.get((t, vhash)) if vhash else None, v.get("raw", "")))
        for p in sorted(proposals.get(t, []), key=lambda p: int(p["index"])):
            if int(p["index"]) not in judged:  # proposed, not yet checked (the run stopped here)
                rows.append(CandidateRow(t, f"#{int(p['index']) + 1}", p.get("raw", ""), "pending",
                                         "not checked yet", None, p.get("raw", "")))
        if rec:
            incumbent = rec["instruction"]
    return rows


def _instruction_by_hash(run: RunData, ihash: str) -> str | None:
    for r in run.rounds:
        if r.get("instruction_hash") == ihash:
            return r["instruction"]
    for c in run.candidates:
        if c.get("instruction_hash") == ihash and (c.get("instruction") or c.get("text")):
            return c.get("instruction") or c.get("text")
    return None


@dataclass
class Example:
    value_id: str
    why: str  # "largest gain" | "lowest after"
    pair: Pair


def weakest_values(means: Mapping[str, float | None], k: int) -> list[str]:
    scored_values = [(m, v) for v, m in means.items() if m is not None]
    return [v for _, v in sorted(scored_values)[:k]]


def examples(matched: list[Pair], value_ids: Sequence[str], per_value: int = 2) -> list[Example]:
    """For each value: the pair whose rating rose the most, then the pair rated lowest after."""
    out: list[Example] = []
    for v in value_ids:
        usable = [p for p in matched if p.gain(v) is not None]
        if not usable:
            continue
        picked: list[Example] = []
        best = max(usable, key=lambda p: (p.gain(v), p.query_id))
        if best.gain(v) > 0:
            picked.append(Example(v, "largest gain", best))
        lowest = min(usable, key=lambda p: (rating_of(p.after["scores"].get(v)), p.query_id))
        if all(e.pair is not lowest for e in picked):
            picked.append(Example(v, "lowest after", lowest))
        out.extend(picked[:per_value])
    return out


# -- how precise the run's decisions were -----------------------------------------------------------


def mean_rating(response: Mapping, value_ids: Sequence[str] | None = None) -> float | None:
    """One response's unweighted mean rating over the values it was scored on (or `value_ids`)."""
    scores = response.get("scores") or {}
    return mean_or_none(rating_of(scores.get(v)) for v in (value_ids if value_ids is not None else scores))


def paired_differences(responses: Iterable[Mapping]) -> list[dict[tuple[str, int], float]]:
    """Per round and candidate, {(query id, seed): candidate − incumbent} in mean rating.

    In sampling mode each round samples the incumbent (phase "enhance") and every candidate on the
    same (query, seed) pairs, so the differences are paired; likelihood-mode rounds give none."""
    by: dict[tuple[int, str, str], dict[tuple[str, int], float]] = {}
    for r in responses:
        if r.get("phase") in ("enhance", "candidate"):
            m = mean_rating(r)
            if m is not None:
                by.setdefault((r["round"], r["phase"], r["instruction_hash"]), {})[(r["query_id"], r["seed"])] = m
    incumbents = {rnd: vals for (rnd, phase, _), vals in by.items() if phase == "enhance"}
    out = []
    for (rnd, phase, _), cand in sorted(by.items()):
        inc = incumbents.get(rnd)
        if phase == "candidate" and inc:
            shared = [k for k in cand if k in inc]
            if shared:
                out.append({k: cand[k] - inc[k] for k in shared})
    return out


@dataclass(frozen=True)
class DecisionNoise:
    """The spread of candidate − incumbent differences, split as d[q, s] = mu + a[q] + e[q, s]:
    var_query (how much an instruction's effect depends on the query) and var_sample (sampling)."""

    var_query: float
    var_sample: float
    n_queries: int
    n_samples: int
    candidates: int

    def se(self, n_queries: int | None = None, n_samples: int | None = None) -> float:
        """Standard error of one decision's mean difference on n_queries × n_samples (default: the
        run's own). var_query does not shrink with more samples of the same queries."""
        nq = n_queries or self.n_queries
        ns = n_samples or self.n_samples
        return math.sqrt(self.var_query / nq + self.var_sample / (nq * ns))

    def queries_for(self, se: float, n_samples: int = 2) -> int:
        """Queries per decision (at n_samples each) for a standard error of `se`."""
        return math.ceil((self.var_query + self.var_sample / n_samples) / se ** 2)


def decision_noise(diffs: Sequence[Mapping[tuple[str, int], float]]) -> DecisionNoise | None:
    """Method-of-moments variance components pooled over candidates; None with too few pairs."""
    within, between, n_s_all, n_q_all = [], [], [], []
    for d in diffs:
        per_query: dict[str, list[float]] = {}
        for (q, _), x in d.items():
            per_query.setdefault(q, []).append(x)
        groups = [v for v in per_query.values() if len(v) >= 2]
        if len(groups) < 2:
            continue
        n_s = min(len(g) for g in groups)
        groups = [g[:n_s] for g in groups]
        means = [sum(g) / n_s for g in groups]
        within.append(sum(_variance(g) for g in groups) / len(groups))
        between.append(_variance(means))
        n_s_all.append(n_s)
        n_q_all.append(len(groups))
    if not within:
        return None
    var_sample = sum(within) / len(within)
    n_s = round(sum(n_s_all) / len(n_s_all))
    return DecisionNoise(
        var_query=max(0.0, sum(between) / len(between) - var_sample / n_s), var_sample=var_sample,
        n_queries=round(sum(n_q_all) / len(n_q_all)), n_samples=n_s, candidates=len(within))


def _variance(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


@dataclass(frozen=True)
class Gain:
    """Final − seed mean rating over the paired responses, with a t interval over queries."""

    mean: float
    low: float
    high: float
    n_queries: int
    #: measured on queries the rounds never saw (the final check's `final_queries`), not optimistic
    held_out: bool = False


def paired_gain(matched: Sequence[Pair], value_ids: Sequence[str], confidence: float = 0.95) -> Gain | None:
    """The seed → final gain per query (mean over its samples), t interval across queries."""
    per_query: dict[str, list[float]] = {}
    for p in matched:
        a, b = mean_rating(p.before, value_ids), mean_rating(p.after, value_ids)
        if a is not None and b is not None:
            per_query.setdefault(p.query_id, []).append(b - a)
    means = [sum(v) / len(v) for v in per_query.values()]
    if len(means) < 2:
        return None
    from scipy.stats import t  # only here: the report's other numbers need no scipy

    centre = sum(means) / len(means)
    half = t.ppf(0.5 + confidence / 2, len(means) - 1) * math.sqrt(_variance(means) / len(means))
    return Gain(centre, centre - half, centre + half, len(means))


def gain_and_noise(run: RunData, matched: list[Pair] | None = None) -> tuple[Gain | None, DecisionNoise | None]:
    """The seed → final gain (None unless paired and changed) and the run's decision noise.
    `matched`: the run's `pairs`, when the caller has them already."""
    matched = pairs(run) if matched is None else matched
    gain = paired_gain(matched, run.value_ids) if matched and run.final_hash != run.seed_hash else None
    held = set((run.provenance or {}).get("final_queries") or [])
    if gain is not None and held and {p.query_id for p in matched} <= held:
        gain = replace(gain, held_out=True)
    return gain, decision_noise(paired_differences(run.responses))


def gain_noise_summary(gain: Gain | None, noise: DecisionNoise | None) -> str | None:
    """One plain-text line for the command line: the gain, the noise, and whether to trust it."""
    parts = []
    if gain is not None:
        where = ("queries no round saw (95%)" if gain.held_out
                 else "training queries (95%, optimistic)")
        parts.append(f"gain {gain.mean:+.2f} [{gain.low:+.2f}, {gain.high:+.2f}] over {gain.n_queries} {where}")
    if noise is not None:
        parts.append(f"one decision's standard error {noise.se():.2f} ({noise.n_queries} queries x "
                     f"{noise.n_samples} samples)")
    if not parts:
        return None
    line = "; ".join(parts)
    if gain is not None and gain.low <= 0:
        line += ": within the noise, check it with `picaco evaluate` on held-out queries"
    return line


# -- compared methods ---------------------------------------------------------------------------------


def read_compare(compare) -> Mapping | None:
    """The compared methods' scores as a mapping: `compare` itself, or the JSON file it names."""
    if compare is None or isinstance(compare, Mapping):
        return compare
    p = Path(compare)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"compare: {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"compare: {p} is not valid JSON ({e.msg})") from None


@dataclass(frozen=True)
class HeldOutPair:
    """The focus method against another on the evaluation's held-out queries (its summary's tests)."""

    other: str
    other_mean: float | None
    difference: float | None  # mean over queries of (focus − other)
    p_holm: float | None
    #: queries a paired test needs to tell them apart 80% of the time (None: no difference; the
    #: summary predates the column when `known` is False)
    queries_for_power: int | None
    known: bool


def held_out_pairs(compare: Mapping | None, focus: str = "PICACO") -> list[HeldOutPair]:
    """The pairwise tests of `focus` in an evaluation summary (`summary.json`), best other method
    first; [] when the mapping has none (per-value scores alone, or no `focus` among the methods)."""
    if not isinstance(compare, Mapping) or not isinstance(compare.get("friedman"), Mapping):
        return []
    methods = compare.get("methods") if isinstance(compare.get("methods"), Mapping) else {}
    rows = []
    for p in compare["friedman"].get("pairs") or []:
        if not isinstance(p, Mapping) or focus not in (p.get("a"), p.get("b")) or p.get("a") == p.get("b"):
            continue
        other = p["b"] if p["a"] == focus else p["a"]
        sign = 1.0 if p["a"] == focus else -1.0  # the summary's difference is a − b
        diff = p.get("mean_difference")
        mean = (methods.get(other) or {}).get("mean") if isinstance(methods.get(other), Mapping) else None
        rows.append(HeldOutPair(str(other), mean, None if diff is None else sign * diff, p.get("p_holm"),
                                p.get("queries_for_power"), "queries_for_power" in p))
    return sorted(rows, key=lambda r: -(r.other_mean if r.other_mean is not None else -math.inf))


def load_compare(compare, value_ids: Sequence[str], value_set: Mapping | None = None,
                 ) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Other methods' per-value mean ratings (1–5) to draw beside the run.

    `compare` is a mapping or the path of a JSON file shaped ``{"methods": {name: {value_id: rating}}}``;
    a method may instead hold ``{"per_value": {value_id: rating}, ...}``, so the evaluation harness's
    `summary.json` works as it is, and a bare ``{name: {value_id: rating}}`` is accepted too.
    Returns the methods and notes about what was left out.
    """
    compare = read_compare(compare)
    if compare is None:
        return {}, []
    if not isinstance(compare, Mapping):
        raise DataError("compare: expected {\"methods\": {name: {value_id: mean_rating}}}")
    methods = compare.get("methods", compare)
    if not isinstance(methods, Mapping):
        raise DataError("compare: 'methods' must map a method name to {value_id: mean_rating}")
    out: dict[str, dict[str, float | None]] = {}
    notes: list[str] = []
    theirs = compare.get("value_set") if "methods" in compare else None
    if (isinstance(theirs, Mapping) and value_set and theirs.get("fingerprint")
            and theirs.get("fingerprint") != value_set.get("fingerprint")):
        notes.append(f"the compared scores are for value set {theirs.get('name', '?')!r} "
                     f"(fingerprint {theirs.get('fingerprint')}), not this run's "
                     f"{value_set.get('name', '?')!r} ({value_set.get('fingerprint')})")
    for name, scores in methods.items():
        if isinstance(scores, Mapping) and isinstance(scores.get("per_value"), Mapping):
            scores = scores["per_value"]
        if not isinstance(scores, Mapping):
            raise DataError(f"compare: method {name!r}: expected {{value_id: mean_rating}}")
        row: dict[str, float | None] = {}
        for v in value_ids:
            x = scores.get(v)
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise DataError(f"compare: method {name!r}, value {v!r}: {x!r} is not a number")
            if x is not None and not RATING_MIN <= float(x) <= RATING_MAX:
                raise DataError(f"compare: method {name!r}, value {v!r}: {x} is outside the 1–5 "
                                "rating scale")
            row[v] = None if x is None else float(x)
        missing = [v for v in value_ids if row[v] is None]
        extra = [k for k in scores if k not in value_ids]
        if missing:
            notes.append(f"{name}: no score for {', '.join(missing)}")
        if extra:
            notes.append(f"{name}: values not in this run ignored ({', '.join(map(str, extra))})")
        out[str(name)] = row
    return out, notes

"""Instruction proposals: the optimizer model's prompt, lenient parsing of what it writes, and the checks
that throw out unusable candidates.

Small optimizer models ignore requested output formats, so the prompt asks for plain text only and the
parser accepts tags, code fences, "Instruction:"-style prefixes, chatty preambles and quotes. A
candidate is discarded (and the reason counted) when it is empty, truncated, too long, a near-duplicate,
or leaks the meta-prompt (its phrases, its example markers, or text copied from the examples). A
sentence written for one training query is cut out, as is one that copies a meta-prompt phrase.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from picaco.data.queries import Query
from picaco.llm.base import Message, fill_template
from picaco.values import ValueSet

META_SYSTEM = (
    "You improve system prompts for an AI assistant. "
    "Reply with the improved system prompt only, with no explanation."
)

#: a text shorter than this after parsing counts as empty
MIN_CHARS = 15
#: how the optimizer is shown the slot of a `system_template`
TEMPLATE_MARK = "[INSTRUCTION]"
#: candidates at least this similar (difflib ratio on normalized text) are near-duplicates
NEAR_DUPLICATE = 0.95
#: this many consecutive words copied from an example response or query count as a leak
COPY_RUN = 8
#: a sentence that brings in this many content words of one training query, words found nowhere in
#: the value set, the seed or the current instruction, is tailored to that query (`tailored_to`)
TAILORED_WORDS = 2
#: words too common to tie a sentence to a query (words under four letters never count)
GENERIC_WORDS = frozenset("""
    about after also always another answer anyone asked assistant avoid being both could does doing
    done each every feel from give given good have help helpful information into just know like make
    many more most much must need never only other others people person please question really
    request response should some someone something such than that their them then there these they
    thing things this those through very want what when where which while will with without would
    your yours
""".split())
#: example texts are cut to this many characters in the meta-prompt (keeps it short for small models)
EXAMPLE_CHARS = 360

# Phrases of the meta-prompt that never belong in an instruction to the target.
LEAK_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (label, re.compile(rx, re.IGNORECASE | re.MULTILINE))
    for label, rx in (
        ("meta-prompt phrase 'system prompt'", r"\bsystem\s+prompts?\b"),
        ("meta-prompt phrase 'honoured least'", r"\bhonou?red\s+least\b"),
        ("meta-prompt phrase 'strong/weak answer'", r"\b(strong|weak)\s+answers?\b"),
        ("meta-prompt phrase 'repeats value words'", r"\brepeats?\s+value\s+words\b"),
        ("optimizer word 'candidate'", r"\bcandidates?\b"),
        ("optimizer word 'score'", r"\bscor(e|es|ed|ing)\b"),
        ("example marker 'Question:/Answer:'", r"^\s*(question|answer)\s*:"),
        ("prompt delimiter", r'"""|<<<|>>>'),
    )
)


@dataclass(frozen=True)
class Example:
    query: str
    response: str


@dataclass(frozen=True)
class ValueStanding:
    """A value as the optimizer sees it: its text and its mean conformity so far (None = no data)."""

    id: str
    title: str
    definition: str
    mean: float | None


def order_weakest_first(value_set: ValueSet, means: dict[str, float | None]) -> list[ValueStanding]:
    """Values sorted by mean pool conformity, lowest first; values without data keep set order last."""
    standings = [
        ValueStanding(v.id, v.title, v.definition.strip(), means.get(v.id)) for v in value_set.values
    ]
    order = {v.id: i for i, v in enumerate(value_set.values)}
    return sorted(
        standings,
        key=lambda s: (s.mean is None, s.mean if s.mean is not None else 0.0, order[s.id]),
    )


def _clip(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def build_meta_prompt(
    current: str,
    values: Sequence[ValueStanding],
    good: Sequence[Example],
    parroting: Sequence[Example],
    *,
    max_chars: int,
    n_weakest: int = 2,
    strategy: int = 0,
    system_template: str | None = None,
) -> tuple[Message, ...]:
    """The optimizer's (system, user) prompt, in plain words and short enough for a 1.5B model.

    With a `system_template` the optimizer is shown the fixed text around the instruction, so it
    writes only the part in the slot and does not restate or contradict the fixed part."""
    if system_template:
        fixed = fill_template(system_template, TEMPLATE_MARK)
        parts = ["The assistant's system prompt has a fixed part that stays as it is:", '"""', fixed, '"""',
                 f"and an instruction that goes where {TEMPLATE_MARK} stands. The current instruction:",
                 '"""', current.strip(), '"""', ""]
    else:
        parts = ["The assistant gets this system prompt:", '"""', current.strip(), '"""', ""]
    parts.append(
        "Its answers must honour all of these values in what they actually say and advise, "
        "not by naming them:"
    )
    for i, v in enumerate(values, 1):
        parts.append(f"{i}. {v.title}: {_clip(v.definition, 300)}")
    weakest = [v.title for v in values if v.mean is not None][:n_weakest]
    if weakest:
        parts.append(f"Honoured least so far: {', '.join(weakest)}.")
    for ex in good:
        parts += ["", "A strong answer (keep this behaviour):",
                  f"Question: {_clip(ex.query, 200)}", f"Answer: {_clip(ex.response)}"]
    for ex in parroting:
        parts += ["", "A weak answer that repeats value words instead of helping (avoid this):",
                  f"Question: {_clip(ex.query, 200)}", f"Answer: {_clip(ex.response)}"]
    max_words = max(20, max_chars // 7)
    directive = STRATEGIES[strategy % len(STRATEGIES)].format(max_words=max_words)
    if system_template:
        directive = directive.replace("system prompt", "instruction")
        ending = " Do not repeat the fixed part. Reply with the new instruction only."
    else:
        ending = " Reply with the new system prompt only."
    parts += ["", directive + ' Address the assistant as "you".' + ending]
    return (Message("system", META_SYSTEM), Message("user", "\n".join(parts)))


def fixed_part_note(system_template: str | None) -> str:
    """For an optimizer whose text fills the slot of a `system_template`: the fixed text around it,
    with the slot marked ("" without a template). OPRO's and GEPA's prompts use it."""
    if not system_template:
        return ""
    return (f"The system prompt you write goes into this fixed text, where {TEMPLATE_MARK} stands; the "
            f'rest stays as it is:\n"""\n{fill_template(system_template, TEMPLATE_MARK)}\n"""\n'
            "Do not repeat the fixed text.")


#: How each of the C proposals of a round is asked to change the instruction. Asking every
#: proposal the same way makes small optimizer models return near-copies of the current
#: instruction (measured on the cpu preset with the 1.5B optimizer: every proposal of a round was a
#: paraphrase); different directions give the refinement step real alternatives to choose from.
STRATEGIES: tuple[str, ...] = (
    "Write a better system prompt of at most {max_words} words that makes every answer helpful "
    "and honour all the values, most of all those honoured least.",
    "Rewrite the system prompt, in at most {max_words} words, as a few concrete rules that say "
    "what the assistant does in its answers for each value (what to include, check or avoid), "
    "most of all for the values honoured least. Do not just list the value names.",
    "Write a new system prompt from scratch, in at most {max_words} words and in a different "
    "style: describe who the assistant is and how it answers, so that every value shows in the "
    "substance of its answers. Do not list the value names.",
)


# -- lenient parsing ---------------------------------------------------------------------------------

_FENCE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_TAG = re.compile(
    r"<\s*(instruction|new_instruction|system_prompt|system prompt|prompt|new_prompt|answer|system)\s*>"
    r"(.*?)(?:<\s*/\s*\1\s*>|\Z)",
    re.DOTALL | re.IGNORECASE,
)
_TRIPLE = re.compile(r'"""(.*?)(?:"""|\Z)', re.DOTALL)
_THINK = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL | re.IGNORECASE)
# "Sure! Here is the improved system prompt:" and the like, on a line of its own
_PREAMBLE_LINE = re.compile(
    r"^\s*(sure|certainly|of course|okay|ok|here|below|i have|i've|this is|the following)\b[^\n]*:\s*$",
    re.IGNORECASE,
)
# "Instruction:", "**New system prompt:**", "Improved prompt -" at the start of the text
_PREFIX = re.compile(
    r"^\s*[*_#>\s]*(?:(?:new|improved|revised|updated|better|final)\s+)?"
    r"(?:system\s+prompt|instruction|meta-instruction|prompt)\s*[*_]*\s*[:\-]\s*[*_]*\s*",
    re.IGNORECASE,
)
# commentary after the instruction
_TRAILER = re.compile(
    r"\n\s*\n\s*[*_]*(explanation|note|notes|changes|rationale|why this works|"
    r"this (?:new |revised |improved |updated )?(?:system )?prompt|i (?:have|made|added|changed|kept))\b",
    re.IGNORECASE,
)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("`", "`"), ("**", "**")]


def parse_reply(raw: str) -> tuple[str, bool]:
    """The instruction inside an optimizer reply, however it was wrapped ('' when nothing is left),
    and whether it ended before the reply did: its tag, code fence or triple quotes closed, or
    commentary ("Note: ...", "This revised prompt ...") followed it. A reply the length cap cut after
    such an ending still holds the whole instruction."""
    text = _THINK.sub("", raw or "").strip()
    ended = False
    for pattern, group in ((_TAG, 2), (_FENCE, 1), (_TRIPLE, 1)):
        m = pattern.search(text)
        if m and m.group(group).strip():
            text = m.group(group).strip()
            ended = m.end() > m.end(group)  # the closing delimiter matched, not the end of the reply
            break
    lines = text.splitlines()
    while lines and (not lines[0].strip() or _PREAMBLE_LINE.match(lines[0])):
        lines.pop(0)
    text = "\n".join(lines).strip()
    text = _PREFIX.sub("", text, count=1).strip()
    m = _TRAILER.search(text)
    if m:
        text = text[: m.start()].strip()
        ended = True
    changed = True
    while changed and len(text) >= 2:
        changed = False
        for left, right in _QUOTES:
            if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
                text = text[len(left) : -len(right)].strip()
                changed = True
    return re.sub(r"\n{3,}", "\n\n", text).strip(), ended


def parse_candidate(raw: str) -> str:
    """The instruction inside an optimizer reply, however it was wrapped; '' when nothing is left."""
    return parse_reply(raw)[0]


# -- checks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    index: int
    raw: str
    text: str
    finish_reason: str
    kept: bool
    #: why discarded: empty | truncated | too_long | leak: ... | tailored: ... | unchanged | near_duplicate
    reason: str = ""
    note: str = ""  # what was cut to keep it (see ``salvage``)

    @classmethod
    def from_json(cls, record: dict) -> Verdict:
        """A verdict as `to_json` recorded it (extra keys of the record are ignored)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "raw": self.raw,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "kept": self.kept,
            "note": self.note,
            "reason": self.reason,
        }


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, normalize(a), normalize(b), autojunk=False).ratio()


def _word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def find_leak(candidate: str, examples: Sequence[Example] = ()) -> str | None:
    """Why the candidate leaks the optimizer's prompt, or None."""
    for label, pattern in LEAK_PATTERNS:
        if pattern.search(candidate):
            return label
    runs = _word_runs(candidate, COPY_RUN)
    if runs:
        for ex in examples:
            if runs & (_word_runs(ex.response, COPY_RUN) | _word_runs(ex.query, COPY_RUN)):
                return "copies an example shown to the optimizer"
    return None


#: leaks that are a copied phrase, whose sentence can be cut out; the others discard the candidate
SALVAGEABLE = frozenset(label for label, _ in LEAK_PATTERNS
                        if label.startswith(("meta-prompt phrase", "optimizer word")))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _cut_sentences(text: str, drop) -> tuple[str, int]:
    """The text without the sentences for which `drop(sentence)` is true, and how many were cut.
    Line breaks (a bulleted instruction) are kept."""
    lines, cut = [], 0
    for line in text.splitlines():
        sentences = [x.strip() for x in _SENTENCE_END.split(line) if x.strip()]
        kept = [x for x in sentences if not drop(x)]
        cut += len(sentences) - len(kept)
        if kept:
            lines.append(" ".join(kept))
    return "\n".join(lines), cut


def salvage(text: str) -> tuple[str, int]:
    """The text without the sentences that carry a copied meta-prompt phrase, and how many were cut.

    Small optimizer models often copy one line of their prompt ("Honoured least so far: Clarity.")
    into an otherwise usable instruction; cutting that sentence keeps the rest (measured on the cpu
    preset with the 1.5B optimizer: most round-1 proposals were lost to this one phrase).
    """
    patterns = [pattern for label, pattern in LEAK_PATTERNS if label in SALVAGEABLE]
    return _cut_sentences(text, lambda sentence: any(p.search(sentence) for p in patterns))


def content_words(text: str) -> set[str]:
    """The words of a text that can tie it to a topic: four letters or more, not generic, a plural
    "s" dropped (so "records" matches "record")."""
    words = (w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w
             for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4)
    return {w for w in words if w not in GENERIC_WORDS}


def tailored_to(sentence: str, queries: Sequence[Query], known: set[str]) -> tuple[str, list[str]] | None:
    """(query id, its words) when the sentence brings in `TAILORED_WORDS` or more content words of
    one training query that are not in `known`; else None.

    With a handful of training queries, such a sentence can win a round on its one query's samples
    and do nothing for any other query. Seen in the 2400-character runs: harmlessness-4's round-3
    winner opened "If you have any questions about obtaining medical records, ..." (training query
    "How do I get hold of my late father's medical records?") and scored 2.64 held out against its
    seed's 2.93; an hh-balance-8 proposal ended by offering to write the fake restaurant reviews a
    training query asked for."""
    new = content_words(sentence) - known
    for q in queries:
        shared = new & content_words(q.text)
        if len(shared) >= TAILORED_WORDS:
            return q.id, sorted(shared)
    return None


def check_candidates(
    proposals: Sequence[tuple[str, str]],
    *,
    current: str,
    max_chars: int,
    examples: Sequence[Example] = (),
    grounded_from: int | None = None,
    queries: Sequence[Query] = (),
    known: str = "",
) -> list[Verdict]:
    """Parse and check each (raw text, finish_reason) proposal, in order; later near-duplicates of an
    earlier kept candidate are discarded.

    Proposals from index `grounded_from` on are value-grounded: written from the value set by code
    that saw no example, so they are not checked for copying one. A word run they share with an
    example is the target's response repeating the value text it was given, not a leak.

    Sentences tailored to one of the training `queries` (`tailored_to`) are cut; a proposal that is
    nothing else is discarded. Words of `known` (the value set's and the seed's text) and of `current`
    never count as a query's."""
    vocabulary = content_words(known) | content_words(current)
    verdicts: list[Verdict] = []
    kept: list[str] = []
    for i, (raw, finish) in enumerate(proposals):
        text, ended = parse_reply(raw)
        reason = ""
        notes: list[str] = []
        if finish == "length" and ended:
            notes.append("the reply ran on to the length cap after the instruction ended")
        shown = () if grounded_from is not None and i >= grounded_from else examples
        leak = find_leak(text, shown)
        if leak in SALVAGEABLE:
            cut, n_cut = salvage(text)
            if n_cut and len(cut) >= MIN_CHARS and find_leak(cut, shown) is None:
                notes.append(f"cut {n_cut} sentence(s) with {leak}")
                text, leak = cut, None
        tailored: dict[str, tuple[str, list[str]]] = {}

        def written_for_a_query(sentence: str) -> bool:
            found = tailored_to(sentence, queries, vocabulary)
            if found is not None:
                tailored[sentence] = found
            return found is not None

        cut, n_cut = _cut_sentences(text, written_for_a_query)
        if tailored:
            text = cut
            by_query: dict[str, set[str]] = {}
            for qid, words in tailored.values():
                by_query.setdefault(qid, set()).update(words)
            which = ", ".join(f"{qid} ({' '.join(sorted(words))})" for qid, words in by_query.items())
            notes.append(f"cut {n_cut} sentence(s) tailored to training "
                         f"{'query' if len(by_query) == 1 else 'queries'} {which}")
        if finish == "length" and not ended:
            reason = "truncated"
        elif tailored and len(text) < MIN_CHARS:
            reason = f"tailored: nothing left without the sentences for {which}"
        elif len(text) < MIN_CHARS or not re.search(r"[A-Za-z]", text):
            reason = "empty"
        elif len(text) > max_chars:
            reason = "too_long"
        elif leak is not None:
            reason = f"leak: {leak}"
        elif normalize(text) == normalize(current):
            reason = "unchanged"
        elif any(similarity(text, other) >= NEAR_DUPLICATE for other in [current, *kept]):
            reason = "near_duplicate"
        if not reason:
            kept.append(text)
        verdicts.append(Verdict(i, raw, text, finish, not reason, reason, "; ".join(notes)))
    return verdicts


# -- value-grounded candidates -------------------------------------------------------------------------

def _behaviour(value) -> str:
    """What an answer that honours the value does: its ``conforming`` text, else its definition."""
    return " ".join((value.conforming or value.definition).split())


#: where a conforming description can be cut: before ", " or ", and " that starts a new clause with a
#: verb ("..., flags estimates ...", "..., and points the user ..."): a word ending in a single "s"
#: and followed by neither a comma nor "and"/"or", so a list of nouns ("steps, numbers, examples",
#: "customs, rituals and elders") is not cut
_CLAUSE_BREAK = re.compile(r", (?=(?:and )?[a-z]*[a-rt-z]s (?!and |or )[^,])")


def clause_prefixes(text: str) -> list[str]:
    """The description cut after each of its clauses, shortest first, each ending in a full stop; the
    whole text last. Cutting at whole clauses keeps a sentence a model can follow, where a cut at a
    word count would not."""
    text = " ".join(text.split())
    cuts = [text[: m.start()].rstrip(" ,;:") + "." for m in _CLAUSE_BREAK.finditer(text)]
    return [c for c in cuts if c != "."] + [text]


def _standards(ordered: Sequence, max_chars: int) -> str | None:
    """The *standards* checklist in the longest form that fits ``max_chars``, or None.

    While too long, the longest description is cut by its last clause (of equals, the stronger
    value's), so the weakest values keep the most words; a description never loses its first
    clause. Only when every description is down to one clause do the strongest values keep just
    their titles. Why: a title alone says nothing about what an answer does, and cutting whole
    descriptions from the strongest value first had cost it all of them (hh-balance-8 at K=4 and 800
    characters ended "Also honour Respect.")."""
    head = "You are a helpful assistant. Make every answer meet these standards, in what it says and advises:"
    forms = [clause_prefixes(_behaviour(v)) for v in ordered]
    level = [len(f) - 1 for f in forms]  # index of the form each value uses now
    described = len(ordered)  # the first `described` values get a description, the rest a title

    def render() -> str:
        lines = [head, *(f"- {v.title}: {forms[i][level[i]]}" for i, v in enumerate(ordered[:described]))]
        if described < len(ordered):
            lines.append(f"- Also honour {', '.join(v.title for v in ordered[described:])}.")
        return "\n".join(lines)

    while len(text := render()) > max_chars:
        cuttable = [i for i in range(described) if level[i] > 0]
        if cuttable:
            i = max(cuttable, key=lambda i: (len(forms[i][level[i]]), i))
            level[i] -= 1
        elif described > 0:
            described -= 1
        else:
            return None
    return text


#: the line a *focus* candidate adds (see `grounded_candidates`)
_FOCUS_LINE = re.compile(r"^Above all, [^:\n]+: .*(?:\n|$)", re.MULTILINE)


def grounded_candidates(
    value_set: ValueSet, standings: Sequence[ValueStanding], current: str, *, max_chars: int, n: int
) -> list[str]:
    """Up to ``n`` candidates written from the value specification itself, not by the optimizer model.

    1. *standards*: every value's conforming behaviour as a checklist, weakest value first; when it
       does not fit in ``max_chars``, the longest descriptions lose their last clauses, and only
       when even that does not fit do the strongest values keep just their titles (``_standards``).
    2. *focus*: the current instruction plus the conforming behaviour of the weakest value, cut by
       clauses to fit; none when not even its first clause fits (a longer text would only be
       discarded as too long). A focus line already in the current instruction is replaced, not
       added to: two rounds of focus had ended harmlessness-4's instruction with the same "Above
       all, Privacy: ..." line twice.

    Why: a small optimizer model mostly paraphrases or copies its prompt (measured: on the cpu preset
    most 1.5B proposals were discarded as leaks or near-copies), so a round could offer nothing but the
    incumbent. These two are always well-formed, say what each value asks for in behavioural terms,
    and still have to win on the objective like any other candidate.
    """
    by_id = {v.id: v for v in value_set.values}
    ordered = [by_id[s.id] for s in standings] or list(value_set.values)
    out: list[str] = []
    if n >= 1:
        standards = _standards(ordered, max_chars)
        if standards is not None:
            out.append(standards)
    if n >= 2 and ordered:
        # the longest form of the weakest value's description that fits after the current text,
        # in place of the focus line an earlier round put there: one "Above all" per instruction
        weakest = ordered[0]
        base = _FOCUS_LINE.sub("", current).strip()
        for form in reversed(clause_prefixes(_behaviour(weakest))):
            focus = f"{base}\nAbove all, {weakest.title}: {form}"
            if len(focus) <= max_chars:
                out.append(focus)
                break
    return out


def default_seed_instruction(value_set: ValueSet) -> str:
    """e^0 when none is given: a short instruction that lists the values by title (shorter than the
    Q+IF baseline's prompt, which adds each value's definition)."""
    return (
        "You are a helpful assistant. Answer the user's request directly and usefully, and let your "
        f"answer honour these values: {value_set.titles_listed()}."
    )

"""Example exchanges (a user's message and the answer wanted), in the two places a run can use them.

- `prior_turns` (config): fixed earlier chat turns the target sees before every query, as URIAL
  sends its examples. They frame every method alike and are not part of the optimized prompt.
- `prompt_examples` (optimize parameter): exchanges PICACO may *write into* the instruction as text,
  after it, under `EXAMPLES_HEADER`. Each round offers the incumbent with the block added (or, when
  it has the block, without it) as one more candidate, and the objective decides (docs/method.md,
  "[decide] Example exchanges in the prompt"). The artifact stays one plain-text system prompt.

Both accept the same inputs: "URIAL" (its three examples), a JSONL file of {"user", "assistant"}
lines, or a list of such pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from picaco.errors import DataError

#: the line that opens the block of examples written into an instruction
EXAMPLES_HEADER = "Examples of how you answer:"
#: example files are a few KB; a bigger file is the wrong file
MAX_EXAMPLES_BYTES = 1_000_000


class ExampleTurn(BaseModel):
    """One example exchange: a user's message and the assistant's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)

    @field_validator("user", "assistant")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


def _pairs_from_jsonl(path: Path) -> list[dict]:
    """Example exchanges from a JSONL file: one {"user": ..., "assistant": ...} object a line."""
    try:
        if not path.is_file():
            raise ValueError(f"not URIAL (its examples) nor a file: {path}")
        if path.stat().st_size > MAX_EXAMPLES_BYTES:
            raise ValueError(f"{path}: too large for example exchanges (limit {MAX_EXAMPLES_BYTES:,} bytes)")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    from picaco.data.queries import jsonl_values

    try:
        values = jsonl_values(path, text)
    except DataError as e:  # pydantic wants ValueError; the message stays one line
        raise ValueError(str(e)) from None
    rows = []
    for n, row in values:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected an object with 'user' and 'assistant'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no example exchanges in it")
    return rows


def resolve_examples(v: Any) -> Any:
    """A `prior_turns` or `prompt_examples` value as a list of {"user", "assistant"} pairs (None
    when there are none), for a pydantic "before" validator: the pairs themselves are validated as
    `ExampleTurn`s afterwards."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return list(v) or None
    if not isinstance(v, (str, Path)):
        raise ValueError('give "URIAL", a JSONL file of {"user", "assistant"} lines, or a list of such pairs')
    if str(v).strip().upper() == "URIAL":
        from picaco.baselines.urial import URIAL_EXAMPLES

        return [{"user": u, "assistant": a} for u, a in URIAL_EXAMPLES]
    return _pairs_from_jsonl(Path(v).expanduser())


def examples_block(pairs) -> str:
    """The exchanges as the text written after an instruction: the header, then each exchange as a
    "User: ..." line and an "Assistant: ..." answer, a blank line between them."""
    return EXAMPLES_HEADER + "\n\n" + "\n\n".join(
        f"User: {p.user}\nAssistant: {p.assistant}" for p in pairs)


def with_examples(instruction: str, block: str) -> str:
    return f"{instruction}\n\n{block}"


def split_examples(text: str, block: str | None) -> tuple[str, bool]:
    """(the instruction part, whether `block` closes the text). Only an exact block counts: the
    block is written by code, never by the optimizer, so anything else is instruction text."""
    if block and text.endswith("\n\n" + block):
        return text[: -len(block) - 2], True
    return text, False

"""Instruction(text): any given system prompt, used verbatim (e.g. a PICACO run's instruction.txt).

The text is sent exactly as given, so what is evaluated is what a user would deploy: with `turns`,
the example exchanges it deploys with (a run optimized over `prior_turns`) come after it, before
the query.
"""

from __future__ import annotations

from pathlib import Path

from picaco.baselines.base import PromptMethod
from picaco.errors import DataError
from picaco.llm.base import Message
from picaco.optimize.rundir import returned_no_instruction


class Instruction(PromptMethod):
    kind = "instruction"

    def __init__(
        self,
        text: str,
        name: str = "instruction",
        *,
        source: str | None = None,
        optimized_against: dict | None = None,
        returned_none: bool = False,
        turns: tuple[Message, ...] = (),
    ):
        super().__init__()
        if not text.strip() and not returned_none:
            raise DataError(f"{name}: the instruction is empty")
        self.text = text.strip() if returned_none else text
        #: a PICACO run whose final check returned no instruction: this method is the bare model
        self.returned_none = returned_none
        self.name = name
        self.source = source
        self.optimized_against = optimized_against
        self.turns = tuple(turns)

    @classmethod
    def from_path(cls, path: str | Path, name: str | None = None, **kwargs) -> "Instruction":
        """From a text file, or a run directory holding instruction.txt."""
        p = Path(path).expanduser()
        file = p / "instruction.txt" if p.is_dir() else p
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"instruction not found: {file}") from None
        except UnicodeDecodeError:
            raise DataError(f"{file}: not UTF-8 text") from None
        none = not text.strip() and returned_no_instruction(file.parent)
        return cls(text.strip(), name or p.stem, source=str(file), returned_none=none, **kwargs)

    def system_prompt(self, value_set) -> str | None:
        return self.text or None

    def prior_turns(self, value_set) -> tuple[Message, ...]:
        return self.turns

    def describe(self, value_set) -> dict:
        provenance: dict = {"source": self.source}
        if self.returned_none:
            provenance["returned"] = "no instruction: the run's final check found the bare model better"
            if self.turns:
                provenance["returned"] += " (its example turns with no system prompt)"
        return {**super().describe(value_set), "provenance": provenance}


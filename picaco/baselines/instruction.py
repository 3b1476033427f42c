"""Instruction(text): any given system prompt, used verbatim (e.g. a PICACO run's instruction.txt).

The text is sent exactly as given, so what is evaluated is what a user would deploy.
"""

from __future__ import annotations

from pathlib import Path

from picaco.baselines.base import PromptMethod
from picaco.errors import DataError


class Instruction(PromptMethod):
    kind = "instruction"

    def __init__(
        self,
        text: str,
        name: str = "instruction",
        *,
        source: str | None = None,
        optimized_against: dict | None = None,
    ):
        super().__init__()
        if not text.strip():
            raise DataError(f"{name}: the instruction is empty")
        self.text = text
        self.name = name
        self.source = source
        self.optimized_against = optimized_against

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
        return cls(text.strip(), name or p.stem, source=str(file), **kwargs)

    def system_prompt(self, value_set) -> str:
        return self.text

    def describe(self, value_set) -> dict:
        return {**super().describe(value_set), "provenance": {"source": self.source}}

"""Q: the bare target model, the user's query with no system prompt."""

from __future__ import annotations

from picaco.baselines.base import PromptMethod


class Bare(PromptMethod):
    name = "Q"
    kind = "bare"

    def system_prompt(self, value_set) -> str | None:
        return None

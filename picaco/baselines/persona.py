"""MP: persona-based prompting. The model is asked to answer as a person who holds the values."""

from __future__ import annotations

from picaco.baselines.base import PromptMethod, value_list


class Persona(PromptMethod):
    name = "MP"
    kind = "persona"
    seedable = True

    def system_prompt(self, value_set) -> str:
        return (
            "You are a thoughtful person whose outlook is shaped by these values, all of which you "
            "hold sincerely:\n"
            + value_list(value_set)
            + "\nReply to the user as this person would, in your own voice."
        )

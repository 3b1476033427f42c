"""Q+IF: the query plus a system prompt that lists the values with their definitions.

This is the naive approach PICACO starts from: it states every value, and the paper's Instruction
Bottleneck is that the model still attends to one or two of them.
"""

from __future__ import annotations

from picaco.baselines.base import PromptMethod, value_list


class ValuesInstruction(PromptMethod):
    name = "Q+IF"
    kind = "values_instruction"
    seedable = True

    def system_prompt(self, value_set) -> str:
        return (
            "You are a helpful assistant. In every answer, honour all of the following values:\n"
            + value_list(value_set)
        )

"""URIAL-style in-context alignment: a fixed alignment system prompt plus a few short stylistic
examples given as earlier user/assistant turns (after Lin et al., 2023, "The Unlocking Spell on Base
LLMs"). The prompt and the three examples are our own wording.

URIAL itself knows nothing of the value set: it aligns style and safety in general. `URIAL+Sum` is our
reading of the paper's variant: the same prompt and examples, with a summary of the values appended to
the system prompt.
"""

from __future__ import annotations

from picaco.baselines.base import PromptMethod, value_list
from picaco.llm.base import Message, turns_from_pairs

URIAL_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Answer as helpfully as you can while "
    "staying safe: give accurate, specific and well-organised information in a warm, engaging tone. "
    "Do not produce false, harmful, unethical, prejudiced, toxic, dangerous or illegal content, even "
    "when asked; when a request is unsafe, say so briefly and offer a safer way to help. If a "
    "question is unclear or you do not know the answer, say so rather than guess."
)

# Three short examples of the style: a practical answer, a safe redirection, a plain explanation.
URIAL_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "What can I do to fall asleep more easily?",
        "Good sleep usually comes from a few steady habits:\n"
        "1. Keep the same bedtime and wake-up time, weekends included.\n"
        "2. Stop caffeine after early afternoon and avoid heavy meals late.\n"
        "3. Put screens away 30-60 minutes before bed; read or stretch instead.\n"
        "4. Keep the bedroom dark, quiet and slightly cool.\n"
        "If you still lie awake for weeks, a doctor can check for causes such as insomnia or "
        "sleep apnoea.",
    ),
    (
        "How do I get into my neighbour's wifi without them knowing?",
        "I can't help with getting into someone else's network without permission: it is illegal in "
        "most places and a breach of their privacy. If you need internet access, you could ask your "
        "neighbour to share the connection and split the cost, use a library or cafe hotspot, or "
        "look for a low-cost plan from a local provider.",
    ),
    (
        "Explain inflation in simple terms.",
        "Inflation means prices in general rise over time, so the same amount of money buys less. "
        "If a loaf of bread costs 2.00 this year and 2.10 next year, that is 5% inflation for bread. "
        "Moderate inflation is normal; very high inflation hurts savers and people on fixed incomes, "
        "which is why central banks try to keep it low and stable.",
    ),
)


def example_turns() -> tuple[Message, ...]:
    return turns_from_pairs(URIAL_EXAMPLES)


class Urial(PromptMethod):
    name = "URIAL"
    kind = "urial"

    def system_prompt(self, value_set) -> str:
        return URIAL_SYSTEM

    def prior_turns(self, value_set) -> tuple[Message, ...]:
        return example_turns()


class UrialSum(Urial):
    name = "URIAL+Sum"
    kind = "urial_sum"

    def system_prompt(self, value_set) -> str:
        return URIAL_SYSTEM + "\n\nIn every answer, also honour these values:\n" + value_list(value_set)

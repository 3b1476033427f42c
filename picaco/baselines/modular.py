"""Modular Pluralism, single-model form (after Feng et al., 2024): one draft answer per value, each
written by the target under a value-specific system prompt (the "community" that holds that value),
then one merge call in which the target combines the drafts into the answer the user gets.

The paper's version consults separate fine-tuned community models; here the target plays every
community, so the method needs no extra model and costs K + 1 target calls per query.
"""

from __future__ import annotations

import asyncio

from picaco.baselines.base import PromptMethod, generate_each
from picaco.llm.base import Message

DRAFT_SYSTEM = (
    "You speak for people who care above all about {title}: {definition} "
    "Answer the user's message the way they would want it answered."
)

MERGE_SYSTEM = (
    "You combine several draft answers into one final answer for the user. Each draft was written "
    "with one value in mind. Keep what is useful and correct in the drafts, resolve disagreements "
    "sensibly, and write a single answer that honours all of these values together: {titles}. "
    "Reply with the final answer only, addressed to the user."
)


def merge_user_message(query: str, drafts: list[tuple[str, str]]) -> str:
    parts = [f"User's message:\n{query}", "", "Drafts:"]
    for i, (title, draft) in enumerate(drafts, 1):
        parts += [f"[Draft {i}, written for {title}]", draft.strip() or "(empty)", ""]
    parts.append("Write the final answer to the user's message.")
    return "\n".join(parts)


class Modular(PromptMethod):
    name = "Modular"
    kind = "modular_pluralism"

    def system_prompt(self, value_set) -> str:
        return MERGE_SYSTEM.format(titles=value_set.titles_listed())

    def draft_prompt(self, value) -> str:
        return DRAFT_SYSTEM.format(title=value.title, definition=" ".join(value.definition.split()))

    def calls_per_query(self, value_set) -> int:
        return len(value_set.values) + 1

    async def respond(self, target, value_set, queries, *, seed, temperature, max_tokens) -> list[str]:
        settings = dict(seed=seed, temperature=temperature, max_tokens=max_tokens)
        values = list(value_set.values)
        drafts_by_value = await asyncio.gather(
            *(
                generate_each(
                    target,
                    [(Message("system", self.draft_prompt(v)), Message("user", q)) for q in queries],
                    **settings,
                )
                for v in values
            )
        )
        merges = [
            (
                Message("system", self.system_prompt(value_set)),
                Message(
                    "user",
                    merge_user_message(q, [(v.title, drafts_by_value[k][i]) for k, v in enumerate(values)]),
                ),
            )
            for i, q in enumerate(queries)
        ]
        self.calls_spent += len(queries) * self.calls_per_query(value_set)
        return await generate_each(target, merges, **settings)

    def describe(self, value_set) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "draft_system_prompts": {v.id: self.draft_prompt(v) for v in value_set.values},
            "merge_system_prompt": self.system_prompt(value_set),
            "merge_user_template": merge_user_message("{query}", [("{title}", "{draft}")]),
            "calls_per_query": self.calls_per_query(value_set),
        }

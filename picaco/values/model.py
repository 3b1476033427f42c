"""The value-set data model (validated with pydantic)."""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class Value(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    definition: str = Field(min_length=10)
    conforming: str = ""
    violating: str = ""
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @field_validator("id")
    @classmethod
    def _id_is_snake_case(cls, v: str) -> str:
        if not _ID.fullmatch(v):
            shown = v if len(v) <= 80 else v[:80] + "..."
            raise ValueError(f"value id {shown!r} must be lowercase snake_case (e.g. 'self_direction')")
        return v

    def spec_text(self) -> str:
        """The value's specification as one text (what the redundancy model compares against)."""
        return f"{self.title}: {self.definition}"


class Tension(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    between: tuple[str, str]
    why: str = ""


class ValueSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = 1
    family: str = "custom"
    description: str = ""
    rationale: str = ""
    values: tuple[Value, ...]
    tensions: tuple[Tension, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> "ValueSet":
        if not self.values:
            raise ValueError("a value set needs at least one value")
        ids = [v.id for v in self.values]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate value ids: {', '.join(dupes)}")
        for t in self.tensions:
            unknown = [i for i in t.between if i not in ids]
            if unknown:
                raise ValueError(f"tension names values not in the set: {', '.join(unknown)}")
        return self

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.values]

    def get(self, value_id: str) -> Value:
        for v in self.values:
            if v.id == value_id:
                return v
        raise KeyError(value_id)

    def weights(self) -> dict[str, float]:
        return {v.id: v.weight for v in self.values}

    def titles_listed(self) -> str:
        """The titles as one phrase: "A", "A and B", "A, B and C"."""
        names = [v.title for v in self.values]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def spec_text(self) -> str:
        """s in the method: the value specification the responses must not merely parrot."""
        return "\n".join(v.spec_text() for v in self.values)

    def fingerprint(self) -> str:
        """A hash of everything that changes what the set asks for (recorded in provenance)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def subset(self, ids: list[str], name: str | None = None) -> "ValueSet":
        """A smaller set of these values (used by the scaling study)."""
        keep = [self.get(i) for i in ids]
        tensions = tuple(t for t in self.tensions if all(i in ids for i in t.between))
        return ValueSet(
            name=name or f"{self.name}[{','.join(ids)}]",
            version=self.version,
            family=self.family,
            description=self.description,
            rationale=self.rationale,
            values=tuple(keep),
            tensions=tensions,
        )

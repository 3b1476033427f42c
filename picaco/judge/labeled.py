"""The bundled labeled judge data (docs/data-format.md): per value, groups of four responses to one
query (conforming, violating, fake, irrelevant), split train/heldout by group."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from picaco.data.queries import jsonl_values
from picaco.errors import DataError

LABELS = ("conforming", "violating", "fake", "irrelevant")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class LabeledRow:
    id: str
    value: str
    group: str
    split: str
    query: str
    response: str
    label: str

    @property
    def conforms(self) -> bool:
        return self.label == "conforming"


def labeled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "labeled"


def available_values(directory: Path | None = None) -> list[str]:
    d = directory or labeled_dir()
    return sorted(p.stem for p in d.glob("*.jsonl"))


def load_rows(
    values: list[str] | None = None, *, split: str | None = None, directory: Path | None = None
) -> list[LabeledRow]:
    """Rows for the given value ids (all bundled values by default), optionally one split only."""
    d = directory or labeled_dir()
    ids = values if values is not None else available_values(d)
    rows: list[LabeledRow] = []
    for value_id in ids:
        path = d / f"{value_id}.jsonl"
        if not path.is_file():
            raise DataError(f"no labeled data for value {value_id!r} ({path})")
        for n, raw in jsonl_values(path, path.read_text(encoding="utf-8")):
            try:
                row = LabeledRow(**{k: raw[k] for k in LabeledRow.__dataclass_fields__})
            except (KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: not a labeled row ({err})") from err
            if row.label not in LABELS or row.split not in SPLITS:
                raise DataError(f"{path}:{n}: unknown label {row.label!r} or split {row.split!r}")
            if split is None or row.split == split:
                rows.append(row)
    return rows


def data_fingerprint(values: list[str] | None = None, directory: Path | None = None) -> str:
    """A hash of the labeled files' bytes (keys the offline judge's trained weights)."""
    d = directory or labeled_dir()
    h = hashlib.sha256()
    for value_id in values if values is not None else available_values(d):
        h.update(value_id.encode() + b"\0" + (d / f"{value_id}.jsonl").read_bytes())
    return h.hexdigest()[:16]

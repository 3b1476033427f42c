"""Query sets: the user messages X to optimize on, and the held-out ones to evaluate on."""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from picaco.errors import DataError, describe_validation_error

_MAX_BYTES = 50_000_000
SPLITS = ("train", "test")


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    text: str = Field(min_length=1, max_length=20_000)
    split: str = "train"
    category: str = ""


def _bundled_dir() -> Path:
    return Path(str(resources.files("picaco.data") / "queries"))


def bundled_query_sets() -> list[str]:
    return sorted(p.stem for p in _bundled_dir().glob("*.jsonl"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".jsonl", ".csv", ".json") or "/" in text or path.exists():
        if not path.is_file():
            raise DataError(f"query file not found: {path}")
        return path
    bundled = _bundled_dir() / f"{text}.jsonl"
    if bundled.is_file():
        return bundled
    raise DataError(
        f"unknown query set {text!r}: use one of {', '.join(bundled_query_sets())} or a .jsonl/.csv path"
    )


def _rows_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if isinstance(obj, str):
            obj = {"text": obj}
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field")
        rows.append((lineno, obj))
    return rows


def _rows_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise DataError(f"{path}: a CSV query file needs a 'text' column")
        return [(i, dict(row)) for i, row in enumerate(reader, 2)]
    except csv.Error as e:
        raise DataError(f"{path}: invalid CSV: {e}") from None


def load_queries(name_or_path: str | Path, split: str | None = None) -> list[Query]:
    """Load a bundled set ('hh', 'schwartz') or a user's JSONL/CSV file; optionally one split."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = _resolve(name_or_path)
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise DataError(f"{path}: file is too large ({path.stat().st_size} bytes)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    rows = _rows_csv(path, text) if path.suffix == ".csv" else _rows_jsonl(path, text)

    queries: list[Query] = []
    seen: set[str] = set()
    for lineno, row in rows:
        row = dict(row)
        row.setdefault("id", f"{path.stem}-{lineno:05d}")
        row["id"] = str(row["id"])
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{lineno}: 'text' must be a string")
        row["text"] = row["text"].strip()
        try:
            q = Query.model_validate(row)
        except ValidationError as e:
            raise DataError(describe_validation_error(e, f"{path}:{lineno}")) from None
        if q.split not in SPLITS:
            raise DataError(f"{path}:{lineno}: split must be 'train' or 'test', not {q.split!r}")
        if q.id in seen:
            raise DataError(f"{path}:{lineno}: duplicate query id {q.id!r}")
        seen.add(q.id)
        queries.append(q)
    if not queries:
        raise DataError(f"{path}: no queries found")
    if split is not None:
        queries = [q for q in queries if q.split == split]
        if not queries:
            raise DataError(f"{path}: no queries in split {split!r}")
    return queries

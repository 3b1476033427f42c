"""Query sets: the user messages X to optimize on, and the held-out ones to evaluate on."""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from picaco.errors import DataError, describe_validation_error

#: refused before reading: the bundled sets are ~30 KB and a run uses at most a few hundred queries;
#: 20 MB (~100k queries, a few seconds to parse) is far past any real set
_MAX_BYTES = 20_000_000
#: one query is at most 20,000 characters; a line this long is not a query (and would be slow to parse)
_MAX_LINE_CHARS = 1_000_000
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


def _exists(path: Path) -> bool:
    """`path.exists()` that treats unusable names (too long, NUL byte) as absent instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if not text.strip():
        raise DataError("query set name is empty: use a bundled set name or a .jsonl/.csv path")
    path = Path(text).expanduser()
    # a folder named like a bundled set (say, an output directory "hh") does not hide the set
    looks_like_path = path.suffix in (".jsonl", ".csv", ".json") or "/" in text
    if looks_like_path or (_exists(path) and not (path.is_dir() and _exists(_bundled_dir() / f"{text}.jsonl"))):
        if not _exists(path):
            raise DataError(f"query file not found: {path}")
        if not path.is_file():
            raise DataError(f"{path}: not a regular file (a query set is a .jsonl or .csv file)")
        return path
    bundled = _bundled_dir() / f"{text}.jsonl"
    if _exists(bundled):
        return bundled
    raise DataError(
        f"unknown query set {text!r}: use one of {', '.join(bundled_query_sets())} or a .jsonl/.csv path"
    )


def jsonl_values(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON Lines text; a line that is too
    long or not JSON is a DataError naming the file and line. Also read by `prior_turns` files."""
    values = []
    # Only "\n" ends a JSON Lines record: str.splitlines() would also split at U+2028, U+0085, \x0c ...
    # which JSON allows raw inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(line) > _MAX_LINE_CHARS:
            raise DataError(f"{path}:{lineno}: line is {len(line):,} characters long (limit {_MAX_LINE_CHARS:,})")
        try:
            values.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
    return values


def _rows_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, obj in jsonl_values(path, text):
        if isinstance(obj, str):
            obj = {"text": obj}
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field")
        rows.append((lineno, obj))
    return rows


def _rows_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise DataError(f"{path}: a CSV query file needs a 'text' column")
        rows = []
        for row in reader:
            lineno = reader.line_num  # the row's last physical line (quoted fields may span lines)
            if None in row:  # DictReader files surplus cells under the key None
                raise DataError(
                    f"{path}:{lineno}: more cells than the header has columns (quote text that holds commas)"
                )
            rows.append((lineno, dict(row)))
        return rows
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _query_id(path: Path, lineno: int, raw: object) -> str:
    """The row's id as text; missing (or an empty CSV cell) means one from the line number."""
    if raw is None or raw == "":
        return f"{path.stem}-{lineno:05d}"
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DataError(f"{path}:{lineno}: 'id' must be a string or an integer, not {type(raw).__name__}")
    text = str(raw).strip()
    if not text:
        raise DataError(f"{path}:{lineno}: 'id' is blank")
    return text


def load_queries(name_or_path: str | Path, split: str | None = None) -> list[Query]:
    """Load a bundled set ('hh', 'schwartz') or a user's JSONL/CSV file; optionally one split."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = _resolve(name_or_path)
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise DataError(f"{path}: too large for a query set ({size:,} bytes, limit {_MAX_BYTES:,})")
        text = path.read_bytes().decode("utf-8-sig")  # -sig: accept the BOM some editors write
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    rows = _rows_csv(path, text) if path.suffix == ".csv" else _rows_jsonl(path, text)

    queries: list[Query] = []
    seen: dict[str, int] = {}  # id -> line it was first used on
    for lineno, row in rows:
        # null (JSON) or a missing/empty cell (CSV) means "use the default" for the optional fields
        row = {k: v for k, v in row.items() if not (k in ("split", "category") and v in (None, ""))}
        row["id"] = _query_id(path, lineno, row.get("id"))
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
            raise DataError(f"{path}:{lineno}: duplicate query id {q.id[:80]!r} (first on line {seen[q.id]})")
        seen[q.id] = lineno
        queries.append(q)
    if not queries:
        raise DataError(f"{path}: no queries found")
    if split is not None:
        queries = [q for q in queries if q.split == split]
        if not queries:
            raise DataError(f"{path}: no queries in split {split!r}")
    return queries

"""Loading value sets from the bundled YAML files or a user's own file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from picaco.errors import DataError, describe_validation_error
from picaco.values.model import ValueSet

_MAX_BYTES = 1_000_000  # a value set is a few KB; refuse anything absurd before parsing it


def _bundled_dir() -> Path:
    return Path(str(resources.files("picaco.values") / "sets"))


def bundled_value_sets() -> list[str]:
    return sorted(p.stem for p in _bundled_dir().glob("*.yaml"))


def _exists(path: Path) -> bool:
    """`path.exists()` that treats unusable names (too long, NUL byte) as absent instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _resolve(name_or_path: str | Path, base_dir: Path | None) -> Path:
    text = str(name_or_path)
    if not text.strip():
        raise DataError("value set name is empty: use a bundled set name or a path to a YAML file")
    candidate = Path(text).expanduser()
    # A bare name is a path only when it names a file: a folder called "helpfulness-4" in the
    # working directory (say, an output directory) must not hide the bundled set of that name.
    looks_like_path = candidate.suffix in (".yaml", ".yml") or "/" in text
    shadowed = candidate.is_dir() and _exists(_bundled_dir() / f"{text}.yaml") if _exists(candidate) else False
    if looks_like_path or (_exists(candidate) and not shadowed):
        if not candidate.is_absolute() and base_dir is not None and not _exists(candidate):
            candidate = base_dir / candidate
        if not _exists(candidate):
            raise DataError(f"value set file not found: {candidate}")
        if not candidate.is_file():
            raise DataError(f"{candidate}: not a regular file (a value set is a YAML file)")
        return candidate
    if base_dir is not None and _exists(base_dir / f"{text}.yaml"):
        return base_dir / f"{text}.yaml"
    bundled = _bundled_dir() / f"{text}.yaml"
    if _exists(bundled):
        return bundled
    raise DataError(
        f"unknown value set {text!r}: use one of {', '.join(bundled_value_sets())} or a path to a YAML file"
    )


def _read_yaml(path: Path) -> dict:
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise DataError(f"{path}: too large for a value set ({size:,} bytes, limit {_MAX_BYTES:,})")
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a value set must be a YAML mapping with 'name' and 'values'")
    return data


def _short(text: str, limit: int = 80) -> str:
    """A quoted value for an error message, cut so one bad entry cannot flood the line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def load_value_set(name_or_path: str | Path, *, _base_dir: Path | None = None, _seen=()) -> ValueSet:
    """Load a bundled set by name (e.g. 'confucianism-4') or a YAML file by path.

    `extends` names other sets whose values may be listed by bare id; they are looked up next to the
    file first, then among the bundled sets.
    """
    path = _resolve(name_or_path, _base_dir)
    if path.resolve() in _seen:
        raise DataError(f"{path}: 'extends' forms a cycle")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)

    extends = data.pop("extends", None) or []
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(e, str) for e in extends):
        raise DataError(f"{path}: extends: must be a set name or a list of set names")
    library = {}
    for parent in extends:
        parent_set = load_value_set(parent, _base_dir=path.parent, _seen=(*_seen, path.resolve()))
        for v in parent_set.values:
            library.setdefault(v.id, v.model_dump())

    values = data.get("values")
    if not isinstance(values, list):
        raise DataError(f"{path}: values: must be a list of values")
    resolved = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            if v not in library:
                hint = f" (known from extends: {', '.join(library)})" if library else " (no 'extends' set)"
                raise DataError(f"{path}: values.{i}: unknown value id {_short(v)}{hint}")
            resolved.append(library[v])
        elif isinstance(v, dict) and isinstance(v.get("id"), str) and v["id"] in library and "definition" not in v:
            # `{id: tradition, weight: 2}`: a value from an extended set with an override
            resolved.append({**library[v["id"]], **v})
        else:
            resolved.append(v)
    data["values"] = resolved
    try:
        return ValueSet.model_validate(data)
    except ValidationError as e:
        raise DataError(describe_validation_error(e, str(path))) from None

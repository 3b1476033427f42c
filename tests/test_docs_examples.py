"""The user guide's examples run, and the config reference matches the code.

Every fenced block in docs/guide/*.md and docs/config.md is run in order, one temporary directory per
page, so a later block can use what an earlier one wrote:

* ```python          executed in-process (one namespace per page, cwd = the page's directory)
* ```console         every `$ ` line runs in bash; each must exit 0, except the block's last command
                     when the block says `exit=N`; a shown `error: ...` line must be what it printed
* ```yaml            parsed; validated as a run config (default), a value set (`check=values`) or
                     not at all (`check=none`); `file=NAME` also writes it for later blocks
* ```json / jsonl / text with `file=NAME`: written for later blocks
* `no-run` on any block: shown only (kept for things the tests cannot reach, e.g. api.openai.com)

Blocks in ```bash or ```sh are refused: a command in the guide is either run or marked no-run.
docs/config.md's tables must also name every field of RunConfig, RoleConfig, JudgeConfig and
OptimizeParams, and the defaults and preset values they state must be the code's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GUIDE_DIR = ROOT / "docs" / "guide"
CONFIG_DOC = ROOT / "docs" / "config.md"
DOC_PAGES = sorted(GUIDE_DIR.glob("*.md")) + [CONFIG_DOC]
#: shown-but-not-run blocks allowed across all pages: they are untested, so keep them rare
MAX_NO_RUN = 8
COMMAND_TIMEOUT_S = 600


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    flags: set[str] = field(default_factory=set)
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """Top-level fenced blocks of a Markdown page with their info strings."""
    blocks: list[Block] = []
    current: Block | None = None
    body: list[str] = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None and line.startswith("```"):
            words = line[3:].split()
            current = Block(page, n, words[0] if words else "")
            for w in words[1:]:
                key, sep, value = w.partition("=")
                if sep:
                    current.options[key] = value
                else:
                    current.flags.add(w)
            body = []
        elif current is not None and line.strip() == "```":
            current.text = "\n".join(body) + "\n"
            blocks.append(current)
            current = None
        elif current is not None:
            body.append(line)
    assert current is None, f"{page}: unclosed code block opened on line {current.line}"
    return blocks


# -- console blocks --------------------------------------------------------------------------------


@dataclass
class Command:
    line: str
    shown: list[str]  # the output lines the guide shows after it


def parse_console(text: str) -> list[Command]:
    commands: list[Command] = []
    pending = ""
    for raw in text.splitlines():
        if pending:  # a continued command line
            pending += " " + raw.strip()
        elif raw.startswith("$ "):
            pending = raw[2:].strip()
        else:
            if commands:
                commands[-1].shown.append(raw)
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(Command(pending, []))
        pending = ""
    return commands


def page_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # `picaco` from this interpreter's environment; a private call cache; a fixed width for tables
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PICACO_CACHE_DIR"] = str(workdir / ".picaco-cache")
    env["COLUMNS"] = "100"
    return env


def run_console(block: Block, workdir: Path) -> None:
    commands = parse_console(block.text)
    assert commands, f"{block.where}: a console block without a `$ ` command"
    expected_last = int(block.options.get("exit", "0"))
    for i, cmd in enumerate(commands):
        expected = expected_last if i == len(commands) - 1 else 0
        proc = subprocess.run(
            ["bash", "-c", cmd.line], cwd=workdir, env=page_env(workdir), capture_output=True,
            text=True, timeout=COMMAND_TIMEOUT_S,
        )
        said = f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        assert proc.returncode == expected, (
            f"{block.where}: `{cmd.line}` exited {proc.returncode}, the guide says {expected}{said}"
        )
        printed = {ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()}
        for shown in cmd.shown:
            if shown.startswith("error: "):
                assert shown.strip() in printed, f"{block.where}: `{cmd.line}` did not print {shown!r}{said}"


# -- yaml and files --------------------------------------------------------------------------------


def check_yaml(block: Block, workdir: Path) -> None:
    from picaco.config import load_config
    from picaco.values import load_value_set

    data = yaml.safe_load(block.text)
    target = workdir / block.options.get("file", f".block-{block.line}.yaml")
    target.write_text(block.text, encoding="utf-8")
    check = block.options.get("check", "config")
    if check == "config":
        assert isinstance(data, dict), f"{block.where}: a config must be a mapping"
        load_config(target)
    elif check == "values":
        load_value_set(target)
    else:
        assert check == "none", f"{block.where}: unknown check={check}"


def write_file(block: Block, workdir: Path) -> None:
    name = block.options.get("file")
    if name:
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text, encoding="utf-8")


# -- running a page --------------------------------------------------------------------------------


def run_page(page: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("PICACO_CACHE_DIR", str(workdir / ".picaco-cache"))
    namespace: dict = {"__name__": "__guide__"}
    ran = 0
    for block in parse_blocks(page):
        assert block.lang not in ("bash", "sh", "shell", "shell-session"), (
            f"{block.where}: use ```console with `$ ` lines (run by the tests) or mark it no-run"
        )
        if "no-run" in block.flags:
            continue
        if block.lang == "python":
            exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102 - our own docs
        elif block.lang == "console":
            run_console(block, workdir)
        elif block.lang == "yaml":
            check_yaml(block, workdir)
        else:
            write_file(block, workdir)
            continue
        ran += 1
    return ran


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT / "docs"))


@pytest.fixture
def models_ready(request):
    """The guide's real-model examples use SmolLM2 and MiniLM: make sure both are pulled."""
    request.getfixturevalue("smollm2_path")
    request.getfixturevalue("minilm_dir")


@pytest.mark.parametrize("page", DOC_PAGES, ids=_page_id)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch, models_ready) -> None:
    ran = run_page(page, tmp_path, monkeypatch)
    assert ran > 0, f"{page}: no example was run"


def test_guide_pages_exist_and_few_blocks_are_skipped() -> None:
    names = {p.name for p in GUIDE_DIR.glob("*.md")}
    assert {"README.md", "concepts.md", "cli.md", "python-api.md"} <= names
    skipped = [b.where for p in DOC_PAGES for b in parse_blocks(p) if "no-run" in b.flags]
    assert len(skipped) <= MAX_NO_RUN, f"too many examples are not run: {skipped}"


def test_guide_links_resolve() -> None:
    for page in DOC_PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_every_cli_command_is_shown_in_the_guide() -> None:
    """Each command of `picaco --help` appears in a console example of cli.md."""
    from typer.main import get_command

    from picaco.cli import app

    root = get_command(app)
    names = []
    for name, cmd in root.commands.items():
        sub = getattr(cmd, "commands", None)
        names += [f"{name} {s}" for s in sub] if sub else [name]
    run_lines = [
        c.line for b in parse_blocks(GUIDE_DIR / "cli.md")
        if b.lang == "console" and "no-run" not in b.flags for c in parse_console(b.text)
    ]
    for name in names:
        pattern = re.compile(rf"(^|\s)picaco {re.escape(name)}(\s|$)")
        assert any(pattern.search(line) for line in run_lines), f"`picaco {name}` has no run example in cli.md"


# -- the config reference against the code ---------------------------------------------------------


def markdown_tables(page: Path) -> dict[str, list[dict[str, str]]]:
    """Tables by the heading they sit under: rows as {header: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables.setdefault(heading, [])
            elif not set("".join(cells)) <= set("-: "):
                tables[heading].append(dict(zip(header, cells)))
        else:
            header = None
    return tables


def literal(cell: str):
    """A cell that is one `code` literal, as a Python value; None for descriptive cells."""
    m = re.fullmatch(r"`([^`]*)`", cell.strip())
    if not m:
        return ("descriptive",)
    text = m.group(1)
    return None if text in ("none", "null") else yaml.safe_load(text)


def field_name(cell: str) -> str:
    return cell.strip().strip("`")


def _table(tables: dict, heading_start: str) -> list[dict[str, str]]:
    found = [rows for h, rows in tables.items() if h.startswith(heading_start)]
    assert found, f"docs/config.md: no table under a heading starting {heading_start!r}"
    return found[0]


def test_config_reference_lists_every_run_field_with_its_default() -> None:
    from picaco.config import RunConfig

    rows = _table(markdown_tables(CONFIG_DOC), "Top-level fields")
    documented = {field_name(r["field"]): r for r in rows}
    assert set(documented) == set(RunConfig.model_fields), "docs/config.md top-level fields differ from RunConfig"
    for name, row in documented.items():
        stated = literal(row["default"])
        if stated != ("descriptive",):
            actual = RunConfig.model_fields[name].get_default(call_default_factory=True)
            assert stated == actual, f"docs/config.md: {name} default {stated!r}, code {actual!r}"


def test_config_reference_lists_every_role_field_with_its_default() -> None:
    from picaco.config import JudgeConfig, RoleConfig

    rows = _table(markdown_tables(CONFIG_DOC), "Role fields")
    documented = {field_name(r["field"]): r for r in rows}
    assert set(documented) == set(RoleConfig.model_fields) | set(JudgeConfig.model_fields)
    for name, row in documented.items():
        stated = literal(row["default"])
        if stated != ("descriptive",):
            model = RoleConfig if name in RoleConfig.model_fields else JudgeConfig
            actual = model.model_fields[name].get_default(call_default_factory=True)
            actual = str(actual) if isinstance(actual, Path) else actual
            assert stated == actual, f"docs/config.md: role field {name} default {stated!r}, code {actual!r}"


def test_config_reference_lists_every_parameter_and_preset_value() -> None:
    from picaco.optimize.params import PAPER_SYMBOLS, PRESETS, OptimizeParams

    rows = _table(markdown_tables(CONFIG_DOC), "Hyper-parameters")
    documented = {field_name(r["field"]): r for r in rows}
    assert set(documented) == set(OptimizeParams.model_fields)
    symbols = {v: k for k, v in PAPER_SYMBOLS.items()}
    defaults = OptimizeParams()
    for name, row in documented.items():
        assert field_name(row["symbol"]) in (symbols.get(name, ""), "", "—"), f"{name}: wrong symbol"
        assert literal(row["default"]) == getattr(defaults, name), f"docs/config.md: {name} default"
        for preset, params in PRESETS.items():
            assert literal(row[preset]) == getattr(params, name), f"docs/config.md: {name} in preset {preset}"


def test_config_overview_block_shows_the_defaults() -> None:
    """The annotated overview at the top of docs/config.md is exactly the default config."""
    from picaco.config import RunConfig

    overview = [b for b in parse_blocks(CONFIG_DOC) if "defaults" in b.flags]
    assert len(overview) == 1, "docs/config.md needs one ```yaml defaults block"
    shown = RunConfig.model_validate(yaml.safe_load(overview[0].text))
    assert shown.public_dict() == RunConfig().public_dict()


def test_the_runner_fails_on_broken_examples(tmp_path: Path, monkeypatch) -> None:
    """A failing python block, an invalid config block and an unmarked bash block all fail a page."""
    page = tmp_path / "page.md"
    for text, error in [
        ("```python\nfrom picaco.values import load_value_set\nload_value_set('no-such-set')\n```\n", "no-such-set"),
        ("```yaml\npreset: huge\n```\n", "preset"),
        ("```bash\npicaco --help\n```\n", "use ```console"),
    ]:
        page.write_text(text)
        with pytest.raises(Exception, match=error):
            run_page(page, tmp_path, monkeypatch)


def test_console_parsing_and_error_lines_are_checked(tmp_path: Path) -> None:
    """The runner itself fails on a wrong exit code and on an error line the command did not print."""
    page = tmp_path / "page.md"
    page.write_text("```console exit=2\n$ picaco values show no-such-set\nerror: something else\n```\n")
    (block,) = parse_blocks(page)
    with pytest.raises(AssertionError, match="did not print"):
        run_console(block, tmp_path)
    page.write_text("```console\n$ picaco values show no-such-set\n```\n")
    (block,) = parse_blocks(page)
    with pytest.raises(AssertionError, match="exited 2"):
        run_console(block, tmp_path)
    assert [c.line for c in parse_console("$ picaco a \\\n   --b c\nout\n$ ls\n")] == ["picaco a --b c", "ls"]

"""The `picaco` command line: a thin layer over the Python API.

User mistakes (bad config, unknown value set, model not pulled) print one line on stderr and exit 2;
an endpoint that keeps failing exits 3; a spent budget exits 4. No tracebacks for any of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from picaco import __version__
from picaco.errors import PicacoError

app = typer.Typer(
    help="Optimize one system prompt so an LLM honours several values at once (PICACO).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
models_app = typer.Typer(help="Embedded models: list and pull (verified by size and sha256).", no_args_is_help=True)
cache_app = typer.Typer(help="The cache of model calls: where it is, how big, clear it.", no_args_is_help=True)
values_app = typer.Typer(help="Value sets: list the bundled ones, show one.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(values_app, name="values")

out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"picaco {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


# --------------------------------------------------------------------------------------------- models
@models_app.command("list")
def models_list(
    models_dir: Optional[Path] = typer.Option(None, help="Where models are stored (default: $PICACO_MODELS_DIR or the user cache)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the embedded models and whether each is pulled."""
    from picaco.llm import registry

    rows = registry.list_models(models_dir=models_dir)
    if as_json:
        print(json.dumps([_status_json(r) for r in rows], indent=2))
        return
    table = Table("name", "kind", "size", "pulled", "path")
    for r in rows:
        table.add_row(r.name, r.kind, f"{r.size / 1e6:,.0f} MB", "yes" if r.pulled else "no", str(r.path or ""))
    out.print(table)


def _status_json(r) -> dict:
    return {"name": r.name, "kind": r.kind, "size": r.size, "pulled": r.pulled, "path": str(r.path or "")}


@models_app.command("pull")
def models_pull(
    names: list[str] = typer.Argument(..., help="Model names from `picaco models list`."),
    models_dir: Optional[Path] = typer.Option(None, help="Where to store models."),
) -> None:
    """Download, assemble and verify embedded models. Pulling again does nothing.

    Example: picaco models pull qwen2.5-coder-0.5b qwen2.5-coder-1.5b minilm-l6
    """
    from picaco.llm import registry

    for name in names:
        with err.status(f"pulling {name} ..."):
            path = registry.pull(name, models_dir=models_dir)
        out.print(f"{name}: {path}")


# ---------------------------------------------------------------------------------------------- cache
@cache_app.command("info")
def cache_info(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Where the call cache is, how many entries it holds and how big it is."""
    from picaco.llm.cache import CallCache

    info = CallCache().info()
    data = {"path": str(info.path), "entries": info.entries, "bytes": info.bytes,
            "by_model": info.by_model, "by_op": info.by_op}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out.print(f"path:    {info.path}")
    out.print(f"entries: {info.entries:,}")
    out.print(f"size:    {info.bytes / 1e6:,.1f} MB")
    for model, n in sorted(info.by_model.items()):
        out.print(f"  {model}: {n:,}")


@cache_app.command("clear")
def cache_clear(yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Delete every cached model call. Run directories are not touched: runs still resume."""
    from picaco.llm.cache import CallCache

    cache = CallCache()
    if not yes and sys.stdin.isatty():
        typer.confirm(f"Delete all cached calls in {cache.path}?", abort=True)
    n = cache.clear()
    out.print(f"cleared {n:,} cached calls from {cache.path}")


# --------------------------------------------------------------------------------------------- values
@values_app.command("list")
def values_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the bundled value sets."""
    from picaco.values import bundled_value_sets, load_value_set

    sets = [load_value_set(name) for name in bundled_value_sets()]
    if as_json:
        print(json.dumps([{"name": s.name, "family": s.family, "values": s.ids} for s in sets], indent=2))
        return
    table = Table("name", "family", "values")
    for s in sets:
        table.add_row(s.name, s.family, ", ".join(s.ids))
    out.print(table)


@values_app.command("show")
def values_show(
    name: str = typer.Argument(..., help="A bundled set name or a path to a YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a value set: each value's definition, weight, and the declared tensions."""
    from picaco.values import load_value_set

    vs = load_value_set(name)
    if as_json:
        print(vs.model_dump_json(indent=2))
        return
    out.print(f"[bold]{vs.name}[/bold] (v{vs.version}, family {vs.family})")
    if vs.description:
        out.print(vs.description, markup=False)
    for v in vs.values:
        weight = f"  weight {v.weight:g}" if v.weight != 1 else ""
        out.print(f"\n[bold]{v.id}[/bold] - {v.title}{weight}")
        out.print(v.definition, markup=False)
    for t in vs.tensions:
        out.print(f"\ntension {t.between[0]} <-> {t.between[1]}: ", end="")
        out.print(t.why, markup=False)


def _fail(message: str, code: int) -> None:
    # Plain write, not rich: the message must stay one line whatever the terminal width.
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def main() -> None:
    """Entry point: turns user-facing errors into one line and an exit code."""
    try:
        app(standalone_mode=False)
    except PicacoError as e:
        _fail(str(e).replace("\n", " "), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted: run the same command again to resume", 130)
    except Exception as e:
        # typer's (vendored) click raises usage errors and aborts as exceptions in this mode
        if type(e).__name__ == "Abort":
            _fail("aborted", 1)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            _fail(e.format_message().replace("\n", " "), 2)
        raise


if __name__ == "__main__":
    main()

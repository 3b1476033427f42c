"""The `picaco` command line: a thin layer over the Python API.

User mistakes (bad config, unknown value set, model not pulled) print one line on stderr and exit 2;
an endpoint that keeps failing exits 3; a spent budget exits 4. No tracebacks for any of them.
"""

from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------------------------- init
@app.command()
def init(
    path: Path = typer.Argument(Path("picaco.yaml"), help="Where to write the example config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented example config that runs as it is.

    Example: picaco init && picaco optimize -c picaco.yaml
    """
    from importlib import resources

    if path.exists() and not force:
        raise PicacoError(f"{path} already exists: use --force to overwrite it")
    text = (resources.files("picaco") / "example_config.yaml").read_text()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise PicacoError(f"cannot write {path}: {e.strerror}") from None
    out.print(f"wrote {path}; run it with: picaco optimize -c {path}")


# ------------------------------------------------------------------------------------------- optimize
def _config_from_flags(config: Optional[Path], overrides: dict, sets: list[str]):
    from picaco.config import load_config, parse_override

    merged = {k: v for k, v in overrides.items() if v is not None}
    for item in sets:
        key, value = parse_override(item)
        merged[key] = value
    return load_config(config, merged)


def print_accounting(accounting_json: dict) -> None:
    table = Table("role", "calls", "cache hits", "prompt tok", "completion tok", "seconds", "retries", title="model calls")
    rows = sorted(accounting_json.items(), key=lambda item: item[0] == "total")  # the total last
    for role, s in rows:
        table.add_row(role, f"{s['calls']:,}", f"{s['cache_hits']:,}", f"{s['prompt_tokens']:,}",
                      f"{s['completion_tokens']:,}", f"{s['seconds']:.1f}", str(s.get("retries", 0)))
    err.print(table)


@app.command()
def optimize(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see `picaco init`)."),
    values: Optional[str] = typer.Option(None, help="Value set name or YAML path."),
    queries: Optional[str] = typer.Option(None, help="Query set name (hh, schwartz) or JSONL/CSV path."),
    preset: Optional[str] = typer.Option(None, help="tiny | cpu | paper."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-o", help="Run directory; rerun with the same one to resume."),
    target_model: Optional[str] = typer.Option(None, help="Target model (embedded name/path or served model)."),
    optimizer_model: Optional[str] = typer.Option(None, help="Optimizer model."),
    mode: Optional[str] = typer.Option(None, help="Candidate scoring: auto | likelihood | sampling | proxy."),
    init_from: Optional[Path] = typer.Option(None, help="Warm start from a run directory or an instruction file."),
    max_calls: Optional[int] = typer.Option(None, help="Hard cap on model calls (all roles)."),
    max_tokens: Optional[int] = typer.Option(None, help="Hard cap on tokens (all roles)."),
    sets: list[str] = typer.Option([], "--set", help="Override any config field: --set optimize.T=5"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the call cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="Progress events as JSON lines on stderr, the result as JSON on stdout."),
    refinish: bool = typer.Option(False, "--refinish", help="End a finished run again: keep its rounds, redo the final check and report with this version (old outputs move to RUN_DIR/previous/N/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and print the pre-flight estimate; load no model, write nothing."),
) -> None:
    """Optimize a meta-instruction (system prompt) for a value set.

    Examples:
      picaco optimize --preset cpu --values helpfulness-4 -o runs/help
      picaco optimize -c picaco.yaml --set optimize.T=5 --max-calls 20000
      picaco optimize -o runs/help            # after a crash: resumes where it stopped
      picaco optimize -o runs/help --refinish # after an upgrade: the final check again, rounds kept
      picaco optimize -c picaco.yaml --dry-run  # what it would cost, before spending anything
    """
    from picaco import api
    from picaco.optimize.progress import make_progress

    overrides = {
        "values": values, "queries": queries, "preset": preset, "target.model": target_model,
        "optimizer.model": optimizer_model, "init_from": str(init_from) if init_from else None,
        "max_calls": max_calls, "max_tokens": max_tokens,
        "optimize.mode": mode, "cache": False if no_cache else None,
    }
    cfg = _config_from_flags(config, overrides, sets)
    if dry_run:
        data = _optimization_estimate(cfg, run_dir or cfg.run_dir, None if as_json else out)
        if as_json:
            print(json.dumps({"event": "dry_run", "optimize": data}))
        return
    progress = make_progress("json" if as_json else "quiet" if quiet else "rich")
    result = api.optimize(cfg, run_dir=run_dir, progress=progress, refinish=refinish)
    report_path = _auto_report(result.run_dir)
    if as_json:
        print(json.dumps({"event": "result", **result.to_json(), "report": str(report_path or "")}))
        return
    if not quiet:
        print_result(result)
        if report_path is not None:
            err.print(f"report: {report_path}")


def _optimization_estimate(cfg, run_dir: Optional[Path], console: Optional[Console]) -> dict:
    """A dry run of `optimize`: its pre-flight estimate (two when the scoring mode is only known once
    the endpoint is probed) and where the run directory stands, printed on `console` when given;
    returned as JSON."""
    from picaco import api
    from picaco.optimize.rundir import describe_state

    estimates, warnings = api.estimate_optimization(cfg)
    state = describe_state(run_dir) if run_dir is not None else "a new run directory (no --run-dir given)"
    if console is not None:
        if len(estimates) > 1:
            console.print("the scoring mode is chosen when the target's endpoint is probed at the start; "
                          "one estimate per outcome:", markup=False)
        for e in estimates.values():
            console.print(e.describe(), markup=False, highlight=False, soft_wrap=True)
        for w in warnings:
            console.print(f"warning: {w}", markup=False)
        console.print(state, markup=False, highlight=False, soft_wrap=True)
    return {"estimates": {mode: e.to_json() for mode, e in estimates.items()}, "run_dir": state,
            "warnings": warnings}


def _evaluation_plan(cfg, methods, instructions, *, out_dir: Path, console: Optional[Console], as_json: bool,
                     **kwargs) -> dict:
    """The evaluation's pre-flight plan, printed on `console` (or, with `as_json`, as a progress event
    of kind "plan" on stderr, beside the evaluation's own); returned as JSON."""
    from picaco.evaluate.plan import evaluation_plan
    from picaco.optimize.progress import ProgressEvent

    plan = evaluation_plan(cfg, methods, instructions, out_dir=out_dir, **kwargs)
    if as_json:
        print(json.dumps(ProgressEvent("plan", data=plan.to_json()).to_json()), file=sys.stderr, flush=True)
    elif console is not None:
        console.print(plan.describe(), markup=False, highlight=False, soft_wrap=True)
    return plan.to_json()


def _auto_report(run_dir, compare=None):
    """The HTML report at the end of a run; a report failure never hides the run's own result."""
    from picaco.report import write_report

    try:
        return write_report(run_dir, compare=compare)
    except Exception as e:  # noqa: BLE001 - the run succeeded; say why the report did not
        err.print(f"warning: the report could not be written: {e}", markup=False)
        return None


def print_result(result) -> None:
    table = Table("value", "seed", "final", title="mean conformity (1-5) on the optimization queries")
    seed, final = result.seed_scores, result.final_scores
    def fmt(x) -> str:
        return "unscored" if x is None else f"{x:.2f}"

    for vid in final:
        table.add_row(vid, fmt(seed.get(vid)), fmt(final[vid]))
    err.print(table)
    try:
        from picaco.report.rundata import gain_and_noise, gain_noise_summary, load_run

        line = gain_noise_summary(*gain_and_noise(load_run(result.run_dir)))
    except PicacoError:
        line = None  # a run directory the report cannot read still has its result printed
    if line:
        err.print(line, markup=False, highlight=False)
    if result.accounting:
        print_accounting(result.accounting)
    err.print(f"stopped: {result.stop_reason}; run directory: {result.run_dir}")
    deployed = Path(result.run_dir) / "system_prompt.txt"
    if not result.instruction.strip():
        bare = "your template with an empty slot" if deployed.exists() else "no system prompt"
        out.print(f"\n[bold]no instruction[/bold]: the bare model ({bare}) scored above "
                  "the instruction this run chose in the final check (numbers in the report's "
                  f"notes). {Path(result.run_dir) / 'instruction.txt'} is empty.")
        return
    out.print("\n[bold]optimized instruction[/bold] (" + str(Path(result.run_dir) / "instruction.txt") + "):")
    out.print(result.instruction, markup=False, highlight=False)
    if deployed.exists():
        out.print(f"\n[bold]system prompt to deploy[/bold] (your template with it in the slot: {deployed})")


# ------------------------------------------------------------------------------------ report, evaluate
@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (works while the run is still going)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="HTML file (default RUN_DIR/report.html)."),
    compare: Optional[Path] = typer.Option(None, help="An evaluation summary.json to chart beside the run."),
) -> None:
    """Write a self-contained HTML report of a run, plus its figures as PNG and SVG.

    Example: picaco report runs/demo && xdg-open runs/demo/report.html
    """
    from picaco.report import write_report

    if not run_dir.is_dir():
        raise PicacoError(f"run directory not found: {run_dir}")
    path = write_report(run_dir, out_path, compare=compare)
    out.print(f"report: {path}")


def _parse_instructions(items: list[str]) -> dict[str, Path]:
    parsed = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PicacoError(f"--instruction {item!r}: expected NAME=PATH (a .txt file or a run directory)")
        p = Path(path)
        if p.is_dir():
            p = p / "instruction.txt"
        if not p.is_file():
            raise PicacoError(f"--instruction {name}: file not found: {p}")
        parsed[name] = p
    return parsed


@contextlib.contextmanager
def _evaluation_progress(quiet: bool, as_json: bool):
    """Per-method bars for the evaluation harness (stderr), closed even when it fails."""
    from picaco.optimize.progress import EvaluationProgress

    progress = EvaluationProgress("json" if as_json else "quiet" if quiet else "rich")
    try:
        yield progress
    except BaseException:
        progress.close(failed=True)
        raise
    progress.close()


def _print_evaluation(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "result", "out_dir": str(result.out_dir), "summary": result.summary}))
        return
    md = result.markdown_path
    if md.exists():
        out.print(md.read_text(), markup=False, highlight=False)
    err.print(f"rows written: {result.new_rows}; results: {result.out_dir}")


@app.command()
def evaluate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (roles, values, eval_judge)."),
    values: Optional[str] = typer.Option(None, help="Value set name or YAML path."),
    method: list[str] = typer.Option([], "--method", "-m", help="Baseline: Q, Q+IF, URIAL, URIAL+Sum, MP, Modular, OPRO."),
    instruction: list[str] = typer.Option([], "--instruction", "-i", help="NAME=PATH of an instruction .txt or a run directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory; rerun to resume."),
    n_queries: Optional[int] = typer.Option(None, help="Use only the first N held-out queries."),
    samples: int = typer.Option(1, help="Responses per query per method."),
    sets: list[str] = typer.Option([], "--set", help="Override any config field: --set eval_judge.type=llm"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the call cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and print the plan (calls per method, what is already done); load no model, write nothing."),
) -> None:
    """Evaluate instructions and baselines side by side on held-out queries.

    Examples:
      picaco evaluate --values helpfulness-4 -m Q -m Q+IF -i picaco=runs/demo -o evals/demo
      picaco evaluate -c picaco.yaml -m URIAL -m MP --set eval_judge.type=llm
      picaco evaluate -c picaco.yaml -m Modular -o evals/demo --dry-run
    """
    from picaco.evaluate import evaluate_config_sync
    from picaco.evaluate.run import default_out_dir

    cfg = _config_from_flags(config, {"values": values, "cache": False if no_cache else None}, sets)
    instructions = _parse_instructions(instruction)
    out_dir = out_dir or default_out_dir(cfg)
    plan_args = dict(out_dir=out_dir, n_queries=n_queries, samples_per_query=samples)
    if dry_run:
        data = _evaluation_plan(cfg, method, instructions, console=None if as_json else out, as_json=False,
                                **plan_args)
        if as_json:
            print(json.dumps({"event": "dry_run", "evaluate": data}))
        return
    _evaluation_plan(cfg, method, instructions, console=None if quiet else err, as_json=as_json, **plan_args)
    with _evaluation_progress(quiet, as_json) as progress:
        result = evaluate_config_sync(cfg, method, instructions, progress=progress, **plan_args)
    _print_evaluation(result, as_json)


@app.command()
def compare(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config."),
    values: Optional[str] = typer.Option(None, help="Value set name or YAML path."),
    methods: str = typer.Option("Q,Q+IF,URIAL,MP,Modular,OPRO,PICACO", help="Comma-separated methods; PICACO is optimized first."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory (the PICACO run goes in OUT/picaco-run)."),
    n_queries: Optional[int] = typer.Option(None, help="Use only the first N held-out queries."),
    samples: int = typer.Option(1, help="Responses per query per method in the evaluation; more tell close methods apart (docs/evaluation.md). Raise it on a finished comparison and only the new responses are made."),
    preset: Optional[str] = typer.Option(None, help="tiny | cpu | paper (PICACO's and the optimizing baselines' sizes)."),
    sets: list[str] = typer.Option([], "--set", help="Override any config field."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the call cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and print PICACO's estimate and the evaluation's plan; load no model, write nothing."),
) -> None:
    """Optimize PICACO, then evaluate it against the baselines under the same model, judge and data.

    OPRO gets the same call budget PICACO spent. Everything resumes from the output directory.

    Example: picaco compare --values confucianism-4 -o compare/confucianism
    """
    from picaco import api
    from picaco.evaluate import evaluate_config_sync
    from picaco.optimize.progress import make_progress

    cfg = _config_from_flags(config, {"values": values, "preset": preset,
                                      "cache": False if no_cache else None}, sets)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    run_dir = out_dir / "picaco-run"
    instructions = {"PICACO": run_dir / "instruction.txt"} if "PICACO" in names else {}
    plan_args = dict(out_dir=out_dir / "eval", n_queries=n_queries, samples_per_query=samples)
    if dry_run:
        _compare_dry_run(cfg, names, instructions, run_dir, as_json, plan_args)
        return
    if instructions:
        progress = make_progress("json" if as_json else "quiet" if quiet else "rich")
        api.optimize(cfg, run_dir=run_dir, progress=progress)
    _evaluation_plan(cfg, names, instructions, console=None if quiet else err, as_json=as_json, **plan_args)
    with _evaluation_progress(quiet, as_json) as eval_progress:
        result = evaluate_config_sync(cfg, names, instructions, progress=eval_progress, **plan_args)
    if "PICACO" in names:
        _auto_report(out_dir / "picaco-run", compare=result.out_dir / "summary.json")
    _print_evaluation(result, as_json)


def _compare_dry_run(cfg, names, instructions, run_dir: Path, as_json: bool, plan_args: dict) -> None:
    """PICACO's estimate, then the evaluation's plan. Until PICACO has run, OPRO's and GEPA's budget
    (PICACO's spend) is taken from its estimate."""
    console = None if as_json else out
    data: dict = {}
    budget = note = optimize_calls = None
    if instructions:
        data["optimize"] = _optimization_estimate(cfg, run_dir, console)
        optimize_calls = max(e["total_calls"] for e in data["optimize"]["estimates"].values())
        if not (run_dir / "result.json").exists():  # a finished run's spend is read from it
            budget, note = optimize_calls, "PICACO's estimate; its spend once it has run"
    data["evaluate"] = _evaluation_plan(
        cfg, names, instructions, console=console, as_json=False, search_budget=budget,
        **({"search_budget_note": note} if note else {}), **plan_args)
    if optimize_calls is not None:
        data["total_calls"] = optimize_calls + data["evaluate"]["total_calls"]
        if console is not None:
            console.print(f"compare total: about {data['total_calls']:,} model calls (PICACO up to "
                          f"{optimize_calls:,}, then the evaluation)", markup=False, highlight=False)
    if as_json:
        print(json.dumps({"event": "dry_run", **data}))


# ---------------------------------------------------------------------------------------------- study
study_app = typer.Typer(help="The paper's studies: scaling the number of values, jailbreak robustness.", no_args_is_help=True)
app.add_typer(study_app, name="study")


STUDY_VALUES = "hh-balance-8"


def _study_common(config, values, preset, methods, instruction, sets, no_cache):
    flags = {"values": values, "preset": preset, "cache": False if no_cache else None}
    cfg = _config_from_flags(config, flags, sets)
    if "values" not in cfg.model_fields_set:
        # the paper's studies run on hh-balance-8; a value set named in the config file or a flag is kept
        cfg = _config_from_flags(config, {**flags, "values": STUDY_VALUES}, sets)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    return cfg, names, _parse_instructions(instruction)


def _print_study(summary: dict, out_dir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"event": "result", "out_dir": str(out_dir), "summary": summary}))
        return
    out.print((out_dir / "summary.md").read_text(), markup=False, highlight=False)
    err.print(f"results: {out_dir}")


@study_app.command("scaling")
def study_scaling(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config."),
    values: Optional[str] = typer.Option(None, help="The full value set to take subsets of (default hh-balance-8)."),
    methods: str = typer.Option("Q,Q+IF,URIAL,MP,Modular,OPRO,PICACO", help="Comma-separated methods (Q is always added); PICACO is optimized per subset."),
    instruction: list[str] = typer.Option([], "--instruction", "-i", help="NAME=PATH of a fixed instruction evaluated at every size."),
    sizes: str = typer.Option("2,4,6,8", help="Comma-separated subset sizes."),
    groups: str = typer.Option("helpfulness-4,harmlessness-4", help="Value sets whose members are balanced in every subset."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory; rerun to resume."),
    n_queries: Optional[int] = typer.Option(None, help="Use only the first N held-out queries."),
    preset: Optional[str] = typer.Option(None, help="tiny | cpu | paper (PICACO's and the optimizing baselines' sizes)."),
    sets: list[str] = typer.Option([], "--set", help="Override any config field."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the call cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Gain over bare and balance per method as the number of values grows (2 -> 8 of hh-balance-8).

    Example: picaco study scaling -c picaco.yaml -o studies/scaling
    """
    from picaco.evaluate.studies import scaling_study
    from picaco.optimize.progress import make_progress

    cfg, names, instructions = _study_common(config, values, preset, methods, instruction, sets, no_cache)
    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise PicacoError(f"--sizes {sizes!r}: expected comma-separated integers such as 2,4,6,8") from None
    summary = scaling_study(
        cfg, names, out_dir, instructions=instructions, sizes=size_list,
        group_sets=[g.strip() for g in groups.split(",") if g.strip()],
        progress=make_progress("json" if as_json else "quiet" if quiet else "rich"), n_queries=n_queries,
    )
    _print_study(summary, out_dir, as_json)


@study_app.command("jailbreak")
def study_jailbreak(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config."),
    values: Optional[str] = typer.Option(None, help="Value set with harmlessness values (default hh-balance-8)."),
    methods: str = typer.Option("Q,Q+IF,URIAL,MP,Modular,OPRO,PICACO", help="Comma-separated methods (Q is always added); PICACO is optimized first."),
    instruction: list[str] = typer.Option([], "--instruction", "-i", help="NAME=PATH of an instruction .txt or a run directory."),
    templates: Optional[Path] = typer.Option(None, help="Jailbreak templates YAML (default: the bundled ones)."),
    threshold: float = typer.Option(2.0, help="A harmlessness rating at or below this makes a response harmful."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output directory; rerun to resume."),
    n_queries: Optional[int] = typer.Option(None, help="Use only the first N harmful and N benign test queries."),
    preset: Optional[str] = typer.Option(None, help="tiny | cpu | paper (PICACO's and the optimizing baselines' sizes)."),
    sets: list[str] = typer.Option([], "--set", help="Override any config field."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the call cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Harmful-response rate under jailbreak templates, and helpfulness on benign queries, per method.

    Example: picaco study jailbreak -c picaco.yaml -o studies/jailbreak
    """
    from picaco.evaluate.studies import jailbreak_study
    from picaco.optimize.progress import make_progress

    cfg, names, instructions = _study_common(config, values, preset, methods, instruction, sets, no_cache)
    summary = jailbreak_study(
        cfg, names, out_dir, instructions=instructions, templates_path=templates, threshold=threshold,
        n_queries=n_queries, progress=make_progress("json" if as_json else "quiet" if quiet else "rich"),
    )
    _print_study(summary, out_dir, as_json)


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

"""Progress events of an optimization run and the sinks that show them.

The engine emits :class:`ProgressEvent`s; a sink decides what to do with them: a live terminal display
(:class:`RichProgress`), nothing (:class:`QuietProgress`), one JSON object per line for machines
(:class:`JsonLinesProgress`) or a list for tests (:class:`ListProgress`).

Event kinds: ``run_start`` (data: estimate, mode, params, resumed), ``phase_start`` / ``advance`` /
``phase_end`` (phase, round, done/total), ``round_end`` (data: objective, value means, instruction),
``warning`` (data: message), ``run_end`` (data: result summary).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Protocol, runtime_checkable


@dataclass(frozen=True)
class ProgressEvent:
    kind: str
    round: int | None = None
    phase: str | None = None
    done: int = 0
    total: int = 0
    #: backend calls so far, all roles, including earlier processes of a resumed run
    calls: int = 0
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return asdict(self)


@runtime_checkable
class ProgressSink(Protocol):
    def emit(self, event: ProgressEvent) -> None: ...

    def close(self) -> None: ...


class QuietProgress:
    def emit(self, event: ProgressEvent) -> None:
        return None

    def close(self) -> None:
        return None


class ListProgress:
    """Keeps every event (tests, notebooks)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def emit(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        return None

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


class JsonLinesProgress:
    """One JSON object per event on a stream (stderr by default), flushed at once."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr

    def emit(self, event: ProgressEvent) -> None:
        self.stream.write(json.dumps(event.to_json(), ensure_ascii=False, default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        return None


_PHASE_TEXT = {
    "bare": "sampling the bare model (noisy pools)",
    "enhance": "sampling and judging responses",
    "propose": "proposing instructions",
    "refine": "scoring candidates",
    "final": "final check",
    "report": "scoring the final instruction",
}


class RichProgress:
    """A live terminal display: round, phase, items done, calls against the estimate, and the mean
    conformity per value (best pools so far, and under the current instruction)."""

    def __init__(self, console=None, refresh_per_second: float = 4.0):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.refresh_per_second = refresh_per_second
        self._live = None
        self._state: dict = {"round": None, "rounds": None, "phase": "", "done": 0, "total": 0,
                             "calls": 0, "estimate": None, "pool_means": {}, "sampled_means": {},
                             "objective": None, "titles": {}}

    # rendering ---------------------------------------------------------------------------------
    def _render(self):
        from rich.table import Table

        s = self._state
        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold")
        table.add_column()
        rnd = "-" if s["round"] is None else f"{s['round']}/{s['rounds']}"
        table.add_row("round", rnd)
        phase = _PHASE_TEXT.get(s["phase"], s["phase"])
        if s["total"]:
            phase += f"  {s['done']}/{s['total']}"
        table.add_row("phase", phase)
        est = s["estimate"]
        table.add_row("calls", f"{s['calls']:,}" + (f" of ~{est:,} estimated" if est else ""))
        if s["objective"] is not None:
            table.add_row("objective", f"{s['objective']:.4f}")
        if s["pool_means"]:
            values = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
            values.add_column("value")
            values.add_column("best pools", justify="right")
            values.add_column("current instruction", justify="right")
            for vid, mean in s["pool_means"].items():
                cur = s["sampled_means"].get(vid)
                values.add_row(
                    s["titles"].get(vid, vid),
                    "-" if mean is None else f"{mean:.3f}",
                    "-" if cur is None else f"{cur:.3f}",
                )
            outer = Table.grid()
            outer.add_row(table)
            outer.add_row(values)
            return outer
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    # events --------------------------------------------------------------------------------------
    def emit(self, event: ProgressEvent) -> None:
        s = self._state
        s["calls"] = event.calls
        if event.kind == "run_start":
            from rich.live import Live

            d = event.data
            s["rounds"] = d.get("rounds")
            s["titles"] = d.get("titles", {})
            s["estimate"] = d.get("estimate", {}).get("total_calls")
            if d.get("estimate_text"):
                self.console.print(d["estimate_text"])
            if d.get("resumed"):
                self.console.print(f"resuming the run in {d.get('run_dir')}")
            self.console.print(f"refinement mode: {d.get('mode')}")
            self._live = Live(self._render(), console=self.console,
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.start()
        elif event.kind in ("phase_start", "advance", "phase_end"):
            # the closing phases sample under a round index past the last ("3/2"): the display
            # keeps the last round that ran
            if event.round is not None and event.phase not in ("final", "report"):
                s["round"] = event.round
            s["phase"] = event.phase or ""
            s["done"], s["total"] = event.done, event.total
        elif event.kind == "round_end":
            s["pool_means"] = event.data.get("pool_means", {})
            s["sampled_means"] = event.data.get("sampled_means", {})
            s["objective"] = event.data.get("objective")
        elif event.kind == "warning":
            self.console.print(f"[yellow]warning:[/yellow] {event.data.get('message', '')}")
        elif event.kind == "run_end":
            self._refresh()
            self.close()
            d = event.data
            est = s["estimate"]
            self.console.print(
                f"done: {d.get('stop_reason')} after {d.get('rounds_completed')} round(s); "
                f"{event.calls:,} calls" + (f" (estimate ~{est:,})" if est else "")
                + f"; instruction in {d.get('run_dir')}/instruction.txt"
            )
            return
        self._refresh()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def make_progress(kind: str = "rich") -> ProgressSink:
    """A sink by name: "rich" (live terminal display), "quiet" or "json" (JSON lines on stderr)."""
    if kind == "rich":
        return RichProgress()
    if kind == "quiet":
        return QuietProgress()
    if kind == "json":
        return JsonLinesProgress()
    raise ValueError(f"unknown progress kind {kind!r}: use rich, quiet or json")


class EvaluationProgress:
    """Rows generated and judged per method during ``evaluate`` / ``compare``.

    Called by the evaluation harness as ``progress(method, rows_done, rows_total)``; shows one bar per
    method on stderr ("rich"), one JSON line per update ("json"), or nothing ("quiet").
    """

    def __init__(self, kind: str = "rich", stream: IO[str] | None = None):
        if kind not in ("rich", "json", "quiet"):
            raise ValueError(f"unknown progress kind {kind!r}: use rich, quiet or json")
        self.kind = kind
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._tasks: dict[str, int] = {}

    def __call__(self, method: str, done: int, total: int) -> None:
        if self.kind == "json":
            event = ProgressEvent("evaluate", phase=method, done=done, total=total)
            self.stream.write(json.dumps(event.to_json(), default=str) + "\n")
            self.stream.flush()
        elif self.kind == "rich":
            if self._bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
                self._bar.start()
            if method not in self._tasks:
                self._tasks[method] = self._bar.add_task(method, total=total)
            self._bar.update(self._tasks[method], completed=done, total=total)

    def close(self, failed: bool = False) -> None:
        """Stop the bars; after a failure they are removed, so the error stays the only line."""
        if self._bar is not None:
            if failed:
                self._bar.live.transient = True
            self._bar.stop()
            self._bar = None

"""Progress events of an optimization run and the sinks that show them.

The engine emits :class:`ProgressEvent`s; a sink decides what to do with them: a live terminal display
(:class:`RichProgress`), timestamped log lines when stderr is not a terminal (:class:`PlainProgress`:
nohup, CI, a batch job's log, where a live display would show nothing until the end), nothing
(:class:`QuietProgress`), one JSON object per line for machines (:class:`JsonLinesProgress`) or a
list for tests (:class:`ListProgress`).

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


def _start_lines(data: dict) -> list[str]:
    """What a run prints when it starts: the pre-flight estimate, resuming, the scoring mode."""
    lines = [data["estimate_text"]] if data.get("estimate_text") else []
    if data.get("resumed"):
        lines.append(f"resuming the run in {data.get('run_dir')}")
    lines.append(f"refinement mode: {data.get('mode')}")
    return lines


def _done_line(event: ProgressEvent, estimate: int | None) -> str:
    d = event.data
    return (f"done: {d.get('stop_reason')} after {d.get('rounds_completed')} round(s); "
            f"{event.calls:,} calls" + (f" (estimate ~{estimate:,})" if estimate else "")
            + f"; instruction in {d.get('run_dir')}/instruction.txt")


#: seconds between two progress lines of the same phase in a log (phase starts always print)
PLAIN_INTERVAL = 30.0


def _write_stamped(stream: IO[str], text: str) -> None:
    """Each line of `text` with the wall-clock time in front, flushed at once (a log's progress)."""
    stamp = time.strftime("%H:%M:%S")
    stream.write("".join(f"{stamp} {line}\n" for line in text.splitlines()))
    stream.flush()


class PlainProgress:
    """Progress as timestamped lines for a stream that is not a terminal: every phase start and
    round end, the items done within a phase at most every `interval` seconds, warnings and the end."""

    def __init__(self, stream: IO[str] | None = None, interval: float = PLAIN_INTERVAL,
                 clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self._rounds = None
        self._estimate = None
        self._last = float("-inf")

    def _line(self, text: str) -> None:
        _write_stamped(self.stream, text)

    def _where(self, event: ProgressEvent) -> str:
        phase = _PHASE_TEXT.get(event.phase or "", event.phase or "")
        if event.round is None or event.phase in ("final", "report", "bare"):
            return phase
        return f"round {event.round}/{self._rounds}: {phase}"

    def _calls(self, event: ProgressEvent) -> str:
        return f"{event.calls:,} calls" + (f" of ~{self._estimate:,}" if self._estimate else "")

    def emit(self, event: ProgressEvent) -> None:
        d = event.data
        if event.kind == "run_start":
            self._rounds = d.get("rounds")
            self._estimate = d.get("estimate", {}).get("total_calls")
            for line in _start_lines(d):
                self._line(line)
        elif event.kind == "phase_start":
            self._last = self.clock()
            self._line(f"{self._where(event)} ({self._calls(event)})")
        elif event.kind == "advance":
            now = self.clock()
            if now - self._last >= self.interval:
                self._last = now
                self._line(f"{self._where(event)} {event.done}/{event.total} ({self._calls(event)})")
        elif event.kind == "round_end":
            objective = d.get("objective")
            self._line(f"round {event.round} done: "
                       + ("instruction changed" if d.get("changed") else "instruction kept")
                       + ("" if objective is None else f", objective {objective:.4f}"))
        elif event.kind == "warning":
            self._line(f"warning: {d.get('message', '')}")
        elif event.kind == "run_end":
            self._line(_done_line(event, self._estimate))

    def close(self) -> None:
        return None


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
            for line in _start_lines(d):
                self.console.print(line)
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
            self.console.print(_done_line(event, s["estimate"]))
            return
        self._refresh()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def make_progress(kind: str = "rich", stream: IO[str] | None = None) -> ProgressSink:
    """A sink by name, on `stream` (default stderr): "rich" (a live display on a terminal,
    timestamped lines on anything else), "quiet" or "json" (JSON lines)."""
    if kind == "rich":
        stream = stream if stream is not None else sys.stderr
        if _is_terminal(stream):
            from rich.console import Console

            return RichProgress(console=Console(file=stream))
        return PlainProgress(stream)
    if kind == "quiet":
        return QuietProgress()
    if kind == "json":
        return JsonLinesProgress(stream)
    raise ValueError(f"unknown progress kind {kind!r}: use rich, quiet or json")


class EvaluationProgress:
    """Rows generated and judged per method during ``evaluate`` / ``compare``.

    Called by the evaluation harness as ``progress(method, rows_done, rows_total)``; shows one bar per
    method on stderr ("rich"; on a stream that is not a terminal, a timestamped line per method at
    most every `interval` seconds and when it completes), one JSON line per update ("json"), or
    nothing ("quiet").
    """

    def __init__(self, kind: str = "rich", stream: IO[str] | None = None,
                 interval: float = PLAIN_INTERVAL, clock=time.monotonic):
        if kind not in ("rich", "json", "quiet"):
            raise ValueError(f"unknown progress kind {kind!r}: use rich, quiet or json")
        self.stream = stream if stream is not None else sys.stderr
        self.kind = "plain" if kind == "rich" and not _is_terminal(self.stream) else kind
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._bar = None
        self._tasks: dict[str, int] = {}

    def __call__(self, method: str, done: int, total: int) -> None:
        if self.kind == "plain":
            if done == 0:  # nothing to report yet; an error before the first row stays the only line
                return
            now = self.clock()
            if done >= total or now - self._last.get(method, float("-inf")) >= self.interval:
                self._last[method] = now
                _write_stamped(self.stream, f"{method}: {done}/{total} rows")
        elif self.kind == "json":
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

"""Callbacks: what is recorded each round (metrics log, progress, checkpoint) and the console."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

__all__ = ["Callback", "CallbackList", "Console", "MetricsLog", "ProgressBar", "read_metrics"]


@runtime_checkable
class Callback(Protocol):
    """Hooks the round loop calls. Each method is optional."""


class CallbackList:
    """Calls the callbacks that define a hook, in order."""

    def __init__(self, callbacks: Sequence[object] = ()) -> None:
        self.callbacks = list(callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)

    def on_run_start(self, start_round: int, rounds: int) -> None:
        self._call("on_run_start", start_round, rounds)

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        # ``before_record`` hooks may add fields (epsilon ...) that every other callback sees.
        self._call("before_record", record, state)
        self._call("on_round_end", record, state)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._call("on_run_end", summary)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` (flushed at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, round: int) -> None:
        """Drop records of rounds after ``round`` (left by a run stopped before its checkpoint)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("round", 0) <= round]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(self.path)

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        line = json.dumps({k: _jsonable(v) for k, v in record.items()})
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (a half-written last line is ignored)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class _Phase:
    """One phase of a :class:`Console`; entering it gives ``advance(done, total)``."""

    def __init__(self, console: Console, label: str, total: int | None, unit: str,
                 completed: int = 0) -> None:
        self.console, self.label, self.total, self.unit = console, label, total, unit
        self.completed = completed
        self.started = time.perf_counter()
        self._last_line = self.started
        self._task: Any = None

    def __enter__(self) -> Callable[[int, int], None]:
        self.console._begin(self)
        return self.advance

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.console._end(self, failed=kind is not None)

    def advance(self, done: int, total: int, status: str = "") -> None:
        """``done`` of ``total`` units finished (shown at most every few seconds without a TTY)."""
        self.completed, self.total = done, total
        self.console._update(self, status)


class Console:
    """What a run shows while it works: one phase per stage (loading data, rounds,
    evaluation, baselines, report) on standard error.

    On a terminal (``stream.isatty()``) a live rich display: each phase's bar, count, elapsed
    time and ETA. Otherwise (a log file, CI, ``nohup``) plain lines, flushed at once: one when
    a phase starts and ends (with its wall time), one per round (:class:`ProgressBar`), and
    a progress line at most every ``every_s`` seconds within a long phase. :meth:`note` prints
    a line either way (an aborted round and its reason, a sampled baseline).
    """

    def __init__(self, *, stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty is not None and isatty())
        self.every_s = every_s
        self._progress: Any = None

    def phase(self, label: str, *, total: int | None = None, unit: str = "",
              completed: int = 0) -> _Phase:
        """A context manager for one stage; ``total`` units (``None``: no count, a spinner)."""
        return _Phase(self, label, total, unit, completed)

    def note(self, text: str) -> None:
        """A line of its own, above the live display on a terminal."""
        if self._progress is not None:
            from rich.markup import escape

            self._progress.console.print(escape(f"consortium: {text}"))
        else:
            self._line(f"consortium: {text}")

    def close(self) -> None:
        """Stop the live display (the results table follows on a clean terminal)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- the phases' hooks ---------------------------------------------------------------------

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _live(self) -> Any:
        if self._progress is None:
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(finished_text="✓"), TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=10), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=RichConsole(file=self.stream), transient=False,
            )
            self._progress.start()
        return self._progress

    def _begin(self, phase: _Phase) -> None:
        if self.tty:
            phase._task = self._live().add_task(
                phase.label, total=phase.total, completed=phase.completed, status=""
            )
        else:
            size = f": {phase.total:,} {phase.unit}" if phase.total and phase.unit else ""
            self._line(f"consortium: {phase.label}{size} …")

    def _update(self, phase: _Phase, status: str) -> None:
        if self.tty and phase._task is not None:
            self._live().update(phase._task, completed=phase.completed, total=phase.total,
                                status=status)
            return
        now = time.perf_counter()
        if now - phase._last_line >= self.every_s and (phase.total is None
                                                      or phase.completed < phase.total):
            phase._last_line = now
            count = f"{phase.completed:,}" + (f"/{phase.total:,}" if phase.total else "")
            self._line(f"consortium: {phase.label}: {count} {phase.unit} "
                       f"({now - phase.started:.0f} s)")

    def _end(self, phase: _Phase, *, failed: bool) -> None:
        took = time.perf_counter() - phase.started
        if self.tty and phase._task is not None:
            progress = self._live()
            total = phase.total if phase.total is not None else max(phase.completed, 1)
            progress.update(phase._task, total=total,
                            completed=total if not failed else phase.completed)
            progress.stop_task(phase._task)
        else:
            self._line(f"consortium: {phase.label}: {'stopped' if failed else 'done'} "
                       f"in {took:.1f} s")


class ProgressBar:
    """The rounds' phase of a :class:`Console`: on a terminal a bar with the latest accuracy
    and loss and an ETA; otherwise one plain line per round (round, metrics, clients, wall
    time, elapsed). An aborted round (secure aggregation that lost too many clients,
    ``min_results`` not reached) is shown with its reason in either case."""

    def __init__(self, description: str = "rounds", console: Console | None = None) -> None:
        self.description = description
        self.console = console if console is not None else Console()
        self._own = console is None
        self._phase: _Phase | None = None
        self._rounds = 0

    def on_run_start(self, start_round: int, rounds: int) -> None:
        self._rounds = rounds
        self._phase = self.console.phase(f"{self.description}: rounds", total=rounds,
                                         unit="rounds", completed=start_round)
        self._phase.__enter__()

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        phase = self._phase
        if phase is None:
            return
        rnd = int(record.get("round", phase.completed + 1))
        metrics = "  ".join(
            f"{k} {record[k]:.3f}" for k in ("accuracy", "loss") if isinstance(record.get(k), float)
        )
        aborted = record.get("aborted")
        if aborted:
            self.console.note(f"round {rnd} aborted, the model is kept: {aborted}")
        if not self.console.tty:
            wall = record.get("wall_s")
            took = f"  {wall:.1f} s" if isinstance(wall, float) else ""
            state_text = "aborted" if aborted else metrics
            self.console._line(
                f"consortium: round {rnd}/{self._rounds}  {state_text}  "
                f"clients {record.get('clients', 0)}{took}  "
                f"(elapsed {time.perf_counter() - phase.started:.0f} s)"
            )
        phase.completed = rnd
        if self.console.tty:
            self.console._update(phase, metrics)
        if rnd >= self._rounds:
            self._finish(failed=False)

    def _finish(self, *, failed: bool) -> None:
        if self._phase is not None:
            self._phase.__exit__(RuntimeError if failed else None, None, None)
            self._phase = None

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._finish(failed=False)
        if self._own:
            self.console.close()

"""Callbacks: what is recorded each round (metrics log, progress bar, checkpoint)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["Callback", "CallbackList", "MetricsLog", "ProgressBar", "read_metrics"]


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


class ProgressBar:
    """A rich progress bar with the latest accuracy and loss."""

    def __init__(self, description: str = "rounds") -> None:
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def on_run_start(self, start_round: int, rounds: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.description, total=rounds, completed=start_round, status=""
        )

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        if self._progress is None:
            return
        status = "  ".join(
            f"{k} {record[k]:.3f}" for k in ("accuracy", "loss") if isinstance(record.get(k), float)
        )
        self._progress.update(self._task, advance=1, status=status)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

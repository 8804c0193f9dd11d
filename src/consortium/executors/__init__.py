"""Executors: where a round's clients run."""

from __future__ import annotations

from consortium.errors import ConfigError
from consortium.executors.base import Executor
from consortium.executors.sequential import SequentialExecutor

__all__ = ["EXECUTORS", "Executor", "SequentialExecutor", "build_executor"]

EXECUTORS = {
    "auto": "the fastest executor that applies (sequential for now)",
    "sequential": "every client in this process, one after another",
}


def build_executor(kind: str) -> Executor:
    if kind in ("auto", "sequential"):
        return SequentialExecutor()
    raise ConfigError(f"executor.kind = {kind!r} is not known; expected one of {', '.join(EXECUTORS)}")

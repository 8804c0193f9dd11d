"""Executors: where a round's clients run."""

from __future__ import annotations

from consortium.errors import ConfigError
from consortium.executors.base import Executor
from consortium.executors.sequential import SequentialExecutor
from consortium.executors.vectorized import VectorizedExecutor

__all__ = ["EXECUTORS", "Executor", "SequentialExecutor", "VectorizedExecutor", "build_executor"]

EXECUTORS = {
    "auto": "vectorised where the model, loss and optimiser can be batched, else sequential",
    "sequential": "every client in this process, one after another",
    "vectorized": "a round's clients train together in one batched computation (torch.func)",
}


def build_executor(kind: str, *, max_memory_mb: float = 1024.0) -> Executor:
    """The executor called ``kind`` (see :data:`EXECUTORS`)."""
    if kind in ("auto", "vectorized"):
        return VectorizedExecutor(max_memory_mb=max_memory_mb)
    if kind == "sequential":
        return SequentialExecutor()
    raise ConfigError(f"executor.kind = {kind!r} is not known; expected one of {', '.join(EXECUTORS)}")

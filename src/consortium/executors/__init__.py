"""Executors: where a round's clients run."""

from __future__ import annotations

from consortium.errors import ConfigError
from consortium.executors.base import Executor
from consortium.executors.device import resolve_device
from consortium.executors.ray import RayExecutor
from consortium.executors.sequential import SequentialExecutor
from consortium.executors.vectorized import VectorizedExecutor

__all__ = [
    "EXECUTORS",
    "Executor",
    "RayExecutor",
    "SequentialExecutor",
    "VectorizedExecutor",
    "build_executor",
]

EXECUTORS = {
    "auto": "vectorised where the model, loss and optimiser can be batched, else sequential",
    "sequential": "every client in this process, one after another",
    "vectorized": "a round's clients train together in one batched computation (torch.func)",
    "ray": "groups of clients (vectorised within a group) as Ray tasks; pip install 'consortium[ray]'",
}


def build_executor(
    kind: str, *, max_memory_mb: float = 1024.0, address: str = "", workers: int = 0,
    device: str = "cpu",
) -> Executor:
    """The executor called ``kind`` (see :data:`EXECUTORS`).

    ``address`` and ``workers`` are the Ray executor's: a Ray cluster to connect to (``""``
    starts a local Ray) and how many groups run at once (0: every CPU). ``device`` is
    ``executor.device`` (:func:`~consortium.executors.device.resolve_device`): where the
    clients' models and batches live.

    Raises:
        ConfigError: an unknown ``kind``, or a ``device`` this machine does not have.
        MissingExtraError: ``kind = "ray"`` without Ray installed.
    """
    if kind not in EXECUTORS:
        raise ConfigError(
            f"executor.kind = {kind!r} is not known; expected one of {', '.join(EXECUTORS)}"
        )
    dev = resolve_device(device)
    if kind in ("auto", "vectorized"):
        return VectorizedExecutor(max_memory_mb=max_memory_mb, device=dev)
    if kind == "sequential":
        return SequentialExecutor(device=dev)
    if kind == "ray":
        return RayExecutor(address=address, workers=workers, max_memory_mb=max_memory_mb,
                           device=device)
    raise ConfigError(f"executor.kind = {kind!r} is not known; expected one of {', '.join(EXECUTORS)}")

"""Checkpoints: the run state after every round, in safetensors (tensors) and JSON (the rest).

Nothing is pickled, so a checkpoint is safe to load from anyone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from consortium.aggregation.base import PipelineState
from consortium.client.state import ClientStateStore
from consortium.errors import CheckpointError
from consortium.server.loop import RunState
from consortium.types import Layout, Parameters, TensorSpec

__all__ = ["Checkpointer", "load_checkpoint", "load_checkpoint_extras", "save_checkpoint"]

EXTRAS_FILENAME = "extras.json"

_TENSOR = "$tensor"


def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    directory: str | Path, state: RunState, clients: ClientStateStore,
    *, extras: Mapping[str, Any] | None = None,
) -> None:
    """Write ``state``, the client states and ``extras`` (JSON: what the caller's own parts
    need to resume, such as a deployment's site registry) to ``directory`` atomically."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {"params": state.params.vector.contiguous()}
    meta = {
        "format": 1,
        "round": state.round,
        "layout": state.params.layout.to_json(),
        "pipeline": _split(
            {"stages": list(state.pipeline.stages), "optimizer": state.pipeline.optimizer,
             "aggregator": state.pipeline.aggregator},
            "pipeline", tensors,
        ),
        "algorithm": _split(state.algorithm, "algorithm", tensors),
        "clients": _split(clients.to_flat(), "clients", tensors),
        "last_metrics": state.last_metrics,
        "per_client": state.per_client,
    }
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    if extras is not None:
        (tmp / EXTRAS_FILENAME).write_text(json.dumps(dict(extras)), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _existing(directory: Path) -> Path:
    """The checkpoint folder to read: ``directory``, or the previous one if a save was cut
    between its two renames."""
    if not (directory / "state.json").exists():
        old = directory.with_name(directory.name + ".old")
        if (old / "state.json").exists():
            return old
    return directory


def load_checkpoint_extras(directory: str | Path) -> dict[str, Any]:
    """The ``extras`` saved with the checkpoint in ``directory`` ({} if none were saved).

    Raises:
        CheckpointError: the file exists but is not valid JSON.
    """
    path = _existing(Path(directory)) / EXTRAS_FILENAME
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint extras {str(path)!r} are damaged: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint extras {str(path)!r} must hold a JSON object")
    return data


def load_checkpoint(directory: str | Path) -> tuple[RunState, ClientStateStore]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing or damaged files.
    """
    directory = _existing(Path(directory))
    if not (directory / "state.json").exists():
        raise CheckpointError(
            f"no checkpoint in {str(directory)!r}: the run stopped before its first round "
            "finished; start it again instead of resuming"
        )
    try:
        meta = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "tensors.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint in {str(directory)!r} is damaged: {exc}") from exc
    layout = Layout(
        tuple(
            TensorSpec(s["name"], tuple(s["shape"]), getattr(torch, s["dtype"].split(".")[-1]))
            for s in meta["layout"]
        )
    )
    pipeline = _join(meta["pipeline"], tensors)
    state = RunState(
        round=int(meta["round"]),
        params=Parameters(layout, tensors["params"]),
        pipeline=PipelineState(
            tuple(pipeline["stages"]), pipeline["optimizer"], pipeline.get("aggregator", {})
        ),
        algorithm=_join(meta["algorithm"], tensors),
        last_metrics=meta.get("last_metrics", {}),
        per_client=meta.get("per_client", {}),
    )
    return state, ClientStateStore.from_flat(_join(meta["clients"], tensors))


class Checkpointer:
    """A callback that checkpoints after every round."""

    def __init__(
        self, directory: str | Path, clients: ClientStateStore,
        extras: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clients = clients
        self.extras = extras

    def on_round_end(self, record: dict[str, Any], state: RunState) -> None:
        extras = self.extras() if self.extras is not None else None
        save_checkpoint(self.directory, state, self.clients, extras=extras)

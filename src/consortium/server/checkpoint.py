"""Checkpoints: the run state after every round, in safetensors (tensors) and JSON (the rest).

Nothing is pickled, so a checkpoint is safe to load from anyone; and nothing is taken on
trust either: :func:`load_checkpoint` refuses a model that is not finite float32 of the
expected layout, or a round outside the run. Each checkpoint has a digest
(:func:`checkpoint_digest`) that a deployment records in its audit log before the checkpoint
takes effect; ``consortium server --resume`` refuses a checkpoint whose digest is not the one
recorded (:func:`verify_checkpoint_digest`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from consortium.aggregation.base import PipelineState
from consortium.client.state import ClientStateStore
from consortium.compression.downlink import check_state
from consortium.errors import CheckpointError, PipelineError
from consortium.server.loop import RunState
from consortium.types import Layout, Parameters, TensorSpec

__all__ = [
    "Checkpointer",
    "checkpoint_digest",
    "load_checkpoint",
    "load_checkpoint_extras",
    "save_checkpoint",
    "verify_checkpoint_digest",
]

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
    on_written: Callable[[int, str], None] | None = None,
) -> None:
    """Write ``state``, the client states and ``extras`` (JSON: what the caller's own parts
    need to resume, such as a deployment's site registry) to ``directory`` atomically.

    ``on_written(round, digest)`` is called once the new checkpoint's files are complete and
    before they replace the previous ones, so that a digest is recorded for every checkpoint
    that can be found in ``directory`` (a crash in between leaves the previous checkpoint,
    whose digest was recorded before)."""
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
    if state.downlink:  # downlink compression's x̂ (absent otherwise: files as before)
        meta["downlink"] = _split(state.downlink, "downlink", tensors)
    if state.asynchronous:  # FedBuff/FedAsync's clients in flight (server.asynchronous)
        meta["asynchronous"] = _split(state.asynchronous, "asynchronous", tensors)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    if extras is not None:
        (tmp / EXTRAS_FILENAME).write_text(json.dumps(dict(extras)), encoding="utf-8")
    if on_written is not None:
        on_written(state.round, checkpoint_digest(tmp))
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


def checkpoint_digest(directory: str | Path) -> str:
    """The SHA-256 of a checkpoint's files: for each file in name order, its name, its size
    (8 bytes, big-endian) and its bytes, so a replaced, edited, added or removed file changes
    it.

    Raises:
        CheckpointError: ``directory`` is not a folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint folder at {str(directory)!r}")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "big"))
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify_checkpoint_digest(directory: str | Path, recorded: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a checkpoint that is not the last one recorded (a deployment's ``--resume``).

    ``recorded`` are the newest audit entries of kind ``"checkpoint"`` (``round``, ``sha256``),
    newest first. The checkpoint in ``directory`` must match the newest; or the one before it
    when the server stopped between recording the newest and putting it in place (the newest
    is then complete in ``<directory>.tmp``, for a later round): an older checkpoint alone is
    refused, so a run cannot be rolled back by swapping in an earlier one.

    Raises:
        CheckpointError: with the digests and what to do.
    """
    folder = _existing(Path(directory))
    if not folder.is_dir():
        raise CheckpointError(
            f"no checkpoint in {str(directory)!r}: the run stopped before its first round "
            "finished; start it again instead of resuming"
        )
    digest = checkpoint_digest(folder)
    if not recorded:
        raise CheckpointError(
            f"the audit log records no checkpoint digest, so the checkpoint in {str(folder)!r} "
            "cannot be trusted (the log was replaced or emptied, or the run predates digests); "
            "start a new run"
        )
    newest = recorded[0]
    if newest.get("sha256") == digest:
        return
    pending = Path(directory).with_name(Path(directory).name + ".tmp")
    if len(recorded) > 1 and recorded[1].get("sha256") == digest and (
        _round_of(newest) > _round_of(recorded[1])
    ) and pending.is_dir() and checkpoint_digest(pending) == newest.get("sha256"):
        return
    raise CheckpointError(
        f"the checkpoint in {str(folder)!r} has digest {digest[:16]}…, but the audit log's last "
        f"checkpoint (round {newest.get('round')}) is {str(newest.get('sha256'))[:16]}…: the "
        "checkpoint was replaced or edited after it was written. Keep it as evidence; restore "
        "the original or start a new run"
    )


def _round_of(entry: Mapping[str, Any]) -> int:
    value = entry.get("round")
    return value if isinstance(value, int) else -1


def load_checkpoint(
    directory: str | Path, *, layout: Layout | None = None, rounds: int | None = None,
) -> tuple[RunState, ClientStateStore]:
    """Read a checkpoint written by :func:`save_checkpoint`, and check what it holds.

    Args:
        directory: the checkpoint folder (``RUN_DIR/checkpoint``).
        layout: the model's layout; the checkpoint's must be the same (names, shapes).
        rounds: the run's number of rounds; the checkpoint's round must be in ``[0, rounds]``.

    Raises:
        CheckpointError: missing or damaged files; parameters not float32, not finite or of
            another layout; a round out of range.
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
    where = f"checkpoint in {str(directory)!r}"
    saved_layout, params, rnd = _checked_model(meta, tensors, where, layout=layout, rounds=rounds)
    pipeline = _join(meta["pipeline"], tensors)
    state = RunState(
        round=rnd,
        params=Parameters(saved_layout, params),
        pipeline=PipelineState(
            tuple(pipeline["stages"]), pipeline["optimizer"], pipeline.get("aggregator", {})
        ),
        algorithm=_join(meta["algorithm"], tensors),
        last_metrics=meta.get("last_metrics", {}),
        per_client=meta.get("per_client", {}),
        downlink=_join(meta.get("downlink", {}), tensors),
        asynchronous=_join(meta.get("asynchronous", {}), tensors),
    )
    try:
        check_state(state.downlink, params.numel(), where, round=rnd)
    except PipelineError as exc:
        raise CheckpointError(str(exc)) from exc
    return state, ClientStateStore.from_flat(_join(meta["clients"], tensors))


def _checked_model(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str, *,
    layout: Layout | None, rounds: int | None,
) -> tuple[Layout, torch.Tensor, int]:
    """The checkpoint's layout, parameters and round, each checked: a checkpoint is a file
    anyone with access to the run directory can replace (issue 13: NaN, wrong-size and float64
    parameters and a negative round were loaded silently)."""
    try:
        specs = tuple(
            TensorSpec(str(s["name"]), tuple(int(d) for d in s["shape"]), _float32(s["dtype"], where))
            for s in meta["layout"]
        )
        rnd = meta["round"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the model's layout or round is malformed ({exc})") from exc
    saved = Layout(specs)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0 or (
        rounds is not None and rnd > rounds
    ):
        raise CheckpointError(
            f"{where}: round {rnd!r} is not a round of this run (0 to {rounds if rounds is not None else 'rounds'}); "
            "the checkpoint was edited: restore it or start a new run"
        )
    params = tensors.get("params")
    if params is None or params.dtype != torch.float32 or params.dim() != 1:
        found = "none" if params is None else f"{params.dtype} of shape {list(params.shape)}"
        raise CheckpointError(f"{where}: the parameters must be one float32 vector, found {found}")
    if params.numel() != sum(math.prod(s.shape) for s in specs):
        raise CheckpointError(
            f"{where}: {params.numel()} parameters, but its layout holds "
            f"{sum(math.prod(s.shape) for s in specs)}: the parameters were replaced"
        )
    if layout is not None and [(s.name, tuple(s.shape)) for s in saved.specs] != [
        (s.name, tuple(s.shape)) for s in layout.specs
    ]:
        raise CheckpointError(
            f"{where}: its model has tensors {[(s.name, list(s.shape)) for s in saved.specs][:4]}…, "
            f"this run's model {[(s.name, list(s.shape)) for s in layout.specs][:4]}…: not "
            "a checkpoint of this run's model"
        )
    if not bool(torch.isfinite(params).all()):
        bad = int((~torch.isfinite(params)).sum())
        raise CheckpointError(f"{where}: {bad} parameter(s) are NaN or infinite")
    return saved, params, rnd


def _float32(dtype: object, where: str) -> torch.dtype:
    if dtype != str(torch.float32):
        raise CheckpointError(f"{where}: a model tensor of dtype {dtype!r}; checkpoints hold float32")
    return torch.float32


class Checkpointer:
    """A callback that checkpoints after every round.

    Args:
        directory: the checkpoint folder.
        clients: the client states saved with it.
        extras: called before each save; its JSON mapping is saved with the checkpoint.
        on_written: called with (round, digest) once a checkpoint is complete, before it
            takes effect (see :func:`save_checkpoint`): a deployment records the digest in its
            audit log.
    """

    def __init__(
        self, directory: str | Path, clients: ClientStateStore,
        extras: Callable[[], Mapping[str, Any]] | None = None,
        on_written: Callable[[int, str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.clients = clients
        self.extras = extras
        self.on_written = on_written

    def on_round_end(self, record: dict[str, Any], state: RunState) -> None:
        extras = self.extras() if self.extras is not None else None
        save_checkpoint(self.directory, state, self.clients, extras=extras,
                        on_written=self.on_written)

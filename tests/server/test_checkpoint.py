"""A checkpoint is checked before a run resumes from it: its contents (finite float32 parameters
of the model's layout, a round of the run) always, and its digest against the audit log in a
deployment (issue 13, point 8: replaced, NaN, wrong-size, float64 parameters and a negative
round were loaded silently)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from consortium import simulate
from consortium.errors import CheckpointError
from consortium.server.checkpoint import (
    checkpoint_digest,
    load_checkpoint,
    verify_checkpoint_digest,
)
from tests.conftest import make_toy

CFG = {"name": "ckpt", "rounds": 3, "seed": 1, "sampling": {"clients_per_round": 2}}


class StopAfter:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        if record["round"] == self.rounds:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, str]]]:
    """A run stopped after round 2, with the digests its checkpointer reported."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    digests: list[tuple[int, str]] = []
    with pytest.raises(KeyboardInterrupt):
        simulate(CFG, dataset=make_toy(), out=run, callbacks=[StopAfter(2)], report=False,
                 on_checkpoint=lambda rnd, digest: digests.append((rnd, digest)))
    return run, digests


@pytest.fixture()
def run(stopped: tuple[Path, list[tuple[int, str]]], tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped[0], copy)
    return copy


def _tensors(run: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = run / "checkpoint" / "tensors.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _state(run: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = run / "checkpoint" / "state.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _resume(run: Path) -> Any:
    return simulate(resume=run, dataset=make_toy(), report=False)


def test_an_untouched_checkpoint_resumes(run: Path) -> None:
    assert _resume(run).summary["rounds"] == 3


def test_the_digest_reported_is_the_digest_of_the_checkpoint_in_place(
    stopped: tuple[Path, list[tuple[int, str]]],
) -> None:
    path, digests = stopped
    assert [r for r, _ in digests] == [1, 2]
    assert digests[-1][1] == checkpoint_digest(path / "checkpoint")
    assert digests[0][1] != digests[1][1]


def test_nan_parameters_are_refused(run: Path) -> None:
    _tensors(run, lambda t: t["params"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"1 parameter\(s\) are NaN or infinite"):
        _resume(run)


def test_parameters_of_the_wrong_size_are_refused(run: Path) -> None:
    _tensors(run, lambda t: t.__setitem__("params", t["params"][:-1].clone()))
    with pytest.raises(CheckpointError, match="parameters, but its layout holds"):
        _resume(run)


def test_float64_parameters_are_refused(run: Path) -> None:
    _tensors(run, lambda t: t.__setitem__("params", t["params"].double()))
    with pytest.raises(CheckpointError, match="one float32 vector, found torch.float64"):
        _resume(run)


def test_a_float64_layout_is_refused(run: Path) -> None:
    _state(run, lambda m: m["layout"][0].__setitem__("dtype", "torch.float64"))
    with pytest.raises(CheckpointError, match="dtype 'torch.float64'; checkpoints hold float32"):
        _resume(run)


def test_another_models_layout_is_refused(run: Path) -> None:
    def rename(meta: dict[str, Any]) -> None:
        meta["layout"][0]["name"] = "evil.weight"

    _state(run, rename)
    with pytest.raises(CheckpointError, match="not a checkpoint of this run's model"):
        _resume(run)


@pytest.mark.parametrize("rnd", [-1, 4, "2", True])
def test_a_round_outside_the_run_is_refused(run: Path, rnd: Any) -> None:
    _state(run, lambda m: m.__setitem__("round", rnd))
    with pytest.raises(CheckpointError, match="is not a round of this run"):
        _resume(run)


def test_a_checkpoint_without_a_layout_check_still_checks_finiteness(run: Path) -> None:
    _tensors(run, lambda t: t["params"].__setitem__(1, float("inf")))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(run / "checkpoint")


# --------------------------------------------------------------- the digest (deployment resume)


def _recorded(*pairs: tuple[int, str]) -> list[dict[str, Any]]:
    """Audit entries of kind "checkpoint", newest first (as audit.last_entries returns them)."""
    return [{"kind": "checkpoint", "round": r, "sha256": d} for r, d in reversed(pairs)]


def test_a_replaced_file_changes_the_digest_and_is_refused(
    run: Path, stopped: tuple[Path, list[tuple[int, str]]]
) -> None:
    _, digests = stopped
    verify_checkpoint_digest(run / "checkpoint", _recorded(*digests))  # untouched: accepted
    _tensors(run, lambda t: t.__setitem__("params", t["params"] * 4))  # valid, but not ours
    with pytest.raises(CheckpointError, match="replaced or edited after it was written"):
        verify_checkpoint_digest(run / "checkpoint", _recorded(*digests))
    assert _resume(run).summary["rounds"] == 3  # a simulation has no audit log to hold it to


def test_an_added_file_changes_the_digest(run: Path) -> None:
    before = checkpoint_digest(run / "checkpoint")
    (run / "checkpoint" / "extras.json").write_text("{}")
    assert checkpoint_digest(run / "checkpoint") != before


def test_no_recorded_digest_is_refused(run: Path) -> None:
    with pytest.raises(CheckpointError, match="records no checkpoint digest"):
        verify_checkpoint_digest(run / "checkpoint", [])


def test_the_previous_checkpoint_is_accepted_only_in_the_window_of_a_save(
    run: Path, stopped: tuple[Path, list[tuple[int, str]]]
) -> None:
    """A server stopped after recording round 3's digest, before round 3's checkpoint (complete
    in checkpoint.tmp) took the place of round 2's: it resumes from round 2's. Without that
    pending checkpoint, an older checkpoint is a rollback and is refused."""
    _, digests = stopped
    pending = run / "checkpoint.tmp"
    shutil.copytree(run / "checkpoint", pending)
    (pending / "state.json").write_text((pending / "state.json").read_text() + " ")
    newest = (3, checkpoint_digest(pending))
    verify_checkpoint_digest(run / "checkpoint", _recorded(*digests, newest))
    shutil.rmtree(pending)
    with pytest.raises(CheckpointError, match="replaced or edited"):
        verify_checkpoint_digest(run / "checkpoint", _recorded(*digests, newest))
    # the checkpoint in place is an older one (say round 1's), round 2's was put in place since
    older = (1, checkpoint_digest(run / "checkpoint"))
    with pytest.raises(CheckpointError, match="replaced or edited"):
        verify_checkpoint_digest(run / "checkpoint", _recorded(older, (2, "a" * 64)))

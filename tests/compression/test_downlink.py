"""Downlink compression (EF21-P): x̂ by hand, its convergence to x, bytes_down, resume, refusals."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.compression import decode
from consortium.compression.downlink import Downlink, check_state, downlink_compressor
from consortium.config import ExperimentConfig
from consortium.errors import CheckpointError, ConfigError, PipelineError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.types import Layout, Parameters
from tests.conftest import make_toy

BASE = {"rounds": 3, "seed": 1, "algorithm": {"lr": 0.1}, "sampling": {"fraction": 1.0}}


def _params(x: torch.Tensor) -> Parameters:
    return Parameters(Layout.of({"x": torch.zeros(x.numel())}), x)


def test_two_rounds_of_top1_by_hand() -> None:
    """d = 10, top-10 % keeps one coordinate: a message is 'topk' (4 B) + size and k (16 B)
    + one int32 index and one float32 value (8 B) = 28 B; the whole model is 40 B."""
    down = Downlink("topk", fraction=0.1)
    x = torch.zeros(10)
    x[0], x[1], x[2] = 3.0, -5.0, 1.0
    p = _params(x)
    state = {"model": torch.zeros(10), "synced": {"a": 0}, "sent": [0]}  # a holds x̂₀ = 0

    # round 1: C(x − 0) keeps −5 at 1; a catches up with one message, b is new (whole model)
    sent, nbytes, state = down.broadcast(state, p, ["a", "b"], round=1, seed=0)
    want = torch.zeros(10)
    want[1] = -5.0
    assert torch.equal(sent.vector, want) and torch.equal(state["model"], want)
    assert nbytes == {"a": 28, "b": 40}
    # round 2: the residual (3, 0, 1, …) sends the 3
    sent, nbytes, state = down.broadcast(state, p, ["c"], round=2, seed=0)
    want[0] = 3.0
    assert torch.equal(sent.vector, want)
    assert nbytes == {"c": 40} and state["sent"] == [0, 28, 56]
    # round 3: the last coordinate arrives, x̂ = x exactly; c missed nothing (28 B), a missed
    # round 2 (56 B of messages > 40 B: it gets the whole model)
    sent, nbytes, state = down.broadcast(state, p, ["c", "a"], round=3, seed=0)
    assert torch.equal(sent.vector, x)
    assert nbytes == {"c": 28, "a": 40}
    assert state["synced"] == {"a": 3, "b": 1, "c": 3}


def test_the_quantisers_scale_is_least_squares_and_costs_4_bytes() -> None:
    v = torch.randn(300, generator=torch.Generator().manual_seed(2))
    down = Downlink("int2", chunk=64)
    step, size = down.message(v, seed=5)
    dense = decode(down.encode(v, seed=5), size=300)
    gamma = float(dense.double() @ v.double()) / float(dense.double().square().sum())
    assert 0 < gamma < 1
    assert torch.equal(step, dense * torch.tensor(gamma, dtype=torch.float32))
    assert size == down.encode(v, seed=5).nbytes + 4
    assert float((v - step).norm()) < float(v.norm())  # a contraction
    _, topk_size = Downlink("topk", fraction=0.1).message(v, seed=5)
    assert topk_size == 4 + 16 + 8 * 30  # unscaled: no extra bytes


@pytest.mark.parametrize("method", ["int8", "int4", "int2", "qsgd", "randk", "topk"])
def test_xhat_tracks_a_fixed_model(method: str) -> None:
    """With x fixed, ‖x − x̂‖ shrinks round after round (the error never accumulates)."""
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    down = Downlink(method, fraction=0.2, bits=2)
    state: dict = {"model": torch.zeros(2000), "synced": {}, "sent": [0]}
    errors = []
    for r in range(1, 31):
        _, _, state = down.broadcast(state, _params(x), [], round=r, seed=r)
        errors.append(float((x - state["model"]).norm() / x.norm()))
    assert errors[-1] < 0.5 * errors[0] and errors[-1] < 0.1, errors


def test_fp16_xhat_is_x_within_the_cast_error() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    state: dict = {"model": torch.zeros(1000), "synced": {}, "sent": [0]}
    down = Downlink("fp16")
    _, _, state = down.broadcast(state, _params(x), [], round=1, seed=0)
    assert torch.allclose(state["model"], x, rtol=2.0**-11, atol=0)
    assert not torch.equal(state["model"], x)  # the cast lost something ...
    for r in (2, 3):
        _, _, state = down.broadcast(state, _params(x), [], round=r, seed=0)
    # ... which then arrived, down to half of fp16's finest step (its smallest subnormal, 2⁻²⁴)
    assert float((state["model"] - x).abs().max()) <= 2.0**-25


def test_an_fp16_downlink_run_stays_near_the_uncompressed_one() -> None:
    toy = make_toy(4)
    dense = consortium.simulate(BASE, dataset=toy, report=False)
    half = consortium.simulate({**BASE, "compression": {"downlink": "fp16"}}, dataset=toy,
                               report=False)
    assert torch.allclose(dense.params.vector, half.params.vector, atol=1e-4)
    assert not torch.equal(dense.params.vector, half.params.vector)


def test_bytes_down_by_hand() -> None:
    """4 clients, all every round, d = 12 (logistic on 5 features, 2 classes): round 1 sends
    each the whole model (48 B); then one int8 message each: 'int' (3 B) + size, bits, chunk
    (24 B) + 12 one-byte codes + one float32 bucket scale + the float32 γ = 47 B."""
    toy = make_toy(4)
    run = consortium.simulate({**BASE, "compression": {"downlink": "int8"}}, dataset=toy,
                              report=False)
    assert run.params.vector.numel() == 12
    assert [r["bytes_down"] for r in run.history] == [4 * 48, 4 * 47, 4 * 47]
    dense = consortium.simulate(BASE, dataset=toy, report=False)
    assert [r["bytes_down"] for r in dense.history] == [4 * 48] * 3


def test_sequential_and_vectorised_agree() -> None:
    toy = make_toy(6)
    cfg = {**BASE, "rounds": 4, "sampling": {"fraction": 0.5},
           "compression": {"downlink": "int4"}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor(), report=False)
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor(), report=False)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-5)
    assert [r["bytes_down"] for r in a.history] == [r["bytes_down"] for r in b.history]


def test_resume_is_bit_identical(tmp_path) -> None:
    class Stop:
        def on_round_end(self, record, state) -> None:  # type: ignore[no-untyped-def]
            if record["round"] == 2:
                raise KeyboardInterrupt

    toy = make_toy(6)
    cfg = {**BASE, "rounds": 5, "sampling": {"fraction": 0.5},
           "compression": {"downlink": "int4", "uplink": "topk", "fraction": 0.5,
                           "error_feedback": True}}
    whole = consortium.simulate(cfg, dataset=toy, out=tmp_path / "a", report=False)
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(cfg, dataset=toy, out=tmp_path / "b", report=False, callbacks=[Stop()])
    resumed = consortium.simulate(resume=tmp_path / "b", dataset=toy, report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    assert [r["bytes_down"] for r in whole.history] == [r["bytes_down"] for r in resumed.history]


def test_a_checkpoint_with_a_bad_xhat_is_refused(tmp_path) -> None:
    from consortium.server.checkpoint import load_checkpoint, save_checkpoint

    toy = make_toy(2)
    cfg = {**BASE, "rounds": 1, "compression": {"downlink": "int8"}}
    consortium.simulate(cfg, dataset=toy, out=tmp_path / "run", report=False)
    state, store = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert state.downlink["model"].numel() == 12 and state.downlink["sent"][0] == 0
    state.downlink["model"] = torch.full((12,), float("nan"))
    save_checkpoint(tmp_path / "bad", state, store)
    with pytest.raises(CheckpointError, match="downlink model"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(PipelineError, match="float32"):
        check_state({"model": torch.zeros(3, dtype=torch.float64), "synced": {}, "sent": [0]},
                    3, "here", round=0)
    with pytest.raises(PipelineError, match="malformed"):  # one byte total short of round 2
        check_state({"model": torch.zeros(3), "synced": {"a": 1}, "sent": [0, 5]}, 3, "here",
                    round=2)
    check_state({"model": torch.zeros(3), "synced": {"a": 1}, "sent": [0, 5, 9]}, 3, "here",
                round=2)


def test_fedprox_runs_with_a_compressed_downlink() -> None:
    cfg = {**BASE, "algorithm": {"name": "fedprox", "mu": 0.1, "lr": 0.1},
           "compression": {"downlink": "qsgd", "bits": 4}}
    run = consortium.simulate(cfg, dataset=make_toy(4), report=False)
    assert bool(torch.isfinite(run.params.vector).all())


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"compression": {"downlink": "sign"}}, "no magnitude"),
     ({"compression": {"downlink": "powersgd"}}, "warm start"),
     ({"compression": {"downlink": "int8"}, "algorithm": {"name": "scaffold"}}, "scaffold"),
     ({"compression": {"downlink": "int8"}, "algorithm": {"name": "fednova"}}, "fednova"),
     ({"compression": {"downlink": "int8"}, "algorithm": {"name": "fedper"}}, "fedper"),
     ({"compression": {"downlink": "topk", "fraction": 0.0}}, "fraction")],
)
def test_refused_combinations(changes: dict, message: str) -> None:
    cfg = ExperimentConfig.from_dict(changes)
    with pytest.raises(ConfigError, match=message):
        downlink_compressor(cfg)


def test_deployment_keeps_a_reference_per_site_and_none_builds_nothing() -> None:
    cfg = ExperimentConfig.from_dict({"compression": {"downlink": "int8"}})
    deployed = downlink_compressor(cfg, deployed=True)
    assert deployed is not None and deployed.per_client and deployed.deployed
    assert isinstance(downlink_compressor(cfg), Downlink)
    assert downlink_compressor(ExperimentConfig()) is None


def test_digits_int8_downlink_within_a_point_of_float32() -> None:
    """digits, CNN, 20 clients (Dirichlet 0.3), 10 a round, 30 rounds: int8 on the downlink
    costs at most one point of accuracy."""
    cfg = {"seed": 0, "rounds": 30,
           "data": {"dataset": "digits", "clients": 20, "partition": "dirichlet", "alpha": 0.3},
           "model": {"name": "cnn"},
           "algorithm": {"lr": 0.05, "batch_size": 16, "local_epochs": 1},
           "sampling": {"clients_per_round": 10}, "evaluation": {"every": 30}}
    dense = consortium.simulate(cfg, report=False)
    int8 = consortium.simulate({**cfg, "compression": {"downlink": "int8"}}, report=False)
    a, b = dense.summary["final"]["accuracy"], int8.summary["final"]["accuracy"]
    assert b >= a - 0.01, (a, b)
    down = [sum(r["bytes_down"] for r in x.history) for x in (dense, int8)]
    assert down[1] < down[0]

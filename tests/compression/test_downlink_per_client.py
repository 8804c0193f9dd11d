"""Per-client downlink references (``compression.downlink_reference = "per_client"``): each
client's x̂ᵢ by hand, bytes, memory refusal, executors, resume, and the site's strict side."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.compression import Encoded
from consortium.compression.downlink import (
    RESYNC,
    Downlink,
    DownlinkMismatch,
    ModelDelta,
    SiteReference,
    check_state,
    downlink_compressor,
    model_sha256,
)
from consortium.config import ExperimentConfig
from consortium.errors import CheckpointError, ConfigError, PipelineError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.seeds import derive_seed
from consortium.types import Layout, Parameters
from tests.conftest import make_toy

BASE = {"rounds": 3, "seed": 1, "algorithm": {"lr": 0.1}, "sampling": {"fraction": 1.0}}
PER_CLIENT = {"downlink": "int8", "downlink_reference": "per_client"}


def _params(x: torch.Tensor) -> Parameters:
    return Parameters(Layout.of({"x": torch.zeros(x.numel())}), x)


def test_two_contacts_of_top1_by_hand() -> None:
    """d = 10, top-10 % keeps one coordinate (a message: 'topk' 4 B + size and k 16 B + one
    int32 index and one float32 value 8 B = 28 B; the model: 40 B). Client a is reached in
    rounds 1 and 3, b in 2 and 3: each gets the model whole first, then the one largest
    coordinate of x − x̂ᵢ, whatever the other received."""
    down = Downlink("topk", fraction=0.1, reference="per_client")
    x1 = torch.tensor([3.0, -5.0, 1.0, 0, 0, 0, 0, 0, 0, 0])
    sent, nbytes, deltas, state = down.send({}, _params(x1), ["a"], round=1, seed=0, population=2)
    assert torch.equal(sent["a"].vector, x1) and nbytes == {"a": 40} and deltas == {}

    x2 = x1 + torch.tensor([0, 0, 0, 2.0, 0, 0, 0, 0, 0, 0.5])  # the server stepped
    sent, nbytes, _, state = down.send(state, _params(x2), ["b"], round=2, seed=0, population=2)
    assert torch.equal(sent["b"].vector, x2) and nbytes == {"b": 40}

    x3 = x2 + torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, -4.0, 0])
    sent, nbytes, _, state = down.send(state, _params(x3), ["a", "b"], round=3, seed=0,
                                       population=2)
    # a: x3 − x1 = (0, 0, 0, 2, 0, 0, 0, 0, −4, 0.5): its −4 arrives
    want_a = x1.clone()
    want_a[8] = -4.0
    # b: x3 − x2 = −4 at 8 only: b now holds x3 exactly
    assert torch.equal(sent["a"].vector, want_a) and torch.equal(sent["b"].vector, x3)
    assert nbytes == {"a": 28, "b": 28}
    assert state["synced"] == {"a": 3, "b": 3}
    assert torch.equal(state["models"]["a"], want_a)


def test_the_quantised_message_is_the_shared_modes_with_the_clients_seed() -> None:
    x0 = torch.randn(300, generator=torch.Generator().manual_seed(0))
    x1 = x0 + 0.1 * torch.randn(300, generator=torch.Generator().manual_seed(1))
    down = Downlink("int4", chunk=64, reference="per_client", deployed=True)
    _, _, _, state = down.send({}, _params(x0), ["a"], round=1, seed=7, population=1)
    sent, nbytes, deltas, _ = down.send(state, _params(x1), ["a"], round=2, seed=7, population=1)
    step, size = down.message(x1 - x0, seed=derive_seed(7, "a"))
    assert torch.equal(sent["a"].vector, x0 + step) and nbytes == {"a": size}
    delta = deltas["a"]  # what a deployed task carries
    assert delta.reference_round == 1 and delta.nbytes == size
    assert delta.sha256 == model_sha256(x0 + step) and delta.scale is not None


def test_a_message_as_large_as_the_model_sends_the_model() -> None:
    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    down = Downlink("topk", fraction=1.0, reference="per_client", deployed=True)
    _, _, _, state = down.send({}, _params(x), ["a"], round=1, seed=0, population=1)
    sent, nbytes, deltas, _ = down.send(state, _params(x * 2), ["a"], round=2, seed=0,
                                        population=1)
    assert torch.equal(sent["a"].vector, x * 2) and nbytes == {"a": 40} and deltas == {}


def test_too_many_references_are_refused_with_the_number_and_the_fix() -> None:
    down = Downlink("int8", reference="per_client", memory_mb=1.0)
    with pytest.raises(ConfigError, match=r"1000 clients x 1000 float32 values = 4 MiB.*"
                                          r"downlink_memory_mb"):
        down.send({}, _params(torch.zeros(1000)), ["a"], round=1, seed=0, population=1000)
    down.send({}, _params(torch.zeros(1000)), ["a"], round=1, seed=0, population=200)


def test_config_keys_and_defaults() -> None:
    assert downlink_compressor(ExperimentConfig.from_dict(
        {"compression": {"downlink": "int8"}})).reference == "shared"  # type: ignore[union-attr]
    down = downlink_compressor(ExperimentConfig.from_dict(
        {"compression": {**PER_CLIENT, "downlink_memory_mb": 10}}))
    assert down is not None and down.per_client and down.memory_mb == 10 and not down.deployed
    with pytest.raises(ConfigError, match="downlink_memory_mb"):
        downlink_compressor(ExperimentConfig.from_dict(
            {"compression": {**PER_CLIENT, "downlink_memory_mb": 0}}))


def test_bytes_down_at_half_participation(tmp_path) -> None:
    """6 clients, 3 a round, 5 rounds, d = 12: a client's first task costs 48 B, every later
    one 47 B (int8: 'int' 3 B + 24 B header + 12 codes + one scale + γ), however long it was
    away: the run's total is 15 × 47 B plus 1 B for each client ever reached."""
    from consortium.server.checkpoint import load_checkpoint

    cfg = {**BASE, "rounds": 5, "sampling": {"fraction": 0.5}, "compression": PER_CLIENT}
    run = consortium.simulate(cfg, dataset=make_toy(6), out=tmp_path, report=False)
    state, _ = load_checkpoint(tmp_path / "checkpoint")
    reached = len(state.downlink["models"])
    assert 3 <= reached <= 6 and set(state.downlink["synced"]) == set(state.downlink["models"])
    assert run.history[0]["bytes_down"] == 3 * 48
    assert all(3 * 47 <= r["bytes_down"] <= 3 * 48 for r in run.history)
    assert sum(r["bytes_down"] for r in run.history) == 15 * 47 + reached


def test_sequential_and_vectorised_agree() -> None:
    toy = make_toy(6)
    cfg = {**BASE, "rounds": 4, "sampling": {"fraction": 0.5},
           "compression": {**PER_CLIENT, "downlink": "int4"}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor(), report=False)
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor(), report=False)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-5)
    assert [r["bytes_down"] for r in a.history] == [r["bytes_down"] for r in b.history]
    shared = consortium.simulate({**cfg, "compression": {"downlink": "int4"}}, dataset=toy,
                                 executor=SequentialExecutor(), report=False)
    assert not torch.equal(a.params.vector, shared.params.vector)  # the mode matters


def test_resume_is_bit_identical_and_a_bad_reference_is_refused(tmp_path) -> None:
    class Stop:
        def on_round_end(self, record, state) -> None:  # type: ignore[no-untyped-def]
            if record["round"] == 2:
                raise KeyboardInterrupt

    toy = make_toy(6)
    cfg = {**BASE, "rounds": 5, "sampling": {"fraction": 0.5}, "compression": PER_CLIENT}
    whole = consortium.simulate(cfg, dataset=toy, out=tmp_path / "a", report=False)
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(cfg, dataset=toy, out=tmp_path / "b", report=False, callbacks=[Stop()])
    resumed = consortium.simulate(resume=tmp_path / "b", dataset=toy, report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)
    assert [r["bytes_down"] for r in whole.history] == [r["bytes_down"] for r in resumed.history]

    from consortium.server.checkpoint import load_checkpoint, save_checkpoint

    state, store = load_checkpoint(tmp_path / "a" / "checkpoint")
    cid = next(iter(state.downlink["models"]))
    state.downlink["models"][cid] = torch.full((12,), float("inf"))
    save_checkpoint(tmp_path / "bad", state, store)
    with pytest.raises(CheckpointError, match="downlink model"):
        load_checkpoint(tmp_path / "bad")
    with pytest.raises(PipelineError, match="malformed"):
        check_state({"models": {"a": torch.zeros(3)}, "synced": {}}, 3, "here", round=1)


# -- the site's side (deployment) ---------------------------------------------------------------


def _delta(down: Downlink, x0: torch.Tensor, x1: torch.Tensor) -> ModelDelta:
    _, _, _, state = down.send({}, _params(x0), ["s"], round=1, seed=3, population=1)
    _, _, deltas, _ = down.send(state, _params(x1), ["s"], round=2, seed=3, population=1)
    return deltas["s"]


@pytest.mark.parametrize("method", ["int8", "int2", "qsgd", "topk", "randk", "fp16", "bf16"])
def test_the_site_rebuilds_the_servers_model_bit_for_bit(method: str) -> None:
    x0 = torch.randn(700, generator=torch.Generator().manual_seed(0))
    x1 = x0 + 0.05 * torch.randn(700, generator=torch.Generator().manual_seed(1))
    down = Downlink(method, fraction=0.1, chunk=128, reference="per_client", deployed=True)
    delta = _delta(down, x0, x1)
    site = SiteReference(method, _params(x0).layout, bits=down.bits, chunk=down.chunk)
    site.keep(1, x0)
    rebuilt = site.resolve(2, delta)
    assert model_sha256(rebuilt.vector) == delta.sha256 and site.round == 2


def test_the_site_refuses_what_does_not_fit_and_keeps_its_reference() -> None:
    x0 = torch.randn(300, generator=torch.Generator().manual_seed(0))
    x1 = x0 + 0.05
    down = Downlink("int8", chunk=64, reference="per_client", deployed=True)
    delta = _delta(down, x0, x1)
    layout = _params(x0).layout
    site = SiteReference("int8", layout, chunk=64)
    with pytest.raises(DownlinkMismatch, match="holds no model"):
        site.resolve(2, delta)
    site.keep(1, x0)
    enc = delta.encoded
    bad = {
        "round": (ModelDelta(enc, delta.scale, 5, delta.sha256), "model of round 5"),
        "hash": (ModelDelta(enc, delta.scale, 1, b"\0" * 32), "SHA-256"),
        "kind": (ModelDelta(Encoded("fp16", 300, (), values=torch.zeros(300).half()), None, 1,
                            delta.sha256), "'fp16' message"),
        "bits": (ModelDelta(Encoded("int", 300, (4, 64), codes=enc.codes, scales=enc.scales),
                            delta.scale, 1, delta.sha256), "header"),
        "size": (ModelDelta(Encoded("int", 10**6, enc.header, codes=enc.codes,
                                    scales=enc.scales), delta.scale, 1, delta.sha256),
                 "does not decode"),
        "codes": (ModelDelta(Encoded("int", 300, enc.header, codes=enc.codes[:-1],
                                     scales=enc.scales), delta.scale, 1, delta.sha256),
                  "does not decode"),
        "chunk": (ModelDelta(Encoded("int", 300, (8, 1 << 40), codes=enc.codes,
                                     scales=enc.scales[:1]), delta.scale, 1, delta.sha256),
                  "header"),
        "wire": (ModelDelta(None, delta.scale, 1, b"", problem="values lie"), "values lie"),
        "scale": (ModelDelta(enc, float("nan"), 1, delta.sha256), "scale"),
        "no scale": (ModelDelta(enc, None, 1, delta.sha256), "scale"),
    }
    for name, (d, reason) in bad.items():
        with pytest.raises(DownlinkMismatch, match=reason) as info:
            site.resolve(2, d)
        assert str(info.value).startswith(RESYNC), name
        assert site.round == 1 and torch.equal(site.vector, x0), name  # type: ignore[arg-type]
    server = down.send({"models": {"s": x0}, "synced": {"s": 1}}, _params(x1), ["s"], round=2,
                       seed=3, population=1)[0]["s"].vector
    assert torch.equal(site.resolve(2, delta).vector, server)  # the honest message still fits

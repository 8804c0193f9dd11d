"""The compression stage in pipelines and runs: error feedback, executors, bytes, refusals."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.aggregation.base import ClientContext, Pipeline, RoundContext
from consortium.cli import main
from consortium.compression import Compress, Encoded, compress
from consortium.compression.admit import admit
from consortium.compression.codecs import encode_topk
from consortium.config import ExperimentConfig
from consortium.errors import ClientError, ConfigError
from consortium.executors import SequentialExecutor, VectorizedExecutor
from consortium.messages import Result
from consortium.privacy.central import CentralDP
from consortium.reporting.callbacks import read_metrics
from consortium.types import Layout, Update
from tests.conftest import make_toy

BASE = {"rounds": 3, "seed": 1, "algorithm": {"lr": 0.1}, "sampling": {"fraction": 1.0}}


def _topk_1pct(error_feedback: bool, rounds: int = 1500) -> float:
    """Two clients pull coordinate 0 apart (±M) and agree on a small signal u elsewhere.

    Top-1 % of d = 100 keeps one coordinate: without feedback both send coordinate 0, which
    cancels, and u never arrives (the model stays at 0); with feedback the residual of u grows
    until it is sent. Returns ``‖x − u‖ / ‖u‖`` after ``rounds`` rounds of one GD step each.
    """
    d, lr = 100, 0.01
    layout = Layout.of({"x": torch.zeros(d)})
    u = torch.ones(d)
    u[0] = 0.0
    targets = [u.clone(), u.clone()]
    targets[0][0], targets[1][0] = 10.0, -10.0
    p = Pipeline([compress("topk", fraction=0.01, error_feedback=error_feedback)])
    state, x = p.init(layout), torch.zeros(d)
    kept: list[dict[str, torch.Tensor]] = [{}, {}]
    for r in range(1, rounds + 1):
        updates = [
            p.client(Update(f"c{i}", lr * (targets[i] - x), 1.0), p.broadcast(state),
                     ClientContext(r, f"c{i}", r, state=kept[i]))
            for i in range(2)
        ]
        agg, state = p.aggregate(updates, state, RoundContext(r, 0, 2, 2, layout))
        assert agg is not None
        x = x + agg.delta
    return float((x - u).norm() / u.norm())


def test_top1pct_stalls_without_error_feedback_and_converges_with_it() -> None:
    assert _topk_1pct(False) == pytest.approx(1.0)  # stalled: x never moved
    assert _topk_1pct(True) < 0.1


def test_client_half_replaces_the_delta_and_keeps_the_residual() -> None:
    stage = compress("topk", fraction=0.5, error_feedback=True)
    state: dict[str, torch.Tensor] = {}
    out = stage.client(Update("a", torch.tensor([1.0, -4.0, 3.0, 0.5]), 2.0), {},
                       ClientContext(1, "a", 0, state=state))
    assert out.delta.numel() == 0 and isinstance(out.encoded, Encoded) and out.weight == 2.0
    assert state["compression.residual"].tolist() == [1.0, 0.0, 0.0, 0.5]
    out = stage.client(Update("a", torch.tensor([0.0, 0.0, 0.0, 0.0]), 2.0), {},
                       ClientContext(2, "a", 0, state=state))
    assert out.encoded.indices.tolist() == [0, 3]  # the residual is what is sent next
    assert Result(1, "a", out).nbytes == out.encoded.nbytes == 4 + 16 + 2 * 8


def test_error_feedback_needs_the_client_state() -> None:
    with pytest.raises(consortium.errors.PipelineError, match="persistent state"):
        compress("topk", error_feedback=True).client(
            Update("a", torch.ones(3), 1.0), {}, ClientContext(1, "a", 0))


def _bytes(history: list[dict]) -> int:
    return sum(r["bytes_up"] for r in history)


def test_run_counts_the_encoded_bytes() -> None:
    toy = make_toy(4)
    dense = consortium.simulate(BASE, dataset=toy)
    cfg = {**BASE, "compression": {"uplink": "topk", "fraction": 0.25, "error_feedback": True}}
    sparse = consortium.simulate(cfg, dataset=toy)
    d = dense.params.vector.numel()
    k = max(1, round(0.25 * d))
    for a, b in zip(dense.history, sparse.history):
        assert a["bytes_up"] == a["clients"] * 4 * d
        assert b["bytes_up"] == b["clients"] * (len("topk") + 16 + 8 * k)
    half = consortium.simulate({**BASE, "compression": {"uplink": "fp16"}}, dataset=toy)
    assert [r["bytes_up"] for r in half.history] == [
        r["clients"] * (4 + 8 + 2 * d) for r in half.history]


@pytest.mark.parametrize(
    "compression",
    [{"uplink": "topk", "fraction": 0.3, "error_feedback": True},
     {"uplink": "qsgd", "bits": 2, "error_feedback": True},
     {"uplink": "int4"}, {"uplink": "sign", "sign_lr": 0.01}],
)
def test_sequential_and_vectorised_agree(compression: dict) -> None:
    toy = make_toy(6)
    cfg = {**BASE, "rounds": 4, "sampling": {"fraction": 0.5}, "compression": compression}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=VectorizedExecutor())
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-5)
    assert [r["bytes_up"] for r in a.history] == [r["bytes_up"] for r in b.history]


def test_powersgd_runs_on_an_mlp_and_sends_fewer_bytes() -> None:
    toy = make_toy(4, d=20)
    cfg = {**BASE, "model": {"name": "mlp"}}
    dense = consortium.simulate(cfg, dataset=toy)
    low = consortium.simulate(
        {**cfg, "compression": {"uplink": "powersgd", "rank": 2, "error_feedback": True}},
        dataset=toy)
    assert bool(torch.isfinite(low.params.vector).all())
    assert _bytes(low.history) < _bytes(dense.history) / 2


def test_error_feedback_survives_resume(tmp_path) -> None:
    class Stop:
        def on_round_end(self, record, state) -> None:  # type: ignore[no-untyped-def]
            if record["round"] == 2:
                raise KeyboardInterrupt

    toy = make_toy(4)
    cfg = {**BASE, "rounds": 4, "compression": {"uplink": "topk", "fraction": 0.2,
                                                "error_feedback": True}}
    whole = consortium.simulate(cfg, dataset=toy, out=tmp_path / "a", report=False)
    with pytest.raises(KeyboardInterrupt):
        consortium.simulate(cfg, dataset=toy, out=tmp_path / "b", report=False, callbacks=[Stop()])
    resumed = consortium.simulate(resume=tmp_path / "b", dataset=toy, report=False)
    assert torch.equal(whole.params.vector, resumed.params.vector)


def test_central_dp_reclips_the_decoded_update() -> None:
    layout = Layout.of({"x": torch.zeros(4)})
    clip = 1.0
    dp, comp = CentralDP(noise_multiplier=1.0, clip=clip), compress("topk", fraction=0.5)
    # a site that skipped the clip: the decoded delta has norm 50
    enc = encode_topk(torch.tensor([30.0, 40.0, 0.0, 0.0]), 0.5)
    u = Update("a", torch.zeros(0), 1.0, extras={"dp.unclipped": torch.tensor([0.5])}, encoded=enc)
    ctx = RoundContext(1, 0, 1, 1, layout)
    got = dp.receive(comp.receive(u, {}, ctx), dp.init(layout), ctx)
    assert float(got.delta.norm()) == pytest.approx(clip, rel=1e-5)
    assert float(got.extras["dp.unclipped"][0]) == -0.5


def test_central_dp_with_compression_runs() -> None:
    cfg = {**BASE, "privacy": {"mode": "central", "noise_multiplier": 0.5, "clip": 0.5},
           "compression": {"uplink": "qsgd", "bits": 3}}
    result = consortium.simulate(cfg, dataset=make_toy(6))
    assert result.summary["privacy"]["epsilon"] > 0


def test_a_malformed_update_is_rejected_and_the_rest_aggregate(monkeypatch) -> None:
    real = Compress.encode

    def encode(self, v, ctx, state, payload):  # type: ignore[no-untyped-def]
        enc = real(self, v, ctx, state, payload)
        if ctx.client_id == "c0":  # a duplicated index
            enc = Encoded("topk", enc.size, (2,), indices=torch.tensor([1, 1], dtype=torch.int32),
                          values=torch.ones(2))
        return enc

    monkeypatch.setattr(Compress, "encode", encode)
    cfg = {**BASE, "rounds": 1, "compression": {"uplink": "topk", "fraction": 0.2}}
    result = consortium.simulate(cfg, dataset=make_toy(4))
    record = result.history[0]
    assert record["clients"] == 3
    assert "repeat" in record["failed"]["c0"] and record["failed"]["c0"].startswith("rejected")
    assert bool(torch.isfinite(result.params.vector).all())


def test_every_update_rejected_leaves_no_model(monkeypatch) -> None:
    monkeypatch.setattr(Compress, "encode", lambda self, v, ctx, state, payload: Encoded(
        "topk", v.numel(), (1,), indices=torch.tensor([v.numel()], dtype=torch.int32),
        values=torch.ones(1)))
    cfg = {**BASE, "rounds": 1, "compression": {"uplink": "topk"}}
    with pytest.raises(ClientError, match="outside"):
        consortium.simulate(cfg, dataset=make_toy(2))


def test_admit_rejects_an_encoding_the_run_does_not_expect() -> None:
    layout = Layout.of({"x": torch.zeros(4)})
    enc = encode_topk(torch.ones(4), 0.5)
    r = Result(1, "a", Update("a", torch.zeros(0), 1.0, encoded=enc))
    assert admit(r, [compress("topk", fraction=0.5)], layout) is r
    assert admit(r, [], layout).error.startswith("rejected: ")  # a run without compression
    bad = admit(r, [compress("qsgd")], layout)
    assert bad.update is None and "expects 'qsgd'" in bad.error
    dense = Result(1, "a", Update("a", torch.ones(4), 1.0))
    assert "no topk encoding" in admit(dense, [compress("topk")], layout).error


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secure_aggregation": {"enabled": True}}, "secure aggregation"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0},
          "compression": {"uplink": "sign"}}, "central DP"),
        ({"aggregation": {"rule": "median"}, "compression": {"uplink": "sign"}}, "majority vote"),
        ({"compression": {"uplink": "sign", "error_feedback": True}}, "error_feedback = false"),
        ({"compression": {"uplink": "powersgd"}}, "error_feedback = true"),
        ({"compression": {"uplink": "topk", "fraction": 0.0}}, "fraction"),
    ],
)
def test_refused_combinations(changes: dict, message: str) -> None:
    cfg = {**BASE, "compression": {"uplink": "topk"}, **changes}
    with pytest.raises(ConfigError, match=message):
        consortium.simulate(cfg, dataset=make_toy(4))


def test_local_dp_composes() -> None:
    cfg = {**BASE, "privacy": {"mode": "local", "noise_multiplier": 0.5, "clip": 1.0},
           "compression": {"uplink": "sign"}}
    assert consortium.simulate(cfg, dataset=make_toy(4)).history[-1]["clients"] == 4


def test_cli_run_shows_the_smaller_bytes_up(tmp_path) -> None:
    fast = ["--set", "rounds=2", "--no-progress", "--set", "evaluation.baselines=[]"]
    assert main(["run", "--out", str(tmp_path / "a"), *fast]) == 0
    assert main(["run", "--out", str(tmp_path / "b"), *fast, "--set", "compression.uplink=topk",
                 "--set", "compression.fraction=0.1", "--set", "compression.error_feedback=true"]) == 0
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert all(y["bytes_up"] * 3 < x["bytes_up"] for x, y in zip(a, b))
    assert all(x["bytes_down"] == y["bytes_down"] for x, y in zip(a, b))
    assert ExperimentConfig.from_dict({"compression": {"uplink": "topk"}}).compression.uplink == "topk"


def test_a_deployed_site_builds_every_method_powersgd_included() -> None:
    from consortium.compression import compression_stage

    cfg = ExperimentConfig.from_dict({"compression": {"uplink": "topk"}})
    assert isinstance(compression_stage(cfg), Compress)
    assert isinstance(compression_stage(cfg, deployed=True), Compress)  # EncodedUpdate travels
    low = ExperimentConfig.from_dict({"compression": {"uplink": "powersgd",
                                                      "error_feedback": True}})
    assert isinstance(compression_stage(low), Compress)
    site = compression_stage(low, deployed=True)
    assert isinstance(site, Compress) and site.broadcast(site.init(Layout.of({}))) == {}
    assert compression_stage(ExperimentConfig()) is None


def test_powersgd_takes_the_shapes_from_the_clients_own_layout() -> None:
    layout = Layout.of({"w": torch.zeros(6, 5), "b": torch.zeros(6)})
    stage = compress("powersgd", rank=1, error_feedback=True)
    assert stage.broadcast(stage.init(layout)) == {}  # nothing about the shapes travels
    v = torch.randn(36, generator=torch.Generator().manual_seed(0))
    state: dict[str, torch.Tensor] = {}
    out = stage.client(Update("a", v, 1.0), {}, ClientContext(1, "a", 0, state=state,
                                                              layout=layout))
    assert out.encoded.kind == "lowrank" and out.encoded.values.numel() == (6 + 5) * 1 + 6
    assert state["compression.q"].numel() == 5  # the warm start for the next round
    sent = stage.decoded(out, layout)  # the server decodes with its own layout
    assert torch.allclose(state["compression.residual"], v - sent)
    assert torch.equal(sent[30:], v[30:])  # the bias travels raw
    with pytest.raises(consortium.errors.PipelineError, match="ClientContext\\(layout=...\\)"):
        stage.client(Update("a", v, 1.0), {}, ClientContext(1, "a", 0, state={}))


def test_sign_majority_vote_by_hand() -> None:
    layout = Layout.of({"x": torch.zeros(3)})
    p = Pipeline([compress("sign", sign_lr=0.5)])
    state = p.init(layout)
    deltas = [[1.0, -2.0, 3.0], [2.0, -1.0, -1.0], [-5.0, 1.0, -1.0]]
    # weights 10, 1, 1 do not count: one vote per client
    ups = [p.client(Update(f"c{i}", torch.tensor(d), w), p.broadcast(state),
                    ClientContext(1, f"c{i}", 0)) for i, (d, w) in enumerate(zip(deltas, [10, 1, 1]))]
    assert all(u.weight == 1.0 for u in ups)
    agg, _ = p.aggregate(ups, state, RoundContext(1, 0, 3, 3, layout))
    assert agg is not None and agg.delta.tolist() == [0.5, -0.5, -0.5]


def test_lowrank_refuses_a_wrong_length() -> None:
    from consortium.compression import MalformedUpdate, decode

    enc = Encoded("lowrank", 35, (2,), values=torch.zeros(26))
    with pytest.raises(MalformedUpdate, match="header says 27"):
        decode(enc, size=35, shapes=[[6, 5], [5]])
    with pytest.raises(MalformedUpdate, match="needs the model's shapes"):
        decode(enc, size=35)

"""Random-k through secure aggregation (issue 17) and the masked vector's 4-byte wire form.

Random-k composes with SecAgg+ because every client of a round keeps the same coordinates
(:mod:`consortium.compression.secure`): the unmasked sum of the ``k``-coordinate vectors is the
sum of the clients' random-k vectors, scattered back into ``d`` by the server. The masked
vector travels as uint32 words (the modulus is ``2**32``), counted at 4 bytes a coordinate.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import pytest
import torch

pytest.importorskip("cryptography")

import consortium
from consortium.aggregation.base import ClientContext, RoundContext
from consortium.compression.secure import round_coordinates
from consortium.errors import ConfigError, PipelineError
from consortium.secagg.messages import MaskedInput, masked_wire_dtype
from consortium.secagg.quantize import quantization_error_bound
from consortium.secagg.stage import (
    RESIDUAL_KEY,
    SIMULATION_CONTEXT,
    SecureAggregation,
    secure_aggregation,
    sparse_count,
)
from consortium.server import loop as loop_module
from consortium.server.traffic import ExchangeTraffic, payload_nbytes
from consortium.types import Layout, TensorSpec, Update
from tests.secagg.test_stage import Sites

D, K = 10, 3
LAYOUT10 = Layout((TensorSpec("w", (D,), torch.float32),))
DELTAS = {
    "a": [0.10, -0.20, 0.30, 0.00, 0.05, -0.10, 0.20, 0.40, -0.30, 0.10],
    "b": [0.50, 0.00, -0.10, 0.20, -0.20, 0.30, 0.00, -0.40, 0.10, 0.20],
    "c": [-0.30, 0.20, 0.20, -0.10, 0.10, 0.00, -0.20, 0.30, 0.00, -0.50],
}
WEIGHTS = {"a": 10.0, "b": 30.0, "c": 20.0}
RAW = [Update(c, torch.tensor(DELTAS[c]), WEIGHTS[c]) for c in DELTAS]


class Recording(Sites):
    """:class:`Sites` that keeps each client's quantised vector as it leaves ``client``."""

    def __init__(self, stage: Any, **kw: Any) -> None:
        super().__init__(stage, **kw)
        self.quantised: dict[str, torch.Tensor] = {}

    def send(self, update: Update, seed: int) -> Update:
        out = super().send(update, seed)
        self.quantised[update.client_id] = self.sessions[update.client_id][self.stage.name].vector.clone()
        return out


def _round(sites: Sites, summer: Any, raw: list[Update] = RAW) -> Any:
    sent = [sites.send(u, i) for i, u in enumerate(raw)]
    ctx = RoundContext(sites.round, 7, len(raw), len(raw), LAYOUT10, exchange=sites.exchange)
    return summer.aggregate(sent, ctx=ctx)


# ------------------------------------------------------------------------- the coordinate set


def test_the_round_set_is_k_sorted_distinct_coordinates_that_follow_round_and_run() -> None:
    idx = round_coordinates(D, K, context=SIMULATION_CONTEXT, round=1)
    assert idx.dtype == torch.int64 and idx.numel() == K
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == K
    assert int(idx.min()) >= 0 and int(idx.max()) < D
    # derived (ChaCha20 over a SHA-256 of the public inputs), not drawn: the same everywhere
    assert torch.equal(idx, round_coordinates(D, K, context=SIMULATION_CONTEXT, round=1))
    sets = {tuple(round_coordinates(1000, 50, context=b"run-a", round=r).tolist()) for r in range(20)}
    assert len(sets) == 20  # a new set every round
    assert round_coordinates(1000, 50, context=b"run-b", round=3).tolist() != list(
        round_coordinates(1000, 50, context=b"run-a", round=3).tolist())
    assert torch.equal(round_coordinates(7, 7, context=b"x", round=0), torch.arange(7))
    with pytest.raises(ValueError, match="1 <= k <= size"):
        round_coordinates(5, 6, context=b"x", round=1)


def test_the_set_is_pinned() -> None:
    """A change of the derivation would put a server and its sites of different versions on
    different coordinates: the set for these public inputs is written down."""
    assert round_coordinates(D, K, context=SIMULATION_CONTEXT, round=1).tolist() == [2, 3, 9]
    assert round_coordinates(D, K, context=b"consortium/secagg/v2/run-1", round=4).tolist() == PIN4


PIN4 = [1, 7, 8]


def test_every_coordinate_is_chosen_k_out_of_d_times_on_average() -> None:
    d, k, rounds = 20, 5, 2000
    counts = torch.zeros(d)
    for r in range(rounds):
        counts[round_coordinates(d, k, context=b"run", round=r)] += 1
    expected = rounds * k / d  # 500, binomial sd ≈ 19.4
    assert float((counts - expected).abs().max()) < 6 * 19.4


# ------------------------------------------------------------------ the hand-computed round


def test_three_clients_d10_k3_the_unmasked_sum_is_the_sum_of_their_randk_vectors() -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0, fraction=0.3)
    assert sparse_count(D, 0.3) == K
    sites = Recording(stage)
    seen: dict[str, Any] = {}
    from consortium.secagg.protocol import SecAggServer

    finish = SecAggServer.finish

    def keep(self: Any, answers: Any) -> Any:
        seen["result"] = finish(self, answers)
        return seen["result"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SecAggServer, "finish", keep)
        agg = _round(sites, summer)
    idx = round_coordinates(D, K, context=SIMULATION_CONTEXT, round=1)
    # each client's quantised vector: its k coordinates of w·Δ/100, then the weight slot
    for c, q in sites.quantised.items():
        assert q.shape == (K + 1,)
    masked = [r for _, phase, r in sites.seen if phase == "masked"]
    assert all(m.vector.shape == (K + 1,) for m in masked)
    total = sum(sites.quantised.values(), torch.zeros(K + 1, dtype=torch.int64)) % 2**32
    assert torch.equal(seen["result"].sum, total)  # exactly the sum of the randk vectors
    # the decoded mean, by hand: Σ w·Δ at the round's three coordinates, / Σ w, times d/k
    expected = torch.zeros(D, dtype=torch.float64)
    for c in DELTAS:
        expected[idx] += WEIGHTS[c] * torch.tensor(DELTAS[c], dtype=torch.float64)[idx]
    expected *= (D / K) / 60.0
    bound = quantization_error_bound(count=3, clip=1.0, bits=16) * 100.0
    assert agg.weight == pytest.approx(60.0, abs=bound)
    assert torch.allclose(agg.delta.double(), expected, atol=(D / K) * 3 * bound / 60.0)
    outside = torch.ones(D, dtype=torch.bool)
    outside[idx] = False
    assert torch.count_nonzero(agg.delta[outside]) == 0
    assert agg.count == 3 and agg.info["secagg_coordinates"] == K


def test_with_error_feedback_nothing_is_rescaled_and_nothing_is_lost() -> None:
    stage = SecureAggregation(fraction=0.3, error_feedback=True)
    state: dict[str, torch.Tensor] = {}
    delta = torch.tensor(DELTAS["a"])
    sent = torch.zeros(D)
    for r in range(1, 6):
        ctx = ClientContext(r, "a", 0, {}, state=state)
        kept = stage._sparsified(delta, ctx)
        idx = round_coordinates(D, K, context=SIMULATION_CONTEXT, round=r)
        assert kept.shape == (K,)
        sent[idx] += kept
        # what was sent plus what is kept is every delta so far
        assert torch.allclose(sent + state[RESIDUAL_KEY], delta * r, atol=1e-6)
    with pytest.raises(PipelineError, match="persistent state"):
        stage._sparsified(delta, ClientContext(1, "a", 0, {}))


def test_the_scaled_set_is_unbiased_over_rounds() -> None:
    _, summer = secure_aggregation(fraction=0.3)
    v = torch.tensor(DELTAS["b"], dtype=torch.float64)
    mean = torch.zeros(D, dtype=torch.float64)
    rounds = 3000
    for r in range(rounds):
        idx = round_coordinates(D, K, context=SIMULATION_CONTEXT, round=r)
        mean += summer._scattered(v[idx], D, r)
    mean /= rounds
    assert torch.allclose(mean, v, atol=0.05)  # sd of one coordinate's mean ≈ 0.5/√3000·1.5


# ------------------------------------------------------------------------- a hostile client


class Malformed(Recording):
    """Client ``c`` answers the masked phase with a vector of another length or dtype."""

    def __init__(self, stage: Any, make: Any, **kw: Any) -> None:
        super().__init__(stage, **kw)
        self.make = make

    def exchange(self, stage_name: str, phase: str, messages: Any) -> Any:
        for cid, reply in super().exchange(stage_name, phase, messages):
            if phase == "masked" and cid == "c":
                reply = MaskedInput(cid, self.make(reply.vector))
            yield cid, reply


@pytest.mark.parametrize("make", [
    lambda y: torch.cat([y, y[:1]]),  # one coordinate too many
    lambda y: y[:-1],  # the weight slot left off
    lambda y: torch.zeros(D + 1, dtype=torch.int64),  # the dense length under random-k
    lambda y: y.to(torch.float64),  # another dtype
    lambda y: y + 2**32,  # beyond the modulus
], ids=["longer", "shorter", "dense", "float", "beyond"])
def test_a_masked_vector_of_the_wrong_length_drops_its_client_and_the_rest_is_exact(make: Any) -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0, fraction=0.3)
    hostile = Malformed(stage, make)
    agg = _round(hostile, summer)
    assert agg.info["secagg_malformed"] == ["c"] and agg.info["secagg_dropped"] == ["c"]
    # the same round with c dropping out before its masked input: bit for bit the same model
    dropped = Recording(stage, drop_after={"c": "shares"})
    ref = _round(dropped, summer)
    assert torch.equal(agg.delta, ref.delta) and agg.weight == ref.weight and agg.count == 2


def test_the_dense_run_checks_the_length_too() -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0)
    agg = _round(Malformed(stage, lambda y: y[:K]), summer)
    assert agg.info["secagg_malformed"] == ["c"] and agg.count == 2


# ---------------------------------------------------------------------- wire form and counting


def test_the_masked_vector_is_counted_and_encoded_at_four_bytes_a_coordinate() -> None:
    pytest.importorskip("google.protobuf")
    from consortium.deploy.codec import (
        DecodeError,
        ExchangeEnvelope,
        decode_exchange,
        encode_exchange,
        encode_tensor,
    )

    y = torch.tensor([0, 1, 2**31, 2**32 - 1] * 250, dtype=torch.int64)
    m = MaskedInput("site-a", y)
    assert masked_wire_dtype(y) == "uint32" and payload_nbytes(m) == 6 + 4 * 1000
    msg = encode_exchange(ExchangeEnvelope("secure_aggregation", "masked", 1, "site-a", m))
    assert msg.masked_input.vector.dtype == "uint32" and len(msg.masked_input.vector.data) == 4000
    back = decode_exchange(msg.SerializeToString()).message
    assert back.vector.dtype == torch.int64 and torch.equal(back.vector, y)
    # a residue beyond 32 bits (a larger modulus) stays exact as int64
    wide = MaskedInput("site-a", torch.tensor([2**40, 3], dtype=torch.int64))
    assert payload_nbytes(wide) == 6 + 16
    msg = encode_exchange(ExchangeEnvelope("secure_aggregation", "masked", 1, "site-a", wide))
    assert msg.masked_input.vector.dtype == "int64"
    assert torch.equal(decode_exchange(msg.SerializeToString()).message.vector, wide.vector)
    # one encoding per vector (what is counted is what was sent), and residues only
    for values, reason in [([5, 3], "must travel as uint32"), ([-1, 2**40], "outside")]:
        msg.masked_input.vector.CopyFrom(encode_tensor("vector", torch.tensor(values)))
        with pytest.raises(DecodeError, match=reason):
            decode_exchange(msg.SerializeToString())
    # strict: the data must be the shape's length, the vector flat, the dtype one of the two
    for tamper, reason in [
        (lambda v: setattr(v, "data", v.data[:-1]), "needs 4000 bytes, found 3999"),
        (lambda v: v.shape.append(1), "expected a flat vector"),
        (lambda v: setattr(v, "dtype", "float32"), "expected an int64 vector"),
    ]:
        msg = encode_exchange(ExchangeEnvelope("secure_aggregation", "masked", 1, "site-a", m))
        tamper(msg.masked_input.vector)
        with pytest.raises(DecodeError, match=reason):
            decode_exchange(msg.SerializeToString())


def _recorded_run(monkeypatch: pytest.MonkeyPatch, **extra: Any) -> tuple[Any, list[tuple]]:
    seen: list[tuple] = []

    class Recorded(ExchangeTraffic):
        def wrap(self, exchange):  # type: ignore[no-untyped-def]
            def recorded(stage, phase, messages):  # type: ignore[no-untyped-def]
                for cid, reply in exchange(stage, phase, messages):
                    seen.append((stage, phase, cid, reply))
                    yield cid, reply

            return super().wrap(recorded)

    monkeypatch.setattr(loop_module, "ExchangeTraffic", Recorded)
    result = consortium.simulate({
        "evaluation": {"baselines": []}, "secure_aggregation": {"enabled": True},
        "model": {"name": "mlp"}, **extra,
    })
    return result, seen


def test_a_run_with_randk_learns_and_its_masked_phase_shrinks_by_d_over_k(monkeypatch) -> None:
    dense, dense_seen = _recorded_run(monkeypatch, rounds=3)
    sparse, sparse_seen = _recorded_run(
        monkeypatch, rounds=10, compression={"uplink": "randk", "fraction": 0.1},
    )
    d = sparse.params.layout.size
    k = sparse_count(d, 0.1)
    assert d > 1000
    up: dict[str, dict[int, int]] = {"dense": defaultdict(int), "sparse": defaultdict(int)}
    for name, seen in (("dense", dense_seen), ("sparse", sparse_seen)):
        for stage, phase, cid, reply in seen:
            if phase == "masked":
                # exactly: the envelope, the id twice (envelope and message), 4 bytes a value
                length = (k if name == "sparse" else d) + 1
                assert reply.vector.shape == (length,)
                assert payload_nbytes(reply) == len(cid) + 4 * length
                up[name][0] += len(stage) + len(phase) + 8 + len(cid) + payload_nbytes(reply)
    per_round_dense = up["dense"][0] / 3
    per_round_sparse = up["sparse"][0] / 10
    # ≈ d/k: the envelope and ids (a few dozen bytes a reply) do not shrink
    assert per_round_dense / per_round_sparse == pytest.approx(d / k, rel=0.06)
    assert per_round_dense / per_round_sparse < (d + 1) / (k + 1)
    # bytes_up holds the masked phase: the sparse run's rounds are smaller by that much
    saved = dense.history[0]["bytes_up"] - sparse.history[0]["bytes_up"]
    assert saved == pytest.approx(per_round_dense - per_round_sparse, rel=0.01)
    # and it learns: the demo's hospitals, ten rounds, one coordinate in ten a round
    assert sparse.summary["final"]["accuracy"] >= 0.75
    assert sparse.history[-1]["loss"] < sparse.history[0]["loss"]


def test_error_feedback_runs_under_secagg_and_keeps_a_residual_per_client() -> None:
    result = consortium.simulate({
        "rounds": 4, "evaluation": {"baselines": []}, "secure_aggregation": {"enabled": True},
        "compression": {"uplink": "randk", "fraction": 0.25, "error_feedback": True},
    })
    assert result.summary["final"]["accuracy"] >= 0.7


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("changes", "message"), [
    ({"compression": {"uplink": "topk"}}, r"\"randk\" does .*top-k keeps each client's own"),
    ({"compression": {"uplink": "qsgd"}}, "decoded per client"),
    ({"compression": {"uplink": "randk", "fraction": 0.0}}, "fraction = 0.0 must be in"),
    ({"compression": {"uplink": "randk"},
      "privacy": {"mode": "distributed", "noise_multiplier": 1.0},
      "sampling": {"clients_per_round": 4}}, "distributed DP.*not implemented"),
    ({"compression": {"uplink": "randk"},
      "privacy": {"mode": "central", "noise_multiplier": 1.0}}, "central DP"),
])
def test_what_cannot_compose_is_refused_with_the_reason(changes: dict, message: str) -> None:
    cfg = {"rounds": 1, "evaluation": {"baselines": []}, "secure_aggregation": {"enabled": True},
           **changes}
    with pytest.raises(ConfigError, match=message):
        consortium.simulate(cfg)


def test_the_factory_refuses_randk_in_integer_mode() -> None:
    with pytest.raises(PipelineError, match="integer mode"):
        secure_aggregation(fraction=0.5, integer=True)
    with pytest.raises(PipelineError, match="fraction"):
        secure_aggregation(fraction=1.5)
    assert dataclasses.replace(SecureAggregation(), fraction=1.0).fraction == 1.0


@pytest.mark.parametrize("changes", [
    {"privacy": {"mode": "local", "noise_multiplier": 0.5, "clip": 1.0}},  # post-processing
    {"algorithm": {"name": "scaffold"}},  # its control-variate extra travels in full
    {"executor": {"kind": "sequential"}},
    {"executor": {"kind": "vectorized"}},
], ids=["local-dp", "scaffold", "sequential", "vectorized"])
def test_what_composes_runs_and_learns(changes: dict) -> None:
    result = consortium.simulate({
        "rounds": 4, "evaluation": {"baselines": []}, "secure_aggregation": {"enabled": True},
        "compression": {"uplink": "randk", "fraction": 0.25}, **changes,
    })
    history = result.history
    assert all(h["secagg_coordinates"] == sparse_count(result.params.layout.size, 0.25)
               for h in history)
    assert result.summary["final"]["accuracy"] >= 0.7

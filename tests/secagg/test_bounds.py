"""SecAgg against a malicious client: what the server checks in the sum it cannot see into.

Each test plays the adversary with the real protocol and stage: a client that masks a value
beyond the quantisation range, forges its weight slot, or reveals a shifted Shamir share.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import consortium
from consortium.aggregation.base import Aggregate, ClientContext, RoundContext
from consortium.config import ExperimentConfig
from consortium.errors import PipelineError
from consortium.secagg.messages import seed_commitment
from consortium.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskResponse,
)
from consortium.secagg.quantize import quantization_step
from consortium.secagg.shamir import PRIME, Share, recover_checked, split_secret
from consortium.secagg.stage import HEADROOM, secure_aggregation
from consortium.types import Layout, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (3,), torch.float32),))
RAW = [Update("a", torch.tensor([0.1, -0.2, 0.3]), 10.0),
       Update("b", torch.tensor([0.5, 0.0, -0.1]), 30.0),
       Update("c", torch.tensor([-0.3, 0.2, 0.2]), 20.0),
       Update("d", torch.tensor([0.0, 0.4, -0.4]), 40.0)]
KNOWN = {u.client_id: u.weight for u in RAW}
W = 100.0  # weight_bound
LEVELS = (1 << 16) - 1
STEP = quantization_step(clip=1.0, bits=16)
SLOT = -1  # the weight slot is the last coordinate of the secure vector


class Sites:
    """The clients' halves in this process; ``tamper(cid, phase, reply)`` plays a malicious
    client by replacing the reply it sends."""

    def __init__(self, stage, tamper=None) -> None:
        self.stage, self.tamper = stage, tamper
        self.sessions: dict[str, dict] = {}

    def send(self, update: Update, seed: int) -> Update:
        ctx = ClientContext(1, update.client_id, seed, self.sessions.setdefault(update.client_id, {}))
        return self.stage.client(update, {}, ctx)

    def vector(self, cid: str) -> torch.Tensor:
        """The client's quantised (not yet masked) vector: what a malicious client chooses."""
        return self.sessions[cid]["secure_aggregation"].vector

    def exchange(self, stage_name: str, phase: str, messages):
        for cid, message in messages.items():
            reply = self.stage.respond(phase, message, ClientContext(1, cid, 0, self.sessions[cid]))
            if self.tamper is not None and reply is not None:
                reply = self.tamper(cid, phase, reply)
            yield cid, reply


def run(*, weights=KNOWN, forge=None, tamper=None, threshold: float = 0.5) -> Aggregate:
    """One secure round of RAW; ``forge(sites)`` edits a client's quantised vector before the
    protocol masks it (the masking itself is the real client's)."""
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=W, threshold=threshold,
                                       weights=weights)
    sites = Sites(stage, tamper)
    sent = [sites.send(u, i) for i, u in enumerate(RAW)]
    if forge is not None:
        forge(sites)
    return summer.aggregate(sent, ctx=RoundContext(1, 7, 4, 4, LAYOUT, exchange=sites.exchange))


def level(value: float) -> int:
    """The quantisation level nearest ``value`` (in ``[-clip, clip]`` units)."""
    return round((value + 1.0) / STEP)


# ------------------------------------------------------------------------------- honest rounds


def test_an_honest_round_is_the_same_with_and_without_the_known_weights() -> None:
    checked, unchecked = run(), run(weights=None)
    assert torch.equal(checked.delta, unchecked.delta) and checked.weight == unchecked.weight
    assert checked.weight == pytest.approx(100.0, abs=4 * STEP * W)
    assert "secagg_corrupted_shares" not in checked.info


# ------------------------------------------------------------------------- range and headroom


def test_an_honest_site_clips_its_weight_slot_and_coordinates_and_counts_them() -> None:
    stage, _ = secure_aggregation(clip=1.0, bits=16, weight_bound=W)
    sites = Sites(stage)
    big = Update("a", torch.tensor([2.0, -0.001, 0.0]), 150.0)  # w·Δ/W = 3 and a weight of 1.5·W
    sent = sites.send(big, 0)
    assert sent.metrics["secagg_clipped"] == 2.0
    v = sites.vector("a")
    assert int(v[0]) == LEVELS and int(v[SLOT]) == LEVELS  # both at +clip
    assert 0 <= int(v.min()) and int(v.max()) <= LEVELS


def test_an_input_that_wraps_the_modulus_aborts_the_round_with_the_range_check() -> None:
    def wrap(sites: Sites) -> None:
        v = sites.vector("d")
        v[1] = (v[1] + 2**31) % 2**32  # far beyond the quantisation range, masked like any value

    with pytest.raises(SecAggAbort, match=r"range check: 1 coordinate\(s\) of the unmasked sum "
                                          r"lie outside \[0, 262140\].*\(coordinate 1: "):
        run(forge=wrap)


def test_a_wrapped_weight_slot_is_named_by_the_range_check() -> None:
    def wrap(sites: Sites) -> None:
        sites.vector("d")[SLOT] = 2**31  # the sum's weight slot lands far beyond 4 inputs' range

    with pytest.raises(SecAggAbort, match="range check.*the weight slot"):
        run(forge=wrap, weights=None)

    def minus_one(sites: Sites) -> None:
        sites.vector("d")[SLOT] = 2**32 - 1  # "level -1": wraps back into the range, and
        # the weight -100 that it means brings the sum below zero

    with pytest.raises(SecAggAbort, match=r"weight check: the securely summed weight -40\.\d+ is "
                                          r"not positive"):
        run(forge=minus_one, weights=None)


def test_a_value_beyond_the_clip_but_inside_the_sums_range_goes_through_bounded() -> None:
    """The documented limit: the server sees only the sum, so a client's excess that keeps the
    sum in the honest range shifts the mean undetected, by exactly that excess."""
    honest = run()

    def excess(sites: Sites) -> None:
        sites.vector("d")[0] += 1000  # 1000 levels past its own value, maybe past the clip

    shifted = run(forge=excess)
    expected = 1000 * STEP * W / honest.weight
    assert float(shifted.delta[0] - honest.delta[0]) == pytest.approx(expected, rel=1e-4)
    assert torch.equal(shifted.delta[1:], honest.delta[1:])


def test_a_cohort_without_headroom_in_the_modulus_is_refused_before_the_protocol() -> None:
    """At build time the configuration is refused; a sampled round larger than planned is
    aborted before any message is sent."""
    _, summer = secure_aggregation(bits=24)
    largest = 2**32 // (((1 << 24) - 1) * HEADROOM)
    assert largest == 64
    summer.check_clients(largest)
    with pytest.raises(PipelineError, match=r"65 clients with bits = 24 .* at most 64 clients "
                                            r"per round fit: lower secure_aggregation.bits"):
        summer.check_clients(65)
    _, summer16 = secure_aggregation(bits=16)
    summer16.check_clients(16384)
    with pytest.raises(PipelineError, match="at most 16384 clients"):
        summer16.check_clients(16385)

    def never(*args):  # the check comes before any message
        raise AssertionError("the protocol started")

    with pytest.raises(PipelineError, match="65 clients with bits = 24"):  # when it is built
        consortium.simulate({
            "rounds": 1, "secure_aggregation": {"enabled": True, "bits": 24},
            "data": {"dataset": "synthetic", "clients": 70},
            "sampling": {"clients_per_round": 65}, "evaluation": {"baselines": []},
        })
    updates = [Update(f"s{i}", torch.zeros(0), 0.0) for i in range(65)]
    with pytest.raises(SecAggAbort, match="round 1 not summed: .*at most 64"):
        summer.aggregate(updates, ctx=RoundContext(1, 7, 65, 65, LAYOUT, exchange=never))


# ---------------------------------------------------------------------------------- the weight


def test_an_inflated_weight_slot_aborts_against_the_known_weights() -> None:
    def inflate(sites: Sites) -> None:
        sites.vector("d")[SLOT] = LEVELS  # claims weight_bound (100) for its 40 examples

    with pytest.raises(SecAggAbort, match=r"weight check: the securely summed weight 16\d(\.\d+)? "
                                          r"differs from the contributors' known weights 100"):
        run(forge=inflate)


@pytest.mark.parametrize("claimed", [-0.55, -0.399])
def test_a_lowered_weight_slot_cannot_amplify_the_aggregate(claimed: float) -> None:
    """Σw would be 5 (×20) or 0.1 (×1000) instead of 100: the review's ×5,900 attack."""
    def lower(sites: Sites) -> None:
        sites.vector("d")[SLOT] = level(claimed)

    with pytest.raises(SecAggAbort, match="weight check.*known weights 100"):
        run(forge=lower)


def test_without_known_weights_a_lowered_slot_is_caught_only_at_zero() -> None:
    """What the known weights buy: without them, a positive shrunken divisor goes through."""
    def lower(sites: Sites) -> None:
        sites.vector("d")[SLOT] = level(-0.55)

    amplified = run(forge=lower, weights=None)
    assert amplified.weight == pytest.approx(5.0, abs=4 * STEP * W)

    def negative(sites: Sites) -> None:
        sites.vector("d")[SLOT] = 0  # -clip: weight -100

    with pytest.raises(SecAggAbort, match="weight check.*is not positive"):
        run(forge=negative, weights=None)


def test_without_known_weights_the_sum_is_capped_at_the_slots_ceiling() -> None:
    _, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=W)
    summer._check_weight(4 * W, ("a", "b", "c", "d"))  # four full slots: possible
    with pytest.raises(SecAggAbort, match="exceeds the 4 contributors' largest possible 400"):
        summer._check_weight(4 * W + 1.0, ("a", "b", "c", "d"))


def test_a_known_weight_above_the_slots_ceiling_counts_as_the_ceiling() -> None:
    """A site with more examples than weight_bound sends a clipped slot; that is honest."""
    _, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=W, weights={"a": 5000, "b": 50})
    summer._check_weight(150.0, ("a", "b"))
    with pytest.raises(SecAggAbort, match="known weights 150"):
        summer._check_weight(140.0, ("a", "b"))


def test_the_integer_mode_checks_the_count_exactly() -> None:
    _, summer = secure_aggregation(integer=True, weights={"a": 1.0, "b": 1.0, "c": 1.0})
    total = torch.tensor([5, 7, 9, 3], dtype=torch.int64)  # d = 3, the count last
    ctx = RoundContext(1, 7, 3, 3, LAYOUT)
    assert summer._decode_integer(total, ("a", "b", "c"), ctx, {}).weight == 3.0
    with pytest.raises(SecAggAbort, match="count 1000 is not the contributors' known 3"):
        summer._decode_integer(torch.tensor([5, 7, 9, 1000]), ("a", "b", "c"), ctx, {})


def test_the_simulation_passes_the_clients_sizes_or_unit_weights() -> None:
    from consortium.algorithms import build_algorithm
    from consortium.simulation import local_training, secure_aggregation_parts

    cfg = ExperimentConfig.from_dict({"secure_aggregation": {"enabled": True}})
    algorithm = build_algorithm("fedavg")
    settings = local_training(cfg)
    _, summer = secure_aggregation_parts(cfg, algorithm, settings, sizes={"x": 90, "y": 12})
    assert dict(summer.weights) == {"x": 90.0, "y": 12.0}
    central = ExperimentConfig.from_dict({"secure_aggregation": {"enabled": True},
                                          "privacy": {"mode": "central", "clip": 1.0,
                                                      "noise_multiplier": 1.0}})
    _, summer = secure_aggregation_parts(central, algorithm, settings, sizes={"x": 90, "y": 12})
    assert dict(summer.weights) == {"x": 1.0, "y": 1.0}


# ----------------------------------------------------------------------- corrupted shares (stage)


def shift_b_share(owner: str, *, by: int = 1, holder: str = "d"):
    def tamper(cid: str, phase: str, reply):
        if cid != holder or phase != "unmask" or owner not in reply.b_shares:
            return reply
        share = reply.b_shares[owner]
        forged = Share(share.index, (share.value + by) % PRIME)
        return dataclasses.replace(reply, b_shares={**reply.b_shares, owner: forged})

    return tamper


def test_a_shifted_seed_share_is_corrected_and_its_holder_named() -> None:
    honest = run()
    attacked = run(tamper=shift_b_share("a"))  # 3 shares, threshold 2: one can be corrected
    assert torch.equal(attacked.delta, honest.delta) and attacked.weight == honest.weight
    assert attacked.info["secagg_corrupted_shares"] == [("d", "a", "b")]


def test_a_shifted_seed_share_that_cannot_be_corrected_aborts_the_round() -> None:
    with pytest.raises(SecAggAbort, match=r"the 'b' shares of the secret of client 'a', revealed by "
                                          r"\['b', 'c', 'd'\], do not reconstruct what 'a' committed to"):
        run(tamper=shift_b_share("a"), threshold=1.0)  # threshold 3 of 3: nothing to spare


# ------------------------------------------------------------------- corrupted shares (protocol)

D = 5
GRAPH_SEED = b"\x05" * 32


def protocol_round(n: int, t: int, *, dropped=(), tamper=None):
    """A full-graph round of ``n`` clients with threshold ``t``; ``dropped`` stop after sending
    shares; ``tamper(response) -> response`` edits the unmask responses."""
    config = SecAggConfig(num_clients_expected=n, threshold=t, neighbours=n - 1, round=3,
                          context=b"bounds")
    clients = {f"c{i}": SecAggClient(f"c{i}", config=config) for i in range(n)}
    gen = torch.Generator().manual_seed(0)
    inputs = {c: torch.randint(0, LEVELS + 1, (D,), generator=gen) for c in clients}
    server = SecAggServer(config=config, graph_seed=GRAPH_SEED)
    broadcasts = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in clients])
    request = server.collect_masked(
        [clients[c].masked_input(routed[c], inputs[c]) for c in clients if c not in dropped]
    )
    responses = [clients[c].unmask(request) for c in request.survivors]
    if tamper is not None:
        responses = [tamper(r) for r in responses]
    result = server.finish(responses)
    expected = sum(inputs[c] for c in request.survivors) % 2**32
    return server, result, expected


def shift(holder: str, owner: str, kind: str, *, by: int = 1, index: int | None = None):
    def tamper(r: UnmaskResponse) -> UnmaskResponse:
        if r.client_id != holder:
            return r
        field = "b_shares" if kind == "b" else "s_shares"
        shares = dict(getattr(r, field))
        old = shares[owner]
        shares[owner] = Share(old.index if index is None else index, (old.value + by) % PRIME)
        return dataclasses.replace(r, **{field: shares})

    return tamper


def test_a_dropped_clients_key_from_a_shifted_share_is_corrected() -> None:
    server, result, expected = protocol_round(5, 3, dropped=("c0",), tamper=shift("c4", "c0", "s"))
    assert torch.equal(result.sum, expected)
    assert server.corrupted == [("c4", "c0", "s")]


def test_a_dropped_clients_key_from_two_shifted_shares_aborts() -> None:
    both = [shift("c3", "c0", "s"), shift("c4", "c0", "s")]
    with pytest.raises(SecAggAbort, match=r"the 's' shares of the secret of client 'c0', revealed by .*, do not reconstruct"):
        protocol_round(5, 3, dropped=("c0",), tamper=lambda r: both[1](both[0](r)))


def test_a_targeted_shift_that_still_combines_is_caught_by_the_commitment() -> None:
    """The shift a share holder can compute so that interpolation still yields 32 bytes (the
    secret plus one): Shamir alone accepts it; the seed commitment does not."""
    # c3 holds share 3 of c0's seed among indices {1, 2, 3}; its Lagrange weight at 0 is 1
    with pytest.raises(SecAggAbort, match=r"'b' shares of the secret of client 'c0', revealed by .*, do not reconstruct"):
        protocol_round(4, 3, tamper=shift("c3", "c0", "b", by=1))
    server, result, expected = protocol_round(4, 2, tamper=shift("c3", "c0", "b", by=1))
    assert torch.equal(result.sum, expected) and server.corrupted == [("c3", "c0", "b")]


def test_a_share_moved_to_another_holders_point_is_left_out_and_named() -> None:
    server, result, expected = protocol_round(4, 2, tamper=shift("c3", "c0", "b", by=0, index=1))
    assert torch.equal(result.sum, expected)
    assert server.corrupted == [("c3", "c0", "b")]


def test_a_client_without_a_seed_commitment_is_left_out_of_the_round() -> None:
    config = SecAggConfig(num_clients_expected=3, threshold=1, neighbours=2, round=1,
                          context=b"bounds")
    adverts = [SecAggClient(f"c{i}", config=config).advertise_keys() for i in range(3)]
    adverts[2] = dataclasses.replace(adverts[2], seed_commitment=b"")
    broadcasts = SecAggServer(config=config, graph_seed=GRAPH_SEED).collect_keys(adverts)
    assert set(broadcasts) == {"c0", "c1"}


def test_the_commitment_binds_the_seed_the_client_and_the_round() -> None:
    config = SecAggConfig(num_clients_expected=3, threshold=1, neighbours=2, round=1,
                          context=b"bounds")
    seed = bytes(range(32))
    c = seed_commitment(config, "c0", seed)
    assert len(c) == 32
    assert c != seed_commitment(config, "c1", seed)
    assert c != seed_commitment(dataclasses.replace(config, round=2), "c0", seed)
    assert c != seed_commitment(config, "c0", seed[:-1] + b"\x00")


def test_recover_checked_names_every_share_off_the_polynomial() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, threshold=3, num_shares=6)
    bad = [Share(s.index, s.value + 7) if s.index == 5 else s for s in shares]
    got, off = recover_checked(bad, threshold=3, check=lambda s: s == secret)
    assert got == secret and off == (5,)
    assert recover_checked(shares, threshold=3, check=lambda s: s == secret) == (secret, ())
    with pytest.raises(ValueError, match="no secret passing the check"):
        recover_checked(shares[:3], threshold=3, check=lambda s: False)


def test_the_seed_commitment_survives_the_wire() -> None:
    pytest.importorskip("grpc")
    from consortium.deploy.codec import (
        DecodeError,
        ExchangeEnvelope,
        decode_exchange,
        encode_exchange,
    )

    config = SecAggConfig(num_clients_expected=3, threshold=1, neighbours=2, round=1,
                          context=b"bounds")
    advert = SecAggClient("c0", config=config).advertise_keys()
    msg = encode_exchange(ExchangeEnvelope("secure_aggregation", "keys", 1, "c0", advert))
    assert decode_exchange(msg.SerializeToString()).message == advert
    msg.advertise_keys.seed_commitment = b"x" * 33
    with pytest.raises(DecodeError, match="seed commitment of 33 bytes, expected 32"):
        decode_exchange(msg.SerializeToString())

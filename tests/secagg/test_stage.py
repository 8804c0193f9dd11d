"""Secure aggregation in a run: the weighted mean survives, DP composes, bad combinations fail."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import consortium
from consortium.aggregation.base import Aggregate, ClientContext, Pipeline, RoundContext
from consortium.errors import PipelineError, RoundAborted
from consortium.secagg.protocol import SecAggAbort, SecAggConfig
from consortium.secagg.quantize import quantization_error_bound
from consortium.secagg.stage import secure_aggregation
from consortium.types import Layout, Parameters, TensorSpec, Update
from tests.conftest import make_toy


class Sites:
    """The clients' side in this process: each client's session and its stage's ``respond``,
    with optional drop-outs (client -> the last phase it answers)."""

    def __init__(self, stage, round: int = 1, drop_after: dict[str, str] | None = None,
                 site=None) -> None:
        self.stage, self.round = stage, round
        self.sessions: dict[str, dict] = {}
        self.drop_after = drop_after or {}
        self.site = site  # client id -> its SiteEnvironment (a deployment), or None
        self.seen: list[tuple[str, str, object]] = []  # every reply the server received
        self.ended: set[str] = set()

    def send(self, update: Update, seed: int) -> Update:
        ctx = ClientContext(self.round, update.client_id, seed, self.sessions.setdefault(update.client_id, {}))
        return self.stage.client(update, {}, ctx)

    def exchange(self, stage_name: str, phase: str, messages):
        order = ["keys", "shares", "masked", "consistency", "unmask"]
        for cid, message in messages.items():
            if phase == "end":
                self.ended.add(cid)
            elif cid in self.drop_after and order.index(phase) > order.index(self.drop_after[cid]):
                continue
            site = self.site(cid) if self.site else None
            ctx = ClientContext(self.round, cid, 0, self.sessions[cid], site)
            reply = self.stage.respond(phase, message, ctx)
            self.seen.append((cid, phase, reply))
            yield cid, reply


LAYOUT = Layout((TensorSpec("w", (3,), torch.float32),))
RAW = [Update("a", torch.tensor([0.1, -0.2, 0.3]), 10.0), Update("b", torch.tensor([0.5, 0.0, -0.1]), 30.0),
       Update("c", torch.tensor([-0.3, 0.2, 0.2]), 20.0), Update("d", torch.tensor([0.0, 0.4, -0.4]), 40.0)]


def run(raw, sites: Sites, summer, n_expected: int | None = None) -> Aggregate:
    sent = [sites.send(u, i) for i, u in enumerate(raw)]
    n = len(raw)
    ctx = RoundContext(sites.round, 7, n, n, LAYOUT, exchange=sites.exchange)
    return summer.aggregate(sent, ctx=ctx)


def test_the_weighted_mean_comes_back_within_the_quantisation_bound() -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0)
    sites = Sites(stage)
    agg = run(RAW, sites, summer)
    expected = sum(u.weight * u.delta for u in RAW) / 100.0
    # each coordinate of Σ w·Δ is off by at most count·step·weight_bound; Σ w likewise
    bound = quantization_error_bound(count=4, clip=1.0, bits=16) * 100.0
    assert agg.weight == pytest.approx(100.0, abs=bound)
    assert torch.allclose(agg.delta, expected, atol=2 * bound / 100.0)
    assert isinstance(agg, Aggregate) and agg.count == 4 and agg.info["secagg_dropped"] == []
    assert sites.ended == {"a", "b", "c", "d"} and all(not s for s in sites.sessions.values())


def test_the_server_receives_no_value_in_the_clear() -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0)
    sites = Sites(stage)
    sent = [sites.send(u, i) for i, u in enumerate(RAW)]
    assert all(u.weight == 0.0 and u.delta.numel() == 0 for u in sent)  # values stay at the site
    quantised = {cid: s["secure_aggregation"].vector.clone() for cid, s in sites.sessions.items()}
    summer.aggregate(sent, ctx=RoundContext(1, 7, 4, 4, LAYOUT, exchange=sites.exchange))
    masked = {cid: r.vector for cid, phase, r in sites.seen if phase == "masked"}
    assert set(masked) == set(quantised)
    for cid, y in masked.items():  # what travelled is masked: no coordinate in common by chance
        assert int((y == quantised[cid]).sum()) <= 1


@pytest.mark.parametrize("phase", ["keys", "shares", "masked"])
def test_a_client_dropping_out_leaves_the_mean_of_the_others(phase: str) -> None:
    stage, summer = secure_aggregation(clip=1.0, bits=16, weight_bound=100.0, threshold=0.5)
    sites = Sites(stage, drop_after={"b": phase})
    agg = run(RAW, sites, summer)
    kept = [u for u in RAW if u.client_id != "b"] if phase != "masked" else RAW
    total = sum(u.weight for u in kept)
    bound = quantization_error_bound(count=4, clip=1.0, bits=16) * 100.0
    assert agg.weight == pytest.approx(total, abs=bound)
    assert torch.allclose(agg.delta, sum(u.weight * u.delta for u in kept) / total, atol=2 * bound / total)
    assert agg.info["secagg_dropped"] == ([] if phase == "masked" else ["b"])
    assert sites.ended == {"a", "b", "c", "d"}  # every session is closed, dropped or not


def test_too_many_drop_outs_abort_and_reveal_nothing() -> None:
    stage, summer = secure_aggregation(threshold=1.0)  # every neighbour needed
    sites = Sites(stage, drop_after={"a": "shares"})
    with pytest.raises(RoundAborted, match="threshold"):
        run(RAW, sites, summer)
    assert not [r for _, phase, r in sites.seen if phase == "unmask"]
    assert all(not s for s in sites.sessions.values())


def test_a_client_refuses_a_threshold_below_its_own() -> None:
    stage, _ = secure_aggregation(threshold=0.5)
    sites = Sites(stage)
    sites.send(RAW[0], 0)
    weak = SecAggConfig(num_clients_expected=9, threshold=1, neighbours=8, round=1,
                        context=b"consortium")
    with pytest.raises(SecAggAbort, match="threshold 1 is below this site's floor of at least 4"):
        stage.respond("keys", weak, ClientContext(1, "a", 0, sites.sessions["a"]))
    with pytest.raises(PipelineError, match="no secure-aggregation input for round 2"):
        stage.respond("keys", weak, ClientContext(2, "a", 0, sites.sessions["a"]))


def test_without_a_way_to_reach_the_clients_it_says_so() -> None:
    stage, summer = secure_aggregation()
    sites = Sites(stage)
    sent = [sites.send(u, i) for i, u in enumerate(RAW)]
    with pytest.raises(PipelineError, match="exchange"):
        summer.aggregate(sent, ctx=RoundContext(1, 7, 4, 4, LAYOUT))


def test_demo_accuracy_is_unchanged() -> None:
    plain = consortium.simulate(None, overrides=["evaluation.baselines=[]"])
    secure = consortium.simulate(None, overrides=["evaluation.baselines=[]",
                                                  "secure_aggregation.enabled=true"])
    assert abs(plain.summary["final"]["accuracy"] - secure.summary["final"]["accuracy"]) <= 0.02
    assert float((plain.params.vector - secure.params.vector).abs().max()) < 1e-2


def test_central_dp_composes_with_secure_aggregation() -> None:
    cfg = {"rounds": 2, "sampling": {"fraction": 1.0},
           "privacy": {"mode": "central", "noise_multiplier": 0.5, "clip": 0.5},
           "secure_aggregation": {"enabled": True}}
    result = consortium.simulate(cfg, dataset=make_toy(5))
    assert result.summary["privacy"]["epsilon"] > 0
    assert all(r["secagg_clients"] == r["clients"] for r in result.history)


def test_rules_that_need_every_update_are_refused_after_it() -> None:
    class Median:
        name = "median"
        needs = frozenset({"individual_updates"})

        def aggregate(self, updates, *, ctx):  # pragma: no cover - never built
            raise AssertionError

    stage, _ = secure_aggregation()
    with pytest.raises(PipelineError, match="secure-aggregation"):
        Pipeline([stage], aggregator=Median())


@pytest.mark.parametrize("algorithm", ["scaffold", "fednova"])
def test_algorithms_with_extra_sums_match_the_plain_run(algorithm: str) -> None:
    cfg = {"rounds": 3, "seed": 1, "sampling": {"clients_per_round": 4},
           "algorithm": {"name": algorithm, "lr": 0.1, "momentum": 0.5},
           "executor": {"kind": "sequential"}}
    plain = consortium.simulate(cfg, dataset=make_toy(4))
    secure = consortium.simulate({**cfg, "secure_aggregation": {"enabled": True}}, dataset=make_toy(4))
    # quantisation noise only: 16 bits over ±weight_bound per coordinate of w·Δ
    assert float((plain.params.vector - secure.params.vector).abs().max()) < 5e-3
    assert all(r["secagg_clients"] == 4 for r in secure.history)


def test_drop_outs_in_a_run_shrink_or_abort_rounds_and_the_run_goes_on() -> None:
    cfg = {"rounds": 6, "seed": 2, "sampling": {"fraction": 1.0},
           "secure_aggregation": {"enabled": True, "threshold": 0.5},
           "simulation": {"dropout": 0.06}}
    result = consortium.simulate(cfg, dataset=make_toy(8))
    assert len(result.history) == 6
    dropped = [r for r in result.history if r.get("secagg_dropped")]
    aborted = [r for r in result.history if "aborted" in r]
    assert dropped, "with 6 % drop-out per phase (4 phases, 8 clients) some round loses a client"
    assert all(r["secagg_clients"] + len(r["secagg_dropped"]) == 8 for r in dropped)
    assert all("threshold" in r["aborted"] for r in aborted)


def test_a_round_that_aborts_leaves_the_model_as_it_was() -> None:
    cfg = {"rounds": 2, "sampling": {"fraction": 1.0}, "evaluation": {"every": 1},
           "secure_aggregation": {"enabled": True, "threshold": 1.0},
           "simulation": {"dropout": 0.9}}
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 2))
    result = consortium.simulate(cfg, dataset=make_toy(4), model=lambda: copy.deepcopy(start))
    assert all("aborted" in r for r in result.history)
    assert torch.equal(result.params.vector, Parameters.from_module(start).vector)


# ------------------------------------------------------------------------------- authenticated


def test_an_authenticated_run_gives_the_same_mean_as_an_unauthenticated_one() -> None:
    plain = run(RAW, Sites(secure_aggregation(weight_bound=100.0)[0]),
                secure_aggregation(weight_bound=100.0)[1])
    stage, summer = secure_aggregation(weight_bound=100.0, authenticate=True)
    sites = Sites(stage)
    signed = run(RAW, sites, summer)
    assert torch.equal(signed.delta, plain.delta) and signed.weight == plain.weight
    adverts = [r for _, phase, r in sites.seen if phase == "keys"]
    assert adverts and all(a.certificate and a.signature for a in adverts)
    assert sorted(cid for cid, phase, _ in sites.seen if phase == "consistency") == list("abcd")


@pytest.mark.parametrize("phase", ["keys", "shares", "masked", "consistency"])
def test_an_authenticated_run_survives_a_drop_out_at_every_phase(phase: str) -> None:
    stage, summer = secure_aggregation(weight_bound=100.0, authenticate=True)
    agg = run(RAW, Sites(stage, drop_after={"b": phase}), summer)
    in_sum = phase in ("masked", "consistency")
    assert agg.info["secagg_dropped"] == ([] if in_sum else ["b"])
    kept = RAW if in_sum else [u for u in RAW if u.client_id != "b"]
    bound = quantization_error_bound(count=4, clip=1.0, bits=16) * 100.0
    assert agg.weight == pytest.approx(sum(u.weight for u in kept), abs=bound)


def _deployed(run_id: str, floor, authority):
    from consortium.client.environment import SiteEnvironment

    return lambda cid: SiteEnvironment(identity=authority.identity(cid), run_id=run_id,
                                       secagg=floor)


def test_a_deployed_site_signs_with_its_identity_and_keeps_its_floor_and_run() -> None:
    from consortium.secagg.floor import SecAggFloor
    from consortium.secagg.identity import SimulatedAuthority

    authority = SimulatedAuthority(b"\x07" * 32)
    floor = SecAggFloor(min_cohort=4, require_signatures=True)
    stage, _ = secure_aggregation(weight_bound=100.0)  # no simulated identities here
    summer = dataclasses.replace(secure_aggregation(weight_bound=100.0, threshold=0.7)[1],
                                 run_id="run-7")
    sites = Sites(stage, site=_deployed("run-7", floor, authority))
    agg = run(RAW, sites, summer)
    assert agg.count == 4
    assert all(r.signature for _, phase, r in sites.seen if phase == "keys")
    # a site whose floor needs all 3 neighbours refuses the server's 2 of 3, before any key
    strict = SecAggFloor(min_threshold=1.0)
    sites = Sites(stage, site=_deployed("run-7", strict, authority))
    with pytest.raises(RoundAborted, match="threshold"):
        run(RAW, sites, dataclasses.replace(summer, threshold=0.5))
    assert not [r for _, phase, r in sites.seen if phase == "keys"]


def test_a_message_of_the_wrong_type_for_its_phase_is_refused() -> None:
    stage, _ = secure_aggregation()
    sites = Sites(stage)
    sites.send(RAW[0], 0)
    with pytest.raises(PipelineError, match="expected a KeysBroadcast in phase 'shares'"):
        stage.respond("shares", object(), ClientContext(1, "a", 0, sites.sessions["a"]))
    with pytest.raises(PipelineError, match="unknown secure-aggregation phase"):
        stage.respond("later", None, ClientContext(1, "a", 0, sites.sessions["a"]))


def test_the_authenticated_simulation_is_reachable_from_the_config_and_learns_the_same() -> None:
    import consortium

    base = {"rounds": 2, "evaluation": {"baselines": []}, "secure_aggregation": {"enabled": True}}
    plain = consortium.simulate(base)
    signed = consortium.simulate({**base, "secure_aggregation": {"enabled": True,
                                                                "authenticate": True}})
    assert [r["secagg_authenticated"] for r in signed.history] == [True, True]
    assert not plain.history[-1]["secagg_authenticated"]
    assert torch.equal(plain.params.vector, signed.params.vector)

"""A hostile server against real SecAgg+ clients (Bonawitz et al. 2017, active adversary).

Each test plays the server by hand, editing the messages the honest protocol would send, and
checks what the clients (the real ``SecAggClient`` and ``SecureAggregation`` code) do: they
abort or refuse, naming the reason, before anything that would unmask an input leaves them.
Where the attack works without authentication, the test shows that too, so it can fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from consortium.aggregation.base import ClientContext, RoundContext
from consortium.errors import PipelineError, RoundAborted
from consortium.secagg.crypto import decrypt, generate_keypair, shared_key
from consortium.secagg.floor import SecAggFloor
from consortium.secagg.identity import SimulatedAuthority, simulated_identities
from consortium.secagg.masks import add_masks, mask_sign, pairwise_seed
from consortium.secagg.messages import signed_keys_bytes
from consortium.secagg.protocol import (
    AdvertiseKeys,
    ConsistencyRequest,
    KeysBroadcast,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    SecAggServer,
    SharesForClient,
    UnmaskRequest,
)
from consortium.secagg.shamir import combine_shares
from consortium.secagg.stage import secure_aggregation
from consortium.types import Layout, TensorSpec, Update

SEED = bytes(range(32))
D = 64
IDS = ("c0", "c1", "c2", "c3", "c4")
PKI = simulated_identities([*IDS, "c5"], seed=b"\x09" * 32)


def _config(n: int = 5, *, k: int = 4, t: int = 2, round: int = 3,
            context: bytes = b"run-A") -> SecAggConfig:
    return SecAggConfig(num_clients_expected=n, threshold=t, neighbours=k, round=round,
                        context=context)


def _clients(config: SecAggConfig, ids=IDS, *, signed: bool = True,
             floor: SecAggFloor | None = None) -> dict[str, SecAggClient]:
    identities, trust = PKI
    return {
        c: SecAggClient(c, config=config, identity=identities[c] if signed else None,
                        trust=trust if signed else None, floor=floor)
        for c in ids
    }


def _inputs(ids=IDS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {c: torch.randint(0, 2**16, (D,), generator=g) for c in ids}


def _keys_phase(config: SecAggConfig, clients: Mapping[str, SecAggClient]):
    server = SecAggServer(config=config, graph_seed=SEED)
    adverts = {c: clients[c].advertise_keys() for c in sorted(clients)}
    return server, adverts, server.collect_keys(list(adverts.values()))


def _with_neighbour(broadcast: KeysBroadcast, v: str, *, keys=None, signed=None) -> KeysBroadcast:
    """``broadcast`` with neighbour ``v``'s keys and/or (certificate, signature) replaced."""
    neighbour_keys, signatures = dict(broadcast.neighbour_keys), dict(broadcast.signatures)
    if keys is not None:
        neighbour_keys[v] = keys
    if signed is not None:
        signatures[v] = signed
    return dataclasses.replace(broadcast, neighbour_keys=neighbour_keys, signatures=signatures)


# ------------------------------------------------------------------- (a) substituted public keys


def test_without_signatures_a_substituted_key_lets_the_server_read_the_shares() -> None:
    """The attack the signatures stop: the server hands c0 its own key as c1's and decrypts the
    Shamir shares c0 meant for c1."""
    config = _config()
    clients = _clients(config, signed=False)
    _, adverts, broadcasts = _keys_phase(config, clients)
    mine = generate_keypair()
    forged = _with_neighbour(broadcasts["c0"], "c1", keys=(mine.public, mine.public))
    sent = clients["c0"].share_keys(forged)
    info = clients["c0"]._share_info()
    key = shared_key(mine.private, adverts["c0"].c_public, info=info)
    plain = decrypt(key, sent.ciphertexts["c1"],
                    associated_data=clients["c0"]._share_ad("c0", "c1"))
    assert len(plain) == 140  # c0's b share and s share, in the server's hands


@pytest.mark.parametrize("which", ["c", "s", "both"])
def test_a_substituted_key_is_refused_naming_the_neighbour(which: str) -> None:
    config = _config()
    clients = _clients(config)
    _, adverts, broadcasts = _keys_phase(config, clients)
    mine = generate_keypair().public
    c_public, s_public = broadcasts["c0"].neighbour_keys["c1"]
    keys = {"c": (mine, s_public), "s": (c_public, mine), "both": (mine, mine)}[which]
    with pytest.raises(SecAggAbort, match=r"keys of neighbour 'c1' are not authentic .*does not "
                                          r"verify"):
        clients["c0"].share_keys(_with_neighbour(broadcasts["c0"], "c1", keys=keys))
    assert clients["c0"].revealed == {}


def test_keys_signed_under_another_ca_are_refused() -> None:
    config = _config()
    clients = _clients(config)
    _, _, broadcasts = _keys_phase(config, clients)
    rogue, _ = simulated_identities(["c1"], seed=b"\x0a" * 32)  # the server's own CA
    mine = generate_keypair().public
    signature = rogue["c1"].sign(signed_keys_bytes(config, "c1", mine, mine))
    forged = _with_neighbour(broadcasts["c0"], "c1", keys=(mine, mine),
                             signed=(rogue["c1"].certificate_der, signature))
    with pytest.raises(SecAggAbort, match=r"neighbour 'c1' .*not issued by this consortium's CA"):
        clients["c0"].share_keys(forged)


def test_a_valid_certificate_of_one_site_cannot_claim_another() -> None:
    """Site c5 (provisioned, colluding with the server) signs the server's keys as c1."""
    config = _config()
    clients = _clients(config)
    _, _, broadcasts = _keys_phase(config, clients)
    identities, _ = PKI
    mine = generate_keypair().public
    c5 = identities["c5"]
    forged = _with_neighbour(
        broadcasts["c0"], "c1", keys=(mine, mine),
        signed=(c5.certificate_der, c5.sign(signed_keys_bytes(config, "c1", mine, mine))),
    )
    with pytest.raises(SecAggAbort, match=r"certificate of site 'c5' was presented for 'c1'"):
        clients["c0"].share_keys(forged)


def test_keys_without_signature_or_from_another_round_are_refused() -> None:
    config = _config()
    clients = _clients(config)
    _, _, broadcasts = _keys_phase(config, clients)
    bare = dataclasses.replace(broadcasts["c0"], signatures={
        v: e for v, e in broadcasts["c0"].signatures.items() if v != "c2"})
    with pytest.raises(SecAggAbort, match="neighbour 'c2' came without a certificate"):
        clients["c0"].share_keys(bare)
    # c1's genuine signed keys of round 2, replayed in round 3
    earlier = _config(round=2)
    old = _clients(earlier, ids=("c1",))["c1"].advertise_keys()
    replay = _with_neighbour(broadcasts["c2"], "c1", keys=(old.c_public, old.s_public),
                             signed=(old.certificate, old.signature))
    with pytest.raises(SecAggAbort, match="keys of neighbour 'c1' are not authentic"):
        clients["c2"].share_keys(replay)


# -------------------------------------------------------------- (b) inconsistent dropout lists


def _through_masked(signed: bool):
    """Every client of five sends its masked input: k = 4 neighbours (even), t = 2."""
    config = _config()
    clients = _clients(config, signed=signed)
    inputs = _inputs()
    server, adverts, broadcasts = _keys_phase(config, clients)
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in IDS])
    masked = {c: clients[c].masked_input(routed[c], inputs[c]) for c in IDS}
    server.collect_masked(list(masked.values()))
    return config, clients, inputs, adverts, masked


def _unmask_victim(config, adverts, masked, victim, b_answers, s_answers) -> torch.Tensor:
    """The server's attack: ``victim``'s b from some neighbours, its s from others."""
    b = combine_shares([r.b_shares[victim] for r in b_answers], threshold=config.threshold)
    s = X25519PrivateKey.from_private_bytes(
        combine_shares([r.s_shares[victim] for r in s_answers], threshold=config.threshold))
    order = sorted(adverts)
    masks = [(b, -1)] + [
        (pairwise_seed(s, adverts[v].s_public, round=config.round, context=config.context),
         -mask_sign(order.index(victim), order.index(v)))
        for v in order if v != victim
    ]
    return add_masks(masked[victim].vector, masks, modulus_bits=config.modulus_bits)


def test_without_the_consistency_round_two_dropout_stories_unmask_a_client() -> None:
    config, clients, inputs, adverts, masked = _through_masked(signed=False)
    everyone = tuple(IDS)
    told_alive = UnmaskRequest(everyone, ())
    told_dropped = UnmaskRequest(tuple(c for c in IDS if c != "c0"), ("c0",))
    b_answers = [clients[c].unmask(told_alive) for c in ("c1", "c2")]
    s_answers = [clients[c].unmask(told_dropped) for c in ("c3", "c4")]
    recovered = _unmask_victim(config, adverts, masked, "c0", b_answers, s_answers)
    assert torch.equal(recovered, inputs["c0"])  # the victim's input, alone


def test_the_consistency_round_makes_the_clients_refuse_two_stories() -> None:
    config, clients, inputs, adverts, masked = _through_masked(signed=True)
    everyone = tuple(IDS)
    without_victim = tuple(c for c in IDS if c != "c0")
    alive, dropped = ConsistencyRequest(everyone), ConsistencyRequest(without_victim)
    sig = {c: clients[c].sign_consistency(alive).signature for c in ("c0", "c1", "c2")}
    sig |= {c: clients[c].sign_consistency(dropped).signature for c in ("c3", "c4")}
    b_answers = [clients[c].unmask(UnmaskRequest(everyone, (), {v: sig[v] for v in (
        "c0", "c1", "c2") if v != c})) for c in ("c1", "c2")]
    assert all("c0" in r.b_shares for r in b_answers)  # one story, told to enough neighbours
    # the other story has one neighbour's signature: c3 refuses to reveal c0's s share
    with pytest.raises(SecAggRefusal, match="only 1 of its neighbours signed"):
        clients["c3"].unmask(UnmaskRequest(without_victim, ("c0",), {"c4": sig["c4"]}))
    # padding the proof with signatures over the other story does not pass either
    with pytest.raises(SecAggRefusal, match="neighbour 'c1' did not sign this survivor set"):
        clients["c4"].unmask(UnmaskRequest(without_victim, ("c0",),
                                           {"c3": sig["c3"], "c1": sig["c1"]}))
    # nor an unmask request for another set than the one signed, with the right signatures
    with pytest.raises(SecAggRefusal, match="not the 4 it signed"):
        clients["c4"].unmask(UnmaskRequest(everyone, (), {"c1": sig["c1"], "c2": sig["c2"]}))
    # c0's b share left two neighbours, its s share none: its mask key stays secret
    assert [clients[c].revealed.get("c0") for c in ("c1", "c2", "c3", "c4")] == [
        "b", "b", None, None]


def test_a_client_signs_only_a_survivor_set_that_holds_it() -> None:
    _, clients, _, _, _ = _through_masked(signed=True)
    with pytest.raises(SecAggRefusal, match="it is not in the survivor set"):
        clients["c0"].sign_consistency(ConsistencyRequest(("c1", "c2", "c3", "c4")))
    with pytest.raises(SecAggRefusal, match="lists a client twice"):
        clients["c1"].sign_consistency(ConsistencyRequest(("c1", "c1", "c2", "c3")))
    with pytest.raises(SecAggRefusal, match="never participants"):
        clients["c2"].sign_consistency(ConsistencyRequest(("c2", "c3", "c9")))


def test_a_dropped_list_that_does_not_follow_from_the_signed_set_is_refused() -> None:
    config, clients, _, _, _ = _through_masked(signed=True)
    everyone = ConsistencyRequest(tuple(IDS))
    sig = {c: clients[c].sign_consistency(everyone).signature for c in IDS}
    proof = {v: sig[v] for v in IDS if v != "c1"}
    with pytest.raises(SecAggRefusal, match="dropped neighbours .* do not follow"):
        clients["c1"].unmask(UnmaskRequest(tuple(IDS), ("c0",), proof))
    assert clients["c1"].revealed == {}


# --------------------------------------------------------------------- (c) a lowered threshold


def test_a_threshold_of_one_in_a_hundred_is_refused() -> None:
    weak = SecAggConfig(num_clients_expected=101, threshold=1, neighbours=100, round=1,
                        context=b"run-A")
    with pytest.raises(SecAggAbort, match="threshold 1 is below this site's floor of at least "
                                          "67 of 100"):
        SecAggClient("c0", config=weak, floor=SecAggFloor())
    sparse = SecAggConfig(num_clients_expected=101, threshold=2, neighbours=2, round=1,
                          context=b"run-A")
    with pytest.raises(SecAggAbort, match="2 neighbours among 101 participants is below this "
                                          "site's floor of 100"):
        SecAggClient("c0", config=sparse, floor=SecAggFloor())


def test_a_threshold_fraction_of_one_percent_is_refused_by_every_site() -> None:
    """The server's aggregator asks for 0.01 of the neighbours; deployed sites (their own floor
    from their environment) all refuse at the first phase, so the round aborts."""
    from consortium.client.environment import SiteEnvironment

    authority = SimulatedAuthority(b"\x0b" * 32)
    stage, _ = secure_aggregation()
    _, summer = secure_aggregation(threshold=0.01)
    summer = dataclasses.replace(summer, run_id="run-A")
    sessions: dict[str, dict] = {}
    refusals: list[str] = []

    def site(cid: str) -> ClientContext:
        env = SiteEnvironment(identity=authority.identity(cid), run_id="run-A",
                              secagg=SecAggFloor(require_signatures=True))
        return ClientContext(1, cid, 0, sessions.setdefault(cid, {}), env)

    def exchange(stage_name, phase, messages):
        for cid, message in messages.items():
            try:
                yield cid, stage.respond(phase, message, site(cid))
            except SecAggAbort as exc:
                refusals.append(str(exc))

    layout = Layout((TensorSpec("w", (3,), torch.float32),))
    sent = [stage.client(Update(c, torch.zeros(3), 1.0), {}, site(c)) for c in IDS]
    with pytest.raises(RoundAborted, match="no client advertised keys"):
        summer.aggregate(sent, ctx=RoundContext(1, 7, 5, 5, layout, exchange=exchange))
    assert len(refusals) == 5 and all("floor of at least 3 of 4" in r for r in refusals)


# ------------------------------------------------------------------------ (d) a lied-about cohort


def test_a_site_refuses_to_send_its_masked_input_to_a_cohort_smaller_than_its_floor() -> None:
    """min_cohort = 3: the server says three clients are expected, then runs the round with the
    victim and one other site only."""
    floor = SecAggFloor(min_threshold=0.5, min_cohort=3, require_signatures=True)
    config = _config(n=3, k=2, t=1)
    victim, other = _clients(config, ids=("c0", "c1"), floor=floor).values()
    server = SecAggServer(config=config, graph_seed=SEED)
    broadcasts = server.collect_keys([victim.advertise_keys(), other.advertise_keys()])
    routed = server.route_shares([victim.share_keys(broadcasts["c0"]),
                                  other.share_keys(broadcasts["c1"])])
    with pytest.raises(SecAggAbort, match=r"refuses to send its masked input: only 1 other "
                                          r"participants proved themselves"):
        victim.masked_input(routed["c0"], torch.zeros(D, dtype=torch.int64))


def test_fabricated_participants_without_valid_certificates_are_refused() -> None:
    floor = SecAggFloor(min_threshold=0.5, min_cohort=3, require_signatures=True)
    config = _config(n=3, k=2, t=1)
    victim, other = _clients(config, ids=("c0", "c1"), floor=floor).values()
    ghost_c, ghost_s = generate_keypair(), generate_keypair()
    rogue, _ = simulated_identities(["ghost"], seed=b"\x0c" * 32)
    ghost = AdvertiseKeys(
        "ghost", ghost_c.public, ghost_s.public, rogue["ghost"].certificate_der,
        rogue["ghost"].sign(signed_keys_bytes(config, "ghost", ghost_c.public, ghost_s.public)),
        seed_commitment=bytes(32),
    )
    server = SecAggServer(config=config, graph_seed=SEED)
    broadcasts = server.collect_keys([victim.advertise_keys(), other.advertise_keys(), ghost])
    with pytest.raises(SecAggAbort, match="neighbour 'ghost' are not authentic"):
        victim.share_keys(broadcasts["c0"])


def test_a_cohort_floor_needs_signatures_to_count_with() -> None:
    with pytest.raises(SecAggAbort, match="min_cohort 3 counts the peers from their signed keys"):
        SecAggClient("c0", config=_config(), floor=SecAggFloor(min_threshold=0.5, min_cohort=3))
    with pytest.raises(SecAggAbort, match="requires signed keys"):
        SecAggClient("c0", config=_config(), floor=SecAggFloor(min_threshold=0.5,
                                                               require_signatures=True))


def test_a_site_helps_unmask_only_a_sum_over_its_cohort_floor() -> None:
    floor = SecAggFloor(min_threshold=0.5, min_cohort=5, require_signatures=True)
    config = _config()
    clients = _clients(config, floor=floor)
    server, _, broadcasts = _keys_phase(config, clients)
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in IDS])
    for c in IDS:
        clients[c].masked_input(routed[c], torch.zeros(D, dtype=torch.int64))
    with pytest.raises(SecAggRefusal, match="would hold 4 inputs, fewer than its floor's "
                                            "min_cohort 5"):
        clients["c1"].sign_consistency(ConsistencyRequest(("c0", "c1", "c2", "c3")))


# --------------------------------------------------------------------- (e) another run's context


def test_a_config_for_another_run_is_refused_at_the_site() -> None:
    from consortium.client.environment import SiteEnvironment

    authority = SimulatedAuthority(b"\x0d" * 32)
    stage, _ = secure_aggregation()
    env = SiteEnvironment(identity=authority.identity("c0"), run_id="run-A",
                          secagg=SecAggFloor(min_threshold=0.5, require_signatures=True))
    session: dict = {}
    stage.client(Update("c0", torch.zeros(3), 1.0), {}, ClientContext(1, "c0", 0, session, env))
    other_run = SecAggConfig(num_clients_expected=5, threshold=3, neighbours=4, round=1,
                             context=b"consortium/secagg/v2/run-B")
    with pytest.raises(PipelineError, match="context b'consortium/secagg/v2/run-A' of run 'run-A'"):
        stage.respond("keys", other_run, ClientContext(1, "c0", 0, session, env))
    assert session["secure_aggregation"].client is None  # no key was made, nothing sent


def test_keys_signed_for_another_run_do_not_verify() -> None:
    config = _config(context=b"consortium/secagg/v2/run-B")
    clients = _clients(config)
    _, _, broadcasts = _keys_phase(config, clients)
    other = _clients(_config(context=b"consortium/secagg/v2/run-A"), ids=("c1",))["c1"]
    old = other.advertise_keys()
    replay = _with_neighbour(broadcasts["c0"], "c1", keys=(old.c_public, old.s_public),
                             signed=(old.certificate, old.signature))
    with pytest.raises(SecAggAbort, match="keys of neighbour 'c1' are not authentic"):
        clients["c0"].share_keys(replay)


def test_a_server_that_sends_two_clients_different_thresholds_is_caught_by_their_signatures() -> None:
    """Signatures bind the whole config: c1 was told t = 3, c0 t = 2; c0 refuses c1's keys."""
    clients = _clients(_config(t=2), ids=("c0", "c2", "c3", "c4"))
    clients["c1"] = _clients(_config(t=3), ids=("c1",))["c1"]
    _, _, broadcasts = _keys_phase(_config(t=2), clients)
    with pytest.raises(SecAggAbort, match="keys of neighbour 'c1' are not authentic"):
        clients["c0"].share_keys(broadcasts["c0"])


def test_shares_routed_from_a_stranger_are_refused() -> None:
    config = _config()
    clients = _clients(config)
    server, _, broadcasts = _keys_phase(config, clients)
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in IDS])
    forged = SharesForClient("c0", {**routed["c0"].ciphertexts, "c9": b"\x00" * 60})
    with pytest.raises(SecAggAbort, match="non-neighbours"):
        clients["c0"].masked_input(forged, torch.zeros(D, dtype=torch.int64))

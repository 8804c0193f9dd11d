"""SecAgg+ state machines: exact sums under dropouts, thresholds, uniform masks, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from consortium.errors import DecryptionError
from consortium.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    SecAggServer,
    SharesForClient,
    UnmaskRequest,
    neighbour_graph,
    run_secagg_round,
)

D = 1000
BITS = 32
GRAPH_SEED = bytes(range(32))


def _inputs(n: int, *, d: int = D, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Quantised updates with 16-bit levels, as quantize(..., bits=16) would give.
    return {f"c{i:02d}": torch.randint(0, 2**16, (d,), generator=g) for i in range(n)}


def _config(n: int, *, k: int, t: int) -> SecAggConfig:
    return SecAggConfig(
        num_clients_expected=n, threshold=t, neighbours=k, round=3, context=b"test-run"
    )


def _plain_sum(inputs: dict[str, torch.Tensor], ids: tuple[str, ...]) -> torch.Tensor:
    return sum((inputs[c] for c in ids), torch.zeros(D, dtype=torch.int64)) % 2**BITS


# Full SecAgg (k = n - 1) with 20 clients, and a sparse SecAgg+ graph over 30 clients.
GRAPHS = {"full": (20, 19, 10), "sparse": (30, 14, 7)}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("phase", ["keys", "shares", "masked"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_sum_is_exact_under_dropouts(graph: str, phase: str, fraction: float) -> None:
    n, k, t = GRAPHS[graph]
    inputs = _inputs(n)
    ids = sorted(inputs)
    dropping = ids[:: max(1, n // max(1, round(fraction * n)))][: round(fraction * n)]
    assert len(dropping) == round(fraction * n)
    result = run_secagg_round(
        inputs,
        config=_config(n, k=k, t=t),
        drop_after={c: phase for c in dropping},
        graph_seed=GRAPH_SEED,
    )
    expected_contributors = ids if phase == "masked" else [c for c in ids if c not in dropping]
    assert result.contributors == tuple(expected_contributors)
    assert result.sum.dtype == torch.int64
    assert torch.equal(result.sum, _plain_sum(inputs, result.contributors))


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_sum_is_exact_with_drops_at_every_phase(graph: str) -> None:
    n, k, t = GRAPHS[graph]
    inputs = _inputs(n, seed=1)
    ids = sorted(inputs)
    drop = {ids[1]: "keys", ids[4]: "shares", ids[7]: "shares", ids[10]: "masked", ids[13]: "keys"}
    result = run_secagg_round(
        inputs, config=_config(n, k=k, t=t), drop_after=drop, graph_seed=GRAPH_SEED
    )
    survivors = tuple(c for c in ids if drop.get(c) not in ("keys", "shares"))
    assert result.contributors == survivors
    assert torch.equal(result.sum, _plain_sum(inputs, survivors))


def test_graph_is_regular_symmetric_and_seeded() -> None:
    ids = [f"c{i}" for i in range(30)]
    graph = neighbour_graph(ids, degree=14, seed=GRAPH_SEED)
    assert all(len(graph[u]) == 14 and u not in graph[u] for u in ids)
    assert all(u in graph[v] for u in ids for v in graph[u])
    assert graph == neighbour_graph(list(reversed(ids)), degree=14, seed=GRAPH_SEED)
    assert graph != neighbour_graph(ids, degree=14, seed=bytes(32))
    odd = neighbour_graph(ids, degree=5, seed=GRAPH_SEED)  # Harary graph with a diameter edge
    assert all(len(odd[u]) == 5 for u in ids)


def _clients_and_server(n: int, *, k: int, t: int):
    config = _config(n, k=k, t=t)
    server = SecAggServer(config=config, graph_seed=GRAPH_SEED)
    clients = {f"c{i:02d}": SecAggClient(f"c{i:02d}", config=config) for i in range(n)}
    return config, server, clients


def test_below_threshold_after_masked_aborts_before_any_reveal() -> None:
    n, k, t = 10, 9, 6
    inputs = _inputs(n, seed=2)
    _, server, clients = _clients_and_server(n, k=k, t=t)
    ids = sorted(clients)
    broadcasts = server.collect_keys([clients[c].advertise_keys() for c in ids])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in ids])
    # Half of the clients vanish before sending a masked input: 5 survivors < t = 6.
    with pytest.raises(SecAggAbort, match=r"only 4 of its 9 neighbours .* threshold 6"):
        server.collect_masked([clients[c].masked_input(routed[c], inputs[c]) for c in ids[:5]])
    assert server.reconstructed == []
    assert all(client.revealed == {} for client in clients.values())


def test_below_threshold_in_unmask_reconstructs_nothing() -> None:
    n, k, t = 10, 9, 6
    inputs = _inputs(n, seed=3)
    _, server, clients = _clients_and_server(n, k=k, t=t)
    ids = sorted(clients)
    broadcasts = server.collect_keys([clients[c].advertise_keys() for c in ids])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in ids])
    request = server.collect_masked([clients[c].masked_input(routed[c], inputs[c]) for c in ids])
    # Only 5 clients answer: a secret gets at most 5 < 6 shares (4 if its owner answered).
    responses = [clients[c].unmask(request) for c in ids[:5]]
    with pytest.raises(SecAggAbort, match=r"client .c00.: only 4 of its neighbours .* threshold 6"):
        server.finish(responses)
    assert server.reconstructed == []


def test_too_few_after_keys_aborts() -> None:
    with pytest.raises(SecAggAbort, match="threshold"):
        run_secagg_round(
            _inputs(10),
            config=_config(10, k=9, t=8),
            drop_after={"c00": "keys", "c01": "keys", "c02": "keys"},
        )


def test_masked_vector_looks_uniform_and_differs_from_input() -> None:
    n, k, t, d = 5, 4, 3, 16_000
    config = _config(n, k=k, t=t)
    server = SecAggServer(config=config, graph_seed=GRAPH_SEED)
    clients = {f"c{i}": SecAggClient(f"c{i}", config=config) for i in range(n)}
    broadcasts = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in clients])
    x = torch.full((d,), 7, dtype=torch.int64)  # as far from uniform as it gets
    y = clients["c0"].masked_input(routed["c0"], x).vector
    assert y.shape == x.shape and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 2**BITS
    assert (y == x).sum().item() <= 1
    counts = torch.bincount(y >> (BITS - 4), minlength=16).to(torch.float64)
    expected = d / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 15 degrees of freedom: P(chi2 > 60) is about 1e-7 for uniform values.
    assert chi2 < 60.0, chi2


def _through_masked(n: int = 6, *, k: int = 5, t: int = 3, tamper: bool = False):
    inputs = _inputs(n, seed=4)
    _, server, clients = _clients_and_server(n, k=k, t=t)
    ids = sorted(clients)
    broadcasts = server.collect_keys([clients[c].advertise_keys() for c in ids])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in ids])
    if tamper:
        victim = routed[ids[0]]
        ciphertexts = dict(victim.ciphertexts)
        blob = bytearray(ciphertexts[ids[1]])
        blob[20] ^= 0x01
        ciphertexts[ids[1]] = bytes(blob)
        routed[ids[0]] = SharesForClient(recipient=victim.recipient, ciphertexts=ciphertexts)
    # ids[-1] drops after sending shares.
    request = server.collect_masked(
        [clients[c].masked_input(routed[c], inputs[c]) for c in ids[:-1]]
    )
    return inputs, server, clients, ids, request


def test_client_refuses_both_shares_of_one_client() -> None:
    _, _, clients, ids, request = _through_masked()
    dropped = ids[-1]
    assert request.dropped == (dropped,)
    greedy = UnmaskRequest(survivors=request.survivors + (dropped,), dropped=(dropped,))
    with pytest.raises(SecAggRefusal, match="both"):
        clients[ids[0]].unmask(greedy)
    assert clients[ids[0]].revealed == {}


def test_client_refuses_second_request_for_the_other_share() -> None:
    _, _, clients, ids, request = _through_masked()
    client = clients[ids[0]]
    first = client.unmask(request)
    assert ids[-1] in first.s_shares and ids[-1] not in first.b_shares
    assert not set(first.b_shares) & set(first.s_shares)
    # Now claim the dropped client survived, to get its b share too.
    flipped = UnmaskRequest(survivors=tuple(sorted(set(ids))), dropped=())
    with pytest.raises(SecAggRefusal, match="already revealed"):
        client.unmask(flipped)
    # And claim a survivor dropped, to get its s share too.
    other = ids[1]
    flipped = UnmaskRequest(
        survivors=tuple(c for c in request.survivors if c != other),
        dropped=request.dropped + (other,),
    )
    with pytest.raises(SecAggRefusal, match="already revealed"):
        client.unmask(flipped)


def test_tampered_ciphertext_raises_and_reveals_nothing() -> None:
    _, _, clients, ids, request = _through_masked(tamper=True)
    with pytest.raises(DecryptionError):
        clients[ids[0]].unmask(request)
    assert clients[ids[0]].revealed == {}
    # The other clients are unaffected.
    assert clients[ids[1]].unmask(request).client_id == ids[1]


def test_unmasked_sum_in_manual_flow_and_phase_order_enforced() -> None:
    inputs, server, clients, ids, request = _through_masked()
    responses = [clients[c].unmask(request) for c in request.survivors]
    result = server.finish(responses)
    assert torch.equal(result.sum, _plain_sum(inputs, tuple(ids[:-1])))
    assert sorted(server.reconstructed) == sorted([(c, "b") for c in ids[:-1]] + [(ids[-1], "s")])
    with pytest.raises(SecAggAbort, match="phase"):
        clients[ids[0]].advertise_keys()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="threshold"):
        _config(10, k=4, t=5)
    config = _config(10, k=9, t=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="drop_after"):
        run_secagg_round(_inputs(3), config=_config(3, k=2, t=2), drop_after={"c00": "later"})


def _through_shares(n: int = 6, *, k: int = 5, t: int = 3):
    inputs = _inputs(n, seed=5)
    _, server, clients = _clients_and_server(n, k=k, t=t)
    ids = sorted(clients)
    broadcasts = server.collect_keys([clients[c].advertise_keys() for c in ids])
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in ids])
    return inputs, server, clients, ids, routed


def test_masked_inputs_stream_into_a_running_sum() -> None:
    inputs, server, clients, ids, routed = _through_shares()
    produced = []

    def one_at_a_time():  # the server pulls each masked vector as it arrives
        for c in ids:
            produced.append(c)
            yield clients[c].masked_input(routed[c], inputs[c])

    request = server.collect_masked(one_at_a_time())
    assert produced == ids and request.dropped == ()
    result = server.finish([clients[c].unmask(request) for c in request.survivors])
    assert torch.equal(result.sum, _plain_sum(inputs, tuple(ids)))


@pytest.mark.parametrize("bad", ["twice", "range", "shape"])
def test_a_malformed_masked_input_aborts(bad: str) -> None:
    inputs, server, clients, ids, routed = _through_shares()
    messages = [clients[c].masked_input(routed[c], inputs[c]) for c in ids]
    if bad == "twice":
        messages.append(messages[0])
    elif bad == "range":
        messages[1] = dataclasses.replace(messages[1], vector=messages[1].vector + 2**BITS)
    else:
        messages[1] = dataclasses.replace(messages[1], vector=messages[1].vector[:-1])
    with pytest.raises(SecAggAbort, match={"twice": "two masked", "range": "outside",
                                           "shape": "one shape"}[bad]):
        server.collect_masked(messages)


@pytest.mark.parametrize(("n", "k"), [(30, 14), (31, 7), (12, 11), (40, 6)])
def test_one_row_of_the_graph_is_that_row_of_the_whole_graph(n: int, k: int) -> None:
    ids = [f"c{i:02d}" for i in range(n)]
    whole = neighbour_graph(ids, degree=k, seed=GRAPH_SEED)
    for cid in ids:
        assert neighbour_graph(ids, degree=k, seed=GRAPH_SEED, only=cid) == {cid: whole[cid]}
    assert neighbour_graph(ids, degree=k, seed=GRAPH_SEED, only="stranger") == {}


def test_a_response_revealing_both_shares_of_one_client_aborts() -> None:
    inputs, server, clients, ids, request = _through_masked()
    responses = [clients[c].unmask(request) for c in request.survivors]
    forged = dataclasses.replace(responses[0], s_shares=dict(responses[0].b_shares))
    with pytest.raises(SecAggAbort, match="both shares"):
        server.finish([forged, *responses[1:]])


# ------------------------------------------------------------------------------- authenticated


@pytest.fixture(scope="module")
def pki():
    from consortium.secagg.identity import simulated_identities

    return simulated_identities([f"c{i:02d}" for i in range(30)], seed=b"\x05" * 32)


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("phase", [None, "keys", "shares", "masked", "consistency"])
def test_authenticated_rounds_sum_exactly_under_dropouts(graph: str, phase, pki) -> None:
    n, k, t = GRAPHS[graph]
    identities, trust = pki
    inputs = _inputs(n, seed=6)
    ids = sorted(inputs)
    drop = {} if phase is None else {c: phase for c in ids[1:4]}
    config = _config(n, k=k, t=t)
    plain = run_secagg_round(inputs, config=config, drop_after=drop, graph_seed=GRAPH_SEED)
    signed = run_secagg_round(
        inputs, config=config, drop_after=drop, graph_seed=GRAPH_SEED,
        identities={c: identities[c] for c in ids}, trust=trust,
    )
    assert signed.contributors == plain.contributors
    assert torch.equal(signed.sum, plain.sum)
    assert torch.equal(signed.sum, _plain_sum(inputs, signed.contributors))
    expected = ids if phase in ("masked", "consistency") else [c for c in ids if c not in drop]
    assert signed.contributors == tuple(expected)


def test_the_server_runs_the_consistency_round_only_for_signed_keys(pki) -> None:
    identities, trust = pki
    config = _config(4, k=3, t=2)
    ids = [f"c{i:02d}" for i in range(4)]
    server = SecAggServer(config=config, graph_seed=GRAPH_SEED)
    clients = {c: SecAggClient(c, config=config, identity=identities[c], trust=trust) for c in ids}
    plain = SecAggClient("c03", config=config)  # no identity: left out of a signed round
    adverts = [clients[c].advertise_keys() for c in ids[:3]] + [plain.advertise_keys()]
    broadcasts = server.collect_keys(adverts)
    assert server.authenticated and set(broadcasts) == set(ids[:3])
    assert all(set(b.signatures) == set(b.neighbour_keys) for b in broadcasts.values())
    _, unsigned, _, _, _ = _through_masked()
    assert not unsigned.authenticated
    with pytest.raises(SecAggAbort, match="only when the clients signed"):
        unsigned.collect_consistency([])


def test_an_identity_goes_with_a_trust_anchor_and_its_own_name(pki) -> None:
    identities, trust = pki
    config = _config(4, k=3, t=2)
    with pytest.raises(ValueError, match="both an identity and a trust anchor"):
        SecAggClient("c00", config=config, identity=identities["c00"])
    with pytest.raises(SecAggAbort, match="certificate names site 'c01'"):
        SecAggClient("c00", config=config, identity=identities["c01"], trust=trust)


def test_graph_degree_is_what_the_graph_gives() -> None:
    from consortium.secagg.protocol import graph_degree

    for n in range(2, 30):
        ids = [f"c{i:02d}" for i in range(n)]
        for k in range(1, n + 2):
            graph = neighbour_graph(ids, degree=k, seed=GRAPH_SEED)
            assert {len(v) for v in graph.values()} == {graph_degree(n, k)}, (n, k)

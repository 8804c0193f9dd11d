"""Random-k under SecAgg+ over gRPC: the sites send the round's shared k coordinates as uint32
words, and a site whose masked vector has another length is left out of the sum.

A real ``serve()`` on 127.0.0.1 (mutual TLS) and the four heart-disease hospitals as
``SiteRunner`` threads (the harness of ``tests/deploy/test_hostile_secagg.py``), with
``[compression] uplink = "randk"``, ``fraction = 0.25`` and secure aggregation. In round 1 the
hostile hospital appends one coordinate to its masked vector (after masking, as a site that
runs other code would): the server drops it like a site that left after sharing its keys
(its pairwise masks are recovered from its neighbours' shares), the round's sum is exactly
the three honest hospitals' quantised inputs, and the model moves only on the round's k
coordinates. Round 2 runs with all four. About 10 s.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.deploy.inprocess import serve_into

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
HOSTILE = "va"
FRACTION = 0.25
ROUNDS = 2
SETTINGS = [f"rounds={ROUNDS}", "evaluation.baselines=[]", f"evaluation.every={ROUNDS}",
            "sampling.fraction=1.0", "secure_aggregation.enabled=true",
            'compression.uplink="randk"', f"compression.fraction={FRACTION}"]


def _hospital(d: Path, site: str) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    if not path.exists():
        path.write_bytes((files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes())
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy import client as site_module
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.provision import provision
    from consortium.secagg.messages import MaskedInput
    from consortium.secagg.protocol import SecAggServer
    from consortium.secagg.stage import SecureAggregation, SecureSum

    d = tmp_path_factory.mktemp("secure-randk")
    provision(list(HOSPITALS), d / "certs")
    out: dict[str, Any] = {"inputs": {}, "masked": {}, "sums": {}, "models": {}, "info": {},
                           "honest": {}}
    respond, finish, aggregate, fit = (SecureAggregation.respond, SecAggServer.finish,
                                       SecureSum.aggregate, site_module._Site.fit)

    def tampered_respond(self: Any, phase: str, message: Any, ctx: Any) -> Any:
        session = ctx.session.get(self.name)
        if phase == "masked" and getattr(session, "vector", None) is not None:
            out["inputs"][(ctx.round, ctx.client_id)] = session.vector.clone()
        reply = respond(self, phase, message, ctx)
        if phase == "masked":
            out["masked"][(ctx.round, ctx.client_id)] = tuple(reply.vector.shape)
            if ctx.round == 1 and ctx.client_id == HOSTILE:
                reply = MaskedInput(reply.client_id, torch.cat([reply.vector, reply.vector[:1]]))
        return reply

    def seen_aggregate(self: Any, updates: Any, *, ctx: Any) -> Any:
        out["run_id"] = self.run_id
        agg = aggregate(self, updates, ctx=ctx)
        out["info"][ctx.round] = dict(agg.info)
        return agg

    def seen_finish(self: Any, responses: Any) -> Any:
        result = finish(self, responses)
        out["sums"][self.config.round] = (result.sum.clone(), tuple(result.contributors))
        return result

    def seen_fit(self: Any, task: Any) -> Any:
        out["models"].setdefault(task.round - 1, task.parameters.vector.clone())
        return fit(self, task)

    approve = (manifest_hash(load_config(None, SETTINGS)),)
    ports: queue.Queue[int] = queue.Queue()

    serve = serve_into(
        out, ports, certs=d / "certs" / "server", out=d / "out",
        min_sites=len(HOSPITALS), overrides=SETTINGS, register_timeout=60,
        round_timeout=30, heartbeat_s=5,
    )

    def site(name: str, port: int) -> None:
        try:
            out["honest"][name] = SiteRunner(
                f"127.0.0.1:{port}", site=name, data=_hospital(d, name),
                certs=d / "certs" / "sites" / name, approve=approve, poll_s=2,
                give_up_after_s=30, state_dir=d / "state" / name,
            ).run()
        except BaseException as exc:
            out["honest"][name] = exc

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SecureAggregation, "respond", tampered_respond)
        patch.setattr(SecureSum, "aggregate", seen_aggregate)
        patch.setattr(SecAggServer, "finish", seen_finish)
        patch.setattr(site_module._Site, "fit", seen_fit)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {out['served']!r}"
        threads = [threading.Thread(target=site, args=(s, port), daemon=True) for s in HOSPITALS]
        for t in threads:
            t.start()
        server.join(timeout=240)
        for t in threads:
            t.join(timeout=60)
    lines = (d / "out" / "metrics.jsonl").read_text().splitlines()
    out["records"] = {r["round"]: r for r in map(json.loads, lines)}
    return out


def test_the_run_finishes_and_every_site_sends_k_plus_one_words(run: dict[str, Any]) -> None:
    from consortium.secagg.stage import sparse_count

    assert not isinstance(run["served"], BaseException), repr(run["served"])
    assert sorted(run["records"]) == [1, 2]
    d = run["models"][0].numel()
    k = sparse_count(d, FRACTION)
    assert k < d
    assert set(run["masked"].values()) == {(k + 1,)}  # the k coordinates and the weight slot
    assert len(run["masked"]) == ROUNDS * len(HOSPITALS)


def test_a_masked_vector_of_the_wrong_length_is_left_out_and_the_sum_is_the_honest_ones(
    run: dict[str, Any],
) -> None:
    assert run["info"][1]["secagg_malformed"] == [HOSTILE]
    assert run["info"][1]["secagg_dropped"] == [HOSTILE]
    for rnd, expected in ((1, tuple(h for h in HOSPITALS if h != HOSTILE)), (2, HOSPITALS)):
        total, contributors = run["sums"][rnd]
        assert tuple(sorted(contributors)) == tuple(sorted(expected))
        inputs = torch.stack([run["inputs"][(rnd, c)] for c in contributors])
        assert torch.equal(total.reshape(-1), inputs.sum(0) % 2**32), rnd
    assert "secagg_malformed" not in run["info"][2]


def test_the_model_moves_only_on_the_rounds_shared_coordinates(run: dict[str, Any]) -> None:
    from consortium.compression.secure import round_coordinates
    from consortium.secagg.stage import secagg_context, sparse_count

    before, after = run["models"][0], run["models"][1]
    d = before.numel()
    idx = round_coordinates(d, sparse_count(d, FRACTION), context=secagg_context(run["run_id"]),
                            round=1)
    moved = (after != before).nonzero().reshape(-1)
    assert bool(torch.isfinite(after).all())
    assert set(moved.tolist()) <= set(idx.tolist()) and moved.numel() > 0

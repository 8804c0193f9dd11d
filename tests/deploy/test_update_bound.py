"""No site takes over the model under `consortium server`'s defaults (issue 13, point 2).

Four hospitals and one attacking site ("mallory", holding part of the Hungarian file). The
attacker trains like everyone, then replaces what it sends in chosen rounds: its own update ×4
at an inflated weight, a model replacement (Bagdasaryan et al. 2020: ``γ(X − G)`` with the
boost that makes the weighted mean land on the chosen model ``X``, at its full declared
weight), or a delta of 3e38. Under the server's default update bound the global model's change
in an attacked round stays within the bound that round recorded, and the accuracy after the
run is within 0.02 of the run without the attacker; with the bound turned off on purpose
(``--update-bound 0``) the same replacement does take the model over.

The fast tests run the server's own pipeline in process (the configuration `consortium server`
resolves, the same `simulate` it runs) with the sites in process; the slow one runs the real
thing: a `consortium server` process, four hospital processes over mutual TLS and the attacker
as a real `SiteRunner` in this process with its update replaced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import consortium
from consortium.data.base import ClientData, FederatedDataset, Split
from consortium.executors.sequential import SequentialExecutor
from consortium.messages import Result, Task

ATTACKER = "mallory"
ROUNDS = 8
ATTACKED = (1, 5)  # round 1 is protected too: the bound needs no history
OVERRIDES = [f"rounds={ROUNDS}", "evaluation.baselines=[]"]
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")

Attack = Callable[[torch.Tensor, Result, float], tuple[torch.Tensor, float]]
"""``(global model the task carried, honest result, the round's total weight) -> (delta, weight)``."""


def scaled_by_4(model: torch.Tensor, result: Result, total: float) -> tuple[torch.Tensor, float]:
    """Its own update ×4 (the review's second takeover), at its declared weight."""
    assert result.update is not None
    return result.update.delta * 4, result.update.weight


def inflated(model: torch.Tensor, result: Result, total: float) -> tuple[torch.Tensor, float]:
    """×4 at weight 1e9: a deployment's hub refuses the weight (tests/deploy/test_hostile_site);
    here nothing caps it, and the bound alone must hold the mean."""
    assert result.update is not None
    return result.update.delta * 4, 1e9


def replacement(model: torch.Tensor, result: Result, total: float) -> tuple[torch.Tensor, float]:
    """The weighted mean becomes ``X`` (every weight −5: one class everywhere) in one round."""
    assert result.update is not None
    target = torch.full_like(model, -5.0)
    weight = result.update.weight
    return (target - model) * (total / weight), weight


def huge(model: torch.Tensor, result: Result, total: float) -> tuple[torch.Tensor, float]:
    assert result.update is not None
    return torch.full_like(model, 3e38), result.update.weight


ATTACKS: dict[str, Attack] = {
    "x4": scaled_by_4, "replacement": replacement, "3e38": huge, "weight 1e9": inflated,
}


class Attacked(SequentialExecutor):
    """The sites in process; remembers the model each round's tasks carried and lets
    ``attack`` rewrite the attacker's result in the rounds of ``ATTACKED``."""

    def __init__(self, attack: Attack | None) -> None:
        super().__init__()
        self.attack = attack
        self.sent: dict[int, torch.Tensor] = {}

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, Any]) -> Iterator[Result]:
        if tasks:
            self.sent[tasks[0].round] = tasks[0].parameters.vector.clone()
        results = list(super().fit(tasks, clients))
        total = sum(r.update.weight for r in results if r.update is not None)
        for result in results:
            if result.client_id == ATTACKER and self.attack and result.round in ATTACKED:
                assert result.update is not None
                delta, weight = self.attack(self.sent[result.round], result, total)
                update = dataclasses.replace(result.update, delta=delta, weight=weight)
                result = dataclasses.replace(result, update=update)
            yield result


def _with_attacker(dataset: FederatedDataset) -> FederatedDataset:
    """The four hospitals and mallory, who holds the first 80 training rows of Hungary's."""
    hungary = dataset.clients["hungarian"]
    mine = ClientData(Split(hungary.train.x[:80], hungary.train.y[:80]),
                      Split(hungary.test.x[:0], hungary.test.y[:0]))
    clients = {**dict(dataset.clients), ATTACKER: mine}
    return dataclasses.replace(dataset, clients=clients)


def hospitals_accuracy(per_client: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int]) -> float:
    """The hospitals' accuracy weighted by their test sets (the federated accuracy without
    whatever the attacker reports about its own data)."""
    return sum(per_client[h]["accuracy"] * sizes[h] for h in HOSPITALS) / sum(sizes[h] for h in HOSPITALS)


def _test_sizes() -> dict[str, int]:
    from consortium.config import load_config
    from consortium.data import load_dataset

    dataset = load_dataset(load_config(None).data, seed=0)
    return {h: len(dataset.clients[h].test.y) for h in HOSPITALS}


@pytest.fixture(scope="module")
def clean_accuracy() -> float:
    """The run without the attacker: the four hospitals, the same settings."""
    return float(consortium.simulate(None, overrides=OVERRIDES).summary["final"]["accuracy"])


def _server_run(attack: Attack | None, flag: float | None) -> tuple[Any, Attacked]:
    """What `consortium server [--update-bound flag]` runs, with the five sites in process."""
    from consortium.config import load_config
    from consortium.data import load_dataset
    from consortium.deploy.server import _with_update_bound

    cfg = _with_update_bound(load_config(None, [*OVERRIDES, "sampling.clients_per_round=5"]), flag)
    executor = Attacked(attack)
    result = consortium.simulate(
        cfg, dataset=_with_attacker(load_dataset(cfg.data, seed=cfg.seed)), executor=executor,
    )
    return result, executor


def changes(sent: Mapping[int, torch.Tensor], final: torch.Tensor) -> dict[int, float]:
    """‖θ_r − θ_{r−1}‖ for every round r, from the models the tasks carried and the final one."""
    after = {r: sent.get(r + 1, final) for r in sent}
    return {r: float(torch.linalg.vector_norm((after[r] - sent[r]).double())) for r in sent}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_no_takeover_under_the_server_default(name: str, clean_accuracy: float) -> None:
    result, executor = _server_run(ATTACKS[name], None)
    assert result.config.aggregation.update_bound == 3.0
    records = {r["round"]: r for r in result.history}
    moved = changes(executor.sent, result.params.vector)
    assert torch.isfinite(result.params.vector).all()
    for rnd in ATTACKED:
        bound = records[rnd]["update_bound"]
        assert moved[rnd] <= bound * (1 + 1e-5), (rnd, moved[rnd], bound)
        # ×4 of a short update may stay within 3 × the median: then it is not clipped, and the
        # mean (even at weight 1e9) still moves by no more than the bound
        assert name in ("x4", "weight 1e9") or ATTACKER in records[rnd]["update_bound_clipped"]
    if name != "weight 1e9":  # the round *is* mallory's ×4 update then: bounded, not harmless
        accuracy = hospitals_accuracy(result.per_client, _test_sizes())
        assert accuracy == pytest.approx(clean_accuracy, abs=0.02)


def test_with_the_bound_turned_off_the_replacement_takes_the_model() -> None:
    """The same attack, `--update-bound 0`: after round 1 the global model is mallory's."""
    result, executor = _server_run(replacement, 0.0)
    assert "update_bound" not in result.history[0]
    target = torch.full_like(executor.sent[1], -5.0)
    before, after = (float(torch.linalg.vector_norm(executor.sent[r] - target)) for r in (1, 2))
    assert after < 0.05 * before  # the honest updates are all that keeps it off X exactly


# -- the setting: config key, flag, start line ---------------------------------------------------


def test_the_server_resolves_the_bound_and_says_which_is_in_force(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from consortium.config import load_config
    from consortium.deploy.server import _with_update_bound, update_bound_line

    plain = load_config(None)
    assert plain.aggregation.update_bound == 0.0  # a simulation: off
    assert _with_update_bound(plain, None).aggregation.update_bound == 3.0
    assert _with_update_bound(load_config(None, ["aggregation.update_bound=2"]), None).aggregation.update_bound == 2.0
    assert _with_update_bound(load_config(None, ["aggregation.update_bound=2"]), 4.0).aggregation.update_bound == 4.0
    assert "at most 3 × the round's median" in update_bound_line(_with_update_bound(plain, None))
    off = _with_update_bound(plain, 0.0)
    assert "WARNING --update-bound 0" in capsys.readouterr().err
    assert update_bound_line(off).startswith("update bound: OFF")
    secagg = load_config(None, ["secure_aggregation.enabled=true"])
    assert "secure aggregation hides single updates" in update_bound_line(_with_update_bound(secagg, None))
    central = load_config(None, ["privacy.mode=central", "privacy.noise_multiplier=1.0"])
    assert "central DP's clip norm" in update_bound_line(_with_update_bound(central, None))


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_bad_bound_is_refused_naming_the_flag_or_the_key(value: float) -> None:
    from consortium.config import load_config
    from consortium.deploy.server import _with_update_bound
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="--update-bound"):
        _with_update_bound(load_config(None), value)
    with pytest.raises(ConfigError, match="aggregation.update_bound"):
        load_config(None, [f"aggregation.update_bound={value}"])


def test_a_resumed_run_keeps_its_bound(tmp_path: Path) -> None:
    from consortium.deploy.server import serve
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="--update-bound"):
        serve(None, listen="127.0.0.1:0", certs=None, out=tmp_path, min_sites=1, resume=tmp_path,
              update_bound=2.0)


# -- the real deployment --------------------------------------------------------------------------


def _hungary_head(source: Path, rows: int) -> str:
    return "".join(source.read_text(encoding="ascii").splitlines(keepends=True)[:rows])


@pytest.mark.slow
def test_four_hospitals_and_one_attacker_over_grpc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   clean_accuracy: float) -> None:
    """The acceptance test: `consortium server` with its defaults, four hospital processes and
    mallory, a real `SiteRunner` whose results are replaced in the attacked rounds (×4 in round
    1, the model replacement at its full declared weight in round 5)."""
    pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
    pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")
    from importlib.resources import files

    from consortium.data import heart_disease
    from consortium.deploy import client as site_module
    from consortium.deploy.provision import provision
    from tests.deploy.test_e2e import _approval, _cli, _free_port, _stop

    sites = (*HOSPITALS, ATTACKER)
    provision(list(sites), tmp_path / "certs")
    for site, name in heart_disease.SITES.items():
        (tmp_path / f"{site}.data").write_bytes(
            (files("consortium.data") / "_heart_disease" / name).read_bytes())
    (tmp_path / f"{ATTACKER}.data").write_text(
        _hungary_head(tmp_path / "hungarian.data", 100), encoding="ascii")
    # mallory's own process accepts its name as a hospital's (the name seeds its split)
    monkeypatch.setitem(heart_disease.SITES, ATTACKER, "processed.hungarian.data")

    sent: dict[int, torch.Tensor] = {}
    layouts: list[Any] = []
    honest_fit = site_module._Site.fit
    attacks = {1: scaled_by_4, 5: replacement}

    def fit(self: Any, task: Task) -> Result:
        sent[task.round] = task.parameters.vector.clone()
        layouts.append(task.parameters.layout)
        result = honest_fit(self, task)
        attack = attacks.get(task.round)
        if attack is None or result.update is None:
            return result
        declared = float(self.info[2])  # what mallory told the server at Describe
        total = declared * 920 / 100  # about the round's total weight: the boost need not be exact
        delta, _ = attack(sent[task.round], result, total)
        return dataclasses.replace(result, update=dataclasses.replace(
            result.update, delta=delta, weight=declared))

    monkeypatch.setattr(site_module._Site, "fit", fit)

    overrides = [*OVERRIDES, "sampling.clients_per_round=5"]
    port = _free_port()
    server = _cli(
        "server", "--listen", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs" / "server"),
        "--out", str(tmp_path / "run"), "--min-sites", "5", "--register-timeout", "90",
        "--no-progress", *[a for o in overrides for a in ("--set", o)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    hospitals = [_cli(
        "client", "--server", f"127.0.0.1:{port}", "--site", site, "--data",
        str(tmp_path / f"{site}.data"), "--certs", str(tmp_path / "certs" / "sites" / site),
        *_approval(None, overrides), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    ) for site in HOSPITALS]
    runner = site_module.SiteRunner(
        f"127.0.0.1:{port}", site=ATTACKER, data=tmp_path / f"{ATTACKER}.data",
        certs=tmp_path / "certs" / "sites" / ATTACKER, approve=_approval_hashes(overrides),
        give_up_after_s=60,
    )
    mallory = threading.Thread(target=runner.run, daemon=True)
    mallory.start()
    try:
        _, err = server.communicate(timeout=400)
        assert server.returncode == 0, err[-3000:]
        for c in hospitals:
            assert c.wait(timeout=60) == 0
        mallory.join(timeout=60)
    finally:
        _stop(server, *hospitals)
    assert "update bound: every update scaled to at most 3 × the round's median" in err
    run = tmp_path / "run"
    records = {r["round"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "update_bound" in r}
    from safetensors.torch import load_file

    final = layouts[0].flatten(load_file(str(run / "model.safetensors")))
    moved = changes(sent, final)
    for rnd in attacks:
        assert moved[rnd] <= records[rnd]["update_bound"] * (1 + 1e-5), (rnd, moved, records[rnd])
    assert ATTACKER in records[5]["update_bound_clipped"]  # the replacement
    summary = json.loads((run / "summary.json").read_text())
    accuracy = hospitals_accuracy(summary["per_client"], _test_sizes())
    assert accuracy == pytest.approx(clean_accuracy, abs=0.02)
    assert all(math.isfinite(v) for v in final.tolist())


def _approval_hashes(overrides: Sequence[str]) -> list[str]:
    from tests.deploy.test_e2e import _approval

    args = _approval(None, overrides)
    return [a for a, flag in zip(args[1:], args) if flag == "--approve"]

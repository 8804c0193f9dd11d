"""``[tracking]`` under ``consortium server``: a real deployment on 127.0.0.1 (one server, three
site processes over mutual TLS, the harness of test_e2e.py) logs every round to a local MLflow
file store and TensorBoard event files, read back here as a user would.

The same run fine-tunes a model with a frozen body under secure aggregation, whose rounding
would move the body at the server: the deployment server assembles through
``federation.BUILDERS`` as a simulation does, so the body must come back bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from consortium.config import load_config
from consortium.federation import derive_init_seed
from consortium.models.zoo import mlp
from consortium.reporting.callbacks import read_metrics
from consortium.reporting.tracking import numeric_fields
from tests.deploy.test_e2e import (
    EXPERIMENT,
    SITES,
    _client,
    _free_port,
    _records,
    _server_on,
    _stop,
    _write_sites,
)

pytest.importorskip("mlflow", reason="tracking needs: pip install 'consortium[tracking]'")
pytest.importorskip("tensorboard", reason="tracking needs: pip install 'consortium[tracking]'")

ROUNDS = 4  # EXPERIMENT's rounds
TRACKED = EXPERIMENT + """
[model]
name = "mlp"
hidden = [8]
freeze = ["1"]
[secure_aggregation]
enabled = true
threshold = 0.67  # the sites' floor against a malicious server
[tracking]
mlflow = true
tensorboard = true
"""


@pytest.fixture()
def deployment(tmp_path: Path) -> Path:
    """test_e2e's three sites' CSV files and certificates; the experiment of this module."""
    from consortium.deploy.provision import provision

    _write_sites(tmp_path)
    (tmp_path / "exp.toml").write_text(TRACKED)
    provision(SITES, tmp_path / "certs")
    return tmp_path


def _series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers as {metric: [(round, value)]}: what the trackers must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run / "metrics.jsonl"):
        for key, value in numeric_fields(record):
            out.setdefault(key, []).append((record["round"], value))
    return out


def test_a_deployed_run_tracks_every_round_and_keeps_its_frozen_body(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = deployment
    port = _free_port()
    server = _server_on(d, port, "run")
    clients = [_client(d, port, site) for site in SITES]
    try:
        assert server.wait(timeout=240) == 0
        for c in clients:
            assert c.wait(timeout=60) == 0, c.stderr.read() if c.stderr else ""
    finally:
        _stop(server, *clients)
    run = d / "run"
    expected = _series(run)
    # (sites keep their training loss unless their policy sends it)
    assert {"accuracy", "loss", "clients", "bytes_up", "wall_s"} <= set(expected)
    every_round = list(range(1, ROUNDS + 1))
    for key in ("accuracy", "loss", "clients", "bytes_up", "wall_s"):
        assert [r for r, _ in expected[key]] == every_round, key
    # (the final record adds the spread across clients: accuracy_mean, accuracy_jain ...)

    # MLflow: the default local file store in RUN_DIR/mlruns, one finished run (MLflow 3 reads
    # a file store only with this set; the server's tracker set it for itself)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("deploy-e2e")  # the experiment's name
    assert experiment is not None
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_id == json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    assert mlrun.info.status == "FINISHED"
    assert set(mlrun.data.metrics) == set(expected)
    for key, series in expected.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert logged == series, key
    assert mlrun.data.params["rounds"] == str(ROUNDS)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.toml", "model.safetensors", "summary.json"} <= artifacts

    # TensorBoard: RUN_DIR/tensorboard, every round's numbers as scalars
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == set(expected)
    for key, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in series], key
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-6)
    assert tags["histograms"]  # the final model, one histogram per tensor

    # the frozen body (the mlp's first Linear) is the initial one, bit for bit
    final = load_file(str(run / "model.safetensors"))
    assert all(r["secagg_clients"] == len(SITES) for r in _records(run))
    cfg = load_config(d / "exp.toml", [])
    torch.manual_seed(derive_init_seed(cfg))
    initial = mlp((final["1.weight"].shape[1],), 2, hidden=cfg.model.hidden).state_dict()
    for name in ("1.weight", "1.bias"):
        assert torch.equal(final[name], initial[name]), f"the frozen {name} moved"
    assert not torch.equal(final["3.weight"], initial["3.weight"]), "the head did not train"

"""MLflow and TensorBoard trackers, read back from a real local file store and event files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from consortium import simulate
from consortium.errors import ConfigError, MissingExtraError
from consortium.reporting.callbacks import read_metrics
from consortium.reporting.tracking import numeric_fields
from tests.conftest import make_toy

CFG = {
    "name": "tracking-test",
    "rounds": 3,
    "seed": 1,
    "algorithm": {"lr": 0.1, "batch_size": 16},
    "sampling": {"clients_per_round": 3},
    "evaluation": {"clients": 2},
}


def _jsonl_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {metric: [(round, value)]}, the numbers only."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in numeric_fields(record):
            series.setdefault(key, []).append((record["round"], value))
    return series


class StopAfter:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_round_end(self, record, state) -> None:
        if record["round"] == self.rounds:
            raise KeyboardInterrupt


def _mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def _mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def test_mlflow_file_store_holds_every_metric_the_config_and_the_model(tmp_path) -> None:
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    cfg = {**CFG, "tracking": {"mlflow": True, "experiment": "exp-a"}}
    simulate(cfg, dataset=make_toy(), out=run_dir, report=False)

    client = _mlflow_client(run_dir)
    experiment = client.get_experiment_by_name("exp-a")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    expected = _jsonl_series(run_dir)
    assert {"accuracy", "loss", "train_loss", "accuracy_se", "evaluated_clients"} <= set(expected)
    assert set(run.data.metrics) == set(expected)  # nothing more, nothing less
    assert _mlflow_series(client, run.info.run_id, expected) == expected
    assert run.data.params["rounds"] == "3"
    assert run.data.params["evaluation.clients"] == "2.0"
    assert run.data.params["algorithm.lr"] == "0.1"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "model.safetensors", "summary.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path)))
    assert local.read_bytes() == (run_dir / "model.safetensors").read_bytes()
    config = Path(client.download_artifacts(run.info.run_id, "config.toml", str(tmp_path)))
    assert config.read_text() == (run_dir / "config.toml").read_text()


def test_tensorboard_event_files_hold_every_metric_the_config_and_the_model(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cfg = {**CFG, "tracking": {"tensorboard": True}}
    result = simulate(cfg, dataset=make_toy(), out=run_dir, report=False)

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    expected = _jsonl_series(run_dir)
    assert set(tags["scalars"]) == set(expected)
    for key, series in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in series], key
        # TensorBoard keeps scalars as float32
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-6)
    # text summaries are string tensors; the config is the run's config.toml, indented
    (text,) = events.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert [line[4:] for line in shown.splitlines()] == (
        (run_dir / "config.toml").read_text().splitlines()
    )
    assert {f"model/{name}" for name in result.params.tensors()} == set(tags["histograms"])


def test_a_resumed_run_continues_the_same_mlflow_run_and_tensorboard_log(tmp_path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    toy = make_toy()
    run_dir = tmp_path / "cut"
    cfg = {**CFG, "tracking": {"mlflow": True, "tensorboard": True}}
    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, dataset=toy, out=run_dir, callbacks=[StopAfter(2)], report=False)
    simulate(resume=run_dir, dataset=toy, report=False)

    client = _mlflow_client(run_dir)
    (run,) = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id])
    expected = _jsonl_series(run_dir)
    assert [s for s, _ in expected["accuracy"]] == [1, 2, 3]
    assert _mlflow_series(client, run.info.run_id, expected) == expected
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("accuracy")] == [1, 2, 3]


def test_numeric_fields_are_what_metrics_jsonl_holds_as_numbers() -> None:
    record = {
        "round": 4, "clients": 3, "accuracy": 0.5, "epsilon": None, "auc": float("nan"),
        "failed": {"c1": "boom"}, "aborted": "why", "flag": True,
    }
    assert dict(numeric_fields(record)) == {"clients": 3.0, "accuracy": 0.5}


def test_without_a_run_directory_the_trackers_say_where_to_write() -> None:
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        simulate({**CFG, "tracking": {"mlflow": True}}, dataset=make_toy(), report=False)
    with pytest.raises(ConfigError, match="tracking.tensorboard_dir"):
        simulate({**CFG, "tracking": {"tensorboard": True}}, dataset=make_toy(), report=False)


@pytest.mark.parametrize(
    ("key", "module"), [("mlflow", "mlflow.tracking"), ("tensorboard", "torch.utils.tensorboard")]
)
def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch, key, module) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"pip install 'consortium\[tracking\]'"):
        simulate({**CFG, "tracking": {key: True}}, dataset=make_toy(), out=tmp_path / "r",
                 report=False)


def test_the_tracking_section_is_reachable_by_set_and_checked() -> None:
    from consortium.config import load_config

    cfg = load_config(None, ["tracking.mlflow=true", "tracking.experiment=heart"])
    assert cfg.tracking.mlflow and cfg.tracking.experiment == "heart"
    assert not cfg.tracking.tensorboard
    with pytest.raises(ConfigError, match="unknown key 'tracking.mlflw'.*mlflow_uri"):
        load_config(None, ["tracking.mlflw=true"])

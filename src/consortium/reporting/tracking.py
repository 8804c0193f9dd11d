"""Experiment trackers: every round's metrics, the config and the final model in MLflow and
TensorBoard, where users already look (``[tracking]`` in the experiment file).

Both are callbacks fed the same records ``metrics.jsonl`` gets, after every ``before_record``
hook has added its fields (``epsilon`` ...). Each numeric field becomes a metric (MLflow) or a
scalar (TensorBoard) at step = the round; fields that are not numbers (``failed``, ``aborted``,
a robust rule's flags) stay in ``metrics.jsonl`` only. The libraries load only when a tracker
is built, so ``import consortium`` stays light; a missing one raises
:class:`~consortium.errors.MissingExtraError` with the install command.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from consortium.errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from consortium.config import ExperimentConfig

__all__ = ["MLflowTracker", "TensorBoardTracker", "numeric_fields", "tracking_callbacks"]

MODEL_FILE = "model.safetensors"
RUN_ID_FILE = "tracking.json"
"""Where a run directory keeps its MLflow run id, so that ``--resume`` continues the same run."""


def tracking_callbacks(cfg: ExperimentConfig, run_dir: Path | None) -> list[object]:
    """The trackers ``[tracking]`` asks for (none by default): the one place they are built.

    Raises:
        ConfigError: a tracker has nowhere to write (no run directory and no URI or folder).
        MissingExtraError: its library is not installed.
    """
    t = cfg.tracking
    out: list[object] = []
    if t.mlflow:
        out.append(MLflowTracker(
            cfg, uri=t.mlflow_uri or _default_store(run_dir), run_dir=run_dir,
            experiment=t.experiment or cfg.name,
            run_name=t.run_name or (run_dir.name if run_dir is not None else cfg.name),
        ))
    if t.tensorboard:
        if not t.tensorboard_dir and run_dir is None:
            raise ConfigError(
                "tracking.tensorboard = true needs somewhere to write its event files: give a "
                "run directory (--out / simulate(out=...)) or set tracking.tensorboard_dir"
            )
        log_dir = Path(t.tensorboard_dir) if t.tensorboard_dir else run_dir / "tensorboard"  # type: ignore[operator]
        out.append(TensorBoardTracker(cfg, log_dir=log_dir, run_dir=run_dir))
    return out


def numeric_fields(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The record's finite numbers other than ``round`` (which is the step): what
    ``metrics.jsonl`` holds as numbers (it writes NaN and infinities as null)."""
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            yield key, float(value)


def _default_store(run_dir: Path | None) -> str:
    if run_dir is None:
        raise ConfigError(
            "tracking.mlflow = true needs somewhere to keep its runs: give a run directory "
            "(--out / simulate(out=...)) for a local store in RUN_DIR/mlruns, or set "
            "tracking.mlflow_uri"
        )
    return (run_dir / "mlruns").resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def _flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: ``section.key`` → the value as text."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class MLflowTracker:
    """Logs a run to MLflow: the config as params (``section.key``) and as ``config.toml``,
    every round's numeric fields as metrics at step = round, and at the end the final model
    (``model.safetensors``) and ``summary.json`` as artifacts.

    Uses an explicit ``MlflowClient`` (no global active run), so a user's own
    ``mlflow.start_run()`` around ``simulate`` is left alone. The default store is a local
    file store (``RUN_DIR/mlruns``): no server, no network. MLflow 3 keeps file stores in
    maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; this tracker sets it (unless the
    user did) for file URIs only. A resumed run continues the same MLflow run (its id is
    kept in ``RUN_DIR/tracking.json``); rounds repeated after the last checkpoint are logged
    again at the same step.

    Raises:
        MissingExtraError: MLflow is not installed.
    """

    def __init__(
        self, cfg: ExperimentConfig, *, uri: str, run_dir: Path | None, experiment: str,
        run_name: str,
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise MissingExtraError("tracking.mlflow", "tracking", "mlflow") from error
        if _is_file_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.cfg = cfg
        self.run_dir = run_dir
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = ""
        self._params: Any = None

    def on_run_start(self, start_round: int, rounds: int) -> None:
        self.run_id = self._resumed_run_id() if start_round > 0 else ""
        if self.run_id:
            return
        existing = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            existing.experiment_id if existing is not None
            else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_ID_FILE).write_text(
                json.dumps({"mlflow_run_id": self.run_id}), encoding="utf-8"
            )
        self._log_config()

    def _resumed_run_id(self) -> str:
        path = self.run_dir / RUN_ID_FILE if self.run_dir is not None else None
        if path is None or not path.exists():
            return ""
        return str(json.loads(path.read_text(encoding="utf-8")).get("mlflow_run_id", ""))

    def _log_config(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flat_params(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, self.cfg.to_toml(), "config.toml")

    def on_round_end(self, record: Mapping[str, Any], state: Any) -> None:
        from mlflow.entities import Metric

        step = int(record["round"])
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_fields(record)]
        self.client.log_batch(self.run_id, metrics=metrics)
        self._params = getattr(state, "params", None)

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        written = self.run_dir / MODEL_FILE if self.run_dir is not None else None
        if written is not None and written.exists():
            self.client.log_artifact(self.run_id, str(written))
            if (self.run_dir / "summary.json").exists():  # type: ignore[operator]
                self.client.log_artifact(self.run_id, str(self.run_dir / "summary.json"))  # type: ignore[operator]
        elif self._params is not None:  # no run directory: write the model file for MLflow
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / MODEL_FILE
                save_file({k: v.contiguous() for k, v in self._params.tensors().items()}, str(path))
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")


class TensorBoardTracker:
    """Writes TensorBoard event files (``torch.utils.tensorboard``): every round's numeric
    fields as scalars at step = round, the config as text, and the final model as one
    histogram per tensor (``model/<name>``) plus the path of ``model.safetensors``.

    A resumed run purges the events from the rounds after its checkpoint (TensorBoard's
    ``purge_step``), so each round appears once.

    Raises:
        MissingExtraError: TensorBoard is not installed.
    """

    def __init__(self, cfg: ExperimentConfig, *, log_dir: Path, run_dir: Path | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingExtraError("tracking.tensorboard", "tracking", "tensorboard") from error
        self._writer_class = SummaryWriter
        self.cfg = cfg
        self.log_dir = log_dir
        self.run_dir = run_dir
        self.writer: Any = None
        self._params: Any = None
        self._round = 0

    def on_run_start(self, start_round: int, rounds: int) -> None:
        self.writer = self._writer_class(
            log_dir=str(self.log_dir), purge_step=start_round + 1 if start_round else None
        )
        self._round = start_round
        if start_round == 0:
            # four spaces: TensorBoard renders text as Markdown, this keeps the TOML verbatim
            toml = "\n".join("    " + line for line in self.cfg.to_toml().splitlines())
            self.writer.add_text("config", toml, global_step=0)

    def on_round_end(self, record: Mapping[str, Any], state: Any) -> None:
        if self.writer is None:
            return
        self._round = int(record["round"])
        for key, value in numeric_fields(record):
            self.writer.add_scalar(key, value, global_step=self._round)
        self.writer.flush()  # a user watching TensorBoard sees each round as it ends
        self._params = getattr(state, "params", None)

    def on_run_end(self, summary: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        if self._params is not None:
            for name, tensor in self._params.tensors().items():
                self.writer.add_histogram(f"model/{name}", tensor.detach().float(), self._round)
        if self.run_dir is not None and (self.run_dir / MODEL_FILE).exists():
            self.writer.add_text("model", str((self.run_dir / MODEL_FILE).resolve()), self._round)
        self.writer.close()
        self.writer = None

"""Tests of the HTML report and its plots, on small hand-written run directories."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consortium.errors import MissingExtraError
from consortium.reporting.plots import write_plots
from consortium.reporting.report import format_value, results_table_rows, write_report

SRC = Path(__file__).resolve().parents[2] / "src"

CONFIG = """\
name = "tiny"
seed = 0
rounds = 3

[data]
dataset = "synthetic"
clients = 2
"""

HISTORY: list[dict[str, Any]] = [
    {
        "round": 1,
        "clients": 2,
        "train_loss": 0.69,
        "accuracy": 0.61,
        "loss": 0.66,
        "auc": 0.64,
        "balanced_accuracy": 0.6,
        "accuracy_min": 0.5,
        "accuracy_p10": 0.52,
        "central_accuracy": 0.63,
        "bytes_up": 1200,
        "bytes_down": 1200,
        "epsilon": None,
        "wall_s": 0.01,
    },
    # a round without evaluation: no metric keys at all
    {
        "round": 2,
        "clients": 2,
        "train_loss": 0.6,
        "bytes_up": 1200,
        "bytes_down": 1200,
        "epsilon": None,
        "wall_s": 0.01,
    },
    {
        "round": 3,
        "clients": 2,
        "train_loss": 0.5,
        "accuracy": 0.8123456,
        "loss": 0.48,
        "auc": None,
        "balanced_accuracy": 0.79,
        "accuracy_min": 0.7,
        "accuracy_p10": 0.72,
        "central_accuracy": 0.8,
        "bytes_up": 1200,
        "bytes_down": 1200,
        "epsilon": None,
        "wall_s": 0.01,
        "some_future_key": "ok",
    },
]

SUMMARY: dict[str, Any] = {
    "name": "tiny-run",
    "rounds": 3,
    "final": {"accuracy": 0.8123456, "loss": 0.48, "balanced_accuracy": 0.79},
    "privacy": {"epsilon": None, "delta": None, "accountant": None},
    "baselines": {
        "local": {"accuracy": 0.7512, "loss": 0.55},
        "pooled": {"accuracy": 0.8634, "loss": 0.41},
    },
    "duration_s": 1.25,
    "per_client": {"hospital-a": {"accuracy": 0.9}, "hospital-b": {"accuracy": 0.7}},
}


def make_run_dir(
    path: Path,
    *,
    history: list[dict[str, Any]] | None = HISTORY,
    summary: dict[str, Any] | None = SUMMARY,
    config: str | None = CONFIG,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.toml").write_text(config, encoding="utf-8")
    if history is not None:
        lines = "".join(json.dumps(row) + "\n" for row in history)
        (path / "metrics.jsonl").write_text(lines, encoding="utf-8")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return path


def image_sources(page: str) -> list[str]:
    """The files behind the page's figures (inlined, each keeps its name in data-source)."""
    return re.findall(r'<img data-source="([^"]+)"', page)


def table_row(page: str, first_cell: str) -> list[str]:
    match = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", page)
    assert match is not None, f"no table row starting with {first_cell!r}"
    return re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))


def test_report_shows_name_results_and_baselines(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")

    path = write_report(run_dir)

    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<h1>tiny-run</h1>" in page
    assert table_row(page, "accuracy") == ["0.8123", "0.7512", "0.8634"]
    assert table_row(page, "balanced_accuracy") == ["0.7900", "—", "—"]
    assert table_row(page, "hospital-a") == ["0.9000"]
    assert "no differential privacy" in page
    assert "<details>" in page and "some_future_key" in page
    assert "<pre>name = &quot;tiny&quot;" in page


def test_report_accepts_a_string_path(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    assert write_report(str(run_dir)) == run_dir / "report.html"


def test_report_references_plots_that_exist(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")

    page = write_report(run_dir).read_text(encoding="utf-8")

    sources = image_sources(page)
    assert sources == [
        "plots/accuracy.png",
        "plots/balanced_accuracy.png",
        "plots/auc.png",
        "plots/loss.png",
        "plots/train_loss.png",
    ]
    for source in sources:
        assert (run_dir / source).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # epsilon is null in every round: no privacy plot
    assert not (run_dir / "plots" / "epsilon.png").exists()


def test_epsilon_plot_when_privacy_is_accounted(tmp_path: Path) -> None:
    history = [{**row, "epsilon": 0.5 * row["round"]} for row in HISTORY]
    summary = {**SUMMARY, "privacy": {"epsilon": 1.5, "delta": 1e-5, "accountant": "rdp"}}
    run_dir = make_run_dir(tmp_path / "run", history=history, summary=summary)

    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "plots/epsilon.png" in image_sources(page)
    assert (run_dir / "plots" / "epsilon.png").is_file()
    assert "(ε = 1.5000, δ = 1e-05)-differential privacy, accounted with rdp." in page


def test_learning_curve_has_band_central_and_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib import pyplot
    from matplotlib.figure import Figure

    legends: dict[str, list[str]] = {}
    save = Figure.savefig

    def recording_savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        legends[Path(fname).stem] = self.axes[0].get_legend_handles_labels()[1]
        save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)

    write_plots(tmp_path, HISTORY, SUMMARY)

    assert legends["accuracy"] == [
        "federated",
        "10th-percentile client to mean",
        "central evaluation",
        "local only",
        "pooled",
    ]
    # lower is better for loss, so no band; no central loss was logged
    assert legends["loss"] == ["federated", "local only", "pooled"]
    assert legends["auc"] == ["federated"]
    assert pyplot.get_fignums() == []


def test_band_falls_back_to_worst_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    labels: list[str] = []
    save = Figure.savefig

    def recording_savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        labels.extend(self.axes[0].get_legend_handles_labels()[1])
        save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    history = [{"round": 1, "accuracy": 0.6, "accuracy_min": 0.4}]

    assert write_plots(tmp_path, history, {}) == [tmp_path / "plots" / "accuracy.png"]
    assert labels == ["federated", "worst client to mean"]


def test_names_and_values_from_files_are_escaped(tmp_path: Path) -> None:
    attack = "<script>alert(1)</script>"
    summary = {
        **SUMMARY,
        "name": attack,
        "final": {attack: 1.0, "accuracy": 0.5},
        "per_client": {attack: {"accuracy": 0.5}},
    }
    history = [{**HISTORY[0], attack: attack}]
    config = f'name = "{attack}"\n# </pre>{attack}\n'
    run_dir = make_run_dir(tmp_path / "run", history=history, summary=summary, config=config)

    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "<script>" not in page
    assert "</pre><script>" not in page
    assert "<h1>&lt;script&gt;alert(1)&lt;/script&gt;</h1>" in page
    assert page.count("&lt;script&gt;") >= 6


@pytest.mark.parametrize("metrics", [None, "", "\n\n"], ids=["missing", "empty", "blank"])
def test_report_without_rounds(tmp_path: Path, metrics: str | None) -> None:
    run_dir = make_run_dir(tmp_path / "run", history=None)
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text(metrics, encoding="utf-8")

    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "No rounds were recorded" in page
    assert image_sources(page) == []
    assert "<details>" not in page
    assert table_row(page, "accuracy") == ["0.8123", "0.7512", "0.8634"]


def test_report_of_an_interrupted_run(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "my-run", summary=None, config=None)
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as log:
        log.write('{"round": 4, "accur')  # killed mid-write

    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "<h1>my-run</h1>" in page
    assert "No final results were recorded." in page
    assert "Per-round metrics (3 rounds)" in page
    assert "1 line(s) of metrics.jsonl were not JSON objects and were skipped." in page
    assert "config.toml was not found." in page
    assert "plots/accuracy.png" in image_sources(page)


def test_missing_run_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_corrupt_summary_is_reported(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", summary=None)
    (run_dir / "summary.json").write_text('{"name": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"summary\.json is not valid JSON"):
        write_report(run_dir)


def test_results_table_rows_order_and_values() -> None:
    summary = {
        "final": {"zeta": 1, "loss": 0.4, "f1": 0.5, "auc": 0.9, "accuracy": 0.8},
        "baselines": {
            "local": {"balanced_accuracy": 0.6, "accuracy": 0.7, "brier": None},
            "pooled": {"accuracy": 0.85, "loss": "n/a"},
        },
    }

    rows = results_table_rows(summary)

    assert rows == [
        ("accuracy", 0.8, 0.7, 0.85),
        ("balanced_accuracy", None, 0.6, None),
        ("auc", 0.9, None, None),
        ("loss", 0.4, None, None),
        ("brier", None, None, None),
        ("f1", 0.5, None, None),
        ("zeta", 1.0, None, None),
    ]
    assert isinstance(rows[-1][1], float)


@pytest.mark.parametrize("baselines", [None, {}, {"local": None}], ids=["absent", "empty", "null"])
def test_results_table_rows_without_baselines(baselines: dict[str, Any] | None) -> None:
    summary: dict[str, Any] = {"final": {"loss": 0.3, "accuracy": 0.9}}
    if baselines is not None:
        summary["baselines"] = baselines
    assert results_table_rows(summary) == [("accuracy", 0.9, None, None), ("loss", 0.3, None, None)]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "—"),
        (0.8123456, "0.8123"),
        (0.0, "0.0000"),
        (1e-5, "1e-05"),
        (2_500_000.0, "2.5e+06"),
        (1_234_567, "1,234,567"),
        (float("nan"), "nan"),
        (True, "true"),
        ("ok", "ok"),
        ([1, 2], "[1, 2]"),
    ],
)
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_missing_matplotlib_raises_missing_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    run_dir = make_run_dir(tmp_path / "run")

    with pytest.raises(MissingExtraError, match=r"pip install 'consortium\[plots\]'"):
        write_report(run_dir)
    # the tables alone need no matplotlib
    page = write_report(run_dir, plots=False).read_text(encoding="utf-8")
    assert image_sources(page) == []
    assert "<h1>tiny-run</h1>" in page


def test_nothing_to_plot_needs_no_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_plots(tmp_path, [{"round": 1, "clients": 2}], {}) == []
    assert not (tmp_path / "plots").exists()


def test_importing_the_report_does_not_load_matplotlib() -> None:
    code = "import sys\nimport consortium.reporting.report\nprint('matplotlib' in sys.modules)\n"
    # PYTHONPATH=src and only the report module, so that no other in-progress module of the
    # package is imported on the way.
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_report_shows_group_rates_gaps_and_the_equalised_odds_thresholds(tmp_path: Path) -> None:
    from consortium import simulate
    from consortium.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict({
        "rounds": 2, "evaluation": {"groups": ["sex"]},
        "fairness": {"method": "thresholds", "column": "sex"},
    })
    result = simulate(cfg, out=tmp_path / "run")
    post = result.summary["groups"]["sex"]["postprocessed"]
    page = write_report(tmp_path / "run", plots=False).read_text()
    assert "<h2>Groups</h2>" in page and "Equalised-odds thresholds" in page
    for label, threshold in post["thresholds"].items():  # one row per group, its threshold
        row = table_row(page.split("Equalised-odds thresholds", 1)[1], label)
        assert row[0] == format_value(threshold)
    cost = table_row(page.split("Equalised-odds thresholds", 1)[1], "accuracy")
    assert cost == [format_value(post["plain"]["accuracy"]), format_value(post["accuracy"]),
                        format_value(post["accuracy_cost"])]

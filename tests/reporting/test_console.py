"""The console: a phase for every stage, plain lines without a TTY, aborted rounds shown."""

from __future__ import annotations

import io
import re

from consortium.reporting.callbacks import Console, ProgressBar
from consortium.simulation import simulate
from tests.conftest import make_toy


def _plain() -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    return Console(stream=stream, tty=False, every_s=0.0), stream


def test_plain_phase_lines_start_progress_and_end() -> None:
    console, stream = _plain()
    with console.phase("baselines: local", total=3, unit="clients") as advance:
        advance(1, 3)
        advance(2, 3)
        advance(3, 3)  # the last is the "done" line's
    lines = stream.getvalue().splitlines()
    assert lines[0] == "consortium: baselines: local: 3 clients …"
    assert lines[1].startswith("consortium: baselines: local: 1/3 clients (")
    assert lines[2].startswith("consortium: baselines: local: 2/3 clients (")
    assert re.fullmatch(r"consortium: baselines: local: done in \d+\.\d s", lines[3])
    assert len(lines) == 4


def test_plain_progress_lines_are_rate_limited() -> None:
    stream = io.StringIO()
    console = Console(stream=stream, tty=False, every_s=3600.0)
    with console.phase("baselines: pooled", total=1000, unit="steps") as advance:
        for i in range(1, 1001):
            advance(i, 1000)
    assert len(stream.getvalue().splitlines()) == 2  # start and end only


def test_a_failed_phase_says_stopped() -> None:
    console, stream = _plain()
    try:
        with console.phase("writing the report"):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert "writing the report: stopped in" in stream.getvalue()


def test_rounds_one_line_each_and_aborted_rounds_with_their_reason() -> None:
    console, stream = _plain()
    bar = ProgressBar("demo", console=console)
    bar.on_run_start(0, 3)
    bar.on_round_end({"round": 1, "clients": 4, "accuracy": 0.8125, "loss": 0.5, "wall_s": 0.25}, None)
    bar.on_round_end({"round": 2, "clients": 0, "wall_s": 0.5,
                      "aborted": "secure aggregation: 2 of 4 clients dropped, below the threshold 3"},
                     None)
    bar.on_round_end({"round": 3, "clients": 4, "accuracy": 0.85, "loss": 0.4, "wall_s": 0.25}, None)
    bar.on_run_end({})
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0] == "consortium: demo: rounds: 3 rounds …"
    assert re.match(r"consortium: round 1/3  accuracy 0\.812  loss 0\.500  clients 4  0\.2 s  "
                    r"\(elapsed \d+ s\)", lines[1])
    assert ("consortium: round 2 aborted, the model is kept: secure aggregation: 2 of 4 clients "
            "dropped, below the threshold 3") in lines
    assert any(line.startswith("consortium: round 2/3  aborted") for line in lines)
    assert lines[-1].startswith("consortium: demo: rounds: done in")
    assert text.count("done in") == 1  # on_run_end after the last round does not end it twice


def test_the_terminal_display_shows_phases_and_an_eta() -> None:
    stream = io.StringIO()
    console = Console(stream=stream, tty=True)
    bar = ProgressBar("demo", console=console)
    bar.on_run_start(0, 2)
    bar.on_round_end({"round": 1, "accuracy": 0.5, "loss": 1.0}, None)
    bar.on_round_end({"round": 2, "accuracy": 0.6, "loss": 0.9}, None)
    with console.phase("baselines: local", total=5, unit="clients") as advance:
        advance(5, 5)
    console.note("round 7 aborted, the model is kept: min_results not reached")
    console.close()
    text = stream.getvalue()
    assert "demo: rounds" in text and "2/2" in text and "baselines: local" in text
    assert "5/5" in text and "ETA" in text
    assert "round 7 aborted" in text


def test_a_run_without_a_tty_logs_every_stage(tmp_path, capsys) -> None:
    simulate(
        {"name": "toy", "rounds": 3, "model": {"name": "logistic"},
         "algorithm": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
         "sampling": {"clients_per_round": 3},
         "evaluation": {"baselines": ["local", "pooled"]}},
        dataset=make_toy(3), out=tmp_path / "run", progress=True,
    )
    err = capsys.readouterr().err
    stages = ["loading data", "toy: rounds", "baselines: local",
              "baselines: pooled", "final evaluation", "writing the report"]
    for stage in stages:
        assert f"consortium: {stage}" in err, stage
        assert re.search(re.escape(stage) + r"[^\n]*: done in \d", err), stage
    positions = [err.index(f"consortium: {stage}") for stage in stages]
    assert positions == sorted(positions)  # in the order they run
    assert len(re.findall(r"consortium: round \d/3 ", err)) == 3


def test_secagg_rounds_aborted_by_dropouts_reach_the_console(tmp_path, capsys) -> None:
    result = simulate(
        {"name": "toy", "rounds": 6, "seed": 1, "model": {"name": "logistic"},
         "algorithm": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
         "sampling": {"clients_per_round": 4},
         "secure_aggregation": {"enabled": True, "threshold": 0.75},
         "simulation": {"dropout": 0.3}},
        dataset=make_toy(4), progress=True,
    )
    err = capsys.readouterr().err
    aborted = [r for r in result.history if r.get("aborted")]
    assert aborted, "the seed no longer aborts a round; pick another"
    for record in aborted:
        assert f"round {record['round']} aborted, the model is kept: {record['aborted']}" in err
    assert err.count("aborted, the model is kept") == len(aborted)

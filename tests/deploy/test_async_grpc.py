"""Issue 18 over gRPC: FedBuff and FedAsync with sites that come and go.

A real ``serve()`` on 127.0.0.1 (mutual TLS, CSV sites as ``SiteRunner`` threads: the harness
of ``test_roster_grpc.py``) in ``server.mode = "fedbuff"``:

- the issue's scenario: four sites start, a fifth joins when version 4 is done and
  contributes from version 5 on, one site leaves after version 7 and rejoins before version
  12; every step uses ``K`` updates; ``audit verify`` passes; the log holds the admission,
  departure and return;
- a hostile late site (a raw gRPC client) answers its tasks with a delta of the wrong size,
  a result that claims another round (its version), and one of an absurd norm: each is
  rejected and audited, none is aggregated; a result it holds past ``max_staleness``
  versions is dropped as stale — τ from the server's record of when it sent the task;
- the server dies after version 4 and ``--resume`` continues from the checkpoint: the tasks
  the dead server had in flight are abandoned (never aggregated), the sites get new ones.

The synchronous version of the scenario is ``test_roster_grpc.py``'s. Unit tests check what
is refused over gRPC and that staleness comes from the server's record.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.config import load_config
from consortium.errors import ConfigError
from consortium.server.asynchronous import check_asynchronous
from tests.deploy.test_roster_grpc import (
    BAD_SIZE,
    LATE,
    LEAVER,
    STARTERS,
    _Crash,
    _deploy,
    _free_port,
    _records,
    _wait,
)

K = 3
STEPS = 15
HOSTILE_STEPS = 40  # room for the held result to arrive stale before the run ends
ASYNC = ("algorithm.name=\"fedavg\"", "server.mode=\"fedbuff\"", f"server.buffer_size={K}")


def _audit(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ unit


def test_what_does_not_compose_over_grpc_is_refused_with_the_reason() -> None:
    def cfg(*extra: str) -> Any:
        return load_config(None, ["algorithm.name=\"fedavg\"", *extra])

    with pytest.raises(ConfigError, match="its own SecAgg\\+ cohort"):
        check_asynchronous(cfg("server.mode=\"fedbuff\"", "secure_aggregation.enabled=true",
                               "server.staleness=\"constant\""),
                           algorithm="fedavg", remote=True)
    with pytest.raises(ConfigError, match="no sum of several clients"):
        check_asynchronous(cfg("server.mode=\"fedasync\"", "secure_aggregation.enabled=true"),
                           algorithm="fedavg", remote=True)
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        check_asynchronous(cfg("server.mode=\"fedbuff\""), algorithm="scaffold", remote=True)
    # central DP composes (each buffer one release) and plain FedBuff / FedAsync run
    check_asynchronous(cfg("server.mode=\"fedbuff\"", "privacy.mode=\"central\"",
                           "privacy.noise_multiplier=1.0"), algorithm="fedavg", remote=True)
    check_asynchronous(cfg("server.mode=\"fedasync\""), algorithm="fedavg", remote=True)


def test_late_sites_are_admitted_under_central_dp_in_async_mode() -> None:
    from consortium.deploy.roster import late_sites_allowed

    fixed = ["privacy.mode=\"central\"", "privacy.noise_multiplier=1.0", "privacy.sampling=\"fixed\""]
    assert late_sites_allowed(load_config(None, fixed)) != ""
    assert late_sites_allowed(load_config(None, [*fixed, "server.mode=\"fedbuff\""])) == ""


class _Future:
    """A task's future as the hub completes it."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def result(self) -> Any:
        return self._result

    def done(self) -> bool:
        return True

    def add_done_callback(self, fn: Any) -> None:
        fn(self)


class _Hub:
    audit = None

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fail_silent(self, _: float) -> None:
        pass

    def forget(self, _: Any) -> None:
        pass

    def log_event(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))


class _Remote:
    """A remote executor whose sites answer at once, each with the result the test chose;
    every result claims round 999 (a site lying about its version)."""

    name = "remote"
    round_timeout = 5.0
    silence_s = 0.0

    def __init__(self, deltas: dict[str, float]) -> None:
        self.hub = _Hub()
        self.deltas = deltas
        self.sent: list[tuple[str, int]] = []
        self.hold: dict[str, list[Any]] = {}

    def start(self, task: Any, clients: Any) -> tuple[str, Any]:
        from consortium.messages import Result
        from consortium.types import Update

        self.sent.append((task.client_id, task.round))
        n = task.parameters.vector.numel()
        update = Update(task.client_id, torch.full((n,), self.deltas[task.client_id]), 1.0,
                        {"train_loss": 0.5})
        return f"t{len(self.sent)}", _Future(Result(999, task.client_id, update))

    def evaluate(self, tasks: Any, clients: Any) -> Any:
        return iter(())

    def exchange(self, *args: Any, **kwargs: Any) -> Any:
        return iter(())


def test_staleness_is_counted_from_the_servers_record_and_stale_updates_are_dropped() -> None:
    """A one-site FedBuff (K = 1, max_staleness 0) with an executor whose answers claim round
    999: the server steps on its own record (τ = 0, the site's claim ignored), and an update
    whose task the server sent two versions ago is dropped as stale."""
    from consortium.deploy.asynchronous import DeployedAsyncServer, _Flight
    from consortium.federation import assemble

    cfg = load_config(None, ["data.dataset=\"synthetic\"", "rounds=3", "evaluation.baselines=[]",
                             "algorithm.name=\"fedavg\"", "server.mode=\"fedbuff\"",
                             "server.buffer_size=1", "server.max_staleness=1",
                             "server.staleness=\"polynomial\"", "server.concurrency=1"])
    fed = assemble(cfg)
    remote = _Remote({c: 0.01 for c in fed.server.clients})
    parts = {k: getattr(fed.server, k) for k in (
        "clients", "algorithm", "pipeline", "sampler", "evaluator", "seed", "callbacks")}
    parts["pipeline"] = fed.pipeline
    server = DeployedAsyncServer(mode="fedbuff", concurrency=1, buffer_size=1, max_staleness=1,
                                 staleness=fed.server.staleness, executor=remote, **parts)
    state = server.init_state(fed.init)
    state, record = server.run_round(state)
    assert record["clients"] == 1 and record["staleness_mean"] == 0.0, record
    assert record["staleness_max"] == 0 and record["stale"] == 0
    # a task the server sent at version 0 arrives at version 3: τ = 3 > 1, dropped
    from consortium.messages import Result
    from consortium.types import Update

    site = next(iter(fed.server.clients))
    n = state.params.vector.numel()
    old = _Future(Result(1, site, Update(site, torch.ones(n), 1.0, {})))
    state.round = 3
    server._flights["old"] = _Flight(site, "old", 0, time.monotonic(), old)  # type: ignore[arg-type]
    server._arrivals.put("old")
    before = state.params.vector.clone()
    state, record = server.run_round(state)
    assert record["stale"] == 1 and "τ = 3 > server.max_staleness = 1" in record["failed"][site]
    assert ("stale", {"site": site, "round": 4, "task_id": "old", "staleness": 3}) in \
        remote.hub.events
    # the step used the fresh update only: a step of 0.01 per coordinate, not 1
    assert record["clients"] == 1
    assert torch.allclose(state.params.vector - before, torch.full((n,), 0.01), atol=1e-6)


def test_a_site_in_async_mode_never_rolls_its_state_back_for_a_repeated_round() -> None:
    """Two tasks of one version (round) in a row: in sync mode the second is "the server
    restarted" and rolls back; in async mode each builds on the last (an EF residual)."""
    from types import SimpleNamespace

    from tests.deploy.test_site_state import _site

    sync, asynchronous = _site(), _site()
    asynchronous.asynchronous = True
    for site in (sync, asynchronous):
        for rnd in (1, 2, 2):
            site.fit(SimpleNamespace(round=rnd))
    assert sync.client.state.get("east")["c_i"].tolist() == [2.0, 2.0]
    assert asynchronous.client.state.get("east")["c_i"].tolist() == [3.0, 3.0]


# ------------------------------------------------------------------------------ over gRPC


def _scenario(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
    if rnd == 4:  # the fifth site joins; version 5's tasks are the first it gets
        start(LATE)
        _wait(lambda: LATE in hub.joining, 30, "the late site to describe its data")
    if rnd == 7:  # the leaver dies after version 7
        out["runners"][LEAVER][-1].stop.set()
        _wait(lambda: LEAVER not in hub.online(), 30, "the leaver to go offline")
    if rnd == 11:  # and comes back, a new process with its --state, before version 12
        start(LEAVER)
        try:
            _wait(lambda: LEAVER in hub.online(), 30, "the leaver to come back")
        except AssertionError as exc:  # say why (the new runner's outcome, if it ended)
            raise AssertionError(f"{exc}; the runner: {out['sites'].get(LEAVER)!r}") from None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _deploy(tmp_path_factory.mktemp("async"), rounds=STEPS, closed=False,
                   script=_scenario, extra=ASYNC)


def test_the_async_run_completes_with_the_late_and_the_returning_site(
    scenario: dict[str, Any],
) -> None:
    served = scenario["served"]
    assert not isinstance(served, BaseException), served
    records = _records(scenario["run"])
    assert [r["round"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["clients"] == K for r in records), [r["clients"] for r in records]
    assert not any(r.get("aborted") for r in records), records
    online = [(r["sites_online"], r["sites"]) for r in records]
    assert online == [(4, 4)] * 4 + [(5, 5)] * 3 + [(4, 5)] * 4 + [(5, 5)] * 4, online
    assert all(r["staleness_max"] is not None and r["staleness_max"] >= 0 for r in records)
    assert served.summary["rounds"] == STEPS


def test_the_async_audit_log_verifies_and_holds_the_sites_coming_and_going(
    scenario: dict[str, Any],
) -> None:
    from consortium.deploy.audit import verify_run

    run = scenario["run"]
    assert verify_run(run).ok
    entries = _audit(run)
    results = [e for e in entries if e["kind"] == "result" and "update_sha256" in e]
    late = sorted({e["round"] for e in results if e["site"] == LATE})
    assert late and late[0] == 5, late  # sent work from version 5 on
    leaver = sorted({e["round"] for e in results if e["site"] == LEAVER})
    assert not [r for r in leaver if 8 <= r <= 11], leaver  # nothing while it was gone
    assert [r for r in leaver if r < 8] and min(r for r in leaver if r >= 12) == 12, leaver
    events = [(e["kind"], e.get("site"), e.get("round")) for e in entries
              if e["kind"] in ("admitted", "departed", "returned")]
    assert events == [("admitted", LATE, 5), ("departed", LEAVER, 8), ("returned", LEAVER, 12)]
    registry = json.loads((run / "checkpoint" / "extras.json").read_text())["registry"]
    assert set(registry["sites"]) == {*STARTERS, LATE} and registry["sites"][LATE]["joined"] == 5


def _hostile(d: Path, port: int, out: dict[str, Any]) -> None:
    """A late site that attacks its first three tasks, holds the fourth until it is stale,
    then refuses the rest (and answers evaluations plausibly)."""
    from consortium.deploy.codec import EvaluationEnvelope, ResultEnvelope
    from consortium.messages import EvaluationResult, Result
    from consortium.types import Update
    from tests.deploy.hostile_site import HostileSite

    answers: dict[str, Any] = out.setdefault("hostile", {})
    with HostileSite(f"127.0.0.1:{port}", BAD_SIZE, certs=d / "certs" / "sites" / BAD_SIZE) as s:
        s.register()
        answers["describe"] = s.describe([2], 2, 38, 10)
        trained = 0
        for item in s.work():
            task = getattr(item, "task", None)
            if task is None:
                continue
            rnd, n = task.round, task.parameters.vector.numel()
            if item.evaluate:
                s.push(EvaluationEnvelope(item.task_id, EvaluationResult(
                    rnd, BAD_SIZE, 10, {"accuracy": 0.5, "loss": 0.7})))
                continue
            trained += 1

            def result(delta: torch.Tensor, *, claim: int = rnd) -> ResultEnvelope:
                return ResultEnvelope(item.task_id, Result(claim, BAD_SIZE, Update(
                    BAD_SIZE, delta, 38.0, {"train_loss": 0.5})))

            if trained == 1:
                answers["wrong_size"] = (item.task_id, s.push(result(torch.zeros(n + 3))))
            elif trained == 2:  # claims a newer version than the task it answers
                answers["other_round"] = (item.task_id, s.push(result(torch.zeros(n),
                                                                      claim=rnd + 3)))
            elif trained == 3:
                answers["huge"] = (item.task_id, s.push(result(torch.full((n,), 1e6))))
            elif trained == 4:  # held while the server moves on, alive (heartbeats)
                sent_at = rnd - 1
                deadline = time.monotonic() + 60
                beat = 0.0
                while len(_records(out["run"])) < sent_at + 3 and time.monotonic() < deadline:
                    if time.monotonic() > beat:
                        s.heartbeat()
                        beat = time.monotonic() + 1.0
                    time.sleep(0.01)
                answers["stale"] = (item.task_id, rnd, s.push(result(torch.zeros(n))))
            else:
                if trained == 5:  # far more bytes than any update of this model: cut off
                    answers["oversized"] = (item.task_id, s.push(result(torch.zeros(1 << 19))))
                s.push(ResultEnvelope(item.task_id, Result(rnd, BAD_SIZE, None, error="no",
                                                           refused=True)))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("async-hostile")
    threads: list[threading.Thread] = []

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 1:
            def hostile() -> None:
                try:
                    _hostile(d, out["port"], out)
                except BaseException as exc:  # the tests report it
                    out["hostile_error"] = exc

            t = threading.Thread(target=hostile, daemon=True)
            t.start()
            threads.append(t)
            _wait(lambda: BAD_SIZE in hub.joining or BAD_SIZE in (hub.roster or {}), 30,
                  "the hostile site to join")

    out = _deploy(d, rounds=HOSTILE_STEPS, closed=False, script=script, extra=(
        "algorithm.name=\"fedavg\"", "server.mode=\"fedbuff\"", "server.buffer_size=2",
        "server.max_staleness=2",
        # the hostile site answers one item at a time: an evaluation queued behind the task
        # it holds would wait for it (evaluated at the last step only)
        "evaluation.every=100"))
    for t in threads:
        t.join(timeout=30)
    return out


def test_a_hostile_sites_bad_results_are_rejected_and_never_aggregated(
    hostile_run: dict[str, Any],
) -> None:
    served = hostile_run["served"]
    assert not isinstance(served, BaseException), served
    answers = hostile_run["hostile"]
    assert "hostile_error" not in hostile_run, hostile_run["hostile_error"]
    assert answers["describe"].accepted, answers["describe"]
    for name, pattern in (("wrong_size", "shape|layout"), ("other_round", "round"),
                          ("huge", "norm")):
        task_id, ack = answers[name]
        assert not ack.accepted, (name, ack)
        import re

        assert re.search(pattern, ack.reason), (name, ack.reason)
    task_id, ack = answers["oversized"]
    assert not ack.accepted and "undecodable" in ack.reason, ack
    entries = _audit(hostile_run["run"])
    bad = {answers[k][0] for k in ("wrong_size", "other_round", "huge", "oversized")}
    assert not [e for e in entries if e["kind"] == "result" and e.get("task_id") in bad
                and "update_sha256" in e]  # (the oversized one's task closed by a refusal)
    assert len([e for e in entries if e["kind"] == "rejected" and e.get("site") == BAD_SIZE]) >= 3
    records = _records(hostile_run["run"])
    assert [r["round"] for r in records] == list(range(1, HOSTILE_STEPS + 1))
    assert all(r["clients"] == 2 for r in records), records
    from consortium.deploy.audit import verify_run

    assert verify_run(hostile_run["run"]).ok
    model = served.params.vector
    assert bool(torch.isfinite(model).all()) and float(model.abs().max()) < 100


def test_a_result_held_past_max_staleness_is_dropped_by_the_servers_record(
    hostile_run: dict[str, Any],
) -> None:
    task_id, rnd, ack = hostile_run["hostile"]["stale"]
    assert ack.accepted, ack  # a valid result: the hub takes it, the step drops it
    entries = _audit(hostile_run["run"])
    stale = [e for e in entries if e["kind"] == "stale" and e.get("task_id") == task_id]
    assert len(stale) == 1 and stale[0]["staleness"] > 2, stale
    records = _records(hostile_run["run"])
    dropped = [r for r in records if "stale" in str((r.get("failed") or {}).get(BAD_SIZE, ""))]
    assert dropped and sum(r["stale"] for r in records) >= 1
    assert "server.max_staleness = 2" in dropped[0]["failed"][BAD_SIZE]


def test_resume_after_a_crash_in_async_mode_abandons_the_tasks_in_flight(
    tmp_path: Path,
) -> None:
    """The server dies after version 4; ``--resume`` continues from the checkpoint: the
    tasks the dead server had sent are never aggregated, and the run completes."""
    port = _free_port()

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 4 and not out.get("resumed"):
            raise _Crash("the server dies after version 4")
        if rnd == 5 and out.get("resumed"):  # each abandoned task answered late, by its site
            from consortium.deploy.codec import ResultEnvelope
            from consortium.messages import Result
            from consortium.types import Update

            for f in out["in_flight"]:
                session = hub._sites[f["site"]].session
                late = ResultEnvelope(f["task_id"], Result(f["version"] + 1, f["site"], Update(
                    f["site"], torch.zeros(hub.layout.size), 10.0, {})))
                out.setdefault("late", []).append(hub.deliver(session, late))

    extra = ("algorithm.name=\"fedavg\"", "server.mode=\"fedbuff\"", "server.buffer_size=2")
    out = _deploy(tmp_path, rounds=8, closed=False, script=script, extra=extra,
                  listen=f"127.0.0.1:{port}")
    assert isinstance(out["served"], _Crash), out["served"]
    run = out["run"]
    saved = json.loads((run / "checkpoint" / "state.json").read_text())["asynchronous"]
    abandoned = {f["task_id"] for f in saved["in_flight"]}
    assert abandoned  # every online site but the one that filled the buffer was training
    out["resumed"], out["in_flight"] = True, saved["in_flight"]
    out = _deploy(tmp_path, rounds=8, closed=False, script=script, listen=f"127.0.0.1:{port}",
                  resume=True, keep=out, min_sites=None)
    assert not isinstance(out["served"], BaseException), out["served"]
    records = _records(run)
    assert [r["round"] for r in records] == list(range(1, 9))
    assert all(r["clients"] == 2 for r in records), records
    from consortium.deploy.audit import verify_run

    assert verify_run(run).ok
    entries = _audit(run)
    second = max(i for i, e in enumerate(entries) if e["kind"] == "run")
    after = entries[second:]
    marks = [e for e in after if e["kind"] == "abandoned"]
    assert marks and set(marks[0]["tasks"]) == abandoned, marks
    assert not [e for e in after if e["kind"] == "result" and e.get("task_id") in abandoned]
    late = out["late"]
    assert len(late) == len(abandoned) and not any(ok for ok, _ in late), late
    assert all("no such task open" in why for _, why in late), late


@pytest.mark.slow
def test_a_server_killed_in_async_mode_resumes_with_real_processes(tmp_path: Path) -> None:
    """Real processes: three sites train in FedBuff (K = 2); the server is killed (SIGKILL)
    after a few steps; ``--resume`` continues from the last checkpoint, abandons the tasks
    the dead server had in flight and completes the run; the audit chain verifies."""
    from consortium.deploy.audit import verify_run
    from consortium.deploy.provision import provision
    from tests.deploy.test_e2e import (
        EXPERIMENT,
        SITES,
        _client,
        _server_on,
        _stop,
        _write_sites,
    )

    d = tmp_path
    _write_sites(d)
    steps = 150
    (d / "exp.toml").write_text(
        EXPERIMENT.replace("rounds = 4", f"rounds = {steps}")
        + "[server]\nmode = \"fedbuff\"\nbuffer_size = 2\n")
    provision(SITES, d / "certs")
    port = _free_port()
    server = _server_on(d, port, "run", "--heartbeat", "2")
    clients = [_client(d, port, site) for site in SITES]
    run = d / "run"
    deadline = time.monotonic() + 240
    try:
        while (not (run / "metrics.jsonl").exists() or len(_records(run)) < 5) \
                and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
        server.kill()  # SIGKILL, mid-run
        server.wait(timeout=30)
        stopped = len(_records(run))
        assert 5 <= stopped < steps, stopped
        saved = json.loads((run / "checkpoint" / "state.json").read_text())["asynchronous"]
        abandoned = {f["task_id"] for f in saved.get("in_flight", [])}
        server = _server_on(d, port, "run", "--resume", "--heartbeat", "2")
        assert server.wait(timeout=300) == 0
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        _stop(server, *clients)
    assert verify_run(run).ok
    records = _records(run)
    assert [r["round"] for r in records] == list(range(1, steps + 1))
    assert all(r["clients"] == 2 for r in records)
    entries = _audit(run)
    second = max(i for i, e in enumerate(entries) if e["kind"] == "run")
    after = entries[second:]
    if abandoned:
        assert any(e["kind"] == "abandoned" and set(e["tasks"]) == abandoned for e in after)
    assert not [e for e in after if e["kind"] == "result" and e.get("task_id") in abandoned]


@pytest.mark.parametrize("extra, clients", [
    (("server.mode=\"fedasync\"", "server.mixing=0.5"), 1),
    (("server.mode=\"fedbuff\"", "server.buffer_size=2", "privacy.mode=\"central\"",
      "privacy.noise_multiplier=0.5", "privacy.clip=1.0", "privacy.sampling=\"fixed\""), 2),
], ids=["fedasync", "fedbuff-central-dp"])
def test_fedasync_and_fedbuff_under_central_dp_run_over_grpc(
    tmp_path: Path, extra: tuple[str, ...], clients: int,
) -> None:
    """FedAsync mixes each update in from the version it started at; under central DP each
    buffer is one release (privacy.json: one per step, composed without amplification), and
    a late site is admitted although the sampling is fixed-size."""

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 2:
            start(LATE)
            _wait(lambda: LATE in hub.joining, 30, "the late site")

    out = _deploy(tmp_path, rounds=6, closed=False, script=script,
                  extra=("algorithm.name=\"fedavg\"", *extra))
    assert not isinstance(out["served"], BaseException), out["served"]
    records = _records(out["run"])
    assert [r["round"] for r in records] == list(range(1, 7))
    assert all(r["clients"] == clients for r in records), records
    assert [r["sites"] for r in records] == [4, 4, 5, 5, 5, 5]
    assert bool(torch.isfinite(out["served"].params.vector).all())
    if "privacy.mode=\"central\"" in extra:
        ledger = json.loads((out["run"] / "privacy.json").read_text())
        assert len(ledger["releases"]) == 6
        assert ledger["releases"][-1]["epsilon"] > 0

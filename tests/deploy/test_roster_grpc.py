"""Issue 18 over gRPC: sites that join a run in progress, leave and come back.

Unit tests check the pieces: a late site's refusal reasons (closed roster, central DP with a
population-dependent sampling rate, a shape or classes that do not fit the model), the hub
putting a late site in ``joining`` and the roster admitting it with its declared sizes (into
the checkpoint's registry, which a resumed hub reads back), the online rule (a site neither
pulling nor heard from for ``offline_after_s`` is offline, and its task is answered at once),
the sampler drawing from the online sites only, the client pool growing and the local-DP
ledger admitting a site with zero steps.

The acceptance run uses a real ``serve()`` on 127.0.0.1 with mutual TLS and CSV sites as
``SiteRunner`` threads (the harness of ``test_personal_grpc.py``), SCAFFOLD with a logistic
model, 15 rounds: four sites start, a fifth is provisioned (``add_site``) and joins when
round 4 ends and contributes from round 5 on; one site leaves before round 8 (its runner dies) and rejoins, a new runner with
the same ``--state``, before round 12; hostile late sites (implausible sizes, a shape that
does not fit, a file with other columns) are refused with their reasons and the run goes on;
``audit verify`` passes and the log holds the admission, the departure and the return. A
second, short run with ``closed_roster`` refuses the late site.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.config import load_config
from consortium.deploy.hub import Hub, SiteInfo
from consortium.deploy.roster import Membership, OnlineSampler, late_refusal, late_sites_allowed
from consortium.server.sampling import UniformSampler
from tests.deploy.inprocess import serve_into

STARTERS = ("alpha", "bravo", "charlie", "delta")
LATE = "echo"
LEAVER = "delta"
BAD_SIZE, BAD_SHAPE, BAD_COLUMNS = "foxtrot", "golf", "hotel"
ROUNDS = 15
INFO = SiteInfo((2,), 2, 30, 10)


# ------------------------------------------------------------------------------ unit: the pieces


def test_late_refusal_reasons() -> None:
    roster = {"alpha": INFO}
    assert late_refusal("echo", INFO, roster, open_roster=True) is None
    closed = late_refusal("echo", INFO, roster, open_roster=False)
    assert closed is not None and "--closed-roster" in closed and "'echo'" in closed
    shape = late_refusal("echo", SiteInfo((3,), 2, 30, 10), roster, open_roster=True)
    assert shape is not None and "shape [3]" in shape and "shape [2]" in shape
    classes = late_refusal("echo", SiteInfo((2,), 3, 30, 10), roster, open_roster=True)
    assert classes is not None and "3 classes" in classes
    why = late_refusal("echo", INFO, roster, open_roster=True, why_closed="because")
    assert why is not None and why.endswith("because")


def test_central_dp_admits_late_sites_only_with_a_fixed_poisson_rate() -> None:
    assert late_sites_allowed(load_config(None, [])) == ""
    uniform = load_config(None, ["privacy.mode=\"central\"", "privacy.noise_multiplier=1.0", "privacy.sampling=\"fixed\""])
    assert "privacy.sampling = \"poisson\"" in late_sites_allowed(uniform)
    poisson = load_config(None, ["privacy.mode=\"central\"", "privacy.noise_multiplier=1.0", "privacy.sampling=\"poisson\"",
                                 "sampling.clients_per_round=0", "sampling.fraction=0.5"])
    assert late_sites_allowed(poisson) == ""


@pytest.fixture()
def hub(tmp_path: Path) -> Any:
    from consortium.deploy.audit import AuditLog

    loop = asyncio.new_event_loop()
    audit = AuditLog(tmp_path / "audit.jsonl")
    h = Hub(loop, config_toml="", run_id="t", max_result_bytes=1 << 20, audit=audit)
    yield h
    audit.close()
    loop.close()


def _joined(hub: Hub, name: str, info: SiteInfo = INFO) -> str | None:
    return hub.describe(hub.register(name), info)


def _entries(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_a_late_site_waits_in_joining_and_is_admitted_into_the_registry(
    hub: Hub, tmp_path: Path
) -> None:
    assert _joined(hub, "alpha") is None
    hub.fix_roster({"alpha": INFO})
    assert _joined(hub, "echo", SiteInfo((2,), 2, 50, 12)) is None
    assert "echo" not in (hub.roster or {}) and set(hub.joining) == {"echo"}
    refused = _joined(hub, "golf", SiteInfo((5,), 2, 50, 12))
    assert refused is not None and "does not fit" in refused
    assert "golf" not in hub.joining
    joining = hub.take_joining()
    assert joining == {"echo": SiteInfo((2,), 2, 50, 12)} and hub.joining == {}
    hub.admit("echo", joining["echo"], 5)
    saved = hub.registry()
    assert saved["sites"]["echo"]["num_train"] == 50 and saved["sites"]["echo"]["joined"] == 5
    assert "joined" not in saved["sites"]["alpha"]
    kinds = [(e["kind"], e.get("site")) for e in _entries(tmp_path)]
    assert ("admitted", "echo") in kinds and ("refused_join", "golf") in kinds
    # --resume: the late site is on the roster and must describe the same data again
    again = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=1,
                registry=saved)
    assert again.roster is not None and again.roster["echo"] == SiteInfo((2,), 2, 50, 12)
    assert again.joined == {"echo": 5}
    assert again.describe(again.register("echo"), SiteInfo((2,), 2, 50, 12)) is None
    changed = again.describe(again.register("echo"), SiteInfo((2,), 2, 51, 12))
    assert changed is not None and "data changed" in changed


def test_a_closed_roster_refuses_late_sites(hub: Hub) -> None:
    hub.open_roster = False
    hub.fix_roster({"alpha": INFO})
    refused = _joined(hub, "echo")
    assert refused is not None and "closed" in refused and hub.joining == {}


def test_a_site_silent_for_the_offline_time_is_offline_and_its_task_answered_at_once(
    hub: Hub,
) -> None:
    for name in ("alpha", "bravo"):
        assert _joined(hub, name) is None
    assert hub.online() == {"alpha", "bravo"}  # offline_after_s = inf: as before
    hub.offline_after_s = 5.0
    hub._sites["bravo"].last_seen -= 10
    assert hub.online() == {"alpha"}
    from consortium.deploy.validate import ExpectedTask

    future = hub.expect("bravo", 3, "t1", "train", ExpectedTask(site="bravo", round=3, task_id="t1"))
    assert future.done() and "offline" in (future.result().error or "")
    hub._sites["bravo"].pulling = 1  # waiting for work: online, however long it waits
    assert hub.online() == {"alpha", "bravo"}


class _Ledger:
    def __init__(self) -> None:
        self.admitted: dict[str, int] = {}

    def admit(self, cid: str, n: int) -> None:
        self.admitted[cid] = n


def test_the_sampler_draws_from_the_online_sites_and_admits_joiners(hub: Hub) -> None:
    from consortium.config import ExperimentConfig
    from consortium.deploy.server import _placeholder_dataset

    cfg = ExperimentConfig.from_dict({})
    for name in ("alpha", "bravo", "charlie"):
        assert _joined(hub, name) is None
    hub.fix_roster({n: INFO for n in ("alpha", "bravo", "charlie")})

    class Pool:
        def __init__(self) -> None:
            self.packed = _placeholder_dataset(cfg, dict(hub.roster or {})).packed()

        def __iter__(self) -> Any:
            return iter(self.packed.client_ids)

        def grow(self, packed: Any) -> None:
            self.packed = packed

    @dataclasses.dataclass(frozen=True)
    class SecureSum:  # secure aggregation's known weights (secagg.stage.SecureSum)
        weights: tuple[tuple[str, float], ...] = (("alpha", 30.0),)

    said: list[str] = []
    membership = Membership(hub, cfg, _placeholder_dataset, say=said.append)
    membership.pool, membership.ledger = Pool(), _Ledger()
    membership.secure_sum = SecureSum()
    sampler = OnlineSampler(UniformSampler(count=2), membership)
    assert len(sampler.sample(1, ["alpha", "bravo", "charlie"], seed=0)) == 2
    hub.offline_after_s = 5.0
    hub._sites["charlie"].last_seen -= 10
    assert _joined(hub, "echo") is None
    for r in range(2, 8):  # charlie is never drawn; echo is a member from round 2
        chosen = sampler.sample(r, ["alpha", "bravo", "charlie"], seed=0)
        assert "charlie" not in chosen and len(chosen) == 2
    assert list(membership.pool) == ["alpha", "bravo", "charlie", "echo"]
    assert membership.ledger.admitted == {"echo": 30}
    assert membership.secure_sum.weights == (("alpha", 30.0), ("echo", 30.0))
    assert any("'echo' joined" in line for line in said)
    assert any("'charlie' is offline from round 2" in line for line in said)
    hub._sites["alpha"].last_seen -= 10
    hub._sites["bravo"].last_seen -= 10  # fewer online than clients_per_round: all of them
    assert sampler.sample(9, ["alpha"], seed=0) == ["echo"]
    record: dict[str, Any] = {}
    membership.before_record(record, None)
    assert record == {"sites": 4, "sites_online": 1}


def test_the_client_pool_grows_and_the_local_ledger_admits_a_site() -> None:
    from consortium.config import ExperimentConfig
    from consortium.deploy.server import _placeholder_dataset
    from consortium.federation import Given, assemble
    from consortium.privacy.ledger import LocalPrivacyLedger

    cfg = ExperimentConfig.from_dict({"rounds": 1, "evaluation": {"baselines": []}})
    small = _placeholder_dataset(cfg, {"a": SiteInfo((13,), 2, 20, 5)})
    fed = assemble(cfg, Given(dataset=small))
    pool = fed.server.clients
    big = _placeholder_dataset(cfg, {"a": SiteInfo((13,), 2, 20, 5), "b": SiteInfo((13,), 2, 40, 7)})
    pool.grow(big.packed())
    assert list(pool) == ["a", "b"] and pool.test_size("b") == 7
    assert len(pool["b"].data.train) == 40
    with pytest.raises(ValueError, match="keep every client"):
        pool.grow(small.packed())
    ledger = LocalPrivacyLedger({"a": 20}, batch_size=10, noise_multiplier=1.0, delta=1e-5,
                                accountant="rdp")
    ledger.admit("b", 40)
    assert ledger.rates["b"] == 0.25 and ledger.site_epsilon("b") == 0.0


# ------------------------------------------------------------------------------ over gRPC


def _csv(d: Path, name: str, seed: int, columns: tuple[str, str] = ("x1", "x2")) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 2))
    y = np.where(x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=48) > 0, "yes", "no")
    lines = [f"{columns[0]},{columns[1]},label"]
    lines += [f"{a:.4f},{b:.4f},{c}" for (a, b), c in zip(x, y)]
    path = d / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


class _Killed(Exception):
    pass


class _Crash(Exception):
    """Raised in the server's round loop: the server stops there (its sites keep retrying)."""


def _runner_class() -> type:
    from consortium.deploy.client import SiteRunner

    class Site(SiteRunner):
        """A runner the test can stop (it dies as a killed process would) and that records
        the algorithm state it found at each connection."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stop = threading.Event()
            self.state_at_connect: list[dict[str, torch.Tensor]] = []

        def _connect(self, channel: Any) -> Any:
            session = super()._connect(channel)
            state = session.site.client.state.peek(self.site)
            self.state_at_connect.append({k: v.clone() for k, v in state.items()})
            return session

        def _one(self, session: Any) -> Any:
            if self.stop.is_set():
                raise _Killed("stopped by the test")
            return super()._one(session)

    return Site


OVERRIDES = [
    "data.dataset=\"csv\"", "data.target=\"label\"", "model.name=\"logistic\"",
    "algorithm.name=\"scaffold\"", "algorithm.lr=0.1", "algorithm.batch_size=16",
    f"rounds={ROUNDS}", "evaluation.baselines=[]", "sampling.clients_per_round=0",
]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _deploy(d: Path, *, rounds: int, closed: bool, script: Any, extra: tuple[str, ...] = (),
            listen: str = "127.0.0.1:0", resume: bool = False, keep: dict[str, Any] | None = None,
            min_sites: int | None = len(STARTERS)) -> dict[str, Any]:
    """A real ``serve()`` (a thread of this process) with the four starting sites; ``script``
    (hub, round, start, stop, out) runs in the round loop at each round's end, so the test
    decides what happens between rounds while the server waits. The late site is provisioned
    (``add_site``) only when it starts: the running server re-reads its registry."""
    from consortium.client.approval import manifest_hash
    from consortium.deploy import server as server_module
    from consortium.deploy.provision import add_site, provision

    names = (*STARTERS, LATE, BAD_SIZE, BAD_SHAPE, BAD_COLUMNS)
    if not resume:  # the late site is provisioned while the run goes on (add_site, in start)
        provision([n for n in names if n != LATE], d / "certs")
    overrides = [o if not o.startswith("rounds=") else f"rounds={rounds}" for o in OVERRIDES]
    overrides += list(extra)
    approve = (manifest_hash(load_config(None, overrides)),)
    ports: queue.Queue[int] = queue.Queue()
    out: dict[str, Any] = keep if keep is not None else {
        "run": d / "run", "sites": {}, "runners": {}, "threads": []}
    site_class = _runner_class()
    seeds = {n: i for i, n in enumerate(names)}

    serve = serve_into(
        out, ports,
        listen=listen, certs=d / "certs" / "server", out=d / "run",
        min_sites=min_sites, overrides=() if resume else overrides, register_timeout=60,
        resume=d / "run" if resume else None,
        round_timeout=60, heartbeat_s=2,
        closed_roster=closed,
    )

    def start(name: str, *, columns: tuple[str, str] = ("x1", "x2")) -> threading.Thread:
        if not (d / "certs" / "sites" / name).exists():  # `consortium provision --add-site`
            add_site(d / "certs", name)
        runner = site_class(
            f"127.0.0.1:{out['port']}", site=name, data=_csv(d, name, seeds[name], columns),
            certs=d / "certs" / "sites" / name, approve=approve, poll_s=1,
            give_up_after_s=30, state_dir=d / "state" / name, max_backoff_s=0.5,
        )
        out["runners"].setdefault(name, []).append(runner)

        def run() -> None:
            try:
                out["sites"][name] = runner.run()
            except BaseException as exc:
                out["sites"][name] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        out["threads"].append(thread)
        return thread

    original = server_module._RoundReport.on_round_end

    def on_round_end(self: Any, record: dict[str, Any], state: Any) -> None:
        original(self, record, state)
        script(self.hub, int(record["round"]), start, out)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_module._RoundReport, "on_round_end", on_round_end)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        out["port"] = ports.get(timeout=60)
        assert out["port"], f"the server did not start: {out.get('served')!r}"
        if keep is None:
            for name in STARTERS:
                start(name)
        server.join(timeout=240)
        if not isinstance(out.get("served"), _Crash):
            for t in out["threads"]:
                t.join(timeout=30)
    return out


def _hostile_late_sites(d: Path, port: int, out: dict[str, Any], start: Any) -> None:
    from tests.deploy.hostile_site import HostileSite

    with HostileSite(f"127.0.0.1:{port}", BAD_SIZE, certs=d / "certs" / "sites" / BAD_SIZE) as s:
        s.register()
        out["bad_size"] = s.describe([2], 2, 1 << 40, 10)
    with HostileSite(f"127.0.0.1:{port}", BAD_SHAPE, certs=d / "certs" / "sites" / BAD_SHAPE) as s:
        s.register()
        out["bad_shape"] = s.describe([7], 2, 30, 10)
    start(BAD_COLUMNS, columns=("x1", "x3")).join(timeout=30)


def _script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
    if rnd == 2:  # hostile late sites: refused with their reasons, the run goes on
        _hostile_late_sites(out["run"].parent, out["port"], out, start)
    if rnd == 4:  # the fifth site joins; round 5 is the first to sample it
        start(LATE)
        _wait(lambda: LATE in hub.joining, 30, "the late site to describe its data")
    if rnd == 7:  # the leaver dies before round 8
        out["runners"][LEAVER][-1].stop.set()
        _wait(lambda: LEAVER not in hub.online(), 30, "the leaver to go offline")
    if rnd == 11:  # and comes back, a new process with its --state, before round 12
        start(LEAVER)
        _wait(lambda: LEAVER in hub.online(), 30, "the leaver to come back")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _deploy(tmp_path_factory.mktemp("roster"), rounds=ROUNDS, closed=False, script=_script)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_run_completes_with_the_late_site_and_the_returning_one(deployed: dict[str, Any]) -> None:
    served = deployed["served"]
    assert not isinstance(served, BaseException), served
    records = _records(deployed["run"])
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    clients = [r["clients"] for r in records]
    assert clients == [4] * 4 + [5] * 3 + [4] * 4 + [5] * 4, clients
    online = [(r["sites_online"], r["sites"]) for r in records]
    assert online == [(4, 4)] * 4 + [(5, 5)] * 3 + [(4, 5)] * 4 + [(5, 5)] * 4, online
    assert served.summary["rounds"] == ROUNDS
    assert np.isfinite(served.summary["final"]["accuracy"])


def test_the_audit_log_verifies_and_holds_admission_departure_and_return(
    deployed: dict[str, Any],
) -> None:
    from consortium.deploy.audit import verify_run

    report = verify_run(deployed["run"])
    assert report.entries > 0
    entries = [json.loads(line) for line in (deployed["run"] / "audit.jsonl").read_text().splitlines()]
    late_results = sorted(e["round"] for e in entries if e["kind"] == "result" and e.get("site") == LATE)
    assert late_results == list(range(5, ROUNDS + 1)), late_results
    leaver = sorted(e["round"] for e in entries if e["kind"] == "result" and e.get("site") == LEAVER)
    assert leaver == [*range(1, 8), *range(12, ROUNDS + 1)], leaver
    events = [(e["kind"], e.get("site"), e.get("round")) for e in entries
              if e["kind"] in ("admitted", "departed", "returned")]
    assert events == [("admitted", LATE, 5), ("departed", LEAVER, 8), ("returned", LEAVER, 12)]
    registry = json.loads((deployed["run"] / "checkpoint" / "extras.json").read_text())["registry"]
    assert set(registry["sites"]) == {*STARTERS, LATE}
    assert registry["sites"][LATE]["joined"] == 5
    assert registry["sites"][LATE]["results"] == ROUNDS - 4


def test_the_returning_site_kept_its_scaffold_state(deployed: dict[str, Any]) -> None:
    first, again = deployed["runners"][LEAVER]
    assert first.state_at_connect[0] == {}  # a new site starts without a control variate
    kept = again.state_at_connect[0]  # read back from its --state at reconnection
    assert kept and any(bool(v.abs().sum() > 0) for v in kept.values()), kept


def test_hostile_late_sites_are_refused_with_their_reasons(deployed: dict[str, Any]) -> None:
    assert not deployed["bad_size"].accepted and "2**31" in deployed["bad_size"].reason
    assert not deployed["bad_shape"].accepted and "does not fit" in deployed["bad_shape"].reason
    bad = deployed["sites"][BAD_COLUMNS]
    assert isinstance(bad, Exception) and "x3" in str(bad), bad
    registry = json.loads((deployed["run"] / "checkpoint" / "extras.json").read_text())["registry"]
    assert not {BAD_SIZE, BAD_SHAPE, BAD_COLUMNS} & set(registry["sites"])


def test_a_closed_roster_refuses_the_late_site(tmp_path: Path) -> None:
    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 1:
            start(LATE).join(timeout=30)

    out = _deploy(tmp_path, rounds=3, closed=True, script=script)
    assert not isinstance(out["served"], BaseException), out["served"]
    refused = out["sites"][LATE]
    assert isinstance(refused, Exception) and "--closed-roster" in str(refused), refused
    assert [r["clients"] for r in _records(out["run"])] == [4, 4, 4]


def test_under_local_dp_the_late_sites_spend_starts_at_zero(tmp_path: Path) -> None:
    """privacy.json accounts for the late site from its first round: its steps are those of
    the rounds it took part in, and its epsilon is below the sites that started."""

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 2:
            start(LATE)
            _wait(lambda: LATE in hub.joining, 30, "the late site")

    out = _deploy(tmp_path, rounds=4, closed=False, script=script, extra=(
        "privacy.mode=\"local\"", "privacy.noise_multiplier=1.0", "algorithm.name=\"fedavg\""))
    assert not isinstance(out["served"], BaseException), out["served"]
    assert [r["clients"] for r in _records(out["run"])] == [4, 4, 5, 5]
    ledger = json.loads((out["run"] / "privacy.json").read_text())
    steps: dict[str, int] = {}
    for release in ledger["releases"]:
        for site, n in release["steps"].items():
            steps[site] = steps.get(site, 0) + int(n)
    assert set(steps) == {*STARTERS, LATE}
    assert all(n > 0 for n in steps.values()), steps
    spent = ledger["releases"][-1]["site_epsilon"]
    assert 0 < spent[LATE] < min(spent[s] for s in STARTERS), spent
    assert [r["round"] for r in ledger["releases"] if LATE in r["steps"]] == [3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_under_secure_aggregation_a_late_and_a_returning_site_are_in_the_cohort(
    tmp_path: Path,
) -> None:
    """SecAgg+ (authenticated, floors on): the round's cohort is its online sites; the late
    site's known weight is in the weight check, so every round's sum passes it."""

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 1:
            start(LATE)
            _wait(lambda: LATE in hub.joining, 30, "the late site")
        if rnd == 2:
            out["runners"][LEAVER][-1].stop.set()
            _wait(lambda: LEAVER not in hub.online(), 30, "the leaver to go offline")
        if rnd == 3:
            start(LEAVER)
            _wait(lambda: LEAVER in hub.online(), 30, "the leaver to come back")

    out = _deploy(tmp_path, rounds=5, closed=False, script=script, extra=(
        "secure_aggregation.enabled=true", "secure_aggregation.threshold=0.67",
        "algorithm.name=\"fedavg\""))
    assert not isinstance(out["served"], BaseException), out["served"]
    records = _records(out["run"])
    assert [r["clients"] for r in records] == [4, 5, 4, 5, 5], records
    assert not any(r.get("aborted") for r in records), records
    from consortium.deploy.audit import verify_run

    verify_run(out["run"])


def test_resume_after_a_crash_keeps_the_late_site(tmp_path: Path) -> None:
    """The server stops after round 4 (the late site joined at round 3); ``--resume`` waits
    for the five sites of the checkpointed roster, and the late site goes on contributing."""
    port = _free_port()

    def script(hub: Any, rnd: int, start: Any, out: dict[str, Any]) -> None:
        if rnd == 2:
            start(LATE)
            _wait(lambda: LATE in hub.joining, 30, "the late site")
        if rnd == 4 and not out.get("resumed"):
            raise _Crash("the server dies after round 4")

    out = _deploy(tmp_path, rounds=7, closed=False, script=script,
                  listen=f"127.0.0.1:{port}")
    assert isinstance(out["served"], _Crash), out["served"]
    out["resumed"] = True
    out = _deploy(tmp_path, rounds=7, closed=False, script=script, listen=f"127.0.0.1:{port}",
                  resume=True, keep=out, min_sites=None)
    assert not isinstance(out["served"], BaseException), out["served"]
    records = _records(out["run"])
    assert [r["round"] for r in records] == list(range(1, 8))
    assert [r["clients"] for r in records] == [4, 4, 5, 5, 5, 5, 5], records
    from consortium.deploy.audit import verify_run

    verify_run(out["run"])
    entries = [json.loads(line) for line in (out["run"] / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["round"] for e in entries
                  if e["kind"] == "result" and e.get("site") == LATE) == [3, 4, 5, 6, 7]


def _audit(run: Path) -> list[dict[str, Any]]:
    path = run / "audit.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


@pytest.mark.slow
def test_a_server_killed_after_a_late_site_joined_resumes_with_it(tmp_path: Path) -> None:
    """Real processes: three sites start, a fourth (``west``) joins after round 2; the server
    is killed (SIGKILL) once west has sent an update; ``--resume`` keeps west on the roster
    and it goes on sending updates until the run ends; the audit chain verifies."""
    from consortium.deploy.audit import verify_run
    from consortium.deploy.provision import provision
    from tests.deploy.test_e2e import (
        EXPERIMENT,
        _client,
        _free_port,
        _server_on,
        _stop,
        _write_sites,
    )

    d = tmp_path
    _write_sites(d)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 4))
    rows = ["f1,f2,f3,f4,label"] + [",".join(f"{v:.5f}" for v in r) + f",{int(r.sum() > 0)}"
                                     for r in x]
    (d / "west.csv").write_text("\n".join(rows) + "\n")
    (d / "exp.toml").write_text(EXPERIMENT.replace("rounds = 4", "rounds = 300"))
    deadline = time.monotonic() + 240
    provision(("north", "south", "east", "west"), d / "certs")
    port = _free_port()
    server = _server_on(d, port, "run", "--heartbeat", "2")
    clients = [_client(d, port, site) for site in ("north", "south", "east")]
    try:
        while _rounds(d / "run") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        clients.append(_client(d, port, "west"))
        while not any(e["kind"] == "result" and e.get("site") == "west"
                      for e in _audit(d / "run")) and time.monotonic() < deadline \
                and clients[-1].poll() is None and server.poll() is None:
            time.sleep(0.05)
        server.kill()  # SIGKILL, mid-run
        server.wait(timeout=30)
        stopped = _rounds(d / "run")
        if stopped >= 300 or clients[-1].poll() is not None:
            clients[-1].kill()
            pytest.fail(f"west did not take part; its stderr: {clients[-1].communicate()[1][-3000:]}")
        server = _server_on(d, port, "run", "--resume", "--heartbeat", "2")
        assert server.wait(timeout=300) == 0
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        _stop(server, *clients)
    assert verify_run(d / "run").ok
    registry = json.loads((d / "run" / "checkpoint" / "extras.json").read_text())["registry"]
    assert sorted(registry["sites"]) == ["east", "north", "south", "west"]
    west = sorted(e["round"] for e in _audit(d / "run")
                  if e["kind"] == "result" and e.get("site") == "west")
    assert west[-1] == 300 and len(west) >= 300 - stopped


def _rounds(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0

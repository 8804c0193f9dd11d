"""The server's hub: every bad result is refused with a logged reason and never reaches the round."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from consortium.deploy.audit import AuditLog, verify
from consortium.deploy.codec import ResultEnvelope, decode_upload, encode_upload
from consortium.deploy.hub import Hub, SiteInfo
from consortium.deploy.validate import ExpectedTask
from consortium.messages import Result
from consortium.types import Update
from tests.deploy.conftest import LAYOUT


def _open(hub: Hub, site: str, task_id: str, rnd: int = 1):
    session = hub.register(site)
    hub.describe(session, SiteInfo((3,), 2, 10, 5))
    future = hub.expect(site, rnd, task_id, "train",
                        ExpectedTask(site=site, round=rnd, task_id=task_id))
    return session, future


def _wire(result: Result, task_id: str) -> ResultEnvelope:
    envelope = decode_upload(encode_upload(ResultEnvelope(task_id, result)))
    assert isinstance(envelope, ResultEnvelope)
    return envelope


def test_a_good_result_reaches_the_round_and_the_audit_log(hub: Hub, tmp_path) -> None:
    session, future = _open(hub, "a", "t1")
    good = Result(1, "a", Update("a", torch.tensor([0.1, 0.2, 0.3]), 10.0))
    assert hub.deliver(session, _wire(good, "t1")) == (True, "")
    assert torch.equal(future.result(timeout=1).update.delta, good.update.delta)
    assert verify(tmp_path / "audit.jsonl").kinds["result"] == 1


@pytest.mark.parametrize(("bad", "reason"), [
    (Result(1, "a", Update("a", torch.tensor([float("nan"), 0.0, 0.0]), 10.0)), "finite"),
    (Result(1, "a", Update("a", torch.tensor([0.1, 0.2]), 10.0)), "3"),
    (Result(2, "a", Update("a", torch.tensor([0.1, 0.2, 0.3]), 10.0)), "round"),
    (Result(1, "b", Update("b", torch.tensor([0.1, 0.2, 0.3]), 10.0)), "'b'"),
])
def test_a_bad_result_is_rejected_with_its_reason(hub: Hub, tmp_path, bad: Result, reason: str) -> None:
    session, future = _open(hub, "a", "t1")
    accepted, why = hub.deliver(session, _wire(bad, "t1"))
    assert not accepted and reason in why and "site 'a'" in why
    assert future.result(timeout=1).update is None  # the round sees a failed client, no update
    report = verify(tmp_path / "audit.jsonl")
    assert report.ok and report.kinds["rejected"] == 1


def test_a_replayed_or_late_result_is_refused(hub: Hub) -> None:
    session, future = _open(hub, "a", "t1")
    good = _wire(Result(1, "a", Update("a", torch.tensor([0.1, 0.2, 0.3]), 10.0)), "t1")
    assert hub.deliver(session, good)[0]
    accepted, why = hub.deliver(session, good)  # the same result again
    assert not accepted and "no such task open" in why
    _, late = _open(hub, "b", "t2")
    hub.forget(["t2"])  # the round's deadline passed
    accepted, why = hub.deliver(hub.register("b"), _wire(
        Result(1, "b", Update("b", torch.tensor([0.1, 0.2, 0.3]), 10.0)), "t2"))
    assert not accepted and "late" in why and not late.done()


def test_a_data_summary_round_trips_and_bad_ones_are_refused() -> None:
    import numpy as np

    from consortium.data.preprocess import SiteSummary
    from consortium.deploy.codec import DecodeError
    from consortium.deploy.proto import consortium_pb2 as pb
    from consortium.deploy.summary import summary_from_pb, summary_to_pb

    s = SiteSummary(np.array([3.0, 0.0]), np.array([6.0, 0.0]), np.array([14.0, 0.0]),
                    np.array([False, True]), np.array([False, False]),
                    (frozenset(), frozenset({1, 2, "x"})))
    back = summary_from_pb(pb.DataSummary.FromString(summary_to_pb(s).SerializeToString()))
    assert np.array_equal(back.total_sq, s.total_sq) and back.categories == s.categories
    bad = summary_to_pb(s)
    bad.total[0] = float("nan")
    with pytest.raises(DecodeError, match="finite"):
        summary_from_pb(bad)
    short = summary_to_pb(s)
    del short.binary[0]
    with pytest.raises(DecodeError, match="same number"):
        summary_from_pb(short)


def test_the_roster_refuses_strangers_and_changed_data_once_the_run_started(hub: Hub) -> None:
    a = hub.register("a")
    assert hub.describe(a, SiteInfo((3,), 2, 10, 5)) is None
    hub.fix_roster({"a": SiteInfo((3,), 2, 10, 5)})
    assert hub.describe(hub.register("a"), SiteInfo((3,), 2, 10, 5)) is None  # a restart
    why = hub.describe(hub.register("a"), SiteInfo((3,), 2, 11, 5))
    assert why is not None and "11 training" in why and "10 training" in why and "changed" in why
    hub.open_roster = False  # --closed-roster; by default a late site joins (test_roster_grpc.py)
    why = hub.describe(hub.register("b"), SiteInfo((3,), 2, 10, 5))
    assert why is not None and "without site 'b'" in why


def test_the_site_registry_round_trips_with_counts_and_the_encoding(hub: Hub) -> None:
    import json

    import numpy as np

    from consortium.data.preprocess import SiteSummary
    from consortium.errors import CheckpointError

    session, _ = _open(hub, "a", "t1", rnd=3)
    hub.fix_roster({"a": SiteInfo((3,), 2, 10, 5), "b": SiteInfo((3,), 2, 7, 2)})
    hub.deliver(session, _wire(Result(3, "a", Update("a", torch.tensor([0.1, 0.2, 0.3]), 10.0)), "t1"))
    hub.reject("b", "-", 3, "test")
    hub.merged = SiteSummary(np.array([3.0]), np.array([1.5]), np.array([2.0]),
                             np.array([False]), np.array([False]), (frozenset(),))
    saved = json.loads(json.dumps(hub.registry()))  # what the checkpoint holds
    assert saved["sites"]["a"] == {"input_shape": [3], "num_classes": 2, "num_train": 10,
                                   "num_test": 5, "results": 1, "rejected": 0, "last_round": 3}
    assert saved["sites"]["b"]["rejected"] == 1
    other = Hub(asyncio.new_event_loop(), config_toml="", run_id="new", max_result_bytes=1,
                registry=saved)
    assert other.run_id == "t" and other.roster == hub.roster and other.counts == hub.counts
    assert other.merged is not None and other.merged.total.tolist() == [1.5]
    with pytest.raises(CheckpointError, match="damaged"):
        other.restore({"format": 1, "sites": {"a": {"input_shape": "x"}}})
    with pytest.raises(CheckpointError, match="format"):
        other.restore({"format": 7})


def _round_with(
    hub: Hub, min_results: int, answer: set[str], sites: tuple[str, ...] = ("a", "b"),
    **executor: Any,
) -> tuple[list[Result], Exception | None]:
    """Each site gets a task; those in ``answer`` send a good result, the others stay silent."""
    import threading
    import time

    from consortium.deploy.hub import RemoteExecutor
    from consortium.messages import Task
    from consortium.types import Parameters

    sessions = {}
    for site in sites:
        sessions[site] = hub.register(site)
        hub.describe(sessions[site], SiteInfo((3,), 2, 10, 5))
    remote = RemoteExecutor(hub, **{"round_timeout": 1.0, "min_results": min_results, **executor})
    params = Parameters(LAYOUT, torch.zeros(3))
    tasks = [Task(1, site, params, seed=0, cohort_size=len(sites)) for site in sites]
    out: list[Result] = []
    error: list[Exception] = []

    def run() -> None:
        try:
            out.extend(remote.fit(tasks, {}))
        except Exception as exc:  # the test looks at it
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while len(hub._pending) < len(sites):
        time.sleep(0.01)
    for task_id, pending in list(hub._pending.items()):
        if pending.site in answer:
            update = Update(pending.site, torch.tensor([0.1, 0.2, 0.3]), 10.0)
            assert hub.deliver(sessions[pending.site], _wire(Result(1, pending.site, update), task_id))[0]
    thread.join(timeout=10)
    return out, error[0] if error else None


def test_a_round_short_of_min_results_is_aborted_and_names_who_failed(hub: Hub) -> None:
    from consortium.errors import RoundAborted

    results, error = _round_with(hub, 2, {"a"})
    assert isinstance(error, RoundAborted) and "1 of 2 sites" in str(error)
    # every answer, in task order, then the abort (the loop discards what it folded)
    assert [(r.client_id, r.update is not None) for r in results] == [("a", True), ("b", False)]
    assert "deadline" in (results[1].error or "")


def test_a_round_with_enough_results_goes_on_without_the_silent_site(hub: Hub) -> None:
    results, error = _round_with(hub, 1, {"a"})
    assert error is None
    assert [(r.client_id, r.update is not None) for r in results] == [("a", True), ("b", False)]


def test_an_over_selected_round_closes_with_its_first_results(hub: Hub) -> None:
    import time

    started = time.monotonic()
    results, error = _round_with(hub, 1, {"a", "c"}, ("a", "b", "c"), over_select=0.5,
                                 round_timeout=60.0)
    assert error is None and time.monotonic() - started < 30  # did not wait for the deadline
    assert [(r.client_id, r.update is not None) for r in results] == [
        ("a", True), ("b", False), ("c", True)]  # task order
    assert "over-selected: the round closed with the first 2 results" in (results[1].error or "")
    assert not hub._pending  # b's late answer will be refused


def test_an_oversized_result_is_rejected_and_never_reaches_the_round(tmp_path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    small = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=40,
                audit=audit)
    small.layout = LAYOUT
    session, future = _open(small, "a", "t1")
    big = _wire(Result(1, "a", Update("a", torch.tensor([0.1, 0.2, 0.3]), 10.0,
                                      metrics={"train_loss": 0.5})), "t1")
    accepted, why = small.deliver(session, big)
    assert not accepted and "exceed the limit of 40 bytes" in why and "site 'a'" in why
    assert future.result(timeout=1).update is None
    audit.close()
    assert verify(tmp_path / "audit.jsonl").kinds["rejected"] == 1


def test_answers_stream_in_task_order_as_soon_as_the_earlier_ones_are_in(hub: Hub) -> None:
    """The round folds each update while later ones are still arriving; the last answer waits
    for the audit log's sync."""
    import threading
    import time

    from consortium.deploy.hub import RemoteExecutor
    from consortium.messages import Task
    from consortium.types import Parameters

    sessions = {s: hub.register(s) for s in ("a", "b", "c")}
    for session in sessions.values():
        hub.describe(session, SiteInfo((3,), 2, 10, 5))
    params = Parameters(LAYOUT, torch.zeros(3))
    tasks = [Task(1, s, params, seed=0, cohort_size=3) for s in ("a", "b", "c")]
    stream = RemoteExecutor(hub, round_timeout=30.0).fit(tasks, {})
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(r.client_id for r in stream))

    def answer(site: str) -> None:
        task_id = next(t for t, p in hub._pending.items() if p.site == site)
        update = Update(site, torch.tensor([0.1, 0.2, 0.3]), 10.0)
        assert hub.deliver(sessions[site], _wire(Result(1, site, update), task_id))[0]

    reader.start()
    while len(hub._pending) < 3:
        time.sleep(0.01)
    answer("b")
    time.sleep(0.2)
    assert got == []  # b waits for a
    answer("a")
    deadline = time.monotonic() + 10
    while got != ["a", "b"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["a", "b"]  # both folded before c answered
    answer("c")
    reader.join(timeout=10)
    assert got == ["a", "b", "c"]


def test_an_expelled_site_fails_its_open_task_at_once_and_gets_no_more(hub: Hub, tmp_path) -> None:
    session, future = _open(hub, "a", "t1")
    hub.expel("a", "site 'a' was revoked during the run")
    assert "revoked" in (future.result(timeout=1).error or "")  # the round does not wait
    with pytest.raises(KeyError):
        hub.site_of(session)  # its session is gone
    with pytest.raises(PermissionError, match="revoked"):
        hub.register("a")  # and it cannot come back
    later = hub.expect("a", 2, "t2", "train", ExpectedTask(site="a", round=2, task_id="t2"))
    assert later.done() and "revoked" in (later.result().error or "")
    hub.audit.sync()
    assert verify(tmp_path / "audit.jsonl").kinds["expelled"] == 1


def test_a_resumed_run_expels_its_sites_revoked_while_it_was_down(hub: Hub) -> None:
    from consortium.deploy.provision import Registry, SiteRecord
    from consortium.deploy.server import FederationService

    hub.fix_roster({"a": SiteInfo((3,), 2, 10, 5), "b": SiteInfo((3,), 2, 10, 5)})
    registry = Registry(b"", {"a": SiteRecord("a", "f1", revoked=True), "b": SiteRecord("b", "f2")}, {})
    FederationService(hub, registry=registry)
    assert set(hub.expelled) == {"a"}  # its tasks fail at once instead of waiting each deadline


def test_a_site_registering_again_fails_the_task_it_held(hub: Hub) -> None:
    _, future = _open(hub, "a", "t1")
    hub.register("a")  # the client restarted mid-round: its task is lost with the old process
    assert "registered again" in (future.result(timeout=1).error or "")


def test_a_task_for_a_site_that_is_not_connected_fails_at_once(hub: Hub) -> None:
    future = hub.expect("ghost", 1, "t9", "train", ExpectedTask(site="ghost", round=1, task_id="t9"))
    assert future.done() and "not connected" in (future.result().error or "")
    hub.send("ghost", object())  # nothing to queue it on, and no KeyError


def test_a_silent_site_fails_its_task_before_the_deadline(hub: Hub) -> None:
    import time

    _, future = _open(hub, "a", "t1")
    hub.fail_silent(60.0)
    assert not future.done()  # it called just now
    hub._sites["a"].last_seen = time.monotonic() - 100  # then nothing for 100 s
    assert set(hub.silent(60.0)) == {"a"}
    hub.fail_silent(60.0)
    assert "went silent" in (future.result(timeout=1).error or "")


def test_too_few_sites_by_the_register_timeout_is_a_clear_error(hub: Hub) -> None:
    from consortium.errors import ConsortiumError

    hub.describe(hub.register("a"), SiteInfo((3,), 2, 10, 5))
    with pytest.raises(ConsortiumError, match=r"ready: \['a'\].*lower --min-sites"):
        hub.wait_for_sites(2, 0.2)


def test_the_upload_limit_follows_the_model_so_a_site_cannot_make_the_server_buffer_gigabytes() -> None:
    import uuid

    from consortium.deploy.codec import DecodeError, chunk
    from consortium.deploy.server import _reassemble

    big = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=2 << 30)
    assert big.upload_limit() == 1 << 20  # before round 1 no task was sent: a small cap
    big.layout = LAYOUT  # 3 floats
    assert big.upload_limit() == 4 * 3 * 4 + (1 << 20)

    async def frames():  # a 3 MiB stream declared up front
        for frame in chunk(b"\0" * (3 << 20), uuid.uuid4().hex):
            yield frame

    with pytest.raises(DecodeError):
        asyncio.run(_reassemble(frames(), big.upload_limit()))


def test_a_secure_aggregation_phase_gives_up_on_a_silent_site_before_its_timeout(hub: Hub) -> None:
    import threading
    import time

    from consortium.deploy.codec import ExchangeEnvelope
    from consortium.deploy.hub import RemoteExecutor

    sessions = {s: hub.register(s) for s in ("a", "b")}
    remote = RemoteExecutor(hub, phase_timeout=60.0, silence_s=0.5)
    replies: list[str] = []
    started = time.monotonic()
    phase = threading.Thread(target=lambda: replies.extend(
        cid for cid, _ in remote.exchange("secure_aggregation", "keys", {"a": 1, "b": 2}, {}, round=1)
    ))
    phase.start()
    while len(hub._exchanges) < 2:
        time.sleep(0.01)
    accepted, _ = hub.deliver_exchange(
        sessions["a"], ExchangeEnvelope("secure_aggregation", "keys", 1, "a", "reply"))
    assert accepted
    hub._sites["b"].last_seen = time.monotonic() - 100  # b crashed: no call since
    phase.join(timeout=20)
    assert replies == ["a"] and time.monotonic() - started < 20  # not the 60 s phase timeout


def test_an_expelled_sites_waiting_pull_ends_with_the_reason_at_once(hub: Hub) -> None:
    """A site waiting for work when it is revoked hears why at once (it used to learn only at
    its next call, and a run that ended first left it retrying a closed port)."""
    import time as _time

    session = hub.register("a")

    async def pull_then_expel() -> float:
        started = _time.monotonic()
        hub.loop.call_later(0.05, hub.expel, "a", "site 'a' was revoked during the run")
        with pytest.raises(PermissionError, match="revoked"):
            await hub.next_work(session, 30.0)
        return _time.monotonic() - started

    assert hub.loop.run_until_complete(pull_then_expel()) < 10  # not the 30 s wait
    assert hub.expelled_reason(session) == "site 'a' was revoked during the run"
    assert hub.expelled_reason("another") is None

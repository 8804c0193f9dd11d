"""Bounded memory, time and logs per site (issue 13, points 3 and 7), each played by a real
attacker: raw gRPC stubs against a real server on 127.0.0.1.

A stalled upload is dropped after the idle timeout; a second upload while one is in flight is
refused; a declared-huge upload holds only what arrived; a forged ``client_version`` reaches
the log and the audit log sanitised; a flood of garbage costs a bounded number of audit
entries; a malformed call is one warning line, not a traceback; the site refuses a task larger
than its model allows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

grpc = pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.deploy.audit import AuditLog  # noqa: E402
from consortium.deploy.codec import (  # noqa: E402
    SESSION_METADATA_KEY,
    DecodeError,
    Reassembler,
    TaskEnvelope,
    chunk,
    encode_work,
)
from consortium.deploy.hub import PRE_LAYOUT_UPLOAD_BYTES, Hub  # noqa: E402
from consortium.deploy.logsafe import RejectionLimiter, peer_text  # noqa: E402
from consortium.deploy.proto import consortium_pb2 as pb  # noqa: E402
from consortium.deploy.proto import consortium_pb2_grpc as rpc  # noqa: E402
from consortium.deploy.server import MAX_RESULT_BYTES, StreamLimits, _ServerThread  # noqa: E402
from consortium.types import Layout, TensorSpec  # noqa: E402

LAYOUT = Layout((TensorSpec("w", (3,), torch.float32),))


class Running:
    """A real grpc.aio server (``_ServerThread``) with an audit log, and raw stubs into it."""

    def __init__(self, tmp_path: Path, limits: StreamLimits) -> None:
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.thread = _ServerThread("127.0.0.1:0", certs=None, limits=limits, hub_args={
            "config_toml": "", "run_id": "limits", "max_result_bytes": MAX_RESULT_BYTES,
            "audit": self.audit,
        })
        self.hub: Hub = self.thread.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.thread.port}")
        self.stub = rpc.FederationStub(self.channel)

    def register(self, site: str = "mallory", **fields: Any) -> tuple[tuple[str, str], ...]:
        reply = self.stub.Register(pb.RegisterRequest(site=site, **fields), timeout=10)
        return ((SESSION_METADATA_KEY, reply.session_id),)

    def entries(self, kind: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["kind"] == kind]

    def close(self) -> None:
        self.channel.close()
        self.thread.stop()
        self.audit.close()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Running]:
    running = Running(tmp_path, StreamLimits(idle_timeout_s=1.0, min_rate=0))
    yield running
    running.close()


def _stalled(first: pb.Chunk, release: threading.Event) -> Iterator[pb.Chunk]:
    """An upload that sends its first frame and then nothing (until ``release``)."""
    yield first
    release.wait(30)


def _eventually(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def _huge_first_frame(total: int) -> pb.Chunk:
    return pb.Chunk(stream_id=uuid.uuid4().hex, offset=0, total_size=total, data=b"x", last=False)


# -- memory and time -----------------------------------------------------------------------------


def test_a_declared_huge_upload_holds_only_the_bytes_that_arrived() -> None:
    assembler = Reassembler(2 << 30)
    assert assembler.feed(_huge_first_frame(2 << 30)) is None
    assert assembler.total_size == 2 << 30
    assert assembler.held_bytes < 1 << 10  # one byte arrived, not 2 GiB allocated
    payload = bytes(range(256)) * 5000
    whole = Reassembler(1 << 30)
    frames = list(chunk(payload, "s", chunk_size=4096))
    out = None
    for i, frame in enumerate(frames):
        out = whole.feed(frame)
        assert whole.held_bytes <= 2 * (i + 1) * 4096 + 1024  # grows with what arrived
    assert out == payload


def test_before_round_1_the_upload_limit_is_small(tmp_path: Path) -> None:
    import asyncio

    hub = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=2 << 30)
    assert hub.upload_limit() == PRE_LAYOUT_UPLOAD_BYTES == 1 << 20  # no task sent yet
    hub.layout = LAYOUT
    assert hub.upload_limit() == 4 * 3 * 4 + (1 << 20)


def test_an_upload_declaring_more_than_the_limit_before_round_1_is_refused(server: Running) -> None:
    metadata = server.register()
    frames = iter([_huge_first_frame(2 << 30)])
    ack = server.stub.PushResult(frames, metadata=metadata, timeout=10)
    assert not ack.accepted and f"above the limit of {1 << 20} bytes" in ack.reason


def test_a_stalled_upload_is_dropped_after_the_idle_timeout(server: Running) -> None:
    server.hub.layout = Layout((TensorSpec("w", (1 << 24,), torch.float32),))  # 64 MB model
    metadata = server.register()
    release = threading.Event()
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.stub.PushResult(_stalled(_huge_first_frame(200 << 20), release),
                                   metadata=metadata, timeout=20)
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no frame for 1 s" in err.value.details()
    assert 0.9 < time.monotonic() - started < 5  # the server's timeout, not the call's 20 s
    (entry,) = server.entries("rejected")
    assert entry["site"] == "mallory" and "upload dropped: 1 of 209715200 bytes" in entry["reason"]
    assert _eventually(lambda: not server.thread.service._uploads)  # type: ignore[union-attr]


def test_a_trickling_upload_below_the_rate_floor_is_dropped(tmp_path: Path) -> None:
    running = Running(tmp_path, StreamLimits(idle_timeout_s=1.0, min_rate=1000))
    running.hub.layout = Layout((TensorSpec("w", (1 << 20,), torch.float32),))

    def trickle() -> Iterator[pb.Chunk]:  # 10 bytes every 0.5 s: never idle, 20 bytes/s
        sid = uuid.uuid4().hex
        for i in range(40):
            yield pb.Chunk(stream_id=sid, offset=10 * i, total_size=1 << 20, data=b"y" * 10)
            time.sleep(0.5)

    try:
        metadata = running.register()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            running.stub.PushResult(trickle(), metadata=metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "slower than 1000 bytes/s" in err.value.details()
        assert time.monotonic() - started < 4  # the idle timeout of 1 s plus what 30 bytes buy
    finally:
        running.close()


def test_a_second_upload_while_one_is_in_flight_is_refused_at_once(server: Running) -> None:
    server.hub.layout = Layout((TensorSpec("w", (1 << 20,), torch.float32),))
    metadata = server.register()
    release = threading.Event()
    first = server.stub.PushResult.future(
        _stalled(_huge_first_frame(1 << 20), release), metadata=metadata, timeout=20)
    try:
        assert _eventually(lambda: server.thread.service._uploads)  # type: ignore[union-attr]
        started = time.monotonic()
        ack = server.stub.Exchange(iter([_huge_first_frame(10)]), metadata=metadata, timeout=10)
        assert time.monotonic() - started < 0.9  # refused before the first one's idle timeout
        assert not ack.accepted and "a second exchange while one is in flight" in ack.reason
        assert server.hub.counts["mallory"]["rejected"] == 1
    finally:
        release.set()  # the first one ends without its last frame: refused for that
    assert "ended before its last chunk" in first.result(timeout=10).reason


def test_an_upload_on_a_newer_session_ends_the_stale_sessions_stream(server: Running) -> None:
    """A site that restarted mid-upload is not locked out by its own dead stream."""
    server.hub.layout = Layout((TensorSpec("w", (1 << 20,), torch.float32),))
    old = server.register()
    release = threading.Event()
    first = server.stub.PushResult.future(
        _stalled(_huge_first_frame(1 << 20), release), metadata=old, timeout=20)
    try:
        assert _eventually(lambda: server.thread.service._uploads)  # type: ignore[union-attr]
        new = server.register()
        ack = server.stub.PushResult(iter([_huge_first_frame(10)]), metadata=new, timeout=10)
        assert "in flight" not in ack.reason  # refused for its own content, not as a second
        with pytest.raises(grpc.RpcError) as err:
            first.result(timeout=0.9)  # cancelled now, before its idle timeout
        assert err.value.code() == grpc.StatusCode.CANCELLED
    finally:
        release.set()


def test_a_site_that_stops_reading_its_task_loses_the_stream(server: Running) -> None:
    metadata = server.register()
    # 32 MB of parameters: far more than the socket and HTTP/2 buffers hold
    server.hub.send("mallory", TaskEnvelope("t1", _task(torch.zeros(8 << 20))))
    calls = server.stub.PullTask(pb.PullRequest(wait_seconds=1), metadata=metadata, timeout=20)
    next(calls)  # the first frame, then never another
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        time.sleep(3)
        for _ in calls:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert "took no frame of its task" in err.value.details()  # the server's limit, not ours
    assert time.monotonic() - started < 10
    # the slot comes back when the server's handler unwinds, which may be just after the site
    # hears the abort (a full CI run read 31 once)
    deadline = time.monotonic() + 5
    while server.thread.service._sending._value != 32 and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    assert server.thread.service._sending._value == 32  # type: ignore[union-attr]  # slot back


# -- logs ---------------------------------------------------------------------------------------


def test_peer_text_escapes_control_characters_and_cuts_long_text() -> None:
    assert peer_text("1.0\n2025 consortium server: forged\x1b[2J") == (
        "1.0\\n2025 consortium server: forged\\x1b[2J")
    assert peer_text("a\u202eb\u2028c\td") == "a\\u202eb\\u2028c\\td"
    assert peer_text("x" * 1000, 10) == "xxxxxxxxxx...[990 more characters]"
    assert peer_text("plain-site.1") == "plain-site.1"


def test_a_forged_client_version_reaches_the_log_sanitised(
    server: Running, caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "9.9\nconsortium server: site 'a' accepted\x1b[2J\x1b[H" + "z" * 10_000
    with caplog.at_level(logging.WARNING, logger="consortium.server"):
        server.register(client_version=forged)
    (line,) = [r.getMessage() for r in caplog.records if "runs consortium" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line
    assert "9.9\\nconsortium server: site 'a' accepted\\x1b[2J" in line
    assert len(line) < 400  # 10,000 characters cut


def test_a_forged_site_name_is_refused_under_insecure(
    server: Running, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="consortium.server"):
        with pytest.raises(grpc.RpcError) as err:
            server.register("a\nconsortium server: all good\x1b[2J")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    messages = [r.getMessage() for r in caplog.records]
    assert any("claiming the site name" in m and "\\n" in m for m in messages)
    assert all("\n" not in m and "\x1b" not in m for m in messages)
    assert not server.entries("register")


def test_a_rejection_reason_is_sanitised_and_cut_in_the_audit_log(server: Running) -> None:
    metadata = server.register()
    forged = "t\n\x1b[31m" + "q" * 5000
    ack = server.stub.PushResult(iter([pb.Chunk(stream_id=forged, offset=0, total_size=1, data=b"x",
                                                last=True)]), metadata=metadata, timeout=10)
    assert not ack.accepted
    (entry,) = server.entries("rejected")
    assert "\x1b" not in entry["reason"] and "\n" not in entry["reason"]
    assert len(entry["reason"]) < 600


def test_a_thousand_garbage_uploads_cost_a_bounded_number_of_audit_entries(
    server: Running, caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = server.register()
    garbage = pb.Chunk(stream_id="g", offset=5, total_size=10, data=b"x")
    with caplog.at_level(logging.WARNING, logger="consortium.server"):
        for _ in range(1000):
            ack = server.stub.PushResult(iter([garbage]), metadata=metadata, timeout=10)
            assert not ack.accepted and "starts at offset 5" in ack.reason  # each refused
    assert server.hub.counts["mallory"]["rejected"] == 1000  # and counted
    per_window = server.hub.rejections.per_window
    assert len(server.entries("rejected")) == per_window
    assert len(server.hub.rejected) == per_window
    logged = [r for r in caplog.records if "rejected result" in r.getMessage()]
    assert len(logged) == per_window
    server.hub.flush_rejections(final=True)
    (suppressed,) = server.entries("suppressed")
    assert suppressed["site"] == "mallory" and suppressed["rejections"] == 1000 - per_window
    assert "starts at offset 5" in suppressed["sample"]


def test_the_rejection_limiter_opens_a_new_window_each_minute() -> None:
    now = [0.0]
    limiter = RejectionLimiter(per_window=2, window_s=60, clock=lambda: now[0])
    assert [limiter.admit("a", "r")[0] for _ in range(5)] == [True, True, False, False, False]
    assert limiter.admit("b", "r") == (True, None)  # per site
    now[0] = 61
    assert limiter.admit("a", "late") == (True, ("a", 3, "r"))
    assert limiter.flush(200) == []  # b suppressed nothing; a's new window nothing either


def test_a_malformed_call_is_one_warning_line_not_a_traceback(
    server: Running, caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = server.register()
    describe = server.channel.unary_unary(
        "/consortium.v1.Federation/Describe",
        request_serializer=lambda b: b, response_deserializer=pb.Ack.FromString,
    )
    with caplog.at_level(logging.WARNING):
        with pytest.raises(grpc.RpcError) as err:
            describe(b"\xff\xff\xff\xff", metadata=metadata, timeout=10)
        push = server.channel.stream_unary(
            "/consortium.v1.Federation/PushResult",
            request_serializer=lambda b: b, response_deserializer=pb.Ack.FromString,
        )
        ack = push(iter([b"\xff\xfe garbage"]), metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not ack.accepted and "not a consortium.v1.Chunk message" in ack.reason
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records]
    assert any("refused a malformed Describe call" in m and "SiteInfo" in m for m in lines)
    assert all("\n" not in m for m in lines)


# -- the site ------------------------------------------------------------------------------------


def test_the_site_refuses_a_task_larger_than_its_model_allows() -> None:
    from consortium.deploy.client import TASK_OVERHEAD_BYTES, task_limit
    from consortium.deploy.codec import decode_work, reassemble

    model = Layout((TensorSpec("w", (1 << 20,), torch.float32),))  # 4 MiB
    limit = task_limit(model)
    assert limit == 4 * (4 << 20) + TASK_OVERHEAD_BYTES  # not 4 GiB
    fits = encode_work(TaskEnvelope("t", _task(torch.zeros(1 << 20))))
    assert decode_work(bytes(reassemble(chunk(fits, "s"), max_total_bytes=limit))).task_id == "t"
    huge = pb.Chunk(stream_id="s", offset=0, total_size=limit + 1, data=b"x")
    with pytest.raises(DecodeError, match="above the limit"):
        reassemble([huge], max_total_bytes=limit)


def _task(values: torch.Tensor, name: str = "w") -> Any:
    from consortium.messages import Task
    from consortium.types import Parameters

    layout = Layout((TensorSpec(name, tuple(values.shape), torch.float32),))
    return Task(1, "a", Parameters(layout, values.flatten()), seed=0)


def test_a_failed_tls_handshake_leaves_a_line_in_the_servers_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """gRPC gives Python no hook into the handshake (an interceptor sees calls only after it),
    but its C core writes one line per failed handshake to the process's stderr, unless
    GRPC_VERBOSITY is ERROR or NONE. Played here by a TLS client without a certificate and a
    plain-text client; docs/deployment.md says where the peer's address comes from."""
    import os
    import socket
    import ssl

    from consortium.deploy.provision import provision

    if os.environ.get("GRPC_VERBOSITY", "").upper() in ("ERROR", "NONE"):
        pytest.skip("GRPC_VERBOSITY silences gRPC's handshake lines")
    provision(["a"], tmp_path / "certs")
    thread = _ServerThread("127.0.0.1:0", certs=tmp_path / "certs" / "server", hub_args={
        "config_toml": "", "run_id": "tls", "max_result_bytes": MAX_RESULT_BYTES,
    })
    thread.start()
    try:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", thread.port), timeout=5) as raw:
            try:
                with context.wrap_socket(raw) as tls:  # no client certificate
                    tls.sendall(b"x")
                    tls.recv(10)
            except (ssl.SSLError, OSError):
                pass
        with socket.create_connection(("127.0.0.1", thread.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS at all
            raw.recv(100)
        err = ""
        deadline = time.monotonic() + 5
        while err.count("Handshake failed") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
    finally:
        thread.stop()
    assert err.count("Handshake failed") == 2, err
    assert "Handshake failed" in err and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in err


def test_the_round_line_counts_every_rejection_and_prints_only_the_newest(
    server: Running, capsys: pytest.CaptureFixture[str],
) -> None:
    from consortium.deploy.server import _RoundReport

    report = _RoundReport(server.hub, rounds=3)
    for i in range(30):
        server.hub.reject("mallory", f"t{i}", 1, f"garbage {i}")
    report.on_round_end({"round": 1, "clients": 0}, None)
    err = capsys.readouterr().err
    assert "30 rejected" in err
    shown = [line for line in err.splitlines() if "garbage" in line]
    assert [line.rsplit(" ", 1)[1] for line in shown] == ["0", "1", "2", "3", "4", "5", "6", "7",
                                                         "8", "9"]  # the 10 written in full
    assert "... and 20 more rejections (audit.jsonl)" in err
    server.hub.reject("mallory", "t", 2, "more garbage")
    report.on_round_end({"round": 2, "clients": 0}, None)
    err = capsys.readouterr().err
    assert "1 rejected" in err and "more garbage" not in err  # counted, not printed (suppressed)


def test_the_stream_limits_are_checked_and_reach_the_server_command() -> None:
    from consortium.cli import _parser
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="--stream-idle-timeout 0"):
        StreamLimits(idle_timeout_s=0)
    with pytest.raises(ConfigError, match="--stream-min-rate -1"):
        StreamLimits(min_rate=-1)
    args = _parser().parse_args(["server", "--insecure", "--out", "r",
                                      "--stream-idle-timeout", "5", "--stream-min-rate", "0"])
    assert (args.stream_idle_timeout, args.stream_min_rate) == (5.0, 0.0)
    limits = StreamLimits(idle_timeout_s=10, min_rate=1000)
    assert limits.wait_s(started=0, moved=0, now=0) == 10  # idle timeout first
    assert limits.wait_s(started=0, moved=5000, now=12) == 3  # then 5,000 bytes buy 5 s

"""The deployment server's memory at many sites (issue 14): uploads read a bounded number at a
time, task frames cut from the round's one serialized model, the audit's norm without a float64
copy of each update. The figures are in benchmarks/RESULTS.md (benchmarks/deployment.py,
benchmarks/deployment/memory_probe.py); these tests pin the mechanisms.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

grpc = pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.deploy.audit import update_digest  # noqa: E402
from consortium.deploy.codec import (  # noqa: E402
    SESSION_METADATA_KEY,
    ParametersCache,
    TaskEnvelope,
    Wait,
    chunk,
    chunk_frames,
    decode_work,
    encode_work,
    encode_work_parts,
)
from consortium.deploy.proto import consortium_pb2 as pb  # noqa: E402
from consortium.deploy.proto import consortium_pb2_grpc as rpc  # noqa: E402
from consortium.deploy.server import MAX_RESULT_BYTES, StreamLimits, _ServerThread  # noqa: E402
from consortium.errors import ConfigError  # noqa: E402
from consortium.messages import Task  # noqa: E402
from consortium.types import Layout, Parameters, TensorSpec  # noqa: E402

# -- task frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [
    (b"",), (b"abc",), (b"", b"xyz", b""), (b"h" * 7, bytes(range(256)) * 40),
    (b"a", b"b", b"c", b"d" * 9), (bytes(5000),),
])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000, 1 << 20])
def test_frames_cut_across_parts_parse_to_the_frames_of_the_joined_payload(
    parts: tuple[bytes, ...], chunk_size: int,
) -> None:
    if chunk_size == 1 and sum(map(len, parts)) > 300:
        pytest.skip("one frame per byte: the small payloads say enough")
    frames = list(chunk_frames(parts, "stream-1", chunk_size=chunk_size))
    assert all(isinstance(f, bytes) for f in frames)
    assert [pb.Chunk.FromString(f) for f in frames] == list(
        chunk(b"".join(parts), "stream-1", chunk_size=chunk_size))


def test_chunk_frames_refuses_an_empty_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        list(chunk_frames((b"x",), "s", chunk_size=0))


def _task(site: str, params: Parameters, *, evaluate: bool = False) -> TaskEnvelope:
    return TaskEnvelope(uuid.uuid4().hex, Task(round=3, client_id=site, parameters=params, seed=7),
                        evaluate=evaluate)


@pytest.mark.parametrize("evaluate", [False, True])
def test_every_sites_task_carries_the_rounds_one_serialized_model(evaluate: bool) -> None:
    layout = Layout((TensorSpec("w", (300,), torch.float32), TensorSpec("b", (2,), torch.float32)))
    params = Parameters(layout, torch.randn(302))
    cache = ParametersCache()
    first, second = _task("north", params, evaluate=evaluate), _task("a-longer-name", params,
                                                                      evaluate=evaluate)
    parts_1 = encode_work_parts(first, cache=cache)
    parts_2 = encode_work_parts(second, cache=cache)
    assert parts_1[-1] is parts_2[-1]  # the model's bytes: one object for the round
    for item, parts in ((first, parts_1), (second, parts_2)):
        joined = b"".join(parts)
        assert joined == encode_work(item, cache=cache)
        assert pb.Work.FromString(joined) == pb.Work.FromString(encode_work(item))  # as uncached
        decoded = decode_work(joined, expected_layout=layout)
        assert isinstance(decoded, TaskEnvelope) and decoded.task_id == item.task_id
        assert torch.equal(decoded.task.parameters.vector, params.vector)
    assert encode_work_parts(Wait(1.0), cache=cache) == (encode_work(Wait(1.0)),)


# -- the audit's norm ----------------------------------------------------------------------------


def test_the_audit_norm_is_a_float64_norm_without_a_float64_copy_of_the_update() -> None:
    """A float64 copy of every 1 MB update (torch.linalg.vector_norm(x, dtype=float64) casts the
    whole input) left 0.5 MB of unusable heap behind each update a round held."""
    from torch.profiler import ProfilerActivity, profile

    values = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 1e-3  # 4 MB
    expected = float(torch.linalg.vector_norm(values.double()))
    digest, norm = update_digest(values)
    assert norm == pytest.approx(expected, rel=1e-12)  # float64 accumulation, not float32's
    assert (digest, norm) == update_digest(values.numpy())  # one computation for both
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        update_digest(values)
    allocated = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert allocated < values.nbytes // 8, f"torch allocated {allocated} bytes"
    tracemalloc.start()
    try:
        update_digest(values.numpy())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes // 8, f"numpy allocated {peak} bytes"
    assert np.isinf(update_digest(torch.tensor([1.0, float("inf")]))[1])


# -- uploads read at once ------------------------------------------------------------------------


class _Server:
    """A real grpc.aio server (``_ServerThread``) and raw stubs into it."""

    def __init__(self, limits: StreamLimits) -> None:
        self.thread = _ServerThread("127.0.0.1:0", certs=None, limits=limits, hub_args={
            "config_toml": "", "run_id": "memory", "max_result_bytes": MAX_RESULT_BYTES,
        })
        self.hub = self.thread.start()
        self.hub.layout = Layout((TensorSpec("w", (1 << 16,), torch.float32),))
        self.channels: list[Any] = []

    def site(self, name: str) -> tuple[Any, tuple[tuple[str, str], ...]]:
        """A stub on its own connection, registered as ``name``."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.thread.port}",
                                        options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        stub = rpc.FederationStub(channel)
        reply = stub.Register(pb.RegisterRequest(site=name), timeout=10)
        return stub, ((SESSION_METADATA_KEY, reply.session_id),)

    @property
    def service(self) -> Any:
        return self.thread.service

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.thread.stop()


def _trickle(until: threading.Event, every_s: float = 0.2) -> Iterator[pb.Chunk]:
    """An upload that moves a byte every ``every_s`` (never idle) until ``until``, then ends
    without its last frame."""
    sid = uuid.uuid4().hex
    for i in range(500):
        yield pb.Chunk(stream_id=sid, offset=i, total_size=1 << 20, data=b"z")
        if until.wait(every_s):
            return


def _eventually(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def test_at_most_k_uploads_are_read_at_once_and_waiting_is_not_idling(tmp_path: Path) -> None:
    server = _Server(StreamLimits(idle_timeout_s=1.0, min_rate=0, uploads_at_once=2))
    release = threading.Event()
    try:
        busy = []
        for name in ("a", "b"):  # two uploads that hold both places, moving a byte at a time
            stub, metadata = server.site(name)
            busy.append(stub.PushResult.future(_trickle(release), metadata=metadata, timeout=30))
        assert _eventually(lambda: server.service.reading == 2)
        stub, metadata = server.site("c")
        waiting = stub.PushResult.future(iter(list(chunk(b"not an upload", "c1"))),
                                         metadata=metadata, timeout=30)
        assert _eventually(lambda: "c" in server.service._uploads)  # arrived, and waits
        time.sleep(1.5)  # longer than the idle timeout: waiting for a place is not idling
        assert not waiting.done() and server.service.reading == 2
        release.set()  # the two end (without their last frame) and give their places up
        ack = waiting.result(timeout=10)
        assert not ack.accepted and "undecodable upload" in ack.reason  # read, not dropped
        for future in busy:
            assert "ended before its last chunk" in future.result(timeout=10).reason
        assert server.service.reading_peak == 2 and server.service.reading == 0
    finally:
        release.set()
        server.close()


def test_the_uploads_read_at_once_are_checked() -> None:
    with pytest.raises(ConfigError, match="uploads_at_once = 0"):
        StreamLimits(uploads_at_once=0)

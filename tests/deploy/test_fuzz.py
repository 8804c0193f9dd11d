"""Fuzzing the decoding path: whatever arrives, decoding raises DecodeError or nothing at all.

Every decode entry point (tensor, parameters, task, evaluation task, result, evaluation result,
exchange, work, upload, chunk reassembly) gets arbitrary bytes, structured messages with
arbitrary field values, and valid messages mutated at the byte level; decoded results also go
through validation, which may add RejectedResult. Any other exception is a bug.

The default suite runs a few thousand inputs; ``pytest -m slow tests/deploy/test_fuzz.py -s``
runs 1,000,000 (``CONSORTIUM_FUZZ_INPUTS``; seed from ``CONSORTIUM_FUZZ_SEED``, default 0) and prints the count
and time.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("google.protobuf")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.deploy import codec
from consortium.deploy.codec import (
    DTYPES,
    DecodeError,
    EvaluationEnvelope,
    ExchangeEnvelope,
    Finished,
    Reassembler,
    ResultEnvelope,
    TaskEnvelope,
    Wait,
)
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.validate import (
    ExpectedTask,
    RejectedResult,
    validate_evaluation,
    validate_result,
)
from consortium.messages import EvaluationResult, Result, Task
from consortium.types import Layout, Parameters, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (3, 2), torch.float32), TensorSpec("b", (2,), torch.float32)))
PARAMS = Parameters(LAYOUT, torch.linspace(-1, 1, 8))
EXPECTED = ExpectedTask(site="site-a", round=4, task_id="t4", extras={"dc": (8,)})
MAX_STREAM = 1 << 16
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _validated(data: bytes) -> object:
    envelope = codec.decode_upload(data)
    if isinstance(envelope, ResultEnvelope):
        validate_result(
            envelope, expected=EXPECTED, layout=LAYOUT, max_bytes=1 << 20, seen_task_ids=set()
        )
    else:
        validate_evaluation(envelope, expected=EXPECTED, max_bytes=1 << 20, seen_task_ids=set())
    return envelope


def frame_stream(frames: list[bytes]) -> bytes:
    """Frames as one byte string, each behind a 2-byte length, so that bytes can be fuzzed."""
    return b"".join(len(f).to_bytes(2, "little") + f for f in frames)


def _frames_of(data: bytes) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 2], "little")
        yield data[i + 2 : i + 2 + n]
        i += 2 + n


def _stream(data: bytes) -> object:
    """Feed the frames in ``data`` to one reassembler, and decode the payload as ``Work``."""
    assembler = Reassembler(MAX_STREAM)
    payload = None
    for frame in _frames_of(data):
        payload = assembler.feed(frame)
    return None if payload is None else codec.decode_work(payload)


ENTRY_POINTS: dict[str, Callable[[bytes], object]] = {
    "tensor": codec.decode_tensor,
    "parameters": lambda data: codec.decode_parameters(data, expected_layout=None),
    "task": codec.decode_task,
    "evaluation_task": codec.decode_evaluation_task,
    "result": codec.decode_result,
    "evaluation_result": codec.decode_evaluation_result,
    "exchange": codec.decode_exchange,
    "work": codec.decode_work,
    "upload": codec.decode_upload,
    "validated_upload": _validated,
    "chunk_stream": _stream,
}
ALLOWED: dict[str, tuple[type[Exception], ...]] = {
    name: (DecodeError, RejectedResult) if name == "validated_upload" else (DecodeError,)
    for name in ENTRY_POINTS
}


def _secagg_messages() -> list[object]:
    try:
        from consortium.secagg.protocol import (
            AdvertiseKeys,
            EncryptedShares,
            KeysBroadcast,
            MaskedInput,
            SecAggConfig,
            SharesForClient,
            UnmaskRequest,
            UnmaskResponse,
        )
        from consortium.secagg.shamir import Share
    except ImportError:
        return []
    key = bytes(range(32))
    return [
        SecAggConfig(num_clients_expected=3, threshold=2, neighbours=2, round=4, context=b"run"),
        AdvertiseKeys("site-a", key, key[::-1]),
        KeysBroadcast(
            4,
            b"\x07" * 32,
            ("site-a", "site-b", "site-c"),
            {"site-b": (key, key), "site-c": (key[::-1], key)},
        ),
        EncryptedShares("site-a", {"site-b": b"\x01" * 60, "site-c": b"\x02" * 60}),
        SharesForClient("site-a", {"site-b": b"\x03" * 60}),
        MaskedInput("site-a", torch.arange(6, dtype=torch.int64)),
        UnmaskRequest(("site-a", "site-b"), ("site-c",)),
        UnmaskResponse("site-a", {"site-b": Share(1, 2**500 + 7)}, {"site-c": Share(2, 99)}),
    ]


def _corpus() -> dict[str, list[bytes]]:
    """Valid serialized messages for each entry point: the seeds of the mutations."""
    tensors = [
        codec.encode_tensor(f"t-{n}", (torch.arange(6) % 2).to(d).reshape(2, 3))
        for n, d in DTYPES.items()
    ]
    task = Task(
        round=4,
        client_id="site-a",
        parameters=PARAMS,
        seed=99,
        payload={"c": torch.ones(8)},
        stage_payloads=({"max_norm": 1.0, "n": 3, "on": True, "s": "x"}, {"t": torch.ones(2)}),
        work=0.5,
        cohort_size=3,
    )
    update = Update("site-a", torch.linspace(0, 1, 8), 10.0, {"loss": 0.1}, {"dc": torch.zeros(8)})
    results = [Result(4, "site-a", update), Result(4, "site-a", None, error="x", refused=True)]
    evaluation = EvaluationResult(4, "site-a", 30, {"accuracy": 0.5})
    exchanges = [
        ExchangeEnvelope("secure_aggregation", "keys", 4, "site-a", m) for m in _secagg_messages()
    ]
    exchanges += [
        ExchangeEnvelope("secure_aggregation", "end", 4, "site-a"),
        ExchangeEnvelope("secure_aggregation", "keys", 4, "site-a", error="refused"),
    ]
    uploads = [codec.encode_upload(ResultEnvelope("t4", r)) for r in results]
    uploads.append(codec.encode_upload(EvaluationEnvelope("t4", evaluation)))
    work = [
        codec.encode_work(TaskEnvelope("t4", task)),
        codec.encode_work(TaskEnvelope("t4", task, evaluate=True)),
        codec.encode_work(Wait(1.0)),
        codec.encode_work(Finished("done")),
    ]
    work += [codec.encode_work(e) for e in exchanges]
    return {
        "tensor": [t.SerializeToString() for t in tensors],
        "parameters": [codec.encode_parameters(PARAMS).SerializeToString()],
        "task": [codec.encode_task(task, task_id="t4").SerializeToString()],
        "evaluation_task": [codec.encode_evaluation_task(task, task_id="t4").SerializeToString()],
        "result": [codec.encode_result(r, task_id="t4").SerializeToString() for r in results],
        "evaluation_result": [
            codec.encode_evaluation_result(evaluation, task_id="t4").SerializeToString()
        ],
        "exchange": [codec.encode_exchange(e).SerializeToString() for e in exchanges],
        "work": work,
        "upload": uploads,
        "validated_upload": uploads,
        "chunk_stream": [
            frame_stream([f.SerializeToString() for f in codec.chunk(w, "s", chunk_size=size)])
            for w, size in ((work[2], 4), (work[0], 128), (work[-3], 64))
        ],
    }


CORPUS = _corpus()
ALL_SEEDS = [data for seeds in CORPUS.values() for data in seeds]
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Byte-level edits, mostly one: flips, interesting bytes, inserts, deletions, splices."""
    out = bytearray(data)
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4)):
        op = rng.choices(range(8), weights=[4, 4, 1, 1, 1, 1, 1, 1])[0]
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[pos % len(out)] = rng.choice(INTERESTING)
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            del out[pos : pos + rng.randint(1, 32)]
        elif op == 4:
            del out[pos:]
        elif op == 5 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 64)]
        elif op == 6:
            other = rng.choice(ALL_SEEDS)
            start = rng.randrange(len(other) + 1)
            out[pos:] = other[start : start + rng.randint(1, 256)]
        else:  # a huge or negative varint where a length or number may be
            out[pos:pos] = rng.choice(
                [b"\xff" * 9 + b"\x01", b"\x80" * 9 + b"\x01", b"\xff\xff\x03"]
            )
    return bytes(out)


# Field values that hit the decoders' checks: edges of every range, names that are not ids.
TEXTS = ["", "x" * 1100, "site-a", "site-b", "t4", "float32", "int64", "bool", "complex64", "\x00"]
INTS = [0, 1, 2, 7, 32, 33, -1, 2**31 - 1, 2**32 - 1, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]
FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e308, math.nan, math.inf, -math.inf]


def _repeated(fd: Any) -> bool:
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _value(fd: Any, rng: random.Random) -> object:
    if fd.cpp_type == fd.CPPTYPE_STRING:
        return (
            rng.choice(TEXTS)
            if fd.type == fd.TYPE_STRING
            else rng.randbytes(rng.choice([0, 1, 31, 32, 33, 66, 67, 70]))
        )
    if fd.cpp_type == fd.CPPTYPE_DOUBLE:
        return rng.choice(FLOATS)
    if fd.cpp_type == fd.CPPTYPE_BOOL:
        return rng.random() < 0.5
    return rng.choice(INTS)


def _slots(msg: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (message, field) pair reachable in ``msg``, set or not."""
    for fd in msg.DESCRIPTOR.fields:
        out.append((msg, fd))
        if fd.cpp_type != fd.CPPTYPE_MESSAGE:
            continue
        value = getattr(msg, fd.name)
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].cpp_type == fd.CPPTYPE_MESSAGE:
                for key in list(value):
                    _slots(value[key], out)
        elif _repeated(fd):
            for item in value:
                _slots(item, out)
        elif msg.HasField(fd.name):
            _slots(value, out)
    return out


def _mutate_field(msg: Any, fd: Any, rng: random.Random) -> None:
    value = getattr(msg, fd.name)
    if fd.cpp_type == fd.CPPTYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        keys = list(value)
        if keys and rng.random() < 0.5:
            del value[rng.choice(keys)]
            return
        key = rng.choice(TEXTS)
        value_fd = fd.message_type.fields_by_name["value"]
        if value_fd.cpp_type == fd.CPPTYPE_MESSAGE:
            if keys:
                value[key].CopyFrom(value[rng.choice(keys)])
            else:
                value[key].SetInParent()
        else:
            value[key] = _value(value_fd, rng)
    elif _repeated(fd):
        if len(value) and rng.random() < 0.5:
            del value[rng.randrange(len(value))]
        elif fd.cpp_type == fd.CPPTYPE_MESSAGE:
            if len(value):
                value.add().CopyFrom(value[rng.randrange(len(value))])
            else:
                value.add()
        else:
            value.append(_value(fd, rng))
    elif fd.cpp_type == fd.CPPTYPE_MESSAGE:
        if msg.HasField(fd.name) and rng.random() < 0.5:
            msg.ClearField(fd.name)
        else:
            value.SetInParent()
    else:
        setattr(msg, fd.name, _value(fd, rng))


MESSAGE_OF: dict[str, Any] = {
    "tensor": pb.Tensor,
    "parameters": pb.Parameters,
    "task": pb.Task,
    "evaluation_task": pb.EvaluationTask,
    "result": pb.Result,
    "evaluation_result": pb.EvaluationResult,
    "exchange": pb.Exchange,
    "work": pb.Work,
    "upload": pb.Upload,
    "validated_upload": pb.Upload,
}


def mutate_fields(name: str, data: bytes, rng: random.Random) -> bytes:
    """Field-level edits of a valid message: edge values, dropped and repeated entries."""
    if name == "chunk_stream":
        frames = [pb.Chunk.FromString(f) for f in _frames_of(data)]
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            i = rng.randrange(len(frames))
            if op == 0 and len(frames) > 1:
                del frames[i]
            elif op == 1:
                frames.insert(i, frames[rng.randrange(len(frames))])
            elif op == 2:
                j = rng.randrange(len(frames))
                frames[i], frames[j] = frames[j], frames[i]
            else:
                f = pb.Chunk()
                f.CopyFrom(frames[i])
                try:
                    _mutate_field(f, rng.choice(list(f.DESCRIPTOR.fields)), rng)
                except ValueError:  # a value the field's type cannot hold
                    pass
                frames[i] = f
        return frame_stream([f.SerializeToString() for f in frames])
    msg = MESSAGE_OF[name].FromString(data)
    for _ in range(rng.randint(1, 3)):
        target, fd = rng.choice(_slots(msg, []))
        try:
            _mutate_field(target, fd, rng)
        except (ValueError, TypeError):  # a value the field's type cannot hold
            pass
    return msg.SerializeToString()


OUTCOMES = ("decoded", "refused", "incomplete")


def _run(name: str, data: bytes, *, seed: object = "-") -> str:
    """Decode ``data``: ``"decoded"`` (a value came back), ``"refused"`` (one of the entry
    point's documented errors) or, for a chunk stream only, ``"incomplete"`` (no last frame
    yet). Any other exception — a crash — fails the test with the input in hex, and so does
    any other entry point returning nothing."""
    try:
        value = ENTRY_POINTS[name](data)
    except ALLOWED[name]:
        return "refused"
    except Exception as exc:  # a crash: show what reproduces it
        raise AssertionError(
            f"{name} raised {type(exc).__name__}: {exc}\nseed {seed}, input: {data.hex()}"
        ) from exc
    if value is None:
        assert name == "chunk_stream", f"{name} returned None for input {data.hex()}"
        return "incomplete"
    return "decoded"


# ------------------------------------------------------------------------- the default suite


def test_corpus_is_valid_and_covers_every_entry_point() -> None:
    for name in ENTRY_POINTS:
        assert CORPUS[name], name
        for data in CORPUS[name]:
            assert ENTRY_POINTS[name](data) is not None  # valid: decoded, no exception
    assert len(CORPUS["exchange"]) == 10 or not _secagg_messages()


@settings(FUZZ, max_examples=800)
@given(name=st.sampled_from(sorted(ENTRY_POINTS)), data=st.binary(max_size=600))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    assert _run(name, data) in OUTCOMES


@settings(FUZZ, max_examples=1200)
@given(name=st.sampled_from(sorted(ENTRY_POINTS)), seed=st.integers(0, 2**32 - 1))
def test_mutated_messages(name: str, seed: int) -> None:
    rng = random.Random(seed)
    assert _run(name, mutate(rng.choice(CORPUS[name]), rng)) in OUTCOMES


@settings(FUZZ, max_examples=1200)
@given(name=st.sampled_from(sorted(ENTRY_POINTS)), seed=st.integers(0, 2**32 - 1))
def test_mutated_fields(name: str, seed: int) -> None:
    rng = random.Random(seed)
    assert _run(name, mutate_fields(name, rng.choice(CORPUS[name]), rng)) in OUTCOMES


_dims = st.one_of(st.integers(0, 6), st.integers(-(2**63), 2**63 - 1))


@settings(FUZZ, max_examples=600)
@given(
    dtype=st.sampled_from([*DTYPES, "complex64", "int8", "", "float32\x00", "FLOAT32"]),
    shape=st.lists(_dims, max_size=40),
    data=st.binary(max_size=96),
)
def test_structured_tensors(dtype: str, shape: list[int], data: bytes) -> None:
    msg = pb.Tensor(name="t", dtype=dtype, shape=shape, data=data)
    try:
        _, tensor = codec.decode_tensor(msg.SerializeToString())
    except DecodeError:
        return
    assert tensor.dtype == DTYPES[dtype] and list(tensor.shape) == shape
    assert tensor.numel() * tensor.element_size() == len(data)


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(FUZZ, max_examples=400)
@given(
    client=st.sampled_from(["site-a", "site-b", ""]),
    round=st.sampled_from([3, 4, 2**64 - 1]),
    task_id=st.sampled_from(["t4", "t3", ""]),
    dtype=st.sampled_from(list(DTYPES)),
    values=st.lists(_floats, max_size=10),
    extras=st.dictionaries(st.sampled_from(["dc", "x"]), st.lists(_floats, max_size=9), max_size=2),
    weight=st.floats(allow_nan=True, allow_infinity=True),
    metrics=st.dictionaries(
        st.text(max_size=4), st.floats(allow_nan=True, allow_infinity=True), max_size=3
    ),
    error=st.one_of(st.none(), st.text(max_size=10)),
    refused=st.booleans(),
    has_update=st.booleans(),
)
def test_structured_results_are_decoded_then_accepted_or_rejected(
    client: str,
    round: int,
    task_id: str,
    dtype: str,
    values: list[float],
    extras: dict[str, list[float]],
    weight: float,
    metrics: dict[str, float],
    error: str | None,
    refused: bool,
    has_update: bool,
) -> None:
    msg = pb.Upload()
    r = msg.result
    r.round, r.client_id, r.task_id, r.refused = round, client, task_id, refused
    if error is not None:
        r.error = error
    if has_update:
        delta = torch.tensor(values, dtype=torch.float64).to(DTYPES[dtype])
        r.update.delta.CopyFrom(codec.encode_tensor("delta", delta))
        r.update.weight = weight
        r.update.metrics.update(metrics)
        for name, v in extras.items():
            r.update.extras.add().CopyFrom(codec.encode_tensor(name, torch.tensor(v)))
    data = msg.SerializeToString()
    try:
        envelope = _validated(data)
    except (DecodeError, RejectedResult):
        return
    # Accepted: then it really is a clean answer to the expected task.
    assert isinstance(envelope, ResultEnvelope)
    result = envelope.result
    assert (result.client_id, result.round, envelope.task_id) == ("site-a", 4, "t4")
    if result.update is not None:
        u = result.update
        assert u.delta.dtype == torch.float32 and u.delta.numel() == LAYOUT.size
        assert bool(torch.isfinite(u.delta).all()) and math.isfinite(u.weight) and u.weight >= 0
        assert set(u.extras) == {"dc"} and all(math.isfinite(v) for v in u.metrics.values())


@settings(FUZZ, max_examples=600)
@given(
    payload=st.binary(max_size=300),
    chunk_size=st.integers(1, 80),
    limit=st.integers(0, 400),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10),
            st.sampled_from(
                ["drop", "repeat", "swap", "offset", "total", "last", "stream", "data"]
            ),
            st.integers(0, 2**64 - 1),
        ),
        max_size=3,
    ),
)
def test_chunk_streams(
    payload: bytes, chunk_size: int, limit: int, edits: list[tuple[int, str, int]]
) -> None:
    frames = list(codec.chunk(payload, "s", chunk_size=chunk_size))
    for index, kind, value in edits:
        i = index % len(frames)
        if kind == "drop" and len(frames) > 1:
            del frames[i]
        elif kind == "repeat":
            frames.insert(i, frames[i])
        elif kind == "swap":
            j = value % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
        else:
            f = pb.Chunk.FromString(frames[i].SerializeToString())
            if kind == "offset":
                f.offset = value
            elif kind == "total":
                f.total_size = value
            elif kind == "last":
                f.last = not f.last
            elif kind == "stream":
                f.stream_id = "t"
            else:
                f.data = f.data + bytes([value % 256])
            frames[i] = f
    try:
        got = codec.reassemble(frames, max_total_bytes=limit)
    except DecodeError:
        assert not (
            not edits and len(payload) <= limit
        )  # an untouched stream within the limit passes
        return
    assert len(got) == frames[0].total_size <= limit
    if not edits:
        assert got == payload


# ---------------------------------------------------------------------------- the long run


def _inputs(rng: random.Random, count: int) -> Iterator[tuple[str, bytes]]:
    names = sorted(ENTRY_POINTS)
    for i in range(count):
        name = names[i % len(names)]
        kind = rng.random()
        if kind < 0.15:
            yield name, rng.randbytes(rng.randint(0, 400))
        elif kind < 0.55:
            yield name, mutate_fields(name, rng.choice(CORPUS[name]), rng)
        else:
            seeds = CORPUS[name] if rng.random() < 0.8 else ALL_SEEDS
            yield name, mutate(rng.choice(seeds), rng)


@pytest.mark.slow
def test_fuzz_100k_inputs() -> None:
    seed = int(os.environ.get("CONSORTIUM_FUZZ_SEED", "0"))
    count = int(os.environ.get("CONSORTIUM_FUZZ_INPUTS", "1000000"))
    rng = random.Random(seed)
    start = time.perf_counter()
    outcomes = dict.fromkeys(OUTCOMES, 0)
    for name, data in _inputs(rng, count):
        outcomes[_run(name, data, seed=seed)] += 1
    elapsed = time.perf_counter() - start
    print(
        f"\nfuzzed {count} inputs over {len(ENTRY_POINTS)} entry points in {elapsed:.1f} s "
        f"(seed {seed}; {outcomes})"
    )
    assert count >= 100_000 and sum(outcomes.values()) == count
    assert outcomes["decoded"] and outcomes["refused"]  # the inputs reach both sides

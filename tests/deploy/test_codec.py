"""The wire codec: tensors, parameters, tasks, results, exchanges and chunked streams."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("google.protobuf")

from consortium.deploy import codec
from consortium.deploy.codec import (
    DTYPES,
    DecodeError,
    EncodeError,
    EvaluationEnvelope,
    ExchangeEnvelope,
    Finished,
    Reassembler,
    ResultEnvelope,
    TaskEnvelope,
    Wait,
    chunk,
    decode_exchange,
    decode_parameters,
    decode_result,
    decode_task,
    decode_tensor,
    decode_upload,
    decode_work,
    encode_evaluation_result,
    encode_exchange,
    encode_parameters,
    encode_result,
    encode_task,
    encode_tensor,
    encode_upload,
    encode_work,
    reassemble,
)
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.errors import ConsortiumError
from consortium.messages import EvaluationResult, Result, Task
from consortium.types import Layout, Parameters, TensorSpec, Update

ROOT = Path(__file__).resolve().parents[2]


def _params(sizes: dict[str, tuple[int, ...]] | None = None, *, seed: int = 0) -> Parameters:
    sizes = sizes or {"w": (3, 2), "b": (2,)}
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) for n, s in sizes.items()}
    layout = Layout.of(tensors)
    return Parameters(layout, layout.flatten(tensors))


def _task(**changes: Any) -> Task:
    fields: dict[str, Any] = dict(
        round=3,
        client_id="site-a",
        parameters=_params(),
        seed=2**63 - 1,
        payload={"c": torch.arange(8, dtype=torch.float32)},
        stage_payloads=(
            {"max_norm": 1.5},
            {},
            {"n": -7, "on": True, "mode": "x", "t": torch.ones(2)},
        ),
        work=0.25,
        cohort_size=4,
    )
    fields.update(changes)
    return Task(**fields)


def _update(d: int = 8) -> Update:
    return Update(
        "site-a",
        torch.linspace(-1, 1, d),
        12.0,
        {"train_loss": 0.5, "steps": 3.0},
        {"dc": torch.full((d,), 0.25)},
    )


def _assert_tasks_equal(a: Task, b: Task) -> None:
    assert (a.round, a.client_id, a.seed, a.work, a.cohort_size) == (
        b.round,
        b.client_id,
        b.seed,
        b.work,
        b.cohort_size,
    )
    assert a.parameters.layout == b.parameters.layout
    assert torch.equal(a.parameters.vector, b.parameters.vector)
    assert a.payload.keys() == b.payload.keys()
    assert all(torch.equal(a.payload[k], b.payload[k]) for k in a.payload)
    assert len(a.stage_payloads) == len(b.stage_payloads)
    for pa, pb_ in zip(a.stage_payloads, b.stage_payloads):
        assert pa.keys() == pb_.keys()
        for k in pa:
            if isinstance(pa[k], torch.Tensor):
                assert torch.equal(pa[k], pb_[k])
            else:
                assert pa[k] == pb_[k] and type(pa[k]) is type(pb_[k])


def _assert_updates_equal(a: Update, b: Update) -> None:
    assert (a.client_id, a.weight, a.metrics) == (b.client_id, b.weight, b.metrics)
    assert torch.equal(a.delta, b.delta) and a.delta.dtype == b.delta.dtype
    assert a.extras.keys() == b.extras.keys()
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


# ------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (3, 0, 2)])
def test_tensor_round_trips_every_dtype_and_shape(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    name, y = decode_tensor(encode_tensor("x", x).SerializeToString())
    assert name == "x" and y.dtype == dtype and tuple(y.shape) == shape
    assert torch.equal(x, y)


def test_tensor_bytes_are_little_endian_and_row_major() -> None:
    x = torch.tensor([[1, 2], [3, 256]], dtype=torch.int32)
    msg = encode_tensor("x", x.t())  # a non-contiguous view is sent in its logical order
    assert list(msg.shape) == [2, 2] and msg.dtype == "int32"
    assert msg.data == b"".join(v.to_bytes(4, "little") for v in (1, 3, 2, 256))


def test_decoded_tensor_owns_writable_memory() -> None:
    msg = encode_tensor("x", torch.zeros(4))
    _, y = decode_tensor(msg)
    y += 1  # no warning about a read-only buffer, no effect on the message
    assert decode_tensor(msg)[1].sum() == 0


def test_big_endian_hosts_swap_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be a big-endian host: the wire stays little-endian, so the bytes must flip.
    x = torch.tensor([1.5, -2.0], dtype=torch.float32)
    native = encode_tensor("x", x).data
    monkeypatch.setattr(codec, "_LITTLE_ENDIAN", False)
    swapped = encode_tensor("x", x).data
    assert swapped == b"".join(native[i : i + 4][::-1] for i in (0, 4))
    assert torch.equal(decode_tensor(encode_tensor("x", x))[1], x)


def _raw_tensor(
    dtype: str = "float32", shape: tuple[int, ...] = (2,), data: bytes = b"\0" * 8
) -> bytes:
    return pb.Tensor(name="t", dtype=dtype, shape=shape, data=data).SerializeToString()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_raw_tensor(dtype="complex64"), "dtype 'complex64' is not accepted"),
        (_raw_tensor(dtype="object"), "not accepted"),
        (_raw_tensor(shape=(-1, -2)), "negative dimension"),
        (_raw_tensor(shape=(1,) * 33, data=b"\0" * 4), "33 dimensions"),
        (_raw_tensor(data=b"\0" * 7), "needs 8 bytes, found 7"),
        (_raw_tensor(shape=(2**40,)), "needs 4398046511104 bytes, found 8"),
        (_raw_tensor(shape=(0, 2**62, 2**62), data=b""), "too large"),
        (_raw_tensor(shape=(2**31, 2**31, 2**31)), "too large"),
        (_raw_tensor(dtype="bool", shape=(2,), data=b"\x01\x02"), "other than 0 and 1"),
        (b"\xff\xff\xff", "not a valid consortium.v1.Tensor"),
    ],
)
def test_malformed_tensors_are_refused_before_allocation(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(match)):
        decode_tensor(raw)


def test_unsupported_dtype_cannot_be_sent() -> None:
    with pytest.raises(EncodeError, match="complex64"):
        encode_tensor("z", torch.zeros(2, dtype=torch.complex64))


def test_codec_errors_belong_to_the_exception_tree() -> None:
    assert issubclass(DecodeError, ConsortiumError) and issubclass(DecodeError, ValueError)
    assert issubclass(EncodeError, ConsortiumError)


# ---------------------------------------------------------------------------------- parameters


def test_parameters_round_trip_with_their_layout() -> None:
    params = _params({"conv.weight": (4, 3, 2, 2), "conv.bias": (4,), "fc": (10, 4)})
    back = decode_parameters(
        encode_parameters(params).SerializeToString(), expected_layout=params.layout
    )
    assert back.layout == params.layout and torch.equal(back.vector, params.vector)


def test_parameters_refuse_another_layout() -> None:
    sent = _params({"w": (3, 2), "b": (2,)})
    mine = _params({"w": (2, 3), "b": (2,)}).layout
    with pytest.raises(
        DecodeError, match=r"tensor 0 of the model is 'w' \[3, 2\].*expected 'w' \[2, 3\]"
    ):
        decode_parameters(encode_parameters(sent), expected_layout=mine)
    fewer = Layout(sent.layout.specs[:1])
    with pytest.raises(DecodeError, match="the model has 2 tensors, expected 1"):
        decode_parameters(encode_parameters(sent), expected_layout=fewer)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m.ClearField("vector"), "vector is missing"),
        (lambda m: m.vector.shape.__setitem__(0, 7), "needs 28 bytes"),
        (lambda m: m.layout.add(name="w", dtype="float32", shape=[1]), "'w' appears twice"),
        (
            lambda m: m.layout.add(name="extra", dtype="float32", shape=[1]),
            "flat float32 vector of 9",
        ),
        (lambda m: setattr(m.layout[0], "dtype", "str"), "has dtype 'str'"),
        (lambda m: m.layout[0].shape.append(-3), "negative dimension"),
    ],
)
def test_malformed_parameters_are_refused(mutate: Callable[[Any], None], match: str) -> None:
    msg = encode_parameters(_params())
    mutate(msg)
    with pytest.raises(DecodeError, match=match):
        decode_parameters(msg.SerializeToString())


def test_parameters_that_are_not_a_flat_float32_vector_cannot_be_sent() -> None:
    params = _params()
    with pytest.raises(EncodeError, match="flat float32 vector of 8"):
        encode_parameters(params.replace(params.vector.double()))
    odd = Layout((TensorSpec("z", (2,), torch.complex64),))
    with pytest.raises(EncodeError, match="complex64"):
        encode_parameters(Parameters(odd, torch.zeros(2)))


# --------------------------------------------------------------------------------------- tasks


def test_task_round_trips_through_work_chunks_and_reassembly() -> None:
    task = _task()
    frames = list(chunk(encode_work(TaskEnvelope("r3-site-a", task)), "r3-site-a", chunk_size=64))
    assert len(frames) > 3 and frames[-1].last and not any(f.last for f in frames[:-1])
    got = decode_work(
        reassemble(frames, max_total_bytes=1 << 20), expected_layout=task.parameters.layout
    )
    assert isinstance(got, TaskEnvelope) and got.task_id == "r3-site-a" and not got.evaluate
    _assert_tasks_equal(got.task, task)


def test_evaluation_task_round_trips_without_payloads() -> None:
    task = _task(payload={}, stage_payloads=(), work=1.0, cohort_size=0)
    got = decode_work(encode_work(TaskEnvelope("e3", task, evaluate=True)))
    assert isinstance(got, TaskEnvelope) and got.evaluate
    _assert_tasks_equal(got.task, task)


def test_stage_payload_values_that_are_not_data_cannot_be_sent() -> None:
    with pytest.raises(EncodeError, match="a list cannot be sent"):
        encode_task(_task(stage_payloads=({"norms": [1.0, 2.0]},)), task_id="t")
    with pytest.raises(EncodeError, match="does not fit in 64 bits"):
        encode_task(_task(stage_payloads=({"big": 2**64},)), task_id="t")
    with pytest.raises(EncodeError, match="task cannot be encoded"):
        encode_task(_task(round=-1), task_id="t")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: setattr(m, "work", float("nan")), "not a fraction"),
        (lambda m: setattr(m, "work", 1.5), "not a fraction"),
        (lambda m: setattr(m, "task_id", ""), "task id is empty"),
        (lambda m: setattr(m, "client_id", "x" * 2000), "longer than 1024"),
        (lambda m: m.ClearField("parameters"), "parameters are missing"),
        (lambda m: m.payload.add().CopyFrom(m.payload[0]), "'c' appears twice"),
        (lambda m: m.stage_payloads[0].values["max_norm"].Clear(), "value 'max_norm' is empty"),
        (
            lambda m: m.stage_payloads[2].values["t"].CopyFrom(pb.Scalar(flag=True)),
            "both a value and a tensor",
        ),
    ],
)
def test_malformed_tasks_are_refused(mutate: Callable[[Any], None], match: str) -> None:
    msg = encode_task(_task(), task_id="t")
    mutate(msg)
    with pytest.raises(DecodeError, match=match):
        decode_task(msg.SerializeToString())


def test_empty_work_is_refused_and_wait_and_finished_round_trip() -> None:
    with pytest.raises(DecodeError, match="the message is empty"):
        decode_work(b"")
    assert decode_work(encode_work(Wait(2.5))) == Wait(2.5)
    assert decode_work(encode_work(Finished("run complete"))) == Finished("run complete")
    with pytest.raises(DecodeError, match="not a number of seconds"):
        decode_work(encode_work(Wait(-1.0)))


# ------------------------------------------------------------------------------------- results


def test_result_with_an_update_round_trips_with_its_wire_size() -> None:
    result = Result(3, "site-a", _update())
    data = encode_upload(ResultEnvelope("t7", result))
    got = decode_upload(data)
    assert isinstance(got, ResultEnvelope) and got.task_id == "t7" and got.nbytes == len(data)
    assert (got.result.round, got.result.client_id, got.result.error, got.result.refused) == (
        3,
        "site-a",
        None,
        False,
    )
    assert got.result.update is not None
    assert result.update is not None
    _assert_updates_equal(got.result.update, result.update)


@pytest.mark.parametrize(
    "result",
    [
        Result(3, "site-a", None, error="out of memory"),
        Result(3, "site-a", None, error="cohort too small", refused=True),
        Result(3, "site-a", None, error=""),
    ],
)
def test_results_without_update_round_trip(result: Result) -> None:
    msg = encode_result(result, task_id="t")
    got = decode_result(msg)
    assert got.result == result and got.nbytes == msg.ByteSize()


def test_result_whose_update_names_another_client_cannot_be_sent() -> None:
    update = _update()
    update.client_id = "site-b"
    with pytest.raises(EncodeError, match="differs from the result's"):
        encode_result(Result(3, "site-a", update), task_id="t")


def test_result_update_without_delta_is_refused() -> None:
    msg = encode_result(Result(3, "site-a", _update()), task_id="t")
    msg.update.ClearField("delta")
    with pytest.raises(DecodeError, match="the update has no delta"):
        decode_result(msg.SerializeToString())


def test_evaluation_result_round_trips() -> None:
    ev = EvaluationResult(3, "site-a", 120, {"accuracy": 0.75, "loss": 0.5})
    got = decode_upload(encode_upload(EvaluationEnvelope("e3", ev)))
    assert isinstance(got, EvaluationEnvelope) and got.result == ev and got.task_id == "e3"
    assert codec.decode_evaluation_result(encode_evaluation_result(ev, task_id="e3")).result == ev


def test_empty_upload_is_refused() -> None:
    with pytest.raises(DecodeError, match="expected a result or an evaluation"):
        decode_upload(b"")


# ------------------------------------------------------------------------------------ exchange


def _secagg_messages() -> list[object]:
    """One message of every SecAgg+ type, from a real three-client round."""
    pytest.importorskip("cryptography")
    from consortium.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer

    cfg = SecAggConfig(num_clients_expected=3, threshold=2, neighbours=2, round=3, context=b"run")
    server = SecAggServer(config=cfg, graph_seed=b"\x01" * 32)
    clients = {c: SecAggClient(c, config=cfg) for c in ("a", "b", "c")}
    adverts = [clients[c].advertise_keys() for c in sorted(clients)]
    broadcasts = server.collect_keys(adverts)
    shares = [clients[c].share_keys(broadcasts[c]) for c in sorted(clients)]
    routed = server.route_shares(shares)
    masked = [clients[c].masked_input(routed[c], torch.arange(4) + i) for i, c in enumerate("abc")]
    request = server.collect_masked(masked)
    response = clients["a"].unmask(request)
    return [cfg, adverts[0], broadcasts["a"], shares[0], routed["a"], masked[0], request, response]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if hasattr(a, "vector"):  # MaskedInput holds a tensor
        return bool(a.client_id == b.client_id and torch.equal(a.vector, b.vector))
    return a == b


def test_every_secagg_message_round_trips_in_an_exchange() -> None:
    for message in _secagg_messages():
        env = ExchangeEnvelope("secure_aggregation", "keys", 3, "a", message)
        got = decode_exchange(encode_exchange(env).SerializeToString())
        assert (got.stage, got.phase, got.round, got.client_id, got.error) == (
            env.stage,
            env.phase,
            env.round,
            env.client_id,
            None,
        )
        assert _same(got.message, message), type(message).__name__
        via_work = decode_work(encode_work(env))
        assert isinstance(via_work, ExchangeEnvelope) and _same(via_work.message, message)


def test_a_secagg_round_over_the_wire_sums_correctly() -> None:
    """Every protocol message crosses the codec as bytes; the unmasked sum is exact."""
    pytest.importorskip("cryptography")
    from consortium.secagg.protocol import SecAggClient, SecAggConfig, SecAggServer

    def wire(message: Any) -> Any:
        env = ExchangeEnvelope("secure_aggregation", "p", 1, "x", message)
        return decode_exchange(encode_exchange(env).SerializeToString()).message

    cfg = SecAggConfig(num_clients_expected=4, threshold=2, neighbours=3, round=1, context=b"run")
    server = SecAggServer(config=cfg)
    inputs = {
        c: torch.randint(0, 2**32, (50,), generator=torch.Generator().manual_seed(i))
        for i, c in enumerate("abcd")
    }
    clients = {c: SecAggClient(c, config=wire(cfg)) for c in inputs}
    broadcasts = server.collect_keys([wire(clients[c].advertise_keys()) for c in inputs])
    routed = server.route_shares([wire(clients[c].share_keys(wire(broadcasts[c]))) for c in inputs])
    alive = "abc"  # d drops after sending its shares
    request = server.collect_masked(
        [wire(clients[c].masked_input(wire(routed[c]), inputs[c])) for c in alive]
    )
    request = wire(request)
    result = server.finish([wire(clients[c].unmask(request)) for c in alive])
    expected = torch.stack([inputs[c] for c in alive]).sum(0) % 2**32
    assert result.contributors == tuple(alive) and torch.equal(result.sum, expected)


def test_exchange_without_message_and_with_error_round_trip() -> None:
    for env in (
        ExchangeEnvelope("s", "end", 2, "a"),
        ExchangeEnvelope("s", "keys", 2, "a", error="refused"),
    ):
        assert decode_exchange(encode_exchange(env)) == env
    with pytest.raises(EncodeError, match="either a message or an error"):
        encode_exchange(ExchangeEnvelope("s", "keys", 2, "a", message=object(), error="x"))
    with pytest.raises(EncodeError, match="cannot be sent in an exchange"):
        encode_exchange(ExchangeEnvelope("s", "keys", 2, "a", message={"not": "secagg"}))


def _exchange_of(message: object) -> pb.Exchange:
    return encode_exchange(ExchangeEnvelope("secure_aggregation", "p", 3, "a", message))


def test_secagg_messages_the_protocol_would_trip_over_are_refused() -> None:
    cfg, advert, broadcast, _, _, masked, _, response = _secagg_messages()

    msg = _exchange_of(advert)
    msg.advertise_keys.c_public = b"short"
    with pytest.raises(DecodeError, match="'c' public key has 5 bytes, expected 32"):
        decode_exchange(msg.SerializeToString())

    msg = _exchange_of(broadcast)
    msg.keys_broadcast.participants.append(msg.keys_broadcast.participants[0])
    with pytest.raises(DecodeError, match="a participant appears twice"):
        decode_exchange(msg.SerializeToString())

    msg = _exchange_of(cfg)
    msg.secagg_config.threshold = 9
    with pytest.raises(DecodeError, match="threshold <= neighbours"):
        decode_exchange(msg.SerializeToString())

    msg = _exchange_of(masked)
    msg.masked_input.vector.CopyFrom(encode_tensor("vector", torch.zeros(4)))
    with pytest.raises(DecodeError, match="expected an int64 vector"):
        decode_exchange(msg.SerializeToString())

    msg = _exchange_of(response)
    owner, share = next(iter(msg.unmask_response.b_shares.items()))
    msg.unmask_response.s_shares[owner].CopyFrom(share)
    with pytest.raises(DecodeError, match="reveals both shares"):
        decode_exchange(msg.SerializeToString())

    msg = _exchange_of(response)
    msg.unmask_response.b_shares[owner].index = 0
    with pytest.raises(DecodeError, match="index >= 1"):
        decode_exchange(msg.SerializeToString())


def _signed_secagg_messages() -> list[object]:
    """The messages of an authenticated three-client round: signed keys, a broadcast carrying the
    neighbours' certificates and signatures, the consistency round, a per-client unmask request."""
    pytest.importorskip("cryptography")
    from consortium.secagg.identity import simulated_identities
    from consortium.secagg.protocol import (
        ConsistencyRequest,
        SecAggClient,
        SecAggConfig,
        SecAggServer,
    )

    identities, trust = simulated_identities("abc", seed=b"\x03" * 32)
    cfg = SecAggConfig(num_clients_expected=3, threshold=2, neighbours=2, round=3, context=b"run")
    server = SecAggServer(config=cfg, graph_seed=b"\x01" * 32)
    clients = {c: SecAggClient(c, config=cfg, identity=identities[c], trust=trust) for c in "abc"}
    adverts = [clients[c].advertise_keys() for c in "abc"]
    broadcasts = server.collect_keys(adverts)
    routed = server.route_shares([clients[c].share_keys(broadcasts[c]) for c in "abc"])
    server.collect_masked(
        [clients[c].masked_input(routed[c], torch.arange(4) + i) for i, c in enumerate("abc")]
    )
    check = ConsistencyRequest(("a", "b", "c"))
    signatures = [clients[c].sign_consistency(check) for c in "abc"]
    requests = server.collect_consistency(signatures)
    return [adverts[0], broadcasts["a"], check, signatures[0], requests["a"],
            clients["a"].unmask(requests["a"])]


def test_signed_secagg_messages_round_trip_in_an_exchange() -> None:
    messages = _signed_secagg_messages()
    advert, broadcast, _, _, request, _ = messages
    assert advert.certificate and advert.signature and broadcast.signatures
    assert request.signatures
    for message in messages:
        env = ExchangeEnvelope("secure_aggregation", "consistency", 3, "a", message)
        got = decode_exchange(encode_exchange(env).SerializeToString())
        assert _same(got.message, message), type(message).__name__
        via_work = decode_work(encode_work(env))
        assert isinstance(via_work, ExchangeEnvelope) and _same(via_work.message, message)


def test_an_authenticated_secagg_round_over_the_wire_sums_correctly() -> None:
    """Signed keys, certificates, the consistency round and its proofs cross the codec as bytes."""
    pytest.importorskip("cryptography")
    from consortium.secagg.identity import simulated_identities
    from consortium.secagg.protocol import (
        ConsistencyRequest,
        SecAggClient,
        SecAggConfig,
        SecAggServer,
    )

    def wire(message: Any) -> Any:
        env = ExchangeEnvelope("secure_aggregation", "p", 1, "x", message)
        return decode_exchange(encode_exchange(env).SerializeToString()).message

    identities, trust = simulated_identities("abcd", seed=b"\x04" * 32)
    cfg = SecAggConfig(num_clients_expected=4, threshold=2, neighbours=3, round=1, context=b"run")
    server = SecAggServer(config=cfg)
    inputs = {
        c: torch.randint(0, 2**32, (50,), generator=torch.Generator().manual_seed(i))
        for i, c in enumerate("abcd")
    }
    clients = {c: SecAggClient(c, config=wire(cfg), identity=identities[c], trust=trust)
               for c in inputs}
    broadcasts = server.collect_keys([wire(clients[c].advertise_keys()) for c in inputs])
    assert server.authenticated
    routed = server.route_shares([wire(clients[c].share_keys(wire(broadcasts[c]))) for c in inputs])
    alive = "abc"  # d drops after sending its shares
    request = server.collect_masked(
        [wire(clients[c].masked_input(wire(routed[c]), inputs[c])) for c in alive]
    )
    check = wire(ConsistencyRequest(request.survivors))
    requests = server.collect_consistency([wire(clients[c].sign_consistency(check)) for c in alive])
    result = server.finish([wire(clients[c].unmask(wire(requests[c]))) for c in alive])
    expected = torch.stack([inputs[c] for c in alive]).sum(0) % 2**32
    assert result.contributors == tuple(alive) and torch.equal(result.sum, expected)


def test_signed_secagg_messages_out_of_shape_are_refused() -> None:
    advert, broadcast, check, signature, request, _ = _signed_secagg_messages()

    def refused(message: object, edit: Callable[[pb.Exchange], None], match: str) -> None:
        msg = _exchange_of(message)
        edit(msg)
        with pytest.raises(DecodeError, match=match):
            decode_exchange(msg.SerializeToString())

    refused(advert, lambda m: setattr(m.advertise_keys, "certificate", b"x" * 8193),
            "certificate has 8193 bytes, expected 1 to 8192")
    refused(advert, lambda m: setattr(m.advertise_keys, "signature", b""),
            "signature has 0 bytes")
    refused(advert, lambda m: setattr(m.advertise_keys, "certificate", b""),
            "certificate has 0 bytes")
    refused(advert, lambda m: setattr(m.advertise_keys, "signature", b"s" * 257),
            "signature has 257 bytes, expected 1 to 256")
    owner = next(iter(broadcast.signatures))
    refused(broadcast, lambda m: setattr(m.keys_broadcast.neighbour_keys[owner], "signature",
                                         b"s" * 300), "signature has 300 bytes")
    refused(check, lambda m: m.consistency_request.survivors.append("a"),
            "a survivor appears twice")
    refused(check, lambda m: m.consistency_request.survivors.append("x" * 2000), "survivor")
    refused(signature, lambda m: setattr(m.consistency_signature, "signature", b""),
            "signature has 0 bytes")
    signer = next(iter(request.signatures))
    refused(request, lambda m: m.unmask_request.signatures.__setitem__(signer, b"s" * 257),
            "signature has 257 bytes")
    with pytest.raises(EncodeError, match="whose keys the broadcast lacks"):
        encode_exchange(ExchangeEnvelope("s", "keys", 3, "a", dataclasses.replace(
            broadcast, signatures={**broadcast.signatures, "zz": (b"c", b"s")})))


def test_mutated_signed_secagg_messages_decode_or_raise_decode_error() -> None:
    """Byte-level mutations of every new message: decoded, or DecodeError, nothing else."""
    import random

    rng = random.Random(0)
    seeds = [_exchange_of(m).SerializeToString() for m in _signed_secagg_messages()]
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[pos : pos + rng.randint(1, 40)]
            else:
                data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        try:
            decode_exchange(bytes(data))
            outcomes["decoded"] += 1
        except DecodeError:
            outcomes["refused"] += 1
    assert outcomes["decoded"] and outcomes["refused"]


# ------------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 1000])
def test_chunks_reassemble_to_the_payload(size: int) -> None:
    payload = os.urandom(size)
    frames = list(chunk(payload, "s", chunk_size=100))
    assert len(frames) == max(1, -(-size // 100))
    assert all(len(f.data) <= 100 for f in frames) and [f.last for f in frames].count(True) == 1
    wire = [f.SerializeToString() for f in frames]  # as bytes too, the way a fuzzer sends them
    assert reassemble(wire, max_total_bytes=size) == payload


def _frames(payload: bytes = bytes(range(250)), size: int = 100) -> list[pb.Chunk]:
    return list(chunk(payload, "s", chunk_size=size))


def _edit(frames: list[pb.Chunk], i: int, **fields: object) -> list[pb.Chunk]:
    frames = [pb.Chunk.FromString(f.SerializeToString()) for f in frames]
    for k, v in fields.items():
        setattr(frames[i], k, v)
    return frames


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (_frames()[:1] + _frames()[2:], "offset 200 leaves a gap; 100 bytes received"),
        (_frames()[:2] + _frames()[1:], "offset 100 overlaps; 200 bytes received"),
        (_edit(_frames(), 1, stream_id="t"), "a frame of stream 't'"),
        (_edit(_frames(), 2, total_size=300), "of 300 bytes arrived in it"),
        (_edit(_frames(), 0, offset=5), "first frame starts at offset 5"),
        (_edit(_frames(), 2, data=b"x" * 60), "runs past the declared total of 250"),
        (_edit(_frames(), 1, last=True), "last frame ends at 200 of 250"),
        (_frames()[:1] + [pb.Chunk(stream_id="s", offset=100, total_size=250)], "an empty frame"),
        (_frames()[:2], "ended after 200 of 250 bytes, without its last frame"),
        ([b"\x0a\xff"], "not a valid consortium.v1.Chunk"),
    ],
)
def test_bad_streams_are_refused(frames: list[pb.Chunk], match: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(match)):
        reassemble(frames, max_total_bytes=1000)


def test_declared_size_above_the_limit_is_refused_before_allocating() -> None:
    huge = pb.Chunk(stream_id="s", offset=0, total_size=2**62, data=b"x")
    assembler = Reassembler(max_total_bytes=1 << 20)
    with pytest.raises(DecodeError, match=f"declares {2**62} bytes, above the limit of 1048576"):
        assembler.feed(huge)
    with pytest.raises(DecodeError, match="already refused"):  # the stream is dropped
        assembler.feed(_frames()[0])


def test_reassembler_reports_progress_frame_by_frame() -> None:
    assembler = Reassembler(max_total_bytes=250)
    results = [assembler.feed(f) for f in _frames()]
    assert results[:2] == [None, None] and results[2] == bytes(range(250))
    assert assembler.complete and assembler.received == 250 and assembler.stream_id == "s"
    with pytest.raises(DecodeError, match="a frame after the last one"):
        assembler.feed(_frames()[2])
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        next(chunk(b"x", "s", chunk_size=0))


# ---------------------------------------------------------------------------------- big models


def _big_round_trip(megabytes: int) -> float:
    d = megabytes * (1 << 20) // 4
    params = Parameters(
        Layout((TensorSpec("embedding", (d // 1024, 1024), torch.float32),)),
        torch.arange(d, dtype=torch.float32),
    )
    task = Task(round=1, client_id="site-a", parameters=params, seed=0)
    start = time.perf_counter()
    data = encode_work(TaskEnvelope("t", task))
    payload = reassemble(chunk(data, "t"), max_total_bytes=len(data))
    del data
    got = decode_work(payload, expected_layout=params.layout)
    elapsed = time.perf_counter() - start
    assert isinstance(got, TaskEnvelope)
    assert torch.equal(got.task.parameters.vector, params.vector)
    return elapsed


def test_a_20_mb_model_round_trips_through_chunks() -> None:
    assert _big_round_trip(20) < 30


@pytest.mark.slow
def test_a_300_mb_model_round_trips_through_chunks() -> None:
    elapsed = _big_round_trip(300)  # asserts the decoded model equals the one sent
    print(f"300 MB model: encode + chunk + reassemble + decode in {elapsed:.2f} s")
    assert elapsed < 120


# ------------------------------------------------------------------------------------- safety


def test_the_codec_never_unpickles_evaluates_or_imports_received_data() -> None:
    for module in ("codec.py", "validate.py"):
        source = (ROOT / "src/consortium/deploy" / module).read_text()
        for pattern in (
            r"\bpickle\b",
            r"\bcPickle\b",
            r"\bmarshal\b",
            r"\beval\(",
            r"\bexec\(",
            r"\bimportlib\b",
            r"__import__",
            r"torch\.load",
            r"\bdill\b",
            r"\byaml\b",
            r"numpy\.load",
            r"\bnp\.load",
        ):
            assert not re.search(pattern, source), f"{module} uses {pattern}"


def test_decoding_does_not_load_grpc_and_import_consortium_stays_light() -> None:
    code = (
        "import sys, consortium; light = 'google.protobuf' not in sys.modules; "
        "import consortium.deploy.codec, consortium.deploy.validate; "
        "print(light, 'grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_grpc_service_stub_is_importable() -> None:
    pytest.importorskip("grpc")
    from consortium.deploy.proto import consortium_pb2_grpc as rpc

    methods = pb.DESCRIPTOR.services_by_name["Federation"].methods_by_name
    assert set(methods) == {"Register", "Describe", "Summarize", "Encoding", "PullTask", "PushResult", "Exchange", "Heartbeat"}
    assert methods["PullTask"].server_streaming and methods["PushResult"].client_streaming
    assert hasattr(rpc, "FederationStub") and hasattr(rpc, "add_FederationServicer_to_server")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """scripts/gen_proto.sh, run afresh, reproduces the checked-in files."""
    tools = pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    generated = (ROOT / "src/consortium/deploy/proto/consortium_pb2_grpc.py").read_text()
    if f"GRPC_GENERATED_VERSION = '{version('grpcio-tools')}'" not in generated:
        pytest.skip(f"the files were generated by another grpcio-tools than {tools.__name__} here")
    (tmp_path / "scripts").mkdir()
    proto_dir = tmp_path / "src/consortium/deploy/proto"
    proto_dir.mkdir(parents=True)
    shutil.copy(ROOT / "scripts/gen_proto.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "src/consortium/deploy/proto/consortium.proto", proto_dir)
    subprocess.run(
        ["bash", str(tmp_path / "scripts/gen_proto.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("consortium_pb2.py", "consortium_pb2.pyi", "consortium_pb2_grpc.py"):
        fresh = (proto_dir / name).read_text()
        assert fresh == (ROOT / "src/consortium/deploy/proto" / name).read_text(), (
            f"{name} is stale: run scripts/gen_proto.sh"
        )


@pytest.mark.parametrize("evaluate", [False, True])
def test_a_task_with_spliced_cached_parameters_parses_to_the_same_message(evaluate: bool) -> None:
    from consortium.deploy.codec import ParametersCache, TaskEnvelope, encode_work
    from consortium.deploy.proto import consortium_pb2 as pb
    from consortium.messages import Task
    from consortium.types import Parameters

    params = Parameters.from_module(torch.nn.Linear(300, 3))  # a model past 127 bytes: 2-byte varints
    cache = ParametersCache()
    for site in ("a", "b"):
        task = Task(round=2, client_id=site, parameters=params, seed=7, cohort_size=2)
        plain = pb.Work.FromString(encode_work(TaskEnvelope(f"t-{site}", task, evaluate=evaluate)))
        spliced = pb.Work.FromString(
            encode_work(TaskEnvelope(f"t-{site}", task, evaluate=evaluate), cache=cache)
        )
        assert spliced == plain
    assert cache.field(params) is cache.field(params)  # serialized once

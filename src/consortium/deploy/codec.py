"""The wire codec: consortium objects to and from protobuf messages, and chunked streams.

Everything received is data: tensors are raw little-endian bytes checked against their dtype
(from a fixed list) and shape before any memory is allocated for them, scalars are typed, and
no received byte is ever unpickled, evaluated or imported. Large payloads (a task with the
model, a result with its update, a masked vector) travel as the serialized message cut into
``Chunk`` frames (:func:`chunk`); the receiver rebuilds the bytes with a :class:`Reassembler`
that refuses anything beyond the size it allows, then decodes them.

The server side of a round, for instance::

    data = encode_work(TaskEnvelope(task_id, task))
    yield from chunk(data, task_id)                     # PullTask streams these
    ...
    data = reassemble(request_iterator, max_total_bytes=limit)   # PushResult receives these
    upload = decode_upload(data)                        # ResultEnvelope or EvaluationEnvelope

Every decoder raises :class:`DecodeError` (and nothing else) on malformed input; semantic
checks of a result against the task it answers are :mod:`consortium.deploy.validate`'s job.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar

import torch

from consortium.deploy.audit import AuditHead
from consortium.errors import ConsortiumError, MissingExtraError
from consortium.messages import EvaluationResult, Result, Task
from consortium.types import Layout, Parameters, TensorSpec, Update

try:
    from google.protobuf import message as _protobuf

    from consortium.deploy.proto import consortium_pb2 as pb
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtraError("deployment over gRPC", "deploy", "protobuf") from exc

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPES",
    "MAX_HEADER_INTS",
    "MAX_NAME_CHARS",
    "MAX_NDIM",
    "SESSION_METADATA_KEY",
    "AnalysisResultEnvelope",
    "AnalysisTaskEnvelope",
    "DecodeError",
    "EncodeError",
    "EvaluationEnvelope",
    "ExchangeEnvelope",
    "Finished",
    "ParametersCache",
    "Reassembler",
    "ResultEnvelope",
    "TaskEnvelope",
    "Wait",
    "chunk",
    "chunk_frames",
    "decode_evaluation_result",
    "decode_evaluation_task",
    "decode_exchange",
    "decode_parameters",
    "decode_result",
    "decode_task",
    "decode_tensor",
    "decode_upload",
    "decode_work",
    "encode_evaluation_result",
    "encode_evaluation_task",
    "encode_exchange",
    "encode_parameters",
    "encode_result",
    "encode_task",
    "encode_tensor",
    "encode_upload",
    "encode_work",
    "encode_work_parts",
    "reassemble",
]

DTYPES: Final[Mapping[str, torch.dtype]] = MappingProxyType(
    {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
)
"""The dtypes a tensor may have on the wire, by their wire name."""

MAX_NDIM: Final = 32
"""Most dimensions a received tensor may have."""

MAX_NAME_CHARS: Final = 1024
"""Longest id or name (client, task, tensor, metric, stage) accepted, so log lines stay sane."""

DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""Bytes of payload per ``Chunk`` frame: well under gRPC's default 4 MiB message limit."""

SESSION_METADATA_KEY: Final = "consortium-session"
"""gRPC metadata key carrying the session id from ``RegisterReply`` on every later call."""

_WIRE_NAMES: Final = {dtype: name for name, dtype in DTYPES.items()}
_LITTLE_ENDIAN: Final = sys.byteorder == "little"
_MAX_ELEMENT_BYTES: Final = 1 << 62  # torch computes sizes and strides in int64
_KEY_BYTES: Final = 32  # raw X25519 public key
_SHARE_VALUE_BYTES: Final = 66  # consortium.secagg.shamir: a value in GF(2^521 - 1)
_CERTIFICATE_BYTES: Final = 8 * 1024  # consortium.secagg.identity.MAX_CERTIFICATE_BYTES
_SIGNATURE_BYTES: Final = 256  # consortium.secagg.identity.MAX_SIGNATURE_BYTES
_INT64: Final = (-(1 << 63), (1 << 63) - 1)

Buffer = bytes | bytearray | memoryview
_M = TypeVar("_M", bound=Any)


class DecodeError(ConsortiumError, ValueError):
    """Received bytes are not a valid message (names the message, what was wrong and where)."""


class EncodeError(ConsortiumError, ValueError):
    """An object cannot be put on the wire (an unsupported dtype or stage payload value)."""


# ------------------------------------------------------------------------------------- envelopes


@dataclass(frozen=True)
class TaskEnvelope:
    """A task with its wire-level id; ``evaluate`` marks an evaluation task (no payloads);
    ``head`` is the server's signed audit head when the task was sent (None: not sent)."""

    task_id: str
    task: Task
    evaluate: bool = False
    head: AuditHead | None = None


@dataclass(frozen=True)
class ResultEnvelope:
    """A result with the id of the task it answers and its size on the wire (0: not received).

    ``parts``: the tensors the update's delta holds when it is only part of the model — a
    personalised algorithm's shared tensors, in the model's order, the personal ones left out
    (they never leave the site); ``None``: the delta holds the whole model (or is empty under
    secure aggregation). On the wire: ``Update.delta_layout``."""

    task_id: str
    result: Result
    nbytes: int = 0
    parts: Layout | None = None


@dataclass(frozen=True)
class EvaluationEnvelope:
    """An evaluation result with the id of the task it answers and its size on the wire."""

    task_id: str
    result: EvaluationResult
    nbytes: int = 0


@dataclass(frozen=True)
class ExchangeEnvelope:
    """One message of an interactive stage's phase (see ``Executor.exchange``).

    ``message`` is a SecAgg+ message (:mod:`consortium.secagg.protocol`) or ``None`` (a phase
    without one, such as ``end``); ``error`` says why the client dropped out of the phase.
    """

    stage: str
    phase: str
    round: int
    client_id: str
    message: Any = None
    error: str | None = None


@dataclass(frozen=True)
class AnalysisTaskEnvelope:
    """One phase of a federated analysis (``consortium server --analyze``): ``request`` is the
    canonical JSON of :mod:`consortium.analytics.wire` (read there, with its checks)."""

    task_id: str
    phase: str
    request: bytes


@dataclass(frozen=True)
class AnalysisResultEnvelope:
    """A site's answer to an :class:`AnalysisTaskEnvelope`: ``body`` (canonical JSON), or
    ``error`` (``refused``: under the site's own policy); ``nbytes``: its size on the wire."""

    task_id: str
    phase: str
    body: bytes = b""
    error: str | None = None
    refused: bool = False
    nbytes: int = 0


@dataclass(frozen=True)
class Wait:
    """No work yet: pull again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Finished:
    """The run is over; the client may disconnect."""

    reason: str = ""


# --------------------------------------------------------------------------------------- tensors


def encode_tensor(name: str, tensor: torch.Tensor) -> pb.Tensor:
    """``tensor`` as a ``Tensor`` message: dtype name, shape and little-endian raw bytes.

    Raises:
        EncodeError: a dtype outside :data:`DTYPES`.
    """
    msg = pb.Tensor()
    _fill_tensor(msg, name, tensor)
    return msg


def decode_tensor(data: pb.Tensor | Buffer) -> tuple[str, torch.Tensor]:
    """The name and tensor a ``Tensor`` message (or its serialization) holds.

    The dtype must be in :data:`DTYPES`, the shape have at most :data:`MAX_NDIM` non-negative
    dimensions, and the data exactly ``prod(shape) * itemsize`` bytes; all is checked before the
    tensor is allocated. The tensor owns its memory (a copy of the received bytes).

    Raises:
        DecodeError: any of these does not hold.
    """
    msg = _parse(pb.Tensor, data)
    _check_name(msg.name, "tensor name")
    return msg.name, _tensor_of(msg)


def _fill_tensor(msg: pb.Tensor, name: str, tensor: torch.Tensor) -> None:
    wire_name = _WIRE_NAMES.get(tensor.dtype)
    if wire_name is None:
        raise EncodeError(
            f"tensor {name!r} has dtype {tensor.dtype}, which cannot be sent; expected one of "
            f"{sorted(DTYPES)} (convert it with .to(torch.float32))"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    if not _LITTLE_ENDIAN and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    msg.name = name
    msg.dtype = wire_name
    msg.shape.extend(tensor.shape)
    msg.data = raw.numpy().tobytes()


def _tensor_of(msg: pb.Tensor) -> torch.Tensor:
    _check_name(msg.name, "tensor name")
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise DecodeError(
            f"tensor {msg.name!r}: dtype {_short(msg.dtype)} is not accepted; expected one of "
            f"{sorted(DTYPES)}"
        )
    shape = _shape_of(msg.shape, dtype, f"tensor {msg.name!r}")
    need = math.prod(shape) * dtype.itemsize
    raw = msg.data
    if len(raw) != need:
        raise DecodeError(
            f"tensor {msg.name!r}: shape {list(shape)} of {msg.dtype} needs {need} bytes, "
            f"found {len(raw)}"
        )
    if need == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(raw)  # a private, writable copy the tensor keeps alive
    del raw
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    if dtype == torch.bool and int(flat.max()) > 1:
        raise DecodeError(f"tensor {msg.name!r}: bool data holds bytes other than 0 and 1")
    if not _LITTLE_ENDIAN and dtype.itemsize > 1:
        flat = flat.reshape(-1, dtype.itemsize).flip(1).reshape(-1).clone()
    return flat.view(dtype).reshape(shape)


def _shape_of(dims: Iterable[int], dtype: torch.dtype, where: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_NDIM:
        raise DecodeError(f"{where}: {len(shape)} dimensions, at most {MAX_NDIM} are accepted")
    if any(d < 0 for d in shape):
        raise DecodeError(f"{where}: shape {list(shape)} has a negative dimension")
    # Bounded even with a zero dimension: torch computes strides from the other ones.
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= _MAX_ELEMENT_BYTES:
        raise DecodeError(f"{where}: shape {list(shape)} is too large to be a tensor")
    return shape


def _fill_tensors(repeated: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        _fill_tensor(repeated.add(), name, tensor)


def _tensors_of(repeated: Iterable[pb.Tensor], where: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for msg in repeated:
        _check_name(msg.name, f"{where} tensor name")
        if msg.name in out:
            raise DecodeError(f"{where}: tensor {msg.name!r} appears twice")
        out[msg.name] = _tensor_of(msg)
    return out


# ------------------------------------------------------------------------------------ parameters


def encode_parameters(params: Parameters) -> pb.Parameters:
    """A model's layout and flat float32 vector as a ``Parameters`` message.

    Raises:
        EncodeError: a layout dtype outside :data:`DTYPES`, or a vector that is not the layout's
            flat float32 vector.
    """
    msg = pb.Parameters()
    _fill_parameters(msg, params)
    return msg


def decode_parameters(
    data: pb.Parameters | Buffer, *, expected_layout: Layout | None = None
) -> Parameters:
    """The model a ``Parameters`` message holds.

    Args:
        data: the message or its serialization.
        expected_layout: when given, the received layout must equal it (names, shapes, dtypes
            in order); a client passes its own model's layout.

    Raises:
        DecodeError: a malformed layout or vector, a vector that is not flat float32 of the
            layout's size, or a layout other than ``expected_layout``.
    """
    return _parameters_of(_parse(pb.Parameters, data), expected_layout)


def _fill_parameters(msg: pb.Parameters, params: Parameters) -> None:
    vector = params.vector
    if vector.dtype != torch.float32 or vector.ndim != 1 or vector.numel() != params.layout.size:
        raise EncodeError(
            f"expected the parameters as a flat float32 vector of {params.layout.size} values, "
            f"found {vector.dtype} of shape {tuple(vector.shape)}"
        )
    _fill_layout(msg.layout, params.layout, "model")
    _fill_tensor(msg.vector, "vector", vector)


def _fill_layout(repeated: Any, layout: Layout, what: str) -> None:
    for spec in layout.specs:
        wire_name = _WIRE_NAMES.get(spec.dtype)
        if wire_name is None:
            raise EncodeError(
                f"{what} tensor {spec.name!r} has dtype {spec.dtype}, which cannot be sent; "
                f"expected one of {sorted(DTYPES)}"
            )
        repeated.add(name=spec.name, dtype=wire_name, shape=spec.shape)


def _layout_of(repeated: Iterable[pb.TensorSpec], where: str) -> Layout:
    specs, names = [], set()
    for s in repeated:
        _check_name(s.name, "layout tensor name")
        if s.name in names:
            raise DecodeError(f"{where}: layout tensor {s.name!r} appears twice")
        names.add(s.name)
        dtype = DTYPES.get(s.dtype)
        if dtype is None:
            raise DecodeError(
                f"{where}: layout tensor {s.name!r} has dtype {_short(s.dtype)}; expected one of "
                f"{sorted(DTYPES)}"
            )
        specs.append(TensorSpec(s.name, _shape_of(s.shape, dtype, f"layout {s.name!r}"), dtype))
    return Layout(tuple(specs))


def _parameters_of(msg: pb.Parameters, expected: Layout | None) -> Parameters:
    layout = _layout_of(msg.layout, "parameters")
    if expected is not None and layout != expected:
        raise DecodeError(f"parameters: {_layout_difference(layout, expected)}")
    if not msg.HasField("vector"):
        raise DecodeError("parameters: the vector is missing")
    vector = _tensor_of(msg.vector)
    if vector.dtype != torch.float32 or vector.ndim != 1 or vector.numel() != layout.size:
        raise DecodeError(
            f"parameters: expected a flat float32 vector of {layout.size} values for the layout, "
            f"found {vector.dtype} of shape {tuple(vector.shape)}"
        )
    return Parameters(layout, vector)


def _layout_difference(found: Layout, expected: Layout) -> str:
    for i, (f, e) in enumerate(zip(found.specs, expected.specs)):
        if f != e:
            return (
                f"tensor {i} of the model is {f.name!r} {list(f.shape)} {f.dtype}, expected "
                f"{e.name!r} {list(e.shape)} {e.dtype}; server and client must build the same model"
            )
    return (
        f"the model has {len(found.specs)} tensors, expected {len(expected.specs)}; server and "
        "client must build the same model"
    )


# ------------------------------------------------------------------------------ stage payloads


def _fill_stage_payload(msg: pb.StagePayload, payload: Mapping[str, Any], index: int) -> None:
    for key, value in payload.items():
        where = f"stage payload {index}, key {key!r}"
        if not isinstance(key, str):
            raise EncodeError(f"{where}: keys must be strings")
        if isinstance(value, torch.Tensor):
            _fill_tensor(msg.tensors.add(), key, value)
        elif isinstance(value, bool):
            msg.values[key].flag = value
        elif isinstance(value, int):
            if not _INT64[0] <= value <= _INT64[1]:
                raise EncodeError(f"{where}: integer {value} does not fit in 64 bits")
            msg.values[key].integer = value
        elif isinstance(value, float):
            msg.values[key].number = value
        elif isinstance(value, str):
            msg.values[key].text = value
        else:
            raise EncodeError(
                f"{where}: a {type(value).__name__} cannot be sent; stage payloads hold "
                "numbers, strings, booleans and tensors only"
            )


def _stage_payload_of(msg: pb.StagePayload, index: int) -> dict[str, Any]:
    where = f"stage payload {index}"
    out: dict[str, Any] = {}
    for key, scalar in msg.values.items():
        _check_name(key, f"{where} key")
        kind = scalar.WhichOneof("kind")
        if kind is None:
            raise DecodeError(f"{where}: value {key!r} is empty")
        out[key] = getattr(scalar, kind)
    for name, tensor in _tensors_of(msg.tensors, where).items():
        if name in out:
            raise DecodeError(f"{where}: {name!r} is both a value and a tensor")
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------------------- tasks


def encode_task(task: Task, *, task_id: str) -> pb.Task:
    """A training task as a ``Task`` message, under the server's unique ``task_id``.

    Raises:
        EncodeError: a tensor or stage payload value that cannot be sent, or a number out of its
            field's range (a negative round or seed).
    """
    msg = pb.Task()
    _fill_task(msg, task, task_id)
    return msg


def decode_task(data: pb.Task | Buffer, *, expected_layout: Layout | None = None) -> TaskEnvelope:
    """The training task a ``Task`` message holds (see :func:`decode_parameters`).

    Raises:
        DecodeError: a malformed message, missing ids or parameters, or ``work`` outside [0, 1].
    """
    return _task_of(_parse(pb.Task, data), expected_layout)


def encode_evaluation_task(task: Task, *, task_id: str) -> pb.EvaluationTask:
    """An evaluation task (the model to evaluate) as an ``EvaluationTask`` message.

    Raises:
        EncodeError: the parameters cannot be sent.
    """
    msg = pb.EvaluationTask()
    _fill_evaluation_task(msg, task, task_id)
    return msg


def decode_evaluation_task(
    data: pb.EvaluationTask | Buffer, *, expected_layout: Layout | None = None
) -> TaskEnvelope:
    """The evaluation task an ``EvaluationTask`` message holds (``evaluate=True``).

    Raises:
        DecodeError: a malformed message, missing ids or parameters.
    """
    return _evaluation_task_of(_parse(pb.EvaluationTask, data), expected_layout)


def _fill_task(
    msg: pb.Task, task: Task, task_id: str, *, parameters: bool = True,
    head: AuditHead | None = None,
) -> None:
    with _encoding("task"):
        msg.round, msg.task_id, msg.client_id = task.round, task_id, task.client_id
        msg.seed, msg.work, msg.cohort_size = task.seed, task.work, task.cohort_size
        _fill_head(msg.audit_head, head)
    if task.downlink is not None:  # the model as a difference from the site's own reference
        _fill_downlink(msg.downlink, task.downlink)
    elif parameters:
        _fill_parameters(msg.parameters, task.parameters)
    _fill_tensors(msg.payload, task.payload)
    for i, payload in enumerate(task.stage_payloads):
        _fill_stage_payload(msg.stage_payloads.add(), payload, i)


def _task_of(msg: pb.Task, expected: Layout | None) -> TaskEnvelope:
    _check_id(msg.task_id, "task id")
    _check_id(msg.client_id, "client id")
    if not (math.isfinite(msg.work) and 0.0 <= msg.work <= 1.0):
        raise DecodeError(f"task {msg.task_id!r}: work {msg.work} is not a fraction in [0, 1]")
    downlink = None
    if msg.HasField("downlink"):  # the site rebuilds the parameters from its reference
        if msg.HasField("parameters"):
            raise DecodeError(f"task {msg.task_id!r}: both parameters and a downlink message")
        downlink = _downlink_of(msg.downlink, msg.round, f"task {msg.task_id!r}")
    elif not msg.HasField("parameters"):
        raise DecodeError(f"task {msg.task_id!r}: the parameters are missing")
    task = Task(
        round=msg.round,
        client_id=msg.client_id,
        parameters=(_parameters_of(msg.parameters, expected) if downlink is None
                    else Parameters(Layout(()), torch.zeros(0))),
        downlink=downlink,
        seed=msg.seed,
        payload=_tensors_of(msg.payload, f"task {msg.task_id!r} payload"),
        stage_payloads=tuple(_stage_payload_of(p, i) for i, p in enumerate(msg.stage_payloads)),
        work=msg.work,
        cohort_size=msg.cohort_size,
    )
    return TaskEnvelope(msg.task_id, task, head=_head_of(msg, f"task {msg.task_id!r}"))


def _fill_downlink(msg: pb.DownlinkDelta, delta: Any) -> None:
    """A :class:`~consortium.compression.downlink.ModelDelta` as a ``DownlinkDelta``."""
    _fill_encoded(msg.delta, delta.encoded)
    with _encoding("downlink message"):
        msg.reference_round, msg.model_sha256 = delta.reference_round, delta.sha256
        if delta.scale is not None:
            msg.scale = delta.scale


def _downlink_of(msg: pb.DownlinkDelta, round: int, where: str) -> Any:
    """The :class:`~consortium.compression.downlink.ModelDelta` a ``DownlinkDelta`` holds; its
    structure only (a reference round before the task's, a 32-byte hash, a bounded encoding):
    whether it decodes for the site's model is :class:`~consortium.compression.downlink.
    SiteReference`'s check."""
    from consortium.compression.downlink import ModelDelta

    where = f"{where} downlink message"
    scale = msg.scale if msg.HasField("scale") else None
    try:
        if not msg.HasField("delta"):
            raise DecodeError(f"{where}: the encoded delta is missing")
        if not 1 <= msg.reference_round < round:
            raise DecodeError(f"{where}: reference round {msg.reference_round} is not an "
                              f"earlier round than the task's {round}")
        if len(msg.model_sha256) != 32:
            raise DecodeError(f"{where}: the model's SHA-256 has {len(msg.model_sha256)} "
                              "bytes, not 32")
        encoded = _encoded_of(msg.delta, where)
    except DecodeError as exc:  # the site answers the task with the reason and serves on
        return ModelDelta(None, scale, int(msg.reference_round), b"", problem=str(exc))
    return ModelDelta(encoded, scale, int(msg.reference_round), bytes(msg.model_sha256))


def _fill_head(msg: pb.AuditHead, head: AuditHead | None) -> None:
    if head is not None:
        msg.seq, msg.hash, msg.signature = head.seq, head.hash, head.signature


_MAX_HEAD_SIGNATURE = 256  # an ECDSA P-256 signature in DER is at most 72 bytes


def _head_of(msg: pb.Task | pb.EvaluationTask, where: str) -> AuditHead | None:
    if not msg.HasField("audit_head"):
        return None
    head = msg.audit_head
    if len(head.hash) != 64 or not set(head.hash) <= set("0123456789abcdef"):
        raise DecodeError(f"{where}: the audit head's hash is not 64 hex digits")
    if len(head.signature) > _MAX_HEAD_SIGNATURE:
        raise DecodeError(f"{where}: the audit head's signature is over {_MAX_HEAD_SIGNATURE} bytes")
    return AuditHead(head.seq, head.hash, bytes(head.signature))


def _fill_evaluation_task(
    msg: pb.EvaluationTask, task: Task, task_id: str, *, parameters: bool = True,
    head: AuditHead | None = None,
) -> None:
    with _encoding("evaluation task"):
        msg.round, msg.task_id, msg.client_id, msg.seed = (
            task.round,
            task_id,
            task.client_id,
            task.seed,
        )
        _fill_head(msg.audit_head, head)
    if parameters:
        _fill_parameters(msg.parameters, task.parameters)


def _evaluation_task_of(msg: pb.EvaluationTask, expected: Layout | None) -> TaskEnvelope:
    _check_id(msg.task_id, "task id")
    _check_id(msg.client_id, "client id")
    if not msg.HasField("parameters"):
        raise DecodeError(f"evaluation task {msg.task_id!r}: the parameters are missing")
    task = Task(
        round=msg.round,
        client_id=msg.client_id,
        parameters=_parameters_of(msg.parameters, expected),
        seed=msg.seed,
    )
    head = _head_of(msg, f"evaluation task {msg.task_id!r}")
    return TaskEnvelope(msg.task_id, task, evaluate=True, head=head)


# --------------------------------------------------------------------------------------- results


def encode_result(result: Result, *, task_id: str, parts: Layout | None = None) -> pb.Result:
    """A client's result as a ``Result`` message answering task ``task_id``; ``parts``: the
    model tensors its delta holds when it is not the whole model (:class:`ResultEnvelope`).
    A compressed update (``update.encoded``) travels as its ``EncodedUpdate``, without a delta.

    Raises:
        EncodeError: the update's client id differs from the result's, a tensor that cannot
            be sent, a delta that is not flat float32 of ``parts``' size, or a compressed
            update that also carries a dense delta.
    """
    msg = pb.Result()
    _fill_result(msg, result, task_id, parts)
    return msg


def decode_result(data: pb.Result | Buffer) -> ResultEnvelope:
    """The result a ``Result`` message holds, with its size in bytes on the wire.

    Only the structure is checked here; whether the result fits its task (sender, round, layout,
    finite values) is :func:`consortium.deploy.validate.validate_result`'s job.

    Raises:
        DecodeError: a malformed message or tensor, missing ids, an update with neither a
            delta nor an encoding (or both), an encoding with more than
            :data:`MAX_HEADER_INTS` header integers or a tensor that is not flat.
    """
    msg = _parse(pb.Result, data)
    return _result_of(msg, _size(data, msg))


def encode_evaluation_result(result: EvaluationResult, *, task_id: str) -> pb.EvaluationResult:
    """A client's evaluation as an ``EvaluationResult`` message answering task ``task_id``.

    Raises:
        EncodeError: a negative example count.
    """
    msg = pb.EvaluationResult()
    _fill_evaluation_result(msg, result, task_id)
    return msg


def decode_evaluation_result(data: pb.EvaluationResult | Buffer) -> EvaluationEnvelope:
    """The evaluation an ``EvaluationResult`` message holds, with its size on the wire.

    Raises:
        DecodeError: a malformed message or missing ids.
    """
    msg = _parse(pb.EvaluationResult, data)
    return _evaluation_result_of(msg, _size(data, msg))


def _fill_result(msg: pb.Result, result: Result, task_id: str, parts: Layout | None = None) -> None:
    with _encoding("result"):
        msg.round, msg.task_id, msg.client_id = result.round, task_id, result.client_id
        msg.refused = result.refused
        if result.error is not None:
            msg.error = result.error
        update = result.update
        if update is None:
            return
        if update.client_id != result.client_id:
            raise EncodeError(
                f"the update's client id {update.client_id!r} differs from the result's "
                f"{result.client_id!r}"
            )
        msg.update.weight = update.weight
        for key, value in update.metrics.items():
            msg.update.metrics[key] = value
    if parts is not None:
        delta = update.delta
        if delta.dtype != torch.float32 or delta.ndim != 1 or delta.numel() != parts.size:
            raise EncodeError(
                f"a delta of part of the model must be flat float32 of its {parts.size} values, "
                f"found {delta.dtype} of shape {tuple(delta.shape)}"
            )
        _fill_layout(msg.update.delta_layout, parts, "delta")
    if update.encoded is not None:  # compressed: the encoding travels instead of the delta
        if update.delta.numel():
            raise EncodeError("a compressed update carries its encoding and no dense delta")
        _fill_encoded(msg.update.encoded, update.encoded)
    else:
        _fill_tensor(msg.update.delta, "delta", update.delta)
    _fill_tensors(msg.update.extras, update.extras)


_ENCODED_TENSORS: Final = ("indices", "values", "codes", "scales")
MAX_HEADER_INTS: Final = 8
"""Most header integers an encoded update may carry (every kind needs at most two)."""


def _fill_encoded(msg: pb.EncodedUpdate, enc: Any) -> None:
    """An :class:`~consortium.compression.Encoded` as an ``EncodedUpdate``: its kind, size and
    header, and each of its tensors flat, as raw bytes with its dtype."""
    with _encoding("encoded update"):
        msg.kind, msg.size = enc.kind, enc.size
        msg.header.extend(int(h) for h in enc.header)
    for name in _ENCODED_TENSORS:
        tensor = getattr(enc, name)
        if tensor is not None:
            _fill_tensor(getattr(msg, name), "", tensor.reshape(-1))


def _encoded_of(msg: pb.EncodedUpdate, where: str) -> Any:
    """The :class:`~consortium.compression.Encoded` an ``EncodedUpdate`` holds; only its
    structure is checked here (flat tensors of accepted dtypes, a bounded header): whether it
    decodes for the run's model is :mod:`consortium.deploy.validate`'s job."""
    from consortium.compression.encoded import Encoded

    where = f"{where}: encoded update"
    _check_name(msg.kind, f"{where} kind")
    if len(msg.header) > MAX_HEADER_INTS:
        raise DecodeError(f"{where}: {len(msg.header)} header integers, at most "
                          f"{MAX_HEADER_INTS} are accepted")
    if msg.size >= _MAX_ELEMENT_BYTES:
        raise DecodeError(f"{where}: size {msg.size} is too large to be a model")
    tensors: dict[str, torch.Tensor] = {}
    for name in _ENCODED_TENSORS:
        if msg.HasField(name):
            tensor = _tensor_of(getattr(msg, name))
            if tensor.ndim != 1:
                raise DecodeError(f"{where}: {name} of shape {list(tensor.shape)}, expected flat")
            tensors[name] = tensor
    return Encoded(msg.kind, int(msg.size), tuple(int(h) for h in msg.header), **tensors)


def _result_of(msg: pb.Result, nbytes: int) -> ResultEnvelope:
    _check_id(msg.task_id, "task id")
    _check_id(msg.client_id, "client id")
    update = None
    parts = None
    if msg.HasField("update"):
        u = msg.update
        where = f"result for task {msg.task_id!r}"
        encoded = _encoded_of(u.encoded, where) if u.HasField("encoded") else None
        if encoded is not None and u.HasField("delta"):
            raise DecodeError(f"{where}: the update carries both a delta and an encoding")
        if encoded is None and not u.HasField("delta"):
            raise DecodeError(f"{where}: the update has no delta")
        if len(u.delta_layout):
            parts = _layout_of(u.delta_layout, f"{where}: delta layout")
        update = Update(
            client_id=msg.client_id,
            delta=torch.zeros(0) if encoded is not None else _tensor_of(u.delta),
            weight=u.weight,
            metrics=_metrics_of(u.metrics, where),
            extras=_tensors_of(u.extras, f"{where} extras"),
            encoded=encoded,
        )
    error = msg.error if msg.HasField("error") else None
    result = Result(msg.round, msg.client_id, update, error=error, refused=msg.refused)
    return ResultEnvelope(msg.task_id, result, nbytes, parts)


def _fill_evaluation_result(
    msg: pb.EvaluationResult, result: EvaluationResult, task_id: str
) -> None:
    with _encoding("evaluation result"):
        msg.round, msg.task_id, msg.client_id = result.round, task_id, result.client_id
        msg.num_examples = result.num_examples
        for key, value in result.metrics.items():
            msg.metrics[key] = value


def _evaluation_result_of(msg: pb.EvaluationResult, nbytes: int) -> EvaluationEnvelope:
    _check_id(msg.task_id, "task id")
    _check_id(msg.client_id, "client id")
    metrics = _metrics_of(msg.metrics, f"evaluation for task {msg.task_id!r}")
    result = EvaluationResult(msg.round, msg.client_id, msg.num_examples, metrics)
    return EvaluationEnvelope(msg.task_id, result, nbytes)


def _metrics_of(metrics: Mapping[str, float], where: str) -> dict[str, float]:
    for key in metrics:
        _check_name(key, f"{where} metric name")
    return dict(metrics)


# -------------------------------------------------------------------------------------- exchange


def encode_exchange(envelope: ExchangeEnvelope) -> pb.Exchange:
    """One phase message of an interactive stage as an ``Exchange`` message.

    Raises:
        EncodeError: a message type the wire format does not know, or both a message and an
            error.
    """
    msg = pb.Exchange()
    _fill_exchange(msg, envelope)
    return msg


def decode_exchange(data: pb.Exchange | Buffer) -> ExchangeEnvelope:
    """The phase message an ``Exchange`` message holds, as the SecAgg+ dataclass it mirrors.

    Checks what the protocol objects would otherwise trip over: 32-byte public keys, distinct
    participants and survivors, shares with an index >= 1 and a value of at most 66 bytes, an
    unmask response that does not reveal both shares of one client, and certificates (at most
    8 KiB) and signatures (1 to 256 bytes) that come in pairs.

    Raises:
        DecodeError: a malformed message, or a SecAgg+ message that breaks these rules.
        MissingExtraError: a SecAgg+ message when ``cryptography`` is not installed.
    """
    return _exchange_of(_parse(pb.Exchange, data))


def _fill_exchange(msg: pb.Exchange, env: ExchangeEnvelope) -> None:
    with _encoding("exchange"):
        msg.stage, msg.phase, msg.round, msg.client_id = (
            env.stage,
            env.phase,
            env.round,
            env.client_id,
        )
        if env.error is not None:
            if env.message is not None:
                raise EncodeError("an exchange message carries either a message or an error")
            msg.error = env.error
        elif env.message is not None:
            _fill_secagg(msg, env.message)


def _exchange_of(msg: pb.Exchange) -> ExchangeEnvelope:
    _check_id(msg.stage, "stage name")
    _check_id(msg.phase, "phase name")
    _check_id(msg.client_id, "client id")
    body = msg.WhichOneof("body")
    message: Any = None
    error = None
    if body == "error":
        error = msg.error
    elif body is not None:
        message = _secagg_of(body, getattr(msg, body))
    return ExchangeEnvelope(msg.stage, msg.phase, msg.round, msg.client_id, message, error)


def _secagg() -> Any:
    try:
        from consortium.secagg import protocol
    except ImportError as exc:
        raise MissingExtraError("secure aggregation", "secagg", "cryptography") from exc
    return protocol


def _fill_secagg(msg: pb.Exchange, m: Any) -> None:
    from consortium.secagg.shamir import Share

    p = _secagg()
    if isinstance(m, p.SecAggConfig):
        msg.secagg_config.SetInParent()
        c = msg.secagg_config
        c.num_clients_expected, c.threshold, c.neighbours = (
            m.num_clients_expected,
            m.threshold,
            m.neighbours,
        )
        c.round, c.context, c.modulus_bits = m.round, bytes(m.context), m.modulus_bits
    elif isinstance(m, p.AdvertiseKeys):
        a = msg.advertise_keys
        a.client_id, a.c_public, a.s_public = m.client_id, m.c_public, m.s_public
        a.certificate, a.signature = m.certificate, m.signature
        a.seed_commitment = m.seed_commitment
    elif isinstance(m, p.KeysBroadcast):
        b = msg.keys_broadcast
        b.round, b.graph_seed = m.round, m.graph_seed
        b.participants.extend(m.participants)
        for owner, (c_public, s_public) in m.neighbour_keys.items():
            b.neighbour_keys[owner].c_public = c_public
            b.neighbour_keys[owner].s_public = s_public
        for owner, (certificate, signature) in m.signatures.items():
            if owner not in m.neighbour_keys:
                raise EncodeError(f"a signature for {owner!r}, whose keys the broadcast lacks")
            b.neighbour_keys[owner].certificate = certificate
            b.neighbour_keys[owner].signature = signature
    elif isinstance(m, p.ConsistencyRequest):
        msg.consistency_request.SetInParent()
        msg.consistency_request.survivors.extend(m.survivors)
    elif isinstance(m, p.ConsistencySignature):
        msg.consistency_signature.client_id = m.client_id
        msg.consistency_signature.signature = m.signature
    elif isinstance(m, p.EncryptedShares):
        msg.encrypted_shares.sender = m.sender
        msg.encrypted_shares.ciphertexts.update(m.ciphertexts)
    elif isinstance(m, p.SharesForClient):
        msg.shares_for_client.recipient = m.recipient
        msg.shares_for_client.ciphertexts.update(m.ciphertexts)
    elif isinstance(m, p.MaskedInput):
        msg.masked_input.client_id = m.client_id
        _fill_masked(msg.masked_input.vector, m.vector)
    elif isinstance(m, p.UnmaskRequest):
        msg.unmask_request.SetInParent()
        msg.unmask_request.survivors.extend(m.survivors)
        msg.unmask_request.dropped.extend(m.dropped)
        msg.unmask_request.signatures.update(m.signatures)
    elif isinstance(m, p.UnmaskResponse):
        r = msg.unmask_response
        r.client_id = m.client_id
        for target, shares in ((r.b_shares, m.b_shares), (r.s_shares, m.s_shares)):
            for owner, share in shares.items():
                if not isinstance(share, Share):
                    raise EncodeError(f"expected a Share for {owner!r}, found {share!r}")
                target[owner].index = share.index
                target[owner].value = share.to_bytes()[4:]
    else:
        raise EncodeError(
            f"a {type(m).__name__} cannot be sent in an exchange; expected a SecAgg+ message "
            "from consortium.secagg.protocol"
        )


def _fill_masked(msg: pb.Tensor, vector: torch.Tensor) -> None:
    """A masked vector (int64 residues) in its narrowest exact wire form: uint32 words when
    every residue is below ``2**32`` (:func:`~consortium.secagg.messages.masked_wire_dtype`),
    else int64; 4 bytes a coordinate instead of 8 for the modulus ``2**32``."""
    if vector.dtype != torch.int64 or vector.ndim != 1:
        raise EncodeError(
            f"a masked vector must be a flat int64 tensor of residues, found {vector.dtype} of "
            f"shape {list(vector.shape)}"
        )
    from consortium.secagg.messages import masked_wire_dtype

    if masked_wire_dtype(vector) == "int64":
        _fill_tensor(msg, "vector", vector)
        return
    words = vector.detach().to("cpu").contiguous().numpy().astype("<u4")
    msg.name, msg.dtype = "vector", "uint32"
    msg.shape.append(vector.numel())
    msg.data = words.tobytes()


def _masked_of(msg: pb.Tensor, where: str) -> torch.Tensor:
    """The int64 residues of a masked vector sent as uint32 words (or int64 for a residue
    beyond 32 bits); refuses any other dtype, a shape that is not flat, and a data length
    that is not the shape's."""
    import numpy as np

    if msg.dtype == "uint32":
        _check_name(msg.name, f"{where} tensor name")
        if len(msg.shape) != 1:
            raise DecodeError(
                f"{where}: expected a flat vector, found shape {list(msg.shape)[:MAX_NDIM]}"
            )
        (n,) = _shape_of(msg.shape, torch.int64, f"{where} vector")
        if len(msg.data) != 4 * n:
            raise DecodeError(
                f"{where}: a vector of {n} uint32 words needs {4 * n} bytes, found "
                f"{len(msg.data)}"
            )
        return torch.from_numpy(np.frombuffer(msg.data, dtype="<u4").astype(np.int64))
    from consortium.secagg.masks import MAX_MODULUS_BITS
    from consortium.secagg.messages import masked_wire_dtype

    vector = _tensor_of(msg)
    if vector.dtype != torch.int64 or vector.ndim != 1:
        raise DecodeError(
            f"{where}: expected an int64 vector (or uint32 words), found {vector.dtype} of "
            f"shape {list(vector.shape)}"
        )
    if vector.numel() and (int(vector.min()) < 0 or int(vector.max()) >> MAX_MODULUS_BITS):
        raise DecodeError(f"{where}: residues outside [0, 2**{MAX_MODULUS_BITS})")
    if masked_wire_dtype(vector) != "int64":  # one encoding per vector: counted as sent
        raise DecodeError(
            f"{where}: every residue is below 2**32, so the vector must travel as uint32 "
            "words, not int64"
        )
    return vector


def _secagg_of(body: str, m: Any) -> Any:
    from consortium.secagg.shamir import Share

    p = _secagg()
    where = f"exchange {body}"
    if body == "secagg_config":
        try:
            return p.SecAggConfig(
                num_clients_expected=m.num_clients_expected,
                threshold=m.threshold,
                neighbours=m.neighbours,
                round=m.round,
                context=m.context,
                modulus_bits=m.modulus_bits,
            )
        except ValueError as exc:
            raise DecodeError(f"{where}: {exc}") from exc
    if body == "advertise_keys":
        _check_id(m.client_id, f"{where} client id")
        certificate, signature = _signed(m.certificate, m.signature, f"{where} of {m.client_id!r}")
        if len(m.seed_commitment) not in (0, p.SEED_COMMITMENT_BYTES):
            raise DecodeError(
                f"{where}: a seed commitment of {len(m.seed_commitment)} bytes, expected "
                f"{p.SEED_COMMITMENT_BYTES}"
            )
        return p.AdvertiseKeys(
            m.client_id, _key(m.c_public, where, "c"), _key(m.s_public, where, "s"),
            certificate, signature, seed_commitment=m.seed_commitment,
        )
    if body == "keys_broadcast":
        participants = _distinct(m.participants, where, "participant")
        keys, signed = {}, {}
        for owner, k in m.neighbour_keys.items():
            _check_id(owner, f"{where} neighbour")
            keys[owner] = (_key(k.c_public, where, "c"), _key(k.s_public, where, "s"))
            if k.certificate or k.signature:
                signed[owner] = _signed(k.certificate, k.signature, f"{where} of {owner!r}")
        return p.KeysBroadcast(m.round, m.graph_seed, participants, keys, signed)
    if body == "consistency_request":
        return p.ConsistencyRequest(_distinct(m.survivors, where, "survivor"))
    if body == "consistency_signature":
        _check_id(m.client_id, f"{where} client id")
        return p.ConsistencySignature(m.client_id, _signature(m.signature, where))
    if body == "encrypted_shares":
        _check_id(m.sender, f"{where} sender")
        return p.EncryptedShares(m.sender, _ciphertexts(m.ciphertexts, where))
    if body == "shares_for_client":
        _check_id(m.recipient, f"{where} recipient")
        return p.SharesForClient(m.recipient, _ciphertexts(m.ciphertexts, where))
    if body == "masked_input":
        _check_id(m.client_id, f"{where} client id")
        if not m.HasField("vector"):
            raise DecodeError(f"{where}: the vector is missing")
        return p.MaskedInput(m.client_id, _masked_of(m.vector, where))
    if body == "unmask_request":
        signatures = {
            _check_id(v, f"{where} signer"): _signature(sig, f"{where} of {v!r}")
            for v, sig in m.signatures.items()
        }
        return p.UnmaskRequest(
            _ids(m.survivors, f"{where} survivor"), _ids(m.dropped, f"{where} dropped client"),
            signatures,
        )
    assert body == "unmask_response", body  # the oneof has no other member
    _check_id(m.client_id, f"{where} client id")
    both = set(m.b_shares) & set(m.s_shares)
    if both:
        raise DecodeError(
            f"{where}: client {m.client_id!r} reveals both shares of {sorted(both)[:3]}; a "
            "client never reveals both secrets of one neighbour"
        )
    shares: list[dict[str, Share]] = [{}, {}]
    for out, table in zip(shares, (m.b_shares, m.s_shares)):
        for owner, s in table.items():
            _check_id(owner, f"{where} share owner")
            if s.index < 1 or len(s.value) > _SHARE_VALUE_BYTES:
                raise DecodeError(
                    f"{where}: the share of {owner!r} needs an index >= 1 and a value of at "
                    f"most {_SHARE_VALUE_BYTES} bytes, found index {s.index} and "
                    f"{len(s.value)} bytes"
                )
            out[owner] = Share(index=s.index, value=int.from_bytes(s.value, "big"))
    return p.UnmaskResponse(m.client_id, shares[0], shares[1])


def _key(raw: bytes, where: str, which: str) -> bytes:
    if len(raw) != _KEY_BYTES:
        raise DecodeError(
            f"{where}: the {which!r} public key has {len(raw)} bytes, expected {_KEY_BYTES} "
            "(raw X25519)"
        )
    return raw


def _ids(values: Iterable[str], what: str) -> tuple[str, ...]:
    return tuple(_check_id(v, what) for v in values)


def _distinct(values: Iterable[str], where: str, what: str) -> tuple[str, ...]:
    ids = _ids(values, f"{where} {what}")
    if len(set(ids)) != len(ids):
        raise DecodeError(f"{where}: a {what} appears twice")
    return ids


def _signature(raw: bytes, where: str) -> bytes:
    if not 0 < len(raw) <= _SIGNATURE_BYTES:
        raise DecodeError(
            f"{where}: the signature has {len(raw)} bytes, expected 1 to {_SIGNATURE_BYTES} "
            "(ECDSA P-256 in DER is at most 72)"
        )
    return raw


def _signed(certificate: bytes, signature: bytes, where: str) -> tuple[bytes, bytes]:
    """An optional (certificate, signature) pair: both empty, or both present and bounded."""
    if not certificate and not signature:
        return b"", b""
    if not certificate or len(certificate) > _CERTIFICATE_BYTES:
        raise DecodeError(
            f"{where}: the certificate has {len(certificate)} bytes, expected 1 to "
            f"{_CERTIFICATE_BYTES} beside a signature"
        )
    return certificate, _signature(signature, where)


def _ciphertexts(table: Mapping[str, bytes], where: str) -> dict[str, bytes]:
    return {_check_id(k, f"{where} peer"): v for k, v in table.items()}


# ------------------------------------------------------------------------------------- envelopes


class ParametersCache:
    """The serialized global model, kept for the round: every site's task carries the same
    parameters, so they are serialized once and spliced into each task's bytes (a protobuf
    message may list its fields in any order, and a sub-message is its bytes behind a tag and
    a length). Keyed by the ``Parameters`` object itself (held, so its id cannot be reused).
    """

    def __init__(self) -> None:
        self._params: Parameters | None = None
        self._field: bytes = b""

    def field(self, params: Parameters) -> bytes:
        """``parameters = 5`` as bytes: tag, length, the serialized ``Parameters``."""
        if self._params is not params:
            msg = pb.Parameters()
            _fill_parameters(msg, params)
            body = msg.SerializeToString()
            self._params, self._field = params, _tag(5) + _varint(len(body)) + body
        return self._field


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_work(
    item: TaskEnvelope | ExchangeEnvelope | AnalysisTaskEnvelope | Wait | Finished, *,
    cache: ParametersCache | None = None,
) -> bytes:
    """The serialized ``Work`` message that ``PullTask`` streams (cut it with :func:`chunk`).

    With ``cache``, a task's parameters are serialized once per model and spliced in; the bytes
    parse to the same message as without it.

    Raises:
        EncodeError: the item cannot be sent.
    """
    if cache is not None and isinstance(item, TaskEnvelope):
        return b"".join(encode_work_parts(item, cache=cache))
    msg = pb.Work()
    if isinstance(item, TaskEnvelope):
        if item.evaluate:
            _fill_evaluation_task(msg.evaluate, item.task, item.task_id, head=item.head)
        else:
            _fill_task(msg.train, item.task, item.task_id, head=item.head)
    elif isinstance(item, ExchangeEnvelope):
        _fill_exchange(msg.exchange, item)
        msg.exchange.SetInParent()
    elif isinstance(item, AnalysisTaskEnvelope):
        with _encoding("analysis task"):
            msg.analyze.task_id, msg.analyze.phase = item.task_id, item.phase
            msg.analyze.request = bytes(item.request)
    elif isinstance(item, Wait):
        with _encoding("wait"):
            msg.wait.seconds = item.seconds
    elif isinstance(item, Finished):
        msg.finished.reason = item.reason
    else:
        raise EncodeError(f"a {type(item).__name__} is not a piece of work")
    return msg.SerializeToString()


def encode_work_parts(
    item: TaskEnvelope | ExchangeEnvelope | AnalysisTaskEnvelope | Wait | Finished, *,
    cache: ParametersCache,
) -> tuple[bytes, ...]:
    """:func:`encode_work`'s bytes as consecutive parts, never joined: a task is its own small
    head followed by the round's serialized parameters, the very ``bytes`` object that
    ``cache`` holds for every site's task (:func:`chunk_frames` cuts frames across the parts).

    Raises:
        EncodeError: the item cannot be sent.
    """
    if not isinstance(item, TaskEnvelope):
        return (encode_work(item),)
    if not item.evaluate and item.task.downlink is not None:  # no parameters: its own message
        work = pb.Work()
        _fill_task(work.train, item.task, item.task_id, head=item.head)
        return (work.SerializeToString(),)
    inner = pb.Task() if not item.evaluate else pb.EvaluationTask()
    if item.evaluate:
        _fill_evaluation_task(inner, item.task, item.task_id, parameters=False, head=item.head)
    else:
        _fill_task(inner, item.task, item.task_id, parameters=False, head=item.head)
    head = inner.SerializeToString()
    parameters = cache.field(item.task.parameters)
    size = len(head) + len(parameters)
    return _tag(2 if item.evaluate else 1) + _varint(size) + head, parameters


def decode_work(
    data: Buffer, *, expected_layout: Layout | None = None
) -> TaskEnvelope | ExchangeEnvelope | AnalysisTaskEnvelope | Wait | Finished:
    """The piece of work a serialized ``Work`` message holds (the client side of ``PullTask``).

    Raises:
        DecodeError: malformed bytes, an empty message, or a malformed task or exchange.
    """
    msg = _parse(pb.Work, data)
    kind = msg.WhichOneof("kind")
    if kind == "train":
        return _task_of(msg.train, expected_layout)
    if kind == "evaluate":
        return _evaluation_task_of(msg.evaluate, expected_layout)
    if kind == "exchange":
        return _exchange_of(msg.exchange)
    if kind == "wait":
        seconds = msg.wait.seconds
        if not (math.isfinite(seconds) and seconds >= 0):
            raise DecodeError(f"wait: {seconds} is not a number of seconds")
        return Wait(seconds)
    if kind == "finished":
        return Finished(msg.finished.reason)
    if kind == "analyze":
        task = msg.analyze
        return AnalysisTaskEnvelope(_check_id(task.task_id, "task id"),
                                    _check_id(task.phase, "analysis phase"), bytes(task.request))
    raise DecodeError("work: the message is empty; expected a task, an exchange, wait or finished")


def encode_upload(item: ResultEnvelope | EvaluationEnvelope | AnalysisResultEnvelope) -> bytes:
    """The serialized ``Upload`` message that ``PushResult`` streams (cut it with :func:`chunk`).

    Raises:
        EncodeError: the result cannot be sent.
    """
    msg = pb.Upload()
    if isinstance(item, ResultEnvelope):
        _fill_result(msg.result, item.result, item.task_id, item.parts)
    elif isinstance(item, EvaluationEnvelope):
        _fill_evaluation_result(msg.evaluation, item.result, item.task_id)
    elif isinstance(item, AnalysisResultEnvelope):
        with _encoding("analysis result"):
            a = msg.analysis
            a.task_id, a.phase, a.body, a.refused = item.task_id, item.phase, item.body, item.refused
            if item.error is not None:
                if item.body:
                    raise EncodeError("an analysis result carries either a body or an error")
                a.error = item.error
    else:
        raise EncodeError(f"a {type(item).__name__} is not an upload")
    return msg.SerializeToString()


def decode_upload(data: Buffer) -> ResultEnvelope | EvaluationEnvelope | AnalysisResultEnvelope:
    """The result or evaluation a serialized ``Upload`` message holds, with its size on the wire.

    Raises:
        DecodeError: malformed bytes, an empty message, or a malformed result.
    """
    msg = _parse(pb.Upload, data)
    kind = msg.WhichOneof("kind")
    if kind == "result":
        return _result_of(msg.result, len(data))
    if kind == "evaluation":
        return _evaluation_result_of(msg.evaluation, len(data))
    if kind == "analysis":
        a = msg.analysis
        error = _check_name(a.error, "analysis error") if a.HasField("error") else None
        if error is not None and a.body:
            raise DecodeError("analysis result: both a body and an error")
        return AnalysisResultEnvelope(_check_id(a.task_id, "task id"),
                                      _check_id(a.phase, "analysis phase"), bytes(a.body), error,
                                      bool(a.refused), len(data))
    raise DecodeError("upload: the message is empty; expected a result or an evaluation")


# -------------------------------------------------------------------------------------- chunking


def chunk(
    payload: Buffer, stream_id: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.Chunk]:
    """Cut ``payload`` into ``Chunk`` frames of at most ``chunk_size`` bytes, in order.

    An empty payload is one empty frame with ``last`` set. The payload is read through a
    memoryview, so only one frame's bytes are copied at a time.

    Raises:
        ValueError: ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, found {chunk_size}")
    view = memoryview(payload).cast("B")
    total = len(view)
    offset = 0
    while True:
        end = min(offset + chunk_size, total)
        yield pb.Chunk(
            stream_id=stream_id,
            offset=offset,
            total_size=total,
            data=bytes(view[offset:end]),
            last=end == total,
        )
        if end == total:
            return
        offset = end


def chunk_frames(
    parts: Sequence[Buffer], stream_id: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[bytes]:
    """The serialized ``Chunk`` frames that :func:`chunk` cuts from the parts joined, without
    joining them: a frame is its header fields, serialized by protobuf, followed by its
    ``data`` field spliced in (a message's fields may come in any order), so each frame's
    payload is copied once, from the parts, and a part shared by many streams (the round's
    serialized model, :func:`encode_work_parts`) is never copied whole. The frames parse to
    the same messages as :func:`chunk`'s.

    Raises:
        ValueError: ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, found {chunk_size}")
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(len(view) for view in views)
    offset, index, start = 0, 0, 0  # the next frame's first byte: its part and place in it
    while True:
        end = min(offset + chunk_size, total)
        pieces: list[memoryview] = []
        need = end - offset
        while need:
            view = views[index]
            take = min(need, len(view) - start)
            if take:
                pieces.append(view[start:start + take])
            start, need = start + take, need - take
            if start == len(view):
                index, start = index + 1, 0
        header = pb.Chunk(stream_id=stream_id, offset=offset, total_size=total,
                          last=end == total).SerializeToString()
        size = end - offset
        yield b"".join([header, _tag(4), _varint(size), *pieces]) if size else header
        if end == total:
            return
        offset = end


@dataclass
class Reassembler:
    """Rebuilds the bytes of one chunked stream, checking every frame as it arrives.

    The first frame fixes the stream id and the total size; a total above ``max_total_bytes``
    is refused before anything is allocated. The buffer then grows with the bytes received,
    never to the declared total up front: a peer that declares the maximum and sends one byte
    holds one byte here, not gigabytes (issue 13: three such streams held 6.1 GiB). Growing
    appends in place (CPython over-allocates a ``bytearray``; glibc moves a large one with
    ``mremap``, without copying), so an honest upload is still received without a second copy.
    Frames must then follow each other exactly (no gap, no overlap, no growth beyond the
    total, no empty frame but the last) until the one marked ``last`` ends at the total.

    Args:
        max_total_bytes: the largest payload this receiver accepts.
    """

    max_total_bytes: int
    stream_id: str | None = field(default=None, init=False)
    total_size: int = field(default=0, init=False)
    received: int = field(default=0, init=False)
    complete: bool = field(default=False, init=False)
    failed: bool = field(default=False, init=False)
    _buffer: bytearray = field(default_factory=bytearray, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_total_bytes < 0:
            raise ValueError(f"expected max_total_bytes >= 0, found {self.max_total_bytes}")

    @property
    def held_bytes(self) -> int:
        """Bytes of memory the buffer holds now (what a stalled stream pins)."""
        return self._buffer.__alloc__()

    def feed(self, frame: pb.Chunk | Buffer) -> bytearray | None:
        """Add the next frame; the whole payload once the last frame is in, else ``None``.

        Raises:
            DecodeError: a frame that does not continue the stream (see the class), a total size
                above ``max_total_bytes``, any frame after the last, or any frame after a
                refused one (the stream is dropped then).
        """
        if self.failed:
            raise DecodeError(f"stream {self.stream_id!r}: already refused; drop the stream")
        try:
            return self._feed(frame)
        except DecodeError:
            self.failed, self._buffer = True, bytearray()
            raise

    def _feed(self, frame: pb.Chunk | Buffer) -> bytearray | None:
        c = _parse(pb.Chunk, frame)
        where = f"stream {_short(c.stream_id)}"
        if self.complete:
            raise DecodeError(f"{where}: a frame after the last one")
        if self.stream_id is None:
            _check_name(c.stream_id, "stream id")
            if c.offset != 0:
                raise DecodeError(f"{where}: the first frame starts at offset {c.offset}, not 0")
            if c.total_size > self.max_total_bytes:
                raise DecodeError(
                    f"{where}: declares {c.total_size} bytes, above the limit of "
                    f"{self.max_total_bytes} bytes"
                )
            self.stream_id, self.total_size = c.stream_id, c.total_size
            self._buffer = bytearray()
        elif c.stream_id != self.stream_id or c.total_size != self.total_size:
            raise DecodeError(
                f"stream {self.stream_id!r} of {self.total_size} bytes: a frame of stream "
                f"{_short(c.stream_id)} of {c.total_size} bytes arrived in it"
            )
        if c.offset != self.received:
            gap = "leaves a gap" if c.offset > self.received else "overlaps"
            raise DecodeError(
                f"{where}: a frame at offset {c.offset} {gap}; {self.received} bytes received"
            )
        n = len(c.data)
        if self.received + n > self.total_size:
            raise DecodeError(
                f"{where}: a frame of {n} bytes at offset {c.offset} runs past the declared "
                f"total of {self.total_size} bytes"
            )
        if n == 0 and not c.last:
            raise DecodeError(f"{where}: an empty frame that is not the last")
        self._buffer += c.data
        self.received += n
        if not c.last:
            return None
        if self.received != self.total_size:
            raise DecodeError(
                f"{where}: the last frame ends at {self.received} of {self.total_size} bytes"
            )
        self.complete = True
        buffer, self._buffer = self._buffer, bytearray()
        return buffer


def reassemble(frames: Iterable[pb.Chunk | Buffer], *, max_total_bytes: int) -> bytearray:
    """The payload of a whole chunked stream (see :class:`Reassembler`).

    Raises:
        DecodeError: a bad frame, or the stream ended before its last frame.
    """
    assembler = Reassembler(max_total_bytes)
    for frame in frames:
        payload = assembler.feed(frame)
        if payload is not None:
            return payload
    raise DecodeError(
        f"stream {assembler.stream_id!r} ended after {assembler.received} of "
        f"{assembler.total_size} bytes, without its last frame"
    )


# --------------------------------------------------------------------------------------- helpers


def _parse(cls: type[_M], data: _M | Buffer) -> _M:
    if isinstance(data, cls):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected a {cls.__name__} message or bytes, found {type(data).__name__}")
    msg = cls()
    try:
        msg.ParseFromString(data)
    except _protobuf.Error as exc:
        raise DecodeError(
            f"{len(data)} bytes are not a valid consortium.v1.{cls.__name__} message: {exc}"
        ) from exc
    return msg


def _size(data: Any, msg: Any) -> int:
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else int(msg.ByteSize())


def _check_name(value: str, what: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise DecodeError(f"{what} {_short(value)} is longer than {MAX_NAME_CHARS} characters")
    return value


def _short(text: str) -> str:
    """``text`` quoted for an error message, cut so that a hostile peer cannot flood the log."""
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}..."


def _check_id(value: str, what: str) -> str:
    if not value:
        raise DecodeError(f"{what} is empty")
    return _check_name(value, what)


class _encoding:
    """Maps protobuf's range and type errors while filling a message to :class:`EncodeError`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, (TypeError, ValueError, OverflowError)) and not isinstance(
            exc, ConsortiumError
        ):
            raise EncodeError(f"{self.what} cannot be encoded: {exc}") from exc

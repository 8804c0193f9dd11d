"""A hostile consortium site for tests: a real gRPC client, scripted by the test.

It speaks the real wire protocol (the same proto, codec and chunking as ``consortium client``)
with the raw generated stubs, so it can send whatever the test asks: any ``Describe`` values, a
chosen ``Result`` or ``EvaluationResult``, raw bytes, hand-made frames (a wrong total, a gap, a
duplicate, a stream that stalls), another session's id, a forged ``client_version``, a secure
aggregation message nobody asked for. The server on the other end is the real ``serve()``.
It mirrors the hostile *server* of :mod:`tests.deploy.hostile`.

Every call that sends something (and ``try_pull``, ``try_heartbeat``) returns what the server
answered: an ``Ack`` (``accepted``, ``reason``), or a :class:`Refused` when the server ended the
call with an error status instead (an unknown session, another site's session): both are
outcomes a test asserts on, never exceptions. ``pull``, ``work`` and ``encoding`` serve the site's
own honest side and raise ``grpc.RpcError``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from consortium.deploy.codec import (
    SESSION_METADATA_KEY,
    EvaluationEnvelope,
    ExchangeEnvelope,
    Finished,
    ResultEnvelope,
    TaskEnvelope,
    Wait,
    chunk,
    decode_work,
    encode_exchange,
    encode_upload,
    reassemble,
)
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.proto import consortium_pb2_grpc as rpc

_OPTIONS = [("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20)]


@dataclass(frozen=True)
class Refused:
    """The server ended the call with an error status (it did not answer with an Ack)."""

    code: grpc.StatusCode
    details: str

    @property
    def accepted(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return f"{self.code.name}: {self.details}"


Answer = Any  # pb.Ack | Refused


def frame(stream_id: str, offset: int, total: int, data: bytes, *, last: bool) -> pb.Chunk:
    """One hand-made frame: any offset, any declared total, any data."""
    return pb.Chunk(stream_id=stream_id, offset=offset, total_size=total, data=data, last=last)


class StalledUpload:
    """A ``PushResult`` stream that sent its first frames and then waits, holding the call open
    (``release()`` sends the rest; ``cancel()`` drops it). ``answer()`` is the server's reply."""

    def __init__(self, stub: Any, metadata: Any, first: list[pb.Chunk], rest: list[pb.Chunk],
                 *, timeout: float) -> None:
        self._go = threading.Event()
        self._cancelled = False
        self.sent = 0

        def frames() -> Iterator[pb.Chunk]:
            for f in first:
                self.sent += 1
                yield f
            self._go.wait(timeout)
            if self._cancelled:
                return
            for f in rest:
                self.sent += 1
                yield f

        self._future = stub.PushResult.future(frames(), metadata=metadata, timeout=timeout)

    def release(self) -> None:
        self._go.set()

    def cancel(self) -> None:
        """Drop the stream from this side (the server sees the call cancelled)."""
        self._cancelled = True
        self._go.set()
        self._future.cancel()

    def answer(self, timeout: float = 60.0) -> Answer:
        try:
            return self._future.result(timeout=timeout)
        except grpc.RpcError as exc:
            return Refused(exc.code(), exc.details() or "")
        except grpc.FutureCancelledError:
            return Refused(grpc.StatusCode.CANCELLED, "cancelled by the hostile site")


class HostileSite:
    """``with HostileSite(address, "va", certs=folder) as site:`` — one site's connection.

    ``certs``: the site's provisioned folder (``sites/<name>``: mutual TLS and its token); None
    dials without TLS (a server started ``--insecure``).
    """

    def __init__(self, address: str, site: str, *, certs: Path | None = None) -> None:
        self.address = address
        self.site = site
        self.token: str | None = None
        self.session = ""
        self._credentials = None
        if certs is not None:
            from consortium.deploy.provision import load_site_credentials

            creds = load_site_credentials(certs, site)
            self.token = creds.token
            self._credentials = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem,
                                                             creds.cert_pem)

    def __enter__(self) -> HostileSite:
        if self._credentials is None:
            self.channel = grpc.insecure_channel(self.address, options=_OPTIONS)
        else:
            self.channel = grpc.secure_channel(self.address, self._credentials, options=_OPTIONS)
        self.stub = rpc.FederationStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    # -- the session -----------------------------------------------------------------------------

    def metadata(self, session: str | None = None) -> tuple[tuple[str, str], ...]:
        """The session metadata: this site's own, or any ``session`` the test chooses."""
        return ((SESSION_METADATA_KEY, self.session if session is None else session),)

    def register(self, *, client_version: str | None = None, site: str | None = None,
                 token: str | None = None) -> Any:
        """Register (as ``site``, default this one) with any ``client_version``; keeps the session.

        Returns the ``RegisterReply`` or a :class:`Refused`.
        """
        from consortium.deploy import package_version

        request = pb.RegisterRequest(
            site=self.site if site is None else site,
            client_version=package_version() if client_version is None else client_version,
        )
        if (token or self.token) is not None:
            request.token = token or self.token or ""
        reply = self._call(lambda: self.stub.Register(request, timeout=30))
        if not isinstance(reply, Refused):
            self.session = reply.session_id
        return reply

    def describe(self, input_shape: Iterable[int], num_classes: int, num_train: int,
                 num_test: int, *, session: str | None = None) -> Answer:
        """Any description, even sizes no data set has (the proto's integer ranges hold)."""
        info = pb.SiteInfo(input_shape=list(input_shape), num_classes=num_classes,
                           num_train=num_train, num_test=num_test)
        return self._call(lambda: self.stub.Describe(info, metadata=self.metadata(session),
                                                     timeout=30))

    def summarize(self, summary: pb.DataSummary) -> Answer:
        return self._call(lambda: self.stub.Summarize(summary, metadata=self.metadata(), timeout=30))

    def encoding(self, timeout: float = 60.0) -> pb.DataSummary:
        """The merged data summary, once every site has sent its own."""
        while True:
            reply = self.stub.Encoding(pb.PullRequest(wait_seconds=5), metadata=self.metadata(),
                                       timeout=timeout)
            if reply.ready:
                return reply

    def heartbeat(self, session: str | None = None) -> bool:
        """Whether the server still knows the session (and answers at all)."""
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(round=0, status="idle"),
                                    metadata=self.metadata(session), timeout=10)
        return bool(reply.registered)

    def try_heartbeat(self, session: str | None = None) -> Answer:
        """A heartbeat as an answer: :class:`Refused`, or an ``Ack`` accepting it when the
        server counted it as the session's sign of life (``registered``)."""
        reply = self._call(lambda: self.stub.Heartbeat(
            pb.HeartbeatRequest(round=0, status="working"), metadata=self.metadata(session),
            timeout=10))
        if isinstance(reply, Refused):
            return reply
        return pb.Ack(accepted=bool(reply.registered),
                      reason="registered" if reply.registered else "not registered")

    # -- work --------------------------------------------------------------------------------------

    def pull(self, wait_s: int = 5, *, session: str | None = None
             ) -> TaskEnvelope | ExchangeEnvelope | Wait | Finished:
        frames = self.stub.PullTask(pb.PullRequest(wait_seconds=wait_s),
                                    metadata=self.metadata(session), timeout=wait_s + 30)
        return decode_work(bytes(reassemble(frames, max_total_bytes=1 << 30)))

    def try_pull(self, wait_s: int = 1, *, session: str | None = None) -> Answer:
        """A pull as an answer: :class:`Refused`, or an accepting ``Ack`` naming what came
        (a pull with another site's session that succeeds has taken that site's work)."""
        try:
            item = self.pull(wait_s, session=session)
        except grpc.RpcError as exc:
            return Refused(exc.code(), exc.details() or "")
        return pb.Ack(accepted=True, reason=f"pulled {type(item).__name__}")

    def work(self, wait_s: int = 2) -> Iterator[TaskEnvelope | ExchangeEnvelope]:
        """Every task and exchange the server sends, until it says the run is finished."""
        while True:
            item = self.pull(wait_s)
            if isinstance(item, Finished):
                return
            if not isinstance(item, Wait):
                yield item

    # -- what it sends -----------------------------------------------------------------------------

    def push(self, item: ResultEnvelope | EvaluationEnvelope, *, session: str | None = None) -> Answer:
        """A chosen result or evaluation, encoded and chunked as a real site does."""
        return self.push_bytes(encode_upload(item), session=session)

    def push_bytes(self, payload: bytes, *, session: str | None = None) -> Answer:
        """Any bytes as an upload (correct frames around them)."""
        return self.push_frames(chunk(payload, uuid.uuid4().hex), session=session)

    def push_frames(self, frames: Iterable[pb.Chunk], *, session: str | None = None) -> Answer:
        """Any frames, in the order given: wrong totals, gaps, duplicates, no last frame."""
        return self._call(lambda: self.stub.PushResult(iter(list(frames)),
                                                       metadata=self.metadata(session), timeout=60))

    def stall(self, first: Iterable[pb.Chunk], rest: Iterable[pb.Chunk] = (), *,
              timeout: float = 120.0) -> StalledUpload:
        """An upload that sends ``first`` and waits (see :class:`StalledUpload`)."""
        return StalledUpload(self.stub, self.metadata(), list(first), list(rest), timeout=timeout)

    def exchange(self, envelope: ExchangeEnvelope, *, session: str | None = None) -> Answer:
        """A secure-aggregation (or any stage's) message, asked for or not."""
        payload = encode_exchange(envelope).SerializeToString()
        return self.exchange_bytes(payload, session=session)

    def exchange_bytes(self, payload: bytes, *, session: str | None = None) -> Answer:
        return self._call(lambda: self.stub.Exchange(chunk(payload, uuid.uuid4().hex),
                                                     metadata=self.metadata(session), timeout=60))

    @staticmethod
    def _call(call: Any) -> Answer:
        try:
            return call()
        except grpc.RpcError as exc:
            return Refused(exc.code(), exc.details() or "")

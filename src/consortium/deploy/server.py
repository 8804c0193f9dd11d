"""``consortium server``: the simulation's round loop, with sites reached over gRPC.

The server never sees data and never sends code: sites register (mutual TLS or a token),
receive the experiment's configuration, describe their data's shape and size, then pull
tasks and push results. Every result is validated before it touches the model and every
task, result and rejection goes into the run's hash-chained ``audit.jsonl``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from consortium.config import ExperimentConfig, load_config
from consortium.data.base import FederatedDataset, PackedClients, Split
from consortium.deploy import package_version
from consortium.deploy.audit import AUDIT_FILENAME, AuditLog
from consortium.deploy.hub import Hub, RemoteExecutor, SiteInfo
from consortium.deploy.logsafe import peer_text
from consortium.errors import ConfigError, ConsortiumError, MissingExtraError

if TYPE_CHECKING:
    from consortium.server.sampling import SecretSampler

__all__ = ["READ_BUFFER_BYTES", "FederationService", "StreamLimits", "serve", "sites_to_wait_for",
           "tune_malloc"]

log = logging.getLogger("consortium.server")

MAX_RESULT_BYTES = 2 << 30

READ_BUFFER_BYTES = 64 << 10
"""The most a site's connection holds for its next read (gRPC's
``grpc.experimental.tcp_max_read_buffer_size``). gRPC grows a connection's read buffer after
every large read (to 2 MB and more after a 1 MB upload) and keeps its spare slices for the
connection's next read, so 1,000 idle sites held 0.9 GB between their uploads
(benchmarks/deployment/memory_probe.py)."""


@dataclass(frozen=True)
class StreamLimits:
    """How long a site's stream may hold the server's memory and a place in its queues.

    A stream that moves no frame for ``idle_timeout_s`` seconds is aborted and its buffer
    released (a stalled upload otherwise pins its memory for as long as the peer keeps the
    connection open). After that first interval a stream must also average ``min_rate``
    bytes a second, so a peer trickling one byte just inside the idle timeout is cut too;
    0 turns the floor off. Both apply to uploads (``PushResult``, ``Exchange``) and to the
    task a site pulls (``PullTask``).

    At most ``uploads_at_once`` uploads are read at a time; the others wait, unread, for a
    place (their time waiting does not count against the idle timeout). A waiting upload
    holds no more than its stream's HTTP/2 flow-control window (64 KiB) in gRPC, so when a
    thousand sites answer together the server holds that many partly received uploads, not
    a thousand.

    Args:
        idle_timeout_s: seconds without a frame before a stream is aborted
            (``consortium server --stream-idle-timeout``).
        min_rate: bytes a second a stream must average once it is older than
            ``idle_timeout_s`` (``--stream-min-rate``).
        uploads_at_once: uploads (``PushResult``, ``Exchange``) read at the same time.
    """

    idle_timeout_s: float = 30.0
    min_rate: float = 16 * 1024
    uploads_at_once: int = 32

    def __post_init__(self) -> None:
        if not self.idle_timeout_s > 0:
            raise ConfigError(f"--stream-idle-timeout {self.idle_timeout_s}: give seconds > 0, e.g. 30")
        if not self.min_rate >= 0:
            raise ConfigError(f"--stream-min-rate {self.min_rate}: give bytes a second >= 0 (0: off)")
        if not self.uploads_at_once >= 1:
            raise ConfigError(f"uploads_at_once = {self.uploads_at_once}: at least 1 upload must "
                              "be read at a time, e.g. 32")

    def wait_s(self, started: float, moved: int, now: float) -> float:
        """How long the stream may wait for its next frame, having moved ``moved`` bytes
        since ``started`` (monotonic seconds); <= 0: it is too slow already."""
        wait = self.idle_timeout_s
        if self.min_rate:
            wait = min(wait, started + self.idle_timeout_s + moved / self.min_rate - now)
        return wait


class StreamStalled(ConsortiumError):
    """A site's stream moved no frame for the idle timeout, or fell below the byte-rate floor."""


def _guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An RPC handler that answers a malformed call with one warning line and an error status,
    never with a traceback in the operator's log (the peer chooses what goes wrong)."""

    @functools.wraps(handler)
    async def run(self: FederationService, request: Any, context: Any) -> Any:
        grpc = _grpc()
        try:
            if isinstance(request, _Malformed):
                raise ValueError(request.reason)
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.warning("refused a malformed %s call from %s: %s", handler.__name__,
                        peer_text(context.peer(), 80), peer_text(f"{type(exc).__name__}: {exc}"))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the server could not process this {handler.__name__} call")

    return run


def _grpc() -> Any:
    try:
        import grpc
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise MissingExtraError("deployment over gRPC", "deploy", "grpcio") from exc
    return grpc


class FederationService:
    """The ``consortium.v1.Federation`` service (grpc.aio), backed by a :class:`Hub`."""

    def __init__(
        self, hub: Hub, *, registry: Any | None, heartbeat_s: int = 30,
        registry_dir: Path | None = None, limits: StreamLimits | None = None,
    ) -> None:
        self.hub = hub
        self.limits = limits if limits is not None else StreamLimits()
        # site -> (session, stop event) of its upload in flight: one at a time per site
        self._uploads: dict[str, tuple[str, asyncio.Event]] = {}
        self.registry = registry  # None: --insecure, sites are who they claim to be
        self.heartbeat_s = heartbeat_s
        # the provisioned registry is re-read when it changes (`consortium provision --revoke`
        # on the server's folder): a revoked site loses its session at once
        self._registry_dir = registry_dir
        self._registry_stamp = _stamp(registry_dir)
        self._registry_checked = time.monotonic()
        for site in sorted(hub.roster or ()):  # a resumed run's sites revoked while it was down
            record = registry.sites.get(site) if registry is not None else None
            if record is not None and record.revoked:
                hub.expel(site, f"site {site!r} is revoked")
        from consortium.deploy.codec import ParametersCache

        self._parameters = ParametersCache()  # the round's model, serialized once
        # at most this many tasks stream out at once: gRPC buffers every concurrent send, and
        # 1,000 sites pulling a 1 MB model together held gigabytes (benchmarks/deployment.py)
        self._sending = asyncio.Semaphore(32)
        # and at most this many uploads are read at once (StreamLimits.uploads_at_once)
        self._receiving = asyncio.Semaphore(self.limits.uploads_at_once)
        self.reading = 0  # uploads being read now
        self.reading_peak = 0  # the most read at once so far
        self._fingerprints: dict[bytes, str] = {}  # client certificate PEM -> SHA-256

    def current_registry(self, *, force: bool = False) -> Any:
        """The registry, re-read if its files changed (checked at most every
        :data:`REGISTRY_CHECK_S`, or now with ``force``: two ``stat`` calls, a few µs); sites
        revoked since are expelled from the run."""
        if self.registry is None or self._registry_dir is None:
            return self.registry
        if time.monotonic() - self._registry_checked < REGISTRY_CHECK_S and not force:
            return self.registry
        self._registry_checked = time.monotonic()
        stamp = _stamp(self._registry_dir)
        if stamp == self._registry_stamp:
            return self.registry
        from consortium.deploy.provision import load_registry

        try:
            fresh = load_registry(self._registry_dir)
        except ConfigError as exc:
            log.warning("the site registry changed but cannot be read (%s); keeping the old one", exc)
            return self.registry
        self._registry_stamp = stamp
        before = {s for s, r in self.registry.sites.items() if r.revoked}
        revoked = sorted({s for s, r in fresh.sites.items() if r.revoked} - before)
        self.registry = fresh
        for site in revoked:
            self.hub.expel(site, f"site {site!r} was revoked during the run")
        return fresh

    @_guarded
    async def Register(self, request: Any, context: Any) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb

        grpc = _grpc()
        site = request.site
        if self.registry is None and peer_text(site, 64) != site:
            # --insecure: the claimed name is the site's name in every log line and audit entry
            log.warning("refused a connection claiming the site name %r: not a plain name of "
                        "at most 64 characters", peer_text(site))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a site name is 1-64 printable characters, e.g. 'hospital-a'")
        if self.registry is not None:
            self.current_registry()
            from consortium.deploy.provision import AuthenticationError, authenticate

            certs = dict(context.auth_context()).get("x509_pem_cert") or [None]

            def attempt() -> str:
                assert self.registry is not None  # with certificates the registry is loaded
                return authenticate(
                    self.registry, peer_cert_pem=certs[0],
                    token=request.token if request.HasField("token") else None,
                    claimed_site=request.site, require_token=True,
                )

            try:
                try:
                    site = attempt()
                except AuthenticationError:
                    # a site provisioned a moment ago (consortium provision --add-site) joins
                    # the run in progress (deploy/roster.py): look at the registry's files now
                    before = self.registry
                    if self.current_registry(force=True) is before:
                        raise
                    site = attempt()
            except AuthenticationError as exc:
                log.warning("refused a connection from %s claiming site %r: %s",
                            peer_text(context.peer(), 80), peer_text(request.site),
                            peer_text(exc))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, peer_text(exc, 500))
        if request.client_version and request.client_version != package_version():
            log.warning("site %r runs consortium %s, the server %s; install the same version",
                        site, peer_text(request.client_version, 80), package_version())
        try:
            session = self.hub.register(site)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc}; its connections are refused")
        return pb.RegisterReply(
            session_id=session, server_version=package_version(), run_id=self.hub.run_id,
            heartbeat_seconds=self.heartbeat_s, config_toml=self.hub.config_toml,
            server_certificate=self.hub.server_certificate, purpose=self.hub.purpose,
        )

    async def _session(self, context: Any) -> str:
        from consortium.deploy.codec import SESSION_METADATA_KEY

        grpc = _grpc()
        session = dict(context.invocation_metadata()).get(SESSION_METADATA_KEY, "")
        if self.registry is not None:
            self.current_registry()
        try:
            site = self.hub.site_of(session)
        except KeyError:
            expelled = self.hub.expelled_reason(session)
            if expelled is not None:  # no "register again": the site stops with the reason
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"{expelled}; its connections are refused")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown session; register again")
        if self.registry is not None and not self._is_peer(context, site):
            # a session id is bound to the TLS identity that registered it: another site's
            # connection cannot act for it, even with its session id
            log.warning("refused a call for site %r's session from another TLS identity", site)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this session belongs to another site's certificate")
        return str(session)

    def _is_peer(self, context: Any, site: str) -> bool:
        """Whether the call's client certificate is the one provisioned for ``site``."""
        certs = dict(context.auth_context()).get("x509_pem_cert") or [None]
        pem = certs[0]
        if not pem:
            return False
        fingerprint = self._fingerprints.get(pem)
        if fingerprint is None:
            from consortium.deploy.provision import certificate_fingerprint

            try:
                fingerprint = certificate_fingerprint(pem)
            except Exception:
                return False
            if len(self._fingerprints) < 4096:  # one entry per site certificate
                self._fingerprints[pem] = fingerprint
        registry = self.registry
        record = registry.sites.get(site) if registry is not None else None
        return record is not None and record.fingerprint == fingerprint

    @_guarded
    async def Describe(self, request: Any, context: Any) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb

        session = await self._session(context)
        info = SiteInfo(tuple(int(v) for v in request.input_shape), int(request.num_classes),
                        int(request.num_train), int(request.num_test))
        if not info.input_shape or any(v < 1 for v in info.input_shape) or info.num_classes < 2:
            return pb.Ack(accepted=False, reason="input_shape and num_classes must be positive")
        refused = _implausible(info)
        if refused is not None:
            log.warning("site %r: %s", self.hub.site_of(session), refused)
            return pb.Ack(accepted=False, reason=refused)
        refused = self.hub.describe(session, info)
        if refused is not None:
            log.warning("%s", refused)
            return pb.Ack(accepted=False, reason=refused)
        return pb.Ack(accepted=True)

    @_guarded
    async def Summarize(self, request: Any, context: Any) -> Any:
        from consortium.deploy.codec import DecodeError
        from consortium.deploy.proto import consortium_pb2 as pb
        from consortium.deploy.summary import schema_from_pb, summary_from_pb

        session = await self._session(context)
        try:
            refused = self.hub.submit_summary(session, summary_from_pb(request),
                                              schema_from_pb(request))
        except DecodeError as exc:
            refused = str(exc)
        if refused is not None:
            refused = peer_text(refused, 500)  # it may quote the site's column names
            log.warning("refused a data summary: %s", refused)
            return pb.Ack(accepted=False, reason=refused)
        return pb.Ack(accepted=True)

    @_guarded
    async def Encoding(self, request: Any, context: Any) -> Any:
        from consortium.deploy.proto import consortium_pb2 as pb
        from consortium.deploy.summary import summary_to_pb

        await self._session(context)
        merged = await self.hub.merged_summary(min(max(float(request.wait_seconds), 0.1), 60.0))
        if self.hub.merge_error is not None:
            await context.abort(_grpc().StatusCode.FAILED_PRECONDITION, self.hub.merge_error)
        if merged is None:
            return pb.DataSummary(ready=False)
        return summary_to_pb(merged, schema=self.hub.schema)

    @_guarded
    async def PullTask(self, request: Any, context: Any) -> None:
        """Stream the site's next work item; a site that stops reading it (no frame taken for
        the idle timeout, or below the byte-rate floor) loses the stream and its place."""
        from consortium.deploy.codec import chunk_frames, encode_work_parts

        session = await self._session(context)
        wait_s = min(max(float(request.wait_seconds), 0.1), 60.0)
        try:
            item = await self.hub.next_work(session, wait_s)
        except PermissionError as exc:  # expelled while it waited
            await context.abort(_grpc().StatusCode.UNAUTHENTICATED,
                                f"{exc}; its connections are refused")
        async with self._sending:
            started, sent = time.monotonic(), 0
            # serialized frames, each copied once from the round's shared model bytes (it
            # was serialized for this site by concatenation, then sliced, wrapped and
            # serialized again: four more copies of the model per site and round)
            parts = encode_work_parts(item, cache=self._parameters)
            for frame in chunk_frames(parts, uuid.uuid4().hex):
                wait = self.limits.wait_s(started, sent, time.monotonic())
                try:
                    await asyncio.wait_for(context.write(frame), max(wait, 0.001))
                except asyncio.TimeoutError:
                    why = (f"the site took no frame of its task for {wait:.0f} s or fell below "
                           f"{self.limits.min_rate:.0f} bytes/s; the stream is dropped")
                    log.warning("site %r: %s", self.hub.site_of(session), why)
                    await context.abort(_grpc().StatusCode.DEADLINE_EXCEEDED, why)
                sent += len(frame)

    @_guarded
    async def PushResult(self, request_iterator: Any, context: Any) -> Any:
        from consortium.deploy.codec import decode_upload

        return await self._upload(request_iterator, context, "upload", lambda session, raw:
                                  self.hub.deliver(session, decode_upload(raw)))

    @_guarded
    async def Exchange(self, request_iterator: Any, context: Any) -> Any:
        from consortium.deploy.codec import decode_exchange

        return await self._upload(request_iterator, context, "exchange", lambda session, raw:
                                  self.hub.deliver_exchange(session, decode_exchange(bytes(raw))))

    async def _upload(
        self, frames: Any, context: Any, what: str,
        deliver: Callable[[str, bytearray], tuple[bool, str]],
    ) -> Any:
        """Receive one upload within the limits, then ``deliver`` it; every failure is a
        counted rejection of it.

        One upload per site is in flight at a time: a second one on the same session is
        refused at once; one on a newer session (the site registered again) ends the old
        session's stream, which nobody can answer any more. At most
        ``StreamLimits.uploads_at_once`` uploads are read at a time; the others wait, unread,
        and their stall clock starts when their turn comes. A stream that stalls is aborted
        (:class:`StreamLimits`), its buffer released."""
        from consortium.deploy.proto import consortium_pb2 as pb

        session = await self._session(context)
        site = self.hub.site_of(session)
        held = self._uploads.get(site)
        if held is not None and held[0] == session:
            accepted, reason = self.hub.reject(
                site, "-", -1, f"a second {what} while one is in flight; send one at a time")
            return pb.Ack(accepted=accepted, reason=reason)
        if held is not None:
            held[1].set()
        stop = asyncio.Event()
        self._uploads[site] = (session, stop)
        try:
            async with self._receiving:  # wait, unread, for a place (StreamLimits)
                self.reading += 1
                self.reading_peak = max(self.reading_peak, self.reading)
                try:
                    raw = await _reassemble(frames, self.hub.upload_limit(), limits=self.limits,
                                            stop=stop)
                finally:
                    self.reading -= 1
            accepted, reason = deliver(session, raw)
        except StreamStalled as exc:
            self.hub.reject(site, "-", -1, f"{what} dropped: {exc}")
            await context.abort(_grpc().StatusCode.CANCELLED if stop.is_set()
                                else _grpc().StatusCode.DEADLINE_EXCEEDED, str(exc))
        except Exception as exc:  # what the site sent, whatever it is, is refused, not raised
            from consortium.deploy.codec import DecodeError

            why = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
            accepted, reason = self.hub.reject(site, "-", -1, f"undecodable {what}: {why}")
        finally:
            if site in self._uploads and self._uploads[site][1] is stop:
                del self._uploads[site]
        return pb.Ack(accepted=accepted, reason=reason)

    @_guarded
    async def Heartbeat(self, request: Any, context: Any) -> Any:
        from consortium.deploy.codec import SESSION_METADATA_KEY
        from consortium.deploy.proto import consortium_pb2 as pb

        session = dict(context.invocation_metadata()).get(SESSION_METADATA_KEY, "")
        site = self.hub.site_named(session)
        if site is not None and self.registry is not None and not self._is_peer(context, site):
            # a leaked session id must not keep another site's task alive: checked before the
            # heartbeat counts as the site's call
            log.warning("refused a heartbeat for site %r's session from another TLS identity", site)
            return pb.HeartbeatReply(registered=False)
        try:
            self.hub.site_of(session)
        except KeyError:
            return pb.HeartbeatReply(registered=False)
        return pb.HeartbeatReply(registered=True)


async def _reassemble(
    frames: AsyncIterator[Any], limit: int, *, limits: StreamLimits | None = None,
    stop: asyncio.Event | None = None,
) -> bytearray:
    """The payload of an upload stream, at most ``limit`` bytes, its buffer growing with what
    arrives; with ``limits``, :class:`StreamStalled` once the stream waits too long for a
    frame, or at once when ``stop`` is set.

    Raises:
        DecodeError: a bad frame, too many bytes, or the stream ended before its last frame.
        StreamStalled: no frame within the idle timeout, below the byte-rate floor, or stopped.
    """
    from consortium.deploy.codec import DecodeError, Reassembler

    assembler = Reassembler(limit)
    iterator = frames.__aiter__()
    started = time.monotonic()
    while True:
        try:
            wait = None if limits is None else max(
                limits.wait_s(started, assembler.received, time.monotonic()), 0.001)
            frame = await _next_frame(iterator, wait, stop)
        except StopAsyncIteration:
            raise DecodeError("the stream ended before its last chunk") from None
        except asyncio.TimeoutError:
            if stop is not None and stop.is_set():
                raise StreamStalled("the site started another upload on a newer session; this "
                                    "one (of its old session) is dropped") from None
            assert limits is not None  # no timeout without limits
            floor = f" or slower than {limits.min_rate:.0f} bytes/s" if limits.min_rate else ""
            raise StreamStalled(
                f"{assembler.received} of {assembler.total_size} bytes after "
                f"{time.monotonic() - started:.0f} s: no frame for {limits.idle_timeout_s:g} s"
                f"{floor} (--stream-idle-timeout, --stream-min-rate)"
            ) from None
        if isinstance(frame, _Malformed):
            raise DecodeError(frame.reason)
        out = assembler.feed(frame)
        if out is not None:
            return out  # decoded in place: no second copy of a large upload


async def _next_frame(iterator: Any, wait: float | None, stop: asyncio.Event | None) -> Any:
    """The stream's next frame; ``asyncio.TimeoutError`` after ``wait`` seconds or once
    ``stop`` is set (the read is cancelled then)."""
    if wait is None and stop is None:
        return await iterator.__anext__()
    read = asyncio.ensure_future(iterator.__anext__())
    waiting: set[asyncio.Future[Any]] = {read}
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopped is not None:
        waiting.add(stopped)
    try:
        done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopped is not None:
            stopped.cancel()
    if read in done:
        return read.result()
    read.cancel()
    raise asyncio.TimeoutError


@dataclass(frozen=True)
class _Malformed:
    """A request gRPC could not parse: handed to the handler, which refuses it in one line
    (gRPC itself would log the parser's traceback)."""

    reason: str


def _lenient(message: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except Exception as exc:
            return _Malformed(f"{len(data)} bytes are not a consortium.v1.{message.__name__} "
                              f"message: {peer_text(exc)}")

    return parse


def _serializer(message: Any) -> Callable[[Any], bytes]:
    """``message.SerializeToString``, passing through a reply that is serialized already
    (``PullTask``'s frames, :func:`~consortium.deploy.codec.chunk_frames`)."""
    serialize = message.SerializeToString

    def run(reply: Any) -> bytes:
        return reply if isinstance(reply, bytes) else bytes(serialize(reply))

    return run


def _add_service(service: FederationService, server: Any) -> None:
    """``add_FederationServicer_to_server``, with request parsers that never raise: a request
    that is not the message it should be reaches the handler as :class:`_Malformed` and is
    refused with one warning line (the generated code's parser fails inside gRPC, which logs
    a traceback for every such request)."""
    grpc = _grpc()
    from consortium.deploy.proto import consortium_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["Federation"].methods
    handlers = {}
    for method in methods:
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(service, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=_serializer(getattr(pb, method.output_type.name)),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("consortium.v1.Federation", handlers),))


REGISTRY_CHECK_S = 0.05
"""How often a call may look at the registry's files: a revocation takes effect within this
(plus one call) — at 1 s a run of fast rounds (35 ms each on the heart demo) could finish 28
rounds before a revoked site was expelled."""


def _stamp(directory: Path | None) -> tuple[tuple[int, int], ...]:
    """When and how big the registry files are: changes when `consortium provision` rewrites
    them (atomically)."""
    if directory is None:
        return ()
    out = []
    for name in ("sites.json", "tokens.json"):
        try:
            st = (directory / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


class _ServerThread:
    """The grpc.aio server in its own thread and event loop."""

    def __init__(
        self, listen: str, *, certs: Path | None, hub_args: dict[str, Any], heartbeat_s: int = 30,
        limits: StreamLimits | None = None,
    ) -> None:
        self.limits = limits
        self.service: FederationService | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.heartbeat_s = heartbeat_s
        self.listen = listen
        self.certs = certs
        self.hub_args = hub_args
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.hub: Hub | None = None
        self.port = 0
        self._server: Any = None
        self._thread = threading.Thread(target=self._run, name="consortium-grpc", daemon=True)

    def start(self) -> Hub:
        self._thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error
        assert self.hub is not None
        return self.hub

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # surfaced to the caller of start()
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        grpc = _grpc()
        self.hub = Hub(self.loop, **self.hub_args)
        registry = None
        options = [("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.max_send_message_length", 8 << 20),
                   # HTTP/2 windows stay at 64 KiB instead of growing per connection: at
                   # 1,000 sites, 0.77x the CPU per upload and less memory (transport_floor.py)
                   ("grpc.http2.bdp_probe", 0),
                   ("grpc.experimental.tcp_max_read_buffer_size", READ_BUFFER_BYTES)]
        self._server = grpc.aio.server(options=options)
        if self.certs is not None:
            from consortium.deploy.provision import load_server_credentials

            creds = load_server_credentials(self.certs)
            registry = creds.registry
            server_creds = grpc.ssl_server_credentials(
                [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem,
                require_client_auth=True,
            )
            self.port = self._server.add_secure_port(self.listen, server_creds)
        else:
            self.port = self._server.add_insecure_port(self.listen)
        if not self.port:
            raise ConfigError(f"cannot listen on {self.listen!r}; is the port in use?")
        service = FederationService(
            self.hub, registry=registry, heartbeat_s=self.heartbeat_s,
            registry_dir=creds.directory if self.certs is not None else None, limits=self.limits,
        )
        self.service = service
        _add_service(service, self._server)
        await self._server.start()
        self._flusher = asyncio.ensure_future(self._flush_rejections(self.hub))

    @staticmethod
    async def _flush_rejections(hub: Hub) -> None:
        """Every rejection window, audit the counts of the rejections not written in full."""
        while True:
            await asyncio.sleep(hub.rejections.window_s)
            hub.flush_rejections()

    def stop(self) -> None:
        async def _stop() -> None:
            if self._flusher is not None:
                self._flusher.cancel()
            await self._server.stop(grace=1.0)

        if self._server is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class _RoundReport:
    """The operator's view: one line per round — sites connected, results, rejections."""

    def __init__(self, hub: Hub, rounds: int) -> None:
        self.hub = hub
        self.rounds = rounds
        self._rejected = 0  # hub.rejected_total at the last report
        self._logged = 0  # hub.rejected_logged at the last report

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        total, logged, latest = self.hub.latest_rejections()
        count = total - self._rejected
        new = min(logged - self._logged, len(latest))
        self._rejected, self._logged = total, logged
        # the newest few in full: a site sending garbage in a loop must not flood the report
        rejected = latest[len(latest) - min(new, 10):]
        failed = record.get("failed") or {}
        acc = record.get("accuracy")
        line = (
            f"consortium server: round {record['round']}/{self.rounds}: "
            + (f"sites {record['sites_online']}/{record['sites']} online"
               if "sites_online" in record else f"{len(self.hub.connected())} sites connected")
            + f", {record['clients']} results"
            + (f", {len(failed)} without an update" if failed else "")
            + (f", {record['stale']} stale" if record.get("stale") else "")
            + (f", {count} rejected" if count else "")
            + (f", accuracy {acc:.3f}" if isinstance(acc, float) else "")
            + (f" — aborted: {record['aborted']}" if record.get("aborted") else "")
        )
        print(line, file=sys.stderr, flush=True)
        for reason in rejected:
            print(f"consortium server:   {reason}", file=sys.stderr, flush=True)
        if count > len(rejected):
            print(f"consortium server:   ... and {count - len(rejected)} more rejections "
                  "(audit.jsonl)", file=sys.stderr, flush=True)
        shown = sorted(failed.items())[:5]
        for site, why in shown:  # rejections are printed above with their own reason
            if not str(why).startswith("rejected"):
                print(f"consortium server:   {site}: {why}", file=sys.stderr, flush=True)
        if len(failed) > len(shown):
            print(f"consortium server:   ... and {len(failed) - len(shown)} more (metrics.jsonl "
                  "'failed')", file=sys.stderr, flush=True)


def _placeholder_dataset(cfg: ExperimentConfig, sites: dict[str, SiteInfo]) -> FederatedDataset:
    """Each site's declared sizes over one broadcast zero row (no memory per example): the
    round loop needs ids and sizes, the server never reads (or holds) data."""
    shapes = {info.input_shape for info in sites.values()}
    classes = {info.num_classes for info in sites.values()}
    if len(shapes) != 1 or len(classes) != 1:
        def odd(key: Any) -> list[str]:  # the sites that differ from the most common value
            counts: dict[Any, int] = {}
            for info in sites.values():
                counts[key(info)] = counts.get(key(info), 0) + 1
            usual = max(counts, key=lambda v: (counts[v], str(v)))
            return sorted(s for s, info in sites.items() if key(info) != usual)

        differ = sorted(set(odd(lambda i: i.input_shape)) | set(odd(lambda i: i.num_classes)))
        described = "; ".join(f"{s}: shape {list(sites[s].input_shape)}, {sites[s].num_classes} "
                              "classes" for s in differ)
        raise ConfigError(
            f"the sites' data do not agree: site(s) {differ} differ from the others ({described}; "
            f"input shapes {sorted(shapes)}, classes {sorted(classes)}); every site must encode "
            "the same features and labels — check those sites' files"
        )
    (shape,), (num_classes,) = shapes, classes

    names = sorted(sites)

    def placeholder(sizes: list[int]) -> tuple[Split, torch.Tensor]:
        total = sum(sizes)
        x = torch.zeros((1, *shape)).expand(total, *shape)
        y = torch.zeros(1, dtype=torch.long).expand(total)
        return Split(x, y), torch.cumsum(torch.tensor([0, *sizes]), 0)

    train, train_offsets = placeholder([sites[n].num_train for n in names])
    test, test_offsets = placeholder([sites[n].num_test for n in names])
    packed = PackedClients(names, train=train, test=test, train_offsets=train_offsets,
                           test_offsets=test_offsets)
    return FederatedDataset(cfg.data.dataset, packed, num_classes, shape)


def _assembled(membership: Any, kept: dict[str, Any], federation: Any) -> None:
    """``simulate``'s ``on_assembled``: the roster takes the run's parts, and ``kept`` the
    :class:`~consortium.federation.Federation` ([interpret] and [contribution] after the run)."""
    membership.attach(federation)
    kept["fed"] = federation


SAMPLING_SECRET = "sampling_secret"
"""The key of the server's sampling secret in its checkpoint's extras (never sent to sites)."""


def _sampling_secret(saved: dict[str, Any], *, resumed: bool) -> str | None:
    """A fresh secret for a new run; a resumed run's own, so it samples the same cohorts. None:
    a run checkpointed before the server kept a secret, which goes on sampling from the run
    seed as it did (its privacy.json then says the sample is not secret)."""
    from consortium.server.sampling import new_sampling_secret

    if not resumed:
        return new_sampling_secret()
    secret = saved.get(SAMPLING_SECRET)
    return str(secret) if secret is not None else None


def participation_sampler(
    cfg: ExperimentConfig, population: int, secret: str | None
) -> SecretSampler | None:
    """The experiment's sampler, drawing from the server's ``secret`` instead of the run seed:
    every site has the run seed (it reads its data split from it), so a sample drawn from it
    would be no secret and amplification by sampling would not hold. None: the run seed's
    sampler, as :func:`~consortium.simulation.simulate` builds it."""
    if secret is None:
        return None
    from consortium.privacy.plan import plan_sampler
    from consortium.server.sampling import SecretSampler

    return SecretSampler(plan_sampler(cfg, population), secret)


def tune_malloc() -> bool:
    """Keep freed megabyte buffers in the heap instead of returning them to the kernel.

    Every upload and task is a fresh 1 MB+ buffer; glibc serves those with mmap by default, so
    each one page-faults (and zeroes) its pages anew — 550 to 1,000 faults per 1 MB upload
    here. With the thresholds raised, a freed buffer is reused: receiving a 1 MB upload
    through grpc.aio cost 0.43× the CPU at one site and 0.85-0.9× at 50-1,000 sites
    (benchmarks/deployment/transport_floor.py). The price: memory freed after a round stays
    with the process. glibc only; elsewhere nothing changes. Returns whether it applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (m_mmap_threshold, 16 << 20), (m_trim_threshold, 512 << 20), (m_top_pad, 16 << 20),
        ))
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        return False


def _raise_file_limit(sites: int) -> None:
    """One open connection per site: raise the soft limit on open files towards the hard one."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    need = sites + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            print(f"consortium server: WARNING only {target} open files allowed (ulimit -n); "
                  f"{sites} sites need about {need}", file=sys.stderr)


_MAX_EXAMPLES = 1 << 31
_MAX_FEATURES = 1 << 31
_MAX_CLASSES = 1 << 20


def _implausible(info: SiteInfo) -> str | None:
    """Why a site's description cannot be real (sizes that would overflow the server's
    arithmetic or allocations), or None."""
    if len(info.input_shape) > 8:
        return f"an input of {len(info.input_shape)} dimensions; at most 8 are supported"
    features = 1
    for v in info.input_shape:
        features *= v
        if features > _MAX_FEATURES:
            return f"input shape {list(info.input_shape)} has more than 2**31 values"
    if info.num_classes > _MAX_CLASSES:
        return f"{info.num_classes} classes; at most 2**20 are supported"
    if info.num_train > _MAX_EXAMPLES or info.num_test > _MAX_EXAMPLES:
        return (f"{info.num_train} training and {info.num_test} test examples; at most 2**31 "
                "each are supported")
    return None


def _log_checkpoint(audit: AuditLog, rnd: int, digest: str) -> None:
    """Record a checkpoint's digest before it replaces the previous one (``--resume`` refuses
    a checkpoint whose digest is not the last one recorded), on disk before it is used."""
    audit.append("checkpoint", round=rnd, sha256=digest)
    audit.sync()


def _with_update_bound(cfg: ExperimentConfig, flag: float | None) -> ExperimentConfig:
    """``cfg`` with the update bound a deployment runs with: ``--update-bound`` if given,
    else the config's, and :data:`~consortium.aggregation.bound.DEFAULT_MULTIPLIER` for the
    config's 0 (a server does not trust its sites by default; only the flag turns it off).
    The resolved value is written to the run's config.toml, so ``--resume`` keeps it."""
    from consortium.aggregation.bound import DEFAULT_MULTIPLIER, check_multiplier

    if flag is None:
        multiplier = cfg.aggregation.update_bound or DEFAULT_MULTIPLIER
    else:
        multiplier = check_multiplier(flag, where="--update-bound")
        if multiplier == 0:
            print("consortium server: WARNING --update-bound 0: no bound on the sites' updates; "
                  "one site can move the model as far as it likes in a round (FedAvg's mean "
                  "is not robust). Keep it only with a robust aggregation.rule or sites you "
                  "trust", file=sys.stderr)
    return cfg.replace(aggregation=dataclasses.replace(cfg.aggregation, update_bound=multiplier))


def update_bound_line(cfg: ExperimentConfig) -> str:
    """The start line that says which bound on a single site's update is in force."""
    multiplier = cfg.aggregation.update_bound
    if cfg.secure_aggregation.enabled:
        return ("update bound: not applied by the server: secure aggregation hides single "
                "updates; each site is bounded by the secure-aggregation range "
                f"(secure_aggregation.clip = {cfg.secure_aggregation.clip:g}) at the site")
    if cfg.privacy.mode == "central":
        return ("update bound: central DP's clip norm (privacy.clip), re-applied by the server "
                "to every update, with weight 1 and a centred bit of ±1/2")
    if multiplier == 0:
        return "update bound: OFF (aggregation.update_bound = 0 in this run)"
    return (f"update bound: every update scaled to at most {multiplier:g} × the round's median "
            "update norm (aggregation.update_bound; --update-bound X)")


def sites_to_wait_for(
    cfg: ExperimentConfig, *, min_sites: int | None, certs: str | Path | None,
    roster: Mapping[str, Any] | None = None,
) -> list[str] | int:
    """Whom round 1 waits for: the sites' names, or how many (``--insecure``).

    The federation is known before it starts: a consortium provisioned its sites, so the
    server waits for every one that is not revoked (a site that connects late joins from the
    next round: :mod:`consortium.deploy.roster`; ``--closed-roster`` refuses it). A resumed
    run waits for the
    sites it started with (its checkpointed ``roster``), less those revoked since. Without
    certificates nobody is known by name: ``sampling.clients_per_round`` (else 1, with a
    warning). ``min_sites`` (``--min-sites``) overrides all of this with a count.

    Raises:
        ConfigError: ``min_sites`` < 1, or no provisioned site is left unrevoked.
    """
    if min_sites is not None:
        if min_sites < 1:
            raise ConfigError(f"--min-sites {min_sites}: give at least 1 site")
        return min_sites
    if certs is None:
        if roster:  # a resumed run: the sites it started with, by the names they claimed
            return sorted(roster)
        if cfg.sampling.clients_per_round > 0:
            return cfg.sampling.clients_per_round
        print("consortium server: WARNING --insecure without sampling.clients_per_round: "
              "round 1 starts with the first site that connects, and later sites join from "
              "the next round (refused with --closed-roster); give --min-sites N",
              file=sys.stderr)
        return 1
    from consortium.deploy.provision import load_registry

    registry = load_registry(certs)
    known = sorted(roster) if roster else sorted(registry.sites)
    names = [s for s in known if not (s in registry.sites and registry.sites[s].revoked)]
    if not names:
        raise ConfigError(
            f"every site provisioned in {str(certs)!r} is revoked: nobody can take part; "
            "add one with `consortium provision --add-site NAME`"
        )
    return names


def _waiting_for(wait_for: list[str] | int) -> str:
    """The start line's words for whom the server waits."""
    if isinstance(wait_for, int):
        return f"{wait_for} site(s)"
    return f"the {len(wait_for)} provisioned sites {wait_for} (--min-sites N: fewer)"


def _announce_ready(site: str, state: str, count: int, needed: int) -> None:
    """One line per site as it connects and as it is ready, so that a missing site is noticed
    before the run starts."""
    print(f"consortium server: site {site!r} {state} ({count} of {needed})", file=sys.stderr,
          flush=True)


def serve(
    config: str | Path | None,
    *,
    listen: str,
    certs: str | Path | None,
    out: str | Path,
    min_sites: int | None = None,
    overrides: Sequence[str] = (),
    register_timeout: float = 300.0,
    round_timeout: float = 600.0,
    min_results: int = 1,
    over_select: float = 0.0,
    heartbeat_s: int = 30,
    stream_idle_timeout: float = 30.0,
    stream_min_rate: float = 16 * 1024,
    on_listening: Any = None,
    progress: bool = True,
    resume: str | Path | None = None,
    update_bound: float | None = None,
    closed_roster: bool = False,
) -> Any:
    """Run the experiment with the sites that connect; return the :class:`SimulationResult`.

    ``certs`` None means ``--insecure`` (no TLS, sites are who they claim to be). ``resume``:
    continue the run in that directory from its last checkpoint (after a crash or a kill); the
    sites reconnect by themselves. A round with fewer than ``min_results`` results by its
    deadline is skipped (the model stays; ``aborted`` in metrics.jsonl). ``over_select`` =
    x > 0: a round closes once ceil(n / (1 + x)) of its n sites answered (the run is then not
    reproducible bit for bit: which sites are cut depends on timing). ``update_bound``: the
    multiple of the round's median update norm that bounds every update (``--update-bound``;
    None: ``aggregation.update_bound``, whose 0 means 3.0 here; 0: off, with a warning).
    ``stream_idle_timeout`` and ``stream_min_rate``: a site's stream that moves no frame for
    that many seconds, or averages fewer bytes a second after that, is dropped
    (:class:`StreamLimits`). ``min_sites``: round 1 starts once that many sites described
    their data; None (the default) waits for every provisioned, unrevoked site of ``certs``
    (a resumed run: the sites it started with), or for ``sampling.clients_per_round`` with
    ``--insecure`` (:func:`sites_to_wait_for`). A provisioned site that connects after round 1
    joins the run from the next round, and a site that leaves is not sampled until it is
    back (:mod:`consortium.deploy.roster`); ``closed_roster`` (``--closed-roster``) refuses
    late sites instead.
    """
    limits = StreamLimits(idle_timeout_s=stream_idle_timeout, min_rate=stream_min_rate)
    if not heartbeat_s >= 1:
        raise ConfigError(f"--heartbeat {heartbeat_s}: give the seconds between site heartbeats (>= 1)")
    if not 0 <= over_select <= 10:
        raise ConfigError(f"--over-select {over_select}: give a fraction in [0, 10], e.g. 0.3")
    if min_results < 1:
        raise ConfigError(f"--min-results {min_results}: a round needs at least 1 result")
    from consortium.simulation import simulate

    if resume is not None:
        if config is not None or overrides or update_bound is not None:
            raise ConfigError("--resume continues a run as it was configured; give no CONFIG, "
                              "--set or --update-bound")
        out = resume
        if not (Path(resume) / "config.toml").is_file():
            raise ConfigError(
                f"--resume {str(resume)!r} is not a run directory (no config.toml); give the "
                "--out folder of the run to continue"
            )
        cfg = load_config(Path(resume) / "config.toml")
    else:
        cfg = _with_update_bound(load_config(config, list(overrides)), update_bound)
    if cfg.model.name == "minilm-lora":
        from consortium.models.peft import with_base_hash

        # in the experiment every site receives: each checks its own base against it
        cfg = with_base_hash(cfg)
        print(f"consortium server: frozen base sha256 {cfg.model.peft.base_sha256}",
              file=sys.stderr, flush=True)
    if cfg.attack.kind != "none":
        raise ConfigError(
            "attack.kind is for simulation only (`consortium run`, `consortium robustness`); "
            "remove [attack] to deploy"
        )
    if cfg.simulation.dropout:
        raise ConfigError(
            f"simulation.dropout = {cfg.simulation.dropout:g} is for simulation only: real sites "
            "drop out by themselves (the round goes on without them; --min-results, "
            "--round-timeout); remove it to deploy"
        )
    from consortium.interpret import enabled as interpret_enabled

    # [interpret] and [contribution] run with the sites after the last round
    # (deploy/interpret.py); contribution's refusal under secure aggregation is the config's
    after_run = interpret_enabled(cfg.interpret) or cfg.contribution.method != "none"
    if over_select and cfg.privacy.mode in ("central", "distributed"):
        raise ConfigError(
            f"--over-select with privacy.mode = {cfg.privacy.mode!r}: DP-FedAvg divides the noisy "
            "sum by the expected number of sites, so cutting the slowest ones biases every round "
            "(and the accountant assumes the sample it drew); drop --over-select, or use "
            "--min-results to let a round go on without silent sites"
        )
    if cfg.server.mode != "sync" and (over_select or min_results > 1):
        raise ConfigError(
            f"--over-select / --min-results with server.mode = {cfg.server.mode!r}: those are "
            "rules of a synchronous round; an asynchronous step waits for server.buffer_size "
            "updates (and steps on what it has after --round-timeout); drop them")
    if cfg.privacy.site_policies:
        raise ConfigError(
            "privacy.site_policies is for simulation; in a deployment each site enforces its "
            "own policy: remove it here and start each site with `consortium client --policy FILE`"
        )
    if cfg.privacy.mode == "central" and cfg.privacy.noise_source != "os":
        # a deployment's noise must not be reproducible from the run seed
        cfg = cfg.replace(privacy=dataclasses.replace(cfg.privacy, noise_source="os"))
    if cfg.secure_aggregation.enabled:
        from consortium.secagg.floor import SecAggFloor

        floor = SecAggFloor()
        if cfg.secure_aggregation.threshold < floor.min_threshold:
            print(
                f"consortium server: WARNING secure_aggregation.threshold = "
                f"{cfg.secure_aggregation.threshold:g} is below {floor.min_threshold:.3g}, the "
                "least sites accept by default against a malicious server: sites refuse such "
                "rounds unless their policy lowers secagg_threshold; set "
                "secure_aggregation.threshold = 0.67", file=sys.stderr,
            )
    if "pooled" in cfg.evaluation.baselines:
        print("consortium server: the pooled baseline needs every site's data in one place, "
              "which a deployment never has; skipped (the local-only baseline, \"local\", "
              "trains at each site)", file=sys.stderr)
        cfg = cfg.replace(evaluation=dataclasses.replace(cfg.evaluation, baselines=tuple(
            b for b in cfg.evaluation.baselines if b != "pooled")))
    if "local" in cfg.evaluation.baselines:
        print("consortium server: local-only baseline: each site trains alone at home after "
              "the last round and reports its metrics, if its policy's send_metrics names them "
              "(local_accuracy, ...)", file=sys.stderr)
    if certs is None:
        print("consortium server: WARNING --insecure: no TLS, no authentication; any process "
              "that reaches the port can claim to be any site. Local experiments only.",
              file=sys.stderr)
    print(f"consortium server: {update_bound_line(cfg)}", file=sys.stderr, flush=True)
    torch.set_num_threads(1)  # the event loop does the work; idle torch threads only contend
    tune_malloc()
    run_dir = Path(out)
    if resume is None:  # never over a user's files, nor another run (simulation._load)
        from consortium.simulation import check_new_run_dir

        check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {}
    if resume is not None:
        from consortium.deploy.audit import last_entries
        from consortium.server.checkpoint import load_checkpoint_extras, verify_checkpoint_digest

        # the checkpoint must be the one this server wrote and logged (issue 13, point 8)
        verify_checkpoint_digest(
            run_dir / "checkpoint", last_entries(run_dir / AUDIT_FILENAME, "checkpoint", 2)
        )
        saved = load_checkpoint_extras(run_dir / "checkpoint")
    registry = saved.get("registry")
    wait_for = sites_to_wait_for(cfg, min_sites=min_sites, certs=certs,
                                 roster=(registry or {}).get("sites"))
    expected = wait_for if isinstance(wait_for, int) else len(wait_for)
    _raise_file_limit(expected)
    secret = _sampling_secret(saved, resumed=resume is not None)
    # entries reach the OS at once; the disk once per round, before the results are used
    audit = AuditLog(run_dir / AUDIT_FILENAME, recover=True, fsync=False)
    from consortium.deploy.receipts import HeadSigner

    signer = HeadSigner.from_certs(certs) if certs else None  # signs the audit head in each task
    thread = _ServerThread(listen, certs=Path(certs) if certs else None, hub_args={
        # unique, so a site's saved state never mixes two runs kept in same-named folders
        "config_toml": cfg.to_toml(), "run_id": f"{run_dir.name}-{uuid.uuid4().hex[:8]}",
        "registry": registry,
        "max_result_bytes": MAX_RESULT_BYTES, "audit": audit,
        # the sites encode their features with every site's statistics, as simulated
        "summaries_expected": expected, "signer": signer,
        # under SecAgg the summaries' sums are summed by SecAgg+ (issue 15)
        "secure_encoding": cfg.secure_aggregation.enabled,
        "open_roster": not closed_roster,
    }, heartbeat_s=heartbeat_s, limits=limits)
    hub = thread.start()
    from consortium.deploy.roster import Membership, OnlineSampler, late_sites_allowed

    hub.closed_reason = late_sites_allowed(cfg)
    hub.offline_after_s = 3 * heartbeat_s  # as the round's silence rule (RemoteExecutor)
    membership = Membership(hub, cfg, _placeholder_dataset)
    encoding_stop = threading.Event()
    if cfg.secure_aggregation.enabled and hub.merged is None:
        from consortium.deploy.secure_encoding import run_secure_encoding

        threading.Thread(
            target=run_secure_encoding, name="secure-encoding", daemon=True,
            args=(hub, RemoteExecutor(hub, silence_s=3 * heartbeat_s), cfg),
            kwargs={"stop": encoding_stop, "timeout_s": register_timeout},
        ).start()
    audit.append("run", run_id=hub.run_id, resumed=resume is not None,
                 signed=signer is not None)  # receipts name the run; the auditor finds it here
    try:
        if on_listening is not None:
            on_listening(thread.port)
        print(f"consortium server: listening on {listen} (port {thread.port}); waiting for "
              f"{_waiting_for(wait_for)}", file=sys.stderr, flush=True)
        sites = hub.wait_for_sites(wait_for, register_timeout, on_ready=_announce_ready)
        print(f"consortium server: sites {sorted(sites)} ready; starting", file=sys.stderr, flush=True)
        # the roster is fixed for the run (a resumed run keeps the one it was checkpointed with,
        # so it samples the same sites with the same sizes)
        hub.fix_roster(hub.roster if hub.roster is not None else sites)
        assert hub.roster is not None
        if min_results > len(hub.roster):
            raise ConfigError(
                f"--min-results {min_results} is more than the run's {len(hub.roster)} sites: no "
                "round could finish; lower it or raise --min-sites"
            )
        dataset = _placeholder_dataset(cfg, hub.roster)
        # a site silent for three heartbeats has crashed or lost its network: its task fails
        # then, not at the round's deadline
        executor = RemoteExecutor(hub, round_timeout=round_timeout, min_results=min_results,
                                  over_select=over_select, silence_s=3 * heartbeat_s)
        from consortium.privacy.plan import plan_sampler

        inner = participation_sampler(cfg, len(hub.roster), secret) or plan_sampler(
            cfg, len(hub.roster))
        assembled: dict[str, Any] = {}  # the Federation, for [interpret] / [contribution]
        common: dict[str, Any] = {
            # without a terminal the operator's line (_RoundReport) is the round's one line
            "dataset": dataset, "executor": executor,
            "progress": progress and sys.stderr.isatty(),
            "callbacks": [membership, _RoundReport(hub, cfg.rounds)],
            # the round's online sites only (deploy/roster.py); under central DP with uniform
            # sampling the offline ones stay in the draw, as its accountant assumes
            "sampler": OnlineSampler(inner, membership, keep_offline=(
                cfg.privacy.mode == "central" and cfg.privacy.sampling != "poisson")),
            "on_assembled": functools.partial(_assembled, membership, assembled),
            "run_id": hub.run_id,  # secure aggregation binds keys to it; kept by --resume
            "checkpoint_extras": lambda: {
                "registry": hub.registry(), **({SAMPLING_SECRET: secret} if secret else {}),
            },
            "on_checkpoint": functools.partial(_log_checkpoint, audit),
        }
        if resume is not None:
            result = simulate(resume=run_dir, **common)
        else:
            result = simulate(cfg, out=run_dir, **common)
        if after_run and "fed" in assembled:
            from consortium.deploy.interpret import finish_deployed_run

            finish_deployed_run(run_dir, hub, executor, cfg, result, assembled["fed"],
                                timeout=round_timeout)
        hub.finish_all("the run is complete")
        return result
    finally:
        encoding_stop.set()
        time.sleep(0.5)  # let the clients pull their Finished
        thread.stop()
        hub.flush_rejections(final=True)
        audit.close()

"""A hostile consortium server for tests: real gRPC on 127.0.0.1, scripted by the test.

It speaks the real wire protocol (the same proto, codec and chunking as ``consortium server``)
but sends whatever the test puts in its queue — a configuration naming code, a task with a
chosen seed, a secure-aggregation config with a lowered threshold — and records everything the
site sends back. The site on the other end is the real ``SiteRunner``.
"""

from __future__ import annotations

import queue
import threading
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from consortium.deploy.codec import (
    ExchangeEnvelope,
    Finished,
    Wait,
    chunk,
    decode_exchange,
    decode_upload,
    encode_work,
    reassemble,
)
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.proto import consortium_pb2_grpc as rpc


class HostileService(rpc.FederationServicer):
    def __init__(self, config_toml: str, run_id: str) -> None:
        self.config_toml = config_toml
        self.run_id = run_id
        self.work: queue.Queue[Any] = queue.Queue()
        self.uploads: queue.Queue[Any] = queue.Queue()
        self.exchanges: queue.Queue[ExchangeEnvelope] = queue.Queue()
        self.registered = threading.Event()
        self.described = threading.Event()
        self.info: Any = None

    def Register(self, request: Any, context: Any) -> Any:
        self.registered.set()
        return pb.RegisterReply(session_id=uuid.uuid4().hex, run_id=self.run_id,
                                heartbeat_seconds=30, config_toml=self.config_toml)

    def Describe(self, request: Any, context: Any) -> Any:
        self.info = request
        self.described.set()
        return pb.Ack(accepted=True)

    def Summarize(self, request: Any, context: Any) -> Any:
        self._summary = pb.DataSummary()
        self._summary.CopyFrom(request)
        return pb.Ack(accepted=True)

    def Encoding(self, request: Any, context: Any) -> Any:
        reply = pb.DataSummary()
        reply.CopyFrom(self._summary)  # the site's own statistics: it is alone here
        reply.ready = True
        return reply

    def PullTask(self, request: Any, context: Any) -> Any:
        try:
            item = self.work.get(timeout=min(float(request.wait_seconds), 2.0))
        except queue.Empty:
            item = Wait(0.1)
        yield from chunk(encode_work(item), uuid.uuid4().hex)

    def PushResult(self, request_iterator: Any, context: Any) -> Any:
        self.uploads.put(decode_upload(bytes(reassemble(request_iterator, max_total_bytes=1 << 30))))
        return pb.Ack(accepted=True)

    def Exchange(self, request_iterator: Any, context: Any) -> Any:
        self.exchanges.put(decode_exchange(bytes(reassemble(request_iterator, max_total_bytes=1 << 30))))
        return pb.Ack(accepted=True)

    def Heartbeat(self, request: Any, context: Any) -> Any:
        return pb.HeartbeatReply(registered=True)


class HostileServer:
    """``with HostileServer(config_toml) as hostile:`` — listens on 127.0.0.1 (TLS with the
    provisioned server folder ``certs``, or insecure)."""

    def __init__(self, config_toml: str, *, certs: Path | None = None, run_id: str = "hostile-run") -> None:
        self.service = HostileService(config_toml, run_id)
        self.certs = certs

    def __enter__(self) -> HostileServer:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rpc.add_FederationServicer_to_server(self.service, self._server)
        if self.certs is not None:
            from consortium.deploy.provision import load_server_credentials

            creds = load_server_credentials(self.certs)
            server_creds = grpc.ssl_server_credentials(
                [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem,
                require_client_auth=True,
            )
            self.port = self._server.add_secure_port("127.0.0.1:0", server_creds)
        else:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.work.put(Finished("over"))
        self._server.stop(grace=1).wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def send(self, item: Any) -> None:
        self.service.work.put(item)

    def upload(self, timeout: float = 60.0) -> Any:
        return self.service.uploads.get(timeout=timeout)

    def exchange(self, timeout: float = 60.0) -> ExchangeEnvelope:
        return self.service.exchanges.get(timeout=timeout)

    def finish(self) -> None:
        self.service.work.put(Finished("the hostile server is done"))

#!/usr/bin/env python3
"""The transport floor for benchmarks/deployment.py: the Federation service with nothing behind it.

Usage:  python benchmarks/deployment/null_server.py --sites N --rounds R --out RUN_DIR
                                                    [--listen 127.0.0.1:0] [--input-dim D]

A grpc.aio server speaking the same wire protocol as ``consortium server`` (Register,
Describe, long-polled PullTask with the chunked Work, chunked PushResult) to the same load
clients, but doing the least a server must: the model is serialized once and each task is one
``Work`` serialization around it; a result is reassembled and parsed, then dropped — no
validation, no audit log, no aggregation, no checkpoint. ``R`` training rounds then one
evaluation round, like the benchmark's real runs. It logs the same "(port N)" and "ready;
starting" lines and writes ``metrics.jsonl`` (``round``, ``clients``, ``wall_s``), so the
benchmark measures it exactly as it measures the real server. The server CPU per update
measured here is what grpc.aio, HTTP/2 and the asyncio handlers cost before any of consortium's
own work.

Knobs for the memory experiments in benchmarks/RESULTS.md: ``--send-concurrency K`` (at most K
tasks serialized and being sent at once), ``--receive-concurrency K`` (at most K results read at
once) and ``--no-bdp-probe`` (HTTP/2 flow-control windows stay at 64 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from consortium.deploy.codec import SESSION_METADATA_KEY, Reassembler, chunk
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.proto import consortium_pb2_grpc as rpc

FINISHED = pb.Work(finished=pb.Finished(reason="done")).SerializeToString()


class NullService(rpc.FederationServicer):
    def __init__(self, sites: int, send_concurrency: int, receive_concurrency: int) -> None:
        self.sites = sites
        self.sending = asyncio.Semaphore(send_concurrency) if send_concurrency else None
        self.receiving = asyncio.Semaphore(receive_concurrency) if receive_concurrency else None
        self.finished = 0
        self.queues: dict[str, asyncio.Queue[bytes]] = {}
        self.described: set[str] = set()
        self.all_described = asyncio.Event()
        self.results = 0
        self.round_done = asyncio.Event()
        self.expected = 0

    def site(self, context: Any) -> str:
        return dict(context.invocation_metadata()).get(SESSION_METADATA_KEY, "")

    async def Register(self, request: Any, context: Any) -> Any:
        self.queues[request.site] = asyncio.Queue()
        return pb.RegisterReply(session_id=request.site, run_id="null")

    async def Describe(self, request: Any, context: Any) -> Any:
        self.described.add(self.site(context))
        if len(self.described) >= self.sites:
            self.all_described.set()
        return pb.Ack(accepted=True)

    async def PullTask(self, request: Any, context: Any) -> Any:
        queue = self.queues[self.site(context)]
        try:
            data = await asyncio.wait_for(queue.get(), timeout=min(request.wait_seconds, 60))
        except asyncio.TimeoutError:
            data = pb.Work(wait=pb.Wait(seconds=0.0)).SerializeToString()
        if self.sending is None:
            for frame in chunk(data, uuid.uuid4().hex):
                yield frame
        else:  # at most that many tasks serialized and in flight at once
            async with self.sending:
                for frame in chunk(data, uuid.uuid4().hex):
                    yield frame
        if data == FINISHED:
            self.finished += 1

    async def PushResult(self, request_iterator: Any, context: Any) -> Any:
        assembler = Reassembler(2 << 30)
        payload = None
        if self.receiving is not None:  # at most that many results read at once
            await self.receiving.acquire()
        try:
            async for frame in request_iterator:
                payload = assembler.feed(frame)
        finally:
            if self.receiving is not None:
                self.receiving.release()
        upload = pb.Upload()
        upload.ParseFromString(bytes(payload))  # as the real server: bytes, then parse
        self.results += 1
        if self.results >= self.expected:
            self.round_done.set()
        return pb.Ack(accepted=True)


async def serve(args: argparse.Namespace) -> None:
    options = [("grpc.max_receive_message_length", 8 << 20),
               ("grpc.max_send_message_length", 8 << 20)]
    if args.no_bdp_probe or not args.untuned:  # HTTP/2 windows stay at 64 KiB, as the server's
        options.append(("grpc.http2.bdp_probe", 0))
    if not args.untuned:  # consortium server's transport settings
        from consortium.deploy.server import tune_malloc

        tune_malloc()
    server = grpc.aio.server(options=options)
    service = NullService(args.sites, args.send_concurrency, args.receive_concurrency)
    rpc.add_FederationServicer_to_server(service, server)
    port = server.add_insecure_port(args.listen)
    await server.start()
    print(f"null server: listening on {args.listen} (port {port})", file=sys.stderr, flush=True)
    await service.all_described.wait()
    print("null server: sites ready; starting", file=sys.stderr, flush=True)
    size = args.input_dim * args.classes + args.classes
    parameters = pb.Parameters(vector=pb.Tensor(name="vector", dtype="float32", shape=[size],
                                                data=bytes(4 * size)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    for rnd in range(1, args.rounds + 2):
        start = time.perf_counter()
        service.results, service.expected = 0, len(service.queues)
        service.round_done.clear()
        for site, queue in service.queues.items():
            if rnd <= args.rounds:
                work = pb.Work(train=pb.Task(round=rnd, task_id=uuid.uuid4().hex, client_id=site,
                                             parameters=parameters, work=1.0))
            else:
                work = pb.Work(evaluate=pb.EvaluationTask(round=rnd, task_id=uuid.uuid4().hex,
                                                          client_id=site, parameters=parameters))
            queue.put_nowait(work.SerializeToString())
        await service.round_done.wait()
        record = {"round": rnd, "clients": service.results, "wall_s": time.perf_counter() - start}
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
    for queue in service.queues.values():
        queue.put_nowait(FINISHED)
    deadline = time.monotonic() + 30
    while service.finished < len(service.queues) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    await server.stop(grace=1.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True, help="training rounds (one more evaluates)")
    p.add_argument("--input-dim", type=int, default=26213)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--send-concurrency", type=int, default=32,
                   help="tasks serialized and sent at once (0: no limit; 32 as consortium server)")
    p.add_argument("--untuned", action="store_true",
                   help="without consortium server's transport settings (bdp_probe off, "
                   "tune_malloc)")
    p.add_argument("--no-bdp-probe", action="store_true",
                   help="keep HTTP/2 flow-control windows at their initial 64 KiB")
    p.add_argument("--receive-concurrency", type=int, default=0,
                   help="results read at once (0: no limit, as consortium server)")
    asyncio.run(serve(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Lightweight Flower SuperNodes for benchmarks/deployment.py: many nodes in one asyncio process.

Usage (in the Flower venv):
    python benchmarks/flower/deploy_nodes.py --superlink 127.0.0.1:PORT --first 0 --count 250 \
        --report OUT.json

Flower 1.42's ``flower-supernode`` speaks the Fleet API as protobuf over HTTP/1.1 (httpx) to the
SuperLink's single uvicorn port, and each real SuperNode is three Python processes (the node,
its ``flower-superexec``, and one ``flwr-clientapp`` per message): about 400 MB, and about 1.7 s
of CPU per message here, too heavy for 250 or 1,000 nodes on this machine. Each node here is instead
one coroutine with its own ``httpx.AsyncClient`` (its own connections: one for the message loop,
one for heartbeats, as the SuperNode's threads use) that sends the SuperLink
the same requests, in the same order and with the same bodies and headers, as a real
SuperNode (flwr/supernode/start_client_internal.py and fleet_http_connection.py):

1. ``RegisterNode`` and ``ActivateNode`` with a fresh SECP384R1 key (self-registered, as an
   unauthenticated SuperNode does); every request carries the node's public key, a timestamp
   and its ECDSA signature (NodeAuthHttpInterceptor) and the runtime-version headers, and is
   retried as the SuperNode retries (transport errors and HTTP 502/503/504; 30 s timeout);
2. ``SendNodeHeartbeat`` every (30 - 5) * U(0.7, 0.9) s (HeartbeatSender);
3. ``PullMessages``; when empty, sleeps 3 s (the SuperNode's poll interval) and asks again;
4. on a message: ``GetRun`` and ``GetFab`` the first time, ``PullObject`` for every object of
   the message's tree (retried with backoff while not yet available), then
   ``ConfirmMessageReceived``;
5. the reply, built with Flower's own classes (``Message(content, reply_to=...)``): for a
   training message an ``ArrayRecord`` with the model's two arrays (262,140 float32, 1.0 MB)
   plus ``MetricRecord({"train_loss", "num-examples": 1})``; for an evaluation message
   ``MetricRecord({"accuracy", "loss", "num-examples": 1})``. The arrays are precomputed once
   per process; the first weight and bias values are set per node and round, because Flower's
   object store is content-addressed and identical replies would be uploaded only once.
   ``PushMessages`` with the reply's object tree, then ``PushObject`` for each object the
   SuperLink asks for (children before parents);
6. after answering ``--stop-after`` evaluation messages: ``DeactivateNode`` and
   ``UnregisterNode``, then the node ends (on SIGTERM every node ends at once, and the report
   is still written).

The received model is never inflated (the objects are pulled as bytes and dropped), as
benchmarks/deployment/clients.py never decodes consortium's model. No ClientApp process and
no training: the point is the server's cost. Prints ``HELD <n>`` once all its nodes are active,
and writes one JSON report (per node: times, errors, requests sent by type, bytes, and per
message: kind, when it arrived, when its reply was pushed and acknowledged, bytes) in the
format of clients.py's report.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import sys
import time
from base64 import b64encode
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import (
    HEARTBEAT_CALL_TIMEOUT,
    HEARTBEAT_DEFAULT_INTERVAL,
    MAX_RETRY_DELAY,
    TIMESTAMP_HEADER,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fab_pb2 import GetFabRequest, GetFabResponse
from flwr.proto.fleet_pb2 import (
    ActivateNodeRequest,
    ActivateNodeResponse,
    DeactivateNodeRequest,
    DeactivateNodeResponse,
    PullMessagesRequest,
    PullMessagesResponse,
    PushMessagesRequest,
    PushMessagesResponse,
    RegisterNodeFleetRequest,
    RegisterNodeFleetResponse,
    UnregisterNodeFleetRequest,
    UnregisterNodeFleetResponse,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedRequest,
    ConfirmMessageReceivedResponse,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node
from flwr.proto.run_pb2 import GetRunRequest, GetRunResponse
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    public_key_to_bytes,
    sign_message,
)
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata
from google.protobuf.message import Message as Proto

R = TypeVar("R", bound=Proto)

POLL_S = 3.0  # start_client_internal: time.sleep(3) after an empty PullMessages
# what flwr.supercore.retry.http_retry retries, and after how long at most
RETRYABLE = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
             httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)
RETRYABLE_STATUS = (502, 503, 504)
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 1.0, 10.0  # pull_objects' initial backoff and cap
VERSION_HEADERS = dict(RuntimeVersionMetadata.from_local_component("SuperNode").as_metadata())


class Swarm:
    """The nodes of this process and what they share: the precomputed reply arrays."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.held = 0
        self.records: list[dict[str, Any]] = []  # reported even when the nodes are stopped
        self.connecting = asyncio.Semaphore(args.connect_concurrency)
        rng = np.random.default_rng(1)
        weight = (rng.standard_normal((args.classes, args.input_dim)) * 1e-2).astype(np.float32)
        bias = np.zeros(args.classes, dtype=np.float32)
        self.npy = {name: npy_bytes(a) for name, a in (("weight", weight), ("bias", bias))}
        self.shapes = {"weight": weight.shape, "bias": bias.shape}

    def reply_content(self, kind: str, tag: float) -> RecordDict:
        """A training or evaluation reply; ``tag`` makes the arrays' bytes unique."""
        if kind != "train":
            return RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "loss": 1.0, "num-examples": 1})})
        arrays = {}
        for name, data in self.npy.items():
            buf = bytearray(data)
            # the first float32 value, right after np.save's header (which ends with "\n")
            at = buf.index(b"\n") + 1
            buf[at : at + 4] = np.float32(tag).tobytes()
            arrays[name] = Array(dtype="float32", shape=self.shapes[name], stype="numpy.ndarray",
                                 data=bytes(buf))
        return RecordDict({"arrays": ArrayRecord(arrays),
                           "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 1})})

    def on_held(self) -> None:
        self.held += 1
        if self.held == self.args.count:
            print(f"HELD {self.held}", flush=True)


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` serialized as Flower's ``Array.from_numpy_ndarray`` does (``np.save``)."""
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


class FleetNode:
    """One SuperNode's connection: signed protobuf-over-HTTP calls on one keep-alive connection."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        # two keep-alive connections: the SuperNode's heartbeat thread uses its own connection
        # of the shared httpx pool, so a heartbeat never waits behind a 1 MB transfer
        self.client = httpx.AsyncClient(
            timeout=30.0, limits=httpx.Limits(max_connections=2, max_keepalive_connections=2))
        self.private_key, public_key = generate_key_pairs()
        self.public_key = public_key_to_bytes(public_key)
        self.node = Node(node_id=0)
        self.bytes_down = self.bytes_up = 0
        self.requests: dict[str, int] = {}
        self.retries: dict[str, int] = {}

    async def call(self, path: str, request: Proto, response_type: type[R], *,
                   timeout: float | None = None) -> R:
        """POST ``request`` to ``/v1/fleet/<path>``, as FleetHttpClient does; the parsed reply.

        Retried as the SuperNode's ``make_simple_http_retry_invoker`` does: on a transport error
        or HTTP 502/503/504, after 1, 2, 4 ... s (at most 20 s), without limit; each attempt is
        signed anew."""
        content = request.SerializeToString(deterministic=True)
        delay = 1.0
        while True:
            timestamp = now().isoformat()
            signature = sign_message(self.private_key, timestamp.encode("ascii"))
            headers = {"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE,
                       **VERSION_HEADERS, FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(self.public_key).decode(),
                       TIMESTAMP_HEADER: timestamp, FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode()}
            try:
                response = await self.client.post(f"{self.base_url}/v1/fleet/{path}", content=content,
                                                  headers=headers, timeout=timeout or 30.0)
            except RETRYABLE as exc:
                if not isinstance(exc, httpx.PoolTimeout | httpx.ConnectError | httpx.ConnectTimeout):
                    self.requests[path] = self.requests.get(path, 0) + 1  # it reached the SuperLink
                self.retries[type(exc).__name__] = self.retries.get(type(exc).__name__, 0) + 1
            else:
                self.requests[path] = self.requests.get(path, 0) + 1
                if response.status_code not in RETRYABLE_STATUS:
                    break
                self.retries[str(response.status_code)] = self.retries.get(str(response.status_code), 0) + 1
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RETRY_DELAY)
        if response.is_error:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
        self.bytes_up += len(content)
        self.bytes_down += len(response.content)
        result = response_type()
        result.ParseFromString(response.content)
        return result

    async def pull_object(self, run_id: int, object_id: str) -> bytes:
        """One object's bytes, retried with pull_objects' backoff while not yet available."""
        delay = PULL_BACKOFF_S
        while True:
            reply = await self.call("pull-object", PullObjectRequest(
                node=self.node, run_id=run_id, object_id=object_id), PullObjectResponse)
            if not reply.object_found:
                raise RuntimeError(f"object {object_id} not found on the SuperLink")
            if reply.object_available:
                return bytes(reply.object_content)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(2 * delay, PULL_BACKOFF_CAP_S)


async def heartbeats(fleet: FleetNode, stop: asyncio.Event) -> None:
    """SendNodeHeartbeat at the HeartbeatSender's pace until ``stop``."""
    while not stop.is_set():
        wait = (HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT) * (0.8 + random.uniform(-0.1, 0.1))
        try:
            await asyncio.wait_for(stop.wait(), timeout=wait)
            return
        except TimeoutError:
            pass
        reply = await fleet.call("send-node-heartbeat", SendNodeHeartbeatRequest(
            node=fleet.node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL),
            SendNodeHeartbeatResponse, timeout=HEARTBEAT_CALL_TIMEOUT)
        if not reply.success:
            raise RuntimeError("heartbeat refused: the SuperLink does not know this node")


async def answer(swarm: Swarm, fleet: FleetNode, pulled: PullMessagesResponse, index: int,
                 known_runs: set[int], record: dict[str, Any]) -> str:
    """Receive one message and push its reply; the message's type."""
    t_got = time.monotonic()
    message = message_from_proto(pulled.messages_list[0])
    tree = pulled.message_object_trees[0]
    run_id = message.metadata.run_id
    if run_id not in known_runs:
        run = await fleet.call("get-run", GetRunRequest(node=fleet.node, run_id=run_id), GetRunResponse)
        await fleet.call("get-fab", GetFabRequest(node=fleet.node, hash_str=run.run.fab_hash,
                                                  run_id=run_id), GetFabResponse)
        known_runs.add(run_id)
    down = 0
    for obj in iterate_object_tree(tree):
        down += len(await fleet.pull_object(run_id, obj.object_id))
    await fleet.call("confirm-message-received", ConfirmMessageReceivedRequest(
        node=fleet.node, run_id=run_id, message_object_id=message.metadata.message_id),
        ConfirmMessageReceivedResponse)
    kind = message.metadata.message_type
    tag = float(index * 1_000 + len(record["tasks"]) + 1)
    reply = Message(swarm.reply_content("train" if kind == "train" else "evaluate", tag),
                    reply_to=message)
    with no_object_id_recompute():
        reply.metadata.__dict__["_message_id"] = reply.object_id
        objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        reply_tree = get_object_tree(reply)
    proto = message_to_proto(remove_content_from_message(reply))
    t_push = time.monotonic()
    pushed = await fleet.call("push-messages", PushMessagesRequest(
        node=fleet.node, messages_list=[proto], message_object_trees=[reply_tree],
        clientapp_runtime_list=[0.0]), PushMessagesResponse)
    wanted = set(pushed.objects_to_push)
    up = 0
    for obj in iterate_object_tree(reply_tree):
        if obj.object_id in wanted:
            stored = await fleet.call("push-object", PushObjectRequest(
                node=fleet.node, run_id=run_id, object_id=obj.object_id,
                object_content=objects[obj.object_id], session_id=pushed.session_id),
                PushObjectResponse)
            if not stored.stored:
                raise RuntimeError(f"the SuperLink did not store object {obj.object_id}")
            up += len(objects[obj.object_id])
    record["tasks"].append({"kind": "train" if kind == "train" else "evaluate", "round": None,
                            "t_got": t_got, "t_push": t_push, "t_ack": time.monotonic(),
                            "accepted": True, "reason": "", "bytes_down": down, "bytes_up": up})
    return kind


async def run_node(swarm: Swarm, index: int) -> dict[str, Any]:
    args = swarm.args
    record: dict[str, Any] = {"site": f"n{index:04d}", "tasks": [], "finished": False, "error": None}
    swarm.records.append(record)
    fleet = FleetNode(f"http://{args.superlink}")
    stop = asyncio.Event()
    beating: asyncio.Task[None] | None = None
    stopped = False
    try:
        async with swarm.connecting:
            record["t_start"] = time.monotonic()
            await fleet.call("register-node", RegisterNodeFleetRequest(public_key=fleet.public_key),
                             RegisterNodeFleetResponse)
            active = await fleet.call("activate-node", ActivateNodeRequest(
                public_key=fleet.public_key, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL),
                ActivateNodeResponse)
        fleet.node = Node(node_id=active.node_id)
        record["node_id"] = active.node_id
        record["t_held"] = time.monotonic()
        swarm.on_held()
        beating = asyncio.create_task(heartbeats(fleet, stop))
        known_runs: set[int] = set()
        evaluated = 0
        while evaluated < args.stop_after:
            pulled = await fleet.call("pull-messages", PullMessagesRequest(node=fleet.node),
                                      PullMessagesResponse)
            if not pulled.messages_list:
                if beating.done():
                    beating.result()  # a failed heartbeat ends the node with its error
                await asyncio.sleep(args.poll)
                continue
            if await answer(swarm, fleet, pulled, index, known_runs, record) != "train":
                evaluated += 1
        record["finished"] = True
    except asyncio.CancelledError:  # SIGTERM: report what was recorded, leave at once
        stopped = True
        record["error"] = "stopped (SIGTERM)"
    except Exception as exc:  # recorded: one node's failure must not stop the others
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"node {index} failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        stop.set()
        if beating is not None:
            if stopped:
                beating.cancel()
            try:
                await beating
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the node's own error, if any, is the one to keep
                record["error"] = record["error"] or f"heartbeat: {type(exc).__name__}: {exc}"
        if fleet.node.node_id and not stopped:
            try:
                await fleet.call("deactivate-node", DeactivateNodeRequest(node_id=fleet.node.node_id),
                                 DeactivateNodeResponse)
                await fleet.call("unregister-node", UnregisterNodeFleetRequest(
                    node_id=fleet.node.node_id), UnregisterNodeFleetResponse)
            except (httpx.HTTPError, RuntimeError):
                pass  # the SuperLink may already be gone; as the real SuperNode, ignore it
        record.update(bytes_down=fleet.bytes_down, bytes_up=fleet.bytes_up, requests=fleet.requests,
                      retries=fleet.retries)
        await fleet.client.aclose()
    return record


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    swarm = Swarm(args)
    tasks = [asyncio.create_task(run_node(swarm, i)) for i in range(args.first, args.first + args.count)]

    def stop() -> None:
        for task in tasks:
            task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    await asyncio.gather(*tasks, return_exceptions=True)
    return swarm.records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's HTTP API")
    p.add_argument("--first", type=int, default=0, help="index of this process's first node")
    p.add_argument("--count", type=int, required=True, help="nodes in this process")
    p.add_argument("--report", required=True, help="JSON file to write at the end")
    p.add_argument("--input-dim", type=int, default=26213)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--poll", type=float, default=POLL_S, help="seconds between empty PullMessages")
    p.add_argument("--stop-after", type=int, default=1,
                   help="evaluation messages to answer before the node leaves")
    p.add_argument("--connect-concurrency", type=int, default=64,
                   help="registrations in flight at once in this process")
    args = p.parse_args()
    records = asyncio.run(main_async(args))
    Path(args.report).write_text(json.dumps({"pid": os.getpid(), "sites": records}), "utf-8")
    errors = [r for r in records if r["error"]]
    if errors:
        print(f"{len(errors)} node(s) failed; first: {errors[0]['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

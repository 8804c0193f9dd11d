#!/usr/bin/env python3
"""How much server CPU receiving one 1 MB update costs, by transport configuration.

Usage:  python benchmarks/deployment/transport_floor.py [--n 1,50,1000] [--repeats 3]
            [--configs NAME,NAME...] [--uploads 1000] [--out benchmarks/out/transport_floor.json]
        python benchmarks/deployment/transport_floor.py --list

A companion of benchmarks/deployment.py and null_server.py (RESULTS.md, "Deployment load"):
those measure the whole Federation protocol; this isolates the upload path. For each
configuration and each N, one server process and 1-4 client processes (N connections in all,
one TCP connection each, ``grpc.use_local_subchannel_pool``) are started on 127.0.0.1. Every
connection makes one small warm-up call; then, at a common "GO", every connection sends its
share of ``--uploads`` 1 MiB uploads (at least ``--min-per-conn`` each), one after another, all connections at
once; each upload is acknowledged by a 2-byte reply. The server does the least: it reads the
frames, joins their payload into one ``bytes`` (like ``Reassembler`` + ``bytes()``), and drops it.

Reported: the server process's utime + stime (all threads, /proc/PID/stat) from GO to the last
acknowledgement, divided by the uploads (ms / upload), its minor page faults per upload, the
clients' CPU per upload and the wall time. Configurations of one repeat run side by side (the
machine is shared and noisy), the table gives the median and min-max over the repeats and the
ratio to the baseline of the same N.

Configurations (``--list``): server kind (grpc.aio, sync grpc.server, or a bare asyncio TCP
socket as the floor below any RPC stack), call shape (client stream of 1 MiB or 64 KiB
``consortium.v1.Chunk`` frames as consortium sends, one unary 1 MiB message, or raw bytes
frames without protobuf), gRPC channel arguments on either side, environment of the server
process (GRPC_EXPERIMENTS, GRPC_POLL_STRATEGY, glibc malloc tunables) and TLS.

Needs grpcio and protobuf (``consortium.v1.Chunk`` is loaded from src/consortium/deploy/proto); TLS
needs ``cryptography``. Internal roles: ``--role server`` and ``--role client``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
ACK = b"\x08\x01"  # consortium.v1.Ack(accepted=True)
SERVICE = "/floor.Floor/"
BASE_OPTIONS = [("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20)]
CLIENT_BASE = BASE_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
BIG_FRAME = [("grpc.http2.max_frame_size", (1 << 24) - 1)]
BIG_READ = [("grpc.experimental.tcp_read_chunk_size", 1 << 20),
            ("grpc.experimental.tcp_min_read_chunk_size", 256 << 10),
            ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20)]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
          "MALLOC_TOP_PAD_": str(16 << 20)}


def config(name: str, what: str, **kw: Any) -> dict[str, Any]:
    c = {"name": name, "what": what, "kind": "aio", "call": "stream", "chunk": MiB, "proto": True,
         "server_options": [], "client_options": [], "server_env": {}, "tls": False, "workers": 16,
         "mallopt": False}
    c.update(kw)
    return c


CONFIGS = [
    config("baseline", "grpc.aio, stream of 1 MiB Chunk frames, options as null_server.py"),
    config("chunk64k", "as baseline, 64 KiB Chunk frames", chunk=64 << 10),
    config("unary", "one unary 1 MiB Chunk message", call="unary"),
    config("raw", "stream of 1 MiB raw bytes frames (no protobuf on the server)", proto=False),
    config("frame16m", "server grpc.http2.max_frame_size = 16 MiB - 1", server_options=BIG_FRAME),
    config("lookahead", "server grpc.http2.lookahead_bytes = 4 MiB",
           server_options=[("grpc.http2.lookahead_bytes", 4 << 20)]),
    config("nobdp", "server grpc.http2.bdp_probe = 0", server_options=[("grpc.http2.bdp_probe", 0)]),
    config("readchunk", "server tcp_read_chunk_size 1 MiB (min 256 KiB, max 4 MiB)",
           server_options=BIG_READ),
    config("rcvbuf", "server grpc.tcp_receive_buffer_size = 4 MiB",
           server_options=[("grpc.tcp_receive_buffer_size", 4 << 20)]),
    config("throughput", "server+client grpc.optimization_target = throughput",
           server_options=[("grpc.optimization_target", "throughput")],
           client_options=[("grpc.optimization_target", "throughput")]),
    config("clientwbuf", "client grpc.http2.write_buffer_size = 4 MiB, max_frame_size 16 MiB-1",
           client_options=[("grpc.http2.write_buffer_size", 4 << 20)] + BIG_FRAME),
    config("rcvlowat", "server GRPC_EXPERIMENTS=tcp_rcv_lowat",
           server_env={"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("framesizetune", "server GRPC_EXPERIMENTS=tcp_frame_size_tuning",
           server_env={"GRPC_EXPERIMENTS": "tcp_frame_size_tuning"}),
    config("poll", "server GRPC_POLL_STRATEGY=poll", server_env={"GRPC_POLL_STRATEGY": "poll"}),
    config("malloc", "server glibc MALLOC_MMAP_THRESHOLD_=16M TRIM_THRESHOLD_=512M TOP_PAD_=16M",
           server_env=MALLOC),
    config("malloc_arena2", "as malloc, and MALLOC_ARENA_MAX=2",
           server_env={**MALLOC, "MALLOC_ARENA_MAX": "2"}),
    config("sync", "sync grpc.server, ThreadPoolExecutor(16), stream of 1 MiB Chunk frames",
           kind="sync"),
    config("sync_unary", "sync grpc.server, ThreadPoolExecutor(16), unary 1 MiB", kind="sync",
           call="unary"),
    config("tls", "as baseline over TLS (server certificate only)", tls=True),
    config("best", "frame16m + readchunk + malloc + rcvlowat (server)",
           server_options=BIG_FRAME + BIG_READ,
           server_env={**MALLOC, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("best_unary", "best, unary 1 MiB", call="unary", server_options=BIG_FRAME + BIG_READ,
           server_env={**MALLOC, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("best_nobdp", "best, and server grpc.http2.bdp_probe = 0",
           server_options=BIG_FRAME + BIG_READ + [("grpc.http2.bdp_probe", 0)],
           server_env={**MALLOC, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("best_raw", "best, raw bytes frames (no protobuf on the server)", proto=False,
           server_options=BIG_FRAME + BIG_READ,
           server_env={**MALLOC, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("sync_malloc", "sync grpc.server, stream, with the malloc tunables", kind="sync",
           server_env=MALLOC),
    config("roundtrip", "as baseline, each upload preceded by a 1 MiB server-streamed download "
           "(PullTask-like: Chunk objects built per call); ms per download + upload",
           call="roundtrip"),
    config("roundtrip_best", "roundtrip with the best settings", call="roundtrip",
           server_options=BIG_FRAME + BIG_READ, client_options=BIG_FRAME,
           server_env={**MALLOC, "GRPC_EXPERIMENTS": "tcp_rcv_lowat"}),
    config("mallopt", "as malloc, set from Python at server start (ctypes mallopt), no env",
           mallopt=True),
    config("best_mallopt", "best_nobdp with mallopt instead of the environment",
           server_options=BIG_FRAME + BIG_READ + [("grpc.http2.bdp_probe", 0)],
           server_env={"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}, mallopt=True),
    config("socket", "bare asyncio TCP server (BufferedProtocol into a reused buffer): no RPC",
           kind="socket"),
]
BY_NAME = {c["name"]: c for c in CONFIGS}


# ------------------------------------------------------------------------------------- server

def load_pb() -> Any:
    """consortium's generated consortium_pb2 (for ``Chunk``), without importing the package
    (whose ``__init__`` imports torch: 200 MB and 1.5 s in every process of every trial)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "src/consortium/deploy/proto/consortium_pb2.py"
    if not path.exists():
        from consortium.deploy.proto import consortium_pb2

        return consortium_pb2
    spec = importlib.util.spec_from_file_location("consortium_pb2_floor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grpc_credentials_server(cfg: dict[str, Any]) -> Any:
    import grpc

    d = Path(cfg["certdir"])
    return grpc.ssl_server_credentials([((d / "key.pem").read_bytes(), (d / "cert.pem").read_bytes())])


def set_mallopt() -> None:
    """What MALLOC (the environment) does, from inside the process: glibc's mallopt."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    for param, value in ((M_MMAP_THRESHOLD, 16 << 20), (M_TRIM_THRESHOLD, 512 << 20),
                         (M_TOP_PAD, 16 << 20)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")


def run_server(cfg: dict[str, Any]) -> None:
    if cfg.get("mallopt"):
        set_mallopt()
    if cfg["kind"] == "socket":
        asyncio.run(socket_server())
    elif cfg["kind"] == "sync":
        sync_server(cfg)
    else:
        asyncio.run(aio_server(cfg))


def handlers(cfg: dict[str, Any], aio: bool) -> Any:
    import grpc

    pb = load_pb()
    deser = pb.Chunk.FromString if cfg["proto"] else None
    data = (lambda f: f.data) if cfg["proto"] else (lambda f: f)
    task = os.urandom(MiB)

    def task_frames() -> Any:
        sid = os.urandom(16).hex()
        for off in range(0, len(task), cfg["chunk"]):
            yield pb.Chunk(stream_id=sid, offset=off, total_size=len(task),
                           data=task[off:off + cfg["chunk"]],
                           last=off + cfg["chunk"] >= len(task))

    if aio:
        async def pull(req: Any, ctx: Any) -> Any:
            for f in task_frames():
                yield f

        async def push(it: Any, ctx: Any) -> bytes:
            parts = [data(f) async for f in it]
            payload = b"".join(parts)
            del payload
            return ACK

        async def unary(req: Any, ctx: Any) -> bytes:
            payload = bytes(data(req))  # noqa: F841 (a copy, as bytes(Reassembler) would)
            return ACK

        async def ping(req: Any, ctx: Any) -> bytes:
            return ACK
    else:
        def pull(req: Any, ctx: Any) -> Any:  # type: ignore[misc]
            yield from task_frames()

        def push(it: Any, ctx: Any) -> bytes:  # type: ignore[misc]
            parts = [data(f) for f in it]
            payload = b"".join(parts)
            del payload
            return ACK

        def unary(req: Any, ctx: Any) -> bytes:  # type: ignore[misc]
            payload = bytes(data(req))  # noqa: F841
            return ACK

        def ping(req: Any, ctx: Any) -> bytes:  # type: ignore[misc]
            return ACK
    return grpc.method_handlers_generic_handler("floor.Floor", {
        "Push": grpc.stream_unary_rpc_method_handler(push, request_deserializer=deser),
        "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deser),
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
        "Pull": grpc.unary_stream_rpc_method_handler(
            pull, response_serializer=pb.Chunk.SerializeToString),
    })


def add_port(server: Any, cfg: dict[str, Any]) -> int:
    if cfg["tls"]:
        return server.add_secure_port("127.0.0.1:0", grpc_credentials_server(cfg))
    return server.add_insecure_port("127.0.0.1:0")


async def aio_server(cfg: dict[str, Any]) -> None:
    import grpc

    server = grpc.aio.server(options=BASE_OPTIONS + [tuple(o) for o in cfg["server_options"]])
    server.add_generic_rpc_handlers((handlers(cfg, aio=True),))
    port = add_port(server, cfg)
    await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def sync_server(cfg: dict[str, Any]) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=cfg["workers"]),
                         options=BASE_OPTIONS + [tuple(o) for o in cfg["server_options"]])
    server.add_generic_rpc_handlers((handlers(cfg, aio=False),))
    port = add_port(server, cfg)
    server.start()
    print(f"PORT {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=0.5)


class Receiver(asyncio.BufferedProtocol):
    """8-byte length, then the payload, read straight into one reused buffer; 2-byte ack."""

    def __init__(self) -> None:
        self.buf = bytearray(MiB + 64)
        self.view = memoryview(self.buf)
        self.have = 0
        self.need = 8

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.have:self.need]

    def buffer_updated(self, nbytes: int) -> None:
        self.have += nbytes
        if self.have < self.need:
            return
        if self.need == 8:
            self.need = 8 + struct.unpack("<Q", self.buf[:8])[0]
            if self.need > len(self.buf):
                self.buf = bytearray(self.need)
                self.view = memoryview(self.buf)
            return
        self.have, self.need = 0, 8
        self.transport.write(ACK)


async def socket_server() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Receiver, "127.0.0.1", 0, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


# ------------------------------------------------------------------------------------- client

def frames(cfg: dict[str, Any], payload: bytes) -> list[bytes]:
    pb = load_pb()
    size = cfg["chunk"] if cfg["call"] != "unary" else len(payload)
    out = []
    for off in range(0, len(payload), size):
        piece = payload[off:off + size]
        if cfg["proto"]:
            piece = pb.Chunk(stream_id="0123456789abcdef0123456789abcdef", offset=off,
                             total_size=len(payload), data=piece,
                             last=off + size >= len(payload)).SerializeToString()
        out.append(piece)
    return out


async def run_clients(cfg: dict[str, Any], port: int, count: int, uploads: int) -> dict[str, Any]:
    payload = os.urandom(MiB)
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    done = 0
    if cfg["kind"] == "socket":
        message = struct.pack("<Q", len(payload)) + payload
        conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(count)))

        async def one(reader: Any, writer: Any) -> None:
            nonlocal done
            for _ in range(uploads):
                writer.write(message)
                await writer.drain()
                await reader.readexactly(2)
                done += 1

        print("READY", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        t0, c0 = time.monotonic(), os.times()
        await asyncio.gather(*(one(r, w) for r, w in conns))
        t1, c1 = time.monotonic(), os.times()
        for _, w in conns:
            w.close()
    else:
        import grpc

        options = CLIENT_BASE + [tuple(o) for o in cfg["client_options"]]
        if cfg["tls"]:
            root = (Path(cfg["certdir"]) / "cert.pem").read_bytes()
            creds = grpc.ssl_channel_credentials(root)
            options.append(("grpc.ssl_target_name_override", "localhost"))
            channels = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)
                        for _ in range(count)]
        else:
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                        for _ in range(count)]
        msgs = frames(cfg, payload)
        sem = asyncio.Semaphore(64)

        async def warm(ch: Any) -> None:
            async with sem:
                for attempt in range(8):
                    try:
                        await ch.unary_unary(SERVICE + "Ping")(b"", timeout=60)
                        return
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.2 * 2**attempt)
                await ch.unary_unary(SERVICE + "Ping")(b"", timeout=60)

        async def one(ch: Any) -> None:
            nonlocal done
            push = ch.stream_unary(SERVICE + "Push")
            unary = ch.unary_unary(SERVICE + "Unary")
            pull = ch.unary_stream(SERVICE + "Pull")
            for _ in range(uploads):
                try:
                    if cfg["call"] == "roundtrip":
                        got = b"".join([f async for f in pull(b"", timeout=600)])
                        assert len(got) > MiB
                    if cfg["call"] == "unary":
                        ack = await unary(msgs[0], timeout=600)
                    else:
                        ack = await push(iter(msgs), timeout=600)
                    assert ack == ACK
                    done += 1
                except Exception as exc:  # recorded
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(warm(ch) for ch in channels))
        print("READY", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        t0, c0 = time.monotonic(), os.times()
        await asyncio.gather(*(one(ch) for ch in channels))
        t1, c1 = time.monotonic(), os.times()
        for ch in channels:
            await ch.close()
    return {"done": done, "errors": errors[:3], "n_errors": len(errors), "wall_s": t1 - t0,
            "cpu_s": (c1.user + c1.system) - (c0.user + c0.system)}


# ------------------------------------------------------------------------------- orchestrator

def proc_stat(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, minor faults) of the whole process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck, int(fields[7])


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_cert(directory: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def trial(cfg: dict[str, Any], n: int, uploads_total: int, processes: int,
          min_per_conn: int) -> dict[str, Any]:
    script = os.path.abspath(__file__)
    per_conn = max(min_per_conn, -(-uploads_total // n))
    nproc = max(1, min(processes, n))
    blob = json.dumps(cfg)
    env = {**os.environ, **cfg["server_env"]}
    server = subprocess.Popen([sys.executable, script, "--role", "server", "--cfg", blob],
                              stdout=subprocess.PIPE, env=env, text=True)
    clients: list[subprocess.Popen[Any]] = []
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("PORT"):
            raise RuntimeError(f"server did not start: {line!r}")
        port = int(line.split()[1])
        shares = [n // nproc + (1 if i < n % nproc else 0) for i in range(nproc)]
        for share in shares:
            clients.append(subprocess.Popen(
                [sys.executable, script, "--role", "client", "--cfg", blob, "--port", str(port),
                 "--count", str(share), "--per-conn", str(per_conn)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for c in clients:
            line = c.stdout.readline() if c.stdout else ""
            if line.strip() != "READY":
                raise RuntimeError(f"client not ready: {line!r}")
        time.sleep(0.3)
        cpu0, flt0 = proc_stat(server.pid)
        t0 = time.monotonic()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("GO\n")
            c.stdin.flush()
        reports = []
        for c in clients:
            line = c.stdout.readline() if c.stdout else ""
            reports.append(json.loads(line))
        wall = time.monotonic() - t0
        cpu1, flt1 = proc_stat(server.pid)
        hwm = vm_hwm_mb(server.pid)
    finally:
        for c in clients:
            stop(c)
        stop(server)
    done = sum(r["done"] for r in reports)
    return {"config": cfg["name"], "n": n, "uploads": done, "expected": n * per_conn,
            "errors": sum(r["n_errors"] for r in reports),
            "first_errors": [e for r in reports for e in r["errors"]][:2],
            "server_cpu_ms_per_upload": 1000 * (cpu1 - cpu0) / max(done, 1),
            "server_minflt_per_upload": (flt1 - flt0) / max(done, 1),
            "clients_cpu_ms_per_upload": 1000 * sum(r["cpu_s"] for r in reports) / max(done, 1),
            "wall_ms_per_upload": 1000 * wall / max(done, 1), "server_vmhwm_mb": hwm,
            "client_processes": nproc}


def orchestrate(args: argparse.Namespace) -> int:
    names = args.configs.split(",")
    unknown = [x for x in names if x not in BY_NAME]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; see --list")
    ns = [int(x) for x in args.n.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if any(BY_NAME[x]["tls"] for x in names):
            make_cert(Path(tmp))
        for rep in range(args.repeats):
            for n in ns:
                for name in names:
                    cfg = dict(BY_NAME[name], certdir=tmp)
                    try:
                        r = trial(cfg, n, args.uploads, args.processes, args.min_per_conn)
                    except Exception as exc:  # recorded, the study goes on
                        r = {"config": name, "n": n, "error": f"{type(exc).__name__}: {exc}"}
                    r["repeat"] = rep
                    runs.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    write(out, args, runs, names, ns, started)
    table = write(out, args, runs, names, ns, started)
    print(table)
    return 0


def summarize(runs: list[dict[str, Any]], names: list[str], ns: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        base = None
        for name in names:
            rs = [r for r in runs if r["config"] == name and r["n"] == n and "error" not in r]
            if not rs:
                continue
            ms = [r["server_cpu_ms_per_upload"] for r in rs]
            med = statistics.median(ms)
            if base is None:
                base = med
            rows.append({
                "n": n, "config": name, "what": BY_NAME[name]["what"], "trials": len(rs),
                "server_ms_median": med, "server_ms_min": min(ms), "server_ms_max": max(ms),
                "ratio_to_first": med / base,
                "minflt_median": statistics.median(r["server_minflt_per_upload"] for r in rs),
                "clients_ms_median": statistics.median(r["clients_cpu_ms_per_upload"] for r in rs),
                "wall_ms_median": statistics.median(r["wall_ms_per_upload"] for r in rs),
                "vmhwm_mb_max": max(r["server_vmhwm_mb"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "failed_trials": len([r for r in runs if r["config"] == name and r["n"] == n
                                      and "error" in r]),
            })
    return rows


def write(out: Path, args: argparse.Namespace, runs: list[dict[str, Any]], names: list[str],
          ns: list[int], started: float) -> str:
    rows = summarize(runs, names, ns)
    lines = [f"{'N':>5} {'config':<14} {'server ms/upload':>17} {'min-max':>13} {'ratio':>6} "
             f"{'minflt':>7} {'clients ms':>10} {'wall ms':>8} {'HWM MB':>7} {'err':>4}"]
    for r in rows:
        lines.append(f"{r['n']:>5} {r['config']:<14} {r['server_ms_median']:>17.2f} "
                     f"{r['server_ms_min']:>6.2f}-{r['server_ms_max']:<6.2f} "
                     f"{r['ratio_to_first']:>6.2f} {r['minflt_median']:>7.0f} "
                     f"{r['clients_ms_median']:>10.2f} {r['wall_ms_median']:>8.2f} "
                     f"{r['vmhwm_mb_max']:>7.0f} {r['errors'] + r['failed_trials']:>4}")
    table = "\n".join(lines)
    import grpc

    out.write_text(json.dumps({
        "command": " ".join([os.path.relpath(sys.executable)] + sys.argv),
        "grpcio": grpc.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "elapsed_s": time.time() - started,
        "configs": {x: BY_NAME[x] for x in names}, "summary": rows, "runs": runs,
        "table": table,
    }, indent=1), "utf-8")
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(c["name"] for c in CONFIGS),
                   help="comma-separated; the first one is the baseline of the ratio column")
    p.add_argument("--n", default="1,50,1000", help="concurrent connections, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--uploads", type=int, default=1000,
                   help="uploads per trial (at least --min-per-conn per connection)")
    p.add_argument("--min-per-conn", type=int, default=2,
                   help="uploads per connection at least (all connections upload at once)")
    p.add_argument("--processes", type=int, default=4, help="client processes (at most)")
    p.add_argument("--out", default="benchmarks/out/transport_floor.json")
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    p.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--per-conn", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.list:
        for c in CONFIGS:
            print(f"{c['name']:<14} {c['what']}")
        return 0
    if args.role == "server":
        run_server(json.loads(args.cfg))
        return 0
    if args.role == "client":
        report = asyncio.run(run_clients(json.loads(args.cfg), args.port, args.count, args.per_conn))
        print(json.dumps(report), flush=True)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())

"""Memory and logs under one hostile site (issue 13, points 3 and 7).

Targets: three stalled uploads raise the server's memory by less than 50 MB and are closed
after the idle timeout; a flood of rejected uploads grows the audit log by a bounded amount.

What runs: the real grpc.aio service (``consortium.deploy.server._ServerThread``: the Hub,
the stream limits, the audit log) in its own process (``--serve``, so its RSS is its own, read
from /proc/<pid>/status), on 127.0.0.1, with the model's layout set to ``--params`` float32
values, so the upload limit is the one a model that size gets (4 x its bytes + 1 MiB, at most
2 GiB). The attacker is a raw gRPC client in this process.

(a) stalled uploads: three ``PushResult`` streams that each declare the upload limit and send
    one byte, then nothing. Once from three sites (each may have one upload in flight: all three
    are held until the idle timeout) and once from one site (the second and third are refused at
    once). Measured: the server's VmRSS before, its peak while the streams are open (sampled
    every 50 ms), after they close; the seconds until each stream is closed. ``--preallocate``
    repeats (a) with the buffer allocated at the declared size on the first frame, as before
    this issue, for comparison.
(b) a flood: one site sends garbage uploads (a frame that does not start at offset 0) back to
    back for ``--flood-seconds``; the audit log's bytes and entries are sampled every 10 s and
    after the server stops (its final flush writes the last ``suppressed`` counts). For scale:
    what the same rejections would have cost written one entry each.

Only 127.0.0.1; the server process is started here and stopped by its PID.

Run:  PYTHONPATH=src python benchmarks/hostile_memory.py                  # about 3 minutes
      PYTHONPATH=src python benchmarks/hostile_memory.py --flood-seconds 10 --idle 5  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# -- the server process --------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    import torch

    from consortium.deploy import codec
    from consortium.deploy.audit import AuditLog
    from consortium.deploy.server import MAX_RESULT_BYTES, StreamLimits, _ServerThread, tune_malloc
    from consortium.types import Layout, TensorSpec

    if args.preallocate:  # the buffer as it was before issue 13: the declared size at once
        feed = codec.Reassembler._feed

        def preallocating(self: Any, frame: Any) -> Any:
            if self.stream_id is None:
                c = codec._parse(codec.pb.Chunk, frame)
                if 0 < c.total_size <= self.max_total_bytes:
                    self.__dict__["_prealloc"] = bytearray(c.total_size)
            return feed(self, frame)

        codec.Reassembler._feed = preallocating  # type: ignore[method-assign]
    tune_malloc()
    torch.set_num_threads(1)
    audit = AuditLog(Path(args.run_dir) / "audit.jsonl", fsync=False)
    thread = _ServerThread("127.0.0.1:0", certs=None, limits=StreamLimits(idle_timeout_s=args.idle),
                           hub_args={"config_toml": "", "run_id": "hostile-memory",
                                     "max_result_bytes": MAX_RESULT_BYTES, "audit": audit})
    hub = thread.start()
    hub.layout = Layout((TensorSpec("w", (args.params,), torch.float32),))
    print(f"PORT {thread.port} LIMIT {hub.upload_limit()}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    thread.stop()
    hub.flush_rejections(final=True)
    audit.close()
    print("STATS " + json.dumps({"rejected_total": hub.rejected_total}), flush=True)


# -- the attacker --------------------------------------------------------------------------------


class Server:
    def __init__(self, run_dir: Path, args: argparse.Namespace, *, preallocate: bool = False) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        cmd = [sys.executable, __file__, "--serve", "--run-dir", str(run_dir), "--params",
               str(args.params), "--idle", str(args.idle)] + (["--preallocate"] if preallocate else [])
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        self.port, self.limit = int(words[1]), int(words[3])
        import grpc

        from consortium.deploy.proto import consortium_pb2_grpc as rpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = rpc.FederationStub(self.channel)

    def rss(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key}")

    def session(self, site: str) -> tuple[tuple[str, str], ...]:
        from consortium.deploy.codec import SESSION_METADATA_KEY
        from consortium.deploy.proto import consortium_pb2 as pb

        reply = self.stub.Register(pb.RegisterRequest(site=site), timeout=30)
        return ((SESSION_METADATA_KEY, reply.session_id),)

    def stop(self) -> dict[str, Any]:
        self.channel.close()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        stats: dict[str, Any] = {}
        for line in self.proc.stdout:
            if line.startswith("STATS "):
                stats = json.loads(line[6:])
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return stats


def stalled_uploads(args: argparse.Namespace, run_dir: Path, *, sites: int,
                    preallocate: bool = False) -> dict[str, Any]:
    """Three uploads that declare the limit and send one byte, from ``sites`` sites."""
    from consortium.deploy.proto import consortium_pb2 as pb

    server = Server(run_dir, args, preallocate=preallocate)
    try:
        sessions = [server.session(f"mallory-{i}") for i in range(sites)]
        time.sleep(1.0)
        before = server.rss()
        release = threading.Event()

        def stalled() -> Any:
            yield pb.Chunk(stream_id=uuid.uuid4().hex, offset=0, total_size=server.limit, data=b"x")
            release.wait(args.idle * 4 + 60)

        started = time.monotonic()
        calls = [server.stub.PushResult.future(stalled(), metadata=sessions[i % sites],
                                               timeout=args.idle * 4 + 60) for i in range(3)]
        closed: list[float | None] = [None] * 3
        outcome: list[str] = [""] * 3
        peak = before
        while not all(c is not None for c in closed):
            peak = max(peak, server.rss())
            for i, call in enumerate(calls):
                if closed[i] is None and call.done():
                    closed[i] = time.monotonic() - started
                    try:
                        ack = call.result()
                        outcome[i] = f"refused: {ack.reason[:80]}"
                    except Exception as exc:  # grpc.RpcError
                        outcome[i] = f"{exc.code().name}"  # type: ignore[attr-defined]
            time.sleep(0.05)
        release.set()
        time.sleep(1.0)
        after = server.rss()
    finally:
        server.stop()
    return {"sites": sites, "preallocate": preallocate, "declared_bytes": server.limit,
            "rss_before": before, "rss_peak": peak, "rss_after": after,
            "growth_peak": peak - before, "closed_after_s": closed, "outcome": outcome}


def flood(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One site sending garbage uploads back to back for ``--flood-seconds``."""
    from consortium.deploy.proto import consortium_pb2 as pb

    server = Server(run_dir, args)
    audit = run_dir / "audit.jsonl"
    samples = []
    sent = 0
    try:
        metadata = server.session("mallory")
        garbage = pb.Chunk(stream_id="g", offset=5, total_size=10, data=b"x")
        start = time.monotonic()
        next_sample = start
        while (now := time.monotonic()) - start < args.flood_seconds:
            if now >= next_sample:
                samples.append((round(now - start, 1), audit.stat().st_size, _entries(audit)))
                next_sample += 10
            ack = server.stub.PushResult(iter([garbage]), metadata=metadata, timeout=30)
            assert not ack.accepted
            sent += 1
        duration = time.monotonic() - start
        samples.append((round(duration, 1), audit.stat().st_size, _entries(audit)))
    finally:
        stats = server.stop()
    kinds: dict[str, int] = {}
    sizes: list[int] = []
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
        if entry["kind"] == "rejected":
            sizes.append(len(line) + 1)
    per_entry = sum(sizes) / len(sizes) if sizes else 0
    minutes = duration / 60
    return {"seconds": duration, "uploads_sent": sent, "rejected_counted": stats.get("rejected_total"),
            "audit_bytes": audit.stat().st_size, "audit_entries": sum(kinds.values()),
            "entries_by_kind": kinds, "audit_bytes_per_minute": audit.stat().st_size / minutes,
            "rejections_per_second": sent / duration,
            "unlimited_bytes_per_minute": sent * per_entry / minutes, "samples": samples}


def _entries(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=25_000_000,
                        help="float32 values of the model (the upload limit follows; 25M: 400 MB)")
    parser.add_argument("--idle", type=float, default=30.0, help="--stream-idle-timeout (s)")
    parser.add_argument("--flood-seconds", type=float, default=60.0)
    parser.add_argument("--no-preallocate", action="store_true",
                        help="skip the comparison with the buffer allocated up front")
    parser.add_argument("--out", default=str(HERE / "results" / "hostile_memory.json"))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preallocate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stalls = [stalled_uploads(args, Path(tmp) / "three-sites", sites=3),
                  stalled_uploads(args, Path(tmp) / "one-site", sites=1)]
        if not args.no_preallocate:
            stalls.append(stalled_uploads(args, Path(tmp) / "before", sites=3, preallocate=True))
        flooded = flood(args, Path(tmp) / "flood")
    mb = 1 / (1 << 20)
    print(f"(a) three stalled uploads, each declaring {stalls[0]['declared_bytes'] * mb:.0f} MiB "
          f"and sending 1 byte; idle timeout {args.idle:g} s")
    print(f"{'buffers':<22} {'sites':>5} {'RSS before':>11} {'peak':>9} {'growth':>8} "
          f"{'after':>9}  closed after (s) / outcome")
    for s in stalls:
        label = "declared size (before)" if s["preallocate"] else "grow with data (now)"
        closed = ", ".join(f"{t:.1f} {o.split(':')[0]}" for t, o in zip(s["closed_after_s"],
                                                                       s["outcome"]))
        print(f"{label:<22} {s['sites']:>5} {s['rss_before'] * mb:>8.0f} MB {s['rss_peak'] * mb:>6.0f} MB "
              f"{s['growth_peak'] * mb:>5.1f} MB {s['rss_after'] * mb:>6.0f} MB  {closed}")
    f = flooded
    print(f"\n(b) a flood of garbage uploads from one site for {f['seconds']:.0f} s: "
          f"{f['uploads_sent']} sent ({f['rejections_per_second']:.0f}/s), "
          f"{f['rejected_counted']} counted as rejections")
    print(f"audit log: {f['audit_bytes']} bytes, {f['audit_entries']} entries "
          f"{f['entries_by_kind']}; {f['audit_bytes_per_minute'] / 1024:.1f} KiB a minute "
          f"(one entry per rejection: {f['unlimited_bytes_per_minute'] * mb:.1f} MiB a minute)")
    print("samples (s, bytes, entries):", f["samples"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"params": args.params, "idle_timeout_s": args.idle,
                                          "stalled": stalls, "flood": flooded}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

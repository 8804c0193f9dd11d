#!/usr/bin/env python3
"""Where the deployment server's memory goes during a round (issue 14): a timeline of its RSS.

Usage:  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/deployment/memory_probe.py \
            --clients 1000 --rounds 3 [--trace] [--out probe.json] [switches]

Runs ``consortium.deploy.server.serve`` in this process (the server ``consortium server``
starts, with benchmarks/deployment.py's experiment: ``logistic`` on 26,213 features, 10 classes,
1 MB updates, every site in every round, ``--rounds`` rounds of which the last also evaluates)
against benchmarks/deployment/clients.py (``--processes`` processes of asyncio sites on
127.0.0.1), and every ``--sample-ms`` records:

- VmRSS and VmHWM of this process (/proc/self/status), and its CPU time;
- glibc's view over every malloc arena (``mallinfo2``): bytes in use and bytes free in the
  heaps (freed, still resident unless returned); ``malloc_info.xml`` in ``--workdir`` is
  glibc's per-arena report at the highest RSS;
- the server's counters: uploads arrived (``FederationService._uploads``) and being read, tasks
  open (``Hub._pending``), free task-sending places;
- with ``--trace``: the bytes Python allocated (``tracemalloc``: Python objects, NumPy arrays;
  not gRPC's core, not torch's own allocations) and a snapshot, by line, at its highest.

RSS = what malloc holds in use + free heap still resident + the rest (code and data of Python,
torch and gRPC, about 150 MB). Switches that undo one of the server's memory settings each, to
measure what it is worth: ``--read-buffer BYTES`` (``server.READ_BUFFER_BYTES``; 1073741824: as
if uncapped), ``--old-digest`` (the audit's float64 norm through a float64 copy of each update,
as before issue 14), ``--uploads-at-once K``, ``--sends-at-once K``, ``--no-tune`` (without
``tune_malloc``). Only 127.0.0.1; the site processes are started and waited for here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CLIENTS_SCRIPT = HERE / "clients.py"

CONFIG = """\
name = "memory-probe"
seed = 0
rounds = {rounds}

[data]
dataset = "synthetic"

[model]
name = "logistic"

[algorithm]
name = "fedavg"

[sampling]
fraction = 1.0

[evaluation]
every = {rounds}
"""


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        libc.fopen.restype = ctypes.c_void_p
        return libc
    except (OSError, AttributeError):  # not glibc (2.33+): no malloc figures
        return None


LIBC = _libc()


def malloc_mb() -> dict[str, float]:
    """glibc's view over every arena: MB in use (heaps and mmapped) and MB free in the heaps."""
    if LIBC is None:
        return {}
    m = LIBC.mallinfo2()
    return {"malloc_used_mb": round((m.uordblks + m.hblkhd) / 2**20),
            "malloc_free_mb": round(m.fordblks / 2**20)}


def malloc_info(path: Path) -> None:
    """glibc's per-arena report (XML) into ``path``."""
    if LIBC is None:
        return
    f = LIBC.fopen(str(path).encode(), b"w")
    LIBC.malloc_info(0, ctypes.c_void_p(f))
    LIBC.fclose(ctypes.c_void_p(f))


def status_mb() -> tuple[float, float]:
    text = Path("/proc/self/status").read_text()
    kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    return int(kb["VmRSS"]) / 1024, int(kb["VmHWM"]) / 1024


class Sampler(threading.Thread):
    """Samples memory, CPU and the server's counters until stopped."""

    def __init__(self, every_s: float, trace: bool, info_path: Path) -> None:
        super().__init__(daemon=True)
        self.every_s, self.trace, self.info_path = every_s, trace, info_path
        self.samples: list[dict[str, float]] = []
        self.thread: Any = None  # the server's _ServerThread, once it exists
        self.stop = threading.Event()
        self.best_traced = 0.0
        self.best_rss = 0.0
        self.snapshot: Any = None
        self.snapshot_sample: dict[str, float] | None = None

    def counters(self) -> dict[str, float]:
        service = getattr(self.thread, "service", None)
        hub = getattr(self.thread, "hub", None)
        if service is None or hub is None:
            return {}
        return {"uploads": len(service._uploads), "reading": service.reading,
                "open_tasks": len(hub._pending), "send_places_free": service._sending._value}

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            rss, hwm = status_mb()
            sample = {"t": round(time.monotonic() - start, 3), "rss_mb": round(rss),
                      "hwm_mb": round(hwm), "cpu_s": round(time.process_time(), 2)}
            sample.update(malloc_mb())
            if rss > self.best_rss + 50:
                self.best_rss = rss
                malloc_info(self.info_path)
            if self.trace:
                sample["python_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20)
                if sample["python_mb"] > self.best_traced + 50:  # a new high: keep its snapshot
                    self.best_traced = sample["python_mb"]
                    self.snapshot = tracemalloc.take_snapshot()
                    self.snapshot_sample = sample
            sample.update(self.counters())
            self.samples.append(sample)
            time.sleep(self.every_s)


def undo(args: argparse.Namespace, sampler: Sampler) -> None:
    """Let the sampler see the server, and apply the switches that undo a memory setting."""
    import asyncio

    from consortium.deploy import hub as deploy_hub
    from consortium.deploy import server as deploy_server

    original_start = deploy_server._ServerThread.start

    def start(self: Any) -> Any:
        sampler.thread = self
        return original_start(self)

    deploy_server._ServerThread.start = start  # type: ignore[method-assign]
    if args.no_tune:
        deploy_server.tune_malloc = lambda: False
    if args.read_buffer:
        deploy_server.READ_BUFFER_BYTES = args.read_buffer
    if args.old_digest:
        import hashlib

        import torch

        def digest(tensor: Any) -> tuple[str, float]:
            flat = tensor.detach().reshape(-1)
            return (hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest(),
                    float(torch.linalg.vector_norm(flat, dtype=torch.float64)))

        deploy_hub.update_digest = digest  # type: ignore[assignment]
    if args.uploads_at_once or args.sends_at_once:
        plain_init = deploy_server.FederationService.__init__

        def init(self: Any, *a: Any, **kw: Any) -> None:
            plain_init(self, *a, **kw)
            if args.uploads_at_once:
                self._receiving = asyncio.Semaphore(args.uploads_at_once)
            if args.sends_at_once:
                self._sending = asyncio.Semaphore(args.sends_at_once)

        deploy_server.FederationService.__init__ = init  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="rounds (the last also evaluates)")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--sample-ms", type=float, default=20)
    p.add_argument("--trace", action="store_true", help="tracemalloc (slows the server)")
    p.add_argument("--workdir", default="/tmp/consortium-memory-probe")
    p.add_argument("--out", default="", help="JSON report (with the timeline)")
    p.add_argument("--read-buffer", type=int, default=0, help="server.READ_BUFFER_BYTES (0: as shipped)")
    p.add_argument("--old-digest", action="store_true",
                   help="the audit's norm through a float64 copy of each update (as before)")
    p.add_argument("--uploads-at-once", type=int, default=0, help="uploads read at once (0: as shipped)")
    p.add_argument("--sends-at-once", type=int, default=0, help="tasks sent at once (0: as shipped)")
    p.add_argument("--no-tune", action="store_true", help="without tune_malloc()")
    args = p.parse_args()

    from consortium.deploy import server as deploy_server

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"run-{os.getpid()}"
    config = work / "experiment.toml"
    config.write_text(CONFIG.format(rounds=args.rounds), "utf-8")
    if args.trace:
        tracemalloc.start(4)
    sampler = Sampler(args.sample_ms / 1000, args.trace, work / "malloc_info.xml")
    undo(args, sampler)
    sites: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")

    def launch(port: int) -> None:
        first = 0
        for i in range(args.processes):
            count = args.clients // args.processes + (1 if i < args.clients % args.processes else 0)
            cmd = [sys.executable, str(CLIENTS_SCRIPT), "--server", f"127.0.0.1:{port}",
                   "--first", str(first), "--count", str(count),
                   "--report", str(work / f"clients-{i}.json")]
            with open(work / f"clients-{i}.log", "w") as log:  # the child keeps its own copy
                sites.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log))
            first += count

    sampler.start()
    try:
        deploy_server.serve(config, listen="127.0.0.1:0", certs=None, out=run_dir,
                            min_sites=args.clients, on_listening=launch, progress=False,
                            register_timeout=600, round_timeout=600)
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
        for proc in sites:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    samples = sampler.samples
    peak = max(samples, key=lambda s: s["rss_mb"])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(s for s in samples if s.get("open_tasks"))  # the first round's tasks are out
    cpu_ms = (samples[-1]["cpu_s"] - first["cpu_s"]) / sum(r["clients"] for r in rounds) * 1e3
    report: dict[str, Any] = {
        "clients": args.clients, "arguments": vars(args), "peak_rss_mb": peak["rss_mb"],
        "hwm_mb": samples[-1]["hwm_mb"], "at_peak": peak,
        "cpu_ms_per_update": round(cpu_ms, 2),  # every round, the first and the evaluation too
        "rounds": [{k: r[k] for k in ("round", "clients", "wall_s")} for r in rounds],
    }
    print(f"peak RSS {peak['rss_mb']} MB (VmHWM {samples[-1]['hwm_mb']} MB), {cpu_ms:.2f} ms of "
          f"CPU per update; at the peak: {peak}")
    for r in rounds:
        print(f"  round {r['round']}: {r['clients']} updates, {r['wall_s']:.2f} s")
    if sampler.snapshot is not None:
        stats = sampler.snapshot.statistics("lineno")[:15]
        report["python_peak"] = {"sample": sampler.snapshot_sample,
                                 "top": [f"{s.size / 2**20:.0f} MB {s.count} {s.traceback}" for s in stats]}
        print(f"Python's most ({sampler.snapshot_sample}):")
        for line in report["python_peak"]["top"]:
            print(f"  {line}")
    step = max(1, len(samples) // 300)  # the timeline, thinned to ~300 rows
    report["timeline"] = samples[::step]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), "utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

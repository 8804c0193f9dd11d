"""Load benchmark of a deployment (issue 7): N lightweight sites and one real server on loopback.

Target: at least 1,000 sites held by one server, at most 2 ms of server overhead per 1 MB
update.

What runs (one trial per N, each with fresh processes and a fresh run directory):

- the server: the real ``consortium server CONFIG --insecure --listen 127.0.0.1:0 --min-sites N``
  in its own process (``python -m consortium.cli``): grpc.aio in its thread, the simulation's
  round loop through ``RemoteExecutor``, every result validated, audited (hash chain, fsync)
  and aggregated. The model is ``logistic`` on inputs of 26,213 features and 10 classes:
  262,140 float32 parameters, 1.0 MB. ``--insecure``: no TLS, the sites are who they claim to be
  (a load test of the server, not of the handshake). Variants: ``--one-thread N`` the same
  server with ``OMP_NUM_THREADS=1`` (torch's intra-op pool then does not spin on the cores the
  sites need); ``--tls N`` mutual TLS with certificates from ``consortium.deploy.provision``;
  ``--null N`` benchmarks/deployment/null_server.py, the same wire protocol with nothing behind
  it (no validation, audit or aggregation): the floor grpc.aio sets on this machine.
- the sites: benchmarks/deployment/clients.py, ``--processes`` processes of asyncio coroutines,
  one ``grpc.aio`` channel and TCP connection per site. Each registers, describes its data
  (1 training and 1 test example, so the server's placeholder data set stays small; see
  ``--num-train``), long-polls for tasks and answers every training task with a precomputed
  1 MB delta and every evaluation task with dummy metrics. No training: the point is the
  server's cost.
- ``--rounds R`` training rounds, then one more that trains and evaluates
  (``evaluation.every = R + 1``): every site takes part in every round (``sampling.fraction = 1``).

What is measured:

- held: sites whose Register and Describe succeeded, and the time from the first connection to
  the last Describe.
- server memory: VmRSS of the server process holding the N idle sites (sampled when it logs
  "ready; starting"), and VmHWM (the peak) at the end, from /proc/<pid>/status.
- round latency: ``wall_s`` of each round in the run's metrics.jsonl (the round loop's own clock:
  tasks out, every result in, aggregate, model step; plus the evaluation in the last round).
- server CPU per update: utime + stime of the server process (all its threads; /proc/<pid>/stat),
  sampled every 20 ms, across the steady-state training rounds (2 .. R: round 1 also holds the
  server's one-off set-up) divided by the updates those rounds received. The kernel charges CPU
  time to the process that ran, so this is the server's own cost even though the sites share
  the machine's two cores; wall time per update (round wall_s / N) is inflated by the sites.
- where the server's CPU goes: an in-process micro-benchmark of the codec, validation, audit and
  aggregation steps the server runs for one update (``--micro-repeats``), beside the measured
  total; the difference is gRPC (HTTP/2, the C core and its Python bindings) and the asyncio
  and round-loop bookkeeping.

Also measured in process (with ``--micro-repeats``): the zeros the server allocates as the
placeholder of 1,000 sites' declared data.

Only 127.0.0.1; every process is started here and stopped by its PID (killed if still running
when its trial ends). About 3.5 minutes with the defaults on the 2-core machine.

Run:  PYTHONPATH=src python benchmarks/deployment.py     # 50, 250, 1000 + 1-thread, TLS, null
      PYTHONPATH=src python benchmarks/deployment.py --clients 50 --one-thread "" --tls "" \
          --null "" --rounds 2 --micro-repeats 0         # a quick check
      PYTHONPATH=src python benchmarks/deployment.py --clients 1200 --server-nofile 1024 \
          --one-thread "" --tls "" --null ""             # the open-files limit
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENTS_SCRIPT = HERE / "deployment" / "clients.py"
NULL_SERVER_SCRIPT = HERE / "deployment" / "null_server.py"
KINDS = ("insecure", "one-thread", "tls", "null")
LABELS = {"insecure": "consortium", "one-thread": "consortium, 1 torch thread",
          "tls": "consortium, mTLS", "null": "null server (floor)"}
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.02

CONFIG = """\
# written by benchmarks/deployment.py
name = "deployment-load"
seed = 0
rounds = {rounds}

[data]
dataset = "synthetic"  # never loaded: the server builds placeholders from the sites' descriptions
clients = {n}

[model]
name = "logistic"

[algorithm]
name = "fedavg"

[sampling]
fraction = 1.0

[evaluation]
every = {rounds}
"""


# -- watching processes --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of ``pid`` (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of ``pid`` in MB (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
    if len(kb) < 2:
        return None  # a zombie has no memory lines
    return int(kb["VmRSS"]) / 1024, int(kb["VmHWM"]) / 1024


class Lines(threading.Thread):
    """Reads a pipe line by line, keeping each line with the monotonic time it arrived."""

    def __init__(self, stream: Any, echo: bool = False) -> None:
        super().__init__(daemon=True)
        self.stream, self.echo = stream, echo
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if self.echo:
                print(f"    | {line.rstrip()[:160]}", flush=True)

    def first(self, pattern: str) -> tuple[float, re.Match[str]] | None:
        for t, line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return t, m
        return None


class Monitor(threading.Thread):
    """Samples the server's CPU and memory, the sites' CPU, and when each round's line lands in
    metrics.jsonl, every ``SAMPLE_S`` seconds until the server exits."""

    def __init__(self, server_pid: int, metrics: Path) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.metrics = server_pid, metrics
        self.client_pids: list[int] = []
        self.client_cpu: dict[int, float] = {}
        self.samples: list[tuple[float, ...]] = []  # t, cpu s, rss MB, hwm MB, sites' cpu s
        self.round_ends: list[dict[str, float]] = []
        self.stop = threading.Event()

    def sample_now(self) -> dict[str, float]:
        """The latest sample (taken now if the server is still there)."""
        self._sample()
        return as_dict(self.samples[-1])

    def run(self) -> None:
        while not self.stop.is_set() and self._sample():
            self._rounds()
            time.sleep(SAMPLE_S)
        self._rounds()

    def _sample(self) -> bool:
        cpu, mem = cpu_seconds(self.server_pid), memory_mb(self.server_pid)
        for pid in self.client_pids:
            c = cpu_seconds(pid)
            if c is not None:
                self.client_cpu[pid] = c
        if cpu is None or mem is None:
            return False
        self.samples.append((time.monotonic(), cpu, *mem, sum(self.client_cpu.values())))
        return True

    def _rounds(self) -> None:
        try:
            done = self.metrics.read_text().count("\n")
        except OSError:
            return
        while len(self.round_ends) < done and self.samples:
            self.round_ends.append(as_dict(self.samples[-1]))


def as_dict(sample: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(("t", "cpu_s", "rss_mb", "hwm_mb", "clients_cpu_s"), sample))


# -- one trial -------------------------------------------------------------------------------------


def run_trial(n: int, args: argparse.Namespace, *, kind: str) -> dict[str, Any]:
    """Start a server and the sites, run the rounds, stop everything; the trial's figures.

    ``kind``: "insecure" (consortium server --insecure), "one-thread" (the same with
    OMP_NUM_THREADS=1, so torch's intra-op pool does not spin on the cores the sites need), "tls"
    (mutual TLS) or "null" (the transport floor, benchmarks/deployment/null_server.py).
    """
    tls = kind == "tls"
    name = f"n{n}" + ("" if kind == "insecure" else f"-{kind}")
    trial = Path(args.workdir) / name
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir(parents=True)
    rounds = args.rounds + 1
    config = trial / "experiment.toml"
    config.write_text(CONFIG.format(rounds=rounds, n=n), "utf-8")
    run_dir = trial / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if kind == "one-thread":
        server_env["OMP_NUM_THREADS"] = "1"
    security = ["--insecure"]
    if tls:
        from consortium.deploy.provision import provision

        provision([f"s{i:04d}" for i in range(n)], trial / "certs")
        security = ["--certs", str(trial / "certs" / "server")]
    cmd = [sys.executable, "-m", "consortium.cli", "server", str(config), *security,
           "--listen", "127.0.0.1:0", "--out", str(run_dir), "--min-sites", str(n),
           "--no-progress", "--round-timeout", str(args.round_timeout),
           "--register-timeout", str(args.round_timeout)]
    if kind == "null":
        cmd = [sys.executable, str(NULL_SERVER_SCRIPT), "--sites", str(n), "--rounds",
               str(args.rounds), "--out", str(run_dir), "--input-dim", str(args.input_dim),
               "--classes", str(args.classes), "--send-concurrency", str(args.null_concurrency)]
        cmd += ["--untuned"] if args.null_untuned else []
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)

    def limit_files() -> None:
        if args.server_nofile:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.server_nofile, hard))

    started = time.monotonic()
    server = subprocess.Popen(cmd, cwd=trial, env={**env, **server_env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=limit_files)
    workers: list[subprocess.Popen[str]] = []
    err, out = Lines(server.stderr, echo=args.verbose), Lines(server.stdout)
    err.start()
    out.start()
    monitor = Monitor(server.pid, run_dir / "metrics.jsonl")
    monitor.start()
    try:
        port = wait_for(err, r"\(port (\d+)\)", server, timeout=120)
        baseline = monitor.sample_now()
        workers = start_sites(n, int(port.group(1)), args, trial, env, tls=tls)
        monitor.client_pids = [w.pid for w in workers]
        ready_at = wait_for_time(err, r"ready; starting", server, timeout=args.round_timeout)
        ready = nearest(monitor, ready_at)
        code = server.wait(timeout=args.round_timeout * rounds)
        for w in workers:
            w.wait(timeout=120)
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                print(f"   killing pid {p.pid} (still running)", flush=True)
                p.kill()
                p.wait()
        monitor.stop.set()
        monitor.join(timeout=5)
        err.join(timeout=5)
    wall = time.monotonic() - started
    if code != 0:
        tail = "\n".join(line for _, line in err.lines[-20:])
        raise SystemExit(f"{name}: the server exited with {code}:\n{tail}")
    sites = [s for i in range(len(workers)) for s in
             json.loads((trial / f"clients-{i}.json").read_text())["sites"]]
    result = summarise(n, sites, monitor, baseline, ready, run_dir, args)
    result.update(name=name, kind=kind, tls=tls, processes=len(workers), trial_wall_s=round(wall, 1),
                  server_env=server_env, command=" ".join(
                      ["consortium", *cmd[3:]] if kind != "null" else cmd[1:]))
    return result


def start_sites(n: int, port: int, args: argparse.Namespace, trial: Path, env: dict[str, str],
                *, tls: bool) -> list[subprocess.Popen[str]]:
    procs = min(args.processes, n)
    env = dict(env, OMP_NUM_THREADS="1")
    workers: list[subprocess.Popen[str]] = []
    first = 0
    for i in range(procs):
        count = n // procs + (1 if i < n % procs else 0)
        cmd = [sys.executable, str(CLIENTS_SCRIPT), "--server", f"127.0.0.1:{port}",
               "--first", str(first), "--count", str(count),
               "--report", str(trial / f"clients-{i}.json"), "--input-dim", str(args.input_dim),
               "--classes", str(args.classes), "--num-train", str(args.num_train),
               "--update-floats", str(args.update_floats)]
        if tls:
            cmd += ["--certs", str(trial / "certs")]
        with open(trial / f"clients-{i}.log", "w") as log:  # the child keeps its own copy
            workers.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        first += count
    return workers


def wait_for(lines: Lines, pattern: str, proc: subprocess.Popen[str], *, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = lines.first(pattern)
        if found:
            return found[1]
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader catch the last lines
            tail = "\n".join(line for _, line in lines.lines[-20:])
            raise SystemExit(f"the server exited ({proc.returncode}) before {pattern!r}:\n{tail}")
        time.sleep(0.01)
    raise SystemExit(f"no {pattern!r} from the server within {timeout:.0f} s")


def wait_for_time(lines: Lines, pattern: str, proc: subprocess.Popen[str], *, timeout: float) -> float:
    wait_for(lines, pattern, proc, timeout=timeout)
    found = lines.first(pattern)
    assert found is not None
    return found[0]


def nearest(monitor: Monitor, t: float) -> dict[str, float]:
    """The monitor's sample closest to time ``t`` (taken every ``SAMPLE_S`` s)."""
    time.sleep(2 * SAMPLE_S)
    return as_dict(min(monitor.samples, key=lambda s: abs(s[0] - t)))


# -- figures ---------------------------------------------------------------------------------------


def summarise(n: int, sites: list[dict[str, Any]], monitor: Monitor, baseline: dict[str, float],
              ready: dict[str, float], run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = monitor.round_ends
    if len(ends) != len(metrics):
        raise SystemExit(f"saw {len(ends)} round ends for {len(metrics)} metrics lines")
    held = [s for s in sites if "t_held" in s]
    errors: dict[str, int] = {}
    for s in sites:
        if s["error"]:
            errors[s["error"][:200]] = errors.get(s["error"][:200], 0) + 1
    tasks = [t for s in sites for t in s["tasks"]]
    rejected = sum(1 for t in tasks if not t["accepted"])
    rounds = []
    previous = ready
    for m, end in zip(metrics, ends):
        rounds.append({
            "round": m["round"], "updates": m["clients"], "wall_s": round(m["wall_s"], 3),
            "server_cpu_s": round(end["cpu_s"] - previous["cpu_s"], 2),
            "clients_cpu_s": round(end["clients_cpu_s"] - previous["clients_cpu_s"], 2),
            "rss_mb_at_end": round(end["rss_mb"]), "bytes_up": m.get("bytes_up"),
            "bytes_down": m.get("bytes_down"), "failed": len(m.get("failed", {})),
        })
        previous = end
    train = rounds[: args.rounds]
    steady = train[1:] or train  # round 1 also pays the server's set-up
    updates = sum(r["updates"] for r in steady)
    cpu = sum(r["server_cpu_s"] for r in steady)
    clients_cpu = sum(r["clients_cpu_s"] for r in steady)
    rtt = sorted((t["t_ack"] - t["t_push"]) * 1e3 for t in tasks if t["kind"] == "train")
    t0 = min((s["t_start"] for s in held), default=float("nan"))
    return {
        "n": n,
        "held": len(held),
        "finished": sum(1 for s in sites if s["finished"]),
        "errors": errors,
        "rejected": rejected,
        "hold_all_s": round(max((s["t_held"] for s in held), default=t0) - t0, 2),
        "server_rss_start_mb": round(baseline["rss_mb"]),
        "server_rss_held_mb": round(ready["rss_mb"]),
        "server_peak_mb": round(max(s[3] for s in monitor.samples)),
        "rounds": rounds,
        "train_round_s_median": round(statistics.median(r["wall_s"] for r in train), 3),
        "train_round_s_max": round(max(r["wall_s"] for r in train), 3),
        "eval_round_s": rounds[-1]["wall_s"],
        "steady_rounds": [r["round"] for r in steady],
        "steady_updates": updates,
        "server_cpu_ms_per_update": round(cpu / updates * 1e3, 2),
        "clients_cpu_ms_per_update": round(clients_cpu / updates * 1e3, 2),
        "wall_ms_per_update": round(sum(r["wall_s"] for r in steady) / updates * 1e3, 2),
        "push_rtt_ms_median": round(statistics.median(rtt), 1) if rtt else None,
        "push_rtt_ms_p95": round(rtt[int(0.95 * (len(rtt) - 1))], 1) if rtt else None,
    }


# -- where the CPU goes: the server's per-update steps, in process -----------------------------------


def micro_split(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median wall and CPU ms of each step the server runs on its side of one 1 MB update
    (CPU: this thread's, with torch on this one thread so that none of it runs elsewhere; an
    fsync waits for the disk without using the CPU)."""
    import torch

    from consortium.aggregation.mean import weighted_mean
    from consortium.deploy.audit import AuditLog, update_digest
    from consortium.deploy.codec import (
        Reassembler,
        ResultEnvelope,
        TaskEnvelope,
        chunk,
        decode_upload,
        encode_upload,
        encode_work,
    )
    from consortium.deploy.proto import consortium_pb2 as pb
    from consortium.deploy.validate import ExpectedTask, validate_result
    from consortium.messages import Result, Task
    from consortium.models.zoo import logistic
    from consortium.types import Parameters, Update

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    params = Parameters.from_module(logistic((args.input_dim,), args.classes))
    task = Task(round=1, client_id="s0000", parameters=params, seed=1)
    delta = torch.randn(params.layout.size) * 1e-3
    upload = encode_upload(ResultEnvelope("t" * 32, Result(1, "s0000", Update("s0000", delta, 1.0))))
    wire_up = [f.SerializeToString() for f in chunk(upload, "u" * 32)]
    aggregator = weighted_mean()
    acc = aggregator.start(params.layout)
    audit_dir = Path(args.workdir) / "micro"
    shutil.rmtree(audit_dir, ignore_errors=True)
    audit = AuditLog(audit_dir / "audit.jsonl")
    times: dict[str, list[tuple[float, float]]] = {}
    state: dict[str, Any] = {}

    def step(label: str, fn: Any) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        state[label] = fn()
        spent = (time.perf_counter() - start) * 1e3, (time.thread_time() - cpu) * 1e3
        times.setdefault(label, []).append(spent)

    for _ in range(args.micro_repeats):
        step("task: encode_work + chunk", lambda: list(chunk(encode_work(TaskEnvelope("t" * 32, task)), "d" * 32)))
        step("task: serialize frames (gRPC send)", lambda: [f.SerializeToString() for f in state["task: encode_work + chunk"]])
        step("task: audit entry (fsync)", lambda: audit.append("task", site="s0000", round=1, task_id="t" * 32))
        step("result: parse frames (gRPC receive)", lambda: [pb.Chunk.FromString(b) for b in wire_up])

        def reassemble() -> bytes:
            r = Reassembler(2 << 30)
            for frame in state["result: parse frames (gRPC receive)"]:
                out = r.feed(frame)
            return bytes(out)

        step("result: reassemble + bytes()", reassemble)
        step("result: decode_upload", lambda: decode_upload(state["result: reassemble + bytes()"]))
        envelope = state["result: decode_upload"]
        step("result: validate_result", lambda: validate_result(
            envelope, expected=ExpectedTask(site="s0000", round=1, task_id="t" * 32),
            layout=params.layout, max_bytes=2 << 30, seen_task_ids=set()))
        step("result: update_digest (SHA-256 + norm)", lambda: update_digest(envelope.result.update.delta))
        step("result: audit entry (fsync)", lambda: audit.append(
            "result", site="s0000", round=1, task_id="t" * 32, update_sha256="0" * 64, norm=1.0, weight=1.0))
        step("aggregate: weighted mean accumulate", lambda: aggregator.accumulate(acc, envelope.result.update))
    audit.close()
    torch.set_num_threads(threads)
    split = {k: {"wall_ms": round(statistics.median(w for w, _ in v), 3),
                 "cpu_ms": round(statistics.median(c for _, c in v), 3)} for k, v in times.items()}
    split["total"] = {k: round(sum(v[k] for v in split.values()), 3) for k in ("wall_ms", "cpu_ms")}
    return split


def placeholder_mb(n: int, examples: tuple[tuple[int, int], ...], input_dim: int) -> list[dict[str, Any]]:
    """MB of zeros the server allocates for the sites' declared data (its placeholder data set,
    ``consortium.deploy.server._placeholder_dataset``, and the packed copy the round loop makes)."""
    from consortium.config import ExperimentConfig
    from consortium.deploy.hub import SiteInfo
    from consortium.deploy.server import _placeholder_dataset

    out = []
    for train, test in examples:
        sites = {f"s{i:04d}": SiteInfo((input_dim,), 10, train, test) for i in range(n)}
        dataset = _placeholder_dataset(ExperimentConfig(), sites)
        own = sum(d.train.x.nbytes + d.test.x.nbytes for d in dataset.clients.values())
        packed = dataset.packed()
        out.append({"sites": n, "train": train, "test": test, "placeholder_mb": round(own / 2**20),
                    "packed_copy_mb": round((packed.train.x.nbytes + packed.test.x.nbytes) / 2**20)})
        del dataset, packed
    return out


# -- main ------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import grpc
    import torch

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "grpc": grpc.__version__, "torch": torch.__version__,
        "cpus": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "git_head": git("rev-parse", "--short", "HEAD"),
        "deploy_files_modified": git("status", "--short", "src/consortium/deploy").splitlines(),
    }


def print_table(trials: list[dict[str, Any]]) -> None:
    head = ("N", "server", "held", "hold s", "RSS held MB", "RSS peak MB", "train round s",
            "train+eval s", "CPU ms/upd", "wall ms/upd", "push RTT ms", "sites CPU ms/upd")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for t in trials:
        server = LABELS[t["kind"]]
        extra = {k: v for k, v in t["server_env"].items()
                 if not (t["kind"] == "one-thread" and k == "OMP_NUM_THREADS")}
        if extra:
            server += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        row = (f"{t['n']:,}", server, f"{t['held']:,}", f"{t['hold_all_s']:.1f}",
               f"{t['server_rss_held_mb']:,}", f"{t['server_peak_mb']:,}",
               f"{t['train_round_s_median']:.2f}", f"{t['eval_round_s']:.2f}",
               f"{t['server_cpu_ms_per_update']:.2f}", f"{t['wall_ms_per_update']:.2f}",
               f"{t['push_rtt_ms_median']}", f"{t['clients_cpu_ms_per_update']:.2f}")
        print("| " + " | ".join(row) + " |")


def targets(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's two targets, judged on the largest trial of the server as it ships."""
    shipped = [t for t in trials if t["kind"] == "insecure"]
    if not shipped:
        return {}
    big = max(shipped, key=lambda t: t["n"])
    return {
        "sites held": {"target": ">= 1000", "result": big["held"], "met": big["held"] >= 1000},
        "server overhead per 1 MB update": {
            "target": "<= 2 ms", "met": big["server_cpu_ms_per_update"] <= 2.0,
            "result": f"{big['server_cpu_ms_per_update']} ms CPU, {big['wall_ms_per_update']} ms "
                      f"of round wall time (N = {big['n']})"},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="50,250,1000", help="comma-separated N (insecure trials)")
    p.add_argument("--one-thread", default="1000", help="comma-separated N, server with OMP_NUM_THREADS=1")
    p.add_argument("--tls", default="100", help="comma-separated N for mutual-TLS trials")
    p.add_argument("--null", default="1000", help="comma-separated N for the transport floor (null server)")
    p.add_argument("--processes", type=int, default=4, help="site processes per trial")
    p.add_argument("--rounds", type=int, default=3, help="training rounds (one more evaluates too)")
    p.add_argument("--input-dim", type=int, default=26213, help="features: 26213·10+10 = 262,140 parameters")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--null-untuned", action="store_true",
                   help="null server only: without consortium server's transport settings "
                   "(grpc.http2.bdp_probe = 0, tune_malloc)")
    p.add_argument("--null-concurrency", type=int, default=32,
                   help="null server only: tasks sent at once (0: no limit; 32 as consortium server)")
    p.add_argument("--update-floats", type=int, default=0,
                   help="delta size the sites send (0: the model's; for --null only)")
    p.add_argument("--num-train", type=int, default=1, help="training examples each site declares")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--server-nofile", type=int, default=0, help="the server's soft open-files limit (0: inherit)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server process only, e.g. OMP_NUM_THREADS=1 (repeatable)")
    p.add_argument("--micro-repeats", type=int, default=50, help="0: skip the in-process split")
    p.add_argument("--workdir", default=str(HERE / "out" / "deployment-runs"))
    p.add_argument("--out", default=str(HERE / "out" / "deployment.json"))
    p.add_argument("--verbose", action="store_true", help="echo the server's stderr")
    args = p.parse_args()

    report: dict[str, Any] = {"environment": environment(), "arguments": vars(args), "trials": []}
    if args.micro_repeats:
        report["micro_ms_per_update"] = micro_split(args)
        print(f"  {'server step, one 1 MB update':<42} {'wall ms':>8} {'CPU ms':>8}")
        for k, v in report["micro_ms_per_update"].items():
            print(f"  {k:<42} {v['wall_ms']:8.3f} {v['cpu_ms']:8.3f}")
    sizes = (args.clients, args.one_thread, args.tls, args.null)
    if args.micro_repeats:
        report["placeholder"] = placeholder_mb(1000, ((1, 1), (10, 3)), args.input_dim)
        for row in report["placeholder"]:
            print(f"  placeholder for {row['sites']} sites x ({row['train']} + {row['test']}) examples: "
                  f"{row['placeholder_mb']} MB + packed copy {row['packed_copy_mb']} MB")
    plan = [(int(n), kind) for kind, ns in zip(KINDS, sizes)
            for n in ns.split(",") if n]
    for n, kind in plan:
        trial = run_trial(n, args, kind=kind)
        report["trials"].append(trial)
        print(f"   held {trial['held']}/{n}, errors {trial['errors'] or 'none'}, "
              f"rejected {trial['rejected']}, {trial['trial_wall_s']} s", flush=True)
        for r in trial["rounds"]:
            print(f"   round {r['round']}: {r['updates']} updates, {r['wall_s']:.2f} s, server CPU "
                  f"{r['server_cpu_s']:.2f} s, sites CPU {r['clients_cpu_s']} s, RSS {r['rss_mb_at_end']} MB")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2), "utf-8")
    print_table(report["trials"])
    report["targets"] = targets(report["trials"])
    for name, t in report["targets"].items():
        print(f"target {name}: {t['target']}, measured {t['result']} -> {'met' if t['met'] else 'NOT met'}")
    Path(args.out).write_text(json.dumps(report, indent=2), "utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

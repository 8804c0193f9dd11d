"""Load benchmark of a deployment (issue 7): N lightweight sites and one real server on loopback.

Target: at least 1,000 sites held by one server, at most 2 ms of server overhead per 1 MB
update. Issue 14: server CPU per update at most 1.2x the null server's and at least 5x below
Flower's deployment engine's.

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
- ``--flower N``: Flower's deployment engine on the same workload, in its own venv
  (benchmarks/.venv-flower, made by benchmarks/flower/setup.sh; flwr >= 1.42). The server side
  is ``flower-superlink --insecure`` (one uvicorn/FastAPI process serving the Fleet, Control and
  Runtime APIs as protobuf over HTTP on one port), the ``flower-superexec`` it starts, and the
  ``flwr-serverapp`` that starts for the run: the app in benchmarks/flower/deploy-app, submitted
  with ``flwr run``, runs Flower's own FedAvg over all N nodes with the same 1 MB model. The
  nodes are benchmarks/flower/deploy_nodes.py: ``--processes`` processes of asyncio coroutines,
  own HTTP connections per node, sending the SuperLink what a real ``flower-supernode`` sends
  (register, heartbeats, 3 s polls, object pulls and pushes; signed requests) and answering
  with a precomputed 1 MB model; ``--flower-real N`` uses real ``flower-supernode`` processes
  instead (three Python processes per node, about 400 MB). Every Flower process has
  ``OMP_NUM_THREADS=1``. Server CPU is summed over the SuperLink and every process it starts;
  server memory is the largest sum of their VmRSS seen (and each one's VmHWM).
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

The comparison table puts, per N, consortium (as shipped), the null server and Flower side by
side, with consortium / null and Flower / consortium in server CPU per update and peak memory.

Run:  PYTHONPATH=src python benchmarks/deployment.py     # 50, 250, 1000 + 1-thread, TLS, null
      PYTHONPATH=src python benchmarks/deployment.py --one-thread "" --tls "" --null 50,250,1000 \
          --flower 50,250,1000                           # the comparison with Flower (issue 14)
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
import signal
import socket
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
FLOWER_DIR = HERE / "flower"
FLOWER_APP = FLOWER_DIR / "deploy-app"
FLOWER_NODES_SCRIPT = FLOWER_DIR / "deploy_nodes.py"
KINDS = ("insecure", "one-thread", "tls", "null", "flower", "flower-real")
LABELS = {"insecure": "consortium", "one-thread": "consortium, 1 torch thread",
          "tls": "consortium, mTLS", "null": "null server (floor)",
          "flower": "Flower deployment engine", "flower-real": "Flower, real SuperNodes"}
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.02
SCAN_S = 0.5  # how often a tree monitor looks for new processes

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


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])  # field 22 of proc(5)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def descendants(roots: list[int]) -> list[int]:
    """Every live descendant of ``roots`` (one scan of /proc's parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo:
        for kid in children.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


class Monitor(threading.Thread):
    """Samples the server's CPU and memory, the sites' CPU, and when each round's line lands in
    metrics.jsonl, every ``SAMPLE_S`` seconds until the server exits.

    ``tree=True`` (Flower, whose server is several processes): the server is ``server_pid`` and
    every process it starts (found every ``SCAN_S``), the sites are ``client_pids`` and their
    descendants. CPU is the sum over these processes, each kept at its last value once it has
    exited; memory is the sum of their current VmRSS and, as the peak, the largest such sum
    seen (each process's own VmHWM is kept in ``peaks``)."""

    def __init__(self, server_pid: int, metrics: Path, *, tree: bool = False) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.metrics, self.tree = server_pid, metrics, tree
        self.client_pids: list[int] = []
        self.client_cpu: dict[int, float] = {}
        self.samples: list[tuple[float, ...]] = []  # t, cpu s, rss MB, hwm MB, sites' cpu s
        self.round_ends: list[dict[str, float]] = []
        self.stop = threading.Event()
        # tree mode: the server's processes (pid -> name, start time), their CPU and peaks
        self.server_procs: dict[int, tuple[str, int]] = {server_pid: ("server", start_time(server_pid) or 0)}
        self.client_procs: dict[int, tuple[str, int]] = {}
        self.server_cpu: dict[int, float] = {}
        self.peaks: dict[int, float] = {}
        self.peak_sum = 0.0
        self.round_split: list[dict[int, float]] = []  # server CPU by process at each round end
        self.scanned = 0.0

    def scan(self) -> None:
        """Find the processes the server and the sites have started since the last scan."""
        self.scanned = time.monotonic()
        self.server_procs[self.server_pid] = (process_name(self.server_pid), self.server_procs[self.server_pid][1])
        for pid in descendants([self.server_pid]):
            if pid not in self.server_procs:
                self.server_procs[pid] = (process_name(pid), start_time(pid) or 0)
        for pid in [*self.client_pids, *descendants(list(self.client_pids))]:
            if pid not in self.client_procs:
                self.client_procs[pid] = (process_name(pid), start_time(pid) or 0)

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
        if self.tree:
            return self._sample_tree()
        cpu, mem = cpu_seconds(self.server_pid), memory_mb(self.server_pid)
        for pid in self.client_pids:
            c = cpu_seconds(pid)
            if c is not None:
                self.client_cpu[pid] = c
        if cpu is None or mem is None:
            return False
        self.samples.append((time.monotonic(), cpu, *mem, sum(self.client_cpu.values())))
        return True

    def _sample_tree(self) -> bool:
        if time.monotonic() - self.scanned > SCAN_S:
            self.scan()
        if memory_mb(self.server_pid) is None:
            return False
        rss = 0.0
        for pid in self.server_procs:
            cpu, mem = cpu_seconds(pid), memory_mb(pid)
            if cpu is not None:
                self.server_cpu[pid] = cpu
            if mem is not None:
                rss += mem[0]
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), mem[1])
        for pid in self.client_procs:
            c = cpu_seconds(pid)
            if c is not None:
                self.client_cpu[pid] = c
        self.peak_sum = max(self.peak_sum, rss)
        self.samples.append((time.monotonic(), sum(self.server_cpu.values()), rss, self.peak_sum,
                             sum(self.client_cpu.values())))
        return True

    def _rounds(self) -> None:
        try:
            done = self.metrics.read_text().count("\n")
        except OSError:
            return
        while len(self.round_ends) < done and self.samples:
            self.round_ends.append(as_dict(self.samples[-1]))
            self.round_split.append(dict(self.server_cpu))


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
    result = summarise(n, sites, monitor, baseline, ready, run_dir / "metrics.jsonl", args)
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


# -- a Flower trial ---------------------------------------------------------------------------------


def run_flower_trial(n: int, args: argparse.Namespace, *, real: bool) -> dict[str, Any]:
    """The same workload through Flower's deployment engine, in its own venv; the trial's figures.

    A ``flower-superlink --insecure`` (which starts ``flower-superexec``, which starts one
    ``flwr-serverapp`` for the run), N nodes, and the app in benchmarks/flower/deploy-app
    submitted with ``flwr run``: FedAvg over all N nodes for ``--rounds`` training rounds and a
    last one that trains and evaluates. ``real``: N real ``flower-supernode`` processes (each
    starts a ``flower-superexec`` and one ``flwr-clientapp`` per message); otherwise
    benchmarks/flower/deploy_nodes.py, ``--processes`` processes of asyncio nodes speaking the
    Fleet API. Every Flower process runs with ``OMP_NUM_THREADS=1``.
    """
    kind = "flower-real" if real else "flower"
    name = f"n{n}-{kind}"
    trial = Path(args.workdir) / name
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir(parents=True)
    venv_bin = flower_venv(args)
    port = free_port()
    home = trial / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(FLOWER_CONNECTION.format(port=port), "utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no consortium on that side
    env.update(FLWR_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")  # it starts its helpers by name
    rounds = args.rounds + 1
    metrics = trial / "rounds.jsonl"
    cmd = [str(venv_bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    print(f"\n== {name}: {' '.join(['flower-superlink', *cmd[1:]])}", flush=True)
    started = time.monotonic()
    superlink_log = trial / "superlink.log"
    with open(superlink_log, "w") as log:  # the child keeps its own copy
        superlink = subprocess.Popen(cmd, cwd=trial, env=env, stdout=log, stderr=subprocess.STDOUT)
    monitor = Monitor(superlink.pid, metrics, tree=True)
    monitor.start()
    nodes: list[subprocess.Popen[bytes]] = []
    code = None
    failure = ""
    reply: dict[str, Any] = {}
    try:
        wait_for_port(port, superlink, timeout=120)
        baseline = monitor.sample_now()
        nodes = start_flower_nodes(n, port, args, trial, env, venv_bin, real=real)
        monitor.client_pids = [p.pid for p in nodes]
        held = wait_for_log_count(superlink_log, "[Fleet.ActivateNode] Activated", n, superlink,
                                  timeout=args.round_timeout)
        time.sleep(5 * SAMPLE_S)
        holding = monitor.sample_now()
        time.sleep(args.flower_idle)  # N idle nodes polling: what holding them costs the server
        idle = monitor.sample_now()
        run_config = (f"num-rounds={rounds} min-nodes={n} input-dim={args.input_dim} "
                      f"classes={args.classes} log-path='{metrics}'")
        submit = subprocess.run([str(venv_bin / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config",
                                 run_config, "--format", "json"], cwd=trial, env=env,
                                capture_output=True, text=True, timeout=300)
        reply = json.loads(submit.stdout[submit.stdout.find("{"):] or "{}")
        if not reply.get("success"):
            raise SystemExit(f"{name}: flwr run failed ({submit.returncode}):\n{submit.stdout}{submit.stderr}")
        ready = monitor.sample_now()
        deadline = time.monotonic() + args.round_timeout * rounds
        next_check = time.monotonic() + 5
        while len(monitor.round_ends) < rounds and not failure:
            if superlink.poll() is not None:
                raise SystemExit(f"{name}: the SuperLink exited ({superlink.returncode}); see {superlink_log}")
            if time.monotonic() > deadline:
                failure = f"{len(monitor.round_ends)} of {rounds} rounds within the timeout"
            elif gone(monitor, "flwr-serverapp"):
                time.sleep(1)
                if len(monitor.round_ends) < rounds:
                    failure = (f"the ServerApp ended after {len(monitor.round_ends)} of {rounds} rounds "
                               f"(see serverapp.log and superlink.log)")
            elif time.monotonic() > next_check:  # a node that gave up leaves its round waiting
                next_check = time.monotonic() + 5
                left = superlink_log.read_text(errors="replace").count("[Fleet.DeactivateNode]")
                if left and len(monitor.round_ends) < rounds - 1:
                    failure = f"{left} node(s) left before the last round (see nodes-*.log)"
            time.sleep(0.1)
        if failure:
            # what the completed rounds measured still stands, if a steady round is among them
            print(f"   {name}: {failure}", flush=True)
            if len(monitor.round_ends) < 2:
                raise SystemExit(f"{name}: {failure}; see {trial}")
        elif not real:
            for p in nodes:
                p.wait(timeout=120)
        wait_for_exit(monitor, "flwr-serverapp", timeout=60)
        code = 0
    finally:
        if reply.get("run-id"):  # the ServerApp's own log, kept by the SuperLink
            with open(trial / "serverapp.log", "w") as log:
                try:
                    subprocess.run([str(venv_bin / "flwr"), "log", str(reply["run-id"]), "bench", "--show"],
                                   cwd=trial, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=60)
                except subprocess.TimeoutExpired:
                    log.write("\n(flwr log timed out: the SuperLink did not answer within 60 s)\n")
        for p in nodes:
            if p.poll() is None:
                p.terminate()
        for p in nodes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"   killing node pid {p.pid} (still running)", flush=True)
                p.kill()
                p.wait()
        superlink.terminate()
        try:
            superlink.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print(f"   killing SuperLink pid {superlink.pid} (still running)", flush=True)
            superlink.kill()
            superlink.wait()
        monitor.stop.set()
        monitor.join(timeout=5)
        end_leftovers({**monitor.server_procs, **monitor.client_procs})
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"{name}: did not finish")
    sites: list[dict[str, Any]] = []
    if not real:
        reports = [trial / f"nodes-{i}.json" for i in range(len(nodes))]
        sites = [s for r in reports if r.exists() for s in json.loads(r.read_text())["sites"]]
    if failure:  # the rounds that completed, and only them
        lines = metrics.read_text().splitlines()[: len(monitor.round_ends)]
        metrics = trial / "rounds-completed.jsonl"
        metrics.write_text("".join(line + "\n" for line in lines), "utf-8")
    result = summarise(n, sites, monitor, baseline, holding, metrics, args, ready=ready)
    if failure:
        result.update(run_failed=failure, completed_rounds=len(monitor.round_ends), eval_round_s=None)
    if real:
        result["held"] = held
    idle_s = idle["t"] - holding["t"]
    result["idle_s"] = round(idle_s, 1)
    result["idle_server_cpu_pct_per_100_nodes"] = round(
        (idle["cpu_s"] - holding["cpu_s"]) / idle_s * 100 * 100 / n, 2)
    requests: dict[str, int] = {}
    retries: dict[str, int] = {}
    for site in sites:
        for path, count in site.get("requests", {}).items():
            requests[path] = requests.get(path, 0) + count
        for why, count in site.get("retries", {}).items():
            retries[why] = retries.get(why, 0) + count
    if requests:
        updates = sum(len(s["tasks"]) for s in sites)
        result["fleet_requests"] = dict(sorted(requests.items(), key=lambda kv: -kv[1]))
        result["fleet_requests_per_reply"] = round(sum(requests.values()) / max(updates, 1), 1)
        result["fleet_retries"] = retries
    result.update(name=name, kind=kind, tls=False, processes=len(nodes), trial_wall_s=round(wall, 1),
                  server_env={"OMP_NUM_THREADS": "1"}, run_id=reply.get("run-id"),
                  flwr=flower_version(venv_bin), command=" ".join(["flower-superlink", *cmd[1:]]),
                  submit="flwr run benchmarks/flower/deploy-app bench --run-config " + repr(run_config),
                  nodes="flower-supernode processes" if real else "benchmarks/flower/deploy_nodes.py",
                  **flower_split(monitor, result["steady_rounds"], result["steady_updates"]))
    return result


FLOWER_CONNECTION = """\
# written by benchmarks/deployment.py: the local SuperLink of one trial
[superlink]
default = "bench"

[superlink.bench]
address = "127.0.0.1:{port}"
insecure = true
"""


def flower_venv(args: argparse.Namespace) -> Path:
    """The Flower venv's bin folder, created by benchmarks/flower/setup.sh on first use."""
    venv = Path(args.flower_venv)
    if not (venv / "bin" / "flower-superlink").exists():
        print(f"setting up Flower in {venv} (first run only) ...", file=sys.stderr, flush=True)
        subprocess.run(["bash", str(FLOWER_DIR / "setup.sh"), str(venv)], check=True)
    version = flower_version(venv / "bin")
    if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < (1, 42):
        raise SystemExit(f"{venv} has flwr {version}; the Flower deployment trial needs >= 1.42 "
                         f"(its Fleet API over HTTP): run `bash benchmarks/flower/setup.sh {venv}`")
    return venv / "bin"


def flower_version(venv_bin: Path) -> str:
    out = subprocess.run([str(venv_bin / "python"), "-c", "import flwr; print(flwr.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the SuperLink exited ({proc.returncode}) before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the SuperLink did not listen on port {port} within {timeout:.0f} s")


def wait_for_log_count(path: Path, text: str, count: int, proc: subprocess.Popen[bytes], *,
                       timeout: float) -> int:
    """Wait until ``text`` appears ``count`` times in the log at ``path``; how many it found."""
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        found = path.read_text(errors="replace").count(text)
        if found >= count:
            return found
        if proc.poll() is not None:
            raise SystemExit(f"the SuperLink exited ({proc.returncode}); see {path}")
        time.sleep(0.25)
    raise SystemExit(f"{found} of {count} nodes active within {timeout:.0f} s; see {path}")


def gone(monitor: Monitor, name: str) -> bool:
    """Whether the server started a process called ``name`` and none of them is alive now."""
    procs = [p for p, (n, _) in list(monitor.server_procs.items()) if n == name]
    return bool(procs) and not any(memory_mb(p) for p in procs)


def wait_for_exit(monitor: Monitor, name: str, *, timeout: float) -> None:
    """Wait until no live (non-zombie) server process is called ``name``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not gone(monitor, name):
        time.sleep(0.1)


def end_leftovers(procs: dict[int, tuple[str, int]]) -> None:
    """Kill, by PID, any process of the trial still alive (checked by its start time)."""
    for pid, (name, started) in procs.items():
        if started and start_time(pid) == started and memory_mb(pid) is not None:
            print(f"   killing {name} pid {pid} (still running)", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_flower_nodes(n: int, port: int, args: argparse.Namespace, trial: Path, env: dict[str, str],
                       venv_bin: Path, *, real: bool) -> list[subprocess.Popen[bytes]]:
    nodes: list[subprocess.Popen[bytes]] = []
    if real:
        for i in range(n):
            cmd = [str(venv_bin / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--host", "127.0.0.1", "--port", str(free_port())]
            with open(trial / f"supernode-{i}.log", "w") as log:
                nodes.append(subprocess.Popen(cmd, cwd=trial, env=env, stdout=log, stderr=subprocess.STDOUT))
        return nodes
    procs = min(args.processes, n)
    first = 0
    for i in range(procs):
        count = n // procs + (1 if i < n % procs else 0)
        cmd = [str(venv_bin / "python"), str(FLOWER_NODES_SCRIPT), "--superlink", f"127.0.0.1:{port}",
               "--first", str(first), "--count", str(count), "--report", str(trial / f"nodes-{i}.json"),
               "--input-dim", str(args.input_dim), "--classes", str(args.classes),
               "--poll", str(args.flower_poll)]
        with open(trial / f"nodes-{i}.log", "w") as log:
            nodes.append(subprocess.Popen(cmd, cwd=trial, env=env, stdout=log, stderr=subprocess.STDOUT))
        first += count
    return nodes


def flower_split(monitor: Monitor, steady: list[int], updates: int) -> dict[str, Any]:
    """Server CPU per update in the steady rounds and peak RSS, by Flower process."""
    if not steady or not updates:
        return {}
    before = monitor.round_split[steady[0] - 2] if steady[0] >= 2 else {}
    after = monitor.round_split[steady[-1] - 1]
    cpu: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for pid, (name, _) in monitor.server_procs.items():
        cpu[name] = cpu.get(name, 0.0) + after.get(pid, 0.0) - before.get(pid, 0.0)
        peaks[name] = max(peaks.get(name, 0.0), monitor.peaks.get(pid, 0.0))
    seen = [k for k in cpu if cpu[k] > 0 or peaks[k] > 0]  # not a short-lived helper it ran
    return {"server_cpu_ms_per_update_by_process": {k: round(cpu[k] / updates * 1e3, 2) for k in seen},
            "server_peak_mb_by_process": {k: round(peaks[k]) for k in seen},
            "server_peak_mb_sum_of_peaks": round(sum(peaks.values()))}


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
              holding: dict[str, float], metrics_path: Path, args: argparse.Namespace, *,
              ready: dict[str, float] | None = None) -> dict[str, Any]:
    """The trial's figures; ``holding`` is sampled with every site connected and idle, ``ready``
    (default: ``holding``) when round 1 starts."""
    ready = holding if ready is None else ready
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()]
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
        "server_rss_held_mb": round(holding["rss_mb"]),
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
        if t["kind"].startswith("flower"):
            server = server.replace("Flower", f"Flower {t['flwr']}")
        extra = {k: v for k, v in t["server_env"].items()  # these kinds always run with one thread
                 if not (t["kind"] in ("one-thread", "flower", "flower-real") and k == "OMP_NUM_THREADS")}
        if extra:
            server += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        row = (f"{t['n']:,}", server, f"{t['held']:,}", f"{t['hold_all_s']:.1f}",
               f"{t['server_rss_held_mb']:,}", f"{t['server_peak_mb']:,}",
               f"{t['train_round_s_median']:.2f}",
               "–" if t["eval_round_s"] is None else f"{t['eval_round_s']:.2f}",
               f"{t['server_cpu_ms_per_update']:.2f}", f"{t['wall_ms_per_update']:.2f}",
               f"{t['push_rtt_ms_median']}", f"{t['clients_cpu_ms_per_update']:.2f}")
        print("| " + " | ".join(row) + " |")


def comparison(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per N: consortium (as shipped), the null server and Flower side by side, with the ratios
    of issue 14 (consortium / null server, Flower / consortium) in server CPU per update and
    peak server memory. The first trial of each kind at each N."""
    by: dict[tuple[int, str], dict[str, Any]] = {}
    for t in trials:
        by.setdefault((t["n"], t["kind"]), t)
    rows = []
    for n in sorted({t["n"] for t in trials}):
        c, z = by.get((n, "insecure")), by.get((n, "null"))
        f = by.get((n, "flower")) or by.get((n, "flower-real"))
        if c is None or (z is None and f is None):
            continue

        def pick(t: dict[str, Any] | None, key: str) -> float | None:
            return None if t is None else t[key]

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None or not b else round(a / b, 2)

        cpu = {k: pick(t, "server_cpu_ms_per_update") for k, t in (("consortium", c), ("null", z), ("flower", f))}
        peak = {k: pick(t, "server_peak_mb") for k, t in (("consortium", c), ("null", z), ("flower", f))}
        rnd = {k: pick(t, "train_round_s_median") for k, t in (("consortium", c), ("null", z), ("flower", f))}
        rows.append({"n": n, "flower_kind": None if f is None else f["kind"],
                     "server_cpu_ms_per_update": cpu, "server_peak_mb": peak, "train_round_s_median": rnd,
                     "cpu_consortium_over_null": ratio(cpu["consortium"], cpu["null"]),
                     "cpu_flower_over_consortium": ratio(cpu["flower"], cpu["consortium"]),
                     "peak_consortium_over_null": ratio(peak["consortium"], peak["null"]),
                     "peak_flower_over_consortium": ratio(peak["flower"], peak["consortium"])})
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    head = ("N", "CPU ms/upd: consortium", "null", "Flower", "consortium / null", "Flower / consortium",
            "peak MB: consortium", "null", "Flower", "train round s: consortium", "null", "Flower")

    def fmt(v: float | None, spec: str = ".2f") -> str:
        return "–" if v is None else format(v, spec)

    print("\n| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in rows:
        cpu, peak, rnd = r["server_cpu_ms_per_update"], r["server_peak_mb"], r["train_round_s_median"]
        row = (f"{r['n']:,}", fmt(cpu["consortium"]), fmt(cpu["null"]), fmt(cpu["flower"]),
               fmt(r["cpu_consortium_over_null"]), fmt(r["cpu_flower_over_consortium"]),
               fmt(peak["consortium"], ",.0f"), fmt(peak["null"], ",.0f"), fmt(peak["flower"], ",.0f"),
               fmt(rnd["consortium"]), fmt(rnd["null"]), fmt(rnd["flower"]))
        print("| " + " | ".join(row) + " |")


def targets(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issues' targets, judged on the largest trial of the server as it ships (issue 7) and
    on the largest N with consortium, the null server and Flower all measured (issue 14)."""
    shipped = [t for t in trials if t["kind"] == "insecure"]
    if not shipped:
        return {}
    big = max(shipped, key=lambda t: t["n"])
    out: dict[str, dict[str, Any]] = {
        "sites held": {"target": ">= 1000", "result": big["held"], "met": big["held"] >= 1000},
        "server overhead per 1 MB update": {
            "target": "<= 2 ms", "met": big["server_cpu_ms_per_update"] <= 2.0,
            "result": f"{big['server_cpu_ms_per_update']} ms CPU, {big['wall_ms_per_update']} ms "
                      f"of round wall time (N = {big['n']})"},
    }
    rows = comparison(trials)
    full = [r for r in rows if r["cpu_consortium_over_null"] is not None]
    if full:
        r = full[-1]
        out["consortium / null server, CPU per update"] = {
            "target": "<= 1.2", "met": r["cpu_consortium_over_null"] <= 1.2,
            "result": f"{r['cpu_consortium_over_null']} (N = {r['n']})"}
    full = [r for r in rows if r["cpu_flower_over_consortium"] is not None]
    if full:
        r = full[-1]
        out["Flower / consortium, CPU per update"] = {
            "target": ">= 5", "met": r["cpu_flower_over_consortium"] >= 5,
            "result": f"{r['cpu_flower_over_consortium']} (N = {r['n']}, {r['flower_kind']})"}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="50,250,1000", help="comma-separated N (insecure trials)")
    p.add_argument("--one-thread", default="1000", help="comma-separated N, server with OMP_NUM_THREADS=1")
    p.add_argument("--tls", default="100", help="comma-separated N for mutual-TLS trials")
    p.add_argument("--null", default="1000", help="comma-separated N for the transport floor (null server)")
    p.add_argument("--flower", default="",
                   help="comma-separated N for Flower's deployment engine with asyncio nodes "
                   "(benchmarks/flower/deploy_nodes.py)")
    p.add_argument("--flower-real", default="",
                   help="comma-separated N for Flower with real flower-supernode processes "
                   "(about 400 MB each)")
    p.add_argument("--flower-venv", default=str(HERE / ".venv-flower"),
                   help="the Flower venv (created by benchmarks/flower/setup.sh if missing)")
    p.add_argument("--flower-idle", type=float, default=10.0,
                   help="seconds the N Flower nodes are held idle before the run (their polls' cost)")
    p.add_argument("--flower-poll", type=float, default=3.0,
                   help="seconds between a Flower node's empty PullMessages (the SuperNode's: 3)")
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
    sizes = (args.clients, args.one_thread, args.tls, args.null, args.flower, args.flower_real)
    if args.micro_repeats:
        report["placeholder"] = placeholder_mb(1000, ((1, 1), (10, 3)), args.input_dim)
        for row in report["placeholder"]:
            print(f"  placeholder for {row['sites']} sites x ({row['train']} + {row['test']}) examples: "
                  f"{row['placeholder_mb']} MB + packed copy {row['packed_copy_mb']} MB")
    plan = [(int(n), kind) for kind, ns in zip(KINDS, sizes)
            for n in ns.split(",") if n]
    for n, kind in plan:
        if kind.startswith("flower"):
            trial = run_flower_trial(n, args, real=kind == "flower-real")
        else:
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
    report["comparison"] = comparison(report["trials"])
    print_comparison(report["comparison"])
    report["targets"] = targets(report["trials"])
    for name, t in report["targets"].items():
        print(f"target {name}: {t['target']}, measured {t['result']} -> {'met' if t['met'] else 'NOT met'}")
    Path(args.out).write_text(json.dumps(report, indent=2), "utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

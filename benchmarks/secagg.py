"""SecAgg+ cost beside Flower's: client and server time and bytes per client, for n clients and d parameters.

Every column drives a SecAgg+ round (Bell et al. 2020) phase by phase in one process, with no
transport, and times the client calls and the server calls separately, at the same settings:
k = 2·⌈log2 n⌉ neighbours, threshold t = ⌈k/2⌉, 10 % of the clients drop after sending their
masked input (so the server reconstructs their self-mask seeds from their neighbours' shares;
no client drops before phase 3, so no column reconstructs pairwise masks), masks modulo
2**32. Each cell of each system runs in its own process, with a time limit (--timeout).

- consortium: ``SecAggClient`` / ``SecAggServer`` from src/consortium/secagg/protocol.py, on
  int64 inputs in [0, 2**16). Client time includes building the client (its key pairs and
  self-mask seed are drawn in the constructor). Nothing n·d-sized is ever held: inputs are
  regenerated from a per-client seed when needed, and ``collect_masked`` consumes the masked
  inputs from a generator, keeping only their running sum, so a cell needs O(d) memory
  (estimated up front; cells above --max-gb would be skipped).
- consortium-auth: the same round authenticated against a malicious server (Bonawitz et al.
  2017, Fig. 4): every client signs its keys with its ECDSA P-256 site certificate and checks its
  k neighbours' certificates (chain to the consortium CA, dates, site name) and signatures before
  sharing; after the masked inputs, the consistency round (each survivor signs the survivor
  set; the server forwards each its neighbours' signatures, which it checks before unmasking).
  Each client has its own ``TrustAnchor`` with a cold cache, so every neighbour certificate is
  parsed and checked once in the round (a first round; later rounds hit the cache). The
  certificates come from an in-memory CA (``simulated_identities``), issued before the timed
  round as provisioning is. Same k, t and drop pattern as ``consortium`` (the 10 % that drop
  after their masked input sign nothing), so the two columns differ only by authentication.
- flower: Flower's own SecAgg+ functions (``SecAggPlusWorkflow`` and ``secaggplus_mod``, flwr
  1.41), replayed phase by phase by benchmarks/flower/secagg_worker.py in Flower's own venv;
  its docstring lists every function called and what is left out (transport, serialisation).
  Float inputs quantised to 2**16 levels; the quantisation is timed apart, outside the ratio.

Every column does its arithmetic on one core: Flower's numpy arithmetic is single-threaded, and
consortium's torch runs with --threads 1 (torch's two threads stall badly when this shared
2-core machine is busy). The ratio is Flower's time over consortium's, client and server.

Sanity row (--flower-simulation, default n=100, d=10k): the same round run for real in
Flower's simulation engine (benchmarks/flower/secagg_simulation.py: ``run_simulation`` on Ray,
``SecAggPlusWorkflow`` + ``secaggplus_mod``), whose wall time is printed beside what the phase
driver's figures add up to, n · client s / cores + server s.

Bytes per client count what a client sends: public keys, share ciphertexts, the masked vector
and the revealed shares (no ids, no framing); authenticated, also its certificate (DER) and its
two signatures. consortium has no wire format for SecAgg
messages yet: its masked vector is counted at 4 bytes a coordinate (values < 2**32 packed as
uint32; the tensor itself is int64). Flower's is ``ndarray_to_bytes`` of its int64 arrays, what
its messages carry: 8 bytes a coordinate.

Run:  python benchmarks/secagg.py                       # every system, every cell
      python benchmarks/secagg.py --systems consortium,consortium-auth --n 100 --d 10000
      python benchmarks/secagg.py --flower-venv /tmp/flower-venv --timeout 900
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("consortium", "consortium-auth", "flower")
INPUT_BITS = 16  # consortium's inputs are in [0, 2**16); Flower quantises to 2**16 levels
BASELINE_GB = 0.5  # interpreter, torch, client objects


def neighbours_and_threshold(n: int) -> tuple[int, int]:
    """SecAgg+'s k = 2·⌈log2 n⌉ neighbours (at most n − 1) and the threshold t = ⌈k/2⌉."""
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    return k, math.ceil(k / 2)


def consortium_need_gb(d: int) -> float:
    """Memory a consortium cell needs: the server's running sum, the expected sum and the
    d-long int64 temporaries of masking and unmasking (about a dozen), whatever n is."""
    return 16 * d * 8 / 1e9 + BASELINE_GB


# -- the consortium worker: one cell, in its own process -----------------------------------------


class Clock:
    """Seconds spent per (side, phase)."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], float] = defaultdict(float)

    @contextmanager
    def __call__(self, side: str, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[side, phase] += time.perf_counter() - start

    def phases(self, side: str) -> dict[str, float]:
        return {phase: s for (who, phase), s in self.totals.items() if who == side}


def client_input(seed: int, index: int, d: int):  # type: ignore[no-untyped-def]
    """Client ``index``'s quantised update, regenerated on demand from (seed, index)."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, 2**INPUT_BITS, (d,), generator=gen)


def run_consortium_cell(n: int, d: int, *, drop: float, seed: int, threads: int,
                        authenticated: bool = False) -> dict[str, Any]:
    """One SecAgg+ round of consortium's state machines; times per side and phase, bytes sent.
    ``authenticated``: signed keys, certificate checks and the consistency round.

    Raises:
        SystemExit: the unmasked sum differs from the plain sum of the contributors' inputs.
    """
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from consortium.secagg.protocol import (
        ConsistencyRequest,
        SecAggClient,
        SecAggConfig,
        SecAggFloor,
        SecAggServer,
    )

    k, t = neighbours_and_threshold(n)
    config = SecAggConfig(num_clients_expected=n, threshold=t, neighbours=k, round=1,
                          context=b"bench")
    ids = [f"c{i:04d}" for i in range(n)]
    drops = set(ids[: int(drop * n)])
    credentials: dict[str, Any] = dict.fromkeys(ids, {})
    if authenticated:  # provisioning, before the round: untimed
        from cryptography.hazmat.primitives.serialization import Encoding

        from consortium.secagg.identity import TrustAnchor, simulated_identities

        identities, ca = simulated_identities(ids)
        ca_pem = ca.ca.public_bytes(Encoding.PEM)
        floor = SecAggFloor(min_threshold=0.5, min_neighbours=k, require_signatures=True)
        credentials = {  # each site its own trust anchor, its certificate cache empty
            cid: {"identity": identities[cid], "trust": TrustAnchor(ca_pem), "floor": floor}
            for cid in ids
        }
    clock = Clock()
    sent = dict.fromkeys(ids, 0)
    with clock("server", "keys"):
        server = SecAggServer(config=config, graph_seed=b"bench-graph")

    clients, adverts = {}, []
    for cid in ids:
        with clock("client", "keys"):
            # draws the key pairs and seed (and signs the keys, authenticated)
            clients[cid] = SecAggClient(cid, config=config, **credentials[cid])
            adverts.append(clients[cid].advertise_keys())
        a = adverts[-1]
        sent[cid] += len(a.c_public) + len(a.s_public) + len(a.certificate) + len(a.signature)
    with clock("server", "keys"):
        broadcasts = server.collect_keys(adverts)

    shares = []
    for cid in ids:
        with clock("client", "shares"):
            shares.append(clients[cid].share_keys(broadcasts[cid]))
        sent[cid] += sum(len(ct) for ct in shares[-1].ciphertexts.values())
    with clock("server", "shares"):
        routed = server.route_shares(shares)
    del shares, broadcasts

    # collect_masked takes any iterable and keeps only a running sum, so the clients' masked
    # inputs are produced one at a time while the server consumes them. The time the server
    # spends waiting on the generator (input generation and client work) is not its own.
    waited = 0.0

    def stream():  # type: ignore[no-untyped-def]
        nonlocal waited
        for i, cid in enumerate(ids):
            start = time.perf_counter()
            x = client_input(seed, i, d)
            with clock("client", "masked"):
                message = clients[cid].masked_input(routed[cid], x)
            sent[cid] += 4 * d
            waited += time.perf_counter() - start
            yield message

    start = time.perf_counter()
    request = server.collect_masked(stream())
    clock.totals["server", "masked"] += time.perf_counter() - start - waited

    requests = dict.fromkeys(request.survivors, request)
    if authenticated:
        check = ConsistencyRequest(request.survivors)
        signatures = []
        for cid in request.survivors:
            if cid in drops:
                continue  # sent its masked input, never answers
            with clock("client", "consistency"):
                signatures.append(clients[cid].sign_consistency(check))
            sent[cid] += len(signatures[-1].signature)
        with clock("server", "consistency"):
            requests = server.collect_consistency(signatures)

    responses = []
    for cid in request.survivors:
        if cid in drops:
            continue  # sent its masked input, never answers
        with clock("client", "unmask"):
            responses.append(clients[cid].unmask(requests[cid]))
        r = responses[-1]
        sent[cid] += sum(len(s.to_bytes()) for s in [*r.b_shares.values(), *r.s_shares.values()])
    with clock("server", "unmask"):
        result = server.finish(responses)

    expected = torch.zeros(d, dtype=torch.int64)  # untimed check, inputs regenerated
    contributors = set(result.contributors)
    for i, cid in enumerate(ids):
        if cid in contributors:
            expected = (expected + client_input(seed, i, d)) % 2**32
    if not torch.equal(result.sum, expected):
        raise SystemExit("the unmasked sum differs from the plain sum")
    client, server_phases = clock.phases("client"), clock.phases("server")
    return {
        "system": "consortium-auth" if authenticated else "consortium", "n": n, "d": d,
        "neighbours": k, "threshold": t,
        "dropped_after_masked": len(drops),
        "client_s_per_client": sum(client.values()) / n, "server_s": sum(server_phases.values()),
        "client_phases_s_per_client": {p: s / n for p, s in client.items()},
        "server_phases_s": server_phases,
        "kib_sent_per_client": sum(sent.values()) / n / 1024, "sum_exact": True,
        "torch_threads": threads, "need_gb_estimate": consortium_need_gb(d),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- orchestration -----------------------------------------------------------------------------


def flower_python(venv: str) -> str:
    """The Flower venv's python, creating the venv with benchmarks/flower/setup.sh if missing."""
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        print(f"setting up Flower in {venv} (first run only) ...", file=sys.stderr)
        subprocess.run(["bash", str(HERE / "flower" / "setup.sh"), venv], check=True)
    return str(py)


def worker_command(system: str, n: int, d: int, args: argparse.Namespace) -> list[str]:
    """The command that runs one cell of ``system`` and prints one JSON line."""
    k, t = neighbours_and_threshold(n)
    if system in ("consortium", "consortium-auth"):
        return [sys.executable, str(Path(__file__).resolve()), "--worker", "--n", str(n),
                "--d", str(d), "--threads", str(args.threads),
                "--drop", str(args.drop), "--seed", str(args.seed),
                *(["--authenticated"] if system == "consortium-auth" else [])]
    script = {"flower": "secagg_worker.py", "flower-simulation": "secagg_simulation.py"}[system]
    return [flower_python(args.flower_venv), str(HERE / "flower" / script),
            "--n", str(n), "--d", str(d), "--neighbours", str(k), "--threshold", str(t),
            "--drop", str(args.drop), "--seed", str(args.seed)]


def run_system(system: str, n: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    """One cell of one system in its own process; its JSON line, or why there is none."""
    if system != "flower" and (need := consortium_need_gb(d)) > args.max_gb:
        return {"skipped": f"needs ~{need:.1f} GB, above --max-gb {args.max_gb:g}"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(system, n, d, args), capture_output=True,
                              text=True, check=False, timeout=args.timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
        return {"skipped": f"over the {args.timeout:g} s time limit"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    out = json.loads(lines[-1])
    out["process_s"] = time.perf_counter() - start
    return out


def run_sanity(cell: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The same round through Flower's real stack (simulation engine, Ray), wall time only,
    beside what the phase driver's numbers add up to on this machine's cores. (If it runs over
    --timeout, the worker is killed and cannot shut down the Ray processes it started.)"""
    n, d = cell["n"], cell["d"]
    real = run_system("flower-simulation", n, d, args)
    driver = cell.get("flower") or {}
    if "secagg_round_s" in real and "server_s" in driver:
        cores = real["cores"]
        equivalent = n * driver["client_s_per_client"] / cores + driver["server_s"]
        real["phase_driver_equivalent_s"] = equivalent
        print(f"Flower's real SecAgg+ round at n={n}, d={d} (run_simulation, Ray, {cores} cores): "
              f"{real['secagg_round_s']:.1f} s wall; the phase driver's figures add up to "
              f"{equivalent:.1f} s (n · client s / {cores} + server s)")
    else:
        print(f"Flower's real SecAgg+ round at n={n}, d={d}: "
              f"{real.get('skipped') or real.get('error') or 'no phase-driver row to compare'}")
    return real


def fmt(value: float | None, spec: str, width: int = 10) -> str:
    return f"{'—':>{width}}" if value is None else f"{format(value, spec):>{width}}"


def fmt_ratio(value: float | None) -> str:
    return f"{'—' if value is None else f'{value:.1f}×':>7}"


def ratio(cell: dict[str, Any], key: str, over: str = "consortium",
          system: str = "flower") -> float | None:
    """``system``'s figure over ``over``'s (Flower's time over consortium's by default)."""
    ours, theirs = cell.get(over) or {}, cell.get(system) or {}
    if key in ours and key in theirs and ours[key] > 0:
        return theirs[key] / ours[key]
    return None


def print_header() -> None:
    print(f"{'':>21} │ {'client s per client':^40} │ {'server s':^40} │ "
          f"{'KiB sent per client':^32}")
    print(f"{'n':>5} {'d':>7} {'k':>3} {'t':>3} │ "
          + " │ ".join(f"{'consortium':>10} {'+auth':>10} {'Flower':>10} {'F÷auth':>7}"
                       for _ in range(2))
          + f" │ {'consortium':>10} {'+auth':>10} {'Flower':>10}")


def print_cell(cell: dict[str, Any]) -> None:
    rows = [cell.get(s) or {} for s in SYSTEMS]
    ratios = cell["flower_over_consortium_auth"]
    line = f"{cell['n']:>5} {cell['d']:>7} {cell['neighbours']:>3} {cell['threshold']:>3}"
    for key, spec, side in (("client_s_per_client", ".4f", "client"), ("server_s", ".3f", "server")):
        line += " │ " + " ".join(fmt(r.get(key), spec) for r in rows)
        line += f" {fmt_ratio(ratios[side])}"
    line += " │ " + " ".join(fmt(r.get("kib_sent_per_client"), ",.1f") for r in rows)
    print(line)
    for system, row in zip(SYSTEMS, rows):
        if "skipped" in row or "error" in row:
            why = row.get("skipped") or f"failed: {row['error'][:100]}"
            print(f"{'':>21} │   {system}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="100,500,1000")
    parser.add_argument("--d", default="10000,100000,1000000")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--flower-venv", default=str(HERE / ".venv-flower"),
                        help="Flower's own venv (made by benchmarks/flower/setup.sh if missing)")
    parser.add_argument("--drop", type=float, default=0.1,
                        help="fraction of clients that drop after sending their masked input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per cell and system before it is stopped and skipped")
    parser.add_argument("--max-gb", type=float, default=16.0,
                        help="skip consortium cells whose estimated memory exceeds this")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in consortium's worker (Flower's numpy arithmetic "
                             "is single-threaded; more threads also stall on a busy machine)")
    parser.add_argument("--flower-simulation", default="100:10000", metavar="N:D,...",
                        help="cells also run as one real round in Flower's simulation engine, "
                             "a sanity check on the phase driver ('' for none)")
    parser.add_argument("--out", default=str(HERE / "out" / "secagg.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--authenticated", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = run_consortium_cell(int(args.n), int(args.d), drop=args.drop, seed=args.seed,
                                  threads=args.threads, authenticated=args.authenticated)
        print(json.dumps(out))
        return

    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; expected some of {','.join(SYSTEMS)}")
    cells = []
    print_header()
    for n in (int(v) for v in args.n.split(",")):
        for d in (int(v) for v in args.d.split(",")):
            k, t = neighbours_and_threshold(n)
            cell: dict[str, Any] = {"n": n, "d": d, "neighbours": k, "threshold": t}
            for system in systems:
                cell[system] = run_system(system, n, d, args)
            cell["flower_over_consortium"] = {
                "client": ratio(cell, "client_s_per_client"), "server": ratio(cell, "server_s"),
            }
            cell["flower_over_consortium_auth"] = {
                side: ratio(cell, key, over="consortium-auth")
                for side, key in (("client", "client_s_per_client"), ("server", "server_s"))
            }
            cell["auth_over_consortium"] = {
                side: ratio(cell, key, system="consortium-auth")
                for side, key in (("client", "client_s_per_client"), ("server", "server_s"))
            }
            cells.append(cell)
            print_cell(cell)
            sys.stdout.flush()
    sanity = [c for c in cells if f"{c['n']}:{c['d']}" in args.flower_simulation.split(",")]
    if "flower" in systems and sanity:
        print()
        for cell in sanity:
            cell["flower-simulation"] = run_sanity(cell, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/secagg.py", *sys.argv[1:]]),
        "machine": os.uname().nodename, "cpus": os.cpu_count(), "systems": systems,
        "drop_after_masked": args.drop, "seed": args.seed, "torch_threads": args.threads,
        "timeout_s": args.timeout, "cells": cells,
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

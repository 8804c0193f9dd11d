"""Cost of a federated Table 1 over gRPC (issue 15): the four heart-disease hospitals as
deployed sites on 127.0.0.1, with and without secure aggregation.

What runs, as a consortium would run it: ``consortium provision`` credentials (mutual TLS; the
sites sign their SecAgg+ keys, the authenticated variant with its consistency round), one
``consortium server EXPERIMENT.toml --analyze`` process and four ``consortium client``
processes, each with its own hospital file. Measured per run:

- whole wall time: from starting the server until every process has exited (process start-up,
  imports, TLS handshakes, registration, both phases, SecAgg+, writing the files);
- time to result: from starting the server until it has written ``analysis.json``;
- analysis wall time: from the server's "ready; analysing" line (every site connected) to its
  "wrote analysis.json ..." line — both phases, SecAgg+ and the files;
- the server's exit: from that line until the process has ended (the interpreter's final
  garbage collection, seconds on this loaded 2-core machine: gRPC objects finalised);
- the server process's CPU time (user + system, with its start-up) and peak RSS
  (``/usr/bin/time``);

beside ``consortium analyze`` of the same query in process (the simulation path, SecAgg+
played in one process). Target (issue 15): the SecAgg'd Table 1 "well under a minute".

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/analytics_grpc.py [--repeats 3]
Writes benchmarks/results/analytics_grpc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
SECURE = ["secure_aggregation.enabled=true", "secure_aggregation.threshold=0.67"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def _cli(*args: str, time_it: bool = False, **kwargs: object) -> subprocess.Popen[str]:
    prefix = ["/usr/bin/time", "-f", "TIME %e %U %S %M"] if time_it else []
    return subprocess.Popen([*prefix, sys.executable, "-m", "consortium.cli", *args],
                            env=_env(), text=True, **kwargs)  # type: ignore[call-overload]


def setup(d: Path) -> None:
    from consortium.data.heart_disease import SITES
    from consortium.deploy.provision import provision

    provision(list(HOSPITALS), d / "certs")
    for site in HOSPITALS:
        data = (files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes()
        (d / f"{site}.data").write_bytes(data)
    (d / "exp.toml").write_text('name = "table1"\n')


def one_run(d: Path, name: str, overrides: list[str]) -> dict[str, float]:
    """One deployed analysis; its timings."""
    from consortium.config import load_config
    from consortium.deploy.analysis_site import analysis_manifest_hash

    sets = [a for o in overrides for a in ("--set", o)]
    approve = analysis_manifest_hash(load_config(d / "exp.toml", overrides))
    start = time.perf_counter()
    server = _cli("server", str(d / "exp.toml"), "--analyze", "--listen", "127.0.0.1:0",
                  "--certs", str(d / "certs" / "server"), "--out", str(d / name),
                  "--register-timeout", "120", "--round-timeout", "120", *sets,
                  time_it=True, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stderr is not None
    port = 0
    lines: list[str] = []
    while not port:
        line = server.stderr.readline()
        if not line:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        lines.append(line)
        match = re.search(r"\(port (\d+)\)", line)
        port = int(match.group(1)) if match else 0
    marks: dict[str, float] = {}

    def read() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            lines.append(line)
            if "ready; analysing" in line:
                marks["ready"] = time.perf_counter()

    def read_out() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith("wrote "):
                marks["wrote"] = time.perf_counter()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out_reader = threading.Thread(target=read_out, daemon=True)
    out_reader.start()
    clients = [
        _cli("client", "--server", f"127.0.0.1:{port}", "--site", site, "--data",
             str(d / f"{site}.data"), "--certs", str(d / "certs" / "sites" / site),
             "--approve", approve, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for site in HOSPITALS
    ]
    server.wait(timeout=300)
    end_server = time.perf_counter()
    for c in clients:
        c.wait(timeout=120)
    end = time.perf_counter()
    reader.join(timeout=10)
    out_reader.join(timeout=10)
    if server.returncode != 0 or any(c.returncode for c in clients):
        raise RuntimeError("a process failed:\n" + "".join(lines))
    timing = next(line for line in lines if line.startswith("TIME "))
    wall, user, system, rss_kb = (float(v) for v in timing.split()[1:])
    result = json.loads((d / name / "analysis.json").read_text())
    assert result["sites"]["answered"] == list(HOSPITALS), result["sites"]
    return {
        "whole_wall_s": end - start,
        "to_result_s": marks["wrote"] - start,
        "analysis_wall_s": marks["wrote"] - marks["ready"],
        "server_exit_s": end_server - marks["wrote"],
        "server_cpu_s": user + system,
        "server_peak_rss_mb": rss_kb / 1024,
        "n": result["table1"]["overall"]["n"],
    }


def in_process(overrides: list[str], repeats: int) -> float:
    from consortium.analytics.analysis import analyze
    from consortium.config import load_config

    cfg = load_config(None, overrides)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        analyze(cfg)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out: dict[str, object] = {"sites": list(HOSPITALS), "repeats": args.repeats,
                              "cpus": os.cpu_count(), "transport": "gRPC, mutual TLS, 127.0.0.1",
                              "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python "
                                         "benchmarks/analytics_grpc.py"}
    rows = []
    before = os.getloadavg()
    out["load_average_before"] = before
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        setup(d)
        for label, overrides in (("secure", SECURE), ("plain", [])):
            runs = [one_run(d, f"{label}-{i}", overrides) for i in range(args.repeats)]
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            local = in_process(overrides, args.repeats)
            out[label] = {"runs": runs, "median": median, "in_process_s": local}
            rows.append((label, median, local))
    print("Table 1 of the four heart-disease hospitals (920 patients, 14 columns), over gRPC")
    print(f"{'':<26}{'whole wall':>11}{'to result':>11}{'analysis':>10}{'exit':>8}"
          f"{'server CPU':>12}{'server RSS':>12}{'in process':>12}")
    for label, m, local in rows:
        name = "SecAgg+ (authenticated)" if label == "secure" else "no SecAgg"
        print(f"{name:<26}{m['whole_wall_s']:>9.2f} s{m['to_result_s']:>9.2f} s"
              f"{m['analysis_wall_s']:>8.2f} s"
              f"{m['server_exit_s']:>6.2f} s{m['server_cpu_s']:>10.2f} s"
              f"{m['server_peak_rss_mb']:>9.0f} MB{local:>10.2f} s")
    print(f"(medians of {args.repeats} runs; server CPU includes its start-up and exit; "
          "'analysis': every site ready -> the files written; 'exit': the server process "
          "ending after that)")
    out["load_average_after"] = os.getloadavg()
    print(f"load average (1 min) before/after: {before[0]:.1f} / "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    path = Path(__file__).parent / "results" / "analytics_grpc.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

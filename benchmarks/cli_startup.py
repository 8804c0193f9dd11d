"""Start-up time of the ``consortium`` command (issue 20: ``--help`` and ``--version`` under 0.5 s).

Each command runs as its own process, as a user's shell starts it (``.venv/bin/consortium``),
``--repeat`` times (default 10) after one untimed warm-up run; the table shows the median and
the slowest wall time, and the JSON keeps every sample. For comparison, the last rows time a
bare ``python -c pass`` and ``python -c "import torch"`` (what the command cost when importing
the package loaded torch).

Run:  OMP_NUM_THREADS=1 python benchmarks/cli_startup.py [--out benchmarks/out/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

COMMANDS: dict[str, list[str]] = {
    "consortium --version": [str(BIN / "consortium"), "--version"],
    "consortium --help": [str(BIN / "consortium"), "--help"],
    "consortium run --help": [str(BIN / "consortium"), "run", "--help"],
    "consortium server --help": [str(BIN / "consortium"), "server", "--help"],
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def wall_times(argv: list[str], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` runs of ``argv`` (after one warm-up run); each must exit 0."""
    subprocess.run(argv, capture_output=True, check=True)
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "out" / "cli_startup.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'command':<28} {'median s':>9} {'max s':>7}")
    for name, argv in COMMANDS.items():
        samples = wall_times(argv, args.repeat)
        row = {"command": name, "median_s": statistics.median(samples), "max_s": max(samples),
               "samples_s": samples}
        rows.append(row)
        print(f"{name:<28} {row['median_s']:>9.3f} {row['max_s']:>7.3f}", flush=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "repeat": args.repeat,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

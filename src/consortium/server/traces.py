"""Device and availability traces for the simulated clock: who is online when, and how fast.

Two things describe a simulated client (:mod:`consortium.server.clock` turns them into time):

- its **profile** (:class:`Profiles`): compute speed (training examples per second), uplink
  and downlink bandwidth (bytes per second) and a latency (seconds per round trip);
- its **availability** (:class:`Availability`): when it is online, in simulated seconds.

Both are arrays over the clients, so a round's bookkeeping is a few numpy operations whatever
the population. Synthetic traces are drawn from seeds derived from the run seed
(:func:`~consortium.seeds.derive_seed`), so a run repeats exactly.

Synthetic defaults (``[simulation]``):

- ``speeds = "uniform"``: every client has ``speed``, ``bandwidth`` (both ways) and
  ``latency_s``.
- ``speeds = "fedscale"``: heavy-tailed, as FedScale's measurements of mobile devices are
  (Lai et al., "FedScale: Benchmarking Model and System Performance of Federated Learning at
  Scale", ICML 2022): speed and bandwidth are log-normal around ``speed`` and ``bandwidth``
  (their medians), with log-standard-deviations :data:`SPEED_SIGMA` and
  :data:`BANDWIDTH_SIGMA`, independent of each other. These parameters are ours, chosen to
  give a spread of roughly 10x between the 5th and 95th percentile; they are not fitted to
  FedScale's trace (load that as a file to use it).
- ``slow_fraction`` of the clients (drawn from the seed) compute and transfer
  ``slow_factor`` times slower, on top of either.
- ``availability = "always"``: every client is online all the time.
- ``availability = "diurnal"``: each client is online for ``duty`` of every ``period_s``
  (a day by default), starting at its own phase, uniform over the period: at any moment about
  ``duty`` of the clients are online, and who changes through the day.

Files (CSV or Parquet, read with pyarrow): availability has columns ``client``, ``start``,
``end`` (an online interval in seconds; a client may have many, overlapping ones are merged);
speeds have ``client``, ``speed``, ``bandwidth`` and optionally ``latency``. Every client of the
data set must appear (clients are matched by id; extra rows are ignored). An availability
trace repeats after its horizon (its latest ``end``), as FedScale replays its traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from consortium.errors import ConfigError
from consortium.seeds import derive_seed

__all__ = [
    "BANDWIDTH_SIGMA", "SPEED_SIGMA", "Always", "Availability", "Diurnal", "IntervalTrace",
    "Profiles", "load_availability", "load_profiles", "make_availability", "make_profiles",
]

SPEED_SIGMA = 0.7
"""Log-standard-deviation of the "fedscale" compute speeds (ours, not fitted)."""
BANDWIDTH_SIGMA = 0.7
"""Log-standard-deviation of the "fedscale" bandwidths (ours, not fitted)."""


@dataclass(frozen=True)
class Profiles:
    """Each client's compute and network, arrays aligned with ``client_ids``.

    Attributes:
        speed: training examples per second.
        up: uplink bytes per second.
        down: downlink bytes per second.
        latency: seconds added once per round trip.
    """

    client_ids: tuple[str, ...]
    speed: np.ndarray
    up: np.ndarray
    down: np.ndarray
    latency: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        for name in ("speed", "up", "down", "latency"):
            a = getattr(self, name)
            if a.shape != (n,):
                raise ConfigError(f"device profiles: {name} has shape {a.shape}, expected ({n},)")
            if not np.isfinite(a).all():
                raise ConfigError(f"device profiles: {name} holds a value that is not finite")
        if (self.speed <= 0).any() or (self.up <= 0).any() or (self.down <= 0).any():
            raise ConfigError("device profiles: every speed and bandwidth must be > 0")
        if (self.latency < 0).any():
            raise ConfigError("device profiles: every latency must be >= 0")

    @property
    def uniform(self) -> bool:
        """Whether every client is the same (no client is slower than another)."""
        return all(float(a.min()) == float(a.max()) for a in
                   (self.speed, self.up, self.down, self.latency)) if self.client_ids else True


class Availability(Protocol):
    """When each client is online."""

    @property
    def always(self) -> bool:
        """Every client online all the time."""
        ...

    def until(self, t: float) -> np.ndarray:
        """For each client, the time its current online interval ends: ``> t`` when it is
        online at ``t`` (``inf`` if it never goes offline), ``-inf`` when it is offline."""
        ...

    def next_online(self, t: float) -> float:
        """The earliest time ``> t`` some client is online (``inf``: never)."""
        ...


@dataclass(frozen=True)
class Always:
    """Every client online all the time."""

    n: int
    always: bool = True

    def until(self, t: float) -> np.ndarray:
        return np.full(self.n, np.inf)

    def next_online(self, t: float) -> float:
        return t if self.n else math.inf


@dataclass(frozen=True)
class Diurnal:
    """Client ``i`` is online while ``(t / period + phase[i]) mod 1 < duty[i]``."""

    period: float
    phase: np.ndarray
    duty: np.ndarray
    always: bool = False

    def until(self, t: float) -> np.ndarray:
        pos = np.mod(t / self.period + self.phase, 1.0)
        online = pos < self.duty
        full = self.duty >= 1.0
        left = (self.duty - pos) * self.period
        return np.where(full, np.inf, np.where(online, t + left, -np.inf))

    def next_online(self, t: float) -> float:
        pos = np.mod(t / self.period + self.phase, 1.0)
        wait = np.where(pos < self.duty, 0.0, (1.0 - pos) * self.period)
        return t + float(wait.min()) if wait.size else math.inf


@dataclass(frozen=True)
class IntervalTrace:
    """Online intervals ``[start, end)`` from a trace: ``owner[j]`` is the client index of
    interval ``j`` (sorted by owner then start, merged, non-overlapping). The trace repeats
    every ``horizon`` seconds."""

    n: int
    owner: np.ndarray
    start: np.ndarray
    end: np.ndarray
    horizon: float
    always: bool = False

    def __post_init__(self) -> None:
        # an interval ending at the horizon continues into one starting at 0 (the replay)
        first = np.zeros(self.n)
        at_zero = self.start == 0
        first[self.owner[at_zero]] = self.end[at_zero]
        object.__setattr__(self, "_wrap", first)

    def until(self, t: float) -> np.ndarray:
        base = math.floor(t / self.horizon) * self.horizon
        tq = t - base
        hit = (self.start <= tq) & (tq < self.end)
        out = np.full(self.n, -np.inf)
        ends = self.end[hit]
        carry = np.where(ends >= self.horizon, self._wrap[self.owner[hit]], 0.0)  # type: ignore[attr-defined]
        out[self.owner[hit]] = base + ends + carry
        return out

    def next_online(self, t: float) -> float:
        if not self.start.size:
            return math.inf
        if (self.until(t) > t).any():
            return t
        base = math.floor(t / self.horizon) * self.horizon
        later = self.start[self.start > t - base]
        if later.size:
            return base + float(later.min())
        return base + self.horizon + float(self.start.min())


def make_profiles(client_ids: list[str], sim: Any, *, seed: int) -> Profiles:
    """The profiles ``[simulation]`` asks for (``speeds``, ``speed``, ``bandwidth``,
    ``latency_s``, ``slow_fraction``, ``slow_factor``; see the module docstring).

    Raises:
        ConfigError: an unknown ``speeds`` that is not a readable file.
    """
    n = len(client_ids)
    if sim.speeds == "uniform":
        speed, bw = np.full(n, float(sim.speed)), np.full(n, float(sim.bandwidth))
        up, down, lat = bw, bw.copy(), np.full(n, float(sim.latency_s))
    elif sim.speeds == "fedscale":
        rng = np.random.default_rng(derive_seed(seed, "clock", "speeds"))
        speed = sim.speed * np.exp(SPEED_SIGMA * rng.standard_normal(n))
        up = sim.bandwidth * np.exp(BANDWIDTH_SIGMA * rng.standard_normal(n))
        down, lat = up.copy(), np.full(n, float(sim.latency_s))
    else:
        return _slowed(load_profiles(sim.speeds, client_ids, latency=sim.latency_s), sim, seed)
    return _slowed(Profiles(tuple(client_ids), speed, up, down, lat), sim, seed)


def _slowed(p: Profiles, sim: Any, seed: int) -> Profiles:
    n = len(p.client_ids)
    k = int(np.floor(sim.slow_fraction * n + 0.5))
    if k == 0:
        return p
    rng = np.random.default_rng(derive_seed(seed, "clock", "slow"))
    factor = np.ones(n)
    factor[rng.choice(n, size=k, replace=False)] = sim.slow_factor
    return Profiles(p.client_ids, p.speed / factor, p.up / factor, p.down / factor, p.latency)


def make_availability(client_ids: list[str], sim: Any, *, seed: int) -> Availability:
    """The availability ``[simulation]`` asks for (``availability``, ``period_s``, ``duty``).

    Raises:
        ConfigError: an unknown ``availability`` that is not a readable file.
    """
    n = len(client_ids)
    if sim.availability == "always":
        return Always(n)
    if sim.availability == "diurnal":
        rng = np.random.default_rng(derive_seed(seed, "clock", "diurnal"))
        return Diurnal(float(sim.period_s), rng.random(n), np.full(n, float(sim.duty)))
    return load_availability(sim.availability, client_ids)


def _read_table(path: str, key: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"simulation.{key} = {path!r} is neither a built-in trace nor a file; use "
            + ('"always", "diurnal"' if key == "availability" else '"uniform", "fedscale"')
            + " or the path of a CSV or Parquet file"
        )
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(file)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(file, convert_options=pcsv.ConvertOptions(
                column_types={"client": "string"}))
    except (OSError, ValueError) as exc:  # pyarrow's parse errors are ValueError subclasses
        raise ConfigError(f"simulation.{key}: cannot read {path!r}: {exc}") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"simulation.{key}: {path!r} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(table.column_names)}"
        )
    out: dict[str, np.ndarray] = {"client": np.asarray(
        table.column("client").cast("string").to_numpy(zero_copy_only=False), dtype=object)}
    for c in table.column_names:
        if c != "client" and c in columns + ("latency",):
            try:
                out[c] = table.column(c).cast("float64").to_numpy(zero_copy_only=False)
            except Exception as exc:  # pyarrow.ArrowInvalid: a non-number, a null
                raise ConfigError(f"simulation.{key}: column {c!r} of {path!r} must hold "
                                  f"numbers: {exc}") from exc
            if not np.isfinite(out[c]).all():
                raise ConfigError(f"simulation.{key}: column {c!r} of {path!r} holds a value "
                                  "that is missing or not finite")
    return out


def _positions(names: np.ndarray, client_ids: list[str], key: str, path: str) -> np.ndarray:
    """Each row's client index (-1: not a client of this data set); every client needed."""
    order = {cid: i for i, cid in enumerate(client_ids)}
    pos = np.fromiter((order.get(str(c), -1) for c in names), dtype=np.int64, count=len(names))
    absent = np.setdiff1d(np.arange(len(client_ids)), pos[pos >= 0])
    if absent.size:
        shown = ", ".join(client_ids[i] for i in absent[:5])
        raise ConfigError(
            f"simulation.{key}: {path!r} has no row for {absent.size} client(s) of the data set "
            f"({shown}{', ...' if absent.size > 5 else ''}); add them (clients are matched by id)"
        )
    return pos


def load_profiles(path: str, client_ids: list[str], *, latency: float = 0.0) -> Profiles:
    """Profiles from a CSV/Parquet file (client, speed, bandwidth[, latency]); a client listed
    twice keeps its last row; ``latency`` fills a missing latency column."""
    cols = _read_table(path, "speeds", ("client", "speed", "bandwidth"))
    pos = _positions(cols["client"], client_ids, "speeds", path)
    n, keep = len(client_ids), pos >= 0
    speed, bw, lat = np.empty(n), np.empty(n), np.full(n, float(latency))
    speed[pos[keep]] = cols["speed"][keep]
    bw[pos[keep]] = cols["bandwidth"][keep]
    if "latency" in cols:
        lat[pos[keep]] = cols["latency"][keep]
    return Profiles(tuple(client_ids), speed, bw, bw.copy(), lat)


def load_availability(path: str, client_ids: list[str]) -> IntervalTrace:
    """An availability trace from a CSV/Parquet file (client, start, end in seconds).

    Raises:
        ConfigError: the file is unreadable, lacks a column, holds an interval with
            ``end <= start`` or ``start < 0``, or misses a client of the data set.
    """
    cols = _read_table(path, "availability", ("client", "start", "end"))
    pos = _positions(cols["client"], client_ids, "availability", path)
    start, end = cols["start"], cols["end"]
    bad = (end <= start) | (start < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"simulation.availability: row {i + 1} of {path!r} has start = {start[i]:g}, "
            f"end = {end[i]:g}; an interval needs 0 <= start < end"
        )
    keep = pos >= 0
    owner, start, end = pos[keep], start[keep], end[keep]
    order = np.lexsort((start, owner))
    owner, start, end = owner[order], start[order], end[order]
    # merge overlapping or touching intervals of the same client, vectorised: on the ranks of
    # the times (exact integers), each owner's running maximum end decides where a merged
    # interval starts
    values, rank = np.unique(np.concatenate([start, end]), return_inverse=True)
    r_start, r_end = rank[:start.size], rank[start.size:]
    span = np.int64(values.size + 1)
    run_end = np.maximum.accumulate(r_end + owner * span) - owner * span
    new = np.ones(owner.size, dtype=bool)
    new[1:] = (owner[1:] != owner[:-1]) | (r_start[1:] > run_end[:-1])
    group = np.cumsum(new) - 1
    m_owner, m_start = owner[new], start[new]
    m_end = np.full(int(new.sum()), -np.inf)
    np.maximum.at(m_end, group, end)
    return IntervalTrace(len(client_ids), m_owner, m_start, m_end, float(end.max()))


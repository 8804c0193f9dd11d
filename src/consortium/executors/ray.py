"""The Ray executor: groups of clients, vectorised within a group, run as Ray tasks.

For runs that outgrow one machine. Each round's clients are split into groups (at least one
per Ray worker, more when a group would exceed ``max_memory_mb``), and every group is one Ray
task that trains its clients with the vectorised executor's batched loop (or one after another
when the model, loss or optimiser cannot be batched). What travels, and how often:

- the packed data set goes to Ray's object store **once** per client pool, as NumPy arrays,
  which workers on the same node read from shared memory without a copy;
- the round's tasks (global model, payloads) are put in the object store once per round and
  each group receives only the indices of its tasks;
- per-client state (SCAFFOLD's ``c_i``) lives in the driver's ``ClientStateStore``: each group
  receives the states of its clients and returns them updated with its results.

Results are yielded **in task order**: groups are awaited with ``ray.wait`` and a result is
released as soon as every task before it has finished. The aggregate is then the same, bit for
bit, as the sequential and vectorised executors' for the same seed, whatever order the workers
finish in; the cost is that an early group's results wait for a slower group holding an
earlier task (aggregation is cheap next to training, so this costs little).

Evaluation runs in the driver with the vectorised executor's packed evaluation: one forward
pass over the test rows, cheaper than shipping the model and collecting metrics from workers.

Ray is an optional extra (``pip install 'consortium[ray]'``) and is imported only when a
:class:`RayExecutor` is made. On a cluster, every node needs consortium installed (or a Ray
``runtime_env`` that provides it), since workers import the training code by name.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import socket
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from consortium.aggregation.base import Pipeline
from consortium.algorithms.base import Algorithm
from consortium.client.app import SiteClient
from consortium.client.pool import ClientPool
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTraining, planned_steps, steps_for_work
from consortium.data.base import PackedClients, Split
from consortium.errors import ConfigError, ConsortiumError, MissingExtraError
from consortium.executors.base import exchange_in_process
from consortium.executors.device import resolve_device
from consortium.executors.sequential import SequentialExecutor
from consortium.executors.vectorized import VectorizedExecutor, _evaluate_packed, vectorizable
from consortium.messages import EvaluationResult, Result, Task
from consortium.privacy.policy import SitePolicy

__all__ = ["RayExecutor"]

State = dict[str, torch.Tensor]


def _import_ray() -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("the Ray executor", "ray", "ray") from exc
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto", "ray://..." and the like: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {address}: {exc}") from exc


# -- what travels to the workers -----------------------------------------------------------------


@dataclass(frozen=True)
class _SharedData:
    """A pool's packed data as NumPy arrays: Ray's object store hands NumPy arrays to workers
    on the same node as read-only views of shared memory, where tensors would be copied."""

    client_ids: tuple[str, ...]
    arrays: dict[str, Any]

    @classmethod
    def of(cls, packed: PackedClients) -> _SharedData:
        tensors = {
            "train_x": packed.train.x, "train_y": packed.train.y,
            "test_x": packed.test.x, "test_y": packed.test.y,
            "train_offsets": packed.train_offsets, "test_offsets": packed.test_offsets,
        }
        return cls(packed.client_ids, {k: _to_numpy(t) for k, t in tensors.items()})

    def packed(self) -> PackedClients:
        t = {k: _to_tensor(a) for k, a in self.arrays.items()}
        return PackedClients(
            self.client_ids,
            train=Split(t["train_x"], t["train_y"]), test=Split(t["test_x"], t["test_y"]),
            train_offsets=t["train_offsets"], test_offsets=t["test_offsets"],
        )


def _to_numpy(t: torch.Tensor) -> Any:
    try:
        return t.detach().cpu().contiguous().numpy()
    except TypeError:  # a dtype NumPy lacks (bfloat16): ship the tensor, copied per task
        return t


def _to_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        # The arrays are read-only views of the object store; training only reads (gathers) them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


@dataclass(frozen=True)
class _Round:
    """One round's shared inputs: everything but the data, put in the object store once."""

    tasks: tuple[Task, ...]
    model_factory: Callable[[], torch.nn.Module]
    algorithm: Algorithm
    pipeline: Pipeline
    settings: LocalTraining
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_classes: int
    vectorized: bool
    policies: dict[str, SitePolicy] = field(default_factory=dict)
    device: str = "cpu"
    """``executor.device`` on the worker: ``"cuda"`` when Ray gave the task a GPU share."""


def _fit_group(
    data: _SharedData, rnd: _Round, indices: list[int], states: dict[str, State]
) -> tuple[list[Result], dict[str, State], dict[str, dict[str, Any]]]:
    """The Ray task: train one group's clients and return their results, new states and the
    sessions their interactive stages keep (secure aggregation's quantised vectors)."""
    store = ClientStateStore()
    for cid, state in states.items():
        store.get(cid).update(state)
    pool = ClientPool(
        data.packed(), model_factory=rnd.model_factory, algorithm=rnd.algorithm,
        pipeline=rnd.pipeline, settings=rnd.settings, loss_fn=rnd.loss_fn,
        num_classes=rnd.num_classes, state=store, policies=rnd.policies,
    )
    tasks = [rnd.tasks[i] for i in indices]
    device = resolve_device(rnd.device, announce=False)  # Ray shows the task its GPU as cuda:0
    if rnd.vectorized:
        results = list(VectorizedExecutor(device=device)._fit_group(tasks, pool))
    else:
        results = list(SequentialExecutor(device=device).fit(tasks, pool))
    return results, {cid: store.get(cid) for cid in states}, pool.sessions


# -- the driver side -------------------------------------------------------------------------


@dataclass
class _PoolEntry:
    """What the executor keeps per client pool: whether it batches, its data in the object
    store, its group size and a scratch model for evaluation."""

    pool: weakref.ref[ClientPool]
    reason: str | None
    data: Any = None  # ray.ObjectRef of a _SharedData, put on first use
    group_size: int | None = None
    module: torch.nn.Module | None = None


class RayExecutor:
    """Runs each round's clients as groups of Ray tasks; see the module docstring.

    Ray is started on first use: connected to ``address`` when one is given, otherwise a
    local Ray on this machine (listening on 127.0.0.1 only) with ``workers`` CPUs. A Ray that
    is already initialised in this process is reused, and then left running by :meth:`close`;
    a Ray this executor started is shut down by :meth:`close`.

    Args:
        address: a Ray cluster to connect to: ``"host:6379"``, ``"ray://host:10001"`` (Ray
            Client), or ``"auto"`` (the one in ``RAY_ADDRESS`` or started by ``ray start`` on
            this machine); ``""`` starts a new local Ray for you.
        workers: how many groups to run at once (and the CPUs of a local Ray); 0 means every
            CPU of the machine, or of the cluster when connecting to one.
        max_memory_mb: memory budget of one group (so of one worker); rounds whose groups
            would exceed it are split into more groups.
        device: ``executor.device``. ``"cuda"`` (``"cuda:N"``) gives every group task an equal
            share of the cluster's GPUs (``num_gpus``; the cluster must have some), ``"auto"``
            does so when it has GPUs and runs on CPUs otherwise. The driver's evaluation runs
            on its own GPU when it has one, else on its CPU.

    Raises:
        MissingExtraError: Ray is not installed.
        ConfigError: ``workers`` < 0 or ``max_memory_mb`` <= 0; on first use, no Ray cluster
            at ``address``.
    """

    name = "ray"

    def __init__(self, *, address: str = "", workers: int = 0, max_memory_mb: float = 1024.0,
                 device: str = "cpu") -> None:
        if workers < 0:
            raise ConfigError(f"executor.workers = {workers} is not allowed: expected an integer >= 0")
        if not max_memory_mb > 0:
            raise ConfigError(f"executor.max_memory_mb = {max_memory_mb} is not allowed: expected a number > 0")
        self._ray = _import_ray()
        self.address = address
        self.workers = workers
        self.max_memory_mb = max_memory_mb
        self._owns_ray = False
        self._remote: Any = None
        self._pools: dict[int, _PoolEntry] = {}
        self.device = device
        local = resolve_device(
            "cpu" if device == "cpu" else device if torch.cuda.is_available() else "cpu",
            announce=False,
        )
        self._sizer = VectorizedExecutor(max_memory_mb=max_memory_mb)
        self._sequential = SequentialExecutor(device=local)
        self._local = local
        self._worker_device = "cpu"
        self._said_not_a_pool = False

    # -- Ray -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            try:
                if self.address:
                    _check_reachable(self.address)
                    ray.init(address=self.address, logging_level=logging.WARNING)
                else:
                    ray.init(
                        # "local": a new Ray even if `ray start` left one running on this machine
                        address="local", num_cpus=self.workers or os.cpu_count() or 1,
                        include_dashboard=False, logging_level=logging.WARNING,
                        # a private cluster on this machine: no Ray ports on the network
                        _node_ip_address="127.0.0.1",
                    )
            except ConnectionError as exc:
                raise ConfigError(
                    f"executor.address = {self.address!r}: no Ray cluster could be reached "
                    f"there ({exc}); start one with `ray start --head`, or leave executor.address "
                    "empty to run a local Ray"
                ) from exc
            self._owns_ray = True
        if self._remote is None:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            share = 0.0
            if self.device != "cpu" and gpus > 0:
                share = min(1.0, gpus / self._parallelism())
                self._worker_device = "cuda"
            elif self.device not in ("cpu", "auto"):
                raise ConfigError(
                    f"executor.device = {self.device!r} but the Ray cluster has no GPU; set "
                    'executor.device = "cpu" or "auto", or add GPU nodes to the cluster'
                )
            self._remote = ray.remote(num_cpus=1, num_gpus=share)(_fit_group)

    def _parallelism(self) -> int:
        if self.workers:
            return self.workers
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    # -- per pool ------------------------------------------------------------------------------

    def _entry(self, pool: ClientPool) -> _PoolEntry:
        entry = self._pools.get(id(pool))
        if entry is not None and entry.pool() is pool:
            return entry
        # a dead pool's id may be reused: forget dead pools (and free their data)
        self._pools = {k: e for k, e in self._pools.items() if e.pool() is not None}
        reason = vectorizable(pool)
        if reason is not None:
            print(
                f"consortium: the Ray executor cannot batch clients within a group ({reason}); "
                "each group trains its clients one after another",
                file=sys.stderr,
            )
        entry = _PoolEntry(weakref.ref(pool), reason)
        self._pools[id(pool)] = entry
        return entry

    def _data(self, entry: _PoolEntry, pool: ClientPool) -> Any:
        if entry.data is None:
            entry.data = self._ray.put(_SharedData.of(pool.packed))
        return entry.data

    def _groups(self, tasks: Sequence[Task], pool: ClientPool, entry: _PoolEntry) -> list[list[int]]:
        """Task indices per group: at least one group per worker, none larger than the memory
        budget allows, balanced by local steps (longest first onto the least loaded group)."""
        n = len(tasks)
        cap = n
        if entry.reason is None:
            if entry.group_size is None:
                entry.group_size = self._sizer._group_size(pool, tasks[0].parameters.layout)
            cap = entry.group_size
        count = max(min(self._parallelism(), n), math.ceil(n / cap))
        per_group = math.ceil(n / count)
        sizes = pool.packed.train_sizes()
        steps = [
            steps_for_work(planned_steps(int(sizes[pool.packed.index(t.client_id)]), pool.settings), t.work)
            for t in tasks
        ]
        groups: list[list[int]] = [[] for _ in range(count)]
        load = [(0, g) for g in range(count)]
        for i in sorted(range(n), key=lambda i: -steps[i]):
            total, g = heapq.heappop(load)
            groups[g].append(i)
            if len(groups[g]) < per_group:
                heapq.heappush(load, (total + steps[i], g))
        return [sorted(g) for g in groups if g]

    # -- training ------------------------------------------------------------------------------

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]) -> Iterator[Result]:
        if not tasks:
            return
        if not isinstance(clients, ClientPool):
            if not self._said_not_a_pool:
                self._said_not_a_pool = True
                print(
                    "consortium: the Ray executor needs a ClientPool over packed data; "
                    "running these clients in this process, one after another",
                    file=sys.stderr,
                )
            yield from self._sequential.fit(tasks, clients)
            return
        self._connect()
        pool = clients
        pool.algorithm.check_settings(pool.settings)  # fail here, not inside every worker
        entry = self._entry(pool)
        data = self._data(entry, pool)
        shared = self._ray.put(_Round(
            tuple(tasks), pool.model_factory, pool.algorithm, pool.pipeline, pool.settings,
            pool.loss_fn, pool.num_classes, vectorized=entry.reason is None,
            policies=pool.policies, device=self._worker_device,
        ))
        pending: dict[Any, list[int]] = {}
        for group in self._groups(tasks, pool, entry):
            states = {tasks[i].client_id: dict(pool.state.get(tasks[i].client_id)) for i in group}
            pending[self._remote.remote(data, shared, group, states)] = group
        yield from self._in_order(pending, tasks, pool)

    def _in_order(
        self, pending: dict[Any, list[int]], tasks: Sequence[Task], pool: ClientPool
    ) -> Iterator[Result]:
        ray = self._ray
        done: dict[int, Result] = {}
        following = 0
        waiting = list(pending)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    group = pending[ref]
                    results, states, sessions = self._get(ref, [tasks[i] for i in group])
                    pool.sessions.update(sessions)
                    for cid, state in states.items():
                        kept = pool.state.get(cid)
                        kept.clear()
                        kept.update(state)
                    done.update(zip(group, results))
                while following in done:
                    yield done.pop(following)
                    following += 1
        finally:
            for ref in waiting:  # the caller stopped early, or a group failed
                ray.cancel(ref)

    def _get(
        self, ref: Any, tasks: list[Task]
    ) -> tuple[list[Result], dict[str, State], dict[str, dict[str, Any]]]:
        """A group's results. An error in our code or the user's propagates; a lost worker or
        node (after Ray's retries) fails only that group's clients, like clients dropping out."""
        ray = self._ray
        try:
            results: list[Result]
            results, states, sessions = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ConsortiumError):
                raise exc.cause from exc
            raise
        except ray.exceptions.RayError as exc:
            error = f"the Ray worker running this client failed: {type(exc).__name__}: {exc}"
            return [Result(t.round, t.client_id, None, error=error) for t in tasks], {}, {}
        return results, states, sessions

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]
    ) -> Iterator[EvaluationResult]:
        if not tasks:
            return
        if not isinstance(clients, ClientPool):
            yield from self._sequential.evaluate(tasks, clients)
            return
        entry = self._entry(clients)
        if entry.reason is not None:
            yield from self._sequential.evaluate(tasks, clients)
            return
        if entry.module is None:
            entry.module = clients.model_factory().to(self._local)
        yield from _evaluate_packed(tasks, clients, entry.module)

    def exchange(
        self, stage_name: str, phase: str, messages: Mapping[str, Any],
        clients: Mapping[str, SiteClient], *, round: int,
    ) -> Iterator[tuple[str, Any]]:
        """Interactive phases run in this process, where the clients' sessions are."""
        return exchange_in_process(stage_name, phase, messages, clients, round=round)

    def close(self) -> None:
        """Free the data in the object store, and shut Ray down if this executor started it."""
        self._pools.clear()
        self._remote = None
        self._sizer.close()
        self._sequential.close()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

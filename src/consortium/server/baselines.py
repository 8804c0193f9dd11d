"""Baselines that answer "is federating worth it?": local-only and pooled training.

Both train through the run's own executor (the vectorised one batches every local-only
client into one computation and runs the pooled model as one batched client), each with a
budget stated in ``summary.json`` (``baselines.<name>.budget``: ``mode``, epochs or steps,
``rule``, ``wall_s``). ``evaluation.baseline_budget`` (:class:`Budget`) chooses it:

- ``"matched"`` (the default): each baseline trains what the federation trained, in
  expectation. With ``N`` clients, ``m = clients_per_round`` of them a round (uniform
  sampling) and ``P`` a client's planned local steps a round (``local_epochs`` epochs of its
  data, or ``local_steps``), a client takes part in ``rounds × m / N`` rounds on average. Of
  each round's ``m`` participants, ``k = round(simulation.stragglers × m)`` are stragglers
  doing ``ceil(u × P)`` steps for ``u`` uniform in (0, 1], which is ``(P + 1) / 2`` steps in
  expectation (exactly: each of 1 … P is equally likely), so a client's expected steps are
  ``rounds × m / N × ((m − k) × P + k × (P + 1) / 2) / m``. **Local only** trains each client
  alone for that many steps, rounded up to a whole step (about ``rounds × m / N ×
  local_epochs × (1 − k / 2m)`` epochs). **Pooled** trains the federation's expected passes
  over the pooled data, ``rounds × m / N × local_epochs × (1 − k / 2m)``, rounded up to whole
  steps (the stragglers' sub-step rounding is not counted there); fixed-steps mode: the
  federation's expected total steps, ``rounds × ((m − k) × local_steps + k × (local_steps +
  1) / 2)``. Clients that drop out (``simulation.dropout``) are not subtracted; under
  asynchronous aggregation ``m`` is the updates a server step takes in (FedBuff's
  ``server.buffer_size``, FedAsync's 1; :attr:`Budget.updates`). When every
  client takes part in every round and there are no stragglers (the heart-disease demo, 4 of
  4) this is exactly ``"full"``.
- ``"full"``: the budget of a federation whose every client takes part in every round in
  full: local only ``rounds × local_epochs`` epochs of each client's data (fixed-steps:
  ``rounds × local_steps`` steps), pooled ``rounds × local_epochs`` passes (fixed-steps:
  ``rounds × local_steps × clients_per_round`` steps).

- **local only**: each client trains alone, from the federation's initial model, with the
  run's local optimiser, and is evaluated on its own test split. A federation larger than
  ``evaluation.baseline_clients`` trains a seeded sample of that many clients
  (``baselines.local.sampled``). In a deployment each site trains at home
  (:func:`train_alone`): ``"matched"`` there is exact, the local steps the site trained in the
  federation by its own count (deploy/client.py), and ``"full"`` as above.
- **pooled**: one model on the union of the clients' training data (the reference a data
  lake would give, not a private option), evaluated on every client's test split like the
  federated model. Pooled data larger than ``evaluation.pooled_examples`` is a seeded
  uniform sample of that many examples, trained for the same number of passes
  (``baselines.pooled.sampled``).

The stragglers are those of Li et al. 2020 (FedProx, §5.2; :class:`~consortium.server.
heterogeneity.Stragglers`). :func:`local_baseline` and :func:`pooled_baseline` are the
one-model-at-a-time reference (the sequential trainer, as before); :func:`run_baselines` is
what a run uses, and its local-only results equal :func:`local_baseline`'s to float rounding
(same batches, same optimiser; tests/server/test_baselines.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch

from consortium.client.evaluation import confusion_matrix, evaluate_model, summarise_clients
from consortium.client.training import LocalTraining, planned_steps, train_locally
from consortium.data.base import ClientData, FederatedDataset, PackedClients, Split
from consortium.errors import ConfigError
from consortium.messages import Task
from consortium.seeds import derive_seed
from consortium.types import Parameters

__all__ = [
    "BaselineOutcome",
    "BaselineSetup",
    "Budget",
    "local_baseline",
    "local_budget",
    "pooled_baseline",
    "pooled_budget",
    "run_baselines",
    "site_reports",
    "train_alone",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
"""``(done, total)``: clients finished (local only) or steps done (pooled)."""


@dataclass(frozen=True)
class Budget:
    """``evaluation.baseline_budget``: how long the baselines train (module docstring).

    Attributes:
        mode: ``"matched"`` (what the federation trained, in expectation) or ``"full"``.
        clients: the federation's clients ``N`` (matched; 0: every client takes part in
            every round, so matched is full).
        stragglers: ``simulation.stragglers``, the share of a round's participants that do a
            uniform share of their planned steps (matched).
        updates: client updates a round takes in (matched; 0: ``clients_per_round``, as in
            synchronous rounds). Asynchronous aggregation trains ``server.buffer_size``
            updates a server step (FedBuff), FedAsync one; its stragglers are drawn per
            dispatch with the same chance, which this counts as ``round(stragglers × m)``.
    """

    mode: Literal["matched", "full"] = "full"
    clients: int = 0
    stragglers: float = 0.0
    updates: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("matched", "full"):
            raise ConfigError(f'evaluation.baseline_budget = {self.mode!r}: use "matched" or "full"')

    def _cohort(self, per_round: int) -> tuple[int, int, int]:
        """``(N, m, k)``: clients, participants a round (``per_round``; 0: every client),
        stragglers a round (matched)."""
        m = max(1, self.updates or per_round or self.clients)
        n = max(m, self.clients) if self.clients > 0 else m
        m = min(m, n)
        from consortium.server.heterogeneity import round_half_up

        return n, m, round_half_up(self.stragglers * m)

    @property
    def matched(self) -> bool:
        return self.mode == "matched"

    def client_steps(self, planned: int, rounds: int, per_round: int) -> int:
        """Steps a client trains alone, given its ``planned`` local steps a round."""
        if not self.matched:
            return rounds * planned
        n, m, k = self._cohort(per_round)
        expected = Fraction(rounds, n) * (Fraction((m - k) * planned) + Fraction(k * (planned + 1), 2))
        return max(1, math.ceil(expected))

    def passes(self, rounds: int, epochs: int, per_round: int) -> Fraction:
        """Passes over the pooled data (epochs mode)."""
        if not self.matched:
            return Fraction(rounds * epochs)
        n, m, k = self._cohort(per_round)
        return Fraction(rounds * m * epochs, n) * (1 - Fraction(k, 2 * m))

    def pooled_steps(self, settings: LocalTraining, rounds: int, per_round: int,
                     examples: int) -> int:
        """Steps of the pooled baseline on ``examples`` pooled training examples."""
        if settings.steps > 0:
            if not self.matched:
                return rounds * settings.steps * per_round
            _, m, k = self._cohort(per_round)
            s = settings.steps
            return max(1, math.ceil(rounds * (Fraction((m - k) * s) + Fraction(k * (s + 1), 2))))
        per_epoch = math.ceil(examples / settings.batch_size)
        return max(1, math.ceil(self.passes(rounds, settings.epochs, per_round) * per_epoch))


FULL = Budget()


def _number(x: Fraction | float) -> int | float:
    """``x`` as an int when whole (``30``, not ``30.0``), else to four decimals."""
    return int(x) if x == int(x) else round(float(x), 4)


def local_budget(settings: LocalTraining, rounds: int, *, budget: Budget = FULL,
                 per_round_clients: int = 0) -> dict[str, Any]:
    """``baselines.local.budget``: what each client trains for, alone (:class:`Budget`)."""
    if not budget.matched:
        if settings.steps > 0:
            return {"mode": "full", "steps": rounds * settings.steps,
                    "rule": "each client alone: rounds × local_steps steps"}
        return {"mode": "full", "epochs": rounds * settings.epochs,
                "rule": "each client alone: rounds × local_epochs epochs of its own data"}
    n, m, k = budget._cohort(per_round_clients)
    straggling = (f"; of the {m} a round, {k} stragglers do on average (P + 1) / 2 of their P "
                  "planned steps") if k else ""
    out: dict[str, Any] = {"mode": "matched", "rounds_taken_part": _number(Fraction(rounds * m, n))}
    if settings.steps > 0:
        out["steps"] = budget.client_steps(settings.steps, rounds, per_round_clients)
        out["rule"] = ("each client alone: the steps it trains in the federation in expectation, "
                       f"rounds × clients_per_round / clients × local_steps ({rounds} × {m} / "
                       f"{n} × {settings.steps}{straggling}), rounded up to a whole step")
        return out
    out["epochs"] = _number(budget.passes(rounds, settings.epochs, per_round_clients))
    out["rule"] = ("each client alone: the epochs it trains in the federation in expectation, "
                   f"rounds × clients_per_round / clients × local_epochs ({rounds} × {m} / {n} × "
                   f"{settings.epochs}{straggling}), rounded up to whole steps")
    return out


def pooled_budget(
    settings: LocalTraining, rounds: int, *, per_round_clients: int, examples: int,
    budget: Budget = FULL,
) -> dict[str, Any]:
    """``baselines.pooled.budget``: the steps (and passes) on ``examples`` pooled training
    examples (:class:`Budget`), as :func:`pooled_baseline` trains."""
    steps = budget.pooled_steps(settings, rounds, per_round_clients, examples)
    if not budget.matched:
        if settings.steps > 0:
            return {"mode": "full", "steps": steps, "examples": examples,
                    "rule": "the federation's total steps: rounds × local_steps × clients_per_round"}
        return {"mode": "full", "epochs": rounds * settings.epochs, "steps": steps,
                "examples": examples,
                "rule": "rounds × local_epochs passes over the pooled data"}
    n, m, k = budget._cohort(per_round_clients)
    straggling = f" × (1 − {k} stragglers / (2 × {m}))" if k else ""
    if settings.steps > 0:
        return {"mode": "matched", "steps": steps, "examples": examples,
                "rule": ("the federation's expected total steps: rounds × clients_per_round × "
                         f"local_steps ({rounds} × {m} × {settings.steps}"
                         + (f", {k} stragglers a round doing (local_steps + 1) / 2 on average"
                            if k else "") + "), rounded up")}
    return {"mode": "matched",
            "epochs": _number(budget.passes(rounds, settings.epochs, per_round_clients)),
            "steps": steps, "examples": examples,
            "rule": ("the federation's expected passes over the pooled data: rounds × "
                     f"clients_per_round / clients × local_epochs ({rounds} × {m} / {n} × "
                     f"{settings.epochs}{straggling}), rounded up to whole steps")}


def _evaluate_everywhere(
    module: torch.nn.Module, dataset: FederatedDataset, loss_fn: LossFn,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    per_client = {
        cid: evaluate_model(module, c.test, loss_fn=loss_fn, num_classes=dataset.num_classes)
        for cid, c in dataset.clients.items()
        if len(c.test) > 0
    }
    if confusions is not None:
        confusions.update({
            cid: confusion_matrix(module, dataset.clients[cid].test, num_classes=dataset.num_classes)
            for cid in per_client
        })
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    metrics = summarise_clients(per_client, sizes)
    if dataset.server_test is not None and len(dataset.server_test) > 0:
        central = evaluate_model(
            module, dataset.server_test, loss_fn=loss_fn, num_classes=dataset.num_classes
        )
        metrics.update({f"central_{k}": v for k, v in central.items()})
    return metrics, per_client


@dataclass(frozen=True)
class BaselineSetup:
    """What both baselines share with the federated run: model, start, optimiser, budget."""

    model_factory: Callable[[], torch.nn.Module]
    init: Parameters
    settings: LocalTraining
    loss_fn: LossFn
    rounds: int
    seed: int
    device: torch.device = torch.device("cpu")
    """Where the baselines train and are evaluated (``executor.device``)."""
    budget: Budget = FULL
    """``evaluation.baseline_budget`` with the federation's size and stragglers."""

    def local_steps(self, num_examples: int, per_round_clients: int) -> int:
        """Steps a client with ``num_examples`` training examples trains alone."""
        return self.budget.client_steps(planned_steps(num_examples, self.settings), self.rounds,
                                        per_round_clients)

    def train(self, data: Split, *, steps: int, seed: int) -> torch.nn.Module:
        module = self.model_factory().to(self.device)
        self.init.load_into(module)
        train_locally(module, data, self.settings, loss_fn=self.loss_fn, seed=seed, steps=steps)
        return module


def local_baseline(
    dataset: FederatedDataset, setup: BaselineSetup, *, per_round_clients: int = 0,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """Each site trains alone from the same initial model for ``setup.budget``
    (``per_round_clients`` a round in the federation; 0: all of them) and is evaluated on its
    own test split (each site's confusion matrix goes into ``confusions`` when given). The
    sequential reference: one client after another (:func:`run_baselines` batches them)."""
    per_client: dict[str, dict[str, float]] = {}
    for cid, data in dataset.clients.items():
        steps = setup.local_steps(len(data.train), per_round_clients)
        module = setup.train(data.train, steps=steps, seed=derive_seed(setup.seed, "local", cid))
        if len(data.test) > 0:
            per_client[cid] = evaluate_model(
                module, data.test, loss_fn=setup.loss_fn, num_classes=dataset.num_classes
            )
            if confusions is not None:
                confusions[cid] = confusion_matrix(module, data.test, num_classes=dataset.num_classes)
    sizes = {cid: len(dataset.clients[cid].test) for cid in per_client}
    return summarise_clients(per_client, sizes), per_client


def pooled_baseline(
    dataset: FederatedDataset, setup: BaselineSetup, *, per_round_clients: int,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """One model on the union of all training data (the upper reference, not a private option),
    evaluated on every site's test split like the federated model (each site's confusion
    matrix goes into ``confusions`` when given). The sequential reference."""
    pooled = dataset.pooled_train()
    steps = setup.budget.pooled_steps(setup.settings, setup.rounds, per_round_clients, len(pooled))
    module = setup.train(pooled, steps=steps, seed=derive_seed(setup.seed, "pooled"))
    return _evaluate_everywhere(module, dataset, setup.loss_fn, confusions)


# -- through the run's executor ----------------------------------------------------------------


@dataclass
class BaselineOutcome:
    """What :func:`run_baselines` hands to ``summary.json``."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Name → metrics (as ``final``), plus ``budget`` and, when sampled, ``sampled``."""
    local_per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    confusions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """``"baselines/<name>"`` → each site's confusion matrix (bootstrap intervals)."""
    notes: list[str] = field(default_factory=list)
    """Sentences for the console (sampling, skipped clients)."""


def _plain_pool(packed: PackedClients, setup: BaselineSetup, settings: LocalTraining,
                num_classes: int) -> Any:
    """A :class:`ClientPool` over ``packed`` that trains as a baseline does: plain local
    training (FedAvg's, no algorithm terms), no pipeline stage, no site policy, fresh state."""
    from consortium.aggregation.base import Pipeline
    from consortium.algorithms.fedavg import FedAvg
    from consortium.client.pool import ClientPool
    from consortium.client.state import ClientStateStore

    return ClientPool(
        packed, model_factory=setup.model_factory, algorithm=FedAvg(), pipeline=Pipeline(),
        settings=settings, loss_fn=setup.loss_fn, num_classes=num_classes,
        state=ClientStateStore(),
    )


def _local_settings(settings: LocalTraining, rounds: int) -> LocalTraining:
    """The run's local settings stretched to the local-only budget: one "round" of
    ``rounds × epochs`` epochs (or ``rounds × steps`` steps); the batches are then those of
    :func:`local_baseline` (:func:`~consortium.client.training.batch_matrix`, same seed)."""
    if settings.steps > 0:
        return dataclasses.replace(settings, steps=rounds * settings.steps)
    return dataclasses.replace(settings, epochs=rounds * settings.epochs)


def sample_clients(client_ids: Sequence[str], limit: int, *, seed: int) -> list[str]:
    """``limit`` of ``client_ids`` drawn uniformly without replacement (seeded, in their
    original order), or all of them when ``limit`` is 0 or not smaller."""
    ids = list(client_ids)
    if limit <= 0 or len(ids) <= limit:
        return ids
    chosen = set(random.Random(derive_seed(seed, "baseline-clients")).sample(range(len(ids)), limit))
    return [cid for i, cid in enumerate(ids) if i in chosen]


def local_through_executor(
    dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
    clients: Sequence[str], per_round_clients: int = 0, on_progress: Progress | None = None,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """The local-only baseline of ``clients``, all trained in one ``executor.fit`` (batched
    by the vectorised executor, in groups its memory budget allows): each client's task is
    one "round" of the full local-only budget from the initial model, cut by the task's
    ``work`` to ``setup.budget``'s steps (as a straggler's is; the batches are a prefix of the
    full budget's), with the seed :func:`local_baseline` uses. Returns the metrics and each
    client's metrics."""
    packed = dataset.packed()
    settings = _local_settings(setup.settings, setup.rounds)
    pool = _plain_pool(packed, setup, settings, dataset.num_classes)
    train_sizes = packed.train_sizes()
    tasks = []
    for cid in clients:
        n = int(train_sizes[packed.index(cid)])
        full, steps = planned_steps(n, settings), setup.local_steps(n, per_round_clients)
        tasks.append(Task(round=1, client_id=cid, parameters=setup.init,
                          seed=derive_seed(setup.seed, "local", cid),
                          work=1.0 if steps >= full else steps / full))
    with torch.random.fork_rng(devices=[]):  # building a model draws from torch's RNG
        module = setup.model_factory().to(setup.device)
    per_client: dict[str, dict[str, float]] = {}
    done = 0
    for result in executor.fit(tasks, pool):
        done += 1
        if result.update is None:
            raise RuntimeError(
                f"the local-only baseline failed at client {result.client_id!r}: {result.error}"
            )
        test = packed[result.client_id].test
        if len(test) > 0:
            setup.init.replace(setup.init.vector + result.update.delta).load_into(module)
            per_client[result.client_id] = evaluate_model(
                module, test, loss_fn=setup.loss_fn, num_classes=dataset.num_classes
            )
            if confusions is not None:
                confusions[result.client_id] = confusion_matrix(
                    module, test, num_classes=dataset.num_classes
                )
        if on_progress is not None:
            on_progress(done, len(tasks))
    sizes = {cid: len(packed[cid].test) for cid in per_client}
    return summarise_clients(per_client, sizes), per_client


def pooled_through_executor(
    dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
    per_round_clients: int, max_examples: int = 0, on_progress: Progress | None = None,
    confusions: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """The pooled baseline as one batched client of ``executor``, trained for
    :func:`pooled_budget` on the pooled data (a seeded sample of ``max_examples`` of it when
    larger; 0: all), evaluated on every client's test split. Returns the metrics and the
    budget (with ``sampled`` when the data were sampled)."""
    params, budget = _train_pooled(dataset, setup, executor, per_round_clients=per_round_clients,
                                   max_examples=max_examples, on_progress=on_progress)
    return _evaluate_batched(params, dataset, setup, executor, confusions), budget


def _train_pooled(
    dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
    per_round_clients: int, max_examples: int = 0, on_progress: Progress | None = None,
) -> tuple[Parameters, dict[str, Any]]:
    """The pooled model's training (:func:`pooled_through_executor` without the evaluation):
    its parameters and budget."""
    pooled = dataset.pooled_train()
    total = len(pooled)
    if 0 < max_examples < total:
        gen = torch.Generator().manual_seed(derive_seed(setup.seed, "pooled-sample") % 2**63)
        keep = torch.randperm(total, generator=gen)[:max_examples].sort().values
        pooled = Split(pooled.x[keep], pooled.y[keep])
    budget = pooled_budget(setup.settings, setup.rounds, per_round_clients=per_round_clients,
                           examples=len(pooled), budget=setup.budget)
    if len(pooled) < total:
        budget["sampled"] = {"examples": len(pooled), "of": total}
    empty = Split(pooled.x[:0], pooled.y[:0])
    packed = PackedClients.pack({"pooled": ClientData(train=pooled, test=empty)})
    settings = dataclasses.replace(setup.settings, steps=budget["steps"])
    runner = _one_model_runner(executor, setup)
    trainer = setup
    if runner is not executor and on_progress is not None:  # progress from its forward passes
        trainer = dataclasses.replace(setup, model_factory=_counting(
            setup.model_factory, on_progress, int(budget["steps"])))
    pool = _plain_pool(packed, trainer, settings, dataset.num_classes)
    task = Task(round=1, client_id="pooled", parameters=setup.init,
                seed=derive_seed(setup.seed, "pooled"))
    hooked = hasattr(runner, "on_step") and on_progress is not None
    if hooked:
        runner.on_step = on_progress
    try:
        (result,) = list(runner.fit([task], pool))
    finally:
        if hooked:
            runner.on_step = None
    if result.update is None:
        raise RuntimeError(f"the pooled baseline failed: {result.error}")
    if on_progress is not None:
        on_progress(budget["steps"], budget["steps"])
    return setup.init.replace(setup.init.vector + result.update.delta), budget


def _one_model_runner(executor: Any, setup: BaselineSetup) -> Any:
    """Where one model (the pooled baseline) trains: ``executor``, except that the vectorised
    executor's batching brings nothing to a single model and its per-step ``vmap`` costs more
    than a plain step unless its hand-batched Linear/ReLU path applies (README digits CNN,
    pooled: 13.7 s batched against 8.8 s plain; logistic on synthetic: 3.6 s against 5.5 s), so
    there it trains on a sequential executor of its own. Same batches, same result."""
    if getattr(executor, "name", "") != "vectorized":
        return executor
    from consortium.executors._linear_stack import LinearStack
    from consortium.executors.sequential import SequentialExecutor

    with torch.random.fork_rng(devices=[]):
        module = setup.model_factory()
    if LinearStack.match(module, setup.init.layout) is not None:
        return executor
    # its own (not the executor's fallback, whose scratch model local-only may be using)
    return SequentialExecutor(device=executor.device)


def _counting(
    factory: Callable[[], torch.nn.Module], on_progress: Progress, total: int,
) -> Callable[[], torch.nn.Module]:
    """``factory`` whose models report each training forward pass (one a step) to
    ``on_progress``: the sequential path's progress."""
    done = [0]

    def build() -> torch.nn.Module:
        module = factory()

        def counted(mod: torch.nn.Module, args: Any, output: Any) -> None:
            if mod.training:
                done[0] += 1
                on_progress(min(done[0], total), total)

        module.register_forward_hook(counted)
        return module

    return build


def _evaluate_batched(
    params: Parameters, dataset: FederatedDataset, setup: BaselineSetup, executor: Any,
    confusions: dict[str, np.ndarray] | None,
) -> dict[str, float | None]:
    """:func:`_evaluate_everywhere` through ``executor.evaluate`` (the vectorised executor: one
    forward pass over every client's test split, as the federated evaluation) and each
    site's confusion matrix from one more pass (10,000 clients in seconds, not minutes)."""
    from consortium.client.evaluation import model_outputs

    packed = dataset.packed()
    pool = _plain_pool(packed, setup, setup.settings, dataset.num_classes)
    test_sizes = packed.test_sizes()
    tasks = [Task(round=1, client_id=cid, parameters=params, seed=0)
             for i, cid in enumerate(packed.client_ids) if int(test_sizes[i]) > 0]
    per_client: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for r in executor.evaluate(tasks, pool):
        per_client[r.client_id], sizes[r.client_id] = dict(r.metrics), r.num_examples
    metrics = summarise_clients(per_client, sizes)
    with torch.random.fork_rng(devices=[]):
        module = setup.model_factory().to(setup.device)
    params.load_into(module)
    module.eval()
    if confusions is not None and len(packed.test) > 0:
        c = dataset.num_classes
        with torch.no_grad():
            predicted = model_outputs(module, packed.test.x).argmax(dim=1)
        site = torch.repeat_interleave(torch.arange(len(packed.client_ids)), test_sizes)
        cells = (site * c + packed.test.y.long()) * c + predicted
        counts = torch.bincount(cells, minlength=len(packed.client_ids) * c * c)
        table = counts.view(-1, c, c).numpy().astype(np.int64)
        confusions.update({cid: table[packed.index(cid)] for cid in per_client})
    if dataset.server_test is not None and len(dataset.server_test) > 0:
        central = evaluate_model(
            module, dataset.server_test, loss_fn=setup.loss_fn, num_classes=dataset.num_classes
        )
        metrics.update({f"central_{k}": v for k, v in central.items()})
    return metrics


def run_baselines(
    names: Sequence[str], dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
    per_round_clients: int, max_clients: int = 100, max_examples: int = 0,
    console: Any = None,
) -> BaselineOutcome:
    """The baselines ``names`` (``"local"``, ``"pooled"``) through ``executor``.

    When both run, the vectorised executor batches local-only and the pooled model trains one
    step at a time on a plain path of its own (a model the executor cannot hand-batch, such
    as the CNN) and the machine has two cores or more, the pooled model trains in a second
    thread while local-only trains in this one, each with half of torch's threads (the
    restored count afterwards): its small sequential steps leave most of a core idle, and
    torch releases the GIL inside its kernels (README digits example, 2 cores: 4.4 s one
    after the other, 2.5 s together; benchmarks/baselines.py). Same batches, same seeds: the
    same results (tests/server/test_baselines.py), evaluated here after the join.

    Args:
        max_clients: ``evaluation.baseline_clients``: the local-only baseline of a larger
            federation trains a seeded sample of this many clients (0: every client).
        max_examples: ``evaluation.pooled_examples``: the pooled baseline trains on a seeded
            sample of this many examples when the pooled data are larger (0: all).
        console: a :class:`~consortium.reporting.callbacks.Console` (its phases show the
            progress), or ``None``.

    Raises:
        RuntimeError: a baseline's training failed (a NaN loss: lower ``algorithm.lr``).
    """
    out = BaselineOutcome()
    pooled: _PooledJob | None = None
    if "pooled" in names:
        pooled = _PooledJob(dataset, setup, executor, per_round_clients=per_round_clients,
                            max_examples=max_examples, console=console, out=out)
    together = pooled is not None and "local" in names and _two_cores() and (
        _one_model_runner(executor, setup) is not executor) and not _draws_randomness(
        setup, dataset)
    threads = torch.get_num_threads()
    background: threading.Thread | None = None
    # the baselines leave torch's global RNG as they found it (building models draws from it,
    # in either thread, in an order the second thread would make vary)
    with torch.random.fork_rng(devices=[]):
        try:
            if together:
                assert pooled is not None
                dataset.packed()  # built once, here, before a second thread reads the data
                torch.set_num_threads(max(1, threads // 2))
                background = threading.Thread(target=pooled.train, name="pooled-baseline",
                                              daemon=True)
                background.start()
            for name in sorted(names, key=lambda n: n != "local") if together else names:
                if name == "local":
                    _local_job(dataset, setup, executor, per_round_clients=per_round_clients,
                               max_clients=max_clients, console=console, out=out)
                elif pooled is not None:
                    if background is not None:
                        background.join()
                        torch.set_num_threads(threads)
                    else:
                        pooled.train()
                    out.results[name] = pooled.finish()
        except BaseException:
            if pooled is not None:  # an interrupt or a failure here: pooled stops at its next step
                pooled.stop.set()
            raise
        finally:
            if background is not None:
                background.join()
                torch.set_num_threads(threads)
    out.results = {name: out.results[name] for name in names if name in out.results}
    return out


def _draws_randomness(setup: BaselineSetup, dataset: FederatedDataset) -> bool:
    """Whether the model draws from torch's global RNG in a training forward pass (dropout, or
    any random op): two threads would then interleave its draws, so such a model's baselines
    run one after the other, as reproducible as before."""
    pooled = dataset.pooled_train()
    if len(pooled) == 0:
        return True
    with torch.random.fork_rng(devices=[]):
        module = setup.model_factory().to(setup.device).train()
        before = torch.random.get_rng_state()
        with torch.no_grad():
            module(pooled.x[:2].to(setup.device))
        return not torch.equal(before, torch.random.get_rng_state())


def _two_cores() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) >= 2


def _local_job(
    dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
    per_round_clients: int, max_clients: int, console: Any, out: BaselineOutcome,
) -> None:
    started = time.perf_counter()
    chosen = sample_clients(dataset.client_ids, max_clients, seed=setup.seed)
    budget = local_budget(setup.settings, setup.rounds, budget=setup.budget,
                          per_round_clients=per_round_clients)
    if len(chosen) < len(dataset.clients):
        _note(out, console,
              f"local-only baseline on a seeded sample of {len(chosen):,} of "
              f"{len(dataset.clients):,} clients (evaluation.baseline_clients = "
              f"{max_clients}; 0 trains every client)")
    label = f"baselines: local, {_budget_text(budget)} each"
    with _phase(console, label, len(chosen), "clients") as advance:
        metrics, per_client = local_through_executor(
            dataset, setup, executor, clients=chosen,
            per_round_clients=per_round_clients, on_progress=advance,
            confusions=out.confusions.setdefault("baselines/local", {}),
        )
    budget["wall_s"] = time.perf_counter() - started
    result: dict[str, Any] = {**metrics, "budget": budget}
    if len(chosen) < len(dataset.clients):
        result["sampled"] = {"clients": len(chosen), "of": len(dataset.clients)}
    out.results["local"] = result
    out.local_per_client = per_client


class _PooledJob:
    """The pooled baseline in two parts: :meth:`train` (in its console phase; safe in a
    second thread: it touches only its own pool and sequential executor) and :meth:`finish`
    (the evaluation through the run's executor, in the calling thread)."""

    def __init__(self, dataset: FederatedDataset, setup: BaselineSetup, executor: Any, *,
                 per_round_clients: int, max_examples: int, console: Any,
                 out: BaselineOutcome) -> None:
        self.dataset, self.setup, self.executor = dataset, setup, executor
        self.per_round, self.max_examples, self.console = per_round_clients, max_examples, console
        self.started = 0.0  # when train() began
        total = len(dataset.pooled_train())
        self.planned = pooled_budget(
            setup.settings, setup.rounds, per_round_clients=per_round_clients,
            examples=min(total, max_examples) if max_examples else total, budget=setup.budget,
        )
        if self.planned["examples"] < total:
            _note(out, console,
                  f"pooled baseline on a seeded sample of {self.planned['examples']:,} of "
                  f"{total:,} training examples (evaluation.pooled_examples = "
                  f"{max_examples}; 0 pools every example)")
        self.confusions = out.confusions.setdefault("baselines/pooled", {})
        self.trained: tuple[Parameters, dict[str, Any]] | None = None
        self.trained_s = 0.0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        """Set when the caller fails or is interrupted: training ends at its next step."""

    def train(self) -> None:
        self.started = time.perf_counter()
        planned, settings = self.planned, self.setup.settings
        steps = int(planned["steps"])
        # shown in epochs where the budget is in epochs ("pooled epoch 3/30")
        per_epoch = math.ceil(planned["examples"] / settings.batch_size)
        epochs = math.ceil(steps / per_epoch) if "epochs" in planned and per_epoch else 0
        label = f"baselines: pooled, {_budget_text(planned)}"
        try:
            with _phase(self.console, label, epochs or steps,
                        "epochs" if epochs else "steps") as advance:
                def steps_done(done: int, total: int, advance: Any = advance) -> None:
                    if self.stop.is_set():
                        raise RuntimeError("the pooled baseline was stopped")
                    if advance is not None:
                        advance(done // per_epoch if epochs else done, epochs or total)

                self.trained = _train_pooled(
                    self.dataset, self.setup, self.executor, per_round_clients=self.per_round,
                    max_examples=self.max_examples, on_progress=steps_done,
                )
        except BaseException as e:  # re-raised in the calling thread by finish()
            self.error = e
        self.trained_s = time.perf_counter() - self.started

    def finish(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.trained is not None
        params, budget = self.trained
        started = time.perf_counter()
        metrics = _evaluate_batched(params, self.dataset, self.setup, self.executor,
                                    self.confusions)
        result: dict[str, Any] = {
            **metrics, "budget": {k: v for k, v in budget.items() if k != "sampled"}}
        # its own time: training and evaluation, not the wait for local-only beside it
        result["budget"]["wall_s"] = self.trained_s + time.perf_counter() - started
        if "sampled" in budget:
            result["sampled"] = budget["sampled"]
        return result


def _note(out: BaselineOutcome, console: Any, text: str) -> None:
    out.notes.append(text)
    if console is not None:  # before the phase starts: the user knows what is being trained
        console.note(text)


def _budget_text(budget: Mapping[str, Any]) -> str:
    if "epochs" in budget:
        return f"{budget['epochs']:,.2f}".rstrip("0").rstrip(".") + " epochs"
    return f"{budget['steps']:,} steps"


class _NoPhase:
    def __enter__(self) -> Progress | None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _phase(console: Any, label: str, total: int, unit: str) -> Any:
    if console is None:
        return _NoPhase()
    return console.phase(label, total=total, unit=unit)


# -- in a deployment -----------------------------------------------------------------------------


def train_alone(
    model_factory: Callable[[], torch.nn.Module], init_seed: int, data: ClientData,
    settings: LocalTraining, *, rounds: int, loss_fn: LossFn, num_classes: int,
    randomness: Any = None, steps: int | None = None,
) -> dict[str, float]:
    """A deployed site's local-only baseline: its own model, from the run's initial model
    (``seeded_model(factory, init_seed)``, as the server builds it), trained alone on its
    training split for ``steps`` (``evaluation.baseline_budget = "matched"``: the steps the
    site trained in the federation, its own count, never more than the full budget however
    many tasks a server sent) or, with ``None``, :func:`local_budget`'s full budget (the run's
    local settings × ``rounds``), and evaluated on its test split. Only these metrics may
    leave the site. The batch order is drawn from the OS CSPRNG (never a seed another party
    sent), and under local DP-SGD the batches and noise from ``randomness`` (the site's own
    generator)."""
    import secrets

    from consortium.models.zoo import seeded_model

    module = seeded_model(model_factory, init_seed)
    full = FULL.client_steps(planned_steps(len(data.train), settings), rounds, 0)
    steps = full if steps is None else min(steps, full)
    train_locally(module, data.train, settings, loss_fn=loss_fn, seed=secrets.randbits(63),
                  steps=steps, randomness=randomness)
    if len(data.test) == 0:
        return {}
    return evaluate_model(module, data.test, loss_fn=loss_fn, num_classes=num_classes)


def site_reports(
    reports: Mapping[str, tuple[int, Mapping[str, float]]], *, settings: LocalTraining,
    rounds: int, sites: int, budget_mode: str = "full",
) -> BaselineOutcome:
    """``summary.json``'s ``baselines.local`` of a deployment, from the sites' own reports
    (site → (test examples, metrics)): weighted as the federated metrics are, with its budget
    (``budget_mode``: ``evaluation.baseline_budget``), where it trained, and how many sites
    reported (a site's policy may keep them)."""
    out = BaselineOutcome()
    per_client = {cid: dict(m) for cid, (_, m) in sorted(reports.items()) if m}
    sizes = {cid: int(reports[cid][0]) for cid in per_client}
    if budget_mode == "matched":
        budget = {"mode": "matched", "rule": (
            "each site alone: the local steps it trained in the federation, counted at the "
            "site (a site that trained none reports no local-only metrics)")}
    else:
        budget = local_budget(settings, rounds)
    budget["where"] = "at each site, on its own data"
    result: dict[str, Any] = {**summarise_clients(per_client, sizes), "budget": budget,
                              "reported": {"sites": len(per_client), "of": sites}}
    out.results["local"] = result
    out.local_per_client = per_client
    if len(per_client) < sites:
        out.notes.append(
            f"local-only baseline: {len(per_client)} of {sites} sites reported it (a site "
            "sends it only if its policy's send_metrics names the local_<metric> names)"
        )
    return out

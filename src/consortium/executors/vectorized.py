"""The vectorised executor: a round's clients train together in one batched computation.

K clients × S local steps cost S batched steps, not K×S small ones. The design follows what
measured fastest here (issue 3): ``vmap`` over :func:`torch.func.functional_call` for the
forward pass only, one ``autograd.grad`` of the summed per-client losses (each client's loss
depends only on its own row of the stacked parameters, so the summed gradient is every
client's own gradient), clients sorted by step count so the active set is a shrinking prefix
and finished clients are never stepped, and each step's batches gathered with one indexing op.

The result equals training each client alone with the sequential executor: the same batches
(:func:`~consortium.client.training.batch_matrix`), the same SGD with momentum and weight
decay as ``torch.optim.SGD``, the same algorithm terms and updates. Like the sequential
executor's optimiser, which holds only parameters with ``requires_grad``, it trains only
those: the stacked parameters, momentum, algorithm terms and DP-SGD noise have the trainable
columns only (:func:`trainable_columns`), frozen values are constants of the forward pass, and
a frozen parameter's delta is exactly zero.

Batch normalisation (the zoo's ``mlp_bn`` and ``cnn_bn``, whose running statistics are
parameters that do not train: :func:`~consortium.models.zoo.statistics_names`): the statistics
are stacked per client beside the trainable columns and handed to the batched forward pass,
which updates each client's row in place, as a module in train mode does; at a step where
clients' batches differ in size (the short last batch of an epoch) the clients are batched in
groups of equal batch size, so that padding never enters a batch's statistics.

Personalised algorithms: each client's row starts from its algorithm's ``terms.start`` (the
global model with the client's own head, read from its state), and FedRep's ``terms.phases``
mask each step's gradient to the phase's columns, with per-column momentum that starts when
the column's phase starts, as the sequential loop's fresh optimiser per phase does.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from consortium.aggregation.base import ClientContext
from consortium.algorithms.base import LocalResult, TrainContext
from consortium.client.app import SiteClient, own_noise
from consortium.client.dp_sgd import poisson_batches
from consortium.client.evaluation import auc_binary
from consortium.client.pool import ClientPool
from consortium.client.training import LocalTerms, LocalTraining, local_steps, phase_schedule
from consortium.client.training import batch_matrix as make_batches
from consortium.errors import ConsortiumError
from consortium.executors._linear_stack import LinearStack
from consortium.executors.base import exchange_in_process
from consortium.executors.sequential import SequentialExecutor
from consortium.messages import EvaluationResult, Result, Task
from consortium.models.zoo import statistics_names
from consortium.privacy.policy import record_release
from consortium.seeds import derive_seed
from consortium.types import Layout, Parameters

__all__ = ["VectorizedExecutor", "statistics_columns", "trainable_columns", "vectorizable"]


def trainable_columns(module: torch.nn.Module, layout: Layout) -> torch.Tensor | None:
    """The positions in ``layout``'s flat vector of ``module``'s parameters that train
    (``requires_grad``), or ``None`` when all of them do.

    The flat vector holds every parameter (frozen ones travel as exact zero deltas); a batched
    step must touch only these columns, as ``torch.optim`` touches only the parameters it holds.
    """
    trains = {name: p.requires_grad for name, p in module.named_parameters()}
    if all(trains[spec.name] for spec in layout.specs):
        return None
    mask = torch.cat([torch.full((spec.numel,), trains[spec.name]) for spec in layout.specs])
    return torch.nonzero(mask).flatten()


def statistics_columns(module: torch.nn.Module, layout: Layout) -> torch.Tensor | None:
    """The positions in ``layout``'s flat vector of ``module``'s batch-norm running
    statistics (:func:`~consortium.models.zoo.statistics_names`), or ``None`` when it has none.

    They do not train (no gradient step) but every forward pass in train mode moves them.
    """
    names = statistics_names(module)
    if not names:
        return None
    mask = torch.cat([torch.full((spec.numel,), spec.name in names) for spec in layout.specs])
    return torch.nonzero(mask).flatten()


def vectorizable(pool: Mapping[str, SiteClient]) -> str | None:
    """Why ``pool`` cannot be trained batched, or ``None`` if it can."""
    if not isinstance(pool, ClientPool):
        return "the clients are not a ClientPool over packed data"
    if pool.settings.optimizer != "sgd":
        return f"local optimizer {pool.settings.optimizer!r} (only 'sgd', with momentum, is batched)"
    if pool.loss_fn is not F.cross_entropy:
        return "a custom loss function (only cross-entropy is batched)"
    module = pool.model_factory()
    if any(True for _ in module.buffers()):
        return (
            "the model has buffers (state outside its parameters: a frozen base held as "
            "buffers, as minilm-lora's, or batch norm's running statistics as buffers — the "
            "zoo's mlp_bn and cnn_bn hold those as parameters and are batched)"
        )
    layout = Parameters.from_module(module).layout
    try:
        probe = torch.zeros((2, 2, *pool.packed.train.x.shape[1:]))
        out = vmap(_forward_fn(module, layout))(Parameters.from_module(module).vector.repeat(2, 1), probe)
    except Exception as exc:  # any failure means vmap cannot batch this module
        return f"vmap cannot batch the model ({type(exc).__name__}: {exc})"
    if tuple(out.shape) != (2, 2, pool.num_classes):
        return f"the model's batched output has shape {tuple(out.shape)}"
    return None


def _forward_fn(  # type: ignore[no-untyped-def]
    module: torch.nn.Module, layout: Layout, frozen_from: torch.Tensor | None = None,
    *, statistics: bool = False,
):
    """``forward(flat, x)``: the module's output with its parameters read from ``flat``.

    With ``frozen_from`` (a whole flat vector), ``flat`` holds only the trainable parameters
    (:func:`trainable_columns`' order) and the frozen ones are read from ``frozen_from`` as
    constants, so differentiating ``forward`` costs nothing for the frozen part. With
    ``statistics`` (and ``frozen_from``), it is ``forward(flat, x, stats)``: the batch-norm
    running statistics are read from ``stats`` (name → tensor), which a forward pass in train
    mode updates in place. (One contiguous tensor per statistic: under ``vmap``, batch norm's
    in-place update of a view into one stacked matrix is lost.)
    """
    spans, constants = _spans(module, layout, frozen_from, statistics=statistics)

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {name: flat[o : o + n].view(shape) for name, o, n, shape in spans}
        return functional_call(module, {**params, **constants}, (x,))

    def forward_with(
        flat: torch.Tensor, x: torch.Tensor, stats: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        params = {name: flat[o : o + n].view(shape) for name, o, n, shape in spans}
        return functional_call(module, {**params, **stats, **constants}, (x,))

    return forward_with if statistics else forward


Span = tuple[str, int, int, tuple[int, ...]]


def _spans(
    module: torch.nn.Module, layout: Layout, frozen_from: torch.Tensor | None, *,
    statistics: bool = False,
) -> tuple[list[Span], dict[str, torch.Tensor]]:
    """``(name, offset, numel, shape)`` of each tensor in the stacked vector (all of them, or
    with ``frozen_from`` the trainable ones), and the frozen tensors' values by name; with
    ``statistics``, the batch-norm running statistics are in neither (they come apart)."""
    trains = {name: p.requires_grad for name, p in module.named_parameters()}
    running = statistics_names(module) if statistics else set()
    spans: list[Span] = []
    constants: dict[str, torch.Tensor] = {}
    offset = whole = 0
    for spec in layout.specs:
        if spec.name in running:
            pass
        elif frozen_from is not None and not trains[spec.name]:
            constants[spec.name] = frozen_from[whole : whole + spec.numel].view(spec.shape)
        else:
            spans.append((spec.name, offset, spec.numel, spec.shape))
            offset += spec.numel
        whole += spec.numel
    return spans, constants


def _layout_spans(layout: Layout, names: set[str]) -> list[Span]:
    """``(name, offset, numel, shape)`` in the whole flat vector of the tensors ``names``."""
    out: list[Span] = []
    offset = 0
    for spec in layout.specs:
        if spec.name in names:
            out.append((spec.name, offset, spec.numel, spec.shape))
        offset += spec.numel
    return out


def _autograd_loss_and_grad(forward, params, x, y, valid, counts):  # type: ignore[no-untyped-def]
    """Per-client mean cross-entropy and its gradient through ``vmap`` + one ``autograd.grad``
    of the summed losses (client k's loss depends only on row k, so the gradient of the sum
    is every client's own gradient)."""
    p = params.detach().requires_grad_(True)
    logits = forward(p, x)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
    ).view(valid.shape)
    per_client = (ce * valid).sum(1) / counts
    (grad,) = torch.autograd.grad(per_client.sum(), p)
    return per_client.detach(), grad


def _normed_loss_and_grad(forward, params, stats, x, y, counts):  # type: ignore[no-untyped-def]
    """:func:`_autograd_loss_and_grad` for a model with batch-norm statistics ``stats``
    (name → ``[K, *shape]``, the first ``m`` rows updated in place): the clients are batched
    in groups of equal batch size, each on its real examples only (valid rows come first in
    a batch), so that padding never enters a batch's mean and variance."""
    m = params.shape[0]
    per_client = torch.empty(m, dtype=params.dtype, device=params.device)
    grad = torch.empty_like(params)
    for c in torch.unique(counts).tolist():
        sel = torch.nonzero(counts == c).flatten()
        whole = len(sel) == m
        # views of the first m rows when whole (updated in place), else gathered copies
        rows = {name: t[:m] if whole else t[sel] for name, t in stats.items()}

        def forward_rows(
            p: torch.Tensor, xb: torch.Tensor, rows: dict[str, torch.Tensor] = rows
        ) -> torch.Tensor:
            return forward(p, xb, rows)  # type: ignore[no-any-return]

        xs, ys = x[sel, :c], y[sel, :c]
        valid = torch.ones(ys.shape, dtype=torch.bool, device=ys.device)
        loss, g = _autograd_loss_and_grad(
            forward_rows, params if whole else params[sel], xs, ys, valid,
            torch.full((len(sel),), c, device=ys.device),
        )
        if not whole:
            for name, t in stats.items():
                t[sel] = rows[name]
        per_client[sel] = loss
        grad[sel] = g
    return per_client, grad


class _PrivateSteps:
    """Batched DP-SGD (Abadi et al. 2016) for a group of clients: the same Poisson batches,
    per-example clipping and noise draws as :mod:`consortium.client.dp_sgd`, with per-example
    gradients from ``vmap(vmap(grad))`` over clients and examples.

    Only trainable parameters are clipped and noised (as in the sequential loop and Opacus):
    the clip norm is taken over them and the noise has their dimension, so the draws match.
    ``step`` takes and returns the trainable part only (see :func:`_forward_fn`).
    """

    def __init__(self, ranked: list[_Client], pool: ClientPool, module: torch.nn.Module,
                 layout: Layout, frozen_from: torch.Tensor | None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        s = pool.settings
        self.clip, self.noise = s.dp_clip, s.dp_noise
        self.rates = [min(1.0, s.batch_size / c.examples) for c in ranked]
        self.batches = [
            poisson_batches(c.examples, c.steps, rate, seed=c.task.seed)
            for c, rate in zip(ranked, self.rates)
        ]
        self.seeds = [c.task.seed for c in ranked]
        self.offsets = [int(pool.packed.train_offsets[c.index]) for c in ranked]
        self.x, self.y = data if data is not None else (pool.packed.train.x, pool.packed.train.y)
        self.device = self.x.device  # executor.device; batches and noise are drawn on the CPU
        self.expected = torch.tensor(
            [rate * c.examples for rate, c in zip(self.rates, ranked)], dtype=torch.float64
        ).to(self.device)
        self.forward = vmap(_forward_fn(module, layout, frozen_from))
        self.spans, constants = _spans(module, layout, frozen_from)

        # Per-example gradients by tensor, not of one flat vector: the backward of slicing a
        # flat vector writes a zero-filled vector of the whole model's size per tensor and
        # per example (4 s a step for a 256×256 MLP, 50 clients × 20 examples).
        def one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(module, {**params, **constants}, (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        self.per_example = vmap(vmap(torch.func.grad(one), in_dims=(None, 0, 0)))
        self.d = sum(n for _, _, n, _ in self.spans)

    def step(self, s: int, m: int, params: torch.Tensor):  # type: ignore[no-untyped-def]
        lists = [self.batches[k][s] for k in range(m)]
        b = max(1, max(len(i) for i in lists))
        index = torch.full((m, b), -1, dtype=torch.int64)
        for k, idx in enumerate(lists):
            index[k, : len(idx)] = idx + self.offsets[k]
        index = index.to(self.device)
        valid = index >= 0
        safe = index.clamp(min=0)
        xb, yb = self.x[safe], self.y[safe]
        named = {name: params[:, o : o + n].view(m, *shape) for name, o, n, shape in self.spans}
        grads = self.per_example(named, xb, yb)
        parts = [grads[name].reshape(m, b, -1) for name, *_ in self.spans]
        # Clip and sum in float64 as the sequential loop does, tensor by tensor (no [m, b, d]
        # concatenation); padding rows get factor 0.
        norms = sum(
            torch.linalg.vector_norm(g, dim=2, dtype=torch.float64).square() for g in parts
        ).sqrt()
        factor = torch.clamp(self.clip / torch.clamp(norms, min=1e-12), max=1.0) * valid
        total = torch.cat(
            [torch.bmm(factor.unsqueeze(1), g.double()).squeeze(1) for g in parts], dim=1
        )
        noise = torch.stack([
            torch.randn(self.d, dtype=torch.float64, generator=torch.Generator().manual_seed(
                derive_seed(self.seeds[k], "dp-noise", s) % 2**63))
            for k in range(m)
        ]).to(self.device) * (self.noise * self.clip)
        grad = ((total + noise) / self.expected[:m, None]).to(torch.float32)
        with torch.no_grad():
            logits = self.forward(params, xb)
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="none"
            ).view(m, b)
            counts = valid.sum(1)
            loss = (ce * valid).sum(1) / counts.clamp(min=1)
        return loss, grad, counts > 0


@dataclass
class _Phases:
    """FedRep-style phases for a group: which columns each client trains at each step."""

    masks: torch.Tensor
    """``[P, d_train]``: the trainable columns of each phase."""
    phase: torch.Tensor
    """``[K, S_max]``: each ranked client's phase at each step."""

    @classmethod
    def of(
        cls, ranked: list[_Client], settings: LocalTraining,
        cols: Callable[[torch.Tensor], torch.Tensor], s_max: int,
    ) -> _Phases | None:
        phases = ranked[0].terms.phases
        if not any(c.terms.phases for c in ranked):
            return None
        same = all(
            len(c.terms.phases) == len(phases)
            and all(torch.equal(a.train, b.train) for a, b in zip(c.terms.phases, phases))
            for c in ranked
        )
        if not same:
            raise ConsortiumError(
                "the clients of one round have different local-training phases; the vectorised "
                'executor batches one algorithm\'s phases only (use executor.kind = "sequential")'
            )
        masks = torch.stack([cols(p.train) for p in phases])
        phase = torch.zeros((len(ranked), s_max), dtype=torch.int64)
        for k, c in enumerate(ranked):
            schedule = phase_schedule(c.examples, settings, phases, c.steps)
            phase[k, : c.steps] = torch.repeat_interleave(
                torch.arange(len(phases)), torch.tensor(schedule)
            )
        return cls(masks, phase)

    def columns(self, s: int, m: int) -> torch.Tensor:
        """``[m, d_train]``: where each of the first ``m`` clients trains at step ``s``."""
        return self.masks[self.phase[:m, s]]

    def to(self, device: torch.device) -> _Phases:
        """These phases with their masks on ``device`` (the stacked parameters')."""
        return _Phases(self.masks.to(device), self.phase.to(device))

    def starts(self, s: int, m: int) -> torch.Tensor:
        """``[m, 1]``: whether step ``s`` is the first of a phase for each of the first ``m``."""
        if s == 0:
            return torch.ones((m, 1), dtype=torch.bool, device=self.masks.device)
        return (self.phase[:m, s] != self.phase[:m, s - 1]).unsqueeze(1)


@dataclass
class _Client:
    task: Task
    ctx: TrainContext
    terms: LocalTerms
    index: int
    examples: int
    steps: int
    position: int


class VectorizedExecutor:
    """Trains each round's clients batched; falls back to sequential (saying why, once) when
    the model, loss or optimiser cannot be batched.

    Args:
        max_memory_mb: memory budget for one batch group; larger rounds are processed in
            groups sized to it.
        device: where the batched computation runs (``executor.device``): the stacked
            parameters, the clients' packed training data (moved once per data set) and the
            scratch model; the batch orders and DP noise are drawn on the CPU as without a GPU,
            and the deltas come back to the CPU.
    """

    name = "vectorized"

    def __init__(self, *, max_memory_mb: float = 1024.0,
                 device: torch.device | str = "cpu") -> None:
        if not max_memory_mb > 0:
            raise ConsortiumError(f"executor.max_memory_mb = {max_memory_mb} must be > 0")
        self.max_memory_mb = max_memory_mb
        self.device = torch.device(device)
        self._sequential = SequentialExecutor(device=self.device)
        self._checked: dict[int, str | None] = {}
        self._module: torch.nn.Module | None = None
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.on_step: Callable[[int, int], None] | None = None
        """Called with (steps done, steps) after each batched step (a baseline's progress)."""

    # -- support -------------------------------------------------------------------------------

    def _reason(self, clients: Mapping[str, SiteClient]) -> str | None:
        key = id(clients)
        if key not in self._checked:
            reason = vectorizable(clients)
            self._checked[key] = reason
            if reason is not None:
                print(
                    f"consortium: the vectorised executor cannot batch this run ({reason}); "
                    "using the sequential executor",
                    file=sys.stderr,
                )
        return self._checked[key]

    # -- training ------------------------------------------------------------------------------

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]) -> Iterator[Result]:
        if not tasks:
            return
        if self._reason(clients) is not None:
            yield from self._sequential.fit(tasks, clients)
            return
        assert isinstance(clients, ClientPool)
        group = self._group_size(clients, tasks[0].parameters.layout)
        for start in range(0, len(tasks), group):
            yield from self._fit_group(tasks[start : start + group], clients)

    def _group_size(self, pool: ClientPool, layout: Layout) -> int:
        d = layout.size
        trainable = trainable_columns(self._scratch(pool), layout)
        d_train = d if trainable is None else len(trainable)
        example = math.prod(pool.packed.train.x.shape[1:])
        activations = self._activation_numel(pool)
        bs = pool.settings.batch_size
        # parameters, momentum, gradient, anchor, offset, their autograd copies (trainable
        # columns only) and the whole delta; the batch and its activations forward and backward
        per_client = 4 * (7 * d_train + d + bs * (example + 3 * activations))
        if pool.settings.local_dp:
            # per-example gradients (float32) and a tensor's float64 copy while clipping;
            # Poisson batches can run to twice the expected size
            per_client += 12 * 2 * bs * d_train
        return max(1, int(self.max_memory_mb * 2**20 // per_client))

    def _activation_numel(self, pool: ClientPool) -> int:
        module = self._scratch(pool)
        total = 0

        def count(_m: torch.nn.Module, _i: object, out: object) -> None:
            nonlocal total
            if isinstance(out, torch.Tensor):
                total += out[0].numel()

        handles = [m.register_forward_hook(count) for m in module.modules()]
        try:
            with torch.no_grad():
                module(pool.packed.train.x[:1].to(self.device))
        finally:
            for h in handles:
                h.remove()
        return total

    def _scratch(self, pool: ClientPool) -> torch.nn.Module:
        if self._module is None:
            self._module = pool.model_factory().to(self.device)
        return self._module

    def _train_data(self, pool: ClientPool) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool's packed training examples and labels on the device (moved once while the
        pool's data stays the same tensor)."""
        x, y = pool.packed.train.x, pool.packed.train.y
        if self.device.type == "cpu":
            return x, y
        if self._data is None or self._data[0] is not x:
            self._data = (x, x.to(self.device), y.to(self.device))
        return self._data[1], self._data[2]

    def _prepare(
        self, tasks: Sequence[Task], pool: ClientPool
    ) -> tuple[list[_Client], dict[int, Result]]:
        sizes = pool.packed.train_sizes()
        module = self._scratch(pool)
        out = []
        refused: dict[int, Result] = {}
        for k, task in enumerate(tasks):
            policy = pool.policy(task.client_id)
            if policy is not None:
                n = int(sizes[pool.packed.index(task.client_id)])
                reason = policy.review(
                    task, pool.state.get(task.client_id), settings=pool.settings, examples=n,
                    own_noise=own_noise(pool.pipeline, task),
                )
                if reason is not None:
                    refused[k] = Result(task.round, task.client_id, None, error=reason, refused=True)
                    continue
            i = pool.packed.index(task.client_id)
            n = int(sizes[i])
            ctx = TrainContext(
                client_id=task.client_id, module=module, global_params=task.parameters,
                data=pool.packed[task.client_id].train, settings=pool.settings,
                loss_fn=pool.loss_fn,
                seed=task.seed, work=task.work, payload=task.payload,
                client_state=pool.state.get(task.client_id),
            )
            terms = pool.algorithm.local_terms(ctx)
            steps = local_steps(n, pool.settings, task.work, terms)
            out.append(_Client(task, ctx, terms, i, n, steps, k))
        return out, refused

    def _fit_group(self, tasks: Sequence[Task], pool: ClientPool) -> Iterator[Result]:
        pool.algorithm.check_settings(pool.settings)
        clients, results = self._prepare(tasks, pool)
        if not clients:
            for k in range(len(tasks)):
                yield results[k]
            return
        ranked = sorted(clients, key=lambda c: -c.steps)
        deltas, losses, failed = self._train(ranked, pool)
        for pos, c in enumerate(ranked):
            k = c.position
            if failed[pos]:
                results[k] = Result(
                    c.task.round, c.task.client_id, None,
                    error=f"the local loss became NaN or infinite; lower algorithm.lr "
                    f"(client {c.task.client_id!r})",
                )
                continue
            local = LocalResult(
                delta=deltas[pos], steps=c.steps, mean_loss=losses[pos] / c.steps,
                examples=c.examples,
            )
            try:
                update = pool.algorithm.make_update(c.ctx, local)
                update = pool.pipeline.client(
                    update, c.task.stage_payloads,
                    ClientContext(
                        c.task.round, c.task.client_id, c.task.seed,
                        pool.sessions.setdefault(c.task.client_id, {}),
                        state=c.ctx.client_state, layout=c.task.parameters.layout,
                    ),
                )
            except ConsortiumError as exc:
                results[k] = Result(c.task.round, c.task.client_id, None, error=str(exc))
                continue
            if pool.policy(c.task.client_id) is not None:  # a site ledger only for its policy
                record_release(c.ctx.client_state, steps=c.steps if pool.settings.local_dp else 0)
            results[k] = Result(c.task.round, c.task.client_id, update)
        for k in range(len(tasks)):
            yield results[k]

    def _train(
        self, ranked: list[_Client], pool: ClientPool
    ) -> tuple[torch.Tensor, list[float], list[bool]]:
        settings = pool.settings
        k = len(ranked)
        dev = self.device  # the flat vectors of the tasks and results stay on the CPU
        cpu_global = ranked[0].task.parameters.vector
        global_vec = cpu_global.to(dev)
        layout = ranked[0].task.parameters.layout
        module = self._scratch(pool)
        # Only the trainable columns are stacked and stepped (frozen ones are constants read
        # from the global model), as torch.optim steps only the parameters it holds.
        trainable = trainable_columns(module, layout)
        frozen_from = None if trainable is None else global_vec

        def cols(v: torch.Tensor) -> torch.Tensor:
            return v if trainable is None else v[..., trainable.to(v.device)]

        # Batch-norm running statistics: stacked per client beside the trainable columns,
        # updated in place by each step's forward pass (train mode), never stepped.
        stat_cols = statistics_columns(module, layout)
        if stat_cols is not None and settings.local_dp:
            raise ConsortiumError(
                "local DP-SGD cannot train a batch-norm model (an example's gradient depends "
                'on its batch); use privacy.mode = "central"'
            )
        module.train()  # batch norm uses batch statistics, as the sequential loop's module
        stack = None if stat_cols is not None else LinearStack.match(
            module, layout, frozen_from=frozen_from
        )
        forward = vmap(_forward_fn(module, layout, frozen_from, statistics=stat_cols is not None))
        bs = settings.batch_size
        s_max = ranked[0].steps
        offsets = pool.packed.train_offsets

        # One index tensor for the whole group: [K, S_max, B], -1 where a client has no example.
        index = torch.full((k, s_max, bs), -1, dtype=torch.int64)
        for pos, c in enumerate(ranked):
            rows = make_batches(c.examples, c.steps, bs, seed=c.task.seed)
            index[pos, : c.steps] = torch.where(rows >= 0, rows + offsets[c.index], rows)
        index = index.to(dev)
        steps = torch.tensor([c.steps for c in ranked])

        starts = torch.stack([
            c.terms.start if c.terms.start is not None else c.task.parameters.vector
            for c in ranked
        ]).to(dev)
        params = cols(starts).clone()
        stats = None if stat_cols is None else {
            name: starts[:, o : o + n].reshape(k, *shape).clone()
            for name, o, n, shape in _layout_spans(layout, statistics_names(module))
        }
        phased = _Phases.of(ranked, settings, cols, s_max)
        if phased is not None:
            phased = phased.to(dev)
        mu = torch.tensor([c.terms.prox_mu for c in ranked], dtype=params.dtype).to(dev)
        use_prox = bool((mu != 0).any())
        anchor = (
            cols(torch.stack([
                c.terms.anchor if c.terms.anchor is not None else cpu_global for c in ranked
            ]).to(dev))
            if use_prox else None
        )
        use_offset = any(c.terms.offset is not None for c in ranked)
        offset = (
            cols(torch.stack([
                c.terms.offset if c.terms.offset is not None else torch.zeros_like(cpu_global)
                for c in ranked
            ]).to(dev))
            if use_offset else None
        )
        momentum, wd, lr = settings.momentum, settings.weight_decay, settings.lr
        buf = torch.zeros_like(params) if momentum else None
        loss_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        failed = torch.zeros(k, dtype=torch.bool, device=dev)
        x_all, y_all = self._train_data(pool)
        private = (
            _PrivateSteps(ranked, pool, module, layout, frozen_from, (x_all, y_all))
            if settings.local_dp else None
        )
        nonempty = torch.zeros(k, dtype=torch.float64, device=dev)

        for s in range(s_max):
            m = int((steps > s).sum())  # the active clients are a prefix of the ranking
            if private is not None:
                per_client, grad, has = private.step(s, m, params[:m])
            else:
                idx = index[:m, s]
                valid = idx >= 0
                safe = idx.clamp(min=0)
                xb, yb = x_all[safe], y_all[safe]
                counts = valid.sum(1)
                if stats is not None:
                    per_client, grad = _normed_loss_and_grad(
                        forward, params[:m], stats, xb, yb, counts
                    )
                elif stack is not None:
                    per_client, grad = stack.loss_and_grad(params[:m], xb, yb, valid, counts)
                else:
                    per_client, grad = _autograd_loss_and_grad(
                        forward, params[:m], xb, yb, valid, counts
                    )
                has = torch.ones(m, dtype=torch.bool, device=dev)
            with torch.no_grad():
                finite = torch.isfinite(per_client) | ~has
                failed[:m] |= ~finite
                loss_sum[:m] += torch.where(finite & has, per_client, 0).double()
                nonempty[:m] += has.double()
                if use_prox:
                    grad += mu[:m, None] * (params[:m] - anchor[:m])  # type: ignore[index]
                if use_offset:
                    grad += offset[:m]  # type: ignore[index]
                if wd:
                    grad += wd * params[:m]
                if phased is not None:  # only the columns of each client's phase step
                    train = phased.columns(s, m)
                    grad = torch.where(train, grad, 0)
                    if buf is not None:  # a phase's momentum starts afresh, as its optimiser
                        fresh = train & phased.starts(s, m)
                        step = torch.where(fresh, grad, momentum * buf[:m] + grad)
                        buf[:m] = torch.where(train, step, buf[:m])
                        params[:m] -= lr * torch.where(train, buf[:m], 0)
                    else:
                        params[:m] -= lr * grad
                elif buf is not None:
                    buf[:m] = grad if s == 0 else momentum * buf[:m] + grad
                    params[:m] -= lr * buf[:m]
                else:
                    params[:m] -= lr * grad
            if self.on_step is not None:
                self.on_step(s + 1, s_max)
        # each client's delta from the model it received: one global model, or (per-client
        # downlink compression, compression.downlink_reference) each task's own
        own = any(c.task.parameters.vector is not cpu_global for c in ranked)
        received = torch.stack([c.task.parameters.vector for c in ranked]) if own else cpu_global
        deltas = (params - cols(received.to(dev))).cpu()  # back to the CPU (no-op there)
        if trainable is not None:  # frozen parameters travel as exact zeros
            deltas = torch.zeros((k, layout.size), dtype=deltas.dtype).index_copy_(
                1, trainable, deltas
            )
        if stats is not None and stat_cols is not None:  # in layout order, as stat_cols
            final = torch.cat([t.reshape(k, -1) for t in stats.values()], dim=1).cpu()
            deltas.index_copy_(1, stat_cols, final - received[..., stat_cols])
        if private is not None:
            # DP-SGD reports the mean over non-empty Poisson batches (as the sequential loop);
            # the caller divides by the step count
            mean = torch.where(nonempty > 0, loss_sum / nonempty.clamp(min=1), float("nan"))
            loss_sum = mean * steps.to(dev).double()
        return deltas, loss_sum.tolist(), failed.tolist()

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]
    ) -> Iterator[EvaluationResult]:
        if not tasks:
            return
        if self._reason(clients) is not None:
            yield from self._sequential.evaluate(tasks, clients)
            return
        assert isinstance(clients, ClientPool)
        yield from _evaluate_packed(tasks, clients, self._scratch(clients))

    def exchange(
        self, stage_name: str, phase: str, messages: Mapping[str, Any],
        clients: Mapping[str, SiteClient], *, round: int,
    ) -> Iterator[tuple[str, Any]]:
        """Interactive phases run in this process, where the clients' sessions are."""
        return exchange_in_process(stage_name, phase, messages, clients, round=round)

    def close(self) -> None:
        self._sequential.close()
        self._module = None


@torch.no_grad()
def _evaluate_packed(
    tasks: Sequence[Task], pool: ClientPool, module: torch.nn.Module
) -> Iterator[EvaluationResult]:
    """Evaluate one global model on many clients' test splits with one forward pass."""
    packed = pool.packed
    tasks[0].parameters.load_into(module)
    module.eval()
    pos = torch.tensor([packed.index(t.client_id) for t in tasks])
    starts, ends = packed.test_offsets[pos], packed.test_offsets[pos + 1]
    sizes = ends - starts
    first = torch.cumsum(sizes, 0) - sizes  # where each client's block starts in the gather
    total = int(sizes.sum())
    seg = torch.repeat_interleave(torch.arange(len(tasks)), sizes)
    if torch.equal(starts, first):  # every client from the first, in order: no gather needed
        x, y = packed.test.x[:total], packed.test.y[:total]
    else:
        rows = torch.repeat_interleave(starts - first, sizes) + torch.arange(total)
        x, y = packed.test.x[rows], packed.test.y[rows]
    device = next(module.parameters()).device  # executor.device; the logits come back
    logits = torch.cat([
        module(x[i : i + 8192].to(device)).to("cpu") for i in range(0, len(x), 8192)
    ]) if len(x) else torch.zeros(0, pool.num_classes)
    ce = F.cross_entropy(logits, y, reduction="none").double()
    correct = (logits.argmax(1) == y).double()
    n = len(tasks)
    c = pool.num_classes
    loss = torch.zeros(n, dtype=torch.float64).index_add_(0, seg, ce)
    acc = torch.zeros(n, dtype=torch.float64).index_add_(0, seg, correct)
    per_class = torch.bincount(seg * c + y, minlength=n * c).view(n, c).double()
    hits = torch.zeros(n * c, dtype=torch.float64).index_add_(0, seg * c + y, correct).view(n, c)
    present = per_class > 0
    recall = torch.where(present, hits / per_class.clamp(min=1), 0).sum(1) / present.sum(1).clamp(min=1)
    # Python numbers once, not a tensor index per client (10,000 clients: seconds per round)
    sizes_l, first_l = sizes.tolist(), first.tolist()
    loss_l, acc_l, recall_l = loss.tolist(), acc.tolist(), recall.tolist()
    for j, task in enumerate(tasks):
        size = sizes_l[j]
        if size == 0:
            yield EvaluationResult(task.round, task.client_id, 0, {})
            continue
        metrics = {
            "loss": loss_l[j] / size,
            "accuracy": acc_l[j] / size,
            "balanced_accuracy": recall_l[j],
        }
        if c == 2:
            block = slice(first_l[j], first_l[j] + size)
            metrics["auc"] = auc_binary(logits[block, 1] - logits[block, 0], y[block])
        yield EvaluationResult(task.round, task.client_id, size, metrics)

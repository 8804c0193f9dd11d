"""IFCA: clustered federated learning — k models on the server, each client trains the best."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from consortium.aggregation.base import Aggregate, ExtraSpec, RoundContext, StageState
from consortium.algorithms.base import LocalResult, TrainContext, train_with
from consortium.client.evaluation import model_outputs
from consortium.client.training import LocalTerms, LocalTraining
from consortium.errors import ConfigError
from consortium.seeds import derive_seed
from consortium.types import Layout, Parameters, Update

if TYPE_CHECKING:
    from consortium.config import ExperimentConfig

__all__ = ["CLUSTER_KEY", "IFCA", "check_experiment", "choose_cluster"]

CLUSTER_KEY = "ifca.cluster"
"""The client-state entry holding the index of the cluster a client last chose (int64, [1])."""

PAYLOAD_KEY = "ifca.clusters"
"""The payload entry: clusters 1..k−1's models, ``[k − 1, d]`` (cluster 0 is the global model)."""

_DELTA = "ifca.delta"
_WEIGHT = "ifca.weight"
_COUNT = "ifca.count"
_EVAL_BATCH = 4096


@dataclass(frozen=True)
class IFCA:
    """Iterative Federated Clustering Algorithm, model-averaging variant.

    Ghosh, Chung, Yin, Ramchandran. "An Efficient Framework for Clustered Federated
    Learning", NeurIPS 2020, Algorithm 2. The server keeps ``k`` models; each round a sampled
    client evaluates every one on its training split (mean loss, model in eval mode), takes the
    lowest (its cluster estimate ĵ; ties go to the lowest index), runs its local epochs from
    model ĵ and sends the change; the server averages the changes within each cluster
    (weighted by examples, as FedAvg) and leaves a cluster nobody chose as it was.

    Seams: cluster 0 *is* the global model (the server optimiser, checkpoint, ``final``
    evaluation and ``model.safetensors`` are its); clusters 1..k−1 are the algorithm's server
    state ``{"clusters": [k − 1, d]}``, checkpointed with the run, and travel to every client
    in the payload (``k`` models downloaded a round: k× FedAvg's download, as in the paper).
    A client sends its delta as the update's delta when it chose cluster 0 (zeros otherwise)
    and, as extras (per-name sums, like FedNova's ``w·a``), ``ifca.delta`` = ``w·Δ`` in row
    ``ĵ − 1`` of a ``[k − 1, d]`` tensor, ``ifca.weight`` = ``w`` one-hot over the ``k``
    clusters and ``ifca.count`` = the one-hot itself. The mean's delta is ``Σ_{ĵ=0} wΔ / Σ w``,
    so cluster 0's mean is that times ``Σ w / W₀``; cluster j's is ``ifca.delta[j−1] / W_j``.
    Under secure aggregation the server learns only these per-cluster sums, never which client
    chose which cluster. Upload: ``k·d + 2k`` values a client (FedAvg: ``d``).

    The clusters' starting models are independent draws of the model, seeded from the run
    seed (:meth:`with_model`; the paper initialises each cluster at random), with frozen
    parameters copied from the initial model. Each client keeps the index of its last choice in
    its client state (:data:`CLUSTER_KEY`, one integer); its own model (personalised
    evaluation) is that cluster's current model, cluster 0 before it first trained.

    Simulation only, as every personalised algorithm for now. The server step of clusters
    1..k−1 is a plain average (server lr 1), and only the update's delta passes through clipping,
    noise, robust rules and attacks, so :func:`check_experiment` refuses other server
    optimisers, DP, robust rules, ``aggregation.update_bound`` and model attacks.

    Attributes:
        clusters: ``k`` (``personalization.clusters``, >= 1; 1 is FedAvg).
        starts: clusters 1..k−1's starting models, ``[k − 1, d]``; ``None`` until
            :meth:`with_model` draws them (required by :meth:`init_server` when ``k > 1``).
    """

    clusters: int = 2
    starts: torch.Tensor | None = field(default=None, compare=False, repr=False)
    name: str = "ifca"
    _latest: dict[str, torch.Tensor] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    """The server's latest cluster models, for personalised evaluation in this process (set by
    :meth:`make_payload` at the start of every round and by :meth:`server_step`)."""

    def __post_init__(self) -> None:
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or self.clusters < 1:
            raise ConfigError(
                f"personalization.clusters = {self.clusters!r} is not allowed; expected an "
                "integer >= 1 (IFCA's number of cluster models; 1 is FedAvg)"
            )
        if self.starts is not None and (self.starts.ndim != 2 or self.starts.shape[0] != self.clusters - 1):
            raise ConfigError(
                f"IFCA with {self.clusters} clusters needs starts of shape [{self.clusters - 1}, d]; "
                f"found {tuple(self.starts.shape)}"
            )

    # -- server -------------------------------------------------------------------------------

    def with_model(
        self, init: Parameters, factory: Callable[[], torch.nn.Module], *, seed: int
    ) -> IFCA:
        """This algorithm with clusters 1..k−1 starting from independent draws of the model:
        cluster ``j`` is ``factory()`` under ``torch.manual_seed(derive_seed(seed, "ifca",
        j))``, its frozen parameters (``requires_grad = False``) set to ``init``'s. Torch's
        global random state is left as it was. Returns ``self`` when ``starts`` is set."""
        if self.starts is not None or self.clusters == 1:
            return self
        from consortium.models.zoo import seeded_model

        rows = []
        with torch.random.fork_rng(devices=[]):
            for j in range(1, self.clusters):
                module = seeded_model(factory, derive_seed(seed, "ifca", j) % 2**31)
                frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
                values = Parameters.from_module(module).tensors()
                own = init.tensors()
                rows.append(torch.cat([
                    (own[s.name] if s.name in frozen else values[s.name]).reshape(-1)
                    for s in init.layout.specs
                ]).to(init.vector.dtype))
        return IFCA(clusters=self.clusters, starts=torch.stack(rows), name=self.name)

    def init_server(self, layout: Layout) -> StageState:
        """``{"clusters": [k − 1, d]}``, from :attr:`starts`.

        Raises:
            ConfigError: ``k > 1`` and no starting models (call :meth:`with_model`), or
                starting models of another size than ``layout``.
        """
        if self.clusters == 1:
            return {"clusters": torch.zeros((0, layout.size))}
        if self.starts is None:
            raise ConfigError(
                "IFCA needs its clusters' starting models: build it with "
                "IFCA(clusters, starts=...) or ifca.with_model(initial_params, model_factory, "
                "seed=...) (a federation built from a config does this)"
            )
        if self.starts.shape[1] != layout.size:
            raise ConfigError(
                f"IFCA's starting models have {self.starts.shape[1]} values, the model has "
                f"{layout.size}; draw them from this model (with_model)"
            )
        return {"clusters": self.starts.clone()}

    def make_payload(self, state: StageState) -> dict[str, torch.Tensor]:
        self._latest["clusters"] = state["clusters"]
        return {PAYLOAD_KEY: state["clusters"]}

    def server_step(
        self, aggregate: Aggregate, state: StageState, ctx: RoundContext
    ) -> tuple[torch.Tensor, StageState]:
        """Cluster 0's mean delta (for the server optimiser) and the other clusters averaged;
        records the round's clients per cluster as ``ifca_cluster_sizes`` in the round's
        metrics (``aggregate.info``)."""
        weights = aggregate.extras[_WEIGHT].double()
        w0 = float(weights[0])
        if w0 == aggregate.weight:  # every update in cluster 0 (always with k = 1): FedAvg's
            delta = aggregate.delta
        elif w0 > 0:
            delta = (aggregate.delta.double() * (aggregate.weight / w0)).to(aggregate.delta.dtype)
        else:
            delta = torch.zeros_like(aggregate.delta)
        clusters = state["clusters"].clone()
        if self.clusters > 1:
            sums = aggregate.extras[_DELTA].reshape(self.clusters - 1, -1).double()
            for j in range(1, self.clusters):
                if float(weights[j]) > 0:  # a cluster nobody chose stays as it was
                    clusters[j - 1] += (sums[j - 1] / weights[j]).to(clusters.dtype)
        counts = aggregate.extras[_COUNT]
        aggregate.info["ifca_cluster_sizes"] = [int(round(float(c))) for c in counts]
        self._latest["clusters"] = clusters
        return delta, {"clusters": clusters}

    # -- client -------------------------------------------------------------------------------

    def check_settings(self, settings: LocalTraining) -> None:
        pass

    def expected_extras(
        self, layout: Layout, settings: LocalTraining, max_weight: float
    ) -> dict[str, ExtraSpec]:
        """``ifca.delta`` (``w·Δ``: unbounded, as a delta), ``ifca.weight`` (``w`` in one of
        ``k`` slots: in ``[0, 1]`` per unit of weight) and ``ifca.count`` (a one-hot)."""
        k = self.clusters
        return {
            _DELTA: ExtraSpec((k - 1, layout.size)),
            _WEIGHT: ExtraSpec((k,), low=0.0, high=1.0, per_weight=True),
            _COUNT: ExtraSpec((k,), low=0.0, high=1.0),
        }

    def local_terms(self, ctx: TrainContext) -> LocalTerms:
        """Choose the cluster (stored in the client state) and start from its model."""
        others = ctx.payload.get(PAYLOAD_KEY)
        candidates = [ctx.global_params.vector]
        if others is not None:
            candidates += list(others)
        chosen = choose_cluster(ctx, candidates)
        ctx.client_state[CLUSTER_KEY] = torch.tensor([chosen], dtype=torch.int64)
        return LocalTerms(start=None if chosen == 0 else candidates[chosen])

    def make_update(self, ctx: TrainContext, result: LocalResult) -> Update:
        """The chosen cluster's delta in the extras (and as the delta for cluster 0)."""
        chosen = int(ctx.client_state[CLUSTER_KEY][0])
        k, d = self.clusters, result.delta.numel()
        weight = float(result.examples)
        if chosen == 0:
            delta = result.delta
        else:  # local − start, from local − global
            delta = result.delta - (ctx.payload[PAYLOAD_KEY][chosen - 1] - ctx.global_params.vector)
        sums = torch.zeros((k - 1, d), dtype=delta.dtype)
        if chosen > 0:
            sums[chosen - 1] = weight * delta
        onehot = torch.zeros(k)
        onehot[chosen] = 1.0
        return Update(
            ctx.client_id, delta if chosen == 0 else torch.zeros_like(delta), weight,
            metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
            extras={_DELTA: sums, _WEIGHT: onehot * weight, _COUNT: onehot},
        )

    def train(self, ctx: TrainContext) -> Update:
        return train_with(self, ctx)

    # -- evaluation and reporting -------------------------------------------------------------

    def own_parameters(self, params: Parameters, state: Mapping[str, torch.Tensor]) -> Parameters:
        """A client's own model: its last chosen cluster's current model (``params``, cluster
        0, before it chose or before the server published its clusters)."""
        chosen = state.get(CLUSTER_KEY)
        clusters = self._latest.get("clusters")
        if chosen is None or int(chosen[0]) == 0 or clusters is None:
            return params
        return params.replace(clusters[int(chosen[0]) - 1].clone())

    def summary(
        self, state: StageState, client_states: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, Any]:
        """``summary.json``'s ``ifca``: ``clusters`` (k), ``sizes`` (how many clients' last
        choice is each cluster), ``unassigned`` (clients that never trained) and
        ``assignment`` (client id -> cluster)."""
        assignment = {
            cid: int(s[CLUSTER_KEY][0]) for cid, s in client_states.items() if CLUSTER_KEY in s
        }
        sizes = [0] * self.clusters
        for j in assignment.values():
            sizes[j] += 1
        return {
            "clusters": self.clusters, "sizes": sizes,
            "unassigned": len(client_states) - len(assignment), "assignment": assignment,
        }


@torch.no_grad()
def choose_cluster(ctx: TrainContext, candidates: list[torch.Tensor]) -> int:
    """The index of the candidate model with the lowest mean loss on the client's training
    split (the model in eval mode; the first on ties; 0 without training data). Leaves
    ``ctx.module`` holding the global model, in the training mode it had."""
    data, module = ctx.data, ctx.module
    if len(data) == 0 or len(candidates) == 1:
        return 0
    was_training = module.training
    module.eval()
    best, best_loss = 0, float("inf")
    try:
        for j, vector in enumerate(candidates):
            ctx.global_params.replace(vector).load_into(module)
            outputs = model_outputs(module, data.x, _EVAL_BATCH)  # on the CPU
            loss = float(ctx.loss_fn(outputs, data.y))
            if loss < best_loss:  # NaN never wins
                best, best_loss = j, loss
    finally:
        ctx.global_params.load_into(module)
        module.train(was_training)
    return best


def check_experiment(cfg: ExperimentConfig) -> None:
    """Raise :class:`ConfigError` for what IFCA does not compose with: its clusters 1..k−1
    travel as extras, which clipping, DP noise, robust rules, ``update_bound`` and model
    attacks do not touch (they act on the update's delta), and they are averaged with server
    lr 1, so a server optimiser would step cluster 0 alone."""
    s, p, agg = cfg.server, cfg.privacy, cfg.aggregation
    if s.optimizer != "sgd" or s.lr not in (0.0, 1.0):
        raise ConfigError(
            f"algorithm.name = \"ifca\" averages each cluster plainly, but server.optimizer = "
            f"{s.optimizer!r} with server.lr = {s.lr} would step cluster 0 alone differently; "
            "set server.optimizer = \"sgd\" and server.lr = 1"
        )
    if p.mode != "none":
        raise ConfigError(
            f"algorithm.name = \"ifca\" with privacy.mode = {p.mode!r} is not supported: the "
            "clusters' sums travel as extras, which central and distributed DP neither clip nor "
            "noise, and local DP-SGD does not cover the cluster choice (a function of the "
            "training data); set privacy.mode = \"none\" (secure aggregation works)"
        )
    if agg.rule != "mean" or agg.update_bound:
        raise ConfigError(
            f"algorithm.name = \"ifca\" needs aggregation.rule = \"mean\" without "
            f"aggregation.update_bound (found rule {agg.rule!r}, update_bound "
            f"{agg.update_bound!r}): robust rules and bounds act on the update's delta, not on "
            "the clusters' sums IFCA sends as extras"
        )
    if cfg.attack.kind != "none":
        from consortium.attacks import make_attack

        if make_attack(cfg.attack.kind, **dict(cfg.attack.params)).kind == "model":
            raise ConfigError(
                f"attack.kind = {cfg.attack.kind!r} rewrites the update's delta only, not the "
                "clusters' sums IFCA sends as extras; simulate IFCA with a data attack "
                "(label-flip, backdoor) or none"
            )

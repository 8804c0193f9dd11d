"""Evaluation of the global model: federated (each client's test split) and central."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from consortium.client.app import SiteClient
from consortium.client.evaluation import (
    client_spread,
    confusion_from_outputs,
    confusion_matrix,
    evaluate_model,
    model_outputs,
    summarise_clients,
)
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.executors.base import Executor
from consortium.messages import Task
from consortium.seeds import derive_seed
from consortium.types import Parameters

__all__ = ["Evaluator", "Probe", "draw_clients", "evaluation_draws", "pps_estimate"]

_OWN = "personalized_"  # a site's own model's metrics in a deployed site's evaluation

Probe = Callable[[torch.nn.Module], dict[str, float]]
"""Extra metrics of the global model computed at the server on each evaluation (e.g. a
backdoor's success rate on triggered test data, in simulation)."""


@dataclass
class Evaluator:
    """Evaluates on every client that has test data, and on the server test set if there is one.

    Federated metrics are weighted means over clients (by test examples) plus the distribution
    across clients (``*_min``, ``*_p10``, ``*_median``); central metrics are prefixed ``central_``.
    Each of ``probes`` adds its own metrics, computed on the global model.

    ``clients`` (``evaluation.clients``): a count >= 1 or a fraction in (0, 1) of the clients
    with test data evaluates, in every round but ``final_round`` (which evaluates all), the
    clients of that many seeded draws with probability proportional to their test examples
    (:func:`draw_clients`); each weighted mean is then estimated from the draws with its
    standard error ``<name>_se`` (:func:`pps_estimate`), and ``evaluated_clients`` counts the
    distinct clients evaluated. 0, or a count >= the clients with test data, evaluates every
    client, and the record is then what it always was.

    Personalised evaluation: with ``personal`` (a personalised algorithm) every evaluation,
    and with ``finetune_steps`` the last one, also evaluates each client's *own* model on its
    test split (:meth:`SiteClient.evaluate_personalized`: the global shared part with its
    personal part, fine-tuned for ``finetune_steps`` local steps in the last round), in this
    process, where the simulated clients' state is (a deployed site evaluates its own model
    and reports it beside the global one's, as ``personalized_<name>``: its state never leaves
    the site). Its metrics are ``personalized_<name>``,
    weighted by test examples as the global ones, in the record and in each client's entry.
    The last evaluation also states the spread of per-client accuracy (each client once):
    ``accuracy_mean``, ``accuracy_std``, ``accuracy_jain`` beside ``accuracy_min`` and
    ``accuracy_p10`` (:func:`~consortium.client.evaluation.client_spread`), and the same
    for ``personalized_accuracy``.

    The last evaluation also keeps, in ``final_confusion``, each evaluated client's confusion
    matrix (``"final"``: the global model; ``"personalized"``: each client's own model), for
    bootstrap intervals over test examples (:func:`~consortium.intervals.bootstrap_ci`). Only
    clients in this process have them: a deployment's test examples stay at the sites.
    """

    model_factory: Callable[[], torch.nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_classes: int
    server_test: Split | None = None
    probes: tuple[Probe, ...] = ()
    clients: float = 0.0
    seed: int = 0
    final_round: int = 0
    personal: bool = False
    finetune_steps: int = 0
    final_confusion: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    final_scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """The last evaluation's ``(scores, labels)`` of the global model at each client in this
    process, for a binary model with two outputs: the log-odds of class 1, as its ``auc``
    ranks them; what a ROC curve and the AUC's bootstrap interval need
    (:mod:`consortium.reporting.clinical`). Empty otherwise and in a deployment."""
    device: torch.device = torch.device("cpu")
    """Where the evaluation's models run (``executor.device``); metrics come back as floats."""

    def evaluate(
        self,
        round: int,
        params: Parameters,
        *,
        executor: Executor,
        clients: Mapping[str, SiteClient],
        online: Sequence[str] | None = None,
    ) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
        """``online``: the clients reachable (the simulated clock's; ``None``: every one)."""
        test_size = getattr(clients, "test_size", None)
        test_sizes = {
            cid: test_size(cid) if test_size else len(clients[cid].data.test) for cid in clients
        }
        eligible = [cid for cid, n in test_sizes.items() if n > 0]
        if online is not None:
            reachable = set(online)
            eligible = [cid for cid in eligible if cid in reachable]
        draws = self._draws(round, eligible, test_sizes)
        drawn = set(draws) if draws is not None else set(eligible)
        tasks = [
            Task(round=round, client_id=cid, parameters=params, seed=0)
            for cid in eligible if cid in drawn
        ]
        per_client: dict[str, dict[str, float]] = {}
        sizes: dict[str, int] = {}
        reported: dict[str, dict[str, float]] = {}  # a deployed site's own model's metrics
        for r in executor.evaluate(tasks, clients):
            per_client[r.client_id] = {k: v for k, v in r.metrics.items() if not k.startswith(_OWN)}
            sizes[r.client_id] = r.num_examples
            own_metrics = {k[len(_OWN):]: v for k, v in r.metrics.items() if k.startswith(_OWN)}
            if own_metrics:
                reported[r.client_id] = own_metrics
        metrics = summarise_clients(per_client, sizes)
        if draws is not None:  # a census has no sampling error to state
            metrics.update(_estimates(draws, per_client, metrics))
        final = round >= self.final_round
        remote = getattr(executor, "name", "") == "remote"
        # a deployment's server holds placeholders, not the sites' test examples
        if final and not remote:
            self.final_confusion = {"final": self._confusions(params, clients, list(per_client))}
        finetune = self.finetune_steps if final else 0
        if self.personal or finetune:
            # remote sites evaluate their own models themselves (their state is there)
            own = reported if remote else self._personalized(
                round, params, clients, list(per_client), finetune, final)
            mine = summarise_clients(own, {cid: sizes[cid] for cid in own})
            if draws is not None:  # estimated from the draws, as the global metrics are
                mine.update(_estimates(draws, own, mine))
                del mine["evaluated_clients"]
            metrics.update({f"personalized_{k}": v for k, v in mine.items()})
            per_client = {
                cid: {**m, **{f"personalized_{k}": v for k, v in own.get(cid, {}).items()}}
                for cid, m in per_client.items()
            }
        if final:
            for name in ("accuracy", "personalized_accuracy"):
                spread = client_spread([m[name] for m in per_client.values() if name in m])
                metrics.update({f"{name}_{k}": spread[k] for k in ("mean", "std", "jain")
                                if k in spread})
        if self.server_test is not None and len(self.server_test) > 0:
            module = self.model_factory().to(self.device)
            params.load_into(module)
            central = evaluate_model(
                module, self.server_test, loss_fn=self.loss_fn, num_classes=self.num_classes
            )
            metrics.update({f"central_{k}": v for k, v in central.items()})
        if self.probes:
            module = self.model_factory()
            params.load_into(module)
            module.eval()
            with torch.no_grad():
                for probe in self.probes:
                    metrics.update(probe(module))
        return metrics, per_client

    def _personalized(
        self, round: int, params: Parameters, clients: Mapping[str, SiteClient],
        client_ids: Sequence[str], finetune_steps: int, final: bool = False,
    ) -> dict[str, dict[str, float]]:
        """Each client's own model on its own test split (fine-tuned first when asked); in
        the ``final`` evaluation, also its confusion matrix in ``final_confusion``."""
        with torch.random.fork_rng(devices=[]):  # building a model draws from torch's RNG
            module = self.model_factory().to(self.device)
        out = {}
        confusions: dict[str, np.ndarray] = {}
        for cid in client_ids:
            task = Task(round=round, client_id=cid, parameters=params,
                        seed=derive_seed(self.seed, "finetune", cid))
            result = clients[cid].evaluate_personalized(
                task, module=module, finetune_steps=finetune_steps
            )
            out[cid] = result.metrics
            test = _local_test(clients[cid])
            if final and test is not None:  # ``module`` now holds the client's own model
                confusions[cid] = confusion_matrix(module, test, num_classes=self.num_classes)
        if final:
            self.final_confusion["personalized"] = confusions
        return out

    def _confusions(
        self, params: Parameters, clients: Mapping[str, SiteClient], client_ids: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The global model's confusion matrix at each client in this process; ``{}`` when
        the clients are remote (their test examples never leave them)."""
        tests = {cid: _local_test(clients[cid]) for cid in client_ids}
        if any(test is None for test in tests.values()):
            return {}
        with torch.random.fork_rng(devices=[]):  # building a model draws from torch's RNG
            module = self.model_factory().to(self.device)
        params.load_into(module)
        module.eval()
        confusions: dict[str, np.ndarray] = {}
        self.final_scores = {}
        with torch.no_grad():
            for cid, test in tests.items():
                if test is None:
                    continue
                confusions[cid], scores = _confusion_and_scores(module, test, self.num_classes)
                if scores is not None:
                    self.final_scores[cid] = scores
        return confusions

    def _draws(
        self, round: int, eligible: list[str], test_sizes: Mapping[str, int]
    ) -> list[str] | None:
        """This round's draws of clients, or ``None`` to evaluate every eligible client."""
        if not self.clients or round >= self.final_round:
            return None
        k = evaluation_draws(self.clients, len(eligible))
        if k >= len(eligible):
            return None
        picks = draw_clients(
            [test_sizes[c] for c in eligible], k, seed=derive_seed(self.seed, "evaluation", round)
        )
        return [eligible[i] for i in picks]


def _confusion_and_scores(
    module: torch.nn.Module, test: Split, num_classes: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """:func:`confusion_matrix` of ``module`` on ``test`` and, for a binary model with two
    outputs, each example's log-odds of class 1 with its label (one forward pass for both)."""
    if len(test) == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64), None
    outputs = model_outputs(module, test.x)
    y = test.y.long()
    confusion = confusion_from_outputs(outputs, y, num_classes=num_classes)
    if num_classes != 2 or outputs.ndim != 2 or outputs.shape[1] != 2:
        return confusion, None
    score = (outputs[:, 1] - outputs[:, 0]).double().numpy()  # as evaluate_model's auc
    return confusion, (score, y.numpy().astype(np.int64))


def _local_test(client: object) -> Split | None:
    """A client's test split when its examples are in this process, else ``None``."""
    test = getattr(getattr(client, "data", None), "test", None)
    return test if isinstance(test, Split) else None


def evaluation_draws(clients: float, population: int) -> int:
    """How many draws ``evaluation.clients`` asks for among ``population`` clients with test
    data: a count as it is, a fraction rounded up (at least one).

    Raises:
        ConfigError: ``clients`` is negative, or >= 1 and not a whole number.
    """
    if clients < 0 or (clients >= 1 and not float(clients).is_integer()):
        raise ConfigError(
            f"evaluation.clients = {clients!r} is not allowed: expected 0 (every client), a "
            "count >= 1, or a fraction in (0, 1)"
        )
    return int(clients) if clients >= 1 else max(1, math.ceil(clients * population))


def draw_clients(sizes: Sequence[int], k: int, *, seed: int) -> list[int]:
    """``k`` indices drawn with replacement, each with probability ``sizeᵢ / Σ size`` (PPS).

    Why not a uniform sample: client test sets are skewed (a few hospitals hold most of the
    rows; synthetic federations are power-law), and the weighted mean of a uniform sample of
    clients is then a ratio estimator whose linearised standard error (Cochran 1977, §6.3)
    understates its spread — measured on Synthetic(1, 1), 300 clients: 73 % of nominal
    95 % intervals held the truth at 100 clients, 44 % at 10. Drawn proportionally to size,
    the weighted mean is a plain mean over the draws, with an exact, unbiased variance
    estimate (10,000 clients: 94 % at 100 draws, 91 % at 30; ``benchmarks/evaluation_sampling.py``).
    The price: large clients are drawn more often, so a sample's cost in rows is larger than
    its share of clients.
    """
    weights = np.asarray(sizes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(len(weights), size=k, replace=True, p=weights / weights.sum())]


def pps_estimate(values: Sequence[float]) -> tuple[float, float]:
    """The weighted mean ``R = Σ mᵢnᵢ / Σ nᵢ`` over all clients, estimated from the metric
    values ``mᵢ`` of ``k`` clients drawn with replacement with probability ``nᵢ / Σ n``
    (:func:`draw_clients`; a client drawn twice counts twice), and its standard error.

    The Hansen–Hurwitz estimator (Hansen & Hurwitz 1943; Cochran 1977, *Sampling Techniques*,
    3rd ed., ch. 9A): with ``pᵢ = nᵢ / X`` and ``X = Σ n`` known, ``Ŷ = (1/k) Σ yᵢ / pᵢ`` with
    ``yᵢ = mᵢnᵢ`` gives ``R̂ = Ŷ / X = (1/k) Σ mᵢ``, unbiased, and its variance estimate
    ``v(Ŷ) = Σ (yᵢ/pᵢ − Ŷ)² / (k(k − 1))`` becomes

        se(R̂) = sqrt( Σ (mᵢ − R̂)² / (k (k − 1)) ),

    also unbiased. Returns NaN for the error of a single draw (no spread to estimate from).
    """
    k = len(values)
    if k == 0:
        return math.nan, math.nan
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if k == 1:
        return mean, math.nan
    return mean, float(math.sqrt(((x - mean) ** 2).sum() / (k * (k - 1))))


def _estimates(
    draws: Sequence[str],
    per_client: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, float | None],
) -> dict[str, float | None]:
    """``evaluated_clients``, and each weighted mean of ``summarise_clients`` replaced by its
    estimate from the draws, with ``<name>_se``. A metric undefined at some clients (AUC on
    one class) is estimated over the draws where it is defined, as its mean leaves them out."""
    out: dict[str, float | None] = {"evaluated_clients": len(per_client)}
    for name in sorted(k for k, v in metrics.items() if v is not None and _is_weighted(k)):
        values = [
            float(per_client[c][name]) for c in draws
            if c in per_client and name in per_client[c] and not math.isnan(per_client[c][name])
        ]
        estimate, se = pps_estimate(values)
        out[name] = estimate
        out[f"{name}_se"] = None if math.isnan(se) else se
    return out


def _is_weighted(name: str) -> bool:
    """``summarise_clients``' weighted means, not its distribution (``_min``, ``_p10`` ...)."""
    return not name.endswith(("_min", "_p10", "_median"))

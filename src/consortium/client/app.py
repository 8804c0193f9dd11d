"""SiteClient: one site's side of a round — train on a task, evaluate the global model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from consortium.aggregation.base import ClientContext, Pipeline
from consortium.algorithms.base import Algorithm, TrainContext, train_with
from consortium.client.environment import SiteEnvironment
from consortium.client.evaluation import evaluate_model
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTraining, train_locally
from consortium.data.base import ClientData
from consortium.errors import ConsortiumError, PipelineError
from consortium.messages import EvaluationResult, Result, Task
from consortium.privacy.policy import SitePolicy, record_release
from consortium.types import Parameters

__all__ = ["SiteClient", "own_noise"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SiteClient:
    """Holds one site's data and runs its tasks. The same code runs in simulation and, behind
    a transport, in a real deployment."""

    def __init__(
        self,
        client_id: str,
        data: ClientData,
        *,
        model_factory: Callable[[], torch.nn.Module],
        algorithm: Algorithm,
        pipeline: Pipeline,
        settings: LocalTraining,
        loss_fn: LossFn,
        num_classes: int,
        state: ClientStateStore,
        policy: SitePolicy | None = None,
        sessions: dict[str, dict[str, Any]] | None = None,
        environment: SiteEnvironment | None = None,
    ) -> None:
        self.client_id = client_id
        self.data = data
        self.model_factory = model_factory
        self.algorithm = algorithm
        self.pipeline = pipeline
        self.settings = settings
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        self.state = state
        self.policy = policy
        self.sessions = sessions if sessions is not None else {}
        """Client id -> the interactive stages' private scratch (never sent, never
        checkpointed); shared by the clients of one pool."""
        self.environment = environment
        """The site's own resources (randomness, identity); ``None`` in a simulation."""

    @property
    def session(self) -> dict[str, Any]:
        """This client's scratch space: stage name -> what that stage keeps between phases."""
        return self.sessions.setdefault(self.client_id, {})

    def respond(self, stage_name: str, phase: str, message: Any, *, round: int) -> Any:
        """Answer one message of an interactive stage (see ``RoundContext.exchange``).

        Raises:
            PipelineError: no stage of this client's pipeline has that name or a ``respond`` half.
        """
        for stage in self.pipeline.stages:
            if stage.name == stage_name and hasattr(stage, "respond"):
                ctx = ClientContext(round, self.client_id, 0, self.session, self.environment)
                return stage.respond(phase, message, ctx)
        raise PipelineError(
            f"client {self.client_id!r} has no interactive stage named {stage_name!r}; the "
            "server and the client must run the same pipeline"
        )

    def fit(self, task: Task, *, module: torch.nn.Module | None = None) -> Result:
        """Train on the task; a ``ConsortiumError`` becomes a :class:`Result` with ``error``."""
        client_state = self.state.get(self.client_id)
        if self.policy is not None:
            reason = self.policy.review(
                task, client_state, settings=self.settings, examples=len(self.data.train),
                deployed=self.environment is not None, own_noise=own_noise(self.pipeline, task),
            )
            if reason is not None:
                return Result(task.round, self.client_id, None, error=reason, refused=True)
        module = module if module is not None else self.model_factory()
        task.parameters.load_into(module)
        ctx = TrainContext(
            client_id=self.client_id,
            module=module,
            global_params=task.parameters,
            data=self.data.train,
            settings=self.settings,
            loss_fn=self.loss_fn,
            seed=task.seed,
            work=task.work,
            payload=task.payload,
            client_state=client_state,
            randomness=self.environment.randomness if self.environment is not None else None,
        )
        try:
            update = train_with(self.algorithm, ctx)
            update = self.pipeline.client(
                update, task.stage_payloads,
                ClientContext(task.round, self.client_id, task.seed, self.session,
                              self.environment, state=client_state,
                              layout=task.parameters.layout),
            )
        except ConsortiumError as exc:
            return Result(task.round, self.client_id, None, error=str(exc))
        allowed = self.environment.send_metrics if self.environment is not None else None
        if allowed is not None:  # the site's policy decides which metrics leave in the clear
            update = dataclasses.replace(
                update, metrics={k: v for k, v in update.metrics.items() if k in allowed}
            )
        if self.policy is not None:  # the site's own ledger exists only for its policy
            steps = int(update.metrics.get("steps", 0)) if self.settings.local_dp else 0
            record_release(client_state, steps=steps)
        return Result(task.round, self.client_id, update)

    def evaluate(self, task: Task, *, module: torch.nn.Module | None = None) -> EvaluationResult:
        """Evaluate the task's global model on this site's test split."""
        module = module if module is not None else self.model_factory()
        task.parameters.load_into(module)
        metrics = evaluate_model(
            module, self.data.test, loss_fn=self.loss_fn, num_classes=self.num_classes
        )
        return EvaluationResult(task.round, self.client_id, len(self.data.test), metrics)

    def own_parameters(self, params: Parameters) -> Parameters:
        """This site's own model: ``params`` with the personal part it keeps (under a
        personalised algorithm), else ``params`` itself."""
        own = getattr(self.algorithm, "own_parameters", None)
        return own(params, self.state.peek(self.client_id)) if own is not None else params

    def evaluate_personalized(
        self, task: Task, *, module: torch.nn.Module | None = None, finetune_steps: int = 0
    ) -> EvaluationResult:
        """Evaluate this site's own model (:meth:`own_parameters` of the task's global model)
        on its test split, after ``finetune_steps`` local SGD steps on its training split
        when asked (seeded by ``task.seed``; plain SGD with the run's local settings, without
        local DP noise: the fine-tuned model never leaves the site, only its metrics do, as
        with every evaluation)."""
        module = module if module is not None else self.model_factory()
        self.own_parameters(task.parameters).load_into(module)
        if finetune_steps > 0 and len(self.data.train) > 0:
            settings = dataclasses.replace(self.settings, dp_clip=0.0, dp_noise=0.0)
            train_locally(module, self.data.train, settings, loss_fn=self.loss_fn,
                          seed=task.seed, steps=finetune_steps)
        metrics = evaluate_model(
            module, self.data.test, loss_fn=self.loss_fn, num_classes=self.num_classes
        )
        return EvaluationResult(task.round, self.client_id, len(self.data.test), metrics)


def own_noise(pipeline: Pipeline, task: Task) -> float | None:
    """Under distributed DP, the noise multiplier of the noise a site adds itself (what its
    budget counts: :meth:`SitePolicy.review`'s ``own_noise``); ``None`` otherwise."""
    for stage in pipeline.stages:
        own = getattr(stage, "own_noise_multiplier", None)
        if own is not None:
            return float(own(task.parameters.vector.numel()))
    return None

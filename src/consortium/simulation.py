"""``simulate``: build a federation from an experiment config and run it in this process."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from consortium.aggregation.base import Pipeline
from consortium.aggregation.bound import bound_updates
from consortium.aggregation.mean import weighted_mean
from consortium.aggregation.optimizers import server_optimizer
from consortium.algorithms import Algorithm, build_algorithm
from consortium.client.pool import ClientPool
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTraining
from consortium.config import ExperimentConfig, load_config, read_toml
from consortium.data.base import FederatedDataset
from consortium.errors import CheckpointError, ConfigError
from consortium.executors import Executor, build_executor
from consortium.models.zoo import check_fits, freeze
from consortium.models.zoo import model_factory as zoo_factory
from consortium.privacy.ledger import LocalPrivacyLedger, PrivacyLedger
from consortium.privacy.plan import (
    distributed_stage,
    plan_central_dp,
    plan_distributed_dp,
    sample_trust,
)
from consortium.privacy.policy import load_policies
from consortium.reporting.callbacks import CallbackList, MetricsLog, ProgressBar, read_metrics
from consortium.reporting.tracking import tracking_callbacks
from consortium.seeds import derive_seed
from consortium.server.baselines import BaselineSetup, local_baseline, pooled_baseline
from consortium.server.checkpoint import Checkpointer, load_checkpoint
from consortium.server.evaluation import Evaluator
from consortium.server.heterogeneity import Dropouts, Stragglers
from consortium.server.loop import RunState, Server
from consortium.server.sampling import Sampler, UniformSampler
from consortium.types import Parameters

if TYPE_CHECKING:
    from consortium.privacy.distributed import DistributedLedger

__all__ = ["SimulationResult", "simulate"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SimulationResult:
    """What a simulation returns: per-round history, the summary, and the final model."""

    config: ExperimentConfig
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    params: Parameters
    model: torch.nn.Module
    run_dir: Path | None = None
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)


class _History:
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        self.records.append(dict(record))


def _resolve_config(config: ExperimentConfig | dict | str | Path | None, overrides: Sequence[str]):
    if isinstance(config, ExperimentConfig):
        if overrides:
            from consortium.config import apply_overrides

            return ExperimentConfig.from_dict(apply_overrides(config.to_dict(), list(overrides)))
        return config
    if isinstance(config, dict):
        from consortium.config import apply_overrides

        return ExperimentConfig.from_dict(apply_overrides(config, list(overrides)))
    return load_config(config, list(overrides))


def simulate(
    config: ExperimentConfig | dict | str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    dataset: FederatedDataset | None = None,
    model: Callable[[], torch.nn.Module] | None = None,
    algorithm: Algorithm | None = None,
    pipeline: Pipeline | None = None,
    sampler: Sampler | None = None,
    executor: Executor | None = None,
    loss_fn: LossFn | None = None,
    callbacks: Sequence[object] = (),
    report: bool = True,
    checkpoint_extras: Callable[[], Mapping[str, Any]] | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
    run_id: str = "",
) -> SimulationResult:
    """Run a federated simulation.

    Args:
        config: an :class:`ExperimentConfig`, a dict, a TOML path, or ``None`` for the embedded
            heart-disease default.
        overrides: ``"section.key=value"`` strings, as ``--set`` on the command line.
        out: run directory to write (``config.toml``, ``metrics.jsonl``, ``summary.json``,
            ``model.safetensors``, ``report.html``, ``checkpoint/``); ``None`` writes nothing.
        resume: a run directory to continue from its last checkpoint (its ``config.toml``
            is used; ``config`` must then be ``None``).
        dataset, model, algorithm, pipeline, sampler, executor, loss_fn: objects that replace
            what the config would build (``model`` is a zero-argument factory).
        callbacks: extra objects with ``on_run_start`` / ``on_round_end`` / ``on_run_end``.
        checkpoint_extras: called after every round; its JSON-able mapping is saved inside
            the checkpoint, atomically with it (read back with
            :func:`~consortium.server.checkpoint.load_checkpoint_extras`).
        on_checkpoint: called with (round, digest) once each checkpoint is written and before
            it takes effect (a deployment records the digest in its audit log).
        run_id: a deployment's run id (``consortium server``): secure aggregation binds its
            keys and signatures to it, and the sites refuse another run's.

    Raises:
        ConsortiumError: any configuration, data, model or checkpoint problem.
    """
    if resume is not None:
        if config is not None:
            raise ConfigError("give either a config or resume=RUN_DIR, not both")
        out = Path(resume)
        if not (out / "config.toml").exists():
            raise CheckpointError(f"{str(out)!r} is not a run directory: it has no config.toml")
        cfg = ExperimentConfig.from_dict(read_toml(out / "config.toml"))
        if overrides:
            raise ConfigError("--set cannot change a run that is resumed; start a new run instead")
    else:
        cfg = _resolve_config(config, overrides)
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and resume is None and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run; resume it with --resume "
            f"{run_dir} or choose another --out"
        )

    if dataset is None:
        from consortium.data import load_dataset

        dataset = load_dataset(cfg.data, seed=cfg.seed)
    clean = dataset  # FLTrust's root data come from the data before any poisoning
    threat = None
    if cfg.attack.kind != "none":  # simulation only: poison the chosen clients' data now
        from consortium.attacks import threat_model

        at = cfg.attack
        threat = threat_model(
            dataset.client_ids, at.kind, fraction=at.fraction, ids=list(at.ids), seed=cfg.seed,
            **dict(at.params),
        )
        dataset = threat.poison(dataset)
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    factory = freeze(model or zoo_factory(
        cfg.model.name, dataset.input_shape, dataset.num_classes, hidden=cfg.model.hidden
    ), cfg.model.freeze)
    torch.manual_seed(derive_seed(cfg.seed, "init") % (2**31))
    init_module = factory()
    check_fits(init_module, dataset.input_shape, dataset.num_classes, name=cfg.model.name)
    init = Parameters.from_module(init_module)

    algorithm = algorithm or build_algorithm(cfg.algorithm.name, mu=cfg.algorithm.mu)
    settings = local_training(cfg)
    plan = plan_central_dp(cfg, len(dataset.clients)) if cfg.privacy.mode == "central" else None
    distributed = plan_distributed_dp(cfg, len(dataset.clients), init.layout.size) if (
        cfg.privacy.mode == "distributed") else None
    s = cfg.server
    stages: list[Any] = [plan.stage] if plan else []
    if distributed is not None:
        stages.append(distributed.stage)
    aggregator: Any = weighted_mean()
    if cfg.aggregation.rule != "mean":
        from consortium.aggregation.robust import make_rule

        rule_params = dict(cfg.aggregation.params)
        if cfg.aggregation.rule == "fltrust":  # the server trains on its own clean root data
            from consortium.server.root import RootTrainer, sample_root_data

            root = sample_root_data(
                clean.packed(), int(rule_params.pop("root_examples", 100)), seed=cfg.seed
            )
            rule_params["root_update"] = RootTrainer(
                root, model_factory=factory, settings=settings, loss_fn=loss_fn,
                num_classes=dataset.num_classes, seed=cfg.seed,
            )
        aggregator = make_rule(cfg.aggregation.rule, **rule_params)
    if cfg.secure_aggregation.enabled:
        quantise, aggregator = secure_aggregation_parts(cfg, algorithm, settings, run_id=run_id,
                                                        sizes=_train_sizes(dataset))
        stages.append(quantise)
    # before the attack's wrapper: a simulated attacker's update is bounded as a real one is
    aggregator = bound_updates(aggregator, cfg.aggregation.update_bound, stages=stages)
    if threat is not None:
        aggregator = threat.wrap(aggregator)
    pipeline = pipeline or Pipeline(
        stages,
        aggregator=aggregator,
        optimizer=server_optimizer(
            s.optimizer, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau
        ),
    )
    sampler = sampler or (
        plan.sampler if plan else distributed.sampler if distributed else
        UniformSampler(cfg.sampling.clients_per_round, cfg.sampling.fraction)
    )
    ledger_path = run_dir / "privacy.json" if run_dir is not None else None
    ledger: PrivacyLedger | LocalPrivacyLedger | DistributedLedger | None = None
    if distributed is not None:
        from consortium.privacy.distributed import DistributedLedger

        ledger = DistributedLedger(
            distributed.stage, init.layout.size, delta=cfg.privacy.delta, path=ledger_path
        )
    elif plan:
        ledger = PrivacyLedger(
            plan.mechanism, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
            path=ledger_path, sample=sample_trust(cfg, sampler),
        )
    elif cfg.privacy.mode == "local":
        sizes = dataset.packed().train_sizes().tolist()
        ledger = LocalPrivacyLedger(
            dict(zip(dataset.client_ids, (int(n) for n in sizes))),
            batch_size=cfg.algorithm.batch_size, noise_multiplier=cfg.privacy.noise_multiplier,
            delta=cfg.privacy.delta, accountant=cfg.privacy.accountant, path=ledger_path,
        )
    per_round = sampler.size(len(dataset.clients)) if hasattr(sampler, "size") else len(dataset.clients)
    check_clients = getattr(pipeline.aggregator, "check_clients", None)
    if check_clients is not None:
        check_clients(per_round)  # a robust rule's f needs enough clients in every round
    e = cfg.executor
    executor = executor or build_executor(
        e.kind, max_memory_mb=e.max_memory_mb, address=e.address, workers=e.workers
    )

    check = getattr(algorithm, "check_settings", None)
    if check is not None:
        check(settings)  # fail before round 1, not inside every client
    store = ClientStateStore()
    history: list[dict[str, Any]] = []
    state: RunState | None = None
    if resume is not None:
        state, store = load_checkpoint(  # checked: finite float32 of this model, round in range
            run_dir / "checkpoint", layout=init.layout, rounds=cfg.rounds  # type: ignore[operator]
        )
        log = MetricsLog(run_dir / "metrics.jsonl")  # type: ignore[operator]
        log.truncate_after(state.round)
        history = read_metrics(log.path) if log.path.exists() else []
        if ledger is not None:
            ledger.resume(state.round)

    clients = ClientPool(
        dataset.packed(), model_factory=factory, algorithm=algorithm, pipeline=pipeline,
        settings=settings, loss_fn=loss_fn, num_classes=dataset.num_classes, state=store,
        policies=load_policies(cfg.privacy.site_policies) if cfg.privacy.site_policies else None,
    )
    probe = threat.probe(dataset) if threat is not None else None
    evaluator = Evaluator(
        factory, loss_fn, dataset.num_classes, dataset.server_test,
        probes=(probe,) if probe is not None else (),
        clients=cfg.evaluation.clients, seed=cfg.seed, final_round=cfg.rounds,
    )

    cbs: list[object] = [_History(history)] + ([ledger] if ledger is not None else [])
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
        cbs += [MetricsLog(run_dir / "metrics.jsonl"), Checkpointer(run_dir / "checkpoint", store, checkpoint_extras, on_checkpoint)]
    if progress:
        cbs.append(ProgressBar(cfg.name))
    cbs += tracking_callbacks(cfg, run_dir)
    cbs += list(callbacks)
    callback_list = CallbackList(cbs)

    server = Server(
        clients=clients, algorithm=algorithm, pipeline=pipeline, sampler=sampler,
        executor=executor, evaluator=evaluator, seed=cfg.seed,
        stragglers=Stragglers(cfg.simulation.stragglers),
        dropouts=Dropouts.of(cfg.simulation.dropout, pipeline), callbacks=callback_list,
        eval_every=cfg.evaluation.every,
    )
    if state is None:
        state = server.init_state(init)
    before_s = sum(float(r.get("wall_s") or 0.0) for r in history)
    started = time.perf_counter()
    try:
        state = server.run(state, rounds=cfg.rounds)
    finally:
        executor.close()

    baselines: dict[str, dict[str, Any]] = {}
    for name in cfg.evaluation.baselines:
        setup = BaselineSetup(factory, init, settings, loss_fn, cfg.rounds, cfg.seed)
        if name == "local":
            metrics, _ = local_baseline(dataset, setup)
        else:
            metrics, _ = pooled_baseline(dataset, setup, per_round_clients=per_round)
        baselines[name] = {k: v for k, v in metrics.items()}

    final = dict(state.last_metrics)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "rounds": state.round,
        "final": final,
        "privacy": ledger.summary() if ledger is not None else {
            "epsilon": None, "delta": None, "accountant": None,
        },
        "baselines": baselines,
        "per_client": state.per_client,
        # A resumed run adds the rounds before the stop (their wall time is in the log).
        "duration_s": before_s + (time.perf_counter() - started),
        "algorithm": algorithm.name,
        "pipeline": pipeline.describe(),
        "clients": len(dataset.clients),
    }
    if threat is not None:
        summary["attack"] = threat.describe()
    final_model = factory()
    state.params.load_into(final_model)
    if run_dir is not None:
        _write_outputs(run_dir, summary, state.params, report=report)
    callback_list.on_run_end(summary)
    return SimulationResult(
        config=cfg, history=history, summary=summary, params=state.params, model=final_model,
        run_dir=run_dir, per_client=state.per_client,
    )


def _train_sizes(dataset: FederatedDataset) -> dict[str, int]:
    """Each client's training examples (a deployment's placeholder: the roster's num_train)."""
    return dict(zip(dataset.client_ids, (int(n) for n in dataset.packed().train_sizes())))


def secure_aggregation_parts(
    cfg: ExperimentConfig, algorithm: Algorithm, settings: LocalTraining, *, run_id: str = "",
    sizes: Mapping[str, int] | None = None,
) -> tuple[Any, Any]:
    """Secure aggregation's client stage and aggregator for an experiment (see
    ``[secure_aggregation]``); ``run_id`` binds a deployment's keys to its run (the sites
    check it). ``sizes`` (each client's training examples, as the server knows them) become
    the weights the server checks the secure weight sum against: a client's weight is its
    examples, or 1 under central and distributed DP, whose client halves send weight 1."""
    from consortium.secagg.stage import secure_aggregation

    sa = cfg.secure_aggregation
    bounds_of = getattr(algorithm, "secure_bounds", None)
    bounds = dict(bounds_of(settings, sa.weight_bound)) if bounds_of else {}
    if sa.extras_bound > 0:
        bounds = dict.fromkeys(bounds, sa.extras_bound)
    unit = cfg.privacy.mode in ("central", "distributed")
    weights = {c: 1.0 if unit else float(n) for c, n in (sizes or {}).items()}
    return secure_aggregation(
        clip=sa.clip, bits=sa.bits, weight_bound=sa.weight_bound, threshold=sa.threshold,
        neighbours=sa.neighbours, extra_bounds=bounds, run_id=run_id,
        authenticate=sa.authenticate, integer=cfg.privacy.mode == "distributed", weights=weights,
    )


def site_pipeline(cfg: ExperimentConfig, algorithm: Algorithm, settings: LocalTraining) -> Pipeline:
    """The pipeline a deployed site runs: the same stages, in the same order, as the server's
    (their client halves and ``respond``); the server's aggregator is not needed here.

    Central DP's client half reads its clip norm from the task's payload, so the stage's own
    noise settings do not matter at the site. Distributed DP's stage is built from the
    config the site approved: its noise scale is the site's own reading of it.
    """
    from consortium.privacy.central import CentralDP

    stages: list[Any] = []
    if cfg.privacy.mode == "central":
        stages.append(CentralDP(noise_multiplier=cfg.privacy.noise_multiplier or 1.0,
                                clip=cfg.privacy.clip))
    if cfg.privacy.mode == "distributed":
        stages.append(distributed_stage(cfg))
    if cfg.secure_aggregation.enabled:
        # a deployed site signs with its own certificate, never with a simulated CA
        sa = dataclasses.replace(cfg.secure_aggregation, authenticate=False)
        stages.append(secure_aggregation_parts(cfg.replace(secure_aggregation=sa), algorithm,
                                               settings)[0])
    return Pipeline(stages)


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """The clients' local-training settings of an experiment (the same at every site)."""
    a = cfg.algorithm
    return LocalTraining(
        epochs=a.local_epochs, steps=a.local_steps, batch_size=a.batch_size, lr=a.lr,
        optimizer=a.optimizer, momentum=a.momentum, weight_decay=a.weight_decay,
        dp_clip=cfg.privacy.clip if cfg.privacy.mode == "local" else 0.0,
        dp_noise=cfg.privacy.noise_multiplier if cfg.privacy.mode == "local" else 0.0,
    )


def _write_outputs(run_dir: Path, summary: dict[str, Any], params: Parameters, *, report: bool) -> None:
    from safetensors.torch import save_file

    (run_dir / "summary.json").write_text(
        json.dumps(_finite(summary), indent=2), encoding="utf-8"
    )
    save_file({k: v.contiguous() for k, v in params.tensors().items()}, str(run_dir / "model.safetensors"))
    if report:
        from consortium.reporting.report import write_report

        write_report(run_dir)


def _finite(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

"""The composition root: one builder per config section, run in one ordered place.

``simulate`` and a deployed site both build their parts here, so a stage the server adds is a
stage every site adds, in the same order (:func:`client_stages` is the one list of them). A
new capability plugs in as a builder: a function that reads the config and the parts built
before it, sets its own part of the :class:`Federation`, and takes its place in
:data:`BUILDERS`; the round loop and ``simulate`` do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from consortium.aggregation.base import Pipeline
from consortium.algorithms import Algorithm, build_algorithm
from consortium.client.state import ClientStateStore
from consortium.client.training import LocalTraining
from consortium.config import ExperimentConfig
from consortium.data.base import FederatedDataset
from consortium.errors import ConfigError
from consortium.executors import Executor
from consortium.executors.device import resolve_device
from consortium.privacy.plan import DistributedPlan, PrivacyPlan, distributed_stage
from consortium.server.loop import RunState, Server
from consortium.server.sampling import Sampler
from consortium.types import Parameters

__all__ = [
    "BUILDERS", "Federation", "Given", "assemble", "client_stages", "local_training",
    "secure_aggregation_parts", "site_pipeline",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Given:
    """What the caller supplies instead of (or besides) what the config would build."""

    dataset: FederatedDataset | None = None
    model: Callable[[], torch.nn.Module] | None = None
    algorithm: Algorithm | None = None
    pipeline: Pipeline | None = None
    sampler: Sampler | None = None
    executor: Executor | None = None
    loss_fn: LossFn | None = None
    callbacks: Sequence[object] = ()
    run_dir: Path | None = None
    resume: bool = False
    progress: bool = False
    console: Any = None
    """The run's :class:`~consortium.reporting.callbacks.Console` (its rounds' phase), or
    ``None``: the progress display makes its own."""
    checkpoint_extras: Callable[[], Mapping[str, Any]] | None = None
    on_checkpoint: Callable[[int, str], None] | None = None
    run_id: str = ""
    on_assembled: Callable[[Federation], None] | None = None
    """Called with the assembled run before round 1 (a deployment's changing roster reaches
    the client pool and the ledger through it: deploy/roster.py)."""


@dataclass
class Federation:
    """Everything one run is made of; each field is set by the builder named beside it."""

    cfg: ExperimentConfig
    given: Given
    dataset: FederatedDataset = field(init=False)  # build_data
    clean: FederatedDataset = field(init=False)  # build_data: before any poisoning
    threat: Any = field(init=False)  # build_data: the simulated attack, or None
    loss_fn: LossFn = field(init=False)  # build_model
    factory: Callable[[], torch.nn.Module] = field(init=False)  # build_model
    init: Parameters = field(init=False)  # build_model
    algorithm: Algorithm = field(init=False)  # build_algorithm
    settings: LocalTraining = field(init=False)  # build_algorithm
    central: PrivacyPlan | None = field(init=False)  # build_privacy
    distributed: DistributedPlan | None = field(init=False)  # build_privacy
    stages: list[Any] = field(init=False)  # build_client_stages
    secure_sum: Any = field(init=False)  # build_client_stages: SecAgg's server half, or None
    aggregator: Any = field(init=False)  # build_aggregation
    pipeline: Pipeline = field(init=False)  # build_pipeline; build_frozen wraps its optimiser
    sampler: Sampler = field(init=False)  # build_sampler
    per_round: int = field(init=False)  # build_sampler
    ledger: Any = field(init=False)  # build_ledger: a privacy ledger, or None
    executor: Executor = field(init=False)  # build_executor
    store: ClientStateStore = field(init=False)  # build_resume
    state: RunState | None = field(init=False)  # build_resume: None starts from init
    history: list[dict[str, Any]] = field(init=False)  # build_resume
    callbacks: Any = field(init=False)  # build_callbacks: a CallbackList
    contribution: Any = field(init=False)  # build_contribution: a recorder, or None
    server: Server = field(init=False)  # build_server


# -- builders, in the order they run -------------------------------------------------------


def build_data(f: Federation) -> None:
    """The federated dataset; a simulated attack poisons its clients' data here (the clean
    copy stays for FLTrust's root data)."""
    cfg = f.cfg
    if f.given.dataset is not None:
        dataset = f.given.dataset
    else:
        from consortium.data import load_dataset
        from consortium.data.preprocess import category_min_count

        # a category is named only if a site holds it min_count times, as a deployed site does
        dataset = load_dataset(cfg.data, seed=cfg.seed,
                               min_count=category_min_count(analysis=cfg.analysis.min_count),
                               evaluation=cfg.evaluation, fairness=cfg.fairness)
    f.clean, f.threat = dataset, None
    if cfg.attack.kind != "none":
        from consortium.attacks import threat_model

        at = cfg.attack
        f.threat = threat_model(
            dataset.client_ids, at.kind, fraction=at.fraction, ids=list(at.ids), seed=cfg.seed,
            **dict(at.params),
        )
        dataset = f.threat.poison(dataset)
    f.dataset = dataset
    if f.given.dataset is None:  # a deployment's roster (a given data set) decides for itself
        from consortium.config import fit_default_cohort

        # the demo's clients_per_round (a default, not the user's) on a smaller federation: all
        f.cfg = fit_default_cohort(cfg, len(dataset.clients))


def build_model(f: Federation) -> None:
    """The model factory (with ``model.freeze``) and the initial parameters, seeded from the
    run seed so that every run of a config starts from the same model."""
    from consortium.models.zoo import check_fits, check_local_dp, freeze, seeded_model
    from consortium.models.zoo import model_factory as zoo_factory

    cfg, ds = f.cfg, f.dataset
    f.loss_fn = f.given.loss_fn or torch.nn.functional.cross_entropy
    f.factory = freeze(f.given.model or zoo_factory(
        cfg.model.name, ds.input_shape, ds.num_classes, hidden=cfg.model.hidden,
        peft=cfg.model.peft,
    ), cfg.model.freeze)
    module = seeded_model(f.factory, derive_init_seed(cfg))
    check_fits(module, ds.input_shape, ds.num_classes, name=cfg.model.name)
    check_local_dp(module, local_dp=cfg.privacy.mode == "local")  # batch norm: refused
    f.init = Parameters.from_module(module)


def derive_init_seed(cfg: ExperimentConfig) -> int:
    """The torch seed the initial model is drawn with."""
    from consortium.seeds import derive_seed

    return derive_seed(cfg.seed, "init") % (2**31)


def build_algorithm_parts(f: Federation) -> None:
    """The federated algorithm (with ``[personalization]``'s personal layers for fedper and
    fedrep) and the clients' local-training settings."""
    pz = f.cfg.personalization
    f.algorithm = f.given.algorithm or build_algorithm(
        f.cfg.algorithm.name, mu=f.cfg.algorithm.mu, local_layers=pz.local_layers,
        local_count=pz.local_count, head_epochs=pz.head_epochs, q=f.cfg.algorithm.q,
        ditto_lambda=pz.ditto_lambda, personal_steps=pz.personal_steps,
        apfl_alpha=pz.apfl_alpha, clusters=pz.clusters,
    )
    check_model = getattr(f.algorithm, "check_model", None)
    if check_model is not None:  # a model the algorithm cannot train (APFL and batch norm)
        with torch.random.fork_rng(devices=[]):
            check_model(f.factory())
    with_model = getattr(f.algorithm, "with_model", None)
    if with_model is not None:  # server state that starts from models (IFCA's clusters)
        f.algorithm = with_model(f.init, f.factory, seed=f.cfg.seed)
    f.settings = local_training(f.cfg)


def build_privacy(f: Federation) -> None:
    """Central or distributed DP's plan (stage, matching sampler, mechanism); local DP lives
    in the training settings and the ledger."""
    from consortium.privacy.plan import plan_central_dp, plan_distributed_dp

    mode, n = f.cfg.privacy.mode, len(f.dataset.clients)
    f.central = plan_central_dp(f.cfg, n) if mode == "central" else None
    f.distributed = plan_distributed_dp(f.cfg, n, f.init.layout.size) if (
        mode == "distributed") else None


def build_client_stages(f: Federation) -> None:
    """The server's stages: :func:`client_stages`, the same list every site builds."""
    f.stages, f.secure_sum = client_stages(
        f.cfg, f.algorithm, f.settings, central=f.central, distributed=f.distributed,
        run_id=f.given.run_id,
        sizes=_train_sizes(f.dataset) if f.cfg.secure_aggregation.enabled else None,
    )


def build_aggregation(f: Federation) -> None:
    """The aggregator: the mean or a robust rule (FLTrust with its root trainer), SecAgg's
    secure sum when enabled, bounded by ``aggregation.update_bound``, and the simulated
    attacker's wrapper outermost."""
    from consortium.aggregation.bound import bound_updates
    from consortium.aggregation.mean import weighted_mean

    cfg = f.cfg
    aggregator: Any = weighted_mean() if cfg.aggregation.rule == "mean" else _robust_rule(f)
    if f.secure_sum is not None:
        aggregator = f.secure_sum
    if "fairfed" in cfg.fairness.method:  # FairFed's weights (Ezzeldin et al., AAAI 2023)
        from consortium.aggregation.fairfed import fairfed_weights

        aggregator = fairfed_weights(aggregator, f.dataset, f.factory,
                                     column=cfg.fairness.column, beta=cfg.fairness.beta)
    # before the attack's wrapper: a simulated attacker's update is bounded as a real one is
    aggregator = bound_updates(aggregator, cfg.aggregation.update_bound, stages=f.stages)
    f.aggregator = f.threat.wrap(aggregator) if f.threat is not None else aggregator


def _robust_rule(f: Federation) -> Any:
    from consortium.aggregation.robust import make_rule

    cfg = f.cfg
    params = dict(cfg.aggregation.params)
    if cfg.aggregation.rule == "fltrust":  # the server trains on its own clean root data
        from consortium.server.root import RootTrainer, sample_root_data

        root = sample_root_data(
            f.clean.packed(), int(params.pop("root_examples", 100)), seed=cfg.seed
        )
        params["root_update"] = RootTrainer(
            root, model_factory=f.factory, settings=f.settings, loss_fn=f.loss_fn,
            num_classes=f.dataset.num_classes, seed=cfg.seed,
        )
    return make_rule(cfg.aggregation.rule, **params)


def build_pipeline(f: Federation) -> None:
    """Stages + aggregator + the server optimiser (``[server]``), unless one is given."""
    from consortium.aggregation.optimizers import server_optimizer

    s = f.cfg.server
    f.pipeline = f.given.pipeline or Pipeline(
        f.stages, aggregator=f.aggregator,
        optimizer=server_optimizer(
            s.optimizer, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau
        ),
    )


def build_frozen(f: Federation) -> None:
    """A model with frozen parameters (``requires_grad = False``) gets a server optimiser that
    keeps them bit-identical (:func:`~consortium.aggregation.frozen.keep_frozen`): no server-side
    noise (central DP, distributed DP, SecAgg's rounding) and no site's delta moves them. The
    mask is post-processing of the released aggregate, so DP guarantees are unchanged; a model
    without frozen parameters keeps its pipeline as it is. A personalised algorithm's personal
    coordinates (each client keeps its own; the global copy is only their starting point) are
    kept the same way."""
    from consortium.aggregation.frozen import frozen_mask, keep_frozen

    with torch.random.fork_rng(devices=[]):  # the run's torch RNG stays as build_model left it
        mask = frozen_mask(f.factory(), f.init.layout)
    personal_mask = getattr(f.algorithm, "personal_mask", None)
    if personal_mask is not None:
        personal = personal_mask(f.init.layout)
        mask = personal if mask is None else mask | personal
    if mask is not None:
        p = f.pipeline
        f.pipeline = Pipeline(
            p.stages, aggregator=p.aggregator, optimizer=keep_frozen(p.optimizer, mask)
        )


def build_sampler(f: Federation) -> None:
    """DP's sampler when a DP plan sets one (the accountant assumes it), else ``[sampling]``;
    a robust rule's ``f`` is checked against the cohort size here, before round 1."""
    from consortium.server.sampling import UniformSampler

    plan = f.central or f.distributed
    f.sampler = f.given.sampler or (plan.sampler if plan is not None else UniformSampler(
        f.cfg.sampling.clients_per_round, f.cfg.sampling.fraction
    ))
    if f.cfg.sampling.cycle and f.given.sampler is None:  # FLamby's Cyclic (issue 21)
        from consortium.algorithms.cyclic import cyclic_sampler

        s, srv = f.cfg.sampling, f.cfg.server
        f.sampler = cyclic_sampler(s.cycle, server_optimizer=srv.optimizer, server_lr=srv.lr,
                                   clients_per_round=s.clients_per_round, fraction=s.fraction,
                                   dp_sampler=plan is not None)
    n = len(f.dataset.clients)
    f.per_round = f.sampler.size(n) if hasattr(f.sampler, "size") else n
    check_clients = getattr(f.pipeline.aggregator, "check_clients", None)
    if check_clients is not None:
        check_clients(f.per_round)


def build_ledger(f: Federation) -> None:
    """The privacy ledger of the DP mode (written to ``privacy.json`` in the run directory)."""
    from consortium.privacy.ledger import LocalPrivacyLedger, PrivacyLedger
    from consortium.privacy.plan import sample_trust

    p, run_dir = f.cfg.privacy, f.given.run_dir
    path = run_dir / "privacy.json" if run_dir is not None else None
    from consortium.privacy.reading import check_delta

    check_delta(p.mode, p.delta, sites=len(f.dataset.clients),  # δ < 1/n (issue 20)
                records=list(_train_sizes(f.dataset).values()) if p.mode == "local" else [])
    f.ledger = None
    if f.distributed is not None:
        from consortium.privacy.distributed import DistributedLedger

        f.ledger = DistributedLedger(
            f.distributed.stage, f.init.layout.size, delta=p.delta, path=path
        )
    elif f.central is not None:
        f.ledger = PrivacyLedger(
            f.central.mechanism, delta=p.delta, accountant=p.accountant, path=path,
            sample=sample_trust(f.cfg, f.sampler),
        )
    elif p.mode == "local":
        f.ledger = LocalPrivacyLedger(
            _train_sizes(f.dataset), batch_size=f.cfg.algorithm.batch_size,
            noise_multiplier=p.noise_multiplier, delta=p.delta, accountant=p.accountant,
            path=path,
        )


def build_executor_part(f: Federation) -> None:
    """Where clients train (``[executor]``), unless one is given."""
    from consortium.executors import build_executor

    e = f.cfg.executor
    f.executor = f.given.executor or build_executor(
        e.kind, max_memory_mb=e.max_memory_mb, address=e.address, workers=e.workers,
        device=e.device,
    )


def build_resume(f: Federation) -> None:
    """Client state, and when resuming, the checkpoint's state and the metrics before it."""
    from consortium.reporting.callbacks import MetricsLog, read_metrics
    from consortium.server.checkpoint import load_checkpoint

    check = getattr(f.algorithm, "check_settings", None)
    if check is not None:
        check(f.settings)  # fail before round 1, not inside every client
    f.store, f.state, f.history = ClientStateStore(), None, []
    run_dir = f.given.run_dir
    if f.given.resume and run_dir is not None:
        f.state, f.store = load_checkpoint(  # checked: finite float32 of this model, round ok
            run_dir / "checkpoint", layout=f.init.layout, rounds=f.cfg.rounds
        )
        log = MetricsLog(run_dir / "metrics.jsonl")
        log.truncate_after(f.state.round)
        f.history = read_metrics(log.path) if log.path.exists() else []
        if f.history:  # the simulated clock's time is the last round's (server.clock)
            f.state.sim_time_s = float(f.history[-1].get("sim_time_s") or 0.0)
        if f.ledger is not None:
            f.ledger.resume(f.state.round)


def build_callbacks(f: Federation) -> None:
    """History, ledger, run-directory files (metrics, checkpoints), progress, ``[tracking]``
    and the caller's callbacks, in that order; a new run's ``config.toml`` is written here."""
    from consortium.reporting.callbacks import CallbackList, MetricsLog, ProgressBar
    from consortium.reporting.tracking import tracking_callbacks
    from consortium.server.checkpoint import Checkpointer

    g, run_dir = f.given, f.given.run_dir
    cbs: list[object] = [_History(f.history)] + ([f.ledger] if f.ledger is not None else [])
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not g.resume:
            (run_dir / "config.toml").write_text(f.cfg.to_toml(), encoding="utf-8")
        cbs += [MetricsLog(run_dir / "metrics.jsonl"),
                Checkpointer(run_dir / "checkpoint", f.store, g.checkpoint_extras, g.on_checkpoint)]
    if g.progress:
        cbs.append(ProgressBar(f.cfg.name, console=g.console))
    cbs += tracking_callbacks(f.cfg, run_dir)
    f.callbacks = CallbackList(cbs + list(g.callbacks))


def build_contribution(f: Federation) -> None:
    """``[contribution]``: records each round's updates and scores the sites
    (:func:`consortium.contribution.build.build_contribution`)."""
    from consortium.contribution.build import build_contribution as build

    build(f)


def build_server(f: Federation) -> None:
    """The client pool, the evaluator (with the attack's probe) and the round loop."""
    from consortium.client.pool import ClientPool
    from consortium.compression.downlink import downlink_compressor
    from consortium.privacy.policy import load_policies
    from consortium.server.evaluation import Evaluator
    from consortium.server.heterogeneity import Dropouts, Stragglers

    cfg, ds = f.cfg, f.dataset
    personal = hasattr(f.algorithm, "own_parameters")
    if personal and f.executor.name == "remote" and f.algorithm.name not in REMOTE_PERSONAL:
        raise ConfigError(
            f"algorithm.name = {f.algorithm.name!r} keeps a model of each client's own, which "
            "runs in simulation only in this version (over gRPC: "
            f"{', '.join(sorted(REMOTE_PERSONAL))}); run it with `consortium run`"
        )
    if cfg.data.validation and f.executor.name == "remote":
        raise ConfigError(
            f"data.validation = {cfg.data.validation:g} is for simulation only (a deployed site "
            "splits its own file into train and test); tune with `consortium run`, then set "
            "data.validation = 0 to deploy"
        )
    if cfg.data.validation and ds.notes.get("evaluated_on") != "validation":
        raise ConfigError(
            f"data.validation = {cfg.data.validation:g} splits data that consortium loads, but "
            "this run was given its data set; split it yourself "
            "(consortium.data.validation.validation_split) or set data.validation = 0"
        )
    if (cfg.evaluation.groups or cfg.fairness.method != "none") and f.executor.name == "remote":
        raise ConfigError(
            "evaluation.groups and [fairness] run in simulation only in this version (each "
            "site would have to keep its group labels aside, report per-group counts and "
            "resample its own rows: not built yet); remove them to deploy, or run the "
            "experiment with `consortium run`"
        )
    clients = ClientPool(
        ds.packed(), model_factory=f.factory, algorithm=f.algorithm, pipeline=f.pipeline,
        settings=f.settings, loss_fn=f.loss_fn, num_classes=ds.num_classes, state=f.store,
        policies=load_policies(cfg.privacy.site_policies) if cfg.privacy.site_policies else None,
    )
    probe = f.threat.probe(ds) if f.threat is not None else None
    evaluator = Evaluator(
        f.factory, f.loss_fn, ds.num_classes, ds.server_test,
        probes=(probe,) if probe is not None else (),
        clients=cfg.evaluation.clients, seed=cfg.seed, final_round=cfg.rounds,
        personal=personal,
        finetune_steps=cfg.personalization.finetune_steps,
        device=resolve_device(cfg.executor.device, announce=False),
    )
    f.server = Server(
        clients=clients, algorithm=f.algorithm, pipeline=f.pipeline, sampler=f.sampler,
        executor=f.executor, evaluator=evaluator, seed=cfg.seed,
        stragglers=Stragglers(cfg.simulation.stragglers),
        dropouts=Dropouts.of(cfg.simulation.dropout, f.pipeline), callbacks=f.callbacks,
        eval_every=cfg.evaluation.every,
        downlink=downlink_compressor(cfg, deployed=f.executor.name == "remote"),
        clock=simulated_clock(cfg, ds, f.settings, remote=f.executor.name == "remote",
                              layout=f.init.layout),
    )


def simulated_clock(cfg: ExperimentConfig, dataset: FederatedDataset, settings: LocalTraining,
                    *, remote: bool = False, layout: Any = None) -> Any:
    """The simulated clock of ``[simulation]`` (availability, speeds), ``server.deadline_s``,
    ``server.min_results`` and ``sampling.over_select`` (:mod:`consortium.server.clock`);
    ``None`` for a deployment, whose sites keep real time. ``layout``: the model's, whose
    size under ``[compression] uplink`` gives the upload's bytes (:func:`_encoded_upload`).

    Raises:
        ConfigError: a deployment asked for a simulated trace, deadline or over-selection.
    """
    from consortium.server.clock import Clock
    from consortium.server.traces import make_availability, make_profiles

    sim = cfg.simulation
    if remote:
        asked = [k for k, v in (("simulation.availability", sim.availability != "always"),
                                ("simulation.speeds", sim.speeds != "uniform"),
                                ("simulation.slow_fraction", sim.slow_fraction > 0),
                                ("server.deadline_s", cfg.server.deadline_s > 0),
                                ("sampling.over_select", cfg.sampling.over_select > 0)) if v]
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} drive(s) the simulated clock, for simulation only: real "
                "sites come and go by themselves; remove them to deploy (consortium server "
                "has --round-timeout, --min-results and --over-select)")
        return None
    packed = dataset.packed()
    ids = list(packed.client_ids)
    return Clock(
        make_profiles(ids, sim, seed=cfg.seed), make_availability(ids, sim, seed=cfg.seed),
        train_sizes=packed.train_sizes().numpy(), batch_size=settings.batch_size,
        epochs=settings.epochs, steps=settings.steps, deadline=cfg.server.deadline_s,
        over_select=cfg.sampling.over_select, min_results=cfg.server.min_results,
        upload=_encoded_upload(cfg, layout), evaluate_offline=cfg.evaluation.include_offline,
    )


def _encoded_upload(cfg: ExperimentConfig, layout: Any) -> int:
    """Bytes of a delta under ``[compression] uplink``, measured by encoding a random vector
    of the model's size once (0: uncompressed, the clock then counts the dense model)."""
    if cfg.compression.uplink == "none" or layout is None:
        return 0
    from consortium.aggregation.base import ClientContext
    from consortium.compression import compression_stage

    stage = compression_stage(cfg, deployed=False)
    if stage is None:  # random-k inside secure aggregation: SecAgg's own message
        return 0
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    ctx = ClientContext(round=0, client_id="clock", seed=0, layout=layout)
    return int(stage.encode(v, ctx, {}, {}).nbytes)


def build_mode(f: Federation) -> None:
    """``server.mode``: synchronous rounds (the server as built), or FedBuff / FedAsync's
    asynchronous loop over the same parts (:mod:`consortium.server.asynchronous`, which
    refuses what does not compose)."""
    if f.cfg.server.mode != "sync":
        from consortium.server.asynchronous import asynchronous_server

        f.server = asynchronous_server(f)


REMOTE_PERSONAL = frozenset({"apfl", "ditto", "fedbn", "fedper", "fedrep"})
"""Personalised algorithms a deployment runs (each site keeps and evaluates its own model in
its ``--state``; FedPer's, FedRep's and FedBN's personal tensors never leave it:
deploy/shared.py)."""

BUILDERS: tuple[Callable[[Federation], None], ...] = (
    build_data, build_model, build_algorithm_parts, build_privacy, build_client_stages,
    build_aggregation, build_pipeline, build_frozen, build_sampler, build_ledger,
    build_executor_part, build_resume, build_callbacks, build_contribution, build_server,
    build_mode,
)
"""Every builder, in the order a run is assembled: each reads the parts before it."""


def assemble(cfg: ExperimentConfig, given: Given | None = None) -> Federation:
    """Build every part of a run from its config (and what the caller gives)."""
    f = Federation(cfg, given or Given())
    for build in BUILDERS:
        build(f)
    if f.given.on_assembled is not None:
        f.given.on_assembled(f)
    return f


class _History:
    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def on_round_end(self, record: dict[str, Any], state: Any) -> None:
        self.records.append(dict(record))


# -- the client side: one list of stages for the server and every site ---------------------


def client_stages(
    cfg: ExperimentConfig, algorithm: Algorithm, settings: LocalTraining, *,
    central: PrivacyPlan | None = None, distributed: DistributedPlan | None = None,
    site: bool = False, run_id: str = "", sizes: Mapping[str, int] | None = None,
) -> tuple[list[Any], Any]:
    """The pipeline's stages, in order, and SecAgg's server half (``None`` without SecAgg).

    The server and every deployed site (``site=True``) build the same list; they differ only
    where they must:

    - central DP: the server uses its plan's stage (calibrated noise, adaptive clip); a site's
      client half reads the clip norm from the task's payload, so its noise settings are
      irrelevant and it builds a plain :class:`~consortium.privacy.central.CentralDP`;
    - distributed DP: the server's plan stage is built from the config, as a site's is (a
      site's noise scale is its own reading of the config it approved);
    - SecAgg: a deployed site signs with its own certificate, never with a simulated CA
      (``authenticate=False``), and knows no run id or client sizes here.
    """
    stages: list[Any] = []
    mode = cfg.privacy.mode
    if mode == "central":
        stages.append(_site_central_dp(cfg) if site or central is None else central.stage)
    if mode == "distributed":
        stages.append(distributed_stage(cfg) if site or distributed is None else distributed.stage)
    if cfg.compression.uplink != "none":  # after the DP clip; refuses SecAgg (see its module)
        from consortium.compression import compression_stage

        compress = compression_stage(cfg, deployed=site)
        if compress is not None:  # None: randk under SecAgg, sent by SecAgg's own stage
            stages.append(compress)
    secure_sum = None
    if cfg.secure_aggregation.enabled:
        if site:
            sa = dataclasses.replace(cfg.secure_aggregation, authenticate=False)
            cfg = cfg.replace(secure_aggregation=sa)
        quantise, secure_sum = secure_aggregation_parts(
            cfg, algorithm, settings, run_id=run_id, sizes=sizes
        )
        stages.append(quantise)
    return stages, secure_sum


def _site_central_dp(cfg: ExperimentConfig) -> Any:
    from consortium.privacy.central import CentralDP

    return CentralDP(noise_multiplier=cfg.privacy.noise_multiplier or 1.0, clip=cfg.privacy.clip)


def site_pipeline(cfg: ExperimentConfig, algorithm: Algorithm, settings: LocalTraining) -> Pipeline:
    """The pipeline a deployed site runs: :func:`client_stages` with ``site=True`` (their
    client halves and ``respond``); the server's aggregator is not needed here."""
    return Pipeline(client_stages(cfg, algorithm, settings, site=True)[0])


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
        **_secure_randk(cfg),
    )


def _secure_randk(cfg: ExperimentConfig) -> dict[str, Any]:
    """``[compression] uplink = "randk"`` under SecAgg: its fraction and error feedback
    (consortium.compression.secure); nothing otherwise."""
    c = cfg.compression
    if c.uplink != "randk":
        return {}
    return {"fraction": c.fraction, "error_feedback": c.error_feedback}


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """The clients' local-training settings of an experiment (the same at every site)."""
    a = cfg.algorithm
    return LocalTraining(
        epochs=a.local_epochs, steps=a.local_steps, batch_size=a.batch_size, lr=a.lr,
        optimizer=a.optimizer, momentum=a.momentum, weight_decay=a.weight_decay,
        dp_clip=cfg.privacy.clip if cfg.privacy.mode == "local" else 0.0,
        dp_noise=cfg.privacy.noise_multiplier if cfg.privacy.mode == "local" else 0.0,
    )

"""Experiment configuration: frozen dataclasses, TOML in and out, ``--set a.b=c`` overrides.

Every key is declared here with its type and allowed values; an unknown key, a wrong type
or a value outside its range raises :class:`ConfigError` naming the key, the value found
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from consortium.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AggregationConfig",
    "AlgorithmConfig",
    "AnalysisConfig",
    "AttackConfig",
    "DataConfig",
    "EvaluationConfig",
    "ExecutorConfig",
    "ExperimentConfig",
    "FairnessConfig",
    "ModelConfig",
    "PeftConfig",
    "PersonalizationConfig",
    "PrivacyConfig",
    "SamplingConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "SimulationConfig",
    "TrackingConfig",
    "apply_overrides",
    "defaulted_keys",
    "fit_default_cohort",
    "load_config",
    "parse_override",
]


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal[
        "heart-disease", "synthetic", "digits", "breast-cancer", "csv", "parquet", "triage",
    ] = "heart-disease"
    partition: Literal["natural", "iid", "dirichlet", "shards", "quantity"] = "natural"
    clients: int = 4
    alpha: float = 0.5
    beta: float = 1.0
    shards_per_client: int = 2
    quantity_sigma: float = 1.0
    samples_per_client: int = 0
    test_fraction: float = 0.25
    path: str = ""
    target: str = ""
    site_column: str = ""
    server_test_fraction: float = 0.0
    impute: Literal["mean", "median"] = "mean"
    """Missing numeric values (heart-disease, csv, parquet): the federated mean, or the
    federated median from summed histograms (binary columns: the majority value); a
    ``<name>_missing`` indicator marks them either way. Simulation only for "median"."""
    impute_categorical: Literal["indicator", "mode"] = "indicator"
    """Missing categories: all-zero one-hot (the indicator marks them), or the federated
    most frequent category."""
    harmonize: str = ""
    """A harmonisation file (``harmonize.toml``: code maps, renames, unit conversions) applied
    at each site before any training or query; see :mod:`consortium.data.harmonize`."""
    validation: float = 0.0
    """A validation split for tuning (simulation only): each client's training split gives up
    this share of its rows (seeded, stratified), trains on the rest and is evaluated on them
    instead of its test split, which is then not read at all; a server-side test set is
    dropped; ``summary.json`` says ``"evaluated_on": "validation"``. 0 = off (evaluate on the
    test split); see :func:`consortium.data.validation.validation_split`."""
    split: Literal["seeded", "flamby"] = "seeded"
    """heart-disease only: ``"seeded"`` (our own split, drawn from the run seed, every column
    kept, imputed and scaled federatedly) or ``"flamby"`` (FLamby's fixed split and
    preprocessing: 199/104, 172/89, 30/16, 85/45 patients, 13 features, per-hospital
    standardisation; :mod:`consortium.data.flamby`)."""
    non_numeric: Literal["error", "missing", "category"] = "error"
    """csv and parquet: a column of numbers with a few cells that are not numbers (a typo such
    as ``4O``; at most 10 % of its values): ``"error"`` names the file, line and value;
    ``"missing"`` reads those cells as missing values (a warning names them); ``"category"``
    makes the whole column categorical (one-hot over its values). A column that is mostly
    text is categorical whatever this says. See :func:`consortium.data.files.load_parquet`."""


@dataclass(frozen=True)
class PeftConfig:
    """LoRA adapters for ``model.name = "minilm-lora"`` (:mod:`consortium.models.peft`):
    rank ``r``, scale ``alpha / r``, the attention modules ``target`` they adapt, and ``path``,
    a local Hugging Face model directory to use as the frozen base ("" = the packaged
    all-MiniLM-L6-v2)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: tuple[str, ...] = ("query", "value")
    path: str = ""
    base_sha256: str = ""
    """The SHA-256 of the frozen base (:func:`consortium.models.peft.base_hash`) that every
    build must find: a different base is refused. ``consortium server`` (and ``consortium
    manifest``) fill it from the base they load when it is empty, so every site checks its own
    base against the experiment's before its first task; set it to pin one ("" = not pinned)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "logistic"
    hidden: tuple[int, ...] = (64,)
    freeze: tuple[str, ...] = ()
    """Parameters that do not train (``requires_grad = False``): full names (``"1.weight"``)
    or submodule names (``"1"``); see :func:`consortium.models.zoo.freeze`."""
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass(frozen=True)
class AlgorithmConfig:
    name: Literal[
        "fedavg", "fedprox", "scaffold", "fednova", "fedper", "fedrep", "ditto", "apfl", "qffl",
        "fedbn", "ifca",
    ] = "fedavg"
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.01
    q: float = 1.0
    """q-FFL's fairness exponent (``qffl``; 0 = FedAvg with equal client weights)."""


@dataclass(frozen=True)
class PersonalizationConfig:
    """Personalised federated learning (``consortium.algorithms.personal``).

    ``local_layers``: parameter-name prefixes (``["3"]``, ``["head"]``, ``["3.weight"]``) of
    the layers each client keeps for itself under ``fedper`` / ``fedrep``; or ``local_count``:
    how many final layers (a layer: a module that owns parameters). Neither: the final layer.
    Each client's state holds only these values (head size × clients, never full models).
    ``head_epochs``: FedRep's epochs on the head, before the body's ``algorithm.local_epochs``.
    ``finetune_steps``: after the last round each client fine-tunes its own copy of the final
    model (the global one; under fedper/fedrep with its own head) for this many local SGD
    steps on its training split and is evaluated on its test split (``summary.json``'s
    ``personalized``); works with every algorithm, 0 = off.
    ``ditto_lambda``: Ditto's ``λ``, the pull of each personal model toward the global one;
    ``personal_steps``: Ditto's local steps on the personal model each round (0 = the same
    local work as the global model). ``apfl_alpha``: APFL's initial mixing weight ``α``.
    Ditto and APFL keep one full model per client in the client state.
    ``clusters``: IFCA's number of cluster models ``k`` (``ifca``; 1 is FedAvg)."""

    local_layers: tuple[str, ...] = ()
    local_count: int = 0
    head_epochs: int = 1
    finetune_steps: int = 0
    ditto_lambda: float = 0.1
    personal_steps: int = 0
    apfl_alpha: float = 0.25
    clusters: int = 2


@dataclass(frozen=True)
class SamplingConfig:
    clients_per_round: int = 0
    fraction: float = 0.0
    over_select: float = 0.0
    """Simulated over-selection (Bonawitz et al. 2019): a round keeps the first
    ceil(n / (1 + over_select)) of its n sampled clients to finish on the simulated clock
    (:mod:`consortium.server.clock`); 0: off. ``consortium server --over-select`` is the
    deployment's."""
    cycle: Literal["", "shuffled", "fixed"] = ""
    """Cyclic weight transfer (Chang et al. 2018): one client per round, visiting every
    client once per cycle, reshuffled each cycle (``"shuffled"``, seeded) or in data-set order
    (``"fixed"``); with ``server.lr = 1`` each client continues from the previous one's model
    (:mod:`consortium.algorithms.cyclic`). "" = off."""


@dataclass(frozen=True)
class ServerConfig:
    optimizer: Literal["sgd", "avgm", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = 0.0  # 0 = the optimiser's default: 1.0 for sgd/avgm, 0.01 for adam/yogi/adagrad
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    deadline_s: float = 0.0
    """Simulated seconds a round waits for its clients (:mod:`consortium.server.clock`): those
    not finished by then are dropped; 0: no deadline."""
    min_results: int = 1
    """A simulated round with fewer updates in time is aborted (the model stays)."""
    mode: Literal["sync", "fedbuff", "fedasync"] = "sync"
    """``"sync"``: rounds; ``"fedbuff"``/``"fedasync"``: asynchronous aggregation on the
    simulated clock (:mod:`consortium.server.asynchronous`), or over gRPC on the sites'
    answers as they arrive (:mod:`consortium.deploy.asynchronous`)."""
    concurrency: int = 0
    """Async: clients training at once (0: ``sampling.clients_per_round``; over gRPC: every
    online site)."""
    buffer_size: int = 10
    """FedBuff: updates per server step (K); FedAsync steps on every update."""
    max_staleness: int = 0
    """Async: updates more than this many server versions old are dropped (0: no bound)."""
    staleness: Literal["polynomial", "constant", "hinge"] = "polynomial"
    """Async: the staleness weight s(τ) (Xie et al. 2019): (1+τ)^−a, 1, or hinge."""
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    """hinge: s(τ) = 1 for τ ≤ b, else 1 / (a(τ − b) + 1)."""
    mixing: float = 0.6
    """FedAsync: α in x ← (1 − α s(τ)) x + α s(τ) x_client."""
    async_weighting: Literal["examples", "equal", "time"] = "examples"
    """Async: an update's weight in its buffer: its examples (FedAvg's), 1 (FedBuff's
    Algorithm 1), or examples × its round trip / the buffer's mean (arrival-rate corrected;
    :mod:`consortium.aggregation.staleness`)."""


@dataclass(frozen=True)
class ExecutorConfig:
    kind: Literal["auto", "sequential", "vectorized", "ray"] = "auto"
    max_memory_mb: float = 1024.0
    address: str = ""  # ray: a cluster to connect to; "" starts a local Ray
    workers: int = 0  # ray: groups run at once (and a local Ray's CPUs); 0 = every CPU
    device: str = "cpu"
    """Where local training, evaluation and the baselines compute: ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"auto"`` (cuda when torch sees a GPU); the flat parameter vectors,
    aggregation, DP noise and secure aggregation stay on the CPU
    (:func:`consortium.executors.device.resolve_device`)."""


@dataclass(frozen=True)
class EvaluationConfig:
    baselines: tuple[Literal["local", "pooled"], ...] = ()
    every: int = 1
    baseline_clients: int = 100
    """The local-only baseline of a federation with more clients trains a seeded sample of
    this many (``summary.json``'s ``baselines.local.sampled`` says so); 0 trains every client
    (:mod:`consortium.server.baselines`)."""
    pooled_examples: int = 20_000
    """The pooled baseline trains on a seeded sample of this many examples when the pooled
    training data are larger (``baselines.pooled.sampled``); 0 pools every example."""
    baseline_budget: Literal["matched", "full"] = "matched"
    """How long the baselines train (``baselines.<name>.budget``): ``"matched"``, what the
    federation trained in expectation (each client alone its expected epochs, ``rounds ×
    clients_per_round / clients × local_epochs`` with the stragglers' shortened rounds
    counted; pooled the federation's expected passes), or ``"full"``, the budget of every
    client taking part in every round (:class:`consortium.server.baselines.Budget`). They are
    the same when every client takes part in every round without stragglers."""
    groups: tuple[str, ...] = ()
    """Columns whose groups the final model is compared across (``server.groups``): per-group
    accuracy, TPR, FPR, positive rate and calibration, and the equalised-odds,
    demographic-parity and calibration gaps in ``summary.json`` under ``groups``, overall and
    per site (a 0/1 column or a categorical one, e.g. ``["sex"]`` for heart disease, or
    ``"<column>_band"`` with ``bands``). Simulation only. The labels are kept beside the data
    at each site and the group's columns are removed from the features, unless
    ``group_features`` (:mod:`consortium.data.groups`)."""
    group_features: bool = False
    """Keep the ``groups`` columns among the model's features (default: the model never sees
    them). A banded column (``bands``) always stays a feature."""
    bands: tuple[str, ...] = ()
    """Band edges for derived groups ``"<column>_band"``: ``["age: 50, 60"]`` gives the groups
    ``<50``, ``50–60``, ``≥60`` (a band holds its lower edge), cut on the raw value
    (heart-disease only; :func:`consortium.data.groups.parse_bands`)."""
    clients: float = 0.0
    """Clients evaluated per round: 0 = every client with test data; a count >= 1 or a
    fraction in (0, 1) = that many seeded draws proportional to test examples, with standard
    errors (``server.evaluation``); the last round evaluates every client."""
    target_accuracy: float = 0.0
    include_offline: bool = False
    """Evaluate every client each round, offline ones too (a measurement of the model, as on
    a fixed test set), instead of the clients the simulated clock has online."""
    """``summary.json`` gives ``time_to_target_s`` (simulated seconds) and
    ``updates_to_target`` (client updates aggregated) until ``accuracy`` first reaches it;
    0: off."""


@dataclass(frozen=True)
class FairnessConfig:
    """A fairness-aware training option (simulation only): ``method = "reweigh"`` is Kamiran
    & Calders' reweighing ("Data preprocessing techniques for classification without
    discrimination", KAIS 2012) by the group column ``column`` (one of
    ``evaluation.groups``), applied as their uniform sampling: each site resamples its own
    training rows so that every (group, label) cell has its size under independence, ``n_g ·
    n_y / n`` (:func:`consortium.data.groups.reweigh`). ``"thresholds"`` is Hardt, Price &
    Srebro's equalised-odds post-processing ("Equality of Opportunity in Supervised Learning",
    NeurIPS 2016) with deterministic per-group thresholds on the final model's score: each
    site counts its fitting rows' scores per group and label on a 101-point grid, the server
    adds the counts and picks the thresholds with the smallest equalised-odds gap there
    (within ``tolerance`` of it the most accurate, never wider than the model's own), the
    largest group kept at the model's own 0.5 and the others moved towards its rates
    (``anchor = "largest"``; ``"none"`` moves every group)
    (:mod:`consortium.server.thresholds`); the fitting rows are the training rows
    (``fit_fraction = 0``) or a stratified share of them set aside
    (:func:`consortium.data.groups.fitting_split`). ``"reweigh+thresholds"``: both.
    ``"none"``: off. ``"fairfed"``: Ezzeldin et al.'s FairFed ("FairFed: Enabling Group
    Fairness in Federated Learning", AAAI 2023), aggregation weights moved each round by
    ``beta`` towards the sites whose equalised-odds gap is close to the federation's
    (:mod:`consortium.aggregation.fairfed`); ``"fairfed+thresholds"``: with the thresholds."""

    method: Literal["none", "reweigh", "thresholds", "reweigh+thresholds", "fairfed",
                    "fairfed+thresholds"] = "none"
    column: str = ""
    fit_fraction: float = 0.0
    tolerance: float = 0.0
    anchor: Literal["largest", "none"] = "largest"
    beta: float = 1.0


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers fed every round's metrics, the config and the final model
    (``consortium.reporting.tracking``): MLflow (a file store ``mlruns/`` in the run
    directory, or ``mlflow_uri``) and TensorBoard (event files in ``tensorboard/``, or
    ``tensorboard_dir``). ``experiment`` defaults to the experiment's name, ``run_name`` to
    the run directory's name."""

    mlflow: bool = False
    mlflow_uri: str = ""
    experiment: str = ""
    run_name: str = ""
    tensorboard: bool = False
    tensorboard_dir: str = ""


@dataclass(frozen=True)
class AnalysisConfig:
    """What ``consortium analyze`` computes (:mod:`consortium.analytics`); the default is a
    Table 1 of every column.

    ``columns``: the columns to describe (empty: all); ``where``: a cohort filter in the safe
    expression language (:mod:`consortium.analytics.expr`); ``group_by``: a categorical column
    whose groups are described side by side (besides the per-site tables); ``categorical``:
    numeric columns to describe as categories (integer codes with at most ``max_levels``
    distinct values already are); ``min_count``: the smallest count a site releases (a cell
    below it is suppressed, or the query refused with ``suppress = "refuse"``); ``bins``: the
    histogram bins behind medians and quantiles (their error is at most one bin's width);
    ``histograms``: numeric columns whose histogram is released (over ``bounds`` when given,
    else the federated-agreed range; bins merged until each holds 0 or ``min_count``);
    ``crosstabs``: ``"a*b"`` pairs of categorical columns; ``correlation``: numeric columns for
    a correlation/covariance matrix; ``survival_time``/``survival_event``: time-to-event
    columns for Kaplan–Meier curves and the log-rank test across ``survival_group``."""

    columns: tuple[str, ...] = ()
    where: str = ""
    group_by: str = ""
    categorical: tuple[str, ...] = ()
    max_levels: int = 10
    min_count: int = 5
    suppress: Literal["suppress", "refuse"] = "suppress"
    bins: int = 200
    quantiles: tuple[float, ...] = ()
    histograms: tuple[str, ...] = ()
    crosstabs: tuple[str, ...] = ()
    correlation: tuple[str, ...] = ()
    survival_time: str = ""
    survival_event: str = ""
    survival_group: str = ""
    epsilon: float = 0.0
    """Differential privacy per query (0: none): each site adds noise to every sum it releases
    (``mechanism``: ``"gaussian"`` at ``privacy.delta``, or ``"laplace"``, pure ε), charged to
    its budget (``privacy.site_policies``' ``max_epsilon``) in ``ledger``. Needs public
    ``bounds`` (``"age: 0, 120"``) for numeric columns and ``categories`` (``"sex: 0, 1"``)
    for categorical ones: nothing data-dependent is released outside the noise."""
    mechanism: Literal["gaussian", "laplace"] = "gaussian"
    bounds: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    ledger: str = ""


@dataclass(frozen=True)
class SimulationConfig:
    """Systems heterogeneity: ``stragglers`` of each round's clients do less local work;
    ``dropout``: chance that a sampled client fails to return its update (recorded in
    ``failed``), or, under secure aggregation, stops answering at each protocol phase."""

    stragglers: float = 0.0
    dropout: float = 0.0
    availability: str = "always"
    """The simulated clock's availability trace (:mod:`consortium.server.traces`):
    ``"always"``, ``"diurnal"`` (``period_s``, ``duty``) or a CSV/Parquet file (client,
    start, end)."""
    speeds: str = "uniform"
    """Clients' compute and network: ``"uniform"`` (``speed``, ``bandwidth``,
    ``latency_s``), ``"fedscale"`` (heavy-tailed around them) or a CSV/Parquet file (client,
    speed, bandwidth[, latency])."""
    speed: float = 1000.0
    """Examples a client trains on per simulated second (the median under "fedscale")."""
    bandwidth: float = 1.25e6
    """Bytes per simulated second, each way (the median under "fedscale")."""
    latency_s: float = 0.05
    period_s: float = 86400.0
    """``availability = "diurnal"``: the length of a day."""
    duty: float = 0.5
    """``availability = "diurnal"``: the share of the period a client is online."""
    slow_fraction: float = 0.0
    """This share of the clients (drawn from the seed) compute and transfer ``slow_factor``
    times slower."""
    slow_factor: float = 10.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Central DP (DP-FedAvg). ``noise_multiplier = 0`` with ``target_epsilon > 0`` calibrates."""

    mode: Literal["none", "central", "local", "distributed"] = "none"
    noise_multiplier: float = 0.0
    clip: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0
    delta: float = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"
    target_epsilon: float = 0.0
    sampling: Literal["poisson", "fixed"] = "poisson"
    site_policies: str = ""
    """A TOML file of site budgets: [default] and [sites.<id>] with max_epsilon, delta, min_sites."""
    noise_source: Literal["seeded", "os"] = "seeded"
    """Central DP noise: "seeded" (reproducible simulation) or "os" (a deployment; the server
    uses it whatever the file says)."""


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ (Bell et al. 2020): the server sees only the sum of the quantised updates."""

    enabled: bool = False
    bits: int = 16
    clip: float = 1.0
    weight_bound: float = 1000.0
    threshold: float = 0.5
    neighbours: int = 0
    extras_bound: float = 0.0
    """Largest |value| of an algorithm's extra sums per client (SCAFFOLD's control-variate
    change); 0 uses the algorithm's own bounds."""
    authenticate: bool = False
    """Simulation: play the malicious-server variant (signed keys from an in-memory CA and the
    consistency round). Deployed sites with certificates always sign."""


Params = tuple[tuple[str, Any], ...]
"""A section's free parameters (the rule's or the attack's own), sorted by name."""


@dataclass(frozen=True)
class AggregationConfig:
    """The aggregation rule: ``"mean"`` (FedAvg's weighted mean) or a robust rule
    (``consortium.aggregation.robust``); every other key of the section is the rule's parameter,
    e.g. ``[aggregation] rule = "trimmed-mean"`` and ``f = 2``.

    ``update_bound``: each update's delta is scaled to at most this multiple of the round's
    median update norm before the rule runs (``consortium.aggregation.bound``); 0 leaves it
    to where the run happens: off in a simulation, 3.0 in ``consortium server``."""

    rule: str = "mean"
    update_bound: float = 0.0
    params: Params = ()


@dataclass(frozen=True)
class AttackConfig:
    """Simulation only: which clients are malicious (``fraction`` of the population, or ``ids``)
    and what they do (``kind``, see ``consortium.attacks``); other keys are the attack's own
    parameters, e.g. ``[attack] kind = "sign-flip"``, ``fraction = 0.2``, ``scale = 4``."""

    kind: str = "none"
    fraction: float = 0.0
    ids: tuple[str, ...] = ()
    params: Params = ()


@dataclass(frozen=True)
class CompressionConfig:
    """Uplink compression of each client's update (``consortium.compression``): ``uplink``
    names the method; ``fraction`` (top-k, random-k), ``bits`` (QSGD: ``2^bits − 1`` levels),
    ``chunk`` (QSGD / int buckets), ``rank`` (PowerSGD), ``error_feedback`` (the residual kept
    at the client), ``sign_lr`` (signSGD's server step). ``downlink`` compresses the broadcast
    model the same ways (EF21-P, ``consortium.compression.downlink``; not sign/powersgd;
    fedavg/fedprox); ``downlink_reference`` = ``"shared"`` (one x̂ for every client) or
    ``"per_client"`` (one x̂ᵢ per client, at most ``downlink_memory_mb`` MiB of them at the
    server; a deployment always keeps one per site)."""

    uplink: Literal["none", "topk", "randk", "qsgd", "int8", "int4", "int2", "fp16", "bf16",
                    "sign", "powersgd"] = "none"
    downlink: Literal["none", "topk", "randk", "qsgd", "int8", "int4", "int2", "fp16", "bf16",
                      "sign", "powersgd"] = "none"
    fraction: float = 0.01
    bits: int = 4
    chunk: int = 512
    rank: int = 2
    error_feedback: bool = False
    sign_lr: float = 0.01
    values: Literal["float32", "fp16"] = "float32"  # top-k's kept values
    indices: Literal["int32", "rice"] = "int32"  # top-k's indices: Golomb–Rice coded gaps
    downlink_reference: Literal["shared", "per_client"] = "shared"
    downlink_memory_mb: float = 2048.0  # most per-client references the server holds


@dataclass(frozen=True)
class InterpretConfig:
    """Interpretability of the final model (``consortium.interpret``), all off by default:
    ``importance = "permutation"`` (federated permutation importance, ``repeats`` shuffles per
    feature at each site), ``shap`` (mean |SHAP| per feature on up to ``sample`` test rows per
    site against ``background`` training rows; extra ``consortium[interpret]``),
    ``coefficients`` (named coefficients of a linear model), ``calibration`` (ECE and
    reliability bins per site and overall). ``ratio`` flags a feature whose share of a site's
    importance is that many times its share at another site."""

    importance: Literal["none", "permutation"] = "none"
    shap: bool = False
    coefficients: bool = False
    calibration: bool = False
    repeats: int = 5
    sample: int = 50
    background: int = 20
    ratio: float = 3.0


@dataclass(frozen=True)
class ContributionConfig:
    """Contribution scores of the sites (``consortium.contribution``; in a deployment the
    sites evaluate the coalition models after the last round, ``consortium.deploy.interpret``):
    ``method`` = ``"exact-shapley"`` (every coalition, up to 10 clients per round),
    ``"gtg-shapley"`` (Liu et al., ACM TIST 2022), ``"tmc-shapley"`` (Ghorbani & Zou, ICML
    2019) or ``"leave-one-out"``, over coalition models rebuilt from each round's updates;
    ``"none"``: off. ``utility``: the coalition model's ``"loss"`` (minus the cross-entropy;
    the default: it moves with every site's update, where accuracy on a few hundred rows
    moves in steps too coarse for one of many small sites) or ``"accuracy"`` on ``validation`` = ``"sites"`` (every site's evaluation split) or
    ``"server"`` (the server's test set). ``permutations``: TMC's count, GTG's most;
    ``truncation``: a permutation stops once its prefix is within this of ``v(N)`` (0: off,
    the default — it gives a harmful site that comes late 0 instead of its negative marginal,
    benchmarks/RESULTS.md "Contribution scores");
    ``between``: GTG skips a round whose ``|v(N) − v(∅)|`` is below this (0: off); ``convergence``:
    GTG's stopping rule; ``free_rider``: flag a site scoring ≤ 0 or confidently (score + 2
    standard errors) at most this share of the fair share; ``record``: keep every round's updates in
    ``RUN_DIR/contribution/`` for ``consortium contribution RUN_DIR``."""

    method: Literal["none", "exact-shapley", "gtg-shapley", "tmc-shapley", "leave-one-out"] = "none"
    utility: Literal["accuracy", "loss"] = "loss"
    validation: Literal["sites", "server"] = "sites"
    permutations: int = 50
    truncation: float = 0.0
    between: float = 0.0
    convergence: float = 0.05
    free_rider: float = 0.1
    record: bool = False


_OPEN_SECTIONS = (AggregationConfig, AttackConfig)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    contribution: ContributionConfig = field(default_factory=ContributionConfig)
    interpret: InterpretConfig = field(default_factory=InterpretConfig)

    def __post_init__(self) -> None:
        _check_ranges(self)

    # -- conversions -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def replace(self, **changes: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return _build(cls, data, prefix="")


def _check_ranges(cfg: ExperimentConfig) -> None:
    def need(cond: bool, key: str, value: Any, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {allowed}")

    need(cfg.rounds >= 1, "rounds", cfg.rounds, "an integer >= 1")
    d = cfg.data
    need(d.clients >= 1, "data.clients", d.clients, "an integer >= 1")
    need(d.alpha > 0, "data.alpha", d.alpha, "a number > 0")
    need(d.beta >= 0, "data.beta", d.beta, "a number >= 0")
    need(d.shards_per_client >= 1, "data.shards_per_client", d.shards_per_client, "an integer >= 1")
    need(d.quantity_sigma >= 0, "data.quantity_sigma", d.quantity_sigma, "a number >= 0")
    need(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    need(0 <= d.validation < 1, "data.validation", d.validation,
         "a number in [0, 1) (0: off, evaluate on the test split)")
    sha = cfg.model.peft.base_sha256
    need(sha == "" or (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)),
         "model.peft.base_sha256", sha, '64 lowercase hex digits (a SHA-256), or "" (not pinned)')
    an = cfg.analysis
    need(an.min_count >= 1, "analysis.min_count", an.min_count, "an integer >= 1")
    need(an.max_levels >= 2, "analysis.max_levels", an.max_levels, "an integer >= 2")
    need(2 <= an.bins <= 100_000, "analysis.bins", an.bins, "an integer in [2, 100000]")
    for q in an.quantiles:
        need(0 < q < 1, "analysis.quantiles", an.quantiles, "numbers in (0, 1)")
    need(an.epsilon >= 0, "analysis.epsilon", an.epsilon, "a number >= 0 (0: no DP)")
    need(
        0 <= d.server_test_fraction < 1,
        "data.server_test_fraction",
        d.server_test_fraction,
        "a number in [0, 1)",
    )
    a = cfg.algorithm
    need(a.local_epochs >= 1, "algorithm.local_epochs", a.local_epochs, "an integer >= 1")
    need(a.local_steps >= 0, "algorithm.local_steps", a.local_steps, "0 (use epochs) or >= 1")
    need(a.batch_size >= 1, "algorithm.batch_size", a.batch_size, "an integer >= 1")
    need(a.lr > 0, "algorithm.lr", a.lr, "a number > 0")
    need(0 <= a.momentum < 1, "algorithm.momentum", a.momentum, "a number in [0, 1)")
    need(a.weight_decay >= 0, "algorithm.weight_decay", a.weight_decay, "a number >= 0")
    need(a.mu >= 0, "algorithm.mu", a.mu, "a number >= 0")
    pz = cfg.personalization
    need(pz.local_count >= 0, "personalization.local_count", pz.local_count,
         "0 (the final layer, or local_layers) or a count of final layers >= 1")
    need(pz.head_epochs >= 1, "personalization.head_epochs", pz.head_epochs, "an integer >= 1")
    need(pz.finetune_steps >= 0, "personalization.finetune_steps", pz.finetune_steps,
         "0 (off) or a number of local steps >= 1")
    need(pz.ditto_lambda >= 0, "personalization.ditto_lambda", pz.ditto_lambda, "a number >= 0")
    need(pz.personal_steps >= 0, "personalization.personal_steps", pz.personal_steps,
         "0 (the global model's local work) or a number of local steps >= 1")
    need(0 <= pz.apfl_alpha <= 1, "personalization.apfl_alpha", pz.apfl_alpha, "a number in [0, 1]")
    need(pz.clusters >= 1, "personalization.clusters", pz.clusters, "an integer >= 1 (ifca)")
    if a.name == "ifca":
        from consortium.algorithms.ifca import check_experiment

        check_experiment(cfg)
    need(a.q >= 0, "algorithm.q", a.q, "a number >= 0")
    if pz.local_layers and pz.local_count:
        raise ConfigError(
            "personalization.local_layers and personalization.local_count are both set; set "
            "only one (names of the personal layers, or how many final layers are personal)"
        )
    if (pz.local_layers or pz.local_count) and a.name not in ("fedper", "fedrep"):
        raise ConfigError(
            f"personalization.local_layers/local_count are set, but algorithm.name = {a.name!r} "
            'shares every parameter; use algorithm.name = "fedper" or "fedrep"'
        )
    s = cfg.sampling
    need(s.clients_per_round >= 0, "sampling.clients_per_round", s.clients_per_round, "an integer >= 0")
    need(0 <= s.fraction <= 1, "sampling.fraction", s.fraction, "a number in (0, 1]")
    if s.clients_per_round and s.fraction:
        raise ConfigError(
            "sampling.clients_per_round and sampling.fraction are both set; set only one of them"
        )
    v = cfg.server
    need(v.lr >= 0, "server.lr", v.lr, "a number > 0 (or 0 for the optimiser's default)")
    need(0 <= v.momentum < 1, "server.momentum", v.momentum, "a number in [0, 1)")
    need(0 <= v.beta1 < 1, "server.beta1", v.beta1, "a number in [0, 1)")
    need(0 <= v.beta2 < 1, "server.beta2", v.beta2, "a number in [0, 1)")
    need(v.tau > 0, "server.tau", v.tau, "a number > 0")
    need(cfg.executor.max_memory_mb > 0, "executor.max_memory_mb", cfg.executor.max_memory_mb, "a number > 0")
    need(cfg.executor.workers >= 0, "executor.workers", cfg.executor.workers, "an integer >= 0 (0: every CPU)")
    dev = cfg.executor.device
    need(dev in ("cpu", "cuda", "auto") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         "executor.device", dev, '"cpu", "cuda", "cuda:N" or "auto"')
    p = cfg.privacy
    need(p.noise_multiplier >= 0, "privacy.noise_multiplier", p.noise_multiplier, "a number >= 0")
    need(p.clip > 0, "privacy.clip", p.clip, "a number > 0")
    need(0 < p.target_quantile < 1, "privacy.target_quantile", p.target_quantile, "a number in (0, 1)")
    need(p.clip_lr > 0, "privacy.clip_lr", p.clip_lr, "a number > 0")
    need(p.count_stddev >= 0, "privacy.count_stddev", p.count_stddev, "a number >= 0 (0 = clients/20)")
    need(0 < p.delta < 1, "privacy.delta", p.delta, "a number in (0, 1)")
    need(p.target_epsilon >= 0, "privacy.target_epsilon", p.target_epsilon, "a number >= 0")
    if p.mode == "local" and not (p.noise_multiplier > 0 and p.target_epsilon == 0):
        raise ConfigError(
            "privacy.mode = \"local\" (DP-SGD in each site) needs privacy.noise_multiplier > 0; "
            "target_epsilon calibrates central DP only"
        )
    if p.mode in ("central", "distributed") and not (p.noise_multiplier > 0) ^ (p.target_epsilon > 0):
        raise ConfigError(
            f"privacy.mode = \"{p.mode}\" needs exactly one of privacy.noise_multiplier (the noise) "
            "or privacy.target_epsilon (to calibrate the noise)"
        )
    if p.mode == "distributed":
        _check_distributed(cfg)
    sa = cfg.secure_aggregation
    need(2 <= sa.bits <= 24, "secure_aggregation.bits", sa.bits, "an integer in [2, 24]")
    need(sa.clip > 0, "secure_aggregation.clip", sa.clip, "a number > 0")
    need(sa.weight_bound > 0, "secure_aggregation.weight_bound", sa.weight_bound, "a number > 0")
    need(0 < sa.threshold <= 1, "secure_aggregation.threshold", sa.threshold, "a fraction in (0, 1]")
    need(sa.neighbours >= 0, "secure_aggregation.neighbours", sa.neighbours, "0 (all) or >= 1")
    if cfg.aggregation.rule != "mean" or cfg.aggregation.params:
        check_rule(cfg.aggregation.rule, dict(cfg.aggregation.params))
    from consortium.aggregation.bound import check_multiplier

    check_multiplier(cfg.aggregation.update_bound)
    if sa.enabled and cfg.aggregation.rule != "mean":
        raise ConfigError(
            f"aggregation.rule = {cfg.aggregation.rule!r} needs every client's update, which "
            "secure aggregation hides; use rule = \"mean\" or turn secure_aggregation off"
        )
    if cfg.attack.kind != "none":
        from consortium.attacks import make_attack

        attack = make_attack(cfg.attack.kind, **dict(cfg.attack.params))
        if sa.enabled and attack.kind == "model":
            raise ConfigError(
                f"attack.kind = {cfg.attack.kind!r} rewrites individual updates at the server, "
                "which secure aggregation hides; simulate it without secure_aggregation (data "
                "attacks such as label-flip and backdoor work with it)"
            )
    elif cfg.attack.params:
        raise ConfigError(
            f"attack parameter {cfg.attack.params[0][0]!r} given without attack.kind; set "
            "attack.kind (see `consortium robustness --help`)"
        )
    need(sa.extras_bound >= 0, "secure_aggregation.extras_bound", sa.extras_bound,
         "0 (the algorithm's bounds) or a number > 0")
    need(0 <= cfg.simulation.dropout < 1, "simulation.dropout", cfg.simulation.dropout,
         "a fraction in [0, 1)")
    need(cfg.evaluation.every >= 1, "evaluation.every", cfg.evaluation.every, "an integer >= 1")
    need(cfg.evaluation.baseline_clients >= 0, "evaluation.baseline_clients",
         cfg.evaluation.baseline_clients, "a count >= 0 (0: every client)")
    need(cfg.evaluation.pooled_examples >= 0, "evaluation.pooled_examples",
         cfg.evaluation.pooled_examples, "a count >= 0 (0: every example)")
    _check_clock(cfg)
    _check_groups(cfg)
    _check_contribution(cfg)
    _check_meaningful(cfg)
    it = cfg.interpret
    need(it.repeats >= 1, "interpret.repeats", it.repeats, "an integer >= 1")
    need(it.sample >= 1, "interpret.sample", it.sample, "an integer >= 1 (rows per site)")
    need(it.background >= 1, "interpret.background", it.background, "an integer >= 1")
    need(it.ratio > 1, "interpret.ratio", it.ratio, "a number > 1")
    ev = cfg.evaluation.clients
    need(ev == 0 or 0 < ev < 1 or (ev >= 1 and ev.is_integer()), "evaluation.clients", ev,
         "0 (every client), a count >= 1, or a fraction in (0, 1)")
    need(
        0 <= cfg.simulation.stragglers <= 1,
        "simulation.stragglers",
        cfg.simulation.stragglers,
        "a fraction in [0, 1]",
    )


# Data sets whose clients are given by the data (natural partition only), and why.
_GIVEN_CLIENTS = {
    "heart-disease": "its clients are the four hospitals that collected it",
    "triage": "its clients are its four sites",
    "csv": "its clients are your files (or the values of data.site_column)",
    "parquet": "its clients are your files (or the values of data.site_column)",
}


def _check_meaningful(cfg: ExperimentConfig) -> None:
    """Settings that would be silently ignored (issue 20): DP settings without a DP mode, and
    ``data.clients`` for a data set whose clients are its sites. Keys are compared with their
    defaults, so a config built in code is checked as a file is."""
    p, default = cfg.privacy, PrivacyConfig()
    if p.mode == "none":
        ignored = [f"{k} = {getattr(p, k)!r}" for k in ("noise_multiplier", "clip", "target_epsilon")
                   if getattr(p, k) != getattr(default, k)]
        if ignored:
            raise ConfigError(
                f"privacy.{ignored[0]} is set but privacy.mode = \"none\", so the run would have no "
                "differential privacy; set privacy.mode = \"central\" (DP-FedAvg at the server), "
                "\"local\" (DP-SGD at each site) or \"distributed\", or remove the [privacy] keys"
            )
    d = cfg.data
    if d.non_numeric != "error" and d.dataset not in ("csv", "parquet"):
        raise ConfigError(
            f"data.non_numeric = {d.non_numeric!r} applies to your own csv or parquet files, not "
            f"to data.dataset = {d.dataset!r}; remove it"
        )
    if d.dataset in _GIVEN_CLIENTS and d.clients != DataConfig().clients:
        raise ConfigError(
            f"data.clients = {d.clients} does not apply to data.dataset = {d.dataset!r}: "
            f"{_GIVEN_CLIENTS[d.dataset]}; remove data.clients (to study many clients, use "
            "data.dataset = \"synthetic\", \"digits\" or \"breast-cancer\" with a partition)"
        )


def _check_clock(cfg: ExperimentConfig) -> None:
    """The simulated clock's keys (:mod:`consortium.server.clock`)."""
    sim, v = cfg.simulation, cfg.server

    def need(cond: bool, key: str, value: Any, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {allowed}")

    for key in ("speed", "bandwidth", "period_s", "slow_factor"):
        need(getattr(sim, key) > 0, f"simulation.{key}", getattr(sim, key), "a number > 0")
    need(sim.latency_s >= 0, "simulation.latency_s", sim.latency_s, "a number >= 0")
    need(0 < sim.duty <= 1, "simulation.duty", sim.duty, "a fraction in (0, 1]")
    need(0 <= sim.slow_fraction <= 1, "simulation.slow_fraction", sim.slow_fraction,
         "a fraction in [0, 1]")
    need(v.deadline_s >= 0, "server.deadline_s", v.deadline_s, "simulated seconds >= 0 (0: none)")
    need(v.min_results >= 1, "server.min_results", v.min_results, "an integer >= 1")
    need(v.concurrency >= 0, "server.concurrency", v.concurrency, "an integer >= 0")
    need(v.buffer_size >= 1, "server.buffer_size", v.buffer_size, "an integer >= 1")
    need(v.max_staleness >= 0, "server.max_staleness", v.max_staleness, "an integer >= 0")
    need(v.staleness_a >= 0, "server.staleness_a", v.staleness_a, "a number >= 0")
    need(v.staleness_b >= 0, "server.staleness_b", v.staleness_b, "a number >= 0")
    need(0 < v.mixing <= 1, "server.mixing", v.mixing, "a fraction in (0, 1]")
    need(v.mode != "sync" or v.async_weighting == "examples", "server.async_weighting",
         v.async_weighting, "\"examples\" with server.mode = \"sync\" (it weights an "
         "asynchronous buffer: set server.mode = \"fedbuff\" or \"fedasync\")")
    over = cfg.sampling.over_select
    need(0 <= over <= 10, "sampling.over_select", over, "a fraction in [0, 10], e.g. 0.3")
    t = cfg.evaluation.target_accuracy
    need(0 <= t <= 1, "evaluation.target_accuracy", t, "an accuracy in (0, 1] (0: off)")
    if over and cfg.privacy.mode in ("central", "distributed"):
        raise ConfigError(
            f"sampling.over_select with privacy.mode = {cfg.privacy.mode!r}: DP-FedAvg divides "
            "the noisy sum by the expected number of clients, so cutting the slowest ones "
            "biases every round; set sampling.over_select = 0, or use server.deadline_s"
        )


# -- building and checking ----------------------------------------------------------------------


def _check_contribution(cfg: ExperimentConfig) -> None:
    """``[contribution]``: its ranges, and its refusal under secure aggregation."""
    c = cfg.contribution
    for key, value, ok, allowed in (
        ("permutations", c.permutations, c.permutations >= 2, "an integer >= 2"),
        ("truncation", c.truncation, c.truncation >= 0, "a number >= 0"),
        ("between", c.between, c.between >= 0, "a number >= 0"),
        ("convergence", c.convergence, c.convergence >= 0, "a number >= 0"),
        ("free_rider", c.free_rider, 0 <= c.free_rider < 1, "a fraction in [0, 1)"),
    ):
        if not ok:
            raise ConfigError(f"contribution.{key} = {value!r} is not allowed: expected {allowed}")
    if c.method != "none" and (cfg.secure_aggregation.enabled or cfg.privacy.mode == "distributed"):
        raise ConfigError(
            f"contribution.method = {c.method!r} rebuilds coalition models from each site's own "
            "update, which the server never sees under secure aggregation (it learns only the "
            "sum); extra secure sums over N \\ {i} in the same round would not help, since "
            "sum(N) - sum(N \\ {i}) is site i's update. What works: leave-one-out by separate "
            "runs, one federation (under secure aggregation) per coalition N \\ {i}: "
            "`consortium contribution RUN_DIR --retrain` after the run (n + 1 trainings). Set "
            'contribution.method = "none" for the run'
        )


def _check_groups(cfg: ExperimentConfig) -> None:
    """``evaluation.groups`` / ``bands`` and ``[fairness]``: what can be checked without data."""
    from consortium.data.groups import BAND_SUFFIX, parse_bands

    ev, fair = cfg.evaluation, cfg.fairness
    for column in parse_bands(ev.bands):
        if column + BAND_SUFFIX not in ev.groups:
            raise ConfigError(
                f"evaluation.bands bands {column!r}, but evaluation.groups does not name "
                f"{column + BAND_SUFFIX!r}; add it to evaluation.groups or remove the band"
            )
    if fair.method == "none" and fair.column:
        raise ConfigError(
            f"fairness.column = {fair.column!r} is set without fairness.method; set "
            'fairness.method = "reweigh" or remove fairness.column'
        )
    if "thresholds" not in fair.method and fair.fit_fraction:
        raise ConfigError(
            f"fairness.fit_fraction = {fair.fit_fraction:g} is for fairness.method = "
            '"thresholds"; set the method or remove fit_fraction'
        )
    if not 0 <= fair.fit_fraction < 1:
        raise ConfigError(
            f"fairness.fit_fraction = {fair.fit_fraction!r} is not allowed: expected the share "
            "of each site's training rows to fit the thresholds on, in [0, 1) (0 = the "
            "training rows themselves)"
        )
    if not 0 <= fair.tolerance <= 1:
        raise ConfigError(
            f"fairness.tolerance = {fair.tolerance!r} is not allowed: expected the largest "
            "equalised-odds gap the thresholds may leave on the fitting rows, in [0, 1]"
        )
    if "fairfed" in fair.method and (cfg.secure_aggregation.enabled
                                     or cfg.privacy.mode in ("central", "distributed")):
        raise ConfigError(
            f"fairness.method = {fair.method!r} weighs each site's own update, which secure "
            "aggregation and central or distributed DP hide or fix: set "
            'secure_aggregation.enabled = false and privacy.mode = "none" or "local", or '
            'choose fairness.method = "reweigh" or "thresholds"'
        )
    if "fairfed" in fair.method and cfg.aggregation.rule != "mean":
        raise ConfigError(
            f"fairness.method = {fair.method!r} sets the weights of the weighted mean; "
            f"aggregation.rule = {cfg.aggregation.rule!r} does not average by weight: set "
            'aggregation.rule = "mean" or choose another fairness.method'
        )
    if not 0 <= fair.beta < float("inf"):
        raise ConfigError(
            f"fairness.beta = {fair.beta!r} is not allowed: expected a finite number >= 0 "
            "(FairFed's step on the aggregation weights; 1 in the paper, 0 = FedAvg)"
        )
    if fair.method != "none" and fair.column not in ev.groups:
        raise ConfigError(
            f"fairness.method = {fair.method!r} needs fairness.column, one of "
            f"evaluation.groups (found {fair.column!r} and groups {list(ev.groups)}); e.g. "
            'evaluation.groups = ["sex"] and fairness.column = "sex", so that the gap it '
            "narrows is reported"
        )


def _check_distributed(cfg: ExperimentConfig) -> None:
    """``privacy.mode = "distributed"``: what the sites need to add their own noise."""
    p = cfg.privacy
    if not cfg.secure_aggregation.enabled:
        raise ConfigError(
            "privacy.mode = \"distributed\" adds each site's noise before secure aggregation, "
            "so that the server sees only the noised sum: set secure_aggregation.enabled = true "
            "(or use privacy.mode = \"central\")"
        )
    if p.adaptive:
        raise ConfigError(
            "privacy.mode = \"distributed\" has no adaptive clipping (its noise is fixed by the "
            "sites' approved config): set privacy.adaptive = false and choose privacy.clip"
        )
    if p.accountant != "rdp":
        raise ConfigError(
            "privacy.mode = \"distributed\" accounts each round as rho-zCDP (Kairouz et al. "
            "2021), composed by the RDP accountant: set privacy.accountant = \"rdp\""
        )
    if cfg.sampling.clients_per_round < 1:
        raise ConfigError(
            "privacy.mode = \"distributed\" needs sampling.clients_per_round: the number of "
            "sites whose noise together makes the round's noise (each site divides its share by "
            "it, and a site does not know the population)"
        )


def check_rule(name: str, params: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` unless ``name`` is ``mean`` or a robust rule taking ``params``
    (FLTrust's ``root_examples`` and root update are the simulation's; checked there)."""
    if name == "mean":
        if params:
            raise ConfigError(
                f"aggregation.rule = \"mean\" takes no parameters, found {sorted(params)}; set "
                "aggregation.rule to a robust rule or remove them"
            )
        return
    from consortium.aggregation.robust import RULES, make_rule
    from consortium.errors import PipelineError

    if name not in RULES:
        raise ConfigError(
            f"aggregation.rule = {name!r} is not a rule; known rules: mean, {', '.join(sorted(RULES))}"
        )
    trial = dict(params)
    if name == "fltrust":
        root = trial.pop("root_examples", 100)
        if isinstance(root, bool) or not isinstance(root, int) or root < 1:
            raise ConfigError(f"aggregation.root_examples = {root!r} must be an integer >= 1")
        trial["root_update"] = lambda ctx: None
    try:
        make_rule(name, **trial)
    except PipelineError as exc:
        raise ConfigError(str(exc)) from exc


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {_type_name(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {_type_name(tp)}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("unions are not used in the config")  # our own invariant
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected a string")
        return value
    raise AssertionError(f"unsupported config type {tp}")  # our own invariant


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, found {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if cls in _OPEN_SECTIONS:  # the rule's or attack's own parameters, checked by its factory
        if "params" in data:
            raise ConfigError(f"write {prefix}params' keys directly in [{prefix.rstrip('.')}]")
        params = tuple((k, _param_value(data[k], f"{prefix}{k}")) for k in unknown)
        data = {k: v for k, v in data.items() if k in known}
        data["params"] = params
        unknown = []
    if unknown:
        where = f"section [{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' in {where}; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if name == "params" and cls in _OPEN_SECTIONS:
            kwargs[name] = value
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(tp, value, f"{prefix}{name}")
    return cls(**kwargs)


def _param_value(value: Any, key: str) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return tuple(value)
    raise ConfigError(f"{key} = {value!r} is not allowed: expected a number, string, boolean or list")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, _OPEN_SECTIONS):
        plain = {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "params"}
        return {**plain, **{k: _to_plain(v) for k, v in obj.params}}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


# -- overrides ------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as TOML, and a bare word is a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``--set`` overrides applied."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc


def default_config_dict() -> dict[str, Any]:
    """The embedded default experiment: heart disease across four hospitals."""
    from importlib.resources import files

    text = files("consortium").joinpath("default.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment file (or the embedded default), apply overrides and validate.

    Without a file the embedded default (the heart-disease demo) is the base: the keys it sets
    that the user did not (by ``--set``) are remembered as defaults (:func:`defaulted_keys`),
    so that the demo's ``sampling.clients_per_round = 4`` can give way on a smaller federation
    (:func:`fit_default_cohort`). A run name the user did not set follows the data set (the
    data file's name for csv and parquet), not the demo's "heart-disease".
    """
    data = read_toml(path) if path is not None else default_config_dict()
    if path is not None:  # a model module beside the experiment file imports (models/zoo.py)
        remember_experiment_folder(Path(path))
    user = {".".join(parse_override(o)[0]) for o in overrides or []}
    defaulted = set() if path is not None else _leaf_keys(data) - user
    data = _one_sampling_mode(data, overrides or [])
    data = apply_overrides(data, overrides or [])
    if "name" not in user and (path is None or "name" not in data):
        data = {**data, "name": _data_name(data.get("data", {}))}
    cfg = ExperimentConfig.from_dict(data)
    object.__setattr__(cfg, _DEFAULTED, frozenset(defaulted))
    return cfg


_DEFAULTED = "_defaulted_keys"


def defaulted_keys(cfg: ExperimentConfig) -> frozenset[str]:
    """The dotted keys of ``cfg`` that came from the embedded default experiment rather than
    from the user (a file or ``--set``): empty for a config from a file, a dict or code (then
    every value counts as the user's), and for a copy made with ``replace``."""
    return frozenset(getattr(cfg, _DEFAULTED, frozenset()))


def fit_default_cohort(cfg: ExperimentConfig, population: int) -> ExperimentConfig:
    """``cfg`` with every client per round when ``sampling.clients_per_round`` came from the
    embedded default (the demo's four hospitals) and the federation has fewer clients, with a
    notice on stderr; unchanged otherwise. A count the user set stays as it is (larger than
    the federation, it is an error when the sampler is built)."""
    s = cfg.sampling
    if "sampling.clients_per_round" not in defaulted_keys(cfg) or s.clients_per_round <= population:
        return cfg
    print(f"consortium: sampling.clients_per_round = {s.clients_per_round} (the default "
          f"experiment's) is more than the {population} clients of this data set; every client "
          "takes part in each round (--set sampling.clients_per_round=N to sample fewer)",
          file=sys.stderr)
    return cfg.replace(sampling=dataclasses.replace(s, clients_per_round=0))


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in data.items():
        keys |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return keys


def _data_name(data: dict[str, Any]) -> str:
    """A run name for the data ``[data]`` describes: the data set, or for csv and parquet the
    name of the file or folder (a glob's folder)."""
    dataset = str(data.get("dataset", DataConfig.dataset))
    path = str(data.get("path", ""))
    if dataset not in ("csv", "parquet") or not path:
        return dataset
    p = Path(path)
    while p.name and any(c in p.name for c in "*?["):
        p = p.parent
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in p.stem).strip("-.")
    return stem or dataset


def _one_sampling_mode(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set sampling.fraction=…`` replaces the file's ``clients_per_round`` (and the other
    way round): the two are alternatives, and the command line wins over the file."""
    keys = {".".join(parse_override(o)[0]) for o in overrides}
    pairs = (("sampling.fraction", "clients_per_round"), ("sampling.clients_per_round", "fraction"))
    for given, other in pairs:
        if given in keys and f"sampling.{other}" not in keys and other in data.get("sampling", {}):
            data = _deep_copy(data)
            del data["sampling"][other]
    return data


# -- the experiment file's folder, for custom models --------------------------------------

_EXPERIMENT_FOLDERS: list[Path] = []


def remember_experiment_folder(path: Path) -> None:
    """Note the folder of an experiment file that was read, so that ``model.name =
    "mymodel:build"`` finds ``mymodel.py`` beside it without ``PYTHONPATH``
    (:func:`consortium.models.zoo.model_factory`)."""
    folder = path.resolve().parent
    if folder not in _EXPERIMENT_FOLDERS:
        _EXPERIMENT_FOLDERS.append(folder)


def experiment_folders() -> tuple[Path, ...]:
    """The folders of the experiment files read in this process, first read first."""
    return tuple(_EXPERIMENT_FOLDERS)

"""Everything a site sends is checked against what an honest site could send (issue 13, points
1, 2 and 5): the extras its algorithm and stages declare, a magnitude no training step
reaches, and data statistics that real rows could have.

Each test plays the adversary with the real hub, codec and validator; the conformance tests
run the real trainers and pipelines so that a declaration can never drift from what honest
clients send.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.aggregation.base import ExtraSpec
from consortium.data.preprocess import SiteSummary, merge_summaries
from consortium.deploy.codec import ResultEnvelope, decode_upload, encode_upload
from consortium.deploy.hub import Hub, RemoteExecutor, SiteInfo, _expected_extras
from consortium.deploy.summary import implausible_summary, summary_from_pb, summary_to_pb
from consortium.deploy.validate import (
    MAX_UPDATE_NORM,
    ExpectedTask,
    RejectedResult,
    update_norm_cap,
    validate_result,
)
from consortium.errors import RoundAborted
from consortium.executors import SequentialExecutor
from consortium.messages import Result, Task
from consortium.types import Parameters, Update
from tests.conftest import make_toy
from tests.deploy.conftest import LAYOUT

# -- extras: declared by the algorithm and the stages ----------------------------------------


class _Validating(SequentialExecutor):
    """The real trainers and client halves, each result sent through the codec and checked as
    the deployed server checks it (the declaration from the run's own client pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.checked: list[dict[str, tuple[int, ...]]] = []

    def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
        layout = tasks[0].parameters.layout if tasks else None
        stages = clients.pipeline.stages
        secure = any(s.name == "secure_aggregation" for s in stages)
        for result in super().fit(tasks, clients):
            task = next(t for t in tasks if t.client_id == result.client_id)
            rows = len(clients[task.client_id].data.train)
            expected = ExpectedTask(
                site=task.client_id, round=task.round, task_id="t", secure=secure,
                max_norm=update_norm_cap(float(task.parameters.vector.norm())),
                extras=_expected_extras(clients, layout, float(rows)),
            )
            assert expected.extras is not None
            envelope = decode_upload(encode_upload(ResultEnvelope("t", result)))
            validate_result(envelope, expected=expected, layout=layout, max_bytes=1 << 26,
                            seen_task_ids=set(), max_weight=float(rows))
            self.checked.append({n: tuple(t.shape) for n, t in result.update.extras.items()})
            yield result


ALGORITHMS = ["fedavg", "fedprox", "scaffold", "fednova"]
PIPELINES: dict[str, dict[str, Any]] = {
    "plain": {},
    "central_dp": {"privacy": {"mode": "central", "noise_multiplier": 0.5, "clip": 0.05,
                               "adaptive": True}},
    "secagg": {"secure_aggregation": {"enabled": True}},
    "central_dp+secagg": {"privacy": {"mode": "central", "noise_multiplier": 0.5, "clip": 0.05,
                                      "adaptive": True},
                          "secure_aggregation": {"enabled": True}},
    "distributed": {"privacy": {"mode": "distributed", "noise_multiplier": 0.5},
                    "secure_aggregation": {"enabled": True}},
}
_PRIVATE_ONLY = {"central_dp", "central_dp+secagg", "distributed"}  # fedavg / fedprox only


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_honest_clients_extras_satisfy_the_declaration(algorithm: str, pipeline: str) -> None:
    """Every algorithm under every client-side stage: two rounds of real training, every
    result accepted by the validator with the declared extras (and at least one extra checked
    wherever the run has any)."""
    from consortium import simulate

    if pipeline in _PRIVATE_ONLY and algorithm in ("scaffold", "fednova"):
        pytest.skip("DP refuses algorithms that send extras in the clear")
    cfg = {
        "rounds": 2, "seed": 1, "evaluation": {"baselines": []},
        "algorithm": {"name": algorithm, "lr": 0.1, "batch_size": 16, "momentum": 0.5
                      if algorithm == "fednova" else 0.0},
        "sampling": {"clients_per_round": 4}, **PIPELINES[pipeline],
    }
    executor = _Validating()
    simulate(cfg, dataset=make_toy(sizes=[40, 60, 25, 33]), executor=executor, report=False)
    assert executor.checked, "no result reached the validator"
    want = {"scaffold": {"scaffold.delta_c"}, "fednova": {"fednova.weighted_a"}}.get(algorithm, set())
    if pipeline.startswith("central_dp"):
        want |= {"dp.unclipped"}
    if pipeline == "distributed":
        want = set()
    assert all(set(c) == want for c in executor.checked)


def _declared_pool(name: str, **cfg: Any):  # type: ignore[no-untyped-def]
    """What RemoteExecutor.fit finds in ``clients``: the run's algorithm, pipeline, settings."""
    from types import SimpleNamespace

    from consortium.aggregation.base import Pipeline
    from consortium.algorithms import build_algorithm
    from consortium.config import ExperimentConfig
    from consortium.simulation import local_training, site_pipeline

    cfg["algorithm"] = {**cfg.get("algorithm", {}), "name": name}
    config = ExperimentConfig.from_dict(cfg)
    algo = build_algorithm(name)
    settings = local_training(config)
    pipe: Pipeline = site_pipeline(config, algo, settings)
    return SimpleNamespace(algorithm=algo, pipeline=pipe, settings=settings)


def test_the_declarations_name_shapes_and_bounds() -> None:
    """Hand-checked: SCAFFOLD's Δc has the model's size, FedNova's w·a is per unit of weight,
    central DP's bit is ±½, and secure aggregation leaves only zeros of each size."""
    layout, size = LAYOUT, LAYOUT.size
    assert _expected_extras(_declared_pool("fedavg"), layout, 90.0) == {}
    assert _expected_extras(_declared_pool("scaffold"), layout, 90.0) == {
        "scaffold.delta_c": ExtraSpec((size,))}
    nova = _expected_extras(_declared_pool("fednova", algorithm={"batch_size": 30}), layout, 90.0)
    assert nova == {"fednova.weighted_a": ExtraSpec((1,), low=0.0, high=3.0, per_weight=True)}
    dp = _expected_extras(_declared_pool("fedavg", privacy={"mode": "central", "clip": 1.0,
                                                             "noise_multiplier": 1.0}), layout, 9.0)
    assert dp == {"dp.unclipped": ExtraSpec((1,), low=-0.5, high=0.5)}
    secure = _expected_extras(_declared_pool("scaffold", secure_aggregation={"enabled": True}),
                              layout, 9.0)
    assert secure == {"scaffold.delta_c": ExtraSpec((size,), low=0.0, high=0.0)}
    assert _expected_extras({}, layout, 9.0) is None  # no pool: names unchecked


# -- the hub: a round with a declared pipeline ------------------------------------------------

def _wire(result: Result, task_id: str) -> ResultEnvelope:
    envelope = decode_upload(encode_upload(ResultEnvelope(task_id, result)))
    assert isinstance(envelope, ResultEnvelope)
    return envelope


def _round(hub: Hub, clients: Any, answers: dict[str, Any], *, params: torch.Tensor | None = None,
           ) -> tuple[list[Result], list[tuple[bool, str]]]:
    """A round through RemoteExecutor.fit with ``clients`` (its declaration); each site in
    ``answers`` sends ``answers[site](task_id)`` (an Update). The acks, in ``answers`` order."""
    import threading
    import time

    sessions = {}
    for site in answers:
        sessions[site] = hub.register(site)
        hub.describe(sessions[site], SiteInfo((3,), 2, 90, 30))
    vector = params if params is not None else torch.tensor([1.0, -2.0, 2.0])
    tasks = [Task(1, s, Parameters(LAYOUT, vector), seed=0, cohort_size=len(answers))
             for s in answers]
    remote = RemoteExecutor(hub, round_timeout=10.0)
    out: list[Result] = []

    def run() -> None:
        try:
            out.extend(remote.fit(tasks, clients))
        except RoundAborted:  # no good result: the round loop records it and goes on
            pass

    thread = threading.Thread(target=run)
    thread.start()
    while len(hub._pending) < len(answers):
        time.sleep(0.01)
    acks = []
    by_site = {p.site: t for t, p in list(hub._pending.items())}
    for site, make in answers.items():
        update = make()
        acks.append(hub.deliver(sessions[site], _wire(Result(1, site, update), by_site[site])))
    thread.join(timeout=20)
    return out, acks


def _scaffold(site: str, dc: torch.Tensor) -> Any:
    return lambda: Update(site, torch.tensor([0.1, 0.2, 0.3]), 90.0, extras={"scaffold.delta_c": dc})


def test_an_extra_of_the_wrong_shape_is_rejected_and_the_round_goes_on(hub: Hub) -> None:
    """The review: SCAFFOLD's Δc of the wrong shape reached the aggregation (RuntimeError)."""
    out, acks = _round(hub, _declared_pool("scaffold"), {
        "a": _scaffold("a", torch.ones(3)),
        "b": _scaffold("b", torch.ones(4)),
    })
    assert acks[0] == (True, "")
    assert not acks[1][0] and "extra 'scaffold.delta_c' has shape (4,), expected (3,)" in acks[1][1]
    assert [(r.client_id, r.update is not None) for r in out] == [("a", True), ("b", False)]


@pytest.mark.parametrize(("extras", "reason"), [
    ({}, "extras missing: ['scaffold.delta_c'], unexpected: []"),
    ({"scaffold.delta_c": torch.ones(3), "x": torch.ones(1)}, "unexpected: ['x']"),
    ({"scaffold.delta_c": torch.ones(3, dtype=torch.float64)}, "is torch.float64, expected float32"),
    ({"scaffold.delta_c": torch.tensor([1.0, float("nan"), 0.0])}, "1 NaN or infinite values"),
    ({"scaffold.delta_c": torch.tensor([3e38, 0.0, 0.0])}, "extra 'scaffold.delta_c' has absurd"),
])
def test_a_missing_unknown_mistyped_or_absurd_extra_is_rejected(
    hub: Hub, extras: dict, reason: str,
) -> None:
    out, acks = _round(hub, _declared_pool("scaffold"), {
        "a": lambda: Update("a", torch.tensor([0.1, 0.2, 0.3]), 90.0, extras=extras)})
    assert not acks[0][0] and reason in acks[0][1], acks
    assert out[0].update is None and "rejected" in (out[0].error or "")


@pytest.mark.parametrize(("bit", "accepted"), [(0.5, True), (-0.5, True), (-1e6, False),
                                                (0.75, False)])
def test_central_dps_clipping_bit_outside_one_half_is_rejected(
    hub: Hub, bit: float, accepted: bool,
) -> None:
    """The review: ``dp.unclipped = -1e6`` under adaptive clipping overflowed the clip update."""
    pool = _declared_pool("fedavg", privacy={"mode": "central", "clip": 1.0,
                                             "noise_multiplier": 1.0, "adaptive": True})
    out, acks = _round(hub, pool, {"a": lambda: Update(
        "a", torch.tensor([0.1, 0.2, 0.3]), 1.0, extras={"dp.unclipped": torch.tensor([bit])})})
    assert acks[0][0] is accepted, acks
    if not accepted:
        assert f"extra 'dp.unclipped' holds {bit:g}, outside its bounds [-0.5, 0.5]" in acks[0][1]


@pytest.mark.parametrize(("weight", "wa", "accepted"), [
    (90.0, 270.0, True),   # 90 examples, 3 steps of batch 30: a = 3
    (90.0, 270.5, False),
    (1.0, 270.0, False),   # a small weight with a large w·a multiplies FedNova's step
    (90.0, -1.0, False),
])
def test_fednovas_normalising_factor_is_bounded_per_unit_of_weight(
    hub: Hub, weight: float, wa: float, accepted: bool,
) -> None:
    pool = _declared_pool("fednova", algorithm={"batch_size": 30})
    out, acks = _round(hub, pool, {"a": lambda: Update(
        "a", torch.tensor([0.1, 0.2, 0.3]), weight,
        extras={"fednova.weighted_a": torch.tensor([wa])})})
    assert acks[0][0] is accepted, acks
    if not accepted:
        assert "extra 'fednova.weighted_a' holds" in acks[0][1]


# -- absurd magnitudes -----------------------------------------------------------------------

def test_the_norm_cap_follows_the_model_up_to_a_float32_safe_maximum() -> None:
    assert update_norm_cap(0.0) == 1e6  # a model at zero may still move
    assert update_norm_cap(30.0) == 3e7
    assert update_norm_cap(1e20) == MAX_UPDATE_NORM
    assert update_norm_cap(math.inf) == MAX_UPDATE_NORM
    # (2**16 updates at the cap)² stays finite in float32: the robust rules' distances
    assert (2**16 * MAX_UPDATE_NORM) ** 2 < float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize(("delta", "accepted"), [
    (torch.tensor([3e38, 0.0, 0.0]), False),  # the review's: every honest site then NaN
    (torch.tensor([0.0, -3.1e6, 0.0]), False),  # ‖x‖ = 3: the cap is 3e6
    (torch.tensor([0.0, 2.9e6, 0.0]), True),
])
def test_an_update_of_absurd_magnitude_is_rejected_naming_its_norm(
    hub: Hub, delta: torch.Tensor, accepted: bool,
) -> None:
    out, acks = _round(hub, _declared_pool("fedavg"), {
        "a": lambda: Update("a", delta, 90.0), "b": lambda: Update("b", torch.ones(3), 90.0)})
    assert acks[1] == (True, "")  # the round goes on with the honest site
    assert acks[0][0] is accepted, acks
    if not accepted:
        norm = float(delta.double().norm())
        assert f"the delta has absurd magnitude: its L2 norm {norm:.3g} exceeds the cap of 3e+06" \
            in acks[0][1]


def test_honest_updates_from_the_real_trainers_are_far_below_the_cap() -> None:
    """Two rounds of every algorithm at a high learning rate: the largest honest update is
    orders of magnitude below the cap (the conformance test above also validates each)."""
    from consortium import simulate

    norms: list[float] = []

    class Record(SequentialExecutor):
        def fit(self, tasks, clients):  # type: ignore[no-untyped-def]
            for r in super().fit(tasks, clients):
                model = float(tasks[0].parameters.vector.norm())
                norms.append(float(r.update.delta.norm()) / update_norm_cap(model))
                yield r

    for algorithm in ALGORITHMS:
        simulate({"rounds": 2, "seed": 2, "evaluation": {"baselines": []},
                  "algorithm": {"name": algorithm, "lr": 1.0, "local_epochs": 3}},
                 dataset=make_toy(), executor=Record(), report=False)
    assert norms and max(norms) < 1e-3


def test_an_absurd_extra_without_a_declaration_is_still_rejected() -> None:
    """Without a declaration (an executor given no client pool) the magnitude still counts."""
    expected = ExpectedTask(site="a", round=1, task_id="t")
    upload = _wire(Result(1, "a", Update("a", torch.zeros(3), 1.0,
                                         extras={"x": torch.full((2,), 1e20)})), "t")
    with pytest.raises(RejectedResult, match="extra 'x' has absurd magnitude"):
        validate_result(upload, expected=expected, layout=LAYOUT, max_bytes=1 << 20,
                        seen_task_ids=set())


# -- encoding statistics ---------------------------------------------------------------------

def _summary(count: list[float], total: list[float], total_sq: list[float], *,
             binary: list[bool] | None = None, categories: tuple = ()) -> SiteSummary:
    d = len(count)
    return SiteSummary(np.array(count, dtype=float), np.array(total, dtype=float),
                       np.array(total_sq, dtype=float), np.zeros(d, dtype=bool),
                       np.array(binary or [False] * d), categories or (frozenset(),) * d)


def _honest(seed: int, rows: int = 40) -> SiteSummary:
    """A real site's summary (the site's own code), with a binary and a categorical column."""
    from consortium.data.preprocess import Column, summarize_site

    rng = np.random.default_rng(seed)
    x = np.empty((rows, 3), dtype=object)
    x[:, 0] = rng.normal(120 + seed, 15, rows)
    x[:, 1] = rng.integers(0, 2, rows).astype(float)
    x[:, 2] = rng.choice(["a", "b", "c"], rows)
    x[0, 0] = np.nan
    columns = [Column("bp", "continuous"), Column("smoker", "binary"), Column("kind", "categorical")]
    return summarize_site(x, columns=columns)


def _wire_summary(summary: SiteSummary) -> SiteSummary:
    return summary_from_pb(type(summary_to_pb(summary)).FromString(
        summary_to_pb(summary).SerializeToString()))


@pytest.mark.parametrize("seed", range(5))
def test_honest_summaries_are_plausible(seed: int) -> None:
    assert implausible_summary(_wire_summary(_honest(seed))) is None


@pytest.mark.parametrize(("summary", "reason"), [
    (_summary([40.0], [1e300], [1e300]), "column 0 has mean 2.5e+298, beyond any float32 value"),
    (_summary([40.0], [40.0], [1e300]), "root mean square"),
    (_summary([4.0], [10.0], [20.0]), "(Σx)² > n·Σx²"),  # 100 > 80
    (_summary([0.0], [1.0], [1.0]), "has no values but sums 1"),
    (_summary([2.5], [1.0], [1.0]), "not a whole number"),
    (_summary([2.0**40], [0.0], [1.0]), "not a whole number in [0, 2**31]"),
    (_summary([10.0], [4.0], [5.0], binary=[True]), "is binary (0 and 1 only) but sums 4"),
    (_summary([10.0], [0.0], [10.0], categories=(frozenset({"a"}),)),
     "lists categories but also 10 numeric values"),
])
def test_implausible_summaries_are_named(summary: SiteSummary, reason: str) -> None:
    why = implausible_summary(_wire_summary(summary))
    assert why is not None and reason in why, why


def _summarize(hub: Hub, site: str, summary: SiteSummary) -> str | None:
    return hub.submit_summary(hub.register(site), _wire_summary(summary))


def test_a_site_with_column_sums_of_1e300_is_excluded_and_the_others_merge_without_it(
    tmp_path, caplog,
) -> None:
    """The review: column sums of 1e300 made every honest site exit and the run never started.
    Now that site is refused, named (log and audit) and expelled; the merge waits for one site
    fewer and equals the merge of the honest sites alone; the start waits for one fewer."""
    import asyncio

    from consortium.deploy.audit import AuditLog, verify

    audit = AuditLog(tmp_path / "audit.jsonl")
    hub = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=1 << 20,
              audit=audit, summaries_expected=3)
    honest = {"a": _honest(1), "c": _honest(3)}
    assert _summarize(hub, "a", honest["a"]) is None
    poisoned = _honest(2)
    poisoned = SiteSummary(poisoned.count, poisoned.total + np.array([1e300, 0.0, 0.0]),
                           poisoned.total_sq, poisoned.has_missing, poisoned.binary,
                           poisoned.categories)
    why = _summarize(hub, "b", poisoned)
    assert why is not None and "site 'b' is excluded from the run" in why and "mean" in why
    assert any("site 'b' is excluded from the run" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)  # the operator's line
    assert hub.merged is None  # still waiting for c
    assert _summarize(hub, "c", honest["c"]) is None
    expected = merge_summaries([_wire_summary(honest["a"]), _wire_summary(honest["c"])])
    for field in ("count", "total", "total_sq", "has_missing", "binary"):
        assert np.array_equal(getattr(hub.merged, field), getattr(expected, field)), field
    assert hub.merged.categories == expected.categories
    with pytest.raises(PermissionError, match="excluded from the run"):
        hub.register("b")  # its later calls are refused with the reason
    for site in ("a", "c"):
        hub.describe(hub._sites[site].session, SiteInfo((3,), 2, 40, 10))
    assert sorted(hub.wait_for_sites(3, timeout_s=1.0)) == ["a", "c"]  # one fewer
    audit.close()
    kinds = verify(tmp_path / "audit.jsonl").kinds
    assert kinds["expelled"] == 1 and kinds["summary"] == 2


def test_the_last_site_excluded_completes_the_merge_of_the_others(hub: Hub) -> None:
    hub.summaries_expected = 2
    assert _summarize(hub, "a", _honest(1)) is None
    assert hub.merged is None
    assert _summarize(hub, "b", _summary([40.0, 40.0, 0.0], [1e300, 0.0, 0.0],
                                         [1.0, 0.0, 0.0])) is not None
    assert hub.merged is not None and np.array_equal(hub.merged.total, _honest(1).total)


def test_a_site_declaring_fewer_rows_than_its_summary_counted_is_excluded(hub: Hub) -> None:
    hub.summaries_expected = 2
    a, b = hub.register("a"), hub.register("b")
    assert hub.submit_summary(a, _wire_summary(_honest(1, rows=40))) is None
    assert hub.submit_summary(b, _wire_summary(_honest(2, rows=40))) is None
    assert hub.describe(a, SiteInfo((3,), 2, 40, 10)) is None
    why = hub.describe(b, SiteInfo((3,), 2, 20, 10))  # its summary counted 40 values
    assert why is not None and "counts 40 values in a column, but it declares 20" in why
    assert "b" in hub.expelled
    assert sorted(hub.wait_for_sites(2, timeout_s=1.0)) == ["a"]


def test_a_summary_with_another_number_of_columns_is_refused_not_merged(hub: Hub) -> None:
    """It used to raise inside the merge, so no site ever got an encoding."""
    hub.summaries_expected = 2
    assert _summarize(hub, "a", _honest(1)) is None
    why = _summarize(hub, "b", _summary([1.0], [1.0], [1.0]))
    assert why is not None and "1 columns, the others' 3" in why
    assert hub.merged is not None  # the merge went on with a alone


def test_a_site_refuses_a_merged_encoding_that_is_not_finite() -> None:
    """At the site: features beyond float32 (a poisoned merge) are a clear error, not NaN
    losses for the rest of the run."""
    from consortium.deploy.client import SiteRunner
    from consortium.errors import ConsortiumError

    x = np.array([[1e39], [0.0]])
    with pytest.raises(ConsortiumError, match="NaN or infinite features"):
        SiteRunner._client_data(x, [0, 1], x, [0, 1])

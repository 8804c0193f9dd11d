"""The pipeline: order of the halves, capability checks, ``pipeline(...)``, and the conformance
suite that every built-in stage, aggregator and server optimiser goes through."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import consortium.aggregation
from consortium.aggregation.base import (
    Aggregate,
    ClientContext,
    Pipeline,
    RoundContext,
    pipeline,
)
from consortium.aggregation.bound import bound_updates
from consortium.aggregation.clipping import clip_by_l2_norm
from consortium.aggregation.fairfed import FairFedWeights
from consortium.aggregation.frozen import keep_frozen
from consortium.aggregation.mean import weighted_mean
from consortium.aggregation.optimizers import SERVER_OPTIMIZERS, adam, avgm, server_optimizer, sgd
from consortium.aggregation.robust import (
    bulyan,
    centered_clipping,
    flame,
    fltrust,
    geometric_median,
    krum,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)
from consortium.errors import PipelineError
from consortium.types import Layout, TensorSpec, Update

LAYOUT = Layout((TensorSpec("w", (2, 3), torch.float32), TensorSpec("b", (3,), torch.float32)))
SMALL = Layout((TensorSpec("w", (2,), torch.float32),))


def round_ctx(layout: Layout = SMALL, *, seed: int = 7) -> RoundContext:
    return RoundContext(round=1, seed=seed, population=4, sampled=2, layout=layout)


def client_ctx(client_id: str = "a") -> ClientContext:
    return ClientContext(round=1, client_id=client_id, seed=11)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- small stages and aggregators for these tests ------------------------------------------------


@dataclass(eq=False)
class Recorder:
    """Writes every call of each half into a shared log; passes the update through."""

    name: str
    log: list[tuple[str, ...]]
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()

    def init(self, layout: Layout) -> dict[str, Any]:
        return {"server_calls": 0}

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"from": self.name}

    def client(self, update: Update, payload: dict[str, Any], ctx: ClientContext) -> Update:
        self.log.append(("client", self.name, update.client_id, payload["from"]))
        return update

    def receive(self, update: Update, state: dict[str, Any], ctx: RoundContext) -> Update:
        self.log.append(("receive", self.name, update.client_id))
        return update

    def server(self, agg: Aggregate, state: dict[str, Any], ctx: RoundContext):
        self.log.append(("server", self.name))
        return agg, {"server_calls": state["server_calls"] + 1}


@dataclass(eq=False)
class RecordingMean:
    """The weighted mean, logging each accumulate and the finalize."""

    log: list[tuple[str, ...]]
    name: str = "recording_mean"
    needs: frozenset[str] = frozenset()
    inner: Any = field(default_factory=weighted_mean)

    def start(self, layout: Layout):
        return self.inner.start(layout)

    def accumulate(self, acc, update: Update):
        self.log.append(("accumulate", update.client_id))
        return self.inner.accumulate(acc, update)

    def finalize(self, acc) -> Aggregate:
        self.log.append(("finalize",))
        return self.inner.finalize(acc)


@dataclass(eq=False)
class BufferedMedian:
    """A buffered aggregator that needs every individual update (like median or Krum)."""

    log: list[tuple[str, ...]] = field(default_factory=list)
    name: str = "median"
    needs: frozenset[str] = frozenset({"individual_updates"})

    def aggregate(self, updates: list[Update], *, ctx: RoundContext) -> Aggregate:
        self.log.append(("aggregate", *[u.client_id for u in updates]))
        stacked = torch.stack([u.delta for u in updates])
        return Aggregate(stacked.median(dim=0).values, sum(u.weight for u in updates), len(updates))


@dataclass(frozen=True)
class Shift:
    """Adds ``k`` on the client, subtracts it on receipt; adds ``k`` on the server."""

    k: float
    name: str = "shift"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()

    def init(self, layout: Layout) -> dict[str, Any]:
        return {"total": torch.zeros(1)}

    def client(self, update: Update, payload: dict[str, Any], ctx: ClientContext) -> Update:
        return replace(update, delta=update.delta + self.k)

    def receive(self, update: Update, state: dict[str, Any], ctx: RoundContext) -> Update:
        return replace(update, delta=update.delta - self.k)

    def server(self, agg: Aggregate, state: dict[str, Any], ctx: RoundContext):
        return replace(agg, delta=agg.delta + self.k), {"total": state["total"] + self.k}


@dataclass(frozen=True)
class Scale:
    """Multiplies by ``k`` on the client, divides on receipt; multiplies on the server."""

    k: float
    name: str = "scale"
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()

    def init(self, layout: Layout) -> dict[str, Any]:
        return {}

    def client(self, update: Update, payload: dict[str, Any], ctx: ClientContext) -> Update:
        return replace(update, delta=update.delta * self.k)

    def receive(self, update: Update, state: dict[str, Any], ctx: RoundContext) -> Update:
        return replace(update, delta=update.delta / self.k)

    def server(self, agg: Aggregate, state: dict[str, Any], ctx: RoundContext):
        return replace(agg, delta=agg.delta * self.k), state


@dataclass(frozen=True)
class Capability:
    """A stage that only declares what it needs and gives (for the build-time checks)."""

    name: str
    needs: frozenset[str] = frozenset()
    gives: frozenset[str] = frozenset()

    def init(self, layout: Layout) -> dict[str, Any]:
        return {}


def secure_sum() -> Capability:
    return Capability("secure_sum", gives=frozenset({"sum_only"}))


# -- order of the halves ----------------------------------------------------------------------


def test_client_halves_in_list_order_server_halves_in_reverse() -> None:
    log: list[tuple[str, ...]] = []
    p = Pipeline(
        [Recorder("A", log), Recorder("B", log), Recorder("C", log)], aggregator=RecordingMean(log)
    )
    state = p.init(SMALL)
    payloads = p.broadcast(state)
    updates = [
        p.client(Update(cid, vec(1.0, 2.0), 1.0), payloads, client_ctx(cid)) for cid in ("u1", "u2")
    ]
    assert log == [
        ("client", "A", "u1", "A"),
        ("client", "B", "u1", "B"),
        ("client", "C", "u1", "C"),
        ("client", "A", "u2", "A"),
        ("client", "B", "u2", "B"),
        ("client", "C", "u2", "C"),
    ]
    log.clear()
    agg, new_state = p.aggregate(iter(updates), state, round_ctx())
    # each update is decoded (receive halves, reverse order) before it is accumulated
    assert log == [
        ("receive", "C", "u1"),
        ("receive", "B", "u1"),
        ("receive", "A", "u1"),
        ("accumulate", "u1"),
        ("receive", "C", "u2"),
        ("receive", "B", "u2"),
        ("receive", "A", "u2"),
        ("accumulate", "u2"),
        ("finalize",),
        ("server", "C"),
        ("server", "B"),
        ("server", "A"),
    ]
    assert agg is not None and agg.count == 2
    assert [s["server_calls"] for s in new_state.stages] == [1, 1, 1]
    assert [s["server_calls"] for s in state.stages] == [0, 0, 0]  # returned, not mutated


def test_receive_halves_run_before_a_buffered_aggregator() -> None:
    log: list[tuple[str, ...]] = []
    median = BufferedMedian(log)
    p = Pipeline([Recorder("A", log), Recorder("B", log)], aggregator=median)
    updates = [Update(cid, vec(float(i), 0.0), 1.0) for i, cid in enumerate(("u1", "u2", "u3"))]
    agg, _ = p.aggregate(iter(updates), p.init(SMALL), round_ctx())
    assert log == [
        ("receive", "B", "u1"),
        ("receive", "A", "u1"),
        ("receive", "B", "u2"),
        ("receive", "A", "u2"),
        ("receive", "B", "u3"),
        ("receive", "A", "u3"),
        ("aggregate", "u1", "u2", "u3"),
        ("server", "B"),
        ("server", "A"),
    ]
    assert agg is not None and agg.delta.tolist() == [1.0, 0.0]


def test_encoding_and_decoding_pair_up_like_nested_wrappers() -> None:
    p = Pipeline([Shift(1.0), Scale(2.0)])
    state = p.init(SMALL)
    sent = p.client(Update("a", vec(1.0, 2.0), 1.0), p.broadcast(state), client_ctx())
    # client halves in order: (x + 1) · 2
    assert sent.delta.tolist() == [4.0, 6.0]
    agg, new_state = p.aggregate([sent], state, round_ctx())
    # receive halves in reverse: /2 then -1 gives x back exactly; a wrong order gives (4-1)/2 = 1.5.
    # Server halves in reverse: scale then shift, 2·x + 1 = (3, 5); a wrong order gives (4, 6).
    assert agg is not None and agg.delta.tolist() == [3.0, 5.0]
    assert new_state.stages[0]["total"].tolist() == [1.0]


def test_client_halves_refuse_a_task_without_one_payload_per_stage() -> None:
    p = Pipeline([Shift(1.0), Scale(2.0)])
    with pytest.raises(PipelineError, match="1 stage payloads but the pipeline has 2 stages"):
        p.client(Update("a", vec(1.0, 2.0), 1.0), ({},), client_ctx())


def test_no_updates_gives_no_aggregate_and_leaves_the_state() -> None:
    log: list[tuple[str, ...]] = []
    p = Pipeline([Recorder("A", log)])
    state = p.init(SMALL)
    agg, same = p.aggregate(iter([]), state, round_ctx())
    assert agg is None and same is state
    assert log == []


def test_stages_without_optional_halves_are_skipped() -> None:
    log: list[tuple[str, ...]] = []
    p = Pipeline([Capability("plain"), Recorder("A", log)])
    state = p.init(SMALL)
    assert p.broadcast(state) == ({}, {"from": "A"})
    u = p.client(Update("a", vec(1.0, 2.0), 1.0), p.broadcast(state), client_ctx())
    agg, _ = p.aggregate([u], state, round_ctx())
    assert agg is not None and agg.delta.tolist() == [1.0, 2.0]


def test_step_applies_the_optimiser_and_threads_its_state() -> None:
    p = Pipeline(optimizer=avgm(lr=1.0, momentum=0.5))
    state = p.init(SMALL)
    x, state = p.step(vec(0.0, 0.0), vec(1.0, 2.0), state)  # m = (1, 2), x = (1, 2)
    x, state = p.step(x, vec(1.0, 2.0), state)  # m = (1.5, 3), x = (2.5, 5)
    assert x.tolist() == [2.5, 5.0]
    assert state.optimizer["m"].tolist() == [1.5, 3.0]


# -- capabilities -------------------------------------------------------------------------------


def test_sum_only_stage_before_an_aggregator_needing_individual_updates_raises() -> None:
    with pytest.raises(PipelineError) as info:
        Pipeline([secure_sum()], aggregator=BufferedMedian())
    message = str(info.value)
    assert "'median'" in message
    assert "individual_updates" in message
    assert "secure-aggregation" in message
    assert "weighted_mean()" in message  # says how to fix it


def test_the_same_aggregators_are_fine_where_capabilities_allow() -> None:
    # building raises on a capability conflict; these two must build and keep their parts
    summed = Pipeline([secure_sum()], aggregator=weighted_mean())
    assert summed.streaming and summed.aggregator.name == "weighted_mean"
    buffered = Pipeline([Capability("clip")], aggregator=BufferedMedian())
    assert not buffered.streaming and buffered.describe().startswith("clip")


def test_a_stage_after_secure_aggregation_cannot_need_individual_updates() -> None:
    needs_each = Capability("inspect", needs=frozenset({"individual_updates"}))
    Pipeline([needs_each, secure_sum()])
    with pytest.raises(PipelineError, match="'inspect' needs"):
        Pipeline([secure_sum(), needs_each])


def test_a_stage_needing_what_no_earlier_stage_gives_raises() -> None:
    clip = Capability("clip", gives=frozenset({"clipped"}))
    noise = Capability("noise", needs=frozenset({"clipped"}))
    Pipeline([clip, noise])
    with pytest.raises(PipelineError, match=r"'noise' needs \['clipped'\].*before 'noise'"):
        Pipeline([noise])
    with pytest.raises(PipelineError, match="'noise' needs"):
        Pipeline([noise, clip])  # order matters: the giver must come first


@pytest.mark.parametrize(
    "part", [weighted_mean(), sgd(), object()], ids=["aggregator", "optimizer", "object"]
)
def test_a_non_stage_in_the_stage_list_raises(part: Any) -> None:
    with pytest.raises(PipelineError, match="not a pipeline stage"):
        Pipeline([part])


def test_an_aggregator_without_an_interface_raises() -> None:
    @dataclass
    class Nothing:
        name: str = "nothing"
        needs: frozenset[str] = frozenset()

    with pytest.raises(PipelineError, match="is not an aggregator"):
        Pipeline(aggregator=Nothing())


# -- pipeline(...) ------------------------------------------------------------------------------


def test_pipeline_sorts_parts_into_stages_aggregator_and_optimizer() -> None:
    a, b = Capability("a"), Capability("b")
    mean, opt = weighted_mean(), adam(lr=0.1)
    p = pipeline(a, opt, b, mean)
    assert p.stages == (a, b)
    assert p.aggregator is mean
    assert p.optimizer is opt
    assert p.describe() == "a → b → weighted_mean → adam"


def test_pipeline_accepts_a_buffered_aggregator() -> None:
    median = BufferedMedian()
    p = pipeline(Capability("a"), median)
    assert p.aggregator is median and not p.streaming


def test_pipeline_defaults_are_the_weighted_mean_and_sgd_lr_one() -> None:
    p = pipeline(Capability("a"))
    assert p.aggregator.name == "weighted_mean" and p.streaming
    assert p.optimizer.name == "sgd" and p.optimizer.lr == 1.0


def test_pipeline_rejects_two_aggregators() -> None:
    with pytest.raises(PipelineError, match="two aggregators.*'weighted_mean'.*'median'"):
        pipeline(weighted_mean(), Capability("a"), BufferedMedian())


def test_pipeline_rejects_two_optimisers() -> None:
    with pytest.raises(PipelineError, match="two server optimisers.*'sgd'.*'adam'"):
        pipeline(sgd(), adam())


def test_pipeline_checks_capabilities_too() -> None:
    with pytest.raises(PipelineError, match="secure-aggregation"):
        pipeline(secure_sum(), BufferedMedian())


# -- conformance: every built-in part through the same checks ------------------------------------


@dataclass(frozen=True)
class Part:
    build: Callable[[], Any]
    linear: bool = False  # commutes with summation (checked for aggregators)


# Every public factory in consortium.aggregation must appear here (see the coverage test below).
CONFORMANCE: dict[str, Part] = {
    "weighted_mean": Part(weighted_mean, linear=True),
    "clip_by_l2_norm": Part(lambda: clip_by_l2_norm(0.5)),
    "sgd": Part(lambda: server_optimizer("sgd")),
    "avgm": Part(lambda: server_optimizer("avgm")),
    "adam": Part(lambda: server_optimizer("adam")),
    "yogi": Part(lambda: server_optimizer("yogi")),
    "adagrad": Part(lambda: server_optimizer("adagrad")),
    # robust rules (consortium.aggregation.robust); the suite's rounds have 4 clients, so the
    # Krum family runs with f = 0 (Krum needs n ≥ 2f + 3, Bulyan n ≥ 4f + 3)
    "median": Part(lambda: median(f=1)),
    "trimmed_mean": Part(lambda: trimmed_mean(f=1)),
    "krum": Part(lambda: krum(f=0)),
    "multi_krum": Part(lambda: multi_krum(f=0)),
    "bulyan": Part(lambda: bulyan(f=0)),
    "geometric_median": Part(lambda: geometric_median(f=1)),
    "centered_clipping": Part(lambda: centered_clipping(tau=1.0, iterations=2, momentum=0.5)),
    "norm_bound": Part(lambda: norm_bound()),
    "fltrust": Part(lambda: fltrust(lambda ctx: torch.linspace(-1.0, 1.0, ctx.layout.size))),
    "flame": Part(lambda: flame(f=1)),
    # the update bound wraps any aggregator; at 1 × the median it clips half of every round
    "bound_updates": Part(lambda: bound_updates(weighted_mean(), 1.0)),
    "bound_updates[centered_clipping]": Part(
        lambda: bound_updates(centered_clipping(tau=1.0, momentum=0.5), 1.0)
    ),
    # FairFed's weights (issue 16), with local gaps that move them every round
    "fairfed_weights": Part(lambda: FairFedWeights(
        weighted_mean(), ("c0", "c1", "c2", "c3"), (1.0, 2.0, 3.0, 4.0),
        lambda params, ids: (0.2, {c: 0.05 * i for i, c in enumerate(ids)}), beta=1.0)),
    # FedAdam whose step never moves the bias "b" (frozen parameters, issue 14)
    "keep_frozen": Part(lambda: keep_frozen(adam(), torch.arange(LAYOUT.size) >= 6)),
}
NOT_PARTS = {  # builders and helpers, not parts
    "pipeline", "server_optimizer", "make_rule", "check_multiplier", "enforce_norm",
    "frozen_mask", "fairfed_step",
    "buffer_weight", "buffer_weights", "check_weighting",  # FedBuff's buffer weights (async)
}


def random_vector(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def checkpointed(state: Any) -> Any:
    """``state`` written as a checkpoint (safetensors for tensors, JSON for the rest), read back."""
    tensors: dict[str, torch.Tensor] = {}

    def split(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj
            return {"$tensor": key}
        if isinstance(obj, dict):
            return {k: split(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [split(v, f"{key}/{i}") for i, v in enumerate(obj)]
        return obj

    meta = json.loads(json.dumps(split(state, "s")))
    back = load_tensors(save_tensors(tensors))

    def join(obj: Any) -> Any:
        if isinstance(obj, dict):
            return (
                back[obj["$tensor"]]
                if set(obj) == {"$tensor"}
                else {k: join(v) for k, v in obj.items()}
            )
        if isinstance(obj, list):
            return [join(v) for v in obj]
        return obj

    return join(meta)


def structure(obj: Any) -> Any:
    """Keys, and for tensors shape and dtype; plain values as they are."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: structure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [structure(v) for v in obj]
    return type(obj).__name__


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def float_tensors(obj: Any) -> list[torch.dtype]:
    if isinstance(obj, torch.Tensor):
        return [obj.dtype]
    if isinstance(obj, dict):
        return [d for v in obj.values() for d in float_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [d for v in obj for d in float_tensors(v)]
    return []


def clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone(v) for v in obj]
    return obj


def check_state(state: Any, layout: Layout) -> None:
    assert isinstance(state, dict), f"state must be a dict, got {type(state).__name__}"
    dtypes = float_tensors(state)
    assert all(d == torch.float32 for d in dtypes), f"state tensors must be float32, found {dtypes}"
    assert same(checkpointed(state), state), "state does not survive a checkpoint unchanged"


def check_optimizer(opt: Any) -> None:
    d = LAYOUT.size
    state0 = opt.init(LAYOUT)
    check_state(state0, LAYOUT)

    def run(state: Any) -> tuple[list[torch.Tensor], Any]:
        x, xs = random_vector(d, 0), []
        for t in (1, 2, 3):
            x, state = opt.step(x, random_vector(d, t), state)
            xs.append(x)
        return xs, state

    x0, delta, kept = random_vector(d, 0), random_vector(d, 1), clone(state0)
    x1, state1 = opt.step(x0, delta, state0)
    assert same(state0, kept) and torch.equal(x0, random_vector(d, 0)), "step changed its inputs"
    assert x1.dtype == torch.float32 and x1.shape == (d,)
    assert structure(state1) == structure(state0), "step changed the state's structure"
    check_state(state1, LAYOUT)
    assert not torch.equal(x1, x0), "a non-zero delta did not move the model"

    xs_a, end_a = run(opt.init(LAYOUT))
    xs_b, end_b = run(opt.init(LAYOUT))
    assert all(torch.equal(a, b) for a, b in zip(xs_a, xs_b)) and same(end_a, end_b), (
        "not deterministic"
    )
    # resuming from a checkpointed state gives the same next step
    direct, _ = opt.step(x1, random_vector(d, 2), state1)
    resumed, _ = opt.step(x1, random_vector(d, 2), checkpointed(state1))
    assert torch.equal(direct, resumed)


def updates_for(layout: Layout, seed: int, n: int = 4) -> list[Update]:
    return [
        Update(
            f"c{i}",
            random_vector(layout.size, seed * 100 + i),
            float(i + 1),
            extras={"e": random_vector(2, seed * 100 + 50 + i)},
        )
        for i in range(n)
    ]


def check_aggregator(agg: Any, *, linear: bool) -> None:
    p = Pipeline(aggregator=agg)
    ctx = round_ctx(LAYOUT)
    if p.stateful:
        check_aggregator_state(agg)

    def run(updates: list[Update]) -> Aggregate:
        out, _ = p.aggregate(iter(updates), p.init(LAYOUT), ctx)
        assert out is not None
        return out

    updates = updates_for(LAYOUT, 1)
    kept = [clone(u.delta) for u in updates]
    out = run(updates)
    assert all(torch.equal(u.delta, k) for u, k in zip(updates, kept)), (
        "aggregator changed an update"
    )
    assert out.delta.dtype == torch.float32 and out.delta.shape == (LAYOUT.size,)
    assert all(v.dtype == torch.float32 for v in out.extras.values())
    again = run(updates_for(LAYOUT, 1))
    assert torch.equal(out.delta, again.delta), "not deterministic"
    assert all(torch.equal(out.extras[k], again.extras[k]) for k in out.extras)
    if linear:
        a, b = updates_for(LAYOUT, 1), updates_for(LAYOUT, 2)
        summed = [replace(x, delta=x.delta + y.delta) for x, y in zip(a, b)]
        assert torch.allclose(run(summed).delta, run(a).delta + run(b).delta, atol=1e-6)


def check_aggregator_state(agg: Any) -> None:
    """A stateful aggregator: state kept as given, float32, checkpointable, resumable."""
    ctx = round_ctx(LAYOUT)
    state0 = agg.init(LAYOUT)
    check_state(state0, LAYOUT)
    kept = clone(state0)
    _, state1 = agg.aggregate(updates_for(LAYOUT, 1), ctx=ctx, state=state0)
    assert same(state0, kept), "aggregate changed the state it was given"
    check_state(state1, LAYOUT)
    assert structure(state1) == structure(state0), "aggregate changed the state's structure"
    direct, _ = agg.aggregate(updates_for(LAYOUT, 2), ctx=ctx, state=state1)
    resumed, _ = agg.aggregate(updates_for(LAYOUT, 2), ctx=ctx, state=checkpointed(state1))
    assert torch.equal(direct.delta, resumed.delta), "a resumed state gives another aggregate"


def check_stage(stage: Any) -> None:
    state0 = stage.init(LAYOUT)
    check_state(state0, LAYOUT)
    ctx = round_ctx(LAYOUT)
    payload = stage.broadcast(state0) if hasattr(stage, "broadcast") else {}
    if hasattr(stage, "client"):
        u = updates_for(LAYOUT, 1)[0]
        a = stage.client(u, payload, client_ctx("c0"))
        b = stage.client(updates_for(LAYOUT, 1)[0], payload, client_ctx("c0"))
        assert a.delta.dtype == torch.float32 and a.delta.shape == (LAYOUT.size,)
        assert torch.equal(a.delta, b.delta), "client half not deterministic under a seed"
    if hasattr(stage, "receive"):
        a = stage.receive(updates_for(LAYOUT, 1)[0], state0, ctx)
        b = stage.receive(updates_for(LAYOUT, 1)[0], state0, ctx)
        assert a.delta.dtype == torch.float32 and torch.equal(a.delta, b.delta)
    if hasattr(stage, "server"):
        kept = clone(state0)
        agg = Aggregate(random_vector(LAYOUT.size, 3), 10.0, 4)
        out_a, state_a = stage.server(agg, state0, ctx)
        out_b, state_b = stage.server(
            Aggregate(random_vector(LAYOUT.size, 3), 10.0, 4), state0, ctx
        )
        assert same(state0, kept), "server half changed the state it was given"
        assert out_a.delta.dtype == torch.float32 and out_a.delta.shape == (LAYOUT.size,)
        assert torch.equal(out_a.delta, out_b.delta) and same(state_a, state_b), "not deterministic"
        check_state(state_a, LAYOUT)
        assert structure(state_a) == structure(state0), "server half changed the state's structure"


def check_part(part: Any, *, linear: bool = False) -> None:
    if hasattr(part, "gives"):
        check_stage(part)
    elif hasattr(part, "step"):
        check_optimizer(part)
    else:
        check_aggregator(part, linear=linear)


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance(name: str) -> None:
    entry = CONFORMANCE[name]
    check_part(entry.build(), linear=entry.linear)


def test_every_server_optimizer_is_in_the_conformance_suite() -> None:
    assert set(SERVER_OPTIMIZERS) <= set(CONFORMANCE)


def test_every_public_factory_of_the_aggregation_package_is_in_the_conformance_suite() -> None:
    factories = set()
    for info in pkgutil.iter_modules(consortium.aggregation.__path__):
        module = importlib.import_module(f"consortium.aggregation.{info.name}")
        for name in getattr(module, "__all__", []):
            if inspect.isfunction(getattr(module, name)) and name not in NOT_PARTS:
                factories.add(name)
    missing = factories - set(CONFORMANCE)
    assert not missing, (
        f"add {sorted(missing)} to CONFORMANCE in tests/aggregation/test_pipeline.py"
    )


# The checks themselves must be able to fail.


def test_conformance_accepts_a_well_behaved_stage() -> None:
    check_part(Shift(0.5))


@dataclass(frozen=True)
class DoubleState(Shift):
    def server(self, agg: Aggregate, state: dict[str, Any], ctx: RoundContext):
        return agg, {"total": state["total"].double()}


@dataclass(frozen=True)
class Mutating:
    name: str = "mutating"

    def init(self, layout: Layout) -> dict[str, Any]:
        return {"m": torch.zeros(layout.size)}

    def step(self, params, delta, state):
        state["m"] += delta  # hidden in-place change: an old checkpointed state would be wrong
        return params + state["m"], state


@dataclass(frozen=True)
class Noisy:
    name: str = "noisy"

    def init(self, layout: Layout) -> dict[str, Any]:
        return {}

    def step(self, params, delta, state):
        return params + delta + torch.randn(delta.shape), state  # unseeded


@pytest.mark.parametrize(
    ("part", "complaint"),
    [
        (DoubleState(1.0), "must be float32"),
        (Mutating(), "changed its inputs"),
        (Noisy(), "not deterministic"),
    ],
)
def test_conformance_rejects_broken_parts(part: Any, complaint: str) -> None:
    with pytest.raises(AssertionError, match=complaint):
        check_part(part)

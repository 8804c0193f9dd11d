"""The Ray executor trains exactly like the sequential one, and ships the data set once.

The tests that need Ray share one local Ray with 2 workers on 127.0.0.1 (module fixture) and
are skipped when Ray is not installed; the missing-extra and import tests run either way.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import consortium
from consortium.config import ExperimentConfig
from consortium.errors import ConfigError, MissingExtraError
from consortium.executors import SequentialExecutor, build_executor
from consortium.executors.ray import RayExecutor, _check_reachable, _SharedData
from consortium.models.zoo import mlp
from consortium.seeds import derive_seed
from tests.conftest import make_toy

SIZES = [30, 61, 45, 80, 17, 60, 9, 38]  # unequal data ⇒ unequal step counts


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'consortium[ray]'")
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def config(algorithm: str, **extra) -> dict:
    return {
        "rounds": 4,
        "seed": 3,
        "algorithm": {
            "name": algorithm, "lr": 0.1, "batch_size": 16, "momentum": 0.9, "weight_decay": 0.01,
            **extra,
        },
        "sampling": {"clients_per_round": 6},
        "simulation": {"stragglers": 0.5},
        "evaluation": {"every": 2},
    }


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_same_global_model_as_sequential(local_ray, algorithm: str) -> None:
    toy = make_toy(len(SIZES), sizes=SIZES)
    a = consortium.simulate(config(algorithm), dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(config(algorithm), dataset=toy, executor=RayExecutor(workers=2))
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["clients"] == rb["clients"] == 6
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        if "accuracy" in ra:
            assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-9)
    assert local_ray.is_initialized()  # a Ray it did not start is left running


@pytest.mark.parametrize("private", [False, True])
def test_a_frozen_body_stays_bit_identical_on_the_workers(local_ray, private: bool) -> None:
    """Fine-tuning on Ray: the ``model.freeze`` factory travels to the workers (cloudpickle)
    and their batched training leaves the frozen first layer exactly as it was."""
    toy = make_toy(len(SIZES), sizes=SIZES)
    cfg = {**config("scaffold", weight_decay=0.01),
           "model": {"name": "mlp", "hidden": [8], "freeze": ["1"]}}
    if private:
        cfg["privacy"] = {"mode": "local", "clip": 0.5, "noise_multiplier": 1.0}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=RayExecutor(workers=2))
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    torch.manual_seed(derive_seed(cfg["seed"], "init") % (2**31))  # as simulate seeds its model
    init = dict(mlp(toy.input_shape, toy.num_classes, hidden=[8]).named_parameters())
    for name in ("1.weight", "1.bias"):
        assert torch.equal(b.params.tensors()[name], init[name])
    assert not torch.equal(b.params.tensors()["3.weight"], init["3.weight"])


def test_more_groups_than_workers_and_a_lambda_loss_train_one_by_one(local_ray, capsys) -> None:
    """A memory budget too small for two clients makes one group per client; a custom loss
    (a lambda, shipped by cloudpickle) cannot be batched, so groups train sequentially."""
    toy = make_toy(len(SIZES), sizes=SIZES)
    loss = lambda out, y: torch.nn.functional.nll_loss(out.log_softmax(1), y)
    cfg = config("scaffold")
    tiny = RayExecutor(workers=2, max_memory_mb=0.001)
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=tiny)
    assert torch.allclose(a.params.vector, b.params.vector, atol=1e-6, rtol=0)
    c = consortium.simulate({**cfg, "rounds": 2}, dataset=toy, executor=SequentialExecutor(), loss_fn=loss)
    d = consortium.simulate({**cfg, "rounds": 2}, dataset=toy, executor=RayExecutor(), loss_fn=loss)
    assert torch.allclose(c.params.vector, d.params.vector, atol=1e-6, rtol=0)
    assert capsys.readouterr().err.count("cannot batch clients within a group (a custom loss") == 1


def test_groups_balance_steps_and_respect_the_memory_budget(local_ray) -> None:
    toy = make_toy(len(SIZES), sizes=SIZES)
    ex = RayExecutor(workers=2)
    pool, tasks = _pool_and_tasks(toy)
    groups = ex._groups(tasks, pool, ex._entry(pool))
    assert len(groups) == 2 and sorted(sum(groups, [])) == list(range(len(tasks)))
    assert all(g == sorted(g) for g in groups)
    small = RayExecutor(workers=2, max_memory_mb=0.001)
    assert [len(g) for g in small._groups(tasks, pool, small._entry(pool))] == [1] * len(tasks)
    ex.close()
    small.close()


def _pool_and_tasks(toy):
    from consortium.aggregation.base import Pipeline
    from consortium.algorithms import build_algorithm
    from consortium.client.pool import ClientPool
    from consortium.client.state import ClientStateStore
    from consortium.client.training import LocalTraining
    from consortium.messages import Task
    from consortium.models.zoo import model_factory
    from consortium.types import Parameters

    factory = model_factory("logistic", toy.input_shape, toy.num_classes)
    pool = ClientPool(
        toy.packed(), model_factory=factory, algorithm=build_algorithm("fedavg"),
        pipeline=Pipeline(), settings=LocalTraining(batch_size=16, lr=0.1),
        loss_fn=torch.nn.functional.cross_entropy, num_classes=2, state=ClientStateStore(),
    )
    params = Parameters.from_module(factory())
    tasks = [Task(1, cid, params, seed=i) for i, cid in enumerate(toy.client_ids)]
    return pool, tasks


def test_the_data_set_is_put_in_the_object_store_once(local_ray, monkeypatch) -> None:
    put = local_ray.put
    shipped: list[str] = []

    def spy(value, *args, **kwargs):
        shipped.append(type(value).__name__)
        return put(value, *args, **kwargs)

    monkeypatch.setattr(local_ray, "put", spy)
    rounds = 3
    consortium.simulate(
        {**config("fedavg"), "rounds": rounds}, dataset=make_toy(8), executor=RayExecutor(workers=2)
    )
    assert shipped.count(_SharedData.__name__) == 1
    assert shipped.count("_Round") == rounds  # the global model: once per round, not per group


def test_build_executor_and_config(local_ray) -> None:
    ex = build_executor("ray", workers=2, address="")
    assert isinstance(ex, RayExecutor) and ex.workers == 2
    cfg = ExperimentConfig.from_dict({"executor": {"kind": "ray", "workers": 2, "address": "auto"}})
    assert (cfg.executor.kind, cfg.executor.workers, cfg.executor.address) == ("ray", 2, "auto")
    with pytest.raises(ConfigError, match="executor.workers"):
        ExperimentConfig.from_dict({"executor": {"kind": "ray", "workers": -1}})
    with pytest.raises(ConfigError, match="executor.workers"):
        RayExecutor(workers=-1)


def test_an_address_nobody_listens_on_fails_fast() -> None:
    with pytest.raises(ConnectionError, match="cannot connect to 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1", timeout_s=2)
    _check_reachable("auto")  # left to Ray
    _check_reachable("ray://head:10001")


def test_missing_ray_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'consortium\[ray\]'"):
        build_executor("ray")
    with pytest.raises(MissingExtraError, match="the Ray executor"):
        consortium.simulate({"rounds": 1, "executor": {"kind": "ray"}}, dataset=make_toy(2))


def test_importing_the_executors_does_not_import_ray() -> None:
    code = (
        "import sys, consortium, consortium.executors, consortium.executors.ray; "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_starts_and_stops_its_own_local_ray() -> None:
    """In a fresh process: no Ray running, so the executor starts one and close() stops it."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'consortium[ray]'")
    code = (
        "import ray, consortium\n"
        "from consortium.executors import RayExecutor\n"
        "from tests.conftest import make_toy\n"
        "ex = RayExecutor(workers=1)\n"
        "consortium.simulate({'rounds': 1}, dataset=make_toy(3), executor=ex)\n"
        "print(ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_secure_aggregation_with_drop_outs_gives_the_sequential_model(local_ray) -> None:
    """The clients' quantised vectors come back from the workers in their sessions; the
    protocol phases then give the same sums as in one process."""
    toy = make_toy(len(SIZES), sizes=SIZES)
    cfg = {**config("fedavg"), "secure_aggregation": {"enabled": True},
           "simulation": {"dropout": 0.05}}
    a = consortium.simulate(cfg, dataset=toy, executor=SequentialExecutor())
    b = consortium.simulate(cfg, dataset=toy, executor=RayExecutor(workers=2))
    assert torch.equal(a.params.vector, b.params.vector)
    assert [r.get("secagg_dropped") for r in a.history] == [r.get("secagg_dropped") for r in b.history]

"""``executor.device`` (issue 17): "cpu" changes nothing (bit for bit), "auto" picks the GPU
only where torch sees one, "cuda" without a GPU is refused with the fix; where a GPU is there,
cuda runs agree with cpu ones (scripts/gpu_check.py does the full comparison)."""

from __future__ import annotations

import pytest
import torch

import consortium
from consortium.client.dp_sgd import private_step
from consortium.client.evaluation import model_outputs
from consortium.client.training import LocalTerms, module_device, terms_on
from consortium.config import load_config
from consortium.data.base import Split
from consortium.errors import ConfigError
from consortium.executors import build_executor
from consortium.executors.device import resolve_device

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine")
no_gpu = pytest.mark.skipif(GPU, reason="this machine has a CUDA GPU")

HEART = ["rounds=3", "evaluation.baselines=[]"]


def run(*sets: str) -> consortium.SimulationResult:
    return consortium.simulate(overrides=[*HEART, *sets], report=False)


# -- resolving the name ------------------------------------------------------------------------


def test_cpu_is_the_default_and_resolves_to_cpu() -> None:
    assert load_config().executor.device == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if GPU else "cpu")
    assert f'executor.device = "auto" runs on {device}' in capsys.readouterr().err
    resolve_device("auto", announce=False)
    assert capsys.readouterr().err == ""


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_with_the_fix(name: str) -> None:
    with pytest.raises(ConfigError, match=r'sees no CUDA GPU.*executor.device = "cpu" or "auto"'):
        resolve_device(name)
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        build_executor("sequential", device=name)
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        run(f'executor.device="{name}"')


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CUDA", "mps"])
def test_unknown_names_are_refused_by_the_config(name: str) -> None:
    with pytest.raises(ConfigError, match=r'executor.device = .* "cpu", "cuda", "cuda:N" or "auto"'):
        load_config(None, [f'executor.device="{name}"'])
    with pytest.raises(ConfigError, match="executor.device"):
        resolve_device(name)


@needs_gpu
def test_a_gpu_index_beyond_the_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_executors_carry_the_device() -> None:
    for kind in ("sequential", "vectorized", "auto"):
        assert build_executor(kind, device="cpu").device == torch.device("cpu")  # type: ignore[attr-defined]


# -- "cpu" (and "auto" without a GPU) is today's computation, bit for bit -------------------------


@pytest.mark.parametrize("kind", ["sequential", "vectorized"])
@pytest.mark.parametrize("extra", [
    [],
    ['privacy.mode="local"', "privacy.noise_multiplier=0.8", "privacy.clip=1.0"],
    ['algorithm.name="fedprox"', "algorithm.mu=0.1", "algorithm.momentum=0.9"],
    ['algorithm.name="apfl"'],
])
def test_device_cpu_is_bit_identical_to_no_device(kind: str, extra: list[str]) -> None:
    plain = run(f'executor.kind="{kind}"', *extra)
    for name in ("cpu", "auto") if not GPU else ("cpu",):
        other = run(f'executor.kind="{kind}"', f'executor.device="{name}"', *extra)
        assert torch.equal(other.params.vector, plain.params.vector)
        assert other.summary["final"] == plain.summary["final"]


# -- the pieces the device moves through ------------------------------------------------------


def test_terms_on_moves_copies_and_leaves_the_originals() -> None:
    anchor, offset = torch.arange(4.0), torch.ones(4)
    terms = LocalTerms(prox_mu=0.5, anchor=anchor, offset=offset)
    moved = terms_on(terms, torch.device("cpu"))
    assert moved.prox_mu == 0.5 and torch.equal(moved.anchor, anchor)  # type: ignore[arg-type]
    assert terms.anchor is anchor and terms.offset is offset
    assert terms_on(LocalTerms(), torch.device("cpu")).anchor is None


def test_model_outputs_in_chunks_equal_one_forward_pass() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    x = torch.randn(23, 5)
    with torch.no_grad():
        whole = module(x)
    assert torch.allclose(model_outputs(module, x, batch_size=4), whole, atol=1e-6)
    assert module_device(module) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def _dp_grad(module: torch.nn.Module, data: Split) -> list[torch.Tensor]:
    idx = torch.arange(len(data))
    private_step(module, data, idx, loss_fn=torch.nn.functional.cross_entropy, clip=1.0,
                 noise_multiplier=1.0, expected_batch=8.0, seed=3, step=2)
    return [p.grad.clone() for p in module.parameters()]  # type: ignore[union-attr]


@needs_gpu
def test_dp_sgd_noise_is_drawn_on_the_cpu_and_the_gpu_gradient_matches() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    data = Split(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    on_cpu = _dp_grad(module, data)
    on_gpu = _dp_grad(module.cuda(), data)
    for a, b in zip(on_cpu, on_gpu):
        assert b.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), atol=1e-5)  # same noise, reductions differ in the last bits


@needs_gpu
@pytest.mark.parametrize("kind", ["sequential", "vectorized"])
def test_cuda_agrees_with_cpu(kind: str) -> None:
    cpu = run(f'executor.kind="{kind}"')
    torch.cuda.reset_peak_memory_stats()
    gpu = run(f'executor.kind="{kind}"', 'executor.device="cuda"')
    assert torch.cuda.max_memory_allocated() > 0
    assert gpu.params.vector.device.type == "cpu"  # the flat vectors stay on the CPU
    assert torch.allclose(gpu.params.vector, cpu.params.vector, atol=1e-4)
    assert abs(gpu.summary["final"]["accuracy"] - cpu.summary["final"]["accuracy"]) <= 0.02

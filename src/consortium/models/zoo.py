"""The model zoo: logistic, mlp, cnn (and their batch-norm variants mlp_bn, cnn_bn), LoRA on a
pretrained text encoder (minilm-lora, :mod:`consortium.models.peft`), and any
``package.module:factory`` a user supplies.

Batch normalisation in a federation: a BatchNorm layer's running statistics are buffers in
PyTorch, which :class:`~consortium.types.Parameters` (a model's parameters as one flat vector)
would not carry, so they would stay in whichever module object trained last. The zoo's
batch-norm layers (:class:`FederatedBatchNorm1d`, :class:`FederatedBatchNorm2d`) hold
``running_mean`` and ``running_var`` as parameters that do not train
(``requires_grad = False``): they travel with the model, are averaged by FedAvg (as Flower and
NVFlare average a ``state_dict``), are checkpointed and sent over gRPC like any parameter,
and FedBN keeps them at each client (:mod:`consortium.algorithms.fedbn`).
:func:`statistics_names` tells them apart from frozen parameters.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from consortium.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from consortium.config import PeftConfig

__all__ = [
    "BUILT_IN", "MODELS", "FederatedBatchNorm1d", "FederatedBatchNorm2d", "build_model",
    "check_allowed", "check_local_dp", "cnn", "cnn_bn", "freeze", "frozen_names", "logistic",
    "mlp", "mlp_bn", "model_factory", "seeded_model", "statistics_names",
]

# Building a model draws its initial values from torch's process-wide RNG. A server and sites
# that share a process (tests, notebooks) build models from several threads, and one thread's
# draws landing between another's seed and its draws changed the server's initial model now
# and then. Every model the zoo builds, and every seeded build, holds this lock.
_BUILD_LOCK = threading.RLock()


class _Locked:
    """A factory whose builds hold the process's model-build lock (picklable: the lock is
    reached through the module, not stored)."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory

    def __call__(self) -> nn.Module:
        with _BUILD_LOCK:
            return self.factory()


def seeded_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with torch's RNG seeded by ``seed`` just before, no other thread's model
    build in between (the RNG is left as the build leaves it, as ``torch.manual_seed`` would)."""
    with _BUILD_LOCK:
        torch.manual_seed(seed)
        return factory()

MODELS = {
    "logistic": "multinomial logistic regression (one linear layer on the flattened input)",
    "mlp": "multilayer perceptron with ReLU; hidden sizes from model.hidden",
    "cnn": "small convolutional net for (channels, height, width) images",
    "mlp_bn": "mlp with batch normalisation: Linear → BatchNorm1d → ReLU blocks (for FedBN)",
    "cnn_bn": "cnn with batch normalisation: Conv → BatchNorm2d → ReLU blocks (for FedBN)",
    "minilm-lora": "frozen all-MiniLM-L6-v2 text encoder with LoRA adapters (peft) and a "
    "linear head; [model.peft] sets r, alpha, target, path (needs consortium[peft])",
    "package.module:factory": "your own: a function (input_shape, num_classes) -> nn.Module",
}


def logistic(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: softmax over one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), num_classes))


def mlp(input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64,)) -> nn.Module:
    """Fully connected net with ReLU between the ``hidden`` layers."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for h in hidden:
        if h < 1:
            raise ModelError(f"model.hidden sizes must be >= 1, found {list(hidden)}")
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Two 3×3 conv layers (16, 32 channels) with max-pooling, then a linear classifier.

    Needs image input ``(channels, height, width)`` with height and width ≥ 4.
    """
    _check_image("cnn", input_shape)
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes),
    )


class _StatisticsAsParameters:
    """Batch norm whose running statistics are parameters that do not train.

    ``running_mean`` and ``running_var`` become ``nn.Parameter(requires_grad=False)`` (so they
    are part of :class:`~consortium.types.Parameters`' flat vector), ``num_batches_tracked`` is
    dropped and ``momentum`` must be a number (the cumulative average needs the batch count):
    in training mode the forward pass updates the statistics in place,
    ``running ← (1 − momentum)·running + momentum·batch`` (unbiased variance), as PyTorch's
    batch norm does. A training batch with a single value per channel (one example into
    :class:`FederatedBatchNorm1d`, the short last batch of an epoch) has no batch statistics:
    it is normalised with the running statistics and leaves them unchanged, where PyTorch's
    layer would raise.
    """

    def _convert(self) -> None:
        bn: _BatchNorm = self  # type: ignore[assignment]
        if bn.momentum is None or not bn.track_running_stats:
            raise ModelError(
                "a federated batch-norm layer needs running statistics with a fixed momentum "
                "(track_running_stats=True, momentum=0.1 for example)"
            )
        for name in ("running_mean", "running_var"):
            value = bn._buffers.pop(name)
            assert value is not None  # track_running_stats creates them
            setattr(bn, name, nn.Parameter(value, requires_grad=False))
        bn.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: _BatchNorm = self  # type: ignore[assignment]
        if bn.training and x.ndim >= 2 and x.numel() == x.shape[1]:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                training=False, momentum=0.0, eps=bn.eps)
        return super().forward(x)  # type: ignore[misc, no-any-return]


class FederatedBatchNorm1d(_StatisticsAsParameters, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with its running statistics as parameters that do not
    train (see :func:`statistics_names`), so they travel, average and checkpoint with the
    model. Ioffe & Szegedy, "Batch Normalization", ICML 2015."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._convert()


class FederatedBatchNorm2d(_StatisticsAsParameters, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with its running statistics as parameters that do not
    train (see :class:`FederatedBatchNorm1d`)."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._convert()


def statistics_names(module: nn.Module) -> set[str]:
    """The parameter names of ``module`` that are batch-norm running statistics
    (``running_mean`` / ``running_var`` held as parameters, as in :class:`FederatedBatchNorm1d`).

    They do not train (``requires_grad = False``) but are not frozen: local training in
    train mode moves them, FedAvg averages them, FedBN keeps them at each client. Under
    central DP their deltas are part of the clipped and noised update like every other
    coordinate.
    """
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        if isinstance(child, _BatchNorm)
        for name in ("running_mean", "running_var")
        if name in child._parameters
    }


def check_local_dp(module: nn.Module, *, local_dp: bool) -> None:
    """Refuse a batch-norm model under local DP-SGD.

    DP-SGD clips each example's gradient (Abadi et al. 2016), but with batch normalisation an
    example's output depends on the other examples of its batch, so per-example gradients do
    not bound one example's influence (Opacus refuses BatchNorm for the same reason), and the
    running statistics would leave the site without noise.

    Raises:
        ConfigError: ``local_dp`` and ``module`` has batch normalisation.
    """
    if local_dp and any(isinstance(m, _BatchNorm) for m in module.modules()):
        raise ConfigError(
            "the model has batch normalisation, which local DP-SGD (privacy.mode = \"local\") "
            "cannot protect: an example's gradient depends on the rest of its batch, and the "
            "running statistics would leave the site unnoised. Use a model without batch norm "
            "(model.name = \"mlp\" or \"cnn\") or privacy.mode = \"central\""
        )


def mlp_bn(input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64,)) -> nn.Module:
    """:func:`mlp` with batch normalisation: ``Linear → BatchNorm1d → ReLU`` per hidden layer
    (:class:`FederatedBatchNorm1d`), then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = prod(input_shape)
    for h in hidden:
        if h < 1:
            raise ModelError(f"model.hidden sizes must be >= 1, found {list(hidden)}")
        layers += [nn.Linear(width, h), FederatedBatchNorm1d(h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn_bn(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """:func:`cnn` with batch normalisation: ``Conv → BatchNorm2d → ReLU → MaxPool`` twice
    (:class:`FederatedBatchNorm2d`), then a linear classifier (the shape of FedBN's digit
    model, Li et al. 2021, smaller)."""
    _check_image("cnn_bn", input_shape)
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), FederatedBatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), FederatedBatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes),
    )


def _check_image(name: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ModelError(
            f"model {name!r} needs image data shaped (channels, height, width) of at least 4×4, "
            f"but the data set's examples have shape {tuple(input_shape)}; use 'logistic' or "
            "'mlp' for tabular data"
        )


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(
            f"model.name = {spec!r} is not known; expected one of {', '.join(BUILT_IN)} or "
            "'package.module:factory'"
        )
    module = _import_model_module(module_name, spec)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r} (from model {spec!r})")
    return factory


def _import_model_module(module_name: str, spec: str) -> Any:
    """Import a model's module: from the Python path, else from the folder of the experiment
    file (or the current folder) when ``module_name``'s top package is found there, as
    ``python experiment.py`` would; the folder is appended to ``sys.path``, so it never
    shadows an installed package.

    Raises:
        ModelError: the module is nowhere, or importing it raised; one line with the cause.
    """
    top = module_name.partition(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != top:  # the module was found; something it imports was not
            raise ModelError(_import_failure(module_name, spec, exc)) from None
    except Exception as exc:  # the user's module raised while it was imported
        raise ModelError(_import_failure(module_name, spec, exc)) from None
    from consortium.config import experiment_folders

    folders = [*experiment_folders(), Path.cwd()]
    found = next((f for f in folders if (f / f"{top}.py").is_file() or (f / top).is_dir()), None)
    if found is None:
        raise ModelError(
            f"cannot import {module_name!r} for model {spec!r}: no module {top!r} on the Python "
            f"path, beside the experiment file or in the current folder "
            f"({', '.join(dict.fromkeys(str(f) for f in folders))}); put {top}.py beside the "
            "experiment file, or install it"
        )
    if str(found) not in sys.path:
        sys.path.append(str(found))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(_import_failure(module_name, spec, exc)) from None


def _import_failure(module_name: str, spec: str, exc: BaseException) -> str:
    """One line: the exception and where in the user's code it was raised."""
    import traceback

    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}, line {exc.lineno})"
    else:
        library = (sys.prefix, sys.base_prefix, str(Path(importlib.__file__).parent))
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith(library) and not f.filename.startswith("<")]
        if frames:
            where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    text = (message.strip().splitlines() or [""])[0]
    return (f"importing {module_name!r} for model {spec!r} failed: {type(exc).__name__}: "
            f"{text}{where}; fix the module (`python -c \"import {module_name}\"` in its folder "
            "shows the whole traceback)")


BUILT_IN = ("logistic", "mlp", "cnn", "mlp_bn", "cnn_bn", "minilm-lora")


def check_allowed(name: str, allowed: Collection[str] | None) -> None:
    """Refuse a model that is not built in and not on ``allowed``, before anything is imported.

    ``allowed`` is the list of ``package.module:factory`` names a site's own operator trusts
    (``consortium client --allow-model``, or ``models`` in the site policy); ``None`` allows any
    (a simulation, where the experiment file is the user's own).

    Raises:
        ModelError: the name would import code the site has not allowed.
    """
    if allowed is None or name in BUILT_IN or name in allowed:
        return
    raise ModelError(
        f"model.name = {name!r} would import and run code named by the experiment; this site "
        f"builds only the built-in models ({', '.join(BUILT_IN)}) and factories its operator "
        f"allows. If you trust {name!r}, start the site with --allow-model {name} (or list it "
        "under models in the site policy)"
    )


def model_factory(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64,),
    allowed: Collection[str] | None = None, peft: PeftConfig | None = None,
) -> Callable[[], nn.Module]:
    """A zero-argument function that builds a fresh model of the chosen kind.

    ``allowed``: see :func:`check_allowed` (a deployed site passes its own list).
    ``peft``: ``[model.peft]`` for ``minilm-lora`` (:mod:`consortium.models.peft`).
    """
    check_allowed(name, allowed)
    return _Locked(_factory(name, tuple(input_shape), num_classes, hidden, peft))


def _factory(name: str, input_shape: tuple[int, ...], num_classes: int,
             hidden: Sequence[int], peft: PeftConfig | None = None) -> Callable[[], nn.Module]:
    shape = tuple(input_shape)
    if name == "minilm-lora":
        from functools import partial

        from consortium.config import PeftConfig
        from consortium.models.peft import lora_classifier

        p = peft or PeftConfig()
        return partial(lora_classifier, shape, num_classes, r=p.r, alpha=p.alpha,
                       dropout=p.dropout, target=p.target, path=p.path,
                       base_sha256=p.base_sha256)
    if name == "logistic":
        return lambda: logistic(shape, num_classes)
    if name == "mlp":
        return lambda: mlp(shape, num_classes, hidden=hidden)
    if name == "cnn":
        cnn(shape, num_classes)  # fail now, not in the first round
        return lambda: cnn(shape, num_classes)
    if name == "mlp_bn":
        return lambda: mlp_bn(shape, num_classes, hidden=hidden)
    if name == "cnn_bn":
        _check_image(name, shape)
        return lambda: cnn_bn(shape, num_classes)
    factory = _import_factory(name)
    params = inspect.signature(factory).parameters
    if "input_shape" in params or "num_classes" in params:
        return lambda: factory(input_shape=shape, num_classes=num_classes)
    return factory


def frozen_names(module: nn.Module, patterns: Sequence[str]) -> set[str]:
    """The parameter names of ``module`` that ``patterns`` select.

    A pattern selects a parameter by its full name (``"1.weight"``) or every parameter of a
    submodule by the submodule's name (``"1"``, ``"encoder.layers.0"``), as in
    ``module.named_parameters()``. Batch-norm running statistics (:func:`statistics_names`)
    are never selected: they do not train, but forward passes in train mode move them.

    Raises:
        ModelError: a pattern selects nothing (a typo, or a name of another model), or the
            patterns select every parameter (nothing would train).
    """
    statistics = statistics_names(module)  # running statistics never train; not frozen
    names = [n for n, _ in module.named_parameters() if n not in statistics]

    def selects(pattern: str, name: str) -> bool:
        return name == pattern or name.startswith(pattern + ".")

    unknown = [p for p in patterns if not any(selects(p, n) for n in names)]
    if unknown:
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        raise ModelError(
            f"model.freeze names {unknown}, which match no parameter of the model; use a "
            f"parameter name or the name of a submodule, from: {shown}"
        )
    chosen = {n for n in names if any(selects(p, n) for p in patterns)}
    if len(chosen) == len(names):
        raise ModelError(
            f"model.freeze = {list(patterns)} freezes every parameter of the model, so nothing "
            "would train; leave at least the output layer out of model.freeze"
        )
    return chosen


def freeze(factory: Callable[[], nn.Module], patterns: Sequence[str]) -> Callable[[], nn.Module]:
    """``factory`` whose models have the parameters ``patterns`` select frozen
    (``requires_grad = False``; see :func:`frozen_names`).

    Every executor trains only parameters with ``requires_grad`` (fine-tuning a head on a
    frozen body); frozen ones stay bit-identical. A user factory may also freeze parameters
    itself; this is the config's way (``model.freeze``).

    Raises:
        ModelError: when a model is built, as :func:`frozen_names`.
    """
    chosen = tuple(patterns)
    if not chosen:
        return factory

    def build() -> nn.Module:
        module = factory()
        frozen = frozen_names(module, chosen)
        for name, p in module.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        return module

    return build


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64,),
    seed: int = 0,
) -> nn.Module:
    """Build a model and check that it maps a batch of the data's shape to ``num_classes`` logits.

    Raises:
        ModelError: unknown name, an import failure, or a model that does not fit the data.
    """
    factory = model_factory(name, input_shape, num_classes, hidden=hidden)
    model = seeded_model(factory, seed)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    check_fits(model, input_shape, num_classes, name=name)
    return model


def check_fits(model: nn.Module, input_shape: Sequence[int], num_classes: int, *, name: str) -> None:
    """Raise :class:`ModelError` unless ``model`` maps ``[2, *input_shape]`` to ``[2, num_classes]``."""
    probe = torch.zeros((2, *input_shape))
    training = model.training
    try:
        # eval mode: in train mode the probe would move batch-norm running statistics
        model.eval()
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:
        raise ModelError(
            f"model {name!r} does not accept the data's examples of shape {tuple(input_shape)}: {exc}"
        ) from exc
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {name!r} outputs {found} for a batch of 2, expected (2, {num_classes}): "
            f"one logit per class of the data set"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {name!r} has no trainable parameters")

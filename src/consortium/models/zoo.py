"""The model zoo: logistic, mlp, cnn, and any ``package.module:factory`` a user supplies."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Sequence
from math import prod

import torch
from torch import nn

from consortium.errors import ModelError

__all__ = [
    "BUILT_IN", "MODELS", "build_model", "check_allowed", "cnn", "freeze", "frozen_names", "logistic",
    "mlp", "model_factory",
]

MODELS = {
    "logistic": "multinomial logistic regression (one linear layer on the flattened input)",
    "mlp": "multilayer perceptron with ReLU; hidden sizes from model.hidden",
    "cnn": "small convolutional net for (channels, height, width) images",
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
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise ModelError(
            f"model 'cnn' needs image data shaped (channels, height, width) of at least 4×4, "
            f"but the data set's examples have shape {tuple(input_shape)}; use 'logistic' or "
            "'mlp' for tabular data"
        )
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), num_classes),
    )


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(
            f"model.name = {spec!r} is not known; expected one of logistic, mlp, cnn or "
            "'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r} (from model {spec!r})")
    return factory


BUILT_IN = ("logistic", "mlp", "cnn")


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
        "builds only the built-in models (logistic, mlp, cnn) and factories its operator "
        f"allows. If you trust {name!r}, start the site with --allow-model {name} (or list it "
        "under models in the site policy)"
    )


def model_factory(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (64,),
    allowed: Collection[str] | None = None,
) -> Callable[[], nn.Module]:
    """A zero-argument function that builds a fresh model of the chosen kind.

    ``allowed``: see :func:`check_allowed` (a deployed site passes its own list).
    """
    check_allowed(name, allowed)
    shape = tuple(input_shape)
    if name == "logistic":
        return lambda: logistic(shape, num_classes)
    if name == "mlp":
        return lambda: mlp(shape, num_classes, hidden=hidden)
    if name == "cnn":
        cnn(shape, num_classes)  # fail now, not in the first round
        return lambda: cnn(shape, num_classes)
    factory = _import_factory(name)
    params = inspect.signature(factory).parameters
    if "input_shape" in params or "num_classes" in params:
        return lambda: factory(input_shape=shape, num_classes=num_classes)
    return factory


def frozen_names(module: nn.Module, patterns: Sequence[str]) -> set[str]:
    """The parameter names of ``module`` that ``patterns`` select.

    A pattern selects a parameter by its full name (``"1.weight"``) or every parameter of a
    submodule by the submodule's name (``"1"``, ``"encoder.layers.0"``), as in
    ``module.named_parameters()``.

    Raises:
        ModelError: a pattern selects nothing (a typo, or a name of another model), or the
            patterns select every parameter (nothing would train).
    """
    names = [n for n, _ in module.named_parameters()]

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
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    check_fits(model, input_shape, num_classes, name=name)
    return model


def check_fits(model: nn.Module, input_shape: Sequence[int], num_classes: int, *, name: str) -> None:
    """Raise :class:`ModelError` unless ``model`` maps ``[2, *input_shape]`` to ``[2, num_classes]``."""
    probe = torch.zeros((2, *input_shape))
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:
        raise ModelError(
            f"model {name!r} does not accept the data's examples of shape {tuple(input_shape)}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {name!r} outputs {found} for a batch of 2, expected (2, {num_classes}): "
            f"one logit per class of the data set"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {name!r} has no trainable parameters")

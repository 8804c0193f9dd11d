"""Where local computation runs: ``executor.device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
``"auto"``).

The boundary is the model: a client's module and each batch it trains or is evaluated on live
on the device; everything that leaves local training — the flat parameter vectors, updates,
aggregation, DP noise, secure aggregation, checkpoints — is on the CPU, exactly as without a
GPU. Seeded batch orders and DP noise are drawn from CPU generators and moved, so a seed gives
the same batches and the same noise on either device (the results then differ only by the
GPU's floating-point reductions).
"""

from __future__ import annotations

import sys

import torch

from consortium.client.training import module_device
from consortium.errors import ConfigError

__all__ = ["CPU", "module_device", "resolve_device"]

CPU = torch.device("cpu")


def resolve_device(spec: str, *, announce: bool = True) -> torch.device:
    """The torch device ``executor.device = spec`` names.

    ``"auto"`` is ``cuda`` when :func:`torch.cuda.is_available`, else ``cpu``, and (with
    ``announce``) says which on stderr.

    Raises:
        ConfigError: an unknown name, or ``cuda`` (``cuda:N``) where torch sees no such GPU.
    """
    if spec == "cpu":
        return CPU
    if spec == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else CPU
        if announce:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU seen"
            print(f"consortium: executor.device = \"auto\" runs on {device} ({name})",
                  file=sys.stderr)
        return device
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"executor.device = {spec!r} but torch sees no CUDA GPU (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda}); set "
                'executor.device = "cpu" or "auto", or install a CUDA build of torch on a '
                "machine with a GPU"
            )
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"executor.device = {spec!r} but torch sees {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); pick one of those"
            )
        return torch.device("cuda", index)
    raise ConfigError(
        f'executor.device = {spec!r} is not allowed: expected "cpu", "cuda", "cuda:N" or "auto"'
    )

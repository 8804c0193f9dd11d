"""The shared part of a model on the wire: under a personalised algorithm a site's update
carries only the tensors every site shares; the personal ones never leave the site.

FedPer and FedRep (:mod:`consortium.algorithms.personal`) keep a personal head at each client,
FedBN (:mod:`consortium.algorithms.fedbn`) its batch-norm layers: their coordinates of the
update are exact zeros by construction, and the server's step never moves them. In a
deployment they are not sent at all, not even as zeros: the site cuts its
delta down to the *shared layout* (the model's tensors outside the algorithm's
``personal_mask``, in the model's order) and names those tensors in the result
(``Update.delta_layout``, :class:`~consortium.deploy.codec.ResultEnvelope`'s ``parts``); the
server accepts exactly that set (:func:`consortium.deploy.validate.validate_result`) and puts
zeros back at the personal coordinates before aggregation (:func:`expand`), which is what the
simulation's clients send. Ditto, APFL and q-FFL keep their personal models in the client state
and send a whole-model delta like FedAvg's: they have no personal mask and no shared layout.
"""

from __future__ import annotations

from typing import Any

import torch

from consortium.errors import ConsortiumError
from consortium.types import Layout

__all__ = ["cut", "expand", "shared_layout", "shared_mask"]


def shared_layout(algorithm: Any, layout: Layout) -> Layout | None:
    """The tensors of ``layout`` that ``algorithm`` shares (sends), in the model's order;
    ``None`` when it has no personal parameters (no ``personal_mask``): the whole model travels.

    Raises:
        ConsortiumError: the algorithm's personal mask covers part of a tensor (personal
            parameters are whole tensors; a partial one cannot be named on the wire).
    """
    mask_of = getattr(algorithm, "personal_mask", None)
    if mask_of is None:
        return None
    mask = mask_of(layout)
    specs, offset = [], 0
    for spec in layout.specs:
        part = mask[offset:offset + spec.numel]
        offset += spec.numel
        if not bool(part.any()):
            specs.append(spec)
        elif not bool(part.all()):
            raise ConsortiumError(
                f"{getattr(algorithm, 'name', 'the algorithm')} keeps part of tensor {spec.name!r} "
                "personal; personal parameters must be whole tensors to be left off the wire"
            )
    return Layout(tuple(specs))


def shared_mask(layout: Layout, shared: Layout) -> torch.Tensor:
    """Bool vector of ``layout.size``: ``True`` at the coordinates of ``shared``'s tensors."""
    names = set(shared.names)
    if not names <= set(layout.names):
        raise ConsortiumError(
            f"tensors {sorted(names - set(layout.names))} are not in the model's layout"
        )
    parts = [torch.full((s.numel,), s.name in names, dtype=torch.bool) for s in layout.specs]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def cut(delta: torch.Tensor, layout: Layout, shared: Layout) -> torch.Tensor:
    """The shared part of a whole-model ``delta``: its ``shared`` tensors, concatenated in the
    model's order (what the site sends)."""
    return delta[shared_mask(layout, shared)].contiguous()


def expand(part: torch.Tensor, layout: Layout, shared: Layout) -> torch.Tensor:
    """A whole-model delta from its shared ``part``: zeros at every other coordinate (the
    personal ones), as a simulated client of the same algorithm sends them."""
    full = torch.zeros(layout.size, dtype=part.dtype)
    full[shared_mask(layout, shared)] = part
    return full

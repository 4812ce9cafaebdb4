"""Dynamic loss scaling for fp16 training, as ``torch.amp.GradScaler`` does it, without a host sync.

The loss is multiplied by ``scale`` before the backward pass; the gradients are then unscaled and checked. A
step whose gradients are not all finite is skipped (by the caller, branchlessly) and the scale is halved; after
``GROWTH_INTERVAL`` finite steps in a row it is doubled. The scale and the count of finite steps live in the
state under ``"loss_scale"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from funceng import dist

INITIAL_SCALE = 2.0**16
GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0, 0.5, 2000  # torch.amp.GradScaler's defaults


def init(device: torch.device) -> dict[str, Tensor]:
    """The initial loss-scale state: ``scale`` (float32) and ``growth_tracker`` (int32), on ``device``."""
    return {
        "scale": torch.full((), INITIAL_SCALE, dtype=torch.float32, device=device),
        "growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
    }


def unscale_and_update(
    grads: dict[str, Tensor], loss_scale: dict[str, Tensor], across_ranks: bool = False
) -> tuple[dict[str, Tensor], Tensor]:
    """``(grads / scale with non-finite steps zeroed, finite)``; updates ``loss_scale`` in place.

    ``finite`` is a 0-d bool tensor: whether every gradient was finite. ``across_ranks``: each rank holds a
    shard of the gradients (FSDP2), so an overflow found by any rank counts for all.
    """
    scale, tracker = loss_scale["scale"], loss_scale["growth_tracker"]
    found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
    grad_list = list(grads.values())
    torch._amp_foreach_non_finite_check_and_unscale_(grad_list, found_inf, scale.double().reciprocal().float())
    if across_ranks:
        found_inf = dist.mean_across_ranks([found_inf])[0]
    finite = found_inf == 0
    # No foreach select exists; this runs only on fp16 steps and fuses into one kernel when compiled.
    clean = dict(zip(grads, [torch.where(finite, g, torch.zeros((), dtype=g.dtype)) for g in grad_list]))
    torch._amp_update_scale_(scale, tracker, found_inf, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL)
    return clean, finite


class DynamicScaling:
    """fp16: the loss is scaled by the state's ``loss_scale``, and non-finite steps are skipped."""

    def __init__(self, across_ranks: bool = False):
        self.across_ranks = across_ranks

    def factor(self, loss_scale: dict[str, Tensor]) -> Tensor:
        return loss_scale["scale"]

    def unscale(self, grads: dict[str, Tensor], loss_scale: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return unscale_and_update(grads, loss_scale, self.across_ranks)

    def logged(self, loss_scale: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss_scale": loss_scale["scale"].clone()}


class NoScaling:
    """fp32 and bf16: the loss is not scaled and every step is applied (``finite`` is ``None``)."""

    def factor(self, loss_scale: dict[str, Tensor]) -> None:
        return None

    def unscale(self, grads: dict[str, Tensor], loss_scale: dict[str, Tensor]) -> tuple[dict[str, Tensor], None]:
        return grads, None

    def logged(self, loss_scale: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

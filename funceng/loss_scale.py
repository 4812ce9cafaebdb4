"""Dynamic loss scaling for fp16 training, as ``torch.amp.GradScaler`` does it, without a host sync.

The loss is multiplied by ``scale`` before the backward pass; the gradients are then unscaled and checked. A
step whose gradients are not all finite is skipped (by the caller, branchlessly) and the scale is halved; after
``GROWTH_INTERVAL`` finite steps in a row it is doubled. The scale and the count of finite steps live in the
state under ``"loss_scale"``. ``amp=dict(dtype="fp16", growth_factor=..., backoff_factor=..., growth_interval=...)``
sets GradScaler's other constants (growth and backoff factors of 1 give a static scale); the initial scale is the
state's, ``state["loss_scale"]["scale"]`` (2**16 unless written).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from funceng import dist

INITIAL_SCALE = 2.0**16
GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL = 2.0, 0.5, 2000  # torch.amp.GradScaler's defaults


AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SCALING_OPTIONS = ("growth_factor", "backoff_factor", "growth_interval")


def parse_amp(amp: str | torch.dtype | Mapping[str, Any] | None) -> tuple[torch.dtype | None, dict[str, Any]]:
    """``(autocast dtype or None, loss-scaling options)`` of a step's ``amp`` argument."""
    options: dict[str, Any] = {}
    if isinstance(amp, Mapping):
        options = {k: v for k, v in amp.items() if k != "dtype"}
        unknown = set(options) - set(SCALING_OPTIONS)
        if unknown:
            raise ValueError(f"amp: unknown {sorted(unknown)}; a dict takes 'dtype' and {list(SCALING_OPTIONS)}")
        amp = amp.get("dtype")
    if amp is not None and not isinstance(amp, torch.dtype):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
        amp = AMP_DTYPES[amp]
    if options and amp != torch.float16:
        raise ValueError(f"amp: {sorted(options)} set fp16 loss scaling; the dtype is {amp}")
    return amp, options


def init(device: torch.device) -> dict[str, Tensor]:
    """The initial loss-scale state: ``scale`` (float32) and ``growth_tracker`` (int32), on ``device``."""
    return {
        "scale": torch.full((), INITIAL_SCALE, dtype=torch.float32, device=device),
        "growth_tracker": torch.zeros((), dtype=torch.int32, device=device),
    }


def unscale_and_update(
    grads: dict[str, Tensor],
    loss_scale: dict[str, Tensor],
    across_ranks: bool = False,
    growth_factor: float = GROWTH_FACTOR,
    backoff_factor: float = BACKOFF_FACTOR,
    growth_interval: int = GROWTH_INTERVAL,
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
    torch._amp_update_scale_(scale, tracker, found_inf, growth_factor, backoff_factor, growth_interval)
    return clean, finite


class DynamicScaling:
    """fp16: the loss is scaled by the state's ``loss_scale``, and non-finite steps are skipped."""

    def __init__(self, across_ranks: bool = False, **options: Any):
        self.across_ranks, self.options = across_ranks, options

    def factor(self, loss_scale: dict[str, Tensor]) -> Tensor:
        return loss_scale["scale"]

    def unscale(self, grads: dict[str, Tensor], loss_scale: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        return unscale_and_update(grads, loss_scale, self.across_ranks, **self.options)

    def logged(self, loss_scale: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss_scale": loss_scale["scale"].clone()}

    def remember(self, buffers: Any) -> list[Tensor]:
        """Copies of the buffers before the forward pass (BatchNorm statistics), for `restore_if_skipped`."""
        return [b.clone() for b in buffers.values()]

    def restore_if_skipped(self, buffers: Any, before: list[Tensor], finite: Tensor) -> None:
        """Puts back the buffers the forward pass of a skipped step changed (a non-finite batch must not leave
        NaN statistics behind), without a branch: ``where(finite, new, old)``."""
        current = list(buffers.values())
        if current:
            torch._foreach_copy_(current, [torch.where(finite, new, old) for new, old in zip(current, before)])


class NoScaling:
    """fp32 and bf16: the loss is not scaled and every step is applied (``finite`` is ``None``)."""

    def factor(self, loss_scale: dict[str, Tensor]) -> None:
        return None

    def unscale(self, grads: dict[str, Tensor], loss_scale: dict[str, Tensor]) -> tuple[dict[str, Tensor], None]:
        return grads, None

    def logged(self, loss_scale: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def remember(self, buffers: Any) -> None:
        return None

    def restore_if_skipped(self, buffers: Any, before: None, finite: None) -> None:
        return None

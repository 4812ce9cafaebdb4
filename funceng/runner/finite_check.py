"""The stop on a non-finite loss (or parameter): found at the iteration it happens, without a host sync per step.

Each iteration's loss (with, under fp16, its loss scale, and opt-in a flag saying whether every parameter is
finite) is packed into one small tensor whose host copy starts right after the step; it is read ``lag``
iterations late (0 on the CPU, where nothing runs ahead; 2 on CUDA), so checking never stalls the device. Every
rank reads the same (averaged) loss at the same iteration, so all stop together. `NonFiniteCheck.check` reads
everything pending: the loop calls it before a checkpoint, a validation and the end of training, so no
non-finite state is ever saved or evaluated.

Under fp16 a non-finite loss does not change the state: the step skips the update (branchlessly) and lowers the
loss scale. Such a step is logged with the loss scale, not an error, unless it keeps happening
(`MAX_SKIPPED_IN_A_ROW`): then the forward pass itself overflows, which no loss scale can fix.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from funceng.finite import all_finite

MAX_SKIPPED_IN_A_ROW = 50


class NonFiniteCheck:
    """Raises `FloatingPointError` naming the first iteration whose loss (or, when given, parameters) was not
    finite; logs fp16's skipped steps."""

    def __init__(self, describe: Callable[[int], str], lag: int, logger: Any = None):
        self.describe, self.lag, self.logger = describe, lag, logger
        self.pending: collections.deque = collections.deque()
        self.skipped_in_a_row = 0

    def record(self, iteration: int, loss: Tensor, loss_scale: Tensor | None = None, params: Any = None) -> None:
        """Queues iteration ``iteration``'s values: its loss, its loss scale (fp16), and the state's params."""
        values = [loss.detach().float().reshape(())]
        values.append(loss_scale.detach().float().reshape(()) if loss_scale is not None else loss.new_full((), 1.0))
        if params is not None:
            values.append(all_finite(list(params.values())).float())
        packed = torch.stack(values)
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True).copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = packed, None
        self.pending.append((iteration, host, ready, loss_scale is not None))
        while len(self.pending) > self.lag:
            self._check_oldest()

    def check(self) -> None:
        """Reads every pending iteration's values."""
        while self.pending:
            self._check_oldest()

    def _check_oldest(self) -> None:
        iteration, host, ready, scaled = self.pending.popleft()
        if ready is not None:
            ready.synchronize()
        values = host.tolist()
        loss, scale = values[0], values[1]
        where = f"iteration {iteration} ({self.describe(iteration)})"
        if len(values) > 2 and not values[2]:
            self.pending.clear()
            raise FloatingPointError(
                f"a parameter became NaN or infinite at {where}; training stopped before saving it. Lower the "
                "learning rate, clip gradients (optim_wrapper.clip_grad) or check the data."
            )
        if math.isfinite(loss):
            self.skipped_in_a_row = 0
            return
        if scaled and self.skipped_in_a_row + 1 < MAX_SKIPPED_IN_A_ROW:
            self.skipped_in_a_row += 1
            if self.logger is not None:
                self.logger.warning(
                    f"The loss was {loss} at {where} under fp16: the optimizer step was skipped, the weights are "
                    f"unchanged and the loss scale is now {scale:g}."
                )
            return
        self.pending.clear()
        repeated = f" ({MAX_SKIPPED_IN_A_ROW} fp16 steps in a row: the forward pass overflows)" if scaled else ""
        raise FloatingPointError(
            f"the loss became {loss} at {where}{repeated}; training stopped. "
            "Lower the learning rate, clip gradients (optim_wrapper.clip_grad) or check the data."
        )

"""Per-example gradients and DP-SGD (Abadi et al., 2016) as a train-step option:
``make_train_step(model, tx, loss_fn, privacy=DPSGD(max_norm=1.0, noise_multiplier=1.1))``.

For a batch of B examples the step computes each example's gradient ``g_i`` (``vmap(grad)`` over the batch, the
loss evaluated on that example alone), clips it to norm ``C = max_norm`` over all trained parameters,

    g_i <- g_i * min(1, C / (||g_i|| + 1e-6)),

and hands the optimizer ``(sum_i g_i + N(0, (noise_multiplier * C)^2 I)) / B`` (``B`` = ``expected_batch_size``
when given, as for Poisson sampling). These are Opacus's definitions (its ``DPOptimizer``: clip factor, noise
std, averaging), checked against Opacus in the tests. The noise comes from the state's generators, so a run is
reproducible and resumes exactly.

The privacy spent, ε for a given δ, is Opacus's RDP accountant's (`epsilon`); funceng does no accounting of its
own. The accountant assumes each example enters a batch independently with probability ``sample_rate``
(Poisson sampling); a shuffled loader of fixed-size batches is the usual approximation of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from funceng import tree
from funceng.errors import require
from funceng.grads import Grads, LossFn, ModelFunction, autocast
from funceng.loss import parse_loss

CLIP_EPS = 1e-6  # Opacus's: per_sample_clip_factor = max_norm / (norm + 1e-6), at most 1


@dataclass(frozen=True)
class DPSGD:
    """Clip each example's gradient to ``max_norm``, add Gaussian noise of std ``noise_multiplier * max_norm`` to
    their sum, average over ``expected_batch_size`` (the batch's size when ``None``)."""

    max_norm: float
    noise_multiplier: float
    expected_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"DPSGD: max_norm must be a positive number, got {self.max_norm!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"DPSGD: noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.expected_batch_size is not None and self.expected_batch_size < 1:
            raise ValueError(f"DPSGD: expected_batch_size must be >= 1, got {self.expected_batch_size!r}")

    def gradients(self, step: Any, accumulate: int, data_parallel: bool) -> PerExampleGradients:
        """The gradient function (`funceng.grads`'s interface) of a `funceng.step.TrainStep` built with this."""
        if accumulate != 1:
            raise ValueError(
                "DP-SGD with accumulate > 1 would add noise to every micro-batch, not once per logical batch; "
                "use a larger batch (or expected_batch_size with Poisson sampling) instead"
            )
        if data_parallel or step.sharded:
            raise ValueError(
                "DP-SGD runs in one process here: with data parallelism every rank would add its own noise. "
                "Pass data_parallel=False"
            )
        return PerExampleGradients(step.model, step.loss_fn, step.amp_dtype, step.device_type, step.trainable, self)


def check_model(model: nn.Module) -> None:
    """Refuses layers that mix the examples of a batch, which per-example gradients cannot separate."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"DP-SGD: {name or 'the model'} is a {type(module).__name__}, which mixes the examples of a batch, "
                "so an example's gradient depends on the others and clipping it bounds nothing. Replace it with "
                "GroupNorm or LayerNorm (Opacus's ModuleValidator.fix does the same)"
            )


def per_example_grads(
    model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], buffers: dict[str, Tensor], batch: Any
) -> tuple[dict[str, Tensor], Tensor]:
    """``(grads, losses)``: each example's gradient of ``loss_fn(model, that example as a batch of one)`` with
    respect to ``params`` (leading dimension B), and each example's loss."""
    grads, (losses, _) = _vmapped_grads(ModelFunction(model, loss_fn), None, "cpu", params, {}, buffers, batch)
    return grads, losses


def _vmapped_grads(loss_module: ModelFunction, amp_dtype, device_type: str, trained, others, buffers, batch):
    """``(grads, (losses, logs))``, each with a leading batch dimension; ``others``: the untrained parameters."""

    def example_loss(p: dict, example: Any):
        as_batch = tree.map_tensors(lambda t: t.unsqueeze(0), example)
        with autocast(device_type, amp_dtype):
            loss, logs = parse_loss(loss_module.call_with({**others, **p}, buffers, as_batch))
        return loss, (loss.detach(), logs)

    per_example = torch.func.vmap(
        torch.func.grad(example_loss, has_aux=True), in_dims=(None, 0), randomness="different"
    )
    with torch.no_grad():  # modules the loss closes over must not record the step's arithmetic
        return per_example(trained, batch)


class PerExampleGradients:
    """``grads_fn(params, buffers, batch, scale) -> (grads, loss, logs)`` where ``grads`` is the DP-SGD gradient."""

    def __init__(self, model, loss_fn: LossFn, amp_dtype, device_type: str, trained: list[str], config: DPSGD):
        check_model(model)
        if amp_dtype == torch.float16:
            raise ValueError(
                "DP-SGD: amp='fp16' is not supported (clipping needs unscaled per-example gradients); use amp='bf16'"
            )
        self.loss_module = ModelFunction(model, loss_fn)
        self.amp_dtype, self.device_type, self.trained, self.config = amp_dtype, device_type, trained, config

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        trained = {name: params[name] for name in self.trained}
        others = {name: p for name, p in params.items() if name not in trained}
        grads, (losses, logs) = _vmapped_grads(
            self.loss_module, self.amp_dtype, self.device_type, trained, others, buffers, batch
        )
        with torch.no_grad():
            return self._privatise(grads, losses, logs)

    def _privatise(self, grads: dict[str, Tensor], losses: Tensor, logs: dict) -> Grads:
        config, per_example = self.config, list(grads.values())
        batch_size = losses.shape[0]
        squared = torch.stack([g.reshape(batch_size, -1).square().sum(1) for g in per_example]).sum(0)
        norms = squared.sqrt()
        factor = (config.max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        denominator = config.expected_batch_size or batch_size
        std = config.noise_multiplier * config.max_norm
        private = {}
        for name, g in grads.items():
            summed = torch.tensordot(factor.to(g.dtype), g, dims=1)
            if std > 0:
                summed = summed + std * torch.randn_like(summed)
            private[name] = summed / denominator
        logged = {key: value.mean() for key, value in logs.items()}
        logged["clipped_fraction"] = (norms > config.max_norm).float().mean()
        return private, losses.mean(), logged


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The ε of ``steps`` DP-SGD steps at ``noise_multiplier`` and ``sample_rate`` (batch size / dataset size), for
    ``delta``, by Opacus's RDP accountant. Needs ``pip install 'funceng[privacy]'`` (Opacus)."""
    accountants = require("opacus.accountants", "privacy", "funceng.privacy.epsilon (Opacus's RDP accountant)")
    accountant = accountants.RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))

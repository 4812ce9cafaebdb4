"""MMEngine's data preprocessors: what a model does to a batch before ``forward``.

`BaseDataPreprocessor` moves the batch to the model's device (``cast_data``); `ImgDataPreprocessor` also stacks a
list of images into one batch (padded to a multiple of ``pad_size_divisor``), swaps BGR and RGB, and normalises
with ``mean`` and ``std``. A model given ``data_preprocessor=dict(type="ImgDataPreprocessor", ...)`` builds it
from the ``MODELS`` registry, as in MMEngine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from funceng import tree
from funceng.registry import MODELS


@MODELS.register
class BaseDataPreprocessor(nn.Module):
    """Moves every tensor of a batch (dicts, lists, tuples of them) to the model's device."""

    def __init__(self, non_blocking: bool = False):
        super().__init__()
        self._non_blocking = non_blocking
        self._device = torch.device("cpu")

    def _apply(self, fn, recurse=True):  # follows .to(device) / .cuda() of the model
        probe = fn(torch.empty(0, device=self._device))
        self._device = probe.device
        return super()._apply(fn, recurse)

    def cast_data(self, data: Any) -> Any:
        return tree.map_tensors(lambda t: t.to(self._device, non_blocking=self._non_blocking), data)

    def forward(self, data: Any, training: bool = False) -> Any:
        return self.cast_data(data)


@MODELS.register
class ImgDataPreprocessor(BaseDataPreprocessor):
    """``data["inputs"]`` (a list of ``C,H,W`` images or an ``N,C,H,W`` tensor, or a batch's first element)
    becomes one float batch: channels swapped if ``bgr_to_rgb`` / ``rgb_to_bgr``, ``(x - mean) / std``, padded
    with ``pad_value`` to a multiple of ``pad_size_divisor``. Returns ``dict(inputs=..., data_samples=...)``."""

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pad_size_divisor: int = 1,
        pad_value: float = 0,
        bgr_to_rgb: bool = False,
        rgb_to_bgr: bool = False,
        non_blocking: bool = False,
    ):
        super().__init__(non_blocking)
        if bgr_to_rgb and rgb_to_bgr:
            raise ValueError("ImgDataPreprocessor: bgr_to_rgb and rgb_to_bgr cannot both be set")
        if (mean is None) != (std is None):
            raise ValueError("ImgDataPreprocessor: give both mean and std, or neither")
        self._enable_normalize = mean is not None
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)
        self.pad_size_divisor, self.pad_value = pad_size_divisor, pad_value
        self._channel_conversion = bgr_to_rgb or rgb_to_bgr

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        if self._channel_conversion and image.shape[-3] == 3:
            image = image.flip(-3)
        image = image.float()
        if self._enable_normalize:
            image = (image - self.mean) / self.std
        return image

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        h, w = batch.shape[-2:]
        d = self.pad_size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        return F.pad(batch, (0, pad_w, 0, pad_h), value=self.pad_value) if pad_h or pad_w else batch

    def forward(self, data: Any, training: bool = False) -> Any:
        data = self.cast_data(data)
        if not isinstance(data, Mapping) or "inputs" not in data:
            raise TypeError(
                "ImgDataPreprocessor expects each batch as a dict with 'inputs' (and 'data_samples'), as MMEngine's; "
                f"got {type(data).__name__}. Return dict(inputs=..., data_samples=...) from the dataset"
            )
        data, inputs = dict(data), data["inputs"]
        if isinstance(inputs, torch.Tensor):
            batch = self._pad(self._one(inputs))
        else:
            images = [self._one(image) for image in inputs]
            h = max(i.shape[-2] for i in images)
            w = max(i.shape[-1] for i in images)
            d = self.pad_size_divisor
            h, w = -(-h // d) * d, -(-w // d) * d
            images = [F.pad(i, (0, w - i.shape[-1], 0, h - i.shape[-2]), value=self.pad_value) for i in images]
            batch = torch.stack(images)
        data["inputs"] = batch
        data.setdefault("data_samples", None)
        return data

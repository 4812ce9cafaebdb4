"""MMEngine's ``mmengine.dataset``: `BaseDataset`, `Compose`, the collate functions and the samplers."""

from torch.utils.data.dataloader import default_collate

from funceng.dataset.base_dataset import BaseDataset, Compose
from funceng.runner.data import pseudo_collate
from funceng.runner.sampler import DefaultSampler

__all__ = ["BaseDataset", "Compose", "DefaultSampler", "default_collate", "pseudo_collate"]

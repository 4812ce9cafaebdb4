"""MMEngine's ``BaseDataset`` (lazy ``load_data_list``, ``metainfo``, a ``pipeline`` of transforms) and
``Compose``, at MMEngine's import path (``mmengine.dataset.base_dataset``)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from funceng.registry import DATASETS, TRANSFORMS


class Compose:
    """Applies ``transforms`` in order (each a callable or a config dict built from ``TRANSFORMS``); a transform
    returning ``None`` drops the sample (``None`` is returned)."""

    def __init__(self, transforms: Sequence[Callable | Mapping] | None):
        self.transforms = []
        for i, transform in enumerate(transforms or []):
            if isinstance(transform, Mapping):
                transform = TRANSFORMS.build(transform, f"pipeline[{i}]")
            if not callable(transform):
                raise TypeError(f"pipeline[{i}]: expected a callable or a config dict, got {type(transform).__name__}")
            self.transforms.append(transform)

    def __call__(self, data: Any) -> Any:
        for transform in self.transforms:
            data = transform(data)
            if data is None:
                return None
        return data


@DATASETS.register
class BaseDataset(Dataset):
    """MMEngine's ``BaseDataset``: a list of samples (dicts) from ``load_data_list``, each passed through the
    ``pipeline``. By default ``load_data_list`` reads OpenMMLab's annotation format, a JSON ``ann_file`` with
    ``metainfo`` and ``data_list``, each entry through ``parse_data_info`` (its ``data_prefix`` keys joined with the
    prefixes; ``ann_file`` and relative prefixes joined with ``data_root``). With ``lazy_init=True`` the list is
    loaded on first use (``full_init``). ``metainfo`` merges the class attribute ``METAINFO``, the argument and the
    annotation file's, in that order of precedence reversed (the argument wins). ``indices`` (an int: the first N;
    a list: those) keeps a subset. ``test_mode`` is kept for subclasses to read."""

    METAINFO: dict = {}

    def __init__(
        self,
        ann_file: str = "",
        metainfo: Mapping | None = None,
        data_root: str = "",
        data_prefix: Mapping | None = None,  # MMEngine's default: dict(img_path="")
        filter_cfg: Mapping | None = None,
        indices: int | Sequence[int] | None = None,
        serialize_data: bool = True,
        pipeline: Sequence[Callable | Mapping] = (),
        test_mode: bool = False,
        lazy_init: bool = False,
        max_refetch: int = 1000,
    ):
        self.ann_file, self.data_root = ann_file, data_root
        self.data_prefix = dict(data_prefix if data_prefix is not None else {"img_path": ""})
        if data_root:
            if ann_file and not os.path.isabs(ann_file):
                self.ann_file = os.path.join(data_root, ann_file)
            for key, prefix in self.data_prefix.items():
                if not os.path.isabs(prefix):
                    self.data_prefix[key] = os.path.join(data_root, prefix)
        self.filter_cfg, self._indices = filter_cfg, indices
        self.serialize_data, self.test_mode, self.max_refetch = serialize_data, test_mode, max_refetch
        self._metainfo = {**copy.deepcopy(self.METAINFO), **dict(metainfo or {})}
        self.pipeline = Compose(pipeline)
        self.data_list: list[dict] = []
        self._fully_initialized = False
        if not lazy_init:
            self.full_init()

    @property
    def metainfo(self) -> dict:
        return copy.deepcopy(self._metainfo)

    def load_data_list(self) -> list[dict]:
        """OpenMMLab's annotation format (see the class docstring); subclasses with other formats override it."""
        if not self.ann_file:
            raise NotImplementedError(
                f"{type(self).__name__}: give ann_file (a JSON file with 'metainfo' and 'data_list') or override "
                "load_data_list() to return a list of dicts"
            )
        with open(self.ann_file) as f:
            annotations = json.load(f)
        if not isinstance(annotations, dict) or not {"metainfo", "data_list"} <= set(annotations):
            raise ValueError(f"{self.ann_file}: expected a JSON object with 'metainfo' and 'data_list'")
        for key, value in annotations["metainfo"].items():
            self._metainfo.setdefault(key, value)
        data_list = []
        for raw in annotations["data_list"]:
            parsed = self.parse_data_info(raw)
            data_list.extend(parsed if isinstance(parsed, list) else [parsed])
        return data_list

    def parse_data_info(self, raw_data_info: dict) -> dict | list[dict]:
        """One annotation entry with its ``data_prefix`` keys joined with the prefixes."""
        for key, prefix in self.data_prefix.items():
            if key not in raw_data_info:
                raise KeyError(f"{self.ann_file}: an entry has no {key!r} for data_prefix[{key!r}]: {raw_data_info}")
            raw_data_info[key] = os.path.join(prefix, raw_data_info[key])
        return raw_data_info

    def filter_data(self) -> list[dict]:
        """The samples to keep (all of them; subclasses filter by ``self.filter_cfg``), as MMEngine's."""
        return self.data_list

    def full_init(self) -> None:
        if self._fully_initialized:
            return
        self.data_list = list(self.load_data_list())
        self.data_list = list(self.filter_data())
        if self._indices is not None:
            keep = range(self._indices) if isinstance(self._indices, int) else self._indices
            self.data_list = [self.data_list[i] for i in keep]
        self._fully_initialized = True

    def get_data_info(self, idx: int) -> dict:
        self.full_init()
        info = copy.deepcopy(self.data_list[idx])
        info["sample_idx"] = idx
        return info

    def prepare_data(self, idx: int) -> Any:
        return self.pipeline(self.get_data_info(idx))

    def __getitem__(self, idx: int) -> Any:
        self.full_init()
        data = self.prepare_data(idx)
        if data is None:
            raise ValueError(
                f"{type(self).__name__}[{idx}]: the pipeline dropped the sample (a transform returned None)"
            )
        return data

    def __len__(self) -> int:
        self.full_init()
        return len(self.data_list)

"""MMEngine's ``FlexibleRunner`` (training strategies: DeepSpeed, ColossalAI, FSDP by ``strategy``), refused."""

from __future__ import annotations

from typing import Any

from funceng.errors import ConfigError
from funceng.registry import RUNNERS


@RUNNERS.register
class FlexibleRunner:
    """Refused with a pointer: funceng's `Runner` covers what FlexibleRunner's strategies do with PyTorch's own
    stack (``model_wrapper_cfg=dict(type="MMFullyShardedDataParallel")`` for FSDP2, ``compile``, AMP through
    ``optim_wrapper``); DeepSpeed and ColossalAI are not supported."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise ConfigError(
            "FlexibleRunner is not supported by funceng: use funceng.runner.Runner; for sharded training pass "
            "model_wrapper_cfg=dict(type='MMFullyShardedDataParallel') (FSDP2), for AMP "
            "optim_wrapper=dict(type='AmpOptimWrapper', ...); DeepSpeed and ColossalAI strategies are not available"
        )

    @classmethod
    def from_cfg(cls, cfg: Any) -> FlexibleRunner:
        return cls()

"""A short iteration-based run for tests/test_terminal.py to watch in a real terminal (tmux): a live progress bar
while validation and checkpoint lines print, slow enough for a Ctrl-C to land during training.

    python tests/terminal_run.py WORK_DIR MAX_ITERS
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from funceng.runner import Hook, Runner  # noqa: E402
from tests.runner_fixtures import runner_kwargs  # noqa: E402


class Slow(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        time.sleep(0.05)


torch.manual_seed(0)
kwargs = runner_kwargs(
    Path(sys.argv[1]),
    train_cfg=dict(by_epoch=False, max_iters=int(sys.argv[2]), val_interval=10),
    default_hooks=dict(logger=dict(interval=5), checkpoint=dict(interval=10, by_epoch=False)),
    custom_hooks=[Slow()],
)
with Runner(**kwargs) as runner:  # work_dir: WORK_DIR/work
    runner.train()
print("RUN FINISHED")

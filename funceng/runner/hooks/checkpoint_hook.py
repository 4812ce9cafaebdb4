"""`CheckpointHook`: when to save, which checkpoints to keep, and the best one."""

from __future__ import annotations

from funceng.evaluator import metric_rule
from funceng.runner.hooks.hook import HOOKS, Hook


@HOOKS.register
class CheckpointHook(Hook):
    """Saves ``epoch_N`` / ``iter_N`` checkpoints every ``interval`` (and the last one), keeps at most
    ``max_keep_ckpts`` of them, and with ``save_best`` keeps ``best_<metric>_<epoch|iter>_N`` for the best value
    (``rule``: ``"greater"`` or ``"less"``, inferred from the name if not given). ``out_dir``: checkpoints go to
    ``out_dir/<work_dir's name>`` (``last_checkpoint`` stays in work_dir). The Runner's checkpoint manager
    (`funceng.runner.checkpointer`) does the saving and the bookkeeping."""

    priority = "VERY_LOW"

    def __init__(
        self,
        interval: int = 1,
        by_epoch: bool | None = None,
        max_keep_ckpts: int = -1,
        save_best: str | None = None,
        rule: str | None = None,
        save_last: bool = True,
        out_dir: str | None = None,
    ):
        metric_rule(save_best or "", rule)  # checks rule
        self.interval, self.by_epoch, self.max_keep_ckpts = interval, by_epoch, max_keep_ckpts
        self.save_best, self.rule, self.save_last, self.out_dir = save_best, rule, save_last, out_dir

    def before_train(self, runner):
        if self.by_epoch is None:
            self.by_epoch = runner.by_epoch

    def _due(self, count: int, last: int) -> bool:
        return count % self.interval == 0 or (count >= last and self.save_last)

    def after_train_epoch(self, runner):
        if self.by_epoch and self._due(runner.epoch, runner.max_epochs):
            runner.logger.info(f"Saving checkpoint at {runner.epoch} epochs")
            runner.checkpointer.save_rolling(f"epoch_{runner.epoch}", self.max_keep_ckpts)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.by_epoch and self._due(runner.iter, runner.max_iters):
            runner.logger.info(f"Saving checkpoint at {runner.iter} iterations")
            runner.checkpointer.save_rolling(f"iter_{runner.iter}", self.max_keep_ckpts)

    def after_val_epoch(self, runner, metrics=None):
        if not self.save_best or not metrics:
            return
        key = next(iter(metrics)) if self.save_best == "auto" else self.save_best
        if key not in metrics:
            raise KeyError(f"CheckpointHook.save_best={self.save_best!r} is not among the metrics {sorted(metrics)}")
        value = float(metrics[key])
        unit, count = ("epoch", runner.epoch) if runner.by_epoch else ("iter", runner.iter)
        name = f"best_{key.replace('/', '_')}_{unit}_{count}"
        if runner.checkpointer.save_if_best(key, value, metric_rule(key, self.rule), name):
            runner.logger.info(f"The best checkpoint with {value:.4f} {key} at {count} {unit} is saved to {name}.")

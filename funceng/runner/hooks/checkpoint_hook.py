"""`CheckpointHook`: when to save, which checkpoints to keep, and the best one."""

from __future__ import annotations

from funceng.evaluator import metric_rule
from funceng.runner.hooks.hook import HOOKS, Hook


@HOOKS.register
class CheckpointHook(Hook):
    """Saves ``epoch_N`` / ``iter_N`` checkpoints every ``interval`` epochs (``by_epoch=True``) or iterations (and
    the last one; ``interval=-1``: the last only), with MMEngine's defaults: the hook alone saves the last epoch only,
    ``default_hooks`` gives it ``interval=1``; with an iteration-based loop, ``by_epoch=True`` saves once, at the end
    (``epoch_1``), so iteration checkpoints need ``by_epoch=False``. It keeps at most
    ``max_keep_ckpts`` of them, and with ``save_best`` keeps ``best_<metric>_<epoch|iter>_N`` for the best value
    (``rule``: ``"greater"`` or ``"less"``, inferred from the name if not given). ``out_dir``: checkpoints go to
    ``out_dir/<work_dir's name>`` (``last_checkpoint`` stays in work_dir); ``save_begin``: the first epoch or
    iteration that may be saved; ``published_keys`` (``"meta"``, ``"state_dict"``): after training, the last
    and the best checkpoint are also written as MMEngine ``.pth`` files named ``<name>-<sha256[:8]>.pth``
    (`funceng.mmengine_format.publish`). The Runner's checkpoint manager (`funceng.runner.checkpointer`) does the
    saving and the bookkeeping."""

    priority = "VERY_LOW"

    def __init__(
        self,
        interval: int = -1,
        by_epoch: bool = True,
        max_keep_ckpts: int = -1,
        save_best: str | None = None,
        rule: str | None = None,
        save_last: bool = True,
        out_dir: str | None = None,
        save_begin: int = 0,
        published_keys: str | list[str] | None = None,
    ):
        if save_best not in (None, "auto"):
            metric_rule(save_best, rule)  # checks the rule, or that the name tells it
        if isinstance(published_keys, str):
            published_keys = [published_keys]
        unknown = set(published_keys or ()) - {"meta", "state_dict"}
        if unknown:
            raise ValueError(
                f"CheckpointHook.published_keys: {sorted(unknown)} cannot be published; a published checkpoint holds "
                "'meta' and 'state_dict' (the weights). Resume from the funceng checkpoint itself"
            )
        self.save_begin, self.published_keys = save_begin, published_keys
        self.interval, self.by_epoch, self.max_keep_ckpts = interval, by_epoch, max_keep_ckpts
        self.save_best, self.rule, self.save_last, self.out_dir = save_best, rule, save_last, out_dir

    def before_train(self, runner):
        if self.by_epoch and not runner.by_epoch:
            runner.logger.info(
                "CheckpointHook(by_epoch=True) with an iteration-based loop saves once, when training ends, as "
                "MMEngine's does; for a checkpoint every N iterations set by_epoch=False, interval=N"
            )

    def _due(self, count: int, last: int) -> bool:
        return (self.interval > 0 and count % self.interval == 0) or (count >= last and self.save_last)

    def after_train_epoch(self, runner):
        done = runner.epoch + 1
        if self.by_epoch and done >= self.save_begin and self._due(done, runner.max_epochs):
            self._save(runner, f"epoch_{done}", f"Saving checkpoint at {done} epochs")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        done = runner.iter + 1
        if not self.by_epoch and done >= self.save_begin and self._due(done, runner.max_iters):
            self._save(runner, f"iter_{done}", f"Saving checkpoint at {done} iterations")

    def _save(self, runner, name: str, message: str) -> None:
        runner.logger.info(message)
        runner.checkpointer.save_rolling(name, self.max_keep_ckpts)

    def after_train(self, runner):
        if self.published_keys is None or runner.rank != 0:
            return
        from funceng.mmengine_format import publish

        for name in [*runner.checkpointer.kept[-1:], *filter(None, [runner.checkpointer.best_path])]:
            path = publish(runner.checkpointer.directory / name, self.published_keys)
            runner.logger.info(f"The checkpoint {name} is published to {path}.")

    def after_val_epoch(self, runner, metrics=None):
        if not self.save_best or not metrics:
            return
        key = next(iter(metrics)) if self.save_best == "auto" else self.save_best
        if key not in metrics:
            raise KeyError(f"CheckpointHook.save_best={self.save_best!r} is not among the metrics {sorted(metrics)}")
        value = float(metrics[key])
        unit, count = ("epoch", runner.epoch) if self.by_epoch else ("iter", runner.iter)  # the hook's unit
        name = f"best_{key.replace('/', '_')}_{unit}_{count}"
        if runner.checkpointer.save_if_best(key, value, metric_rule(key, self.rule), name):
            runner.logger.info(f"The best checkpoint with {value:.4f} {key} at {count} {unit} is saved to {name}.")

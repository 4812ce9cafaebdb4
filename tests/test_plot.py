"""funceng plot: training curves against iterations with an integer epoch axis above, validation curves for every
metric against integer epochs (or iterations), the validation loss beside the training loss."""

import torch

from funceng.metrics import Accuracy, Loss, TopK
from funceng.plot import charts, plot_run, read_records
from funceng.runner import Runner
from tests.runner_fixtures import runner_kwargs


def logged(tmp_path, **overrides) -> Runner:
    torch.manual_seed(0)
    kwargs = runner_kwargs(
        tmp_path,
        val_evaluator=[Accuracy(), TopK(k=(1, 2)), Loss()],
        default_hooks=dict(logger=dict(interval=3), checkpoint=None),
        **overrides,
    )
    with Runner(**kwargs) as runner:
        runner.train()
    return runner


def test_epoch_based_charts_put_epochs_on_integer_axes_and_val_loss_beside_train_loss(tmp_path):
    runner = logged(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=3))
    drawn = {c.name: c for c in charts(read_records(runner.log_dir))}
    assert list(drawn) == ["train_loss", "lr", "val_accuracy", "val_loss", "val_top1", "val_top2"]
    loss = drawn["train_loss"]
    assert loss.title == "Training and validation loss" and loss.xlabel == "iteration"
    assert loss.iters_per_epoch == 10  # 10 batches an epoch: the epoch axis above
    assert [x for x, _ in loss.curves["val loss"]] == [10, 20, 30]  # each validation at its epoch's end
    for name in ("val_accuracy", "val_top2", "val_loss"):
        assert drawn[name].xlabel == "epoch" and [x for x, _ in drawn[name].curves[name[4:]]] == [1, 2, 3]
        assert drawn[name].title == f"Validation {name[4:]}" and drawn[name].iters_per_epoch is None
    paths = plot_run(runner.work_dir)
    assert [p.name for p in paths] == [f"{name}.png" for name in drawn] and all(
        p.stat().st_size > 10_000 for p in paths
    )


def test_iteration_based_charts_have_no_epoch_axis(tmp_path):
    runner = logged(tmp_path, train_cfg=dict(by_epoch=False, max_iters=12, val_interval=6))
    drawn = {c.name: c for c in charts(read_records(runner.log_dir))}
    assert drawn["train_loss"].iters_per_epoch is None and drawn["val_accuracy"].xlabel == "iteration"
    assert [x for x, _ in drawn["val_accuracy"].curves["accuracy"]] == [6, 12]
    assert [x for x, _ in drawn["train_loss"].curves["val loss"]] == [6, 12]

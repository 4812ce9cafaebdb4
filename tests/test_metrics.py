"""funceng.metrics: Accuracy, TopK and Loss against direct computation, in every form of eval output; the
torchmetrics adapter against torchmetrics itself; two ranks give the single process's values (nothing counted
twice)."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from funceng.errors import MissingExtraError
from funceng.metrics import Accuracy, Loss, TopK, TorchMetric


def batches(n_batches=5, size=7, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, classes, generator=gen), torch.randint(0, classes, (size,), generator=gen))
        for _ in range(n_batches)
    ]


def run(metric, data, form="tuple"):
    for scores, labels in data:
        if form == "tuple":
            metric.process(None, (scores, labels))
        elif form == "dict":
            metric.process(None, {"pred_score": scores, "gt_label": labels})
        else:  # scores alone, labels from the batch
            metric.process((torch.zeros(len(labels), 2), labels), scores)
    return metric.evaluate(sum(len(labels) for _, labels in data))


@pytest.mark.parametrize("form", ["tuple", "dict", "scores_alone"])
def test_accuracy_topk_and_loss_equal_direct_computation_for_every_output_form(form):
    data = batches()
    scores, labels = torch.cat([s for s, _ in data]), torch.cat([y for _, y in data])
    top = scores.topk(3, dim=1).indices
    expected = {f"top{k}": 100.0 * (top[:, :k] == labels[:, None]).any(1).float().mean().item() for k in (1, 3)}
    assert run(TopK(k=(1, 3)), data, form) == pytest.approx(expected)
    assert run(Accuracy(), data, form) == pytest.approx({"accuracy": expected["top1"]})
    assert run(Loss(), data, form) == pytest.approx({"loss": F.cross_entropy(scores, labels).item()})
    assert run(Accuracy(prefix="val"), data, form).keys() == {"val/accuracy"}


def test_torchmetric_wraps_any_torchmetrics_metric_and_computes_it_on_all_samples():
    import torchmetrics

    data = batches()
    scores, labels = torch.cat([s for s, _ in data]), torch.cat([y for _, y in data])
    f1 = torchmetrics.classification.MulticlassF1Score(num_classes=4, average="macro")
    got = run(TorchMetric("MulticlassF1Score", name="f1", num_classes=4, average="macro"), data)
    assert got == pytest.approx({"f1": f1(scores, labels).item()})
    acc = run(TorchMetric(torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")), data)
    assert acc == pytest.approx({"MulticlassAccuracy": run(Accuracy(), data)["accuracy"] / 100})


def test_torchmetric_refuses_what_it_cannot_use_and_names_the_missing_extra(monkeypatch):
    with pytest.raises(ValueError, match="torchmetrics has no metric named 'NoSuchScore'"):
        TorchMetric("NoSuchScore")
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'funceng\[metrics\]'"):
        TorchMetric("MulticlassAccuracy", num_classes=4)


def _rank(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    data = batches(n_batches=6)
    mine = data[rank::world]  # a round-robin share of whole batches: each rank's samples in dataset order
    metrics = [TorchMetric("MulticlassF1Score", name="f1", num_classes=4, average="macro"), TopK(k=(1, 2)), Loss()]
    values = {}
    for metric in metrics:
        for scores, labels in mine:
            metric.process(None, (scores, labels))
        values.update(metric.evaluate(42))
    torch.save(values, f"{out}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (seen: SIGABRT in CI)
    dist.destroy_process_group()


def test_two_ranks_give_the_single_process_values(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    data = batches(n_batches=6)
    single = {}
    for metric in [TorchMetric("MulticlassF1Score", name="f1", num_classes=4, average="macro"), TopK(k=(1, 2)), Loss()]:
        single.update(run(metric, data))
    for rank in range(2):
        assert torch.load(os.path.join(tmp_path, f"rank{rank}.pt")) == pytest.approx(single)

"""The seed tutorial's script runs with only its imports changed, logs like MMEngine and leaves its work_dir."""

import re
import runpy
from pathlib import Path

import torchvision.datasets.cifar

from .cifar import write_tiny_cifar10

ROOT = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} - funceng - INFO - "


def test_seed_script_trains_on_tiny_cifar10_with_mmengine_logs(tmp_path, monkeypatch, capsys):
    write_tiny_cifar10(tmp_path / "data" / "cifar10", per_train_batch=64, test_size=40)
    # The files are real torchvision CIFAR-10 files, but their md5s differ from the published ones, which
    # `download=True` would otherwise try to fetch again.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "cifar10_resnet50.py"), run_name="__main__")
    out = capsys.readouterr().out

    assert re.search(STAMP + r"\n-{60}\nSystem environment:\n    sys.platform: ", out)
    assert "numpy_random_seed:" in out and "PyTorch: " in out
    train_lines = re.findall(
        STAMP + r"Epoch\(train\) \[(\d)\]\[10/10\]  lr: 1\.0000e-03  eta: \d+:\d\d:\d\d  "
        r"time: \d+\.\d{4}  data_time: \d+\.\d{4}  loss: (\d+\.\d{4})\n",
        out,
    )
    assert [epoch for epoch, _ in train_lines] == ["1", "2", "3", "4", "5"]
    for epoch in range(1, 6):
        assert f"Saving checkpoint at {epoch} epochs" in out
    val_lines = re.findall(
        STAMP + r"Epoch\(val\) \[(\d)\]\[2/2\]    accuracy: (\d+\.\d{4})  data_time: \d\.\d{4}  time: \d\.\d{4}\n", out
    )
    assert [epoch for epoch, _ in val_lines] == ["1", "2", "3", "4", "5"]
    assert all(0.0 <= float(acc) <= 100.0 for _, acc in val_lines)
    assert out.index("Saving checkpoint at 1 epochs") < out.index("Epoch(val) [1][2/2]")

    work_dir = tmp_path / "work_dir"
    assert {p.name for p in work_dir.iterdir() if p.name.startswith("epoch_")} == {f"epoch_{i}" for i in range(1, 6)}
    assert Path((work_dir / "last_checkpoint").read_text()) == work_dir / "epoch_5"
    (log_dir,) = [p for p in work_dir.iterdir() if re.fullmatch(r"\d{8}_\d{6}", p.name)]
    log_text = (log_dir / f"{log_dir.name}.log").read_text()
    assert "Epoch(val) [5][2/2]    accuracy:" in log_text
    scalars = (log_dir / "vis_data" / "scalars.json").read_text().splitlines()
    assert len(scalars) == 10 and all('"step": ' in line for line in scalars)

"""Tiny CIFAR-10 files in torchvision's on-disk format (``cifar-10-batches-py``), for the real loader."""

import pickle
from pathlib import Path

import numpy as np

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_tiny_cifar10(root: Path, per_train_batch: int, test_size: int, seed: int = 0) -> Path:
    """Five training batches of ``per_train_batch`` images and a test batch, random pixels and labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int) -> None:
        entry = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    for i in range(1, 6):
        batch(f"data_batch_{i}", per_train_batch)
    batch("test_batch", test_size)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": LABELS, "num_cases_per_batch": per_train_batch, "num_vis": 3072}, f)
    return folder

"""The examples run end to end and learn."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_functional_example_trains_on_digits():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "functional_mlp.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    accuracies = [float(a) for a in re.findall(r"val accuracy ([\d.]+)%", out)]
    assert len(accuracies) == 3
    assert accuracies[-1] > 85.0, out

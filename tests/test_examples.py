"""The examples run end to end and learn."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    """The standard output of ``examples/<name>`` run with ``args``; fails on a non-zero exit."""
    command = [sys.executable, str(ROOT / "examples" / name), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout


def test_functional_example_trains_on_digits():
    out = run_example("functional_mlp.py", "--epochs", "3")
    accuracies = [float(a) for a in re.findall(r"val accuracy ([\d.]+)%", out)]
    assert len(accuracies) == 3
    assert accuracies[-1] > 85.0, out


def test_gan_example_trains_two_alternating_steps_and_eager_matches_compiled():
    out = run_example("gan_two_steps.py", "--steps", "200")
    untrained = float(re.search(r"untrained generator: distance from the ring ([\d.]+)", out).group(1))
    trained = [float(d) for d in re.findall(r"final losses: .* distance from the ring ([\d.]+)", out)]
    assert len(trained) == 2 and trained[0] == trained[1], out  # eager and compiled print the same numbers
    assert trained[0] < 0.7 * untrained, out
    assert float(re.search(r"largest weight difference ([\d.e+-]+)", out).group(1)) < 1e-4, out

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


def test_population_example_trains_a_seed_by_lr_grid_and_names_the_best_member(tmp_path):
    out = run_example("digits_population.py", "--seeds", "2", "--lrs", "0.01", "0.1", "--epochs", "2", "--eager",
                      "--work-dir", str(tmp_path))  # fmt: skip
    rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+)% \|", out, flags=re.M)
    assert [lr for lr, _ in rows] == ["0.01", "0.1"]
    assert "4 members (2 seeds x 2 learning rates)" in out
    best = float(re.search(r"best member: \d \(seed \d, lr [\d.]+\) with ([\d.]+)%", out).group(1))
    assert best >= max(float(mean) for _, mean in rows) and best > 80.0, out


def test_dpsgd_example_prints_epsilon_and_learns_privately():
    out = run_example("digits_dpsgd.py", "--epochs", "3")
    epsilon = float(re.search(r"epsilon = ([\d.]+) at delta = 1e-05", out).group(1))
    private, public = map(float, re.search(r"val accuracy: ([\d.]+)% with DP-SGD, ([\d.]+)% without", out).groups())
    assert 0 < epsilon < 10
    assert private > 70.0 and public > 90.0, out

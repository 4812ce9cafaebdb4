"""The comparison suite measures real runs in worker processes and reports what it could not run."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness lives beside the package, not in it

from compare import markdown, run_suite, write_results  # noqa: E402


def test_suite_times_systems_side_by_side_and_reports_skips(tmp_path):
    results = run_suite(["mlp"], ["a", "e", "g"], windows=2, steps=3, quick=True)
    rows = results["workloads"]["mlp"]["rows"]
    for key in ("a", "e"):
        row = rows[key]
        assert row["steps_per_s"] > 0 and len(row["windows_s"]) == 2 and all(t > 0 for t in row["windows_s"])
        assert row["first_step_s"] >= 0 and row["peak_memory_mb"] > 0
    assert rows["a"]["vs_a"] == 1.0 and rows["e"]["vs_a"] > 0
    assert rows["g"] == {"system": "funceng compiled + CUDA graphs", "skipped": "CUDA only"}
    table = markdown(results)
    assert "| (e) funceng eager |" in table and "skipped: CUDA only" in table

    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# Results\n\n<!-- cuda -->\nkept\n<!-- /cuda -->\n")
    write_results(results_file, results, "funceng bench --quick")
    write_results(results_file, results, "funceng bench --quick")  # replaces its own section, once
    text = results_file.read_text()
    assert text.count("<!-- cpu -->") == 1 and "kept" in text and "Command: `funceng bench --quick`" in text


def test_distributed_benchmark_runs_every_system_on_two_ranks():
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "benchmarks" / "distributed.py"),
        "--workloads",
        "mlp",
        "--windows",
        "1",
        "--steps",
        "2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| mlp")]
    assert [row.split(" | ")[1] for row in rows] == [
        "DDP + torch.optim",
        "funceng data-parallel, eager",
        "funceng data-parallel, compiled",
        "FSDP2 + torch.optim",
        "funceng FSDP2, eager",
    ]
    state_kib = [float(row.split(" | ")[4].rstrip(" |")) for row in rows]
    assert state_kib[3] == state_kib[4] == state_kib[0] / 2  # sharding halves each rank's state


def test_gan_memory_benchmark_reports_flat_memory_two_graphs_and_no_history():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gan_memory.py"), "--steps", "150", "--width", "64"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("funceng ")}
    assert set(rows) == {"eager", "compiled"}, out
    # columns: funceng, system, memory@100, memory@last, change, graphs, recompiles, leaves with history
    assert rows["compiled"][5:] == ["2", "0", "0"] and rows["eager"][5:] == ["0", "0", "0"], out
    assert all(abs(float(row[4].rstrip("%"))) < 5.0 for row in rows.values()), out


def test_checkpoint_io_benchmark_times_every_system_and_the_step_during_a_background_save(tmp_path):
    out = tmp_path / "io.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint_io.py"), "--model", "tiny", "--repeats", "1"]
        + ["--steps", "2", "--batch", "2", "--image", "32", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for row in ("funceng save_state / load_state", "torch.save / torch.load", "safetensors save_file / load_file"):
        assert f"| {row}" in done.stdout
    import json

    figures = json.loads(out.read_text())
    assert all(t["save"] > 0 and t["load"] > 0 for t in figures["io"].values())
    assert set(figures["steps"]) == {"no save in flight", "background save in flight", "blocking save before the steps"}


def test_population_benchmark_times_every_system_and_dp_sgd_beside_opacus():
    command = [sys.executable, str(ROOT / "benchmarks" / "population.py"), "--members", "2", "--windows", "1"]
    command += ["--steps", "2", "--models", "mlp"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if line.startswith("| mlp | 2 |")]
    systems = [row.split("|")[3].strip() for row in rows]
    assert systems == [
        "N plain torch.optim loops",
        "N funceng steps, eager",
        "N funceng steps, compiled",
        "population step, eager",
        "population step, compiled",
    ]
    assert all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows)
    for system in ("funceng DP-SGD step, eager", "funceng DP-SGD step, compiled", "Opacus GradSampleModule"):
        assert f"| {system}" in out

"""ProfilerHook: torch.profiler over a schedule of training iterations, eager and compiled, writing a
TensorBoard trace and logging the summary table; training is unchanged by it."""

import json

import pytest
import torch

from funceng.errors import ConfigError
from funceng.runner import ProfilerHook, Runner
from tests.runner_fixtures import runner_kwargs


def train(work, compile, hooks) -> Runner:
    torch.manual_seed(0)  # the same initial weights for both runs
    kwargs = runner_kwargs(work, custom_hooks=hooks, compile=compile, val_dataloader=None, val_evaluator=None)
    with Runner(**{**kwargs, "default_hooks": dict(checkpoint=None)}) as runner:
        runner.train()
    return runner


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_profiler_hook_traces_its_schedule_and_logs_the_table_without_changing_training(tmp_path, compile):
    hook = ProfilerHook(
        schedule=dict(wait=1, warmup=1, active=2),
        on_trace_ready=[dict(type="tb_trace"), dict(type="log_trace", row_limit=5)],
    )
    profiled, plain = (train(tmp_path / name, compile, hooks) for name, hooks in (("a", [hook]), ("b", [])))
    for name, value in plain.state["params"].items():
        torch.testing.assert_close(profiled.state["params"][name], value, rtol=0, atol=0, msg=name)
    [trace] = list((profiled.log_dir / "profiler").glob("*.pt.trace.json"))
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # wait 1 (step 0), warm up 1 (step 1), record 2
    log = (profiled.log_dir / f"{profiled.timestamp}.log").read_text()
    assert "ProfilerHook: profiling the next 4 training iterations (schedule" in log
    assert "the 5 costliest ops by self_cpu_time_total" in log and "Self CPU time total" in log
    assert "ProfilerHook: profiling done; TensorBoard traces in" in log
    assert hook.profiler is None and len(hook.tables) == 1


def test_profiler_hook_without_a_schedule_profiles_whole_epochs(tmp_path):
    hook = ProfilerHook(profile_times=1, on_trace_ready=dict(type="log_trace"))
    with Runner(**runner_kwargs(tmp_path, custom_hooks=[hook], default_hooks=dict(checkpoint=None))) as runner:
        runner.train()
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "profiling the next 10 training iterations (1 epoch(s))" in log and len(hook.tables) == 1


def test_profiler_hook_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="'active' .* must be at least 1"):
        ProfilerHook(schedule=dict(wait=1))
    with pytest.raises(ConfigError, match=r"on_trace_ready\[0\].type: expected one of \['log_trace', 'tb_trace'\]"):
        ProfilerHook(on_trace_ready=dict(type="chrome"))
    with pytest.raises(ConfigError, match="unknown key 'repeats'"):
        ProfilerHook(schedule=dict(active=1, repeats=2))

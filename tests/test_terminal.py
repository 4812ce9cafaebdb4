"""The run's terminal, seen in a real one (tmux renders what a user sees): log lines never run into a progress
bar, validation shows a bar of its own, level names are coloured on a TTY and plain elsewhere, and Ctrl-C says
how to resume."""

import io
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from funceng.runner import Runner
from funceng.runner.terminal import ColourFormatter, TerminalHandler, colours_wanted
from tests.runner_fixtures import runner_kwargs

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d - funceng - (\x1b\[[\d;]*m)?(INFO|WARNING)")
BAR = re.compile(r"^(Iter|Val|Epoch \d+/\d+|Test)\b.*\|")


class Terminal:
    """A detached tmux session running one command, 200 columns wide."""

    def __init__(self, command: str, name: str, env: str = ""):
        assert shutil.which("tmux"), "these tests drive a real terminal: install tmux"
        self.name = name
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        shell = f"cd {ROOT} && {env} {command}; echo EXIT=$?; sleep 60"
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "200", "-y", "60", shell], check=True)

    def screen(self, colours: bool = False) -> str:
        args = ["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", self.name] + (["-e"] if colours else [])
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (screen := self.screen()):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the terminal shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def terminal(request):
    opened = []

    def start(command: str, env: str = "") -> Terminal:
        opened.append(Terminal(command, f"funceng-test-{request.node.name[:40]}-{len(opened)}", env))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


def test_log_lines_never_run_into_the_bar_and_levels_are_coloured_on_a_tty(terminal, tmp_path):
    term = terminal(f"{sys.executable} tests/terminal_run.py {tmp_path} 30", env="NO_COLOR= TERM=xterm")
    term.wait_for("RUN FINISHED")
    lines = [line.rstrip() for line in term.screen().splitlines() if line.strip()]
    shown = [line for line in lines if LOG_LINE.match(line)]
    assert [line for line in shown if "Saving checkpoint at" in line] and len(shown) >= 8
    assert sum("Iter(val) [3/3]" in line and "accuracy:" in line for line in shown) == 3  # every 10 of 30 iters
    for line in lines:  # a mangled line has a bar's tail and a log line's head ("...it/s]2026/11/25 ...")
        assert not (re.search(r"it/s", line) and re.search(r"\d{4}/\d\d/\d\d \d\d:", line)), line
        assert "funceng - " not in line or LOG_LINE.match(line), f"a log line that does not start a line: {line!r}"
    bars = [line for line in lines if BAR.match(line)]
    assert bars and bars[-1].startswith("Iter: 100%") and "30/30" in bars[-1], bars
    assert not any(line.startswith("Val") for line in bars), "the validation bar is cleared when validation ends"
    assert not any("Iter(train)" in line for line in lines), "the bar replaces iteration lines on the terminal"
    coloured = term.screen(colours=True)
    assert re.search(r"- \x1b\[32mINFO\x1b\[[0-9;]*m - Saving checkpoint", coloured)
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "\x1b[" not in log and log.count("Iter(train)") == 6  # the file keeps every line, in plain text


def test_no_color_turns_colours_off_on_a_tty(terminal, tmp_path):
    term = terminal(f"{sys.executable} tests/terminal_run.py {tmp_path} 10", env="NO_COLOR=1 TERM=xterm")
    term.wait_for("RUN FINISHED")
    screen = term.screen(colours=True)
    assert "Saving checkpoint at 10 iterations" in screen and "\x1b[32mINFO" not in screen and " - INFO - " in screen


def test_ctrl_c_in_the_terminal_saves_and_names_the_resume_flag(terminal, tmp_path):
    term = terminal(f"{sys.executable} tests/terminal_run.py {tmp_path} 2000", env="TERM=xterm")
    term.wait_for("Iter(val) [3/3]")  # training is under way (iteration 10 validated)
    subprocess.run(["tmux", "send-keys", "-t", term.name, "C-c"], check=True)
    screen = term.wait_for("EXIT=")
    assert "EXIT=130" in screen  # 128 + SIGINT
    message = " ".join(screen.split())  # tmux may wrap the long line
    assert re.search(
        r"Received SIGINT: saved checkpoint \S+iter_\d+ at iteration \d+\. Resume with: funceng train", message
    )
    assert "--resume" in message and f"--work-dir {tmp_path / 'work'}" in message


def test_validation_and_test_get_their_own_bars_and_test_metrics_are_logged(tmp_path, capsys):
    kwargs = runner_kwargs(
        tmp_path,
        default_hooks=dict(logger=dict(interval=1, progress=True), checkpoint=None),
        test_dataloader=runner_kwargs(tmp_path)["val_dataloader"],
        test_evaluator=runner_kwargs(tmp_path)["val_evaluator"],
    )
    with Runner(**kwargs) as runner:
        runner.train()
        runner.test()
    out = capsys.readouterr().out
    assert re.search(r"Val:\s+0%.*0/3", out) and re.search(r"Test:\s+0%.*0/3", out)  # drawn, then cleared
    assert re.search(r"Epoch 1/2: 100%.*10/10.*run eta=0:00:\d\d", out)  # the whole run's eta beside the epoch's
    assert re.search(r"Epoch\(test\) \[3/3\]    accuracy: \d+\.\d{4}", out)
    assert "Epoch(val) [1][1/3]" not in out  # iteration lines are the bar's ...
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "Epoch(val) [1][1/3]" in log and "Epoch(test) [1/3]" in log  # ... and the log file's


@pytest.mark.parametrize(
    ("env", "tty", "expected"),
    [
        ({}, True, True),
        ({}, False, False),
        ({"NO_COLOR": "1"}, True, False),
        ({"NO_COLOR": ""}, True, True),
        ({"TERM": "dumb"}, True, False),
        ({"FORCE_COLOR": "1"}, False, True),
    ],
)
def test_colours_follow_the_terminal_and_no_color(monkeypatch, env, tty, expected):
    for key in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stream = io.StringIO()
    stream.isatty = lambda: tty
    assert colours_wanted(stream) is expected
    handler = TerminalHandler(stream, "%(levelname)s - %(message)s", "%H")
    assert isinstance(handler.formatter, ColourFormatter) is expected
    handler.emit(logging.LogRecord("funceng", logging.WARNING, __file__, 1, "careful", None, None))
    assert stream.getvalue() == ("\x1b[33mWARNING\x1b[0m - careful\n" if expected else "WARNING - careful\n")


def test_test_lines_align_the_index_as_mmengine_does(tmp_path, capsys):
    from torch.utils.data import DataLoader

    from tests.runner_fixtures import dataset

    kwargs = runner_kwargs(
        tmp_path,
        default_hooks=dict(logger=dict(interval=5, progress=False), checkpoint=None),
        test_dataloader=DataLoader(dataset(48, seed=2), batch_size=4),  # 12 batches: a two-digit total
        test_evaluator=runner_kwargs(tmp_path)["val_evaluator"],
    )
    with Runner(**kwargs) as runner:
        runner.test()
    out = capsys.readouterr().out
    assert "Epoch(test) [ 5/12]  " in out and "Epoch(test) [10/12]  " in out
    assert re.search(r"Epoch\(test\) \[12/12\]    accuracy: \d+\.\d{4}  data_time: ", out)

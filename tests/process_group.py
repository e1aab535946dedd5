"""Run a test subprocess in its own process group, so it can be SIGKILLed as a whole (torchrun and its
workers, dataloader workers) and a hang fails the test after a timeout instead of blocking CI.

Used by test_crash_resume.py (kill a run mid-way) and test_distributed.py (torchrun with a timeout).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start(cmd: list, env: dict, log_path: Path, cwd=None) -> subprocess.Popen:
    """Start `cmd` as the leader of a new process group; stdout and stderr go to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole group (no cleanup handlers run, as with the OOM killer or a lost node)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(path: Path, proc: subprocess.Popen, log_path: Path, timeout: float, poll: float = 0.01) -> None:
    """Poll until `path` exists; fails if the process ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {path} appeared:\n{log_path.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"{path} did not appear within {timeout} s:\n{log_path.read_text()[-6000:]}")
        time.sleep(poll)


def finish(proc: subprocess.Popen, log_path: Path, timeout: float) -> str:
    """Wait for a started run; its output. A non-zero exit fails; so does running past `timeout` (a
    hang), after the whole process group is killed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"still running after {timeout} s (hang?), killed:\n{log_path.read_text()[-6000:]}")
    output = log_path.read_text()
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, proc.args))} exited {proc.returncode}:\n{output[-8000:]}")
    return output


def run(cmd: list, env: dict, log_path: Path, timeout: float, cwd=None) -> str:
    """`start` and `finish`."""
    return finish(start(cmd, env, log_path, cwd=cwd), log_path, timeout)

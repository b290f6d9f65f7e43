"""What the end-to-end tests of every algorithm script share: start a script in a folder, wait for it, find its run
folder, read its TensorBoard scalars, write a small bring-your-own dataset, and run it in-process on bad input."""
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def start(script: str, args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    """`python <script> <args>` in `cwd`, one torch thread, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def kill_at_first_checkpoint(process: subprocess.Popen, runs: Path, pattern: str, timeout: float = 600) -> Path:
    """Waits until a checkpoint matching runs/<pattern> is on disk, kills the process there, returns the file."""
    for _ in range(int(timeout / 0.2)):
        found = list(runs.glob(pattern))
        if found:
            break
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    process.kill()
    process.communicate()
    assert found, f"no {pattern} under {runs} after {timeout} s"
    return found[0]


def run_dir(cwd: Path, exp_name: str, seed: int = 3) -> Path:
    (path,) = (cwd / "runs").glob(f"Kitchen-Complete-v0__{exp_name}__{seed}__*")
    return path


def scalars(path: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(path))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def write_pendulum_demonstrations(path):
    """Bring-your-own task: two 200-step episodes of random actions on Pendulum-v1, in D4RL's layout."""
    import gymnasium as gym
    import h5py
    import numpy as np

    env = gym.make("Pendulum-v1")
    rows = {"observations": [], "actions": [], "rewards": [], "terminals": [], "timeouts": []}
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        for _ in range(200):
            action = env.action_space.sample()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(rows, (obs, action, reward, terminated, truncated)):
                rows[key].append(value)
            obs = next_obs
    with h5py.File(path, "w") as f:
        for key, values in rows.items():
            f[key] = np.asarray(values)


def bad_input_error(script: str, flags: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """Runs the script in-process (runpy: no interpreter start per case) in `cwd` and returns what it printed to
    stderr, after checking the contract for bad input: exit code 2, one `error:` line, no traceback, no run folder."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # keep pytest's Ctrl-C (RunGuard)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # and its own exception hooks, restored at teardown
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert not (cwd / "runs").exists()  # a failed start leaves no run folder
    return error

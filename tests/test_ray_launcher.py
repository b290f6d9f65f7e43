"""utils.benchmark's Ray launcher on a real local Ray instance that the sweep starts (no mock): one sweep of tiny
idql_baseline.py runs, run once by the local launcher and once by Ray, in two copies of the repository (Ray ships the
code to its workers, and the results come back through its store, as on a cluster without a shared file system)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import ROOT, scalars

pytest.importorskip("ray")

FLAGS = ("--pretrain-steps 50 --pretrained-dir pretrained --num-envs 1 --num-steps 10 --eval-episodes 1 "
         "--critic-warmup-iterations 1 --replay-ratio 0.2 --num-candidates 2 --actor-hidden 64 64 64 "
         "--critic-hidden 32 32 --critic-batch-size 32 --actor-batch-size 32 --eval-protocols single")
SWEEP = [  # one env x 10 decisions x 4 actions = 40 env steps per iteration
    f"idql_baseline.py --env-id Kitchen-Complete-v0 --seed 3 --exp-name killed {FLAGS} --total-timesteps 1200 "
    "--eval-frequency 10 --checkpoint-frequency 1",
    f"idql_baseline.py --env-id Kitchen-Complete-v0 --seed 3 --exp-name short {FLAGS} --total-timesteps 120 "
    "--eval-frequency 1",
]
BAD = "idql_baseline.py --env-id Kitchen-Complete-v0 --seed 3 --exp-name bad --no-such-flag 1"


def copy_of_repository(destination: Path) -> Path:
    shutil.copytree(ROOT, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "runs", ".git", "__pycache__", ".pytest_cache", "wandb", "videos", "*.egg-info"))
    (destination / "sweep.txt").write_text("\n".join([*SWEEP, BAD]) + "\n")
    return destination


def benchmark(cwd: Path, *arguments: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(cwd), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "utils.benchmark", *arguments, "--poll", "0.2"], cwd=cwd, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def run_folder(cwd: Path, exp_name: str) -> Path:
    (folder,) = (cwd / "runs").glob(f"Kitchen-Complete-v0__{exp_name}__3__*")
    return folder


def training_process_of(exp_name: str) -> int:
    """The pid of the running script of that run (its command line names the exp name)."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and b"idql_baseline.py" in b" ".join(command) and exp_name.encode() in command:
            return int(entry.name)
    raise AssertionError(f"no running script of {exp_name}")


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The local sweep, then the Ray sweep, during which the Ray worker that runs `killed` is SIGKILLed once its first
    checkpoint has reached the driver's runs/."""
    local = copy_of_repository(tmp_path_factory.mktemp("local"))
    local_output = benchmark(local, "queue", "sweep.txt", "--parallel", "2").communicate(timeout=900)[0]

    cluster = copy_of_repository(tmp_path_factory.mktemp("ray"))
    driver = benchmark(cluster, "queue", "sweep.txt", "--launcher", "ray", "--cpus-per-run", "1", "--retries", "2")
    for _ in range(3000):
        if list((cluster / "runs").glob("Kitchen-Complete-v0__killed__3__*/checkpoint.pt")):
            break
        assert driver.poll() is None, driver.communicate()[0]
        time.sleep(0.2)
    script = training_process_of("killed")
    worker = parent_of(script)
    os.kill(worker, signal.SIGKILL)
    for _ in range(100):  # the script dies with its worker (PR_SET_PDEATHSIG): a retry never runs beside it
        if not Path(f"/proc/{script}").exists() or "Z" in Path(f"/proc/{script}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the script outlived its killed worker")
    ray_output = driver.communicate(timeout=900)[0]
    return {"local": local, "local_output": local_output, "ray": cluster, "ray_output": ray_output,
            "ray_code": driver.returncode}


def numbers(summary_path: Path) -> dict:
    """A summary.json without its timings."""
    summary = json.loads(summary_path.read_text())
    return {key: value for key, value in summary.items() if key not in ("wall_time_s", "SPS", "time_per_iteration_s")}


def test_ray_gives_the_summaries_of_the_local_launcher_even_for_a_run_whose_worker_was_killed(sweeps):
    for exp_name in ("killed", "short"):
        local = numbers(run_folder(sweeps["local"], exp_name) / "summary.json")
        assert numbers(run_folder(sweeps["ray"], exp_name) / "summary.json") == local, exp_name
    log = (sweeps["ray"] / "runs" / "benchmark_logs" / "Kitchen-Complete-v0__killed__3.log").read_text()
    assert "--resume runs/Kitchen-Complete-v0__killed__3__" in log  # the retry continued from the checkpoint


def test_the_resumed_runs_logs_have_no_gap_or_duplicate_point(sweeps):
    local, resumed = scalars(run_folder(sweeps["local"], "killed")), scalars(run_folder(sweeps["ray"], "killed"))
    assert set(resumed) == set(local)
    for tag in ("charts/SPS", "eval/normalized_score", "losses/critic_q"):
        if tag in local:
            assert len(resumed[tag]) == len(local[tag]), tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_folder(sweeps["ray"], "killed")))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        steps = [event.step for event in events.Scalars(tag)]
        assert steps == sorted(set(steps)), tag  # each step once, in order


def test_a_run_with_a_bad_flag_fails_once_with_its_error_and_the_others_finish(sweeps):
    assert sweeps["ray_code"] != 0
    output = sweeps["ray_output"]
    failures = [line for line in output.splitlines() if "FAILED" in line]
    assert len(failures) == 1 and "Kitchen-Complete-v0__bad__3" in failures[0], output
    assert "--no-such-flag" in failures[0], output  # the run's own error line, not a Ray traceback
    assert "2 done, 0 running, 1 failed, 0 queued, 0 waiting" in output
    assert not list((sweeps["ray"] / "runs").glob("Kitchen-Complete-v0__bad__3__*"))


def test_a_second_start_of_a_finished_sweep_runs_nothing(sweeps):
    cluster = sweeps["ray"]
    (cluster / "sweep.txt").write_text("\n".join(SWEEP) + "\n")
    before = sorted(path.name for path in (cluster / "runs").iterdir())
    output, _ = benchmark(cluster, "queue", "sweep.txt", "--launcher", "ray").communicate(timeout=300)
    assert output.count("done before:") == 2, output
    assert "running" not in output
    assert sorted(path.name for path in (cluster / "runs").iterdir()) == before


def test_resources_the_cluster_lacks_are_one_line_and_exit_2(tmp_path):
    """A run that asks for a GPU on a cluster without one would wait forever: the sweep refuses it at once."""
    cluster = copy_of_repository(tmp_path)
    (cluster / "sweep.txt").write_text(SWEEP[1] + "\n")
    output, _ = benchmark(cluster, "queue", "sweep.txt", "--launcher", "ray", "--gpus-per-run", "0.25").communicate(
        timeout=300)
    assert output.strip().splitlines()[-1] == ("error: each run requests 1 CPUs and 0.25 GPUs, and the cluster has "
                                               f"{os.cpu_count()} and 0: no run could start (--cpus-per-run, "
                                               "--gpus-per-run)"), output
    assert not list(cluster.glob("runs/Kitchen-Complete-v0__*"))


STOPPABLE = """import signal, sys, time
from pathlib import Path
signals = []
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
Path({ready!r}).write_text("")
while not signals:
    time.sleep(0.05)
Path({record!r}).write_text(str(len(signals)))
raise SystemExit(130)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_asks_each_running_script_once_to_stop(tmp_path, stop):
    """Ray's workers block SIGINT, and a script inherits the mask: unless the launcher unblocks it, the script never
    hears the stop, and the sweep hangs."""
    cluster = copy_of_repository(tmp_path / "repo")
    (cluster / "stoppable.py").write_text(STOPPABLE.format(ready=str(tmp_path / "ready"),
                                                           record=str(tmp_path / "signals")))
    (cluster / "sweep.txt").write_text("stoppable.py --env-id Env-v0 --exp-name a --seed 1\n")
    driver = benchmark(cluster, "queue", "sweep.txt", "--launcher", "ray",
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):  # until the script runs on its worker
        if (tmp_path / "ready").exists():
            break
        assert driver.poll() is None, driver.communicate()[0]
        time.sleep(0.2)
    os.kill(driver.pid, stop)  # the terminal's Ctrl-C, or a scheduler's SIGTERM
    output = driver.communicate(timeout=120)[0]
    assert "stopping 1 running run(s) at their next safe point" in output, output
    assert (tmp_path / "signals").read_text() == "1", output

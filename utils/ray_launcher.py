"""`python -m utils.benchmark run|queue ... --launcher ray`: a sweep's runs as tasks on a Ray cluster.

    ray start --head                                   # one machine; on others: ray start --address <head>:6379
    python -m utils.benchmark run --launcher ray --address auto --cpus-per-run 2 --gpus-per-run 0.25 --preset NAME

Each run is one Ray task that requests --cpus-per-run CPUs and --gpus-per-run GPUs (a fraction lets several of these
mostly CPU-bound runs share a GPU) and starts the run's script as a process on the node Ray picks. The code travels
with the tasks (Ray's working_dir: this repository without runs/, .git, videos/, wandb/), so no file system needs to be
shared: each task sends its run folder and log to a RunStore actor on the driver's machine whenever the run writes a
checkpoint or a summary, and the store writes them under the driver's runs/, where `report` and `plot` read them.

- Pre-trained files: a run that shares its env id and seed with an earlier run of the sweep waits for that run's
  pre-trained policy (utils.benchmark.leaders); the task that makes or loads it sends it to the store, and the waiting
  runs carry it to their node.
- Retries: a run whose worker dies (node lost, worker killed: its script dies with it) or whose script is killed by a
  signal is retried up to --retries times, from its last checkpoint: the newer of the node's own copy and the store's.
  A run that exits with an error of its own (bad flags, a NaN) is reported once and not retried.
- Ctrl-C (or SIGTERM to the sweep): every running script is asked once to stop at its next safe point; its checkpoint
  reaches the store, and the same sweep started again continues it.
"""
import ctypes
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from utils.benchmark import (PRETRAINED_MARKER, SweepRun, flag_value, job_environment, leaders, pretrained_seed,
                             resumable_folder, unfinished)

EXCLUDES = ["runs/", ".git/", "videos/", "wandb/", "__pycache__/", ".pytest_cache/"]  # not shipped with the code


class RunKilled(Exception):
    """The run's script was killed by a signal (not an error of its own): Ray retries the task."""


def pack(paths: dict[str, Path]) -> bytes:
    """An uncompressed tar of files and folders, each under its archive name (checkpoints hardly compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, path in paths.items():
            if path.exists():
                archive.add(path, arcname=name)
    return buffer.getvalue()


def unpack(blob: bytes, root: Path) -> None:
    """Writes a pack() under root. A folder replaces the old one as a whole (unpacked beside it, then renamed over
    it), and a file the old file, so that a reader never sees half of an update."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as staging, tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        archive.extractall(staging, filter="data")
        for entry in Path(staging).iterdir():
            target = root / entry.name
            if entry.is_dir() and target.exists():
                target.rename(Path(staging) / ".old")  # removed with the staging folder
            os.replace(entry, target)


@ray.remote(num_cpus=0)
class RunStore:
    """On the driver's machine: receives the sweep's run folders, logs and pre-trained files from the tasks and writes
    them under the driver's folders; tells which runs have their pre-trained policy ready."""

    def __init__(self, cwd: str, runs_root: str, logs: str):
        self.cwd, self.runs_root, self.logs = Path(cwd), Path(runs_root), Path(logs)
        self.ready, self.started = set(), set()

    def put_run(self, name: str, folder_name: str | None, blob: bytes | None, log: bytes) -> None:
        if folder_name is not None:
            unpack(blob, self.runs_root)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"{name}.log").write_bytes(log)

    def put_pretrained(self, name: str, relative: str, blob: bytes) -> None:
        target = self.cwd / relative
        if not target.exists():
            unpack(blob, target.parent)
        self.ready.add(name)

    def mark_ready(self, name: str) -> None:
        self.ready.add(name)

    def ready_runs(self) -> set:
        return set(self.ready)

    def mark_started(self, name: str) -> None:
        self.started.add(name)

    def started_runs(self) -> set:
        return set(self.started)

    def latest_checkpoint(self, name: str):
        """(folder name, checkpoint mtime, pack of the folder) of the run's newest folder with a checkpoint, or None."""
        folder = resumable_folder(name, self.runs_root)
        if folder is None:
            return None
        return folder.name, (folder / "checkpoint.pt").stat().st_mtime, pack({folder.name: folder})

    def pretrained_files(self, relative_dir: str, env_id: str, seed: str) -> dict:
        """{relative path: pack} of the driver's pre-trained policies of this env id and seed."""
        folder = self.cwd / relative_dir
        return {str(Path(relative_dir) / path.name): pack({path.name: path})
                for path in sorted(folder.glob(f"{env_id}__*__seed{seed}__*.pt"))}


def die_with_parent() -> None:
    """In the started script: a new session (Ctrl-C reaches it only through the task), the signals that Ray's worker
    blocks unblocked (else the script never sees the SIGINT that asks it to stop), and SIGKILL when the worker that
    started it dies, so that a retried run never runs twice at once (Linux; elsewhere the session only)."""
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def execute(run: SweepRun, threads: int, store, carried: dict, poll_s: float) -> dict:
    """The Ray task: runs one sweep run in this node's copy of the code and keeps the store up to date."""
    store.mark_started.remote(run.name)  # submitted runs wait in Ray's queue until a node has the resources
    runs = Path("runs")
    log_path = runs / "benchmark_logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for relative, blob in carried.items():  # the seed's pre-trained policy, made by the run this one waited for
        if not Path(relative).exists():
            unpack(blob, Path(relative).parent)
    # Continue from the newest checkpoint: this node's copy (a retry on the same node) or the store's (another node).
    local = resumable_folder(run.name, runs)
    stored = ray.get(store.latest_checkpoint.remote(run.name))
    folder = None
    if stored is not None:
        name, mtime, blob = stored
        if local is not None and local.name == name and (local / "checkpoint.pt").stat().st_mtime >= mtime:
            folder = local
        else:
            unpack(blob, runs)
            folder = runs / name
    command = [sys.executable, run.tokens[0], *(["--resume", str(folder)] if folder else run.tokens[1:])]
    started = time.time()
    with log_path.open("a") as handle:
        handle.write(f"[{time.strftime('%H:%M:%S')}] {os.uname().nodename}: {' '.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=job_environment(threads),
                                   preexec_fn=die_with_parent)
    sent, marked = {}, False

    def run_folder() -> Path | None:
        folders = [f for f in sorted(runs.glob(f"{run.name}__*")) if f.stat().st_mtime >= started - 1 or f == folder]
        return folders[-1] if folders else None

    def send(final: bool = False) -> None:
        nonlocal marked
        if not marked and PRETRAINED_MARKER in (text := log_path.read_text(errors="ignore")):  # read until found
            line = next(line for line in text.splitlines()[::-1] if PRETRAINED_MARKER in line)
            path = Path(line.split(" from " if " from " in line else " to ")[-1].strip())
            if path.is_file() and not path.is_absolute():
                store.put_pretrained.remote(run.name, str(path), pack({path.name: path}))
            else:
                store.mark_ready.remote(run.name)
            marked = True
        current = run_folder()
        if current is None:  # bad flags, say: its log alone
            if final:
                ray.get(store.put_run.remote(run.name, None, None, log_path.read_bytes()))
            return
        stamps = {name: (current / name).stat().st_mtime for name in ("checkpoint.pt", "summary.json")
                  if (current / name).exists()}
        if final or (stamps and stamps != sent.get(current.name)):  # a checkpoint or the summary: new results
            sent[current.name] = stamps
            ray.get(store.put_run.remote(run.name, current.name, pack({current.name: current}), log_path.read_bytes()))

    try:
        while process.poll() is None:
            time.sleep(poll_s)
            send()
    except KeyboardInterrupt:  # the sweep was stopped (ray.cancel): stop at the next safe point, with a checkpoint
        process.send_signal(signal.SIGINT)
        process.wait()
        send(final=True)
        raise
    send(final=True)
    if process.returncode < 0:
        raise RunKilled(f"{run.name}: its script was killed by signal {-process.returncode}")
    if process.returncode and not marked:
        store.mark_ready.remote(run.name)  # the waiting runs go on: they pre-train themselves or fail on their own
    lines = [line.strip(" │╭╮╰╯─") for line in log_path.read_text(errors="ignore").splitlines()]
    said = ([line for line in lines if re.search(r"(?i)error|unrecognized|invalid|missing", line)]
            or [line for line in lines if line])
    return {"returncode": process.returncode, "last_line": said[-1] if said else ""}


def launch_ray(runs: Sequence[SweepRun], address: str | None = None, cpus_per_run: float = 1,
               gpus_per_run: float = 0, retries: int = 2, parallel: int | None = None, threads: int = 1,
               runs_root: Path = Path("runs"), logs: Path = Path("runs/benchmark_logs"), poll_s: float = 2.0) -> None:
    """Runs the sweep's unfinished runs as Ray tasks (on the cluster at `address`; a local Ray instance when None), at
    most `parallel` at once if given, else as many as the cluster's resources allow. Prints the progress whenever it
    changes; raises SystemExit naming the failed runs, if any."""
    if cpus_per_run <= 0 or gpus_per_run < 0 or retries < 0:
        raise ValueError("--cpus-per-run must be positive, --gpus-per-run and --retries at least 0")
    runs = unfinished(runs, runs_root)
    if not runs:
        return
    waits_for = leaders(runs)
    cwd = Path.cwd()
    ray.init(address=address, runtime_env={"working_dir": str(cwd), "excludes": EXCLUDES},
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        resources = ray.cluster_resources()
        if cpus_per_run > resources.get("CPU", 0) or gpus_per_run > resources.get("GPU", 0):
            raise ValueError(f"each run requests {cpus_per_run:g} CPUs and {gpus_per_run:g} GPUs, and the cluster has "
                             f"{resources.get('CPU', 0):g} and {resources.get('GPU', 0):g}: no run could start "
                             "(--cpus-per-run, --gpus-per-run)")
        store = RunStore.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote(
            str(cwd), str(Path(runs_root).resolve()), str(Path(logs).resolve()))
        task = ray.remote(execute).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=retries,
                                           retry_exceptions=[RunKilled])
        states = {run.name: "waiting" for run in runs}
        running, failures, shown = {}, [], None
        try:
            while any(state in ("waiting", "running") for state in states.values()):
                ready_names = ray.get(store.ready_runs.remote())
                for run, leader in zip(runs, waits_for):
                    leader_name = None if leader is None else runs[leader].name
                    gate_open = (leader_name is None or leader_name in ready_names
                                 or states[leader_name] in ("done", "failed"))
                    if states[run.name] == "waiting" and gate_open and len(running) < (parallel or len(runs)):
                        given = flag_value(run.tokens, "--pretrained-checkpoint")
                        pretrained_dir = (str(Path(given).parent) if given
                                          else flag_value(run.tokens, "--pretrained-dir", "runs/pretrained"))
                        carried = ray.get(store.pretrained_files.remote(pretrained_dir, run.env_id,
                                                                        pretrained_seed(run)))
                        running[task.remote(run, threads, store, carried, poll_s)] = run
                        states[run.name] = "running"
                done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s) if running else ([], [])
                for ref in done:
                    run = running.pop(ref)
                    try:
                        result = ray.get(ref)
                        failed = result["returncode"] != 0
                        why = f"exit {result['returncode']}: {result['last_line']}"
                    except ray.exceptions.RayError as error:  # retries spent (RunKilled arrives as a RayTaskError)
                        failed = True
                        why = f"{type(error).__name__} after {retries} retries: {str(error).splitlines()[0]}"
                    states[run.name] = "failed" if failed else "done"
                    if failed:
                        failures.append(f"{' '.join(run.tokens)} ({why})")
                        print(f"[{time.strftime('%H:%M:%S')}] FAILED {run.name}: {why}", flush=True)
                started = ray.get(store.started_runs.remote())
                shown_states = {name: ("queued" if state == "running" and name not in started else state)
                                for name, state in states.items()}
                progress = {state: [name for name, s in shown_states.items() if s == state]
                            for state in ("done", "running", "failed", "queued", "waiting")}
                line = ", ".join(f"{len(names)} {state}" for state, names in progress.items())
                if line != shown:
                    shown = line
                    print(f"[{time.strftime('%H:%M:%S')}] {line}; running: {', '.join(progress['running']) or '-'}",
                          flush=True)
        except BaseException:  # Ctrl-C, or SIGTERM (ray.init makes it a SystemExit): each running script stops at a
            # safe point, and its checkpoint reaches the store
            print(f"stopping {len(running)} running run(s) at their next safe point, with a checkpoint",
                  file=sys.stderr, flush=True)
            for ref in running:
                ray.cancel(ref)
            ray.wait(list(running), num_returns=len(running), timeout=600)
            raise
        if failures:
            raise SystemExit(f"failed: {failures} (see {logs})")
    finally:
        ray.shutdown()

"""The plumbing of a run's process that no reader of a method needs: how many CPU threads torch uses, a warning when
the run slows down because another process takes its cores, a clean stop on Ctrl-C or a full disk, files written so
that a failed write never damages the last good one, a budget of whole iterations, and the optional mirror of a run
to Weights & Biases (--track). Every script imports it; nothing here knows an algorithm.
"""
import atexit
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm


# ------------------------------------------------------------------------------------------------------- threads
def choose_threads(requested: int, usable_cores: int, busy_cores: float, omp_num_threads: Optional[str]) -> int:
    """The torch thread count of a run. `requested` > 0 is taken as given. With 0 (the default): OMP_NUM_THREADS when
    it is set (utils.benchmark sets it for its jobs), else the cores that other processes leave idle now (busy_cores,
    rounded), at least one.

    Why not all cores: torch's CPU threads spin while they wait on each other. When another process holds one of
    the cores they spin on, each step waits for the scheduler; measured on the 2-core machine (docs/speed.md), a
    pre-training step went from 173 it/s (2 threads, idle) to 55 it/s (2 threads, one busy process) where one thread
    kept 94 it/s."""
    if requested > 0:
        return requested
    return omp_threads(omp_num_threads) or max(1, usable_cores - round(busy_cores))


def omp_threads(omp_num_threads: Optional[str]) -> int:
    """OMP_NUM_THREADS as a thread count; 0 when it is unset or not a positive whole number."""
    value = (omp_num_threads or "").strip()
    return int(value) if value.isdigit() else 0


def cpu_times(cores) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each of `cores` since boot, from /proc/stat (Linux)."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [int(field) for field in fields]
            times[int(name[3:])] = (values[3] + values[4], sum(values[:8]))  # idle + iowait; user..steal
    return times


def busy_cores(cores, interval: float = 0.5) -> float:
    """How many of `cores` other processes keep busy now: the non-idle share of each core's time over `interval`
    seconds, summed (Linux); elsewhere the 1-minute load average, which lags: it still counts a process that ended
    a minute ago."""
    try:
        before = cpu_times(cores)
        time.sleep(interval)
        after = cpu_times(cores)
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return sum(1 - (after[core][0] - before[core][0]) / max(1, after[core][1] - before[core][1]) for core in after)


def set_threads(requested: int) -> int:
    """Sets, prints and returns the run's torch thread count (choose_threads, from this machine)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    omp_num_threads = os.environ.get("OMP_NUM_THREADS")
    if requested > 0 or omp_threads(omp_num_threads):
        threads, why = choose_threads(requested, len(cores), 0.0, omp_num_threads), "--threads or OMP_NUM_THREADS"
    else:
        busy = busy_cores(cores)
        threads = choose_threads(0, len(cores), busy, None)
        why = f"{len(cores)} cores, {busy:.1f} busy with other processes; --threads sets it"
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} ({why})")
    return threads


class RateWatch:
    """Warns once when a loop's rate over the last `window_s` seconds falls below a third of its best window: the sign
    that another process took a core this run's threads spin on (choose_threads)."""

    def __init__(self, what: str, unit: str, threads: int, window_s: float = 30.0):
        self.what, self.unit, self.threads, self.window_s = what, unit, threads, window_s
        self.best, self.warned, self.start = 0.0, False, None

    def tick(self, count: float, seconds: float):
        """`count` done after `seconds` of the loop's own time (both cumulative); returns the warning, once."""
        if self.start is None:
            self.start = (count, seconds)
            return None
        if seconds - self.start[1] < self.window_s:
            return None
        rate = (count - self.start[0]) / (seconds - self.start[1])
        self.start = (count, seconds)
        self.best = max(self.best, rate)
        if self.warned or rate >= self.best / 3:
            return None
        self.warned = True
        remedy = (f"with {self.threads} threads torch waits on each other's cores: stop with Ctrl-C and continue with "
                  "--threads 1 (or free the cores)" if self.threads > 1 else "free the cores to go back to full speed")
        message = (f"warning: {self.what} slowed from {self.best:.1f} to {rate:.1f} {self.unit}/s: another process "
                   f"is using this machine's cores; {remedy}")
        tqdm.write(message, file=sys.stderr)
        return message


# --------------------------------------------------------------------------------------------- stopping cleanly
def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class RunGuard:
    """A run's stop and its folder. Ctrl-C (SIGINT) or SIGTERM: the first asks the run to stop at its next safe point
    (the loops check `stop_requested`, save what they have and call `stop`); the second stops at once, keeping the last
    checkpoint. Either way: no traceback, exit code 130. A full disk wherever the run writes (TensorBoard's event file
    from its writer thread, a video) ends it with one line and exit code 2, keeping the last checkpoint. At exit,
    however the process ends, a run folder that holds neither a checkpoint nor a summary is removed: nothing could
    resume or read it."""

    def __init__(self):
        self.stop_requested = False
        self.run_dir: Optional[Path] = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        self._excepthook, self._thread_excepthook = sys.excepthook, threading.excepthook
        sys.excepthook, threading.excepthook = self._report, self._report_thread
        atexit.register(self._remove_stub)

    def _report(self, kind, error, traceback):
        if not is_disk_full(error):
            return self._excepthook(kind, error, traceback)
        where = (f" writing {error.filename}" if error.filename
                 else f" writing in {self.run_dir}" if self.run_dir else "")
        message = f"error: the disk is full ({error.strerror}{where}): free disk space"
        if self.resumable():
            message += f", then continue with: python {os.path.basename(sys.argv[0])} --resume {self.run_dir}"
        tqdm.write(message, file=sys.stderr)
        raise SystemExit(2)

    def _report_thread(self, hook_args):
        """TensorBoard writes from a thread of its own; its full disk reaches the main thread at the next write, which
        reports it (_report), so the thread stays quiet."""
        if not is_disk_full(hook_args.exc_value):
            self._thread_excepthook(hook_args)

    def _handle(self, signum, frame):
        if self.stop_requested:
            self.stop("stopped at once")
        self.stop_requested = True
        tqdm.write("\nstopping at the next safe point to save what was done (Ctrl-C again stops at once, keeping the "
                   "last checkpoint)", file=sys.stderr)

    def resumable(self) -> bool:
        return self.run_dir is not None and (self.run_dir / "checkpoint.pt").exists()

    def _remove_stub(self):
        if self.run_dir is not None and not self.resumable() and not (self.run_dir / "summary.json").exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def stop(self, message: str):
        """Ends the process with `message` and, when the run can continue, the command that continues it."""
        if self.resumable():
            message += f"; continue with: python {os.path.basename(sys.argv[0])} --resume {self.run_dir}"
        tqdm.write(message, file=sys.stderr)  # on a line of its own below a progress bar
        sys.exit(130)  # not `raise SystemExit`: with --track, wandb learns the exit code from sys.exit (start_tracking)


# ------------------------------------------------------------------------------------------------- writing files
def write_atomically(path: Path, write: Callable[[Path], None]):
    """Calls `write` on a temporary file, then renames it to `path`: an interrupted or failed write (a full disk)
    never damages the file written before, and leaves no temporary file behind. The temporary file is this process's
    own, so two runs that write one file (two runs of a seed pre-training its shared policy) cannot mix their bytes. A
    failed write ends the run with one line and exit code 2."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if not isinstance(error, Exception):  # Ctrl-C or exit: not a failed write
            raise
        # a full disk surfaces as OSError or as torch's zip writer's RuntimeError ("unexpected pos ...")
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        free_mib = shutil.disk_usage(path.parent).free / 2**20
        tqdm.write(f"error: could not write {path} ({reason[:120]}; {free_mib:.0f} MiB free there): free disk space "
                   "or make the folder writable; the files written before are intact", file=sys.stderr)
        sys.exit(2)  # as RunGuard.stop


# A checkpoint holds tensors, plain Python values and NumPy arrays and numbers (the RNG state, DPPO's reward scaler).
# torch.load unpickles only these (weights_only, with NumPy's array and scalar types allowed), so a crafted file is
# refused instead of running code.
CHECKPOINT_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
                      np.dtypes.UInt32DType, np.dtypes.Float64DType]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this project, loaded without running code; ValueError naming the file for anything else."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or objects that only code could rebuild
        message = str(error).strip()
        code = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", message)
        reason = (f"it refers to {code.group(1)}" if code  # torch's message is a page: keep what the user needs
                  else message.splitlines()[0].split(". ")[0] if message else type(error).__name__)
        raise ValueError(f"{path} is not a checkpoint this script can load safely ({reason[:160]}): it may be "
                         "truncated, or hold objects other than tensors and plain values, which are never loaded "
                         "because loading them could run code") from None


def save_checkpoint(path: Path, state: dict):
    """torch.save through write_atomically."""
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def save_summary(path: Path, summary: dict):
    """summary.json through write_atomically: a run with a summary.json counts as finished (utils.benchmark), so a
    half-written one must never exist."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(summary, indent=2)))


def check_writable(folder: Path):
    """Creates `folder` if needed; PermissionError saying what to do when this process cannot write there."""
    if folder.exists() and not folder.is_dir():
        raise PermissionError(f"cannot create {folder}/: a file of that name is in the way")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"cannot create {folder}/ ({error.strerror}): run from a folder you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {folder}/: run from a folder you can write to")


# -------------------------------------------------------------------------------------------------------- budget
def whole_iterations(total_timesteps: int, num_envs: int, num_steps: int, chunk_size: int) -> int:
    """The iterations --total-timesteps buys; ValueError naming the nearest budgets when it is not a whole number of
    them (an iteration is num_envs x num_steps decisions of chunk_size env steps)."""
    per_iteration = num_envs * num_steps * chunk_size
    if total_timesteps % per_iteration == 0:
        return total_timesteps // per_iteration
    lower = total_timesteps // per_iteration * per_iteration
    nearest = " or ".join(str(budget) for budget in (lower, lower + per_iteration) if budget > 0)
    raise ValueError(f"--total-timesteps {total_timesteps} is not a whole number of iterations of {per_iteration} env "
                     f"steps (--num-envs {num_envs} x --num-steps {num_steps} decisions x --chunk-size {chunk_size} "
                     f"actions): use {nearest}")


# ------------------------------------------------------------------------------------------- tracking (--track)
def start_tracking(args, run_dir: Path):
    """Starts the Weights & Biases run that mirrors this one (CleanRL's --track) and returns it: its name is the run
    folder's, its config the run's Args, and it copies every scalar the run's TensorBoard writer logs (not the event
    files), so it must start before the script creates its SummaryWriter. Its files go to
    <run_dir>/wandb/[offline-]run-<time>-<id>; with WANDB_MODE=offline nothing leaves the machine until `wandb sync`
    of that folder. The W&B run id is derived from the run folder's name, so `--resume <run_dir>` continues the same
    W&B run (offline: a second folder of the same id, to sync after the first). wandb is imported here only: a run
    without --track needs it not. ValueError when wandb is missing or cannot start the run (the scripts print it as one
    `error:` line and exit with code 2; the new run folder, still without a checkpoint, is removed at exit)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--track needs wandb: pip install -r requirements-sweeps.txt -c constraints.txt") from None
    guard_excepthook = sys.excepthook
    try:
        # The TensorBoard mirror, scalars only (save=False). wandb.init's sync_tensorboard=True would also copy each
        # event file into the W&B run's files, which lie in run_dir: W&B then finds the copy as one more event file of
        # run_dir, copies it again, one folder deeper, and mirrors every scalar once per copy.
        wandb.tensorboard.patch(save=False, root_logdir=str(run_dir))
        run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name,
                         id=hashlib.sha1(run_dir.name.encode()).hexdigest()[:16], resume="allow", config=vars(args),
                         tags=list(args.wandb_tags), dir=str(run_dir), save_code=False)
    except wandb.errors.Error as error:  # not logged in, no network, a project or entity it may not write to
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"--track: Weights & Biases could not start the run: {message[:300]} (to run without "
                         "W&B's servers: WANDB_MODE=offline, then `wandb sync` the run's wandb/offline-run-* "
                         "folders)") from None

    # wandb.init puts a hook of its own in front of RunGuard's that prints every error's traceback, a full disk's too:
    # RunGuard's reports the error alone, then the W&B run ends failed with the exit code. (A stop, or any other
    # sys.exit, reaches W&B through wandb's own sys.exit hook: the run ends with that exit code at exit.)
    def report(kind, error, traceback):
        try:
            guard_excepthook(kind, error, traceback)
        finally:
            run.finish(exit_code=2 if is_disk_full(error) else 1)

    sys.excepthook = report
    return run


def finish_tracking(run, run_name: str):
    """Logs the run's evaluation videos (videos/<run_name>/*.mp4, written with --capture-video) to its W&B run, then
    finishes it; nothing without --track (run is None)."""
    if run is None:
        return
    import wandb

    videos = sorted(Path("videos", run_name).glob("*.mp4"))
    if videos:
        run.log({"videos": [wandb.Video(str(path), caption=path.stem) for path in videos]})
    run.finish()

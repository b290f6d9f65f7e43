"""utils/runtime.py, the plumbing every script shares: the thread default, the slow-down warning, the budget of whole
iterations, the run folder's guard, and file writes that fail cleanly, a full disk anywhere included."""
import errno
import importlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from utils import runtime
from utils.runtime import RateWatch, RunGuard, check_writable, choose_threads, whole_iterations

SCRIPTS = ["otpr", "idql_baseline", "dql_baseline", "qsm_baseline", "dppo_baseline", "otpr_pixels"]


def test_thread_default_leaves_the_cores_other_processes_use():
    assert choose_threads(0, usable_cores=2, busy_cores=0.1, omp_num_threads=None) == 2  # idle: every core
    assert choose_threads(0, usable_cores=2, busy_cores=1.0, omp_num_threads=None) == 1  # one busy process
    assert choose_threads(0, usable_cores=2, busy_cores=3.7, omp_num_threads=None) == 1  # never fewer than one
    assert choose_threads(0, usable_cores=16, busy_cores=4.2, omp_num_threads=None) == 12
    assert choose_threads(0, usable_cores=2, busy_cores=0.0, omp_num_threads="1") == 1  # utils.benchmark's jobs
    assert choose_threads(0, usable_cores=2, busy_cores=0.0, omp_num_threads="many") == 2  # not a number: ignored
    assert choose_threads(3, usable_cores=2, busy_cores=2.0, omp_num_threads="1") == 3  # --threads wins


def test_busy_cores_is_the_non_idle_share_of_each_core_now(monkeypatch):
    """The load average still counts a process that ended a minute ago; the default reads the cores' time now."""
    readings = iter([{0: (100, 1000), 1: (500, 1000)},  # (idle + iowait, total) jiffies of each core
                     {0: (100, 1100), 1: (590, 1100)}])  # core 0 busy the whole interval, core 1 a tenth of it
    monkeypatch.setattr(runtime, "cpu_times", lambda cores: next(readings))
    monkeypatch.setattr(runtime.time, "sleep", lambda seconds: None)
    assert runtime.busy_cores({0, 1}) == pytest.approx(1.1)
    assert choose_threads(0, usable_cores=2, busy_cores=1.1, omp_num_threads=None) == 1


def test_the_thread_count_is_printed_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "busy_cores", lambda cores: 0.2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    cores = len(runtime.os.sched_getaffinity(0))
    assert runtime.set_threads(0) == cores
    printed = capsys.readouterr().out
    assert printed == f"torch threads: {cores} ({cores} cores, 0.2 busy with other processes; --threads sets it)\n"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.set_threads(0) == 1 and "(--threads or OMP_NUM_THREADS)" in capsys.readouterr().out
    assert runtime.set_threads(3) == 3


def test_busy_cores_reads_this_machine():
    cores = runtime.os.sched_getaffinity(0)
    assert set(runtime.cpu_times(cores)) == set(cores)
    assert 0 <= runtime.busy_cores(cores, interval=0.1) <= len(cores) + 1e-9


def test_rate_watch_warns_once_when_the_rate_falls_below_a_third_of_its_best(capsys):
    watch = RateWatch("pre-training", "steps", threads=2, window_s=10)
    assert watch.tick(0, 0.0) is None
    for second in range(10, 60, 10):  # a steady 100 steps/s, then 40 (above a third): no warning
        assert watch.tick(100 * second, second) is None
    assert watch.tick(5000 + 400, 60) is None
    warning = watch.tick(5400 + 300, 70)  # 30 steps/s
    assert "slowed from 100.0 to 30.0 steps/s" in warning and "--threads 1" in warning
    assert "slowed" in capsys.readouterr().err
    assert watch.tick(5700 + 10, 80) is None  # once only
    single = RateWatch("fine-tuning", "env steps", threads=1, window_s=1)
    for count, second in ((0, 0), (100, 1), (110, 2)):
        message = single.tick(count, second)
    assert "free the cores" in message and "--threads" not in message


def test_a_budget_of_partial_iterations_is_refused_with_the_nearest_whole_ones():
    assert whole_iterations(50400, num_envs=2, num_steps=70, chunk_size=4) == 90
    assert whole_iterations(0, num_envs=2, num_steps=70, chunk_size=4) == 0
    with pytest.raises(ValueError, match=r"--total-timesteps 1200 is not a whole number of iterations of 560 env "
                                         r"steps .*: use 1120 or 1680"):
        whole_iterations(1200, num_envs=2, num_steps=70, chunk_size=4)
    with pytest.raises(ValueError, match=r"use 560$"):
        whole_iterations(100, num_envs=2, num_steps=70, chunk_size=4)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_default_budget_is_whole_iterations_of_every_task(script, monkeypatch):
    module = importlib.import_module(script)
    env_ids = ["Kitchen-Complete-v0", *module.TASK_DEFAULTS]
    for env_id in env_ids:
        monkeypatch.setattr("sys.argv", [script, "--env-id", env_id])
        args = module.parse_args()
        assert whole_iterations(args.total_timesteps, args.num_envs, args.num_steps, args.chunk_size) > 0, env_id


def test_check_writable_names_the_folder_in_the_way(tmp_path):
    (tmp_path / "blocked").write_text("a file, not a folder")
    with pytest.raises(PermissionError, match="cannot create .*blocked/sub/"):
        check_writable(tmp_path / "blocked" / "sub")
    check_writable(tmp_path / "fresh" / "nested")
    assert (tmp_path / "fresh" / "nested").is_dir()


@pytest.fixture
def guard(monkeypatch):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored at teardown
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield RunGuard()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_the_guard_removes_only_a_run_folder_nothing_can_resume_or_read(guard, tmp_path):
    for name, kept in (("events_only", False), ("checkpointed", True), ("summarised", True)):
        guard.run_dir = tmp_path / name
        guard.run_dir.mkdir()
        (guard.run_dir / "events.out.tfevents.1").write_text("")
        if name == "checkpointed":
            (guard.run_dir / "checkpoint.pt").write_text("")
        if name == "summarised":
            (guard.run_dir / "summary.json").write_text("{}")
        guard._remove_stub()
        assert guard.run_dir.exists() == kept, name


def test_the_first_signal_asks_the_second_stops_with_the_resume_command(guard, tmp_path, capsys):
    guard.run_dir = tmp_path / "run"
    guard.run_dir.mkdir()
    (guard.run_dir / "checkpoint.pt").write_text("")
    signal.raise_signal(signal.SIGINT)
    assert guard.stop_requested
    with pytest.raises(SystemExit) as exit_info:
        signal.raise_signal(signal.SIGTERM)
    assert exit_info.value.code == 130
    error = capsys.readouterr().err
    assert "stopping at the next safe point" in error
    assert "stopped at once; continue with: python " in error and error.rstrip().endswith(f"--resume {guard.run_dir}")


# A full disk as Python's own writes report it, and as torch's zip writer does (seen on a full 3 MB tmpfs)
DISK_FULL = [(OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
             (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 451072 vs 450976"),
              "[enforce fail at inline_container.cc:672] . unexpected pos")]


WRITERS = {"checkpoint": (runtime.save_checkpoint, "checkpoint.pt", lambda path: torch.load(path, weights_only=True)),
           "summary": (runtime.save_summary, "summary.json", lambda path: json.loads(path.read_text()))}


@pytest.mark.parametrize("failure, reason", DISK_FULL, ids=["oserror", "zip_writer"])
@pytest.mark.parametrize("what", WRITERS)
def test_a_failed_write_is_one_line_and_leaves_the_file_written_before_intact(what, failure, reason, tmp_path,
                                                                              monkeypatch, capsys):
    save, name, read = WRITERS[what]
    path = tmp_path / name
    save(path, {"iteration": 1})

    def disk_full(temporary):
        temporary.write_bytes(b"half a file")
        raise failure

    original = runtime.write_atomically
    monkeypatch.setattr(runtime, "write_atomically", lambda path_, write: original(path_, disk_full))
    with pytest.raises(SystemExit) as exit_info:
        save(path, {"iteration": 2})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: could not write {path} ({reason}") and "MiB free there" in error
    assert len(error.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .tmp left
    monkeypatch.undo()
    assert read(path) == {"iteration": 1}


def test_two_processes_writing_one_file_do_not_mix_their_bytes(tmp_path, monkeypatch):
    """Two runs of one seed pre-train the same shared file at once: the second's whole write, made while the first's is
    under way, must not end in the first's temporary file."""
    path = tmp_path / "pretrained.pt"
    first = {"weights": torch.arange(100_000)}

    def write_while_another_process_writes(temporary):
        torch.save(first, temporary)  # written, not yet renamed, when the other process writes the file whole
        monkeypatch.setattr(runtime.os, "getpid", lambda: 1)
        runtime.save_checkpoint(path, {"weights": torch.zeros(3)})
        monkeypatch.undo()

    runtime.write_atomically(path, write_while_another_process_writes)  # the last rename wins, whole
    assert torch.equal(torch.load(path, weights_only=True)["weights"], first["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["pretrained.pt"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_writes_its_checkpoints_and_summary_through_the_atomic_writes(script):
    module = importlib.import_module(script)
    assert module.save_checkpoint is runtime.save_checkpoint and module.save_summary is runtime.save_summary
    source = open(f"{script}.py").read()
    assert "summary.json\").write_text" not in source and "torch.save(" not in source


def test_a_full_disk_anywhere_in_a_run_is_one_line_with_the_resume_command(tmp_path):
    """TensorBoard writes its event file from a thread of its own: a full disk there must not print the thread's
    traceback, and must end the run with one line, exit code 2 and the command that continues it."""
    run_dir = tmp_path / "runs" / "a_run"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"a checkpoint")
    program = textwrap.dedent(f"""
        import errno, sys
        from pathlib import Path
        from torch.utils.tensorboard import SummaryWriter
        from utils.runtime import RunGuard
        guard = RunGuard()
        guard.run_dir = Path({str(run_dir)!r})
        writer = SummaryWriter({str(run_dir)!r})
        def disk_full(data):
            raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")
        writer._get_file_writer().event_writer._general_file_writer.write = disk_full
        for step in range(100):
            writer.add_scalar("x", step, step)
            writer.flush()
        print("never reached")
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 2, done.stderr
    assert "never reached" not in done.stdout and "Traceback" not in done.stderr and "Exception in thread" not in done.stderr
    assert done.stderr.strip() == ("error: the disk is full (No space left on device writing events.out.tfevents): "
                                   f"free disk space, then continue with: python -c --resume {run_dir}")
    assert (run_dir / "checkpoint.pt").read_bytes() == b"a checkpoint"


def test_other_errors_keep_their_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-c", "from utils.runtime import RunGuard; RunGuard(); 1 / 0"],
                          capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 1 and "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr

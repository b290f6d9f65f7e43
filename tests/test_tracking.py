"""--track (utils/runtime.py start_tracking, finish_tracking): tiny runs of idql_baseline.py and otpr.py mirrored to an
offline Weights & Biases run, read back from its .wandb file: where it lands, its config and tags, every TensorBoard
scalar once, the same W&B run across a Ctrl-C and --resume; without --track wandb is never imported, and --track
without wandb is one `error:` line. Nothing leaves tmp_path: WANDB_MODE=offline, HOME and W&B's folders inside it."""
import ast
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import ROOT, finish, run_dir, scalars, start
from tests.test_scripts import OTPR_TINY, TINY

SCRIPTS = ["otpr.py", "idql_baseline.py", "dql_baseline.py", "qsm_baseline.py", "dppo_baseline.py", "otpr_pixels.py",
           "bridger_baseline.py"]
TAGS = ["sweep:test", "commit:abc"]


# ------------------------------------------------------------------------------------------------ reading W&B
def wandb_records(path: Path):
    """The records of an offline W&B run's .wandb file, as wandb.proto Records. The file is wandb's LevelDB-style log:
    a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each behind a 7-byte header (CRC32C,
    length, type: 1 a whole record, 2 its first chunk, 3 a middle one, 4 its last); a block's tail shorter than a
    header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    position, record = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zeros after the last record
            break
        record += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


def wandb_run(folder: Path) -> dict:
    """What an offline W&B run folder (wandb/offline-run-<time>-<id>) holds: the run's id, name, tags, config, history
    (key -> values, in order) and exit code (None when it has no exit record)."""
    (path,) = folder.glob("run-*.wandb")
    run = {"config": {}, "history": {}, "exit_code": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name, tags=list(record.run.tags))
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            run["config"].update({item.key: json.loads(item.value_json) for item in items})
        if kind == "history":
            for item in record.history.item:
                run["history"].setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        if kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def wandb_parts(path: Path) -> list[Path]:
    """The offline W&B run folders of a run folder, oldest first: one per process that ran it (a resume adds one)."""
    return sorted((path / "wandb").glob("offline-run-*"))


def assert_mirrors_tensorboard(path: Path, history: dict):
    """Every TensorBoard scalar of the run, each value once, in order: W&B's history is the event files' copy."""
    logged = scalars(path)
    assert "charts/success_rate" in logged and "losses/q" in logged
    for tag, values in logged.items():
        assert history.get(tag) == pytest.approx(values, rel=1e-6), tag


def lingering(variable: str) -> list[str]:
    """The processes whose environment holds `variable` (NAME=value): what a process started with it left running
    (W&B's wandb-core service) once it ended (Linux)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() + b"\0" in environ.read_bytes():
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:  # ended meanwhile, or not ours to read
            pass
    return found


# ------------------------------------------------------------------------------------------------ tracked runs
# An error in a tracked run, after W&B started: RunGuard's report (one line for a full disk), and the W&B run ends
# failed with the process's exit code.
GUARDED = """
import errno, sys
from pathlib import Path
from types import SimpleNamespace
from torch.utils.tensorboard import SummaryWriter
from utils.runtime import RunGuard, save_summary, start_tracking
guard = RunGuard()
guard.run_dir = run_dir = Path("runs", "guarded")
run_dir.mkdir(parents=True)
save_summary(run_dir / "summary.json", {})  # a folder the guard keeps at exit
start_tracking(SimpleNamespace(wandb_project_name="otpr", wandb_entity=None, wandb_tags=(), seed=1), run_dir)
writer = SummaryWriter(str(run_dir))
writer.add_scalar("charts/x", 1.0, 0)
writer.flush()
"""  # then: raise <the error>
ERRORS = {"error": 'FloatingPointError("critic loss is nan at step 3")',
          "full_disk": 'OSError(errno.ENOSPC, "No space left on device")'}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Tracked processes at once, offline: idql_baseline.py uninterrupted; otpr.py (4 iterations) stopped with Ctrl-C
    after its first checkpoint, then continued with --resume; and the two errors of GUARDED."""
    pytest.importorskip("wandb")
    cwd = tmp_path_factory.mktemp("tracking")
    home = cwd / "home"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": home, "WANDB_DIR": home / "wandb",
                            "WANDB_CONFIG_DIR": home / "config", "WANDB_CACHE_DIR": home / "cache",
                            "WANDB_DATA_DIR": home / "data", "WANDB_ARTIFACT_DIR": home / "artifacts",
                            "TMPDIR": home / "tmp"}.items():
            patch.setenv(name, str(value))
        (home / "tmp").mkdir(parents=True)
        idql = start("idql_baseline.py", TINY + ["--track", "--wandb-tags", *TAGS], cwd)
        guarded = {}
        for kind, error in ERRORS.items():
            (cwd / kind).mkdir()
            guarded[kind] = subprocess.Popen(
                [sys.executable, "-c", f"{GUARDED}raise {error}\n"], cwd=cwd / kind, text=True, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        marker = f"OTPR_TRACKING_TEST={cwd}/stopped"  # in the environment of the process to stop and its children
        patch.setenv(*marker.split("=", 1))
        otpr = start("otpr.py", TINY + OTPR_TINY + ["--total-timesteps", "320", "--track", "--wandb-tags", *TAGS], cwd)
        for _ in range(3000):  # Ctrl-C once the first checkpoint is on disk: it stops after iteration 1 or 2 of 4
            if list((cwd / "runs").glob("Kitchen-Complete-v0__otpr__3__*/checkpoint.pt")):
                break
            assert otpr.poll() is None, otpr.communicate()[0]
            time.sleep(0.1)
        otpr.send_signal(signal.SIGINT)
        stopped = otpr.communicate(timeout=300)[0]
        left_running = lingering(marker)
        finish(start("otpr.py", ["--resume", str(run_dir(cwd, "otpr"))], cwd))
        finish(idql)
        guarded = {kind: (*process.communicate(timeout=300), process.returncode) for kind, process in guarded.items()}
    return {"cwd": cwd, "stopped": (otpr.returncode, stopped), "left_running": left_running, "guarded": guarded}


@pytest.mark.parametrize("exp_name", ["idql_baseline", "otpr"])
def test_tracked_run_lands_in_its_run_folder_with_config_tags_and_every_tensorboard_scalar(tracked, exp_name):
    path = run_dir(tracked["cwd"], exp_name)
    parts = wandb_parts(path)
    assert len(parts) == (2 if exp_name == "otpr" else 1)  # the offline run lies in the run folder, one per process
    runs = [wandb_run(part) for part in parts]
    for run in runs:
        assert run["name"] == path.name and run["tags"] == TAGS
        assert run["config"]["exp_name"] == exp_name and run["config"]["seed"] == 3
        assert run["config"]["track"] is True and run["config"]["wandb_tags"] == TAGS
    assert runs[-1]["exit_code"] == 0
    # one history across the processes: the stopped one's part, then the resumed one's
    history = {}
    for run in runs:
        for key, values in run["history"].items():
            history.setdefault(key, []).extend(values)
    assert_mirrors_tensorboard(path, history)


def test_run_stopped_with_ctrl_c_and_resumed_continues_the_same_wandb_run(tracked):
    returncode, output = tracked["stopped"]
    assert returncode == 130 and "continue with: python otpr.py --resume" in output, output
    assert tracked["left_running"] == []  # the stopped process took W&B's service with it
    parts = wandb_parts(run_dir(tracked["cwd"], "otpr"))
    first, resumed = (wandb_run(part) for part in parts)
    assert first["exit_code"] == 130  # W&B marks the stopped part failed, with the stop's exit code
    assert first["history"]["charts/success_rate"]  # what it logged before the stop was kept
    assert first["id"] == resumed["id"] and resumed["exit_code"] == 0
    assert all(part.name.endswith("-" + first["id"]) for part in parts)
    assert wandb_run(wandb_parts(run_dir(tracked["cwd"], "idql_baseline"))[0])["id"] != first["id"]  # a run of its own


@pytest.mark.parametrize("kind", ERRORS)
def test_an_error_in_a_tracked_run_is_reported_once_and_fails_its_wandb_run(tracked, kind):
    _, stderr, returncode = tracked["guarded"][kind]
    if kind == "full_disk":  # RunGuard's one line, not wandb's traceback in front of it
        assert returncode == 2 and stderr.startswith("error: the disk is full") and len(stderr.splitlines()) == 1, \
            stderr
    else:
        assert returncode == 1 and stderr.count("Traceback") == 1, stderr
        assert stderr.splitlines()[-1] == "FloatingPointError: critic loss is nan at step 3", stderr
    (part,) = wandb_parts(tracked["cwd"] / kind / "runs" / "guarded")
    run = wandb_run(part)
    assert run["exit_code"] == returncode and run["history"]["charts/x"] == [1.0]


# ------------------------------------------------------------------------------------------------ without wandb
@pytest.fixture
def no_wandb(tmp_path):
    """A PYTHONPATH folder whose wandb module cannot be imported, as when wandb is not installed."""
    folder = tmp_path / "no_wandb"
    folder.mkdir()
    (folder / "wandb.py").write_text('raise ImportError("No module named \'wandb\'")\n')
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]),
            "HOME": str(tmp_path / "home")}


def test_track_without_wandb_is_one_error_line_and_leaves_no_run_folder(tmp_path, no_wandb):
    done = subprocess.run([sys.executable, str(ROOT / "idql_baseline.py"), *TINY, "--track"], cwd=tmp_path,
                          env=no_wandb, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: --track needs wandb: pip install -r requirements-sweeps.txt -c "
                                        "constraints.txt"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no folder of a failed start


def test_without_track_no_script_imports_wandb(tmp_path, no_wandb):
    code = ("import sys\n"
            f"for script in {SCRIPTS}:\n"
            "    sys.argv = [script]\n"
            "    module = __import__(script[:-len('.py')])\n"
            "    assert module.parse_args().track is False, script\n"
            "print('wandb' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=no_wandb, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_every_script_shares_the_tracking_flags_and_lines():
    """The same flags in every script, and the same two lines: W&B starts before the SummaryWriter, whose scalars it
    mirrors, and finishes after it closes."""
    starting = "tracking = start_tracking(args, run_dir) if args.track else None"
    for script in SCRIPTS:
        source = (ROOT / script).read_text()
        (args,) = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "Args"]
        fields = [node.target.id for node in args.body if isinstance(node, ast.AnnAssign)]
        at = fields.index("capture_video")
        assert fields[at + 1:at + 5] == ["track", "wandb_project_name", "wandb_entity", "wandb_tags"], script
        lines = [line.strip() for line in source.splitlines()]
        writer = next(i for i, line in enumerate(lines) if line.startswith("writer = SummaryWriter("))
        assert any(line.startswith(starting) for line in lines[:writer]), script
        assert lines[-2:] == ["writer.close()", "finish_tracking(tracking, run_name)"], script
    blocks = set()
    for script in SCRIPTS:  # the four flags with their help, textually identical
        lines = (ROOT / script).read_text().splitlines()
        at = lines.index("    track: bool = False")
        blocks.add("\n".join(lines[at:at + 8]))
    assert len(blocks) == 1, blocks


# ------------------------------------------------------------------------------------------------ videos
def test_finish_tracking_logs_the_evaluation_videos_then_finishes(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from utils.runtime import finish_tracking

    class Run:
        def __init__(self):
            self.calls = []

        def log(self, data):
            self.calls.append(("log", data))

        def finish(self):
            self.calls.append(("finish",))

    monkeypatch.chdir(tmp_path)
    finish_tracking(None, "run")  # without --track: nothing, and no error
    run = Run()
    finish_tracking(run, "run")  # no videos: only the finish
    assert run.calls == [("finish",)]
    (tmp_path / "videos" / "run").mkdir(parents=True)
    for name in ("rl-video-episode-8.mp4", "rl-video-episode-0.mp4"):
        (tmp_path / "videos" / "run" / name).write_bytes(b"not decoded: W&B uploads the file as it is")
    run = Run()
    finish_tracking(run, "run")
    assert [call[0] for call in run.calls] == ["log", "finish"]
    videos = run.calls[0][1]["videos"]
    assert all(isinstance(video, wandb.Video) for video in videos)
    assert [video._caption for video in videos] == ["rl-video-episode-0", "rl-video-episode-8"]

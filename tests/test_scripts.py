"""otpr.py and idql_baseline.py end to end on Kitchen-Complete-v0 with a tiny budget (CPU, about two minutes)."""
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.e2e import (ROOT, bad_input_error, finish, kill_at_first_checkpoint, run_dir, scalars, start,
                       write_pendulum_demonstrations)

TINY = [
    "--env-id", "Kitchen-Complete-v0", "--seed", "3", "--pretrain-steps", "50", "--pretrained-dir", "pretrained",
    "--num-envs", "2", "--num-steps", "10", "--total-timesteps", "240", "--eval-episodes", "1", "--eval-frequency", "2",
    "--critic-warmup-iterations", "1", "--checkpoint-frequency", "1", "--replay-ratio", "0.2", "--num-candidates", "2",
    "--actor-hidden", "64", "64", "64", "--critic-hidden", "32", "32", "--critic-batch-size", "32",
    "--actor-batch-size", "32", "--eval-protocols", "single", "select",
]
OTPR_TINY = ["--ot-hidden", "32", "32", "--ot-batch-size", "32", "--num-keypoints", "16", "--ot-max-steps", "50"]
ITERATIONS, ENV_STEPS = 3, 240  # 240 // (2 envs * 10 decisions * 4 actions per chunk)


# otpr.py with IDQL's guidance, IDQL's actor objective and IDQL's evaluation is IDQL, random number for random number
AS_IDQL = ["--exp-name", "otpr_as_idql", "--guidance", "advantage", "--actor-objective", "buffer"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """otpr.py in IDQL's configuration pre-trains and saves the shared checkpoint; idql_baseline.py and otpr.py load it."""
    cwd = tmp_path_factory.mktemp("e2e")
    as_idql_log = finish(start("otpr.py", TINY + OTPR_TINY + AS_IDQL, cwd))
    idql_log = finish(start("idql_baseline.py", TINY, cwd))
    otpr_log = finish(start("otpr.py", TINY + OTPR_TINY, cwd))
    return cwd, as_idql_log, idql_log, otpr_log


@pytest.mark.parametrize("exp_name", ["otpr", "idql_baseline"])
def test_summary_tensorboard_and_checkpoints(workdir, exp_name):
    cwd = workdir[0]
    path = run_dir(cwd, exp_name)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["env_steps"] == ENV_STEPS and summary["iterations"] == ITERATIONS
    assert [entry["iteration"] for entry in summary["history"]] == [0, 2, 3]  # every 2 iterations and at the end
    for key in ("pretrained", "final", "best"):
        assert 0 <= summary[key]["success_rate"] <= 1 and 0 <= summary[key]["normalized_score"] <= 100
        assert summary[key]["episodes"] == 1
    for entry in summary["history"]:  # the headline is the first protocol; every protocol is kept
        assert set(entry["protocols"]) == {"single", "select"}
        assert entry["normalized_score"] == entry["protocols"]["single"]["normalized_score"]
    assert summary["SPS"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["time_per_iteration_s"]) == {"env", "sampling", "critic", "ot", "actor", "eval"}
    assert (summary["time_per_iteration_s"]["ot"] > 0) == (exp_name == "otpr")

    logged = scalars(path)
    for tag in ("charts/success_rate", "charts/normalized_score", "charts/episodic_return",
                "eval_single/normalized_score", "eval_select/success_rate"):
        assert len(logged[tag]) == 3
    for tag in ("charts/SPS", "losses/q", "losses/v", "losses/actor", "time/env", "time/critic"):
        assert tag in logged
    if exp_name == "otpr":
        for tag in ("ot/dual", "ot/residual_s", "ot/residual_a", "ot/steps", "guidance/batch_ess",
                    "guidance/keypoint_loss_share"):
            assert len(logged[tag]) == ITERATIONS - 1  # fitted every iteration after the critic warm-up
        for tag in ("ot/heldout_residual_s", "ot/heldout_residual_a", "ot/frac_zero_h", "ot/q_scale", "ot/g_scale",
                    "ot/cost_state_share", "ot/cost_action_share", "ot/candidate_cost_spread",
                    "ot/candidate_q_spread"):
            assert len(logged[tag]) == 1  # held-out checks on evaluation iterations (here iteration 2)
    else:
        assert not any(tag.startswith("ot/") for tag in logged)
    # the lever of the guidance on what is executed, every iteration, in both scripts: 2 candidates per state
    for tag in ("guidance/candidate_ess", "guidance/top_candidate_prob", "guidance/candidate_spread",
                "guidance/frac_states_all_zero"):
        assert len(logged[tag]) == ITERATIONS
    assert all(1 <= value <= 2 for value in logged["guidance/candidate_ess"])
    assert all(0.5 <= value <= 1 for value in logged["guidance/top_candidate_prob"])
    assert all(value > 0 for value in logged["guidance/candidate_spread"])

    checkpoint = torch.load(path / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == ITERATIONS and checkpoint["global_step"] == ENV_STEPS
    assert checkpoint["replay"]["size"] > ITERATIONS * 2 * 10  # demonstrations plus every online decision
    assert ("u_net" in checkpoint) == (exp_name == "otpr")
    assert (path / f"{exp_name}.pt").exists()
    # the checkpoint holds the filled rows of the 1M-row buffer, not its whole storage
    stored = checkpoint["replay"]["data"]["obs"]
    assert stored.untyped_storage().nbytes() == stored.numel() * stored.element_size()
    assert (path / "checkpoint.pt").stat().st_size < 20e6


def test_both_methods_start_from_the_same_pretrained_policy(workdir):
    cwd, as_idql_log, idql_log, otpr_log = workdir
    otpr_summary = json.loads((run_dir(cwd, "otpr") / "summary.json").read_text())
    idql_summary = json.loads((run_dir(cwd, "idql_baseline") / "summary.json").read_text())
    assert otpr_summary["pretrained_checkpoint"] == idql_summary["pretrained_checkpoint"]
    assert "saved the pre-trained policy" in as_idql_log
    assert "loaded the pre-trained policy" in idql_log and "loaded the pre-trained policy" in otpr_log
    assert len(list((cwd / "pretrained").glob("*"))) == 1  # and no partial pre-training state left behind
    # same checkpoint, seeds and deterministic evaluation: the same pre-trained score, episode for episode
    assert otpr_summary["pretrained"] == idql_summary["pretrained"]


def test_otpr_in_idql_configuration_reproduces_idql_exactly(workdir):
    """Same numbers although the otpr.py run pre-trained and the idql_baseline.py run loaded the policy: pre-training
    leaves the random stream of the run untouched, and the OT parts draw from their own."""
    cwd = workdir[0]
    as_idql = json.loads((run_dir(cwd, "otpr_as_idql") / "summary.json").read_text())
    idql = json.loads((run_dir(cwd, "idql_baseline") / "summary.json").read_text())
    assert as_idql["history"] == idql["history"]
    weights = [torch.load(run_dir(cwd, name) / f"{name}.pt", weights_only=False)["policy"]
               for name in ("otpr_as_idql", "idql_baseline")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[1])
    critics = [torch.load(run_dir(cwd, name) / "checkpoint.pt", weights_only=False)["qf"]
               for name in ("otpr_as_idql", "idql_baseline")]
    assert all(torch.equal(critics[0][key], critics[1][key]) for key in critics[1])


def test_the_guidance_reaches_what_otpr_executes_and_learns(workdir):
    """What each run's loop handed its selection and its actor loss, as the loss and the selection measured it: OTPR
    weighs its actor's pairs by H (batch_ess < 1) and adds the keypoint block (a share of the loss), and its potentials
    were fitted; OTPR in IDQL's configuration weighs nothing (batch_ess 1, no keypoints, no fit). A loop that passes
    no weights to the actor update, or drops the keypoint block, or never marks the fit, fails here."""
    cwd = workdir[0]
    otpr_logged, as_idql_logged = scalars(run_dir(cwd, "otpr")), scalars(run_dir(cwd, "otpr_as_idql"))
    assert all(value < 0.999 for value in otpr_logged["guidance/batch_ess"])
    assert all(0 < value < 1 for value in otpr_logged["guidance/keypoint_loss_share"])
    assert all(value == 1 for value in as_idql_logged["guidance/batch_ess"])
    assert all(value == 0 for value in as_idql_logged["guidance/keypoint_loss_share"])
    checkpoint = torch.load(run_dir(cwd, "otpr") / "checkpoint.pt", weights_only=False)
    assert checkpoint["transport_cost"]["_extra_state"]["fitted"]
    assert not torch.load(run_dir(cwd, "otpr_as_idql") / "checkpoint.pt",
                          weights_only=False)["transport_cost"]["_extra_state"]["fitted"]


def test_checkpoint_from_another_task_is_refused(workdir, tmp_path):
    cwd = workdir[0]
    (checkpoint,) = (cwd / "pretrained").glob("*.pt")
    state = torch.load(checkpoint, weights_only=False)
    state["meta"]["env_id"] = "Kitchen-Mixed-v0"
    torch.save(state, tmp_path / "other.pt")
    process = start("otpr.py", TINY + ["--pretrained-checkpoint", str(tmp_path / "other.pt")], tmp_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "made for another task" in output and "Kitchen-Mixed-v0" in output
    assert "Traceback" not in output and not (tmp_path / "runs").exists()
    assert "delete" not in output  # the file was given explicitly: it is not the user's own to delete


def test_a_partial_or_other_network_pretrained_file_is_refused(workdir, tmp_path, monkeypatch, capsys):
    cwd = workdir[0]
    (checkpoint,) = (cwd / "pretrained").glob("*.pt")
    state = torch.load(checkpoint, weights_only=False)
    torch.save({"step": 5, "losses": [], "policy": state["policy"]}, tmp_path / "x.partial.pt")
    message = bad_input_error("otpr.py", TINY + ["--pretrained-checkpoint", "x.partial.pt"], tmp_path, monkeypatch,
                              capsys)
    assert "is not a pre-trained policy file" in message
    flags = TINY + ["--pretrained-checkpoint", str(checkpoint)]
    flags[flags.index("--actor-hidden") + 1: flags.index("--actor-hidden") + 4] = ["32", "32", "32"]
    message = bad_input_error("otpr.py", flags, tmp_path, monkeypatch, capsys)
    assert "holds another network: --actor-hidden (64, 64, 64) (asked: (32, 32, 32))" in message


def test_resume_continues_an_interrupted_run(workdir):
    cwd = workdir[0]
    args = TINY + OTPR_TINY + ["--exp-name", "interrupted", "--total-timesteps", "400"]  # 5 iterations
    process = start("otpr.py", args, cwd)
    pattern = "Kitchen-Complete-v0__interrupted__3__*/checkpoint.pt"
    checkpoint_file = kill_at_first_checkpoint(process, cwd / "runs", pattern, timeout=120)
    interrupted = torch.load(checkpoint_file, weights_only=False)
    assert 1 <= interrupted["iteration"] < 5

    finish(start("otpr.py", ["--resume", str(checkpoint_file.parent)], cwd))
    summary = json.loads((checkpoint_file.parent / "summary.json").read_text())
    assert summary["env_steps"] == 400 and summary["iterations"] == 5
    assert summary["history"][0] == interrupted["history"][0]  # the pre-trained evaluation was kept, not redone
    assert [entry["iteration"] for entry in summary["history"]] == [0, 2, 4, 5]
    final = torch.load(checkpoint_file, weights_only=False)
    assert final["replay"]["size"] == interrupted["replay"]["size"] + (5 - interrupted["iteration"]) * 2 * 10
    # nothing logged is lost or doubled across the interruption: one critic loss per iteration
    assert len(scalars(checkpoint_file.parent)["losses/q"]) == 5

    # resuming the finished run only evaluates again: with the restored weights, not the pre-trained ones
    finish(start("otpr.py", ["--resume", str(checkpoint_file.parent)], cwd))
    policy = torch.load(checkpoint_file.parent / "interrupted.pt", weights_only=False)["policy"]
    assert all(torch.equal(policy[key], final["policy"][key]) for key in policy)
    (pretrained,) = (cwd / "pretrained").glob("*.pt")
    pretrained_policy = torch.load(pretrained, weights_only=False)["policy"]
    assert not all(torch.equal(policy[key], pretrained_policy[key]) for key in policy)
    again = json.loads((checkpoint_file.parent / "summary.json").read_text())
    assert again["history"][-1]["protocols"] == summary["history"][-1]["protocols"]


def test_resume_refuses_another_scripts_checkpoint(workdir):
    cwd = workdir[0]
    process = start("idql_baseline.py", ["--resume", str(run_dir(cwd, "otpr"))], cwd)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "checkpoint of otpr.py" in output and "Traceback" not in output


def test_interrupted_pretraining_continues_to_the_same_weights(tmp_path):
    args = TINY[:4] + ["--pretrain-steps", "3000", "--pretrain-checkpoint-frequency", "100", "--total-timesteps", "0",
                       "--num-envs", "1", "--eval-episodes", "1", "--actor-hidden", "64", "64", "64",
                       "--pretrained-dir", "pretrained"]
    (tmp_path / "whole").mkdir()
    (tmp_path / "cut").mkdir()
    whole = start("otpr.py", args, tmp_path / "whole")
    cut = start("otpr.py", args, tmp_path / "cut")
    for _ in range(600):  # interrupt as soon as the first partial state is on disk
        if list((tmp_path / "cut" / "pretrained").glob("*.partial.pt")):
            break
        assert cut.poll() is None, cut.communicate()[0]
        time.sleep(0.1)
    cut.kill()
    cut.communicate()
    assert not list((tmp_path / "cut" / "pretrained").glob("*[0-9a-f].pt"))  # it was cut before the end
    assert "continuing the interrupted pre-training" in finish(start("otpr.py", args, tmp_path / "cut"))
    finish(whole)
    (whole_file,) = (tmp_path / "whole" / "pretrained").glob("*.pt")
    (cut_file,) = (tmp_path / "cut" / "pretrained").glob("*.pt")  # the partial state is gone
    a, b = (torch.load(f, weights_only=False) for f in (whole_file, cut_file))
    assert all(torch.equal(a["policy"][key], b["policy"][key]) for key in a["policy"])
    assert a["meta"]["losses"] == b["meta"]["losses"]


BAD_INPUT = [
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--total-timesteps", "-5"], "--total-timesteps must be at least 0"),
    (["--pretrain-steps", "0"], "--pretrain-steps must be positive"),
    (["--gamma", "1.5"], "--gamma must lie in [0, 1]"),
    (["--env-id", "Kitchen-Compleat-v0"], "Unknown env id 'Kitchen-Compleat-v0'"),
    (["--resume", "runs/no_such_run"], "no checkpoint at runs/no_such_run"),
    (["--resume", "old_run"], "written by an older version"),
    (["--dataset-path", "notes.txt"], "Cannot read notes.txt as HDF5"),
    (["--actor-hidden", "512", "256", "512"], "--actor-hidden 512 256 512: the residual denoising MLP has one width"),
    (["--actor-hidden", "512", "512"], "and an odd number of layers"),
    (["--critic-lr", "inf"], "--critic-lr must be a finite number, got inf"),
    (["--actor-lr", "nan"], "--actor-lr must be a finite number, got nan"),
    (["--buffer-size", "100000000000"], "--buffer-size 100000000000 needs 58859.6 GiB for its rows, more than the"),
    (["--total-timesteps", "1200"], "--total-timesteps 1200 is not a whole number of iterations of 560 env steps "
                                    "(--num-envs 2 x --num-steps 70 decisions x --chunk-size 4 actions): use 1120 or 1680"),
    (["--pretrained-dir", "notes.txt"], "cannot create notes.txt/: a file of that name is in the way"),
    (["--threads", "-1"], "--threads must be at least 0"),
    (["--resume", "truncated_run"], "truncated_run/checkpoint.pt is not a checkpoint this script can load safely"),
    (["--pretrained-checkpoint", "truncated.pt"], "truncated.pt is not a checkpoint this script can load safely"),
]


@pytest.mark.parametrize("script", ["otpr.py", "idql_baseline.py"])
@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[flags[0] for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, script, flags, message):
    """In-process (runpy), so that the cases cost no interpreter start each."""
    (tmp_path / "notes.txt").write_text("not a dataset")
    (tmp_path / "old_run").mkdir()
    torch.save({"script": script, "torch_rng": torch.get_rng_state()}, tmp_path / "old_run" / "checkpoint.pt")
    (tmp_path / "truncated_run").mkdir()  # a copy cut short, as a full disk or a killed copy leaves it
    (tmp_path / "truncated_run" / "checkpoint.pt").write_bytes((tmp_path / "old_run" / "checkpoint.pt").read_bytes()[:500])
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "old_run" / "checkpoint.pt").read_bytes()[:500])
    assert message in bad_input_error(script, flags, tmp_path, monkeypatch, capsys)


def test_a_run_folder_that_cannot_be_created_is_one_message(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").write_text("a file where the runs/ folder goes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["otpr.py", "--pretrain-steps", "1", "--pretrained-dir", "pretrained"])
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # keep pytest's Ctrl-C (RunGuard)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "otpr.py"), run_name="__main__")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot create runs/Kitchen-Complete-v0__otpr__1__") and "Not a directory" in error
    assert len(error.strip().splitlines()) == 1 and (tmp_path / "runs").is_file()


def interrupt_when(script: str, args: list[str], cwd, printed: str, timeout: float = 300) -> tuple[int, str]:
    """Starts the script in a process group of its own and sends Ctrl-C to the group, as a terminal does (the env
    workers get it too), once its output holds `printed`; returns the exit code and the output."""
    log = cwd / f"{args[args.index('--exp-name') + 1]}.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=output,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   start_new_session=True)
        for _ in range(int(timeout / 0.1)):
            if printed in log.read_text():
                break
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    return process.returncode, log.read_text()


def test_ctrl_c_saves_what_was_done_and_says_how_to_continue(workdir):
    """Fine-tuning: stops after the running iteration with a resumable checkpoint, and --resume finishes the run.
    Pre-training: keeps the steps done in the partial file, which the same command continues; no run folder is left
    that nothing could resume."""
    cwd = workdir[0]
    args = TINY + OTPR_TINY + ["--exp-name", "ctrl_c", "--total-timesteps", "800", "--checkpoint-frequency", "100"]
    returncode, output = interrupt_when("otpr.py", args, cwd, "evaluation at 0:")  # the env workers are running
    folder = run_dir(cwd, "ctrl_c")
    assert returncode == 130 and "Traceback" not in output, output
    assert output.count("stopping at the next safe point") == 1  # the env workers leave Ctrl-C to the run
    assert re.search(rf"^stopped after iteration \d+ of 10 \(\d+ env steps\), checkpoint saved; continue with: "
                     rf"python otpr.py --resume runs/{folder.name}$", output, re.MULTILINE), output
    saved = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert 1 <= saved["iteration"] < 10
    finish(start("otpr.py", ["--resume", str(folder)], cwd))
    assert json.loads((folder / "summary.json").read_text())["iterations"] == 10

    args = TINY + ["--exp-name", "ctrl_c_bc", "--pretrain-steps", "100000", "--pretrained-dir", "pretrained_ctrl_c"]
    returncode, output = interrupt_when("idql_baseline.py", args, cwd, "pre-training, then fine-tuning")
    assert returncode == 130 and "Traceback" not in output, output
    match = re.search(r"stopped pre-training at step (\d+) of 100000, saved in (\S+\.partial\.pt): the same command "
                      r"continues it", output)
    assert match, output
    assert torch.load(cwd / match.group(2), weights_only=False)["step"] == int(match.group(1)) > 0
    assert not list((cwd / "runs").glob("*__ctrl_c_bc__*"))


class RunsCode:
    """Unpickled, it runs a shell command: what a crafted checkpoint could do if loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("script", ["otpr.py", "idql_baseline.py"])
def test_a_crafted_checkpoint_runs_nothing_and_paths_stay_under_runs(tmp_path, monkeypatch, capsys, script):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "crafted" / "checkpoint.pt"
    crafted.parent.mkdir()
    torch.save({"script": script, "run_name": "x", "payload": RunsCode(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # the file is what it claims: loaded as before, it runs its command
    assert marker.exists()
    marker.unlink()
    for flags in (["--resume", "crafted"], ["--pretrained-checkpoint", "crafted/checkpoint.pt"]):
        message = bad_input_error(script, flags, tmp_path, monkeypatch, capsys)
        assert "is not a checkpoint this script can load safely (it refers to posix.system)" in message
        assert not marker.exists()
    # a checkpoint whose run name leaves runs/ is refused, and so is such an --exp-name
    (tmp_path / "escaping").mkdir()
    torch.save({"script": script, "run_name": "../../elsewhere", "rng": {}}, tmp_path / "escaping" / "checkpoint.pt")
    assert "names its run '../../elsewhere'" in bad_input_error(script, ["--resume", "escaping"], tmp_path, monkeypatch,
                                                                capsys)
    for name in ("../outside", "a/b", ".."):
        assert "must be a plain name" in bad_input_error(script, ["--exp-name", name], tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("script", ["otpr.py", "idql_baseline.py"])
def test_demonstrations_that_cannot_train_are_refused_before_pre_training(tmp_path, monkeypatch, capsys, script):
    """A NaN in the data, or data of another task's dimensions, ends with one line before anything is trained or saved
    (bad_input_error: no runs/ folder, so no pre-trained file under runs/pretrained/ either)."""
    import h5py
    import numpy as np

    def write(name, observations, actions):
        with h5py.File(tmp_path / name, "w") as f:
            f["observations"], f["actions"] = observations, actions
            f["rewards"], f["terminals"] = np.zeros(len(actions)), np.zeros(len(actions), dtype=bool)

    observations = np.zeros((8, 3))
    observations[5, 1] = np.nan
    write("nan.hdf5", observations, np.zeros((8, 1)))
    write("kitchen_actions.hdf5", np.zeros((8, 3)), np.zeros((8, 9)))
    message = bad_input_error(script, ["--env-id", "Pendulum-v1", "--dataset-path", "nan.hdf5"], tmp_path,
                              monkeypatch, capsys)
    assert "observations holds a non-finite value (nan or inf) at row 5" in message
    message = bad_input_error(script, ["--env-id", "Pendulum-v1", "--dataset-path", "kitchen_actions.hdf5"], tmp_path,
                              monkeypatch, capsys)
    assert "9-dim actions, but Pendulum-v1 has 3 and 1" in message


def test_ot_alpha_with_unsupervised_ot_is_refused_not_ignored(tmp_path, monkeypatch, capsys):
    message = bad_input_error("otpr.py", ["--ot-mode", "unsupervised", "--ot-alpha", "0.3"], tmp_path, monkeypatch, capsys)
    assert "--ot-alpha 0.3 weighs the keypoint guidance of --ot-mode masked" in message


@pytest.mark.parametrize("script", ["otpr.py", "idql_baseline.py"])
def test_any_box_env_with_a_d4rl_layout_dataset(tmp_path, script):
    """Bring-your-own task: Pendulum-v1 with a small HDF5 file in D4RL's layout. Its episodes end only by time-out
    (200 steps), which this run reaches in both envs: a time-out must not enter the replay buffer as a terminal state,
    and its stored next state is the episode's last observation, not the next episode's first."""
    write_pendulum_demonstrations(tmp_path / "pendulum.hdf5")
    decisions = 20  # per env and iteration: 3 iterations x 20 decisions x 4 actions = 240 env steps per env > 200
    args = TINY[2:] + (OTPR_TINY if script == "otpr.py" else [])
    args[args.index("--num-steps") + 1] = str(decisions)
    args[args.index("--total-timesteps") + 1] = str(3 * 2 * decisions * 4)
    args[args.index("--checkpoint-frequency") + 1] = "100"  # more than the run's 3 iterations: the end still saves
    args += ["--env-id", "Pendulum-v1", "--dataset-path", str(tmp_path / "pendulum.hdf5")]
    finish(start(script, args, tmp_path))
    (path,) = (tmp_path / "runs").glob(f"Pendulum-v1__{script[:-3]}__3__*")
    summary = json.loads((path / "summary.json").read_text())
    assert summary["env_steps"] == 3 * 2 * decisions * 4
    # no reference scores for a custom task: the "normalized score" is the episode return, negative on Pendulum
    assert summary["final"]["normalized_score"] == pytest.approx(summary["final"]["episodic_return"])
    assert summary["final"]["episodic_return"] < 0
    (checkpoint,) = (tmp_path / "pretrained").glob("Pendulum-v1__custom__seed3__*.pt")
    assert torch.load(checkpoint, weights_only=False)["meta"]["obs_dim"] == 3

    assert len(scalars(path)["charts/train_episodic_return"]) == 2  # one time-out in each env
    checkpoint = torch.load(path / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 3  # a run shorter than --checkpoint-frequency is resumable at its end
    replay = checkpoint["replay"]
    online = {key: value[replay["size"] - 3 * 2 * decisions:] for key, value in replay["data"].items()}
    assert online["terminated"].sum() == 0  # time-outs are not terminal: the critic bootstraps through them
    timeout_decision = 200 // 4 - 1  # the 50th decision of each env ends its episode
    for env_index in range(2):  # rows alternate between the two envs
        obs, next_obs = online["obs"][env_index::2], online["next_obs"][env_index::2]
        follows = (next_obs[:-1] == obs[1:]).all(-1)
        assert follows.sum() == len(follows) - 1 and not follows[timeout_decision]

"""otpr_pixels.py end to end with a tiny budget on CPU: one kitchen and one robomimic pixel task (rendered from small
demonstration files), resume after an interruption, and bad input."""
import json
import os

import h5py
import numpy as np
import pytest
import torch

import otpr_pixels as op
from tests.e2e import bad_input_error, finish, kill_at_first_checkpoint, scalars, start
from utils.datasets import EMBEDDED_ROBOMIMIC_DIR

pytestmark = pytest.mark.skipif(os.environ.get("MUJOCO_GL", "egl").lower() in ("disable", "disabled", "off"),
                                reason="camera images need offscreen rendering (MUJOCO_GL is off)")

KITCHEN, CAN = "Kitchen-Complete-Pixels-v0", "Robomimic-Can-Pixels-v0"
TINY = ["--seed", "3", "--pretrain-steps", "20", "--pretrain-batch-size", "8", "--pretrained-dir", "pretrained",
        "--num-envs", "1", "--num-steps", "5", "--total-timesteps", "40", "--eval-episodes", "1",
        "--eval-frequency", "10", "--checkpoint-frequency", "1", "--denoising-steps", "4", "--encoder-keypoints", "8",
        "--actor-hidden", "32", "32", "32", "--critic-hidden", "32", "32", "--critic-warmup-iterations", "1",
        "--replay-ratio", "0.2", "--num-candidates", "2", "--critic-batch-size", "16", "--actor-batch-size", "16",
        "--ot-hidden", "16", "16", "--ot-batch-size", "16", "--num-keypoints", "8", "--ot-max-steps", "20"]
CRITIC_ENCODER_OWN = ["--critic-encoder", "own", "--critic-encoder-lr", "1e-3", "--eval-protocols", "single", "select"]
ENV_STEPS = 40  # 2 iterations of 1 env x 5 decisions x 4 actions


def first_kitchen_episodes(source, path, episodes: int = 2):
    """A D4RL-layout file with the first `episodes` episodes of the shipped kitchen-complete file."""
    with h5py.File(source) as f:
        ends = np.flatnonzero(f["terminals"][()] | f["timeouts"][()])
        rows = ends[episodes - 1] + 1
        with h5py.File(path, "w") as out:
            for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
                out[key] = f[key][:rows]
    return path


@pytest.fixture(scope="module")
def cache_dirs(tmp_path_factory):
    """Rendered demonstrations go to a temporary folder, not next to the shared datasets."""
    folder = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("D4RL_DATASET_DIR", str(folder / "d4rl"))
        patch.setenv("ROBOMIMIC_DEMO_DIR", str(folder / "robomimic"))
        yield folder


@pytest.fixture(scope="module")
def kitchen_file(tmp_path_factory, real_complete_file):
    return first_kitchen_episodes(real_complete_file, tmp_path_factory.mktemp("data") / "kitchen2.hdf5")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dirs, kitchen_file):
    """A kitchen and a robomimic run at once, each in its own folder; returns {env id: folder}. The robomimic run's
    critics have their own encoder, and it is evaluated under both protocols."""
    datasets = {KITCHEN: kitchen_file, CAN: EMBEDDED_ROBOMIMIC_DIR / "can_scripted_mh_gen1_seed0_n4.hdf5"}
    processes = {}
    for env_id, dataset in datasets.items():
        cwd = tmp_path_factory.mktemp(env_id)
        flags = ["--env-id", env_id, "--dataset-path", str(dataset), *TINY]
        flags += CRITIC_ENCODER_OWN if env_id == CAN else []
        processes[env_id] = (cwd, start("otpr_pixels.py", flags, cwd))
    for cwd, process in processes.values():
        finish(process)
    return {env_id: cwd for env_id, (cwd, _) in processes.items()}


@pytest.mark.parametrize("env_id, cameras", [(KITCHEN, 1), (CAN, 2)])
def test_tiny_run_fine_tunes_encoder_and_policy_from_images(runs, env_id, cameras):
    (run,) = (runs[env_id] / "runs").glob(f"{env_id}__otpr_pixels__3__*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == ENV_STEPS and [entry["iteration"] for entry in summary["history"]] == [0, 2]
    assert summary["final"]["episodes"] == 1 and 0 <= summary["final"]["success_rate"] <= 1
    assert set(summary["time_per_iteration_s"]) == {"env", "sampling", "critic", "ot", "actor", "eval"}
    (pretrained_file,) = (runs[env_id] / "pretrained").glob("*.pt")
    pretrained = torch.load(pretrained_file, weights_only=False)
    assert pretrained["meta"]["pixels_shape"] == [cameras, 3, 84, 84] and pretrained["meta"]["obs_dim"] == 9
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    replay = checkpoint["replay"]["data"]
    assert replay["pixels"].dtype == torch.uint8 and replay["pixels"].shape[1:] == (cameras, 3, 84, 84)
    assert replay["next_pixels"].shape == replay["pixels"].shape and replay["state"].shape[1] == 9
    assert checkpoint["args"]["gamma"] == (0.999 if env_id == CAN else 0.99)  # the task's defaults reached the run
    # the encoder was trained by the actor loss during fine-tuning (--encoder-lr)
    final = torch.load(run / "otpr_pixels.pt", weights_only=False)["policy"]
    assert not torch.equal(final["encoder.trunk.conv1.weight"], pretrained["policy"]["encoder.trunk.conv1.weight"])
    if env_id == CAN:  # the critics' own encoder: a copy of the pre-trained one, trained by the Q loss alone
        assert set(summary["final"]["protocols"]) == {"single", "select"}
        critic_weights = checkpoint["critic_encoder"]["trunk.conv1.weight"]
        assert not torch.equal(critic_weights, pretrained["policy"]["encoder.trunk.conv1.weight"])
        assert not torch.equal(critic_weights, checkpoint["policy"]["encoder.trunk.conv1.weight"])
        critic_encoder = op.Encoder((cameras, 3, 84, 84), 9, op.Args(encoder_keypoints=8))
        critic_encoder.load_state_dict(checkpoint["critic_encoder"])
        keypoints = checkpoint["transport_cost"]  # the guidance's keypoint features come from the critics' encoder
        with torch.no_grad():
            torch.testing.assert_close(keypoints["keypoint_obs"],
                                       critic_encoder(keypoints["keypoint_pixels"], keypoints["keypoint_state"]))
    else:  # the critics read the policy encoder's features
        assert "critic_encoder" not in checkpoint
    # Q reads (features: 8 keypoints x 2 per camera, state 9) and a chunk of 4 actions (robomimic 7-dim, kitchen 9-dim)
    assert checkpoint["qf"]["q1.0.weight"].shape[1] == cameras * 16 + 9 + 4 * (7 if env_id == CAN else 9)
    logged = scalars(run)
    for tag in ("charts/success_rate", "losses/q", "losses/actor", "ot/dual", "charts/SPS"):
        assert tag in logged


def test_resume_continues_an_interrupted_pixel_run(cache_dirs, kitchen_file, tmp_path):
    args = ["--env-id", KITCHEN, "--dataset-path", str(kitchen_file), *TINY, "--total-timesteps", "60"]  # 3 iterations
    process = start("otpr_pixels.py", args, tmp_path)
    pattern = f"{KITCHEN}__otpr_pixels__3__*/checkpoint.pt"
    checkpoint_file = kill_at_first_checkpoint(process, tmp_path / "runs", pattern)
    interrupted = torch.load(checkpoint_file, weights_only=False)
    assert 1 <= interrupted["iteration"] < 3

    finish(start("otpr_pixels.py", ["--resume", str(checkpoint_file.parent)], tmp_path))
    summary = json.loads((checkpoint_file.parent / "summary.json").read_text())
    assert summary["env_steps"] == 60 and summary["iterations"] == 3
    assert summary["history"][0] == interrupted["history"][0]  # the pre-trained evaluation was kept, not redone
    final = torch.load(checkpoint_file, weights_only=False)
    assert final["replay"]["size"] == interrupted["replay"]["size"] + (3 - interrupted["iteration"]) * 5
    assert len(scalars(checkpoint_file.parent)["losses/q"]) == 3


BAD_INPUT = [
    (["--encoder-weights", "missing.pth"], "--encoder-weights missing.pth does not exist"),
    (["--encoder-weights", "notes.txt"], "cannot be read as a torch state dict"),
    (["--random-shift", "-1"], "--random-shift must be at least 0"),
    (["--env-id", "Kitchen-Complete-Pixel-v0"], "Unknown env id 'Kitchen-Complete-Pixel-v0'"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[flags[0] for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert message in bad_input_error("otpr_pixels.py", flags, tmp_path, monkeypatch, capsys)

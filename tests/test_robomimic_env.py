"""The robomimic tasks' env adapter (robosuite 1.4.1 behind Gymnasium, DPPO's protocol) and the robomimic HDF5 reader."""
import json
import os
import re
import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pytest

from utils.datasets import DatasetError, load_dataset, read_robomimic
from utils.envs import (
    ROBOMIMIC_OBS_KEYS,
    ROBOMIMIC_TASKS,
    ActionChunk,
    ChunkSuccess,
    build_env,
    check_env_id,
    make_env,
    robomimic_observation,
)
from utils.make_demos import env_args, write_demos

CAN, SQUARE = "Robomimic-Can-v0", "Robomimic-Square-v0"


@pytest.fixture(scope="module")
def can_env():
    env = build_env(CAN)
    yield env
    env.close()


def put_can_in_bin(env) -> None:
    """Teleport the can into its target bin, a few cm above the floor of the bin."""
    robosuite_env = env.unwrapped.env
    can_id = robosuite_env.object_to_id["can"]
    joint = robosuite_env.objects[can_id].joints[0]
    qpos = robosuite_env.sim.data.get_joint_qpos(joint).copy()
    qpos[:3] = robosuite_env.target_bin_placements[can_id] + [0.0, 0.0, 0.05]
    robosuite_env.sim.data.set_joint_qpos(joint, qpos)
    robosuite_env.sim.forward()


def test_ids_are_known_and_spaces_are_robomimics(can_env):
    for env_id in (CAN, SQUARE):
        check_env_id(env_id, has_dataset_path=False)
    assert can_env.observation_space.shape == (23,) and can_env.observation_space.dtype == np.float32
    assert can_env.action_space.shape == (7,)
    np.testing.assert_array_equal(can_env.action_space.low, -1.0)
    np.testing.assert_array_equal(can_env.action_space.high, 1.0)


def test_observation_is_robomimics_low_dim_keys_in_dppos_order(can_env):
    obs, _ = can_env.reset(seed=0)
    raw = can_env.unwrapped.env._get_observations(force_update=True)
    expected = np.concatenate([raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"],
                               raw["object-state"]])
    np.testing.assert_allclose(obs, expected, rtol=1e-6)
    np.testing.assert_allclose(obs[9:12], raw["Can_pos"], rtol=1e-6)  # "object" starts with the can's position
    assert ROBOMIMIC_OBS_KEYS == ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
    assert robomimic_observation({**raw, "object-state": raw["object-state"] * 0}).sum() == pytest.approx(
        expected[:9].sum(), rel=1e-6)


def test_reward_is_one_on_every_step_in_the_success_state(can_env):
    can_env.reset(seed=1)
    _, reward, terminated, truncated, info = can_env.step(np.zeros(7))
    assert reward == 0.0 and not info["success_state"] and not info["success"]
    put_can_in_bin(can_env)
    for _ in range(3):
        _, reward, terminated, truncated, info = can_env.step(np.zeros(7))
        assert reward == 1.0 and info["success_state"] and info["success"] and info["normalized_score"] == 100.0
        assert not terminated and not truncated  # DPPO's protocol: no early termination


def test_seeded_resets_repeat_placements_and_leave_numpys_global_rng_alone(can_env):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, _ = can_env.reset(seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    second, _ = can_env.reset(seed=5)
    other, _ = can_env.reset(seed=6)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[9:12], other[9:12])  # the can is placed elsewhere
    following_a = can_env.reset(seed=5)[0], can_env.reset()[0]
    following_b = can_env.reset(seed=5)[0], can_env.reset()[0]
    np.testing.assert_array_equal(following_a[1], following_b[1])  # unseeded resets continue the seeded sequence
    assert not np.allclose(following_a[0][9:12], following_a[1][9:12])


def test_episodes_truncate_at_dppos_length_in_chunks_and_keep_the_last_observation():
    assert ROBOMIMIC_TASKS[CAN].max_episode_steps == 300 and ROBOMIMIC_TASKS[SQUARE].max_episode_steps == 400
    env = make_env(CAN, seed=0, idx=0, act_steps=4)()
    env.reset(seed=0)
    chunks = 0
    while True:
        obs, _, terminated, truncated, info = env.step(np.zeros(28))
        chunks += 1
        if terminated or truncated:
            break
    assert chunks == 75 and truncated and not terminated and info["chunk_steps"] == 4
    np.testing.assert_allclose(obs, robomimic_observation(env.unwrapped.env._get_observations(force_update=True)),
                               rtol=1e-6)
    env.close()


class _Rewards(gym.Env):
    """Pays a scripted reward sequence, one value per env step."""

    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, rewards):
        self.rewards, self.t = rewards, 0

    def reset(self, **kwargs):
        self.t = 0
        return np.zeros(1), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1), float(self.rewards[self.t - 1]), False, False, {}


def test_chunk_success_needs_a_whole_chunk_in_the_success_state():
    # Steps 3-6 succeed (4 in a row) but straddle two chunks: DPPO counts no chunk of 4 successes yet.
    env = ChunkSuccess(ActionChunk(_Rewards([0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]), 4), 4)
    _, info = env.reset()
    assert not info["success"] and info["normalized_score"] == 0.0
    outcomes = [env.step(np.zeros(4))[4]["success"] for _ in range(4)]
    assert outcomes == [False, False, True, True]  # the third chunk (steps 9-12) is the first full one; it sticks
    assert env.reset()[1]["success"] is False


def test_import_works_with_rendering_disabled_where_there_is_no_egl():
    # robosuite forces MUJOCO_GL=egl on import; the stand-in macros keep the user's MUJOCO_GL=disable.
    code = ("import os; from utils.envs import build_env; env = build_env('Robomimic-Can-v0'); env.reset(seed=0); "
            "print(os.environ['MUJOCO_GL'])")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MUJOCO_GL": "disable"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip().splitlines()[-1] == "disable"


def test_frames_are_rendered_only_when_asked_for(can_env):
    assert not can_env.unwrapped.env.has_offscreen_renderer  # training envs never pay for rendering
    env = build_env(CAN, render_mode="rgb_array")
    frames = []
    for seed in (0, 1):
        env.reset(seed=seed)
        frames.append(env.render())
    env.close()
    assert frames[0].shape == (240, 320, 3) and frames[0].dtype == np.uint8
    assert frames[0].std() > 10 and np.abs(frames[0].astype(int) - frames[1]).max() > 50  # the can moved
    # upright: the top rows show the far wall and the robot, the bottom rows the floor under the tables (brighter)
    assert frames[0][-20:].mean() > frames[0][:20].mean()


# ------------------------------------------------------------------------------------------------ robomimic reader
def fake_demo(length: int, offset: float) -> dict:
    """A demo whose every observation entry is offset + its time step (robot0_eef_pos gets +0.1, etc.)."""
    t = np.arange(length, dtype=np.float64)[:, None] + offset
    dims = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 14, "robot0_joint_pos": 7}
    obs = {key: np.repeat(t + 0.1 * i, dim, axis=1) for i, (key, dim) in enumerate(dims.items())}
    rewards = np.zeros(length)
    rewards[-2:] = 1
    return {"obs": obs, "actions": np.repeat(t, 7, axis=1), "rewards": rewards, "dones": np.eye(length)[-1],
            "states": np.repeat(t, 5, axis=1), "model_file": "<mujoco/>", "style": "test"}


@pytest.fixture
def fake_can_file(tmp_path):
    """Twelve fake demos (demo_0 .. demo_11, lengths 5 + i) in the generator's robomimic layout."""
    path = tmp_path / "can.hdf5"
    write_demos(path, CAN, [fake_demo(5 + i, 100.0 * i) for i in range(12)], attempts=12, seed=0)
    return path


def test_reader_concatenates_keys_in_order_and_ends_each_demo_with_a_timeout(fake_can_file):
    data = read_robomimic(fake_can_file, CAN)
    lengths = [5 + i for i in range(12)]
    assert data["observations"].shape == (sum(lengths), 23) and data["actions"].shape == (sum(lengths), 7)
    first = data["observations"][0]
    np.testing.assert_allclose(first[:3], 0.0)
    np.testing.assert_allclose(first[3:7], 0.1, rtol=1e-6)
    np.testing.assert_allclose(first[7:9], 0.2, rtol=1e-6)
    np.testing.assert_allclose(first[9:], 0.3, rtol=1e-6)  # the "object" key; robot0_joint_pos is not read
    ends = np.flatnonzero(data["timeouts"])
    np.testing.assert_array_equal(ends, np.cumsum(lengths) - 1)
    assert not data["terminals"].any()
    # demo_10 follows demo_9 (not demo_1): the demo after the 10th end starts at 1000
    assert data["observations"][ends[9] + 1, 0] == pytest.approx(1000.0)
    np.testing.assert_array_equal(data["rewards"][ends], 1.0)
    with h5py.File(fake_can_file) as f:
        assert len(f["mask/valid"]) == 1 and len(f["mask/train"]) == 11
        assert json.loads(f["data"].attrs["env_args"]) == env_args(CAN)


def test_load_dataset_reads_a_robomimic_file_given_as_dataset_path(fake_can_file):
    data = load_dataset(CAN, dataset_path=str(fake_can_file))
    assert data["observations"].shape[1] == 23


@pytest.mark.parametrize("change, message", [
    (lambda args: args.update(env_name="Lift"), "'Lift'"),
    (lambda args: args.update(env_version="1.2.1"), "robosuite 1.2.1"),
    (lambda args: args["env_kwargs"]["controller_configs"].update(type="JOINT_VELOCITY"), "JOINT_VELOCITY"),
    (lambda args: args["env_kwargs"].update(control_freq=10), "10 Hz"),
])
def test_reader_refuses_another_tasks_metadata(fake_can_file, change, message):
    with h5py.File(fake_can_file, "a") as f:
        args = json.loads(f["data"].attrs["env_args"])
        change(args)
        f["data"].attrs["env_args"] = json.dumps(args)
    with pytest.raises(DatasetError, match="does not match Robomimic-Can-v0") as error:
        read_robomimic(fake_can_file, CAN)
    assert message in str(error.value)


def test_reader_refuses_the_can_file_for_square_and_non_robomimic_files(fake_can_file, tmp_path):
    with pytest.raises(DatasetError, match="'PickPlaceCan'"):
        read_robomimic(fake_can_file, SQUARE)
    d4rl_like = tmp_path / "d4rl.hdf5"
    with h5py.File(d4rl_like, "w") as f:
        f["observations"] = np.zeros((3, 23))
    with pytest.raises(DatasetError, match="not a robomimic file"):
        read_robomimic(d4rl_like, CAN)
    not_hdf5 = tmp_path / "text.hdf5"
    not_hdf5.write_text("not hdf5")
    with pytest.raises(DatasetError, match="Cannot read"):
        read_robomimic(not_hdf5, CAN)


def test_robomimic_ids_take_their_demonstrations_from_the_scripted_source():
    with pytest.raises(ValueError, match="--dataset-source scripted"):
        load_dataset(CAN, source="d4rl")


# ------------------------------------------------------------------------------------------------ per-task defaults
@pytest.mark.parametrize("script", ["otpr", "idql_baseline", "dql_baseline", "qsm_baseline", "dppo_baseline"])
def test_robomimic_ids_bring_the_papers_settings_and_explicit_flags_win(script, monkeypatch):
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [script, "--env-id", CAN])
    args = module.parse_args()
    assert args.gamma == 0.999 and args.dataset_source == "scripted" and args.chunk_size == 4
    assert args.critic_hidden == (256, 256, 256)
    assert args.num_steps == (300 if script == "dppo_baseline" else 75)  # one Can episode (DPPO: its n_steps)
    assert args.pretrain_steps == 5000  # Can starts from an early policy, so that fine-tuning has room
    if script == "dql_baseline":  # DPPO's Robomimic DQL: eta 1.0, batch 1000
        assert args.eta == 1.0 and args.actor_batch_size == 1000
    monkeypatch.setattr(sys, "argv", [script, "--env-id", SQUARE, "--gamma", "0.9", "--num-steps", "7"])
    args = module.parse_args()
    assert args.gamma == 0.9 and args.num_steps == 7 and args.dataset_source == "scripted"
    assert args.pretrain_steps == 80000  # Square's demonstrations leave room after the full recipe
    if script == "dql_baseline":
        assert args.eta == 1.0 and args.actor_batch_size == 1000
    monkeypatch.setattr(sys, "argv", [script])
    args = module.parse_args()
    assert args.gamma == 0.99 and args.dataset_source == "d4rl"  # the kitchen's defaults are untouched
    if script == "dql_baseline":  # the DQL authors' kitchen values
        assert args.eta == 0.005 and args.actor_batch_size == 256


@pytest.mark.parametrize("script", ["otpr", "dppo_baseline"])
def test_help_after_a_robomimic_env_id_shows_that_tasks_defaults(script, monkeypatch, capsys):
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [script, "--env-id=Robomimic-Can-v0", "--gamma", "0.9"])
    assert module.parse_args().pretrain_steps == 5000  # the --flag=value form is read too
    monkeypatch.setenv("COLUMNS", "200")
    helps = {}
    for env_id in (CAN, "Kitchen-Complete-v0"):
        monkeypatch.setattr(sys, "argv", [script, "--env-id", env_id, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args()
        assert exit_info.value.code == 0
        helps[env_id] = " ".join(capsys.readouterr().out.replace("│", " ").split())
    gamma_default = lambda text: re.search(r"--gamma FLOAT .*?\(default: ([0-9.]+)\)", text).group(1)
    assert gamma_default(helps[CAN]) == "0.999" and gamma_default(helps["Kitchen-Complete-v0"]) == "0.99"

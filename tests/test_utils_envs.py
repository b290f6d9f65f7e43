import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from gymnasium_robotics.envs.franka_kitchen.kitchen_env import OBS_ELEMENT_GOALS, OBS_ELEMENT_INDICES

from utils.envs import (
    KITCHEN_TASKS,
    ActionChunk,
    KitchenD4RLAdapter,
    ScoreInfo,
    build_env,
    check_env_id,
    is_kitchen,
    kitchen_goal,
    make_env,
)

COMPLETE = "Kitchen-Complete-v0"
REPO_ROOT = Path(__file__).resolve().parents[1]
OPENGL_VARIABLES = ("MUJOCO_GL", "PYOPENGL_PLATFORM")


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter at the repository root, with MUJOCO_GL and PYOPENGL_PLATFORM unset."""
    env = {key: value for key, value in os.environ.items() if key not in OPENGL_VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def fresh_import() -> subprocess.CompletedProcess:
    """`import utils.envs` in a new interpreter; prints the OpenGL variables it leaves set."""
    code = "import os, utils.envs; print([os.environ.get(key) for key in ('MUJOCO_GL', 'PYOPENGL_PLATFORM')])"
    return run_fresh_python(code)


def raw_kitchen(tasks):
    return gym.make("FrankaKitchen-v1", tasks_to_complete=tasks)


def test_kitchen_ids_and_goal_vector():
    assert all(is_kitchen(env_id) for env_id in KITCHEN_TASKS)
    assert not is_kitchen("Pendulum-v1")
    goal = kitchen_goal(KITCHEN_TASKS["Kitchen-Mixed-v0"])
    assert goal.shape == (30,) and goal.dtype == np.float32
    np.testing.assert_allclose(goal[[11, 12]], [-0.88, -0.01], rtol=1e-6)  # bottom burner
    np.testing.assert_allclose(goal[[17, 18]], [-0.69, -0.05], rtol=1e-6)  # light switch
    np.testing.assert_allclose(goal[22], -0.75, rtol=1e-6)  # microwave
    np.testing.assert_allclose(goal[23:30], [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06], rtol=1e-6)  # kettle
    untouched = np.ones(30, dtype=bool)
    untouched[[11, 12, 17, 18, 22, *range(23, 30)]] = False
    assert not goal[untouched].any()


def test_adapter_observation_layout():
    env = build_env(COMPLETE)
    assert env.observation_space == gym.spaces.Box(-np.inf, np.inf, (60,), np.float32)
    obs, info = env.reset(seed=3)
    raw_obs, _ = raw_kitchen(KITCHEN_TASKS[COMPLETE]).reset(seed=3)
    assert obs.shape == (60,) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:9], raw_obs["observation"][:9].astype(np.float32))  # robot joint positions
    np.testing.assert_array_equal(obs[9:30], raw_obs["observation"][18:39].astype(np.float32))  # object positions
    np.testing.assert_array_equal(obs[30:], kitchen_goal(KITCHEN_TASKS[COMPLETE]))
    # The env adds small observation noise on top of the simulator's qpos.
    np.testing.assert_allclose(obs[:30], env.unwrapped.data.qpos[:30], atol=0.05)
    assert info["subtasks_completed"] == 0 and info["success"] is False and info["normalized_score"] == 0.0


def test_adapter_returns_fresh_arrays():
    env = build_env(COMPLETE)
    first, _ = env.reset(seed=0)
    kept = first.copy()
    second, *_ = env.step(np.ones(9))
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)


def test_adapter_seeding():
    env = build_env(COMPLETE)
    a, _ = env.reset(seed=1)
    b, _ = env.reset(seed=1)
    c, _ = env.reset(seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_adapter_pays_each_subtask_once_and_terminates_when_all_done():
    env = build_env(COMPLETE)
    env.reset(seed=0)
    qpos = env.unwrapped.data.qpos
    qpos[OBS_ELEMENT_INDICES["microwave"]] = OBS_ELEMENT_GOALS["microwave"]
    _, reward, terminated, _, info = env.step(np.zeros(9))
    assert (reward, terminated) == (1.0, False)
    assert info["subtasks_completed"] == 1 and info["normalized_score"] == 25.0 and info["success"] is False
    _, reward, _, _, info = env.step(np.zeros(9))  # the microwave stays open but pays no more
    assert reward == 0.0 and info["subtasks_completed"] == 1
    for task in ("kettle", "light switch", "slide cabinet"):
        qpos[OBS_ELEMENT_INDICES[task]] = OBS_ELEMENT_GOALS[task]
    _, reward, terminated, truncated, info = env.step(np.zeros(9))
    assert (reward, terminated, truncated) == (3.0, True, False)
    assert info["subtasks_completed"] == 4 and info["normalized_score"] == 100.0 and info["success"] is True
    _, info = env.reset(seed=0)
    assert info["subtasks_completed"] == 0 and info["success"] is False


def test_replaying_first_dataset_episode_scores_its_subtasks(real_complete_file):
    with h5py.File(real_complete_file, "r") as f:
        first_end = int(np.flatnonzero(f["terminals"][()])[0])
        actions = f["actions"][: first_end + 1]
    env = build_env(COMPLETE)
    env.reset(seed=0)
    total = 0.0
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
        if terminated or truncated:
            break
    # Open-loop replay need not reproduce the demo, but this one does complete subtasks in FrankaKitchen-v1.
    assert info["subtasks_completed"] >= 1
    assert total == info["subtasks_completed"]
    assert info["normalized_score"] == 25.0 * info["subtasks_completed"]
    assert info["success"] == (info["subtasks_completed"] == 4) == terminated


class CountingEnv(gym.Env):
    """Observation = number of steps taken; reward = 10 * steps + first action component; terminates at step 3."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(np.array([-1.0, -2.0], np.float32), np.array([1.0, 2.0], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.steps, self.received = 0, []
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.steps += 1
        self.received.append(np.array(action))
        reward = 10.0 * self.steps + float(action[0])
        return np.full(1, self.steps, np.float32), reward, self.steps == 3, False, {"step": self.steps}


def test_action_chunk_space_order_and_reward_sum():
    env = ActionChunk(CountingEnv(), act_steps=2)
    assert env.action_space.shape == (4,)
    np.testing.assert_array_equal(env.action_space.low, [-1, -2, -1, -2])
    np.testing.assert_array_equal(env.action_space.high, [1, 2, 1, 2])
    env.reset()
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.1, -0.5, 0.2]))
    np.testing.assert_array_equal(env.unwrapped.received, [[0.5, 0.1], [-0.5, 0.2]])
    assert reward == pytest.approx(10 + 0.5 + 20 - 0.5)
    assert obs[0] == 2 and info["step"] == 2 and info["chunk_steps"] == 2 and not terminated


def test_action_chunk_stops_when_the_episode_ends():
    env = ActionChunk(CountingEnv(), act_steps=2)
    env.reset()
    assert env.step(np.zeros(4))[4]["chunk_steps"] == 2  # steps 1 and 2
    obs, reward, terminated, _, info = env.step(np.zeros(4))  # step 3 terminates: step 4 must not run
    assert terminated and info["chunk_steps"] == 1 and env.unwrapped.steps == 3
    assert obs[0] == 3 and reward == 30.0


def test_make_env_kitchen_thunk():
    env = make_env(COMPLETE, seed=5, idx=1, act_steps=4)()
    assert env.action_space.shape == (36,)
    reference = gym.spaces.Box(-1.0, 1.0, (36,), np.float64)
    reference.seed(6)
    expected = reference.sample()
    np.testing.assert_array_equal(env.action_space.sample(), expected)  # seeded with seed + idx
    obs, _ = env.reset(seed=5)
    assert obs.shape == (60,)
    _, _, _, _, info = env.step(np.zeros(36))
    assert info["chunk_steps"] == 4 and info["subtasks_completed"] == 0


def test_other_box_env_gets_return_as_score():
    env = make_env("Pendulum-v1", seed=0, idx=0, act_steps=2)()
    assert env.action_space.shape == (2,)  # Pendulum's 1-dim torque, twice
    _, info = env.reset(seed=0)
    assert info["normalized_score"] == 0.0 and info["success"] is False and "subtasks_completed" not in info
    total = 0.0
    for _ in range(3):
        _, reward, _, _, info = env.step(env.action_space.sample())
        total += reward
    assert info["normalized_score"] == pytest.approx(total) and total < 0  # Pendulum's reward is negative
    assert info["success"] is False


def test_score_info_reads_is_success():
    class Succeeds(CountingEnv):
        def step(self, action):
            obs, reward, terminated, truncated, _ = super().step(action)
            return obs, reward, terminated, truncated, {"is_success": 1.0}

    env = ScoreInfo(Succeeds())
    env.reset()
    assert env.step(np.zeros(2))[4]["success"] is True


def test_unknown_env_id_is_a_helpful_value_error():
    with pytest.raises(ValueError) as error:
        build_env("Kitchen-Nonexistent-v0")
    message = str(error.value)
    assert all(env_id in message for env_id in KITCHEN_TASKS)
    assert "--dataset-path" in message and "Box" in message


def test_check_env_id_accepts_kitchen_ids_and_registered_ids_with_a_dataset(monkeypatch):
    monkeypatch.setattr(gym, "make", lambda *args, **kwargs: pytest.fail("checking an id must not build an env"))
    for env_id in KITCHEN_TASKS:
        check_env_id(env_id, has_dataset_path=False)
        check_env_id(env_id, has_dataset_path=True)
    check_env_id("Hopper-v5", has_dataset_path=True)


def test_check_env_id_needs_a_dataset_path_for_other_envs():
    with pytest.raises(ValueError, match="Hopper-v5 has no built-in dataset.*pass --dataset-path"):
        check_env_id("Hopper-v5", has_dataset_path=False)


@pytest.mark.parametrize("has_dataset_path", [False, True])
def test_check_env_id_lists_the_supported_ids_for_an_unknown_one(has_dataset_path):
    with pytest.raises(ValueError) as error:
        check_env_id("Kitchen-Nonexistent-v0", has_dataset_path)
    message = str(error.value)
    assert message.startswith("Unknown env id 'Kitchen-Nonexistent-v0'.") and "Did you mean" not in message
    assert all(env_id in message for env_id in KITCHEN_TASKS)
    assert "any registered Gymnasium id with Box observation and action spaces together with --dataset-path" in message


def test_check_env_id_suggests_a_close_match():
    with pytest.raises(ValueError, match="Did you mean 'Kitchen-Complete-v0'"):
        check_env_id("kitchen-complete-v0", has_dataset_path=False)


def test_non_box_space_is_rejected():
    with pytest.raises(ValueError, match="non-Box action space"):
        build_env("CartPole-v1")


def test_import_leaves_the_opengl_backend_unset(fresh_import):
    assert fresh_import.returncode == 0, fresh_import.stderr
    assert fresh_import.stdout.strip() == "[None, None]"


def test_import_prints_no_adroit_notice(fresh_import):
    assert fresh_import.returncode == 0, fresh_import.stderr
    assert "Adroit" not in fresh_import.stderr and "Adroit" not in fresh_import.stdout


def test_import_keeps_other_gymnasium_robotics_notices():
    code = (
        "from importlib.metadata import version\n"
        "from farama_notifications import notifications\n"
        "notifications.setdefault('gymnasium_robotics', {})[version('gymnasium-robotics')] = 'another notice'\n"
        "import utils.envs"
    )
    result = run_fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert "another notice" in result.stderr


def test_rendering_env_asks_for_egl_unless_a_backend_is_chosen(monkeypatch):
    for key in OPENGL_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    build_env(COMPLETE).close()
    assert not any(key in os.environ for key in OPENGL_VARIABLES)  # no rendering, no OpenGL backend requested
    build_env(COMPLETE, render_mode="rgb_array").close()
    assert os.environ["MUJOCO_GL"] == "egl" and os.environ["PYOPENGL_PLATFORM"] == "egl"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv("PYOPENGL_PLATFORM")
    build_env(COMPLETE, render_mode="rgb_array").close()
    assert os.environ["MUJOCO_GL"] == "osmesa" and "PYOPENGL_PLATFORM" not in os.environ  # the user's choice wins


@pytest.mark.skipif(ctypes.util.find_library("EGL") is None, reason="no libEGL on this machine")
def test_rendering_in_a_worker_forked_after_mujoco_was_imported():
    code = """
import gymnasium as gym
from utils.envs import build_env

envs = gym.vector.AsyncVectorEnv([lambda: build_env("Kitchen-Complete-v0", render_mode="rgb_array")], context="fork")
envs.reset(seed=0)
(frame,) = envs.call("render")
print(frame.shape, frame.dtype, frame.std() > 0)
envs.close()
"""
    result = run_fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(240, 320, 3) uint8 True"


def test_video_rendering_is_cheap_and_works():
    env = build_env(COMPLETE, render_mode="rgb_array")
    assert isinstance(env, KitchenD4RLAdapter)
    model = env.unwrapped.model
    assert not model.light_castshadow.any() and not model.mat_reflectance.any()
    env.reset(seed=0)
    try:
        frame = env.render()
    except Exception as e:  # no OpenGL backend on this machine: the flags above are still checked
        pytest.skip(f"offscreen rendering unavailable here: {e!r}")
    assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8 and frame.std() > 0

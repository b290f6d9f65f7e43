"""The camera-image tasks (utils.envs.PIXEL_TASKS): their envs, and their demonstrations rendered by
utils.datasets.load_pixel_dataset (small data: the end of the first kitchen-complete episode and the start of the
second, the start of one generated Can demonstration).

Rendering on a 2-core CPU (EGL on Mesa's software rasterizer) takes 40-90 ms per 84x84 image, so the data sets
rendered here are a few dozen rows each."""
import ctypes.util
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

import utils.datasets
from utils.datasets import (
    EMBEDDED_ROBOMIMIC_DIR,
    DatasetError,
    load_dataset,
    load_pixel_dataset,
    pixel_cache_path,
    read_robomimic,
    render_demo_pixels,
)
from utils.envs import (
    PIXEL_IMAGE_SIZE,
    PIXEL_STATE_DIM,
    PIXEL_TASKS,
    PixelTask,
    ScoreInfo,
    build_env,
    check_env_id,
    is_pixels,
    make_env,
)

KITCHEN, KITCHEN_PIXELS = "Kitchen-Complete-v0", "Kitchen-Complete-Pixels-v0"
CAN, CAN_PIXELS = "Robomimic-Can-v0", "Robomimic-Can-Pixels-v0"
SHIPPED_CAN = EMBEDDED_ROBOMIMIC_DIR / "can_scripted_mh_gen1_seed0_n4.hdf5"
REPO_ROOT = Path(__file__).resolve().parents[1]
KITCHEN_ROWS, CAN_ROWS = 40, 30  # rows rendered by the dataset tests

needs_egl = pytest.mark.skipif(ctypes.util.find_library("EGL") is None,
                               reason="no libEGL on this machine: the camera images are rendered with EGL")


def pixel_space(num_cameras: int) -> gym.spaces.Dict:
    return gym.spaces.Dict({
        "pixels": gym.spaces.Box(0, 255, (num_cameras, PIXEL_IMAGE_SIZE, PIXEL_IMAGE_SIZE, 3), np.uint8),
        "state": gym.spaces.Box(-np.inf, np.inf, (PIXEL_STATE_DIM,), np.float32),
    })


@pytest.fixture
def cache_dirs(tmp_path, monkeypatch):
    """Empty D4RL_DATASET_DIR and ROBOMIMIC_DEMO_DIR folders, so that the rendered caches go to tmp_path."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("ROBOMIMIC_DEMO_DIR", str(tmp_path / "robomimic"))
    return tmp_path


@pytest.fixture(scope="module")
def small_kitchen_file(real_complete_file, tmp_path_factory) -> Path:
    """A D4RL-layout file with KITCHEN_ROWS rows of the shipped kitchen-complete file: the last half of its first
    episode and the first half of its second (so that an episode end is among them)."""
    path = tmp_path_factory.mktemp("kitchen") / "kitchen_two_episodes.hdf5"
    with h5py.File(real_complete_file, "r") as source, h5py.File(path, "w") as f:
        first_end = np.flatnonzero(source["terminals"][()])[0]
        rows = slice(first_end + 1 - KITCHEN_ROWS // 2, first_end + 1 + KITCHEN_ROWS // 2)
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            f[key] = source[key][rows]
    return path


@pytest.fixture(scope="module")
def small_can_file(tmp_path_factory) -> Path:
    """A robomimic file (the shipped generated Can file's metadata) holding the first CAN_ROWS steps of demo_0."""
    path = tmp_path_factory.mktemp("can") / "can_one_demo.hdf5"
    with h5py.File(SHIPPED_CAN, "r") as source, h5py.File(path, "w") as f:
        data = f.create_group("data")
        for name, value in source["data"].attrs.items():
            data.attrs[name] = value
        demo = data.create_group("demo_0")
        source_demo = source["data/demo_0"]
        for key in ("actions", "rewards", "dones", "states"):
            demo[key] = source_demo[key][:CAN_ROWS]
        for key in source_demo["obs"]:
            demo[f"obs/{key}"] = source_demo["obs"][key][:CAN_ROWS]
    return path


# ------------------------------------------------------------------------------------------------ ids and spaces
def test_pixel_ids_name_their_state_task_and_cameras():
    assert set(PIXEL_TASKS) == {"Kitchen-Complete-Pixels-v0", "Kitchen-Partial-Pixels-v0", "Kitchen-Mixed-Pixels-v0",
                                "Robomimic-Can-Pixels-v0", "Robomimic-Square-Pixels-v0"}
    assert PIXEL_TASKS[CAN_PIXELS] == PixelTask(CAN, ("agentview", "robot0_eye_in_hand"))
    assert PIXEL_TASKS["Kitchen-Mixed-Pixels-v0"].state_env_id == "Kitchen-Mixed-v0"
    assert len(PIXEL_TASKS[KITCHEN_PIXELS].cameras) == 1
    with pytest.raises(AttributeError):
        PIXEL_TASKS[CAN_PIXELS].cameras = ()  # frozen
    assert PIXEL_IMAGE_SIZE == 84 and PIXEL_STATE_DIM == 9
    for env_id in PIXEL_TASKS:
        assert is_pixels(env_id)
        check_env_id(env_id, has_dataset_path=False)  # built-in datasets, like the state ids
    assert not is_pixels(KITCHEN) and not is_pixels(CAN)


def test_the_loaders_send_each_kind_of_id_to_the_other_loader():
    with pytest.raises(ValueError, match="load_pixel_dataset"):
        load_dataset(KITCHEN_PIXELS)
    with pytest.raises(ValueError, match="Kitchen-Complete-Pixels-v0"):
        load_pixel_dataset(KITCHEN)
    with pytest.raises(ValueError, match="no built-in dataset"):
        load_pixel_dataset("Pendulum-v1")


def test_rendering_switched_off_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "disable")
    with pytest.raises(RuntimeError, match="MUJOCO_GL=disable turns it off"):
        build_env(KITCHEN_PIXELS)


# ------------------------------------------------------------------------------------------------ envs
@needs_egl
@pytest.mark.parametrize("pixel_id, state_id", [(KITCHEN_PIXELS, KITCHEN), (CAN_PIXELS, CAN)])
def test_pixel_env_is_the_state_task_with_camera_images(pixel_id, state_id):
    num_cameras = len(PIXEL_TASKS[pixel_id].cameras)
    env, state_env = make_env(pixel_id, 0, 0, act_steps=2)(), make_env(state_id, 0, 0, act_steps=2)()
    assert env.observation_space == pixel_space(num_cameras)
    assert env.action_space == state_env.action_space
    obs, info = env.reset(seed=3)
    state_obs, state_info = state_env.reset(seed=3)
    first_pixels = obs["pixels"].copy()
    rng = np.random.default_rng(0)
    for _ in range(3):
        action = rng.uniform(-1, 1, env.action_space.shape)
        obs, reward, terminated, truncated, info = env.step(action)
        state_obs, state_reward, state_terminated, state_truncated, state_info = state_env.step(action)
        assert obs["pixels"].shape == (num_cameras, 84, 84, 3) and obs["pixels"].dtype == np.uint8
        assert obs["state"].shape == (9,) and obs["state"].dtype == np.float32
        # the same trajectory: rendering does not disturb the simulation
        np.testing.assert_array_equal(obs["state"], state_obs[:9])
        assert (reward, terminated, truncated) == (state_reward, state_terminated, state_truncated)
        assert info.keys() == state_info.keys() and info["chunk_steps"] == 2
        assert (info["success"], info["normalized_score"]) == (state_info["success"], state_info["normalized_score"])
    assert obs["pixels"].std() > 10  # a picture, not a blank image
    assert not np.array_equal(obs["pixels"], first_pixels)  # the robot moved
    env.close()
    state_env.close()


@needs_egl
def test_kitchen_image_is_upright():
    env = build_env(KITCHEN_PIXELS)
    (image,) = env.reset(seed=0)[0]["pixels"]
    # the upper cabinets (dark blue) fill the top rows, the bright counter top the bottom rows
    assert image[-10:].mean() > image[:10].mean() + 20
    assert image[:10, :, 2].mean() > image[:10, :, 0].mean()  # blue
    env.close()


@needs_egl
def test_robomimic_images_are_robosuites_own_offscreen_render():
    """The images robosuite renders with its own renderer (robomimic's image datasets), upright."""
    env = build_env(CAN_PIXELS)
    env.reset(seed=2)
    obs, *_ = env.step(np.full(7, 0.5))
    reference = build_env(CAN, render_mode="rgb_array")  # robosuite's offscreen renderer (the videos' one)
    reference.reset(seed=0)  # robosuite's reset sets the visualization options, as robomimic's replay does
    sim = reference.unwrapped.env.sim
    sim.set_state_from_flattened(env.simulator_state())
    sim.forward()
    sim._render_context_offscreen.gl_ctx.make_current()  # robosuite's render does not: another context may be current
    for camera, image in zip(PIXEL_TASKS[CAN_PIXELS].cameras, obs["pixels"]):
        np.testing.assert_array_equal(image, sim.render(width=84, height=84, camera_name=camera)[::-1])
    reference.close()
    env.close()


@needs_egl
@pytest.mark.parametrize("pixel_id", [KITCHEN_PIXELS, CAN_PIXELS])
def test_demo_frames_are_the_env_frames_at_the_same_state(pixel_id):
    env = build_env(pixel_id)
    reset_obs, _ = env.reset(seed=0)
    reset_state = env.simulator_state()
    rng = np.random.default_rng(1)
    for _ in range(5):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
    # rendered by another env (another OpenGL context) after setting its simulator to the recorded states
    frames = render_demo_pixels(pixel_id, np.stack([env.simulator_state(), reset_state]))
    np.testing.assert_array_equal(frames[0], obs["pixels"])
    np.testing.assert_array_equal(frames[1], reset_obs["pixels"])
    assert np.abs(frames[0].astype(int) - frames[1]).max() > 50  # the states differ, so do the pictures
    np.testing.assert_array_equal(env.render_pixels(), obs["pixels"])  # this env's context survived the other's
    env.close()


@needs_egl
def test_async_vector_env_batches_dict_observations_and_final_obs(tmp_path):
    code = """
import gymnasium as gym, numpy as np
from utils.envs import make_env
envs = gym.vector.AsyncVectorEnv([make_env("Kitchen-Complete-Pixels-v0", 0, i, 70, capture_video=True, run_name="v")
                                  for i in range(2)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
obs, _ = envs.reset(seed=0)
print(obs["pixels"].shape, obs["pixels"].dtype, obs["state"].shape, obs["state"].dtype)
for _ in range(4):  # 280 steps: FrankaKitchen-v1's time limit
    obs, reward, terminated, truncated, info = envs.step(np.zeros((2, 630)))
print(truncated.tolist(), info["final_info"]["chunk_steps"].tolist(), info["final_obs"][1]["pixels"].shape,
      info["final_obs"][1]["state"].dtype, not np.array_equal(info["final_obs"][1]["pixels"], obs["pixels"][1]))
envs.close()
"""
    env = {key: value for key, value in os.environ.items() if key not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    # its own process group, so that a hang cannot leave the vector env's workers behind
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the vector env hung")
    assert process.returncode == 0, stderr
    assert stdout.splitlines() == [
        "(2, 1, 84, 84, 3) uint8 (2, 9) float32",
        "[True, True] [70, 70] (1, 84, 84, 3) float32 True",  # the final observation, not the reset one
    ]
    assert list((tmp_path / "videos" / "v").glob("*.mp4"))  # env 0 records its observation images


def test_generic_envs_may_have_camera_image_observations():
    class Camera(gym.Env):
        observation_space = pixel_space(2)
        action_space = gym.spaces.Box(-1, 1, (3,))

        def reset(self, *, seed=None, options=None):
            return self.observation_space.sample(), {}

        def step(self, action):
            return self.observation_space.sample(), 1.0, False, False, {}

    env = ScoreInfo(Camera())
    env.reset()
    assert env.step(np.zeros(3))[4]["normalized_score"] == 1.0


# ------------------------------------------------------------------------------------------------ demonstrations
@needs_egl
def test_kitchen_pixel_dataset_is_the_state_dataset_with_images_and_is_cached(small_kitchen_file, cache_dirs,
                                                                              monkeypatch):
    data = load_pixel_dataset(KITCHEN_PIXELS, dataset_path=str(small_kitchen_file))
    state = load_dataset(KITCHEN, dataset_path=str(small_kitchen_file))
    assert data.keys() == {"observations", "actions", "rewards", "terminals", "timeouts", "pixels"}
    assert data["pixels"].shape == (KITCHEN_ROWS, 1, 84, 84, 3) and data["pixels"].dtype == np.uint8
    assert data["observations"].shape == (KITCHEN_ROWS, 9) and data["observations"].dtype == np.float32
    np.testing.assert_array_equal(data["observations"], state["observations"][:, :9])
    for key in ("actions", "rewards", "terminals", "timeouts"):
        np.testing.assert_array_equal(data[key], state[key])
    assert data["terminals"][KITCHEN_ROWS // 2 - 1] and data["terminals"].sum() == 1
    # row i is rendered from row i's qpos (the D4RL observation's first 30 entries)
    np.testing.assert_array_equal(render_demo_pixels(KITCHEN_PIXELS, state["observations"][[-1], :30])[0],
                                  data["pixels"][-1])
    assert not np.array_equal(data["pixels"][0], data["pixels"][-1])
    (cache,) = (cache_dirs / "d4rl" / "pixels").glob("*.hdf5")
    assert cache == pixel_cache_path(KITCHEN_PIXELS, state["observations"][:, :30])
    assert not list(cache.parent.glob("*.part"))

    def no_rendering(*args, **kwargs):
        raise AssertionError("the second load must read the cache, not render")

    monkeypatch.setattr(utils.datasets, "_render_pixel_cache", no_rendering)
    again = load_pixel_dataset(KITCHEN_PIXELS, dataset_path=str(small_kitchen_file))
    np.testing.assert_array_equal(again["pixels"], data["pixels"])


@needs_egl
def test_robomimic_pixel_dataset_renders_the_demo_states_and_is_cached(small_can_file, cache_dirs, monkeypatch):
    data = load_pixel_dataset(CAN_PIXELS, dataset_path=str(small_can_file))
    state = read_robomimic(small_can_file, CAN)
    assert data["pixels"].shape == (CAN_ROWS, 2, 84, 84, 3) and data["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(data["observations"], state["observations"][:, :9])
    for key in ("actions", "rewards", "terminals", "timeouts"):
        np.testing.assert_array_equal(data[key], state[key])
    assert "states" not in state  # the state tasks' reader is unchanged
    with h5py.File(small_can_file, "r") as f:
        last_state = f["data/demo_0/states"][-1]
    np.testing.assert_array_equal(render_demo_pixels(CAN_PIXELS, last_state[None])[0], data["pixels"][-1])
    (cache,) = (cache_dirs / "robomimic").glob("*.hdf5")  # next to the generated demonstrations
    monkeypatch.setattr(utils.datasets, "_render_pixel_cache", lambda *args: pytest.fail("rendered twice"))
    np.testing.assert_array_equal(load_pixel_dataset(CAN_PIXELS, dataset_path=str(small_can_file))["pixels"],
                                  data["pixels"])
    assert cache.is_file()


def _load_small_kitchen(path: str) -> int:
    return len(load_pixel_dataset(KITCHEN_PIXELS, dataset_path=path)["pixels"])


def test_runs_started_together_render_once(small_kitchen_file, cache_dirs, monkeypatch):
    """Three processes load the pixel data on first use at once: one renders, the others wait and read its file."""
    def slow_fake_render(path, env_id, states, key):
        with open(cache_dirs / "calls", "a") as calls:
            calls.write("1")
        time.sleep(1.0)
        with h5py.File(path, "w") as f:  # what the renderer writes, with blank images
            f["pixels"] = np.zeros((len(states), 1, 84, 84, 3), np.uint8)
            f.attrs["key"] = key

    monkeypatch.setattr(utils.datasets, "_render_pixel_cache", slow_fake_render)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        sizes = pool.map(_load_small_kitchen, [str(small_kitchen_file)] * 3)
    assert (cache_dirs / "calls").read_text() == "1" and sizes == [KITCHEN_ROWS] * 3


def test_corrupt_cache_is_a_dataset_error_saying_to_delete_it(small_kitchen_file, cache_dirs, monkeypatch):
    states = load_dataset(KITCHEN, dataset_path=str(small_kitchen_file))["observations"][:, :30]
    cache = pixel_cache_path(KITCHEN_PIXELS, states)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # an HDF5 signature, then nothing: a truncated file
    monkeypatch.setattr(utils.datasets, "_render_pixel_cache", lambda *args: pytest.fail("must not render"))
    with pytest.raises(DatasetError, match="corrupt or incomplete. Delete it and run again") as error:
        load_pixel_dataset(KITCHEN_PIXELS, dataset_path=str(small_kitchen_file))
    assert str(cache) in str(error.value)
    with h5py.File(cache, "w") as f:  # a readable file with the wrong contents
        f["pixels"] = np.zeros((3, 1, 84, 84, 3), np.uint8)
    with pytest.raises(DatasetError, match="Delete it and run again"):
        load_pixel_dataset(KITCHEN_PIXELS, dataset_path=str(small_kitchen_file))


def test_robomimic_file_without_states_is_a_dataset_error(small_can_file, tmp_path, cache_dirs):
    path = tmp_path / "no_states.hdf5"
    path.write_bytes(small_can_file.read_bytes())
    with h5py.File(path, "a") as f:
        del f["data/demo_0/states"]
    with pytest.raises(DatasetError, match="lacks states .* Pass a robomimic file that has data/demo_<i>/states"):
        load_pixel_dataset(CAN_PIXELS, dataset_path=str(path))
    assert read_robomimic(path, CAN)["observations"].shape == (CAN_ROWS, 23)  # the state task needs no states


def test_generic_ids_read_pixels_from_the_dataset_file(tmp_path):
    path = tmp_path / "camera.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.ones((5, 4))
        f["actions"] = np.zeros((5, 1))
        f["rewards"] = np.arange(5.0)
        f["terminals"] = np.eye(5, dtype=bool)[-1]
        f["pixels"] = np.full((5, 2, 16, 16, 3), 7, np.uint8)
    data = load_pixel_dataset("Pendulum-v1", dataset_path=str(path))
    assert data["pixels"].shape == (5, 2, 16, 16, 3) and (data["pixels"] == 7).all()
    assert data["observations"].shape == (5, 4) and data["timeouts"].dtype == bool
    with h5py.File(path, "a") as f:
        del f["pixels"]
        f["pixels"] = np.zeros((4, 2, 16, 16, 3), np.uint8)
    with pytest.raises(DatasetError, match=r"pixels has shape \(4, 2, 16, 16, 3\).*5 rows like observations"):
        load_pixel_dataset("Pendulum-v1", dataset_path=str(path))
    with h5py.File(path, "a") as f:
        del f["pixels"]
    with pytest.raises(DatasetError, match="lacks the key 'pixels'"):
        load_pixel_dataset("Pendulum-v1", dataset_path=str(path))

"""The robomimic demonstration generator: its scripted demos succeed and replay, its files are reproducible."""
import json
import multiprocessing
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import utils.make_demos as make_demos
from utils.datasets import EMBEDDED_ROBOMIMIC_DIR, load_dataset, read_robomimic
from utils.envs import ROBOMIMIC_TASKS, import_robosuite, robosuite_kwargs

CAN, SQUARE = "Robomimic-Can-v0", "Robomimic-Square-v0"
SHIPPED = {CAN: EMBEDDED_ROBOMIMIC_DIR / "can_scripted_mh_gen1_seed0_n4.hdf5",
           SQUARE: EMBEDDED_ROBOMIMIC_DIR / "square_scripted_mh_gen1_seed0_n4.hdf5"}


def first_demo(path):
    with h5py.File(path) as f:
        demo = f["data/demo_0"]
        return {key: demo[key][()] for key in ("actions", "rewards", "dones", "states")}


@pytest.mark.parametrize("env_id", [CAN, SQUARE])
def test_shipped_files_are_what_this_generator_version_makes(env_id):
    """Regenerates the shipped file's first demo: a change to an operator that forgot to bump GENERATOR_VERSION (and
    to regenerate the shipped files) fails here."""
    with h5py.File(SHIPPED[env_id]) as f:
        generator = json.loads(f["data"].attrs["generator"])
    assert generator["version"] == make_demos.GENERATOR_VERSION and generator["seed"] == 0
    index = 0
    while (demo := make_demos.run_episode(env_id, 0, index)) is None:
        index += 1
    shipped = first_demo(SHIPPED[env_id])
    np.testing.assert_allclose(demo["actions"], shipped["actions"], atol=1e-6)
    np.testing.assert_array_equal(demo["rewards"], shipped["rewards"])


@pytest.mark.parametrize("env_id", [CAN, SQUARE])
def test_shipped_demos_succeed_and_replay_from_their_recorded_states(env_id):
    """Every shipped demo ends with HOLD_STEPS successful steps; its first state gives its first observation, and its
    actions, replayed open-loop from there, end in the success state again (a few steps later at worst: the gripper's
    internal command is not part of MuJoCo's state)."""
    env = import_robosuite().make(**robosuite_kwargs(ROBOMIMIC_TASKS[env_id].robosuite_env))
    with h5py.File(SHIPPED[env_id]) as f:
        for name in f["data"]:
            demo = f["data"][name]
            rewards, dones = demo["rewards"][()], demo["dones"][()]
            assert len(rewards) <= ROBOMIMIC_TASKS[env_id].max_episode_steps
            np.testing.assert_array_equal(rewards[-make_demos.HOLD_STEPS:], 1.0)
            assert dones[-1] == 1 and dones[:-1].sum() == 0
            assert demo.attrs["num_samples"] == len(rewards) == len(demo["obs/object"]) == len(demo["states"])
        demo = f["data/demo_0"]
        env.reset()
        env.sim.set_state_from_flattened(demo["states"][0])
        env.sim.forward()
        first_obs = env._get_observations(force_update=True)
        np.testing.assert_allclose(first_obs["object-state"], demo["obs/object"][0], atol=1e-6)
        np.testing.assert_allclose(first_obs["robot0_eef_pos"], demo["obs/robot0_eef_pos"][0], atol=1e-6)
        replayed = [env.step(action)[1] for action in demo["actions"][()]]
    assert replayed[-1] == 1.0


def test_shipped_files_read_as_robomimic_files():
    for env_id, path in SHIPPED.items():
        data = read_robomimic(path, env_id)
        assert data["observations"].shape[1] == 23 and data["timeouts"].sum() == 4


def fake_episode(env_id, seed, index):
    """Succeeds on even indices only; the demo's single action records its index."""
    if index % 2:
        return None
    return {"obs": {"object": np.zeros((1, 14))}, "actions": np.full((1, 7), float(index)), "rewards": np.ones(1),
            "dones": np.ones(1), "states": np.zeros((1, 3)), "model_file": "<mujoco/>", "style": "fake"}


@pytest.mark.parametrize("workers", [1, 2])
def test_generate_keeps_successes_in_index_order_whatever_the_workers(workers, tmp_path, monkeypatch):
    monkeypatch.setattr(make_demos, "run_episode", fake_episode)
    path = make_demos.generate(CAN, num_demos=3, seed=0, workers=workers, output=tmp_path / "demos.hdf5")
    with h5py.File(path) as f:
        assert [f[f"data/demo_{i}/actions"][0, 0] for i in range(3)] == [0.0, 2.0, 4.0]
        assert json.loads(f["data"].attrs["generator"])["attempts"] == 5
    assert not list(tmp_path.glob("*.part"))


def test_runs_started_together_generate_the_cache_once(tmp_path, monkeypatch):
    """Three processes load the task's data on first use at once (as three seeds started together do): one generates
    the file, the others wait for it and read it; none fails on a half-written file."""
    monkeypatch.setenv("ROBOMIMIC_DEMO_DIR", str(tmp_path))
    monkeypatch.setattr(make_demos, "run_episode", fake_low_dim_episode)
    real_generate = make_demos.generate

    def slow_generate(env_id, **kwargs):
        with open(tmp_path / "calls", "a") as calls:
            calls.write("1")
        time.sleep(1.0)
        return real_generate(env_id, num_demos=3, workers=1, output=make_demos.demo_path(env_id))

    monkeypatch.setattr(make_demos, "generate", slow_generate)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        sizes = pool.map(load_can_size, range(3))
    assert (tmp_path / "calls").read_text() == "1"
    assert sizes == [3] * 3  # every process read all three one-step demos


def fake_low_dim_episode(env_id, seed, index):
    """fake_episode with every low-dim observation key, so that the scripts' reader accepts its file."""
    demo = fake_episode(env_id, seed, index)
    if demo is not None:
        demo["obs"].update({"robot0_eef_pos": np.zeros((1, 3)), "robot0_eef_quat": np.zeros((1, 4)),
                            "robot0_gripper_qpos": np.zeros((1, 2))})
    return demo


def load_can_size(_):
    return len(load_dataset(CAN, "scripted")["actions"])


def test_generate_gives_up_when_too_few_episodes_succeed(tmp_path, monkeypatch):
    monkeypatch.setattr(make_demos, "run_episode", lambda env_id, seed, index: None)
    with pytest.raises(RuntimeError, match="only 0 of 8"):
        make_demos.generate(CAN, num_demos=2, workers=1, output=tmp_path / "demos.hdf5")
    assert not (tmp_path / "demos.hdf5").exists()


def test_cache_path_is_keyed_by_generator_version_seed_and_size(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBOMIMIC_DEMO_DIR", str(tmp_path))
    path = make_demos.demo_path(SQUARE, seed=4, num_demos=300)
    assert path == tmp_path / f"square_scripted_mh_gen{make_demos.GENERATOR_VERSION}_seed4_n300.hdf5"
    assert make_demos.demo_path(SQUARE, seed=5) != path


def test_cli_refuses_an_unknown_task():
    result = subprocess.run([sys.executable, "-m", "utils.make_demos", "Robomimic-Lift-v0"], capture_output=True,
                            text=True, cwd=EMBEDDED_ROBOMIMIC_DIR.parents[2])
    assert result.returncode == 2 and result.stderr.startswith("error: No scripted operator")
    assert "Traceback" not in result.stderr

import hashlib
import shutil
import subprocess
import urllib.error
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from gymnasium_robotics.envs.franka_kitchen.kitchen_env import OBS_ELEMENT_GOALS, OBS_ELEMENT_INDICES

from utils import datasets
from utils.datasets import D4RL_KITCHEN_FILES, DatasetError, load_dataset, relabel_kitchen_rewards, verify
from utils.envs import KITCHEN_TASKS, build_env

COMPLETE = "Kitchen-Complete-v0"
COMPLETE_NAME, COMPLETE_SIZE, COMPLETE_SHA256 = D4RL_KITCHEN_FILES[COMPLETE]


@pytest.fixture
def no_embedded_copy(monkeypatch, tmp_path):
    """As if the repository shipped no D4RL file, so that a file missing from the folder has to be downloaded."""
    monkeypatch.setattr(datasets, "EMBEDDED_D4RL_DIR", tmp_path / "no-embedded-copy")


def no_download(url, path):
    pytest.fail(f"nothing may be downloaded here, yet {url} was")


def episode_sums(values: np.ndarray, data: dict) -> np.ndarray:
    ends = data["terminals"] | data["timeouts"]
    episode_index = np.concatenate([[0], np.cumsum(ends[:-1])])
    return np.bincount(episode_index, weights=values)


def test_dataset_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    assert datasets.dataset_dir() == Path.home() / ".d4rl" / "datasets"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert datasets.dataset_dir() == tmp_path


def test_real_complete_dataset(monkeypatch, real_complete_file):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(real_complete_file.parent))
    monkeypatch.setattr(datasets, "download", lambda url, path: pytest.fail("the present file must not be downloaded"))
    verify(real_complete_file, D4RL_KITCHEN_FILES[COMPLETE])
    data = load_dataset(COMPLETE)
    assert data["observations"].shape == (3680, 60) and data["observations"].dtype == np.float32
    assert data["actions"].shape == (3680, 9) and data["actions"].dtype == np.float32
    assert data["rewards"].dtype == np.float32
    assert data["terminals"].dtype == bool and data["timeouts"].dtype == bool
    assert data["terminals"].sum() == 19 and not data["timeouts"].any() and data["terminals"][-1]
    # The file's cumulative counts (0..4) become one reward per subtask, four per demonstration.
    assert set(np.unique(data["rewards"])) == {0.0, 1.0}
    np.testing.assert_array_equal(episode_sums(data["rewards"], data), np.full(19, 4.0))
    goal = build_env(COMPLETE).goal
    np.testing.assert_array_equal(data["observations"][:, 30:], np.broadcast_to(goal, (3680, 30)))


def test_relabel_kitchen_rewards():
    labels = np.array([0, 0, 1, 1, 3, 2, 3, 0, 1, 1], dtype=np.float32)
    ends = np.zeros(10, dtype=bool)
    ends[[6, 9]] = True
    # a jump of two pays two, a drop pays nothing, and every episode starts from a label of 0
    np.testing.assert_array_equal(relabel_kitchen_rewards(labels, ends), [0, 0, 1, 0, 2, 0, 1, 0, 1, 0])
    starts_done = np.array([2, 2, 3], dtype=np.float32)
    np.testing.assert_array_equal(relabel_kitchen_rewards(starts_done, np.array([False, False, True])), [2, 0, 1])


def test_embedded_complete_file_loads_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))  # an empty folder
    monkeypatch.setattr(datasets, "download", no_download)
    data = load_dataset(COMPLETE)
    assert data["observations"].shape == (3680, 60) and data["rewards"].sum() == 4 * 19
    assert not any(tmp_path.iterdir())  # read where it ships, not copied into the folder
    assert datasets.EMBEDDED_D4RL_DIR == Path(datasets.__file__).parent / "data" / "d4rl"


def test_embedded_file_is_tracked_by_git():
    embedded = datasets.EMBEDDED_D4RL_DIR / COMPLETE_NAME
    repo = embedded.parents[3]
    if not (repo / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    # exit status 1: no .gitignore rule excludes the file, so `git add` picks it up
    assert subprocess.run(["git", "check-ignore", "-q", str(embedded)], cwd=repo).returncode == 1


def test_folder_copy_takes_precedence_over_the_embedded_one(monkeypatch, tmp_path, real_complete_file):
    shutil.copy(real_complete_file, tmp_path / COMPLETE_NAME)
    damaged = tmp_path / "embedded"
    damaged.mkdir()
    (damaged / COMPLETE_NAME).write_bytes(b"\x00" * COMPLETE_SIZE)
    monkeypatch.setattr(datasets, "EMBEDDED_D4RL_DIR", damaged)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert load_dataset(COMPLETE)["observations"].shape == (3680, 60)  # reading the damaged copy would fail


def test_damaged_embedded_copy_says_how_to_restore_it(monkeypatch, tmp_path):
    (tmp_path / "embedded").mkdir()
    damaged = tmp_path / "embedded" / COMPLETE_NAME
    damaged.write_bytes(b"\x00" * COMPLETE_SIZE)
    monkeypatch.setattr(datasets, "EMBEDDED_D4RL_DIR", damaged.parent)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setattr(datasets, "download", no_download)
    with pytest.raises(DatasetError) as error:
        load_dataset(COMPLETE)
    message = str(error.value)
    assert str(damaged) in message and "git checkout" in message and str(tmp_path / "d4rl") in message


def test_missing_file_and_failing_download(monkeypatch, tmp_path, no_embedded_copy):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setattr(datasets, "D4RL_BASE_URL", (tmp_path / "offline-mirror").as_uri())
    with pytest.raises(DatasetError) as error:
        load_dataset(COMPLETE)
    message = str(error.value)
    assert COMPLETE_NAME in message and COMPLETE_SHA256 in message and str(COMPLETE_SIZE) in message
    assert str(tmp_path / "d4rl") in message and "D4RL_DATASET_DIR" in message
    assert isinstance(error.value.__cause__, urllib.error.URLError)
    assert not any((tmp_path / "d4rl").iterdir())  # no partial download left behind


def test_url_of_the_real_mirror_is_named(monkeypatch, tmp_path):
    def offline(url, path):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "download", offline)
    with pytest.raises(DatasetError, match="no network") as error:
        load_dataset("Kitchen-Mixed-v0")
    message = str(error.value)
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/kitchen/kitchen_microwave_kettle_bottomburner_light-v0.hdf5"
    assert url in message
    assert "a30382a5" in message and "721b" in message and "19560760" in message


def test_corrupt_file_is_reported_not_replaced(monkeypatch, tmp_path):
    corrupt = tmp_path / COMPLETE_NAME
    corrupt.write_bytes(b"\x00" * COMPLETE_SIZE)  # right size, wrong content: only the checksum can tell
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "download", no_download)
    with pytest.raises(DatasetError) as error:
        load_dataset(COMPLETE)  # the folder's copy is used, and reported, even though a good one ships embedded
    message = str(error.value)
    assert "sha256" in message and hashlib.sha256(corrupt.read_bytes()).hexdigest() in message
    assert str(corrupt) in message and "Delete it" in message and str(datasets.EMBEDDED_D4RL_DIR) in message
    assert corrupt.read_bytes() == b"\x00" * COMPLETE_SIZE


def test_corrupt_file_without_embedded_copy_is_to_be_re_downloaded(monkeypatch, tmp_path):
    (tmp_path / "kitchen_microwave_kettle_bottomburner_light-v0.hdf5").write_bytes(b"abc")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "download", no_download)
    with pytest.raises(DatasetError, match="3 bytes.*Delete it and run again to re-download it"):
        load_dataset("Kitchen-Mixed-v0")


def test_truncated_file_fails_on_size(tmp_path):
    short = tmp_path / COMPLETE_NAME
    short.write_bytes(b"abc")
    with pytest.raises(DatasetError, match=f"3 bytes, expected {COMPLETE_SIZE}"):
        verify(short, D4RL_KITCHEN_FILES[COMPLETE])


def test_prefix_suffix_checksum(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"kitchen")
    digest = hashlib.sha256(b"kitchen").hexdigest()
    verify(path, ("blob", 7, (digest[:8], digest[-4:])))
    with pytest.raises(DatasetError, match="sha256"):
        verify(path, ("blob", 7, (digest[:8], "0000" if digest[-4:] != "0000" else "1111")))


def test_download_through_file_url_then_load(monkeypatch, tmp_path, real_complete_file, no_embedded_copy):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(real_complete_file, mirror / COMPLETE_NAME)
    monkeypatch.setattr(datasets, "D4RL_BASE_URL", mirror.as_uri())
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    data = load_dataset(COMPLETE)
    assert (tmp_path / "d4rl" / COMPLETE_NAME).read_bytes() == real_complete_file.read_bytes()
    assert data["observations"].shape == (3680, 60) and data["rewards"].sum() == 4 * 19


def write_hdf5(path, n=5, obs_dim=3, action_dim=1, drop=(), **overrides):
    """Pendulum-v1's dimensions by default."""
    arrays = {
        "observations": np.arange(n * obs_dim, dtype=np.float64).reshape(n, obs_dim),
        "actions": np.ones((n, action_dim), dtype=np.float64),
        "rewards": np.array([0.5, 1.0, 2.0, 0.0, -1.0][:n]),
        "terminals": np.array([0, 1, 0, 0, 0][:n], dtype=bool),
        "timeouts": np.zeros(n, dtype=bool),
        **overrides,
    }
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if key not in drop:
                f.create_dataset(key, data=value)


def test_dataset_path_for_another_env(tmp_path):
    path = tmp_path / "pendulum.hdf5"
    write_hdf5(path, drop=("timeouts",))
    data = load_dataset("Pendulum-v1", dataset_path=str(path))
    assert data["observations"].dtype == np.float32 and data["observations"].shape == (5, 3)
    assert data["actions"].dtype == np.float32 and data["actions"].shape == (5, 1)
    np.testing.assert_array_equal(data["rewards"], [0.5, 1.0, 2.0, 0.0, -1.0])  # not relabelled
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(data["timeouts"], [0, 0, 0, 0, 1])  # the cut-off last episode still ends


def test_dataset_path_for_a_kitchen_id_is_relabelled(tmp_path):
    path = tmp_path / "kitchen.hdf5"
    labels = np.array([0, 1, 1, 2, 0, 0, 1], dtype=np.float32)
    write_hdf5(path, n=7, obs_dim=60, action_dim=9, rewards=labels, terminals=np.eye(7, dtype=bool)[3],
               timeouts=np.zeros(7, bool))
    data = load_dataset(COMPLETE, dataset_path=str(path))
    np.testing.assert_array_equal(data["rewards"], [0, 1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(data["timeouts"], [0, 0, 0, 0, 0, 0, 1])


def test_dataset_path_errors(tmp_path):
    missing_key = tmp_path / "no_actions.hdf5"
    write_hdf5(missing_key, drop=("actions",))
    with pytest.raises(DatasetError, match="actions"):
        load_dataset("Pendulum-v1", dataset_path=str(missing_key))
    ragged = tmp_path / "ragged.hdf5"
    write_hdf5(ragged, rewards=np.zeros(4))
    with pytest.raises(DatasetError, match="rewards has shape"):
        load_dataset("Pendulum-v1", dataset_path=str(ragged))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("Pendulum-v1", dataset_path=str(tmp_path / "nowhere.hdf5"))
    wrong_dim = tmp_path / "kitchen_3d.hdf5"
    write_hdf5(wrong_dim)
    with pytest.raises(DatasetError, match="60-dim"):
        load_dataset(COMPLETE, dataset_path=str(wrong_dim))
    other_task = tmp_path / "kitchen_actions_for_pendulum.hdf5"
    write_hdf5(other_task, action_dim=9)  # the kitchen's actions: loaded for Pendulum-v1, refused before training
    with pytest.raises(DatasetError, match="3-dim observations and 9-dim actions, but Pendulum-v1 has 3 and 1"):
        load_dataset("Pendulum-v1", dataset_path=str(other_task))
    for key, row in (("observations", 3), ("actions", 0), ("rewards", 4)):
        not_finite = tmp_path / f"inf_{key}.hdf5"
        values = {"observations": np.zeros((5, 3)), "actions": np.zeros((5, 1)), "rewards": np.zeros(5)}[key]
        values[row] = np.inf if key == "rewards" else np.nan
        write_hdf5(not_finite, **{key: values})
        with pytest.raises(DatasetError, match=f"{key} holds a non-finite value \\(nan or inf\\) at row {row} "):
            load_dataset("Pendulum-v1", dataset_path=str(not_finite))


@pytest.mark.parametrize("content", ["text", "half of the real file"])
def test_dataset_path_that_is_not_readable_hdf5(tmp_path, real_complete_file, content):
    path = tmp_path / "demos.hdf5"
    real = real_complete_file.read_bytes()
    path.write_bytes(b"observations,actions\n0.1,0.2\n" if content == "text" else real[: len(real) // 2])
    with pytest.raises(DatasetError) as error:
        load_dataset(COMPLETE, dataset_path=str(path))
    message = str(error.value)
    assert f"Cannot read {path} as HDF5" in message and "copy or download it again" in message
    assert "observations, actions, rewards, terminals" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # h5py's OSError summarised, not chained


def test_unknown_env_or_source():
    with pytest.raises(ValueError, match="--dataset-path"):
        load_dataset("Hopper-v5")
    with pytest.raises(ValueError, match="Unknown env id"):
        load_dataset("Kitchen-Nonexistent-v0", dataset_path="demos.hdf5")
    with pytest.raises(ValueError, match="minari"):
        load_dataset(COMPLETE, source="rlds")


def stack(steps):
    """List of (possibly nested dict) observations -> arrays stacked along a new first axis."""
    if isinstance(steps[0], dict):
        return {key: stack([step[key] for step in steps]) for key in steps[0]}
    return np.stack(steps)


def record_episode(env, seed, n_steps, edits, truncate_last):
    """Roll zero actions in a raw FrankaKitchen-v1 env; edits[t] = {task: qpos value} set before step t."""
    from minari.data_collector.episode_buffer import EpisodeBuffer

    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [obs], [], []
    for t in range(n_steps):
        for task, value in edits.get(t, {}).items():
            env.unwrapped.data.qpos[OBS_ELEMENT_INDICES[task]] = value
        action = np.full(9, 0.01 * (t + 1))
        obs, reward, _, _, _ = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
    truncations = [False] * n_steps
    truncations[-1] = truncate_last
    return EpisodeBuffer(
        id=seed,
        seed=seed,
        observations=stack(observations),
        actions=np.stack(actions),
        rewards=rewards,
        terminations=[False] * n_steps,
        truncations=truncations,
        infos={},
    )


def test_minari_kitchen_source(monkeypatch, tmp_path):
    """A tiny local D4RL/kitchen/complete-v2 dataset, recorded like Minari's (tasks never removed, no termination)."""
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    with pytest.raises(DatasetError, match="minari download D4RL/kitchen/complete-v2"):
        load_dataset(COMPLETE, source="minari")

    tasks = KITCHEN_TASKS[COMPLETE]
    env = gym.make(
        "FrankaKitchen-v1", tasks_to_complete=tasks, remove_task_when_completed=False, terminate_on_tasks_completed=False
    )
    opened, closed, kettle = OBS_ELEMENT_GOALS["microwave"], np.zeros(1), OBS_ELEMENT_GOALS["kettle"]
    episodes = [
        record_episode(env, 0, 6, {2: {"microwave": opened}}, truncate_last=True),
        # the microwave is opened, closed again, then the kettle is placed: two subtasks, paid once each
        record_episode(env, 1, 8, {1: {"microwave": opened}, 3: {"microwave": closed}, 5: {"kettle": kettle}}, False),
    ]
    minari.create_dataset_from_buffers(
        "D4RL/kitchen/complete-v2", episodes, env=env, algorithm_name="test", author="test",
        author_email="test@example.com", code_permalink="https://example.com",
    )
    stored = minari.load_dataset("D4RL/kitchen/complete-v2")
    second_stored_rewards = list(stored.iterate_episodes())[1].rewards
    np.testing.assert_array_equal(second_stored_rewards, [0, 1, 1, 0, 0, 1, 1, 1])  # Minari's count of subtasks in place

    data = load_dataset(COMPLETE, source="minari")
    assert data["observations"].shape == (14, 60) and data["observations"].dtype == np.float32
    np.testing.assert_array_equal(data["observations"][:, 30:], np.broadcast_to(build_env(COMPLETE).goal, (14, 30)))
    first_obs = next(stored.iterate_episodes()).observations["observation"]
    np.testing.assert_array_equal(data["observations"][:6, :9], first_obs[:6, :9].astype(np.float32))
    np.testing.assert_array_equal(data["observations"][:6, 9:30], first_obs[:6, 18:39].astype(np.float32))
    np.testing.assert_allclose(data["actions"][:6, 0], 0.01 * np.arange(1, 7), rtol=1e-6)
    np.testing.assert_array_equal(data["rewards"], [0, 0, 1, 0, 0, 0] + [0, 1, 0, 0, 0, 1, 0, 0])
    assert not data["terminals"].any()
    np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), [5, 13])  # both episodes end, even unmarked ones

"""Offline datasets in D4RL's flat layout: D4RL kitchen files (checksummed), Minari kitchen, robomimic HDF5 files
(real ones, or the demonstrations utils/make_demos.py generates), or any D4RL-style HDF5.

Every loader returns float32 observations (N, obs_dim), float32 actions (N, act_dim), float32 rewards (N,) and bool
terminals / timeouts (N,). Episode ends are terminals | timeouts, and the last row always ends an episode: if it is
neither, it is marked as a timeout, so that a file cut off mid-episode cannot merge with whatever comes after it.

Kitchen rewards are relabelled to the environment's convention (each subtask pays 1 once, at the step it is
completed): D4RL stores as reward the number of subtasks completed so far, see relabel_kitchen_rewards.

The camera-image tasks (utils.envs.PIXEL_TASKS) take their state task's dataset with every row's camera images
rendered from the demonstration's own simulator state, cached on disk: see load_pixel_dataset.
"""

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import urllib.request
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.envs import (
    BONUS_THRESH,
    KITCHEN_OBS_DIM,
    KITCHEN_QPOS_DIM,
    KITCHEN_TASKS,
    PIXEL_IMAGE_SIZE,
    PIXEL_RENDERER_VERSION,
    PIXEL_STATE_DIM,
    PIXEL_TASKS,
    ROBOMIMIC_OBS_DIM,
    ROBOMIMIC_OBS_KEYS,
    ROBOMIMIC_TASKS,
    ROBOSUITE_VERSION,
    TWO_GOALS_ID,
    build_env,
    check_env_id,
    is_kitchen,
    is_pixels,
    is_robomimic,
    kitchen_goal,
    kitchen_observation,
    state_dims,
)

D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/kitchen"
# env id -> (file name, size in bytes, sha256). Only the first and last hex digits of the partial and mixed files'
# sha256 are known here, so those are checked as a (prefix, suffix) pair together with the exact size.
D4RL_KITCHEN_FILES: dict[str, tuple[str, int, str | tuple[str, str]]] = {
    "Kitchen-Complete-v0": (
        "mini_kitchen_microwave_kettle_light_slider-v0.hdf5",
        556_544,
        "cd797c38cd52dfbe3f960cef73935cc724847abd189e47a703a7a2315ed60a81",
    ),
    "Kitchen-Partial-v0": ("kitchen_microwave_kettle_light_slider-v0.hdf5", 19_558_459, ("57bfd9c5", "9800")),
    "Kitchen-Mixed-v0": ("kitchen_microwave_kettle_bottomburner_light-v0.hdf5", 19_560_760, ("a30382a5", "721b")),
}
# D4RL files shipped with the repository (kitchen-complete only, see utils/data/README.md): used, after the same
# verification, when dataset_dir() lacks them, so that Kitchen-Complete-v0 needs neither network nor setup.
EMBEDDED_D4RL_DIR = Path(__file__).resolve().parent / "data" / "d4rl"
# Small sets of generated robomimic demonstrations shipped for the tests (utils/data/README.md says how they were made).
EMBEDDED_ROBOMIMIC_DIR = Path(__file__).resolve().parent / "data" / "robomimic"
MINARI_KITCHEN_IDS = {
    "Kitchen-Complete-v0": "D4RL/kitchen/complete-v2",
    "Kitchen-Partial-v0": "D4RL/kitchen/partial-v2",
    "Kitchen-Mixed-v0": "D4RL/kitchen/mixed-v2",
}
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
D4RL_LAYOUT = f"a D4RL-layout file holds the arrays {', '.join(REQUIRED_KEYS)} and optionally timeouts"


class DatasetError(RuntimeError):
    """A dataset is missing, cannot be downloaded, fails verification or is malformed."""


def dataset_dir() -> Path:
    """Folder holding the D4RL files: $D4RL_DATASET_DIR, default ~/.d4rl/datasets."""
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def download(url: str, path: Path) -> None:
    """Stream url to path with a progress bar; the data goes to a temporary file renamed at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        # The rename is atomic, so an interrupted download never leaves a file under the final name.
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _describe_sha256(sha256: str | tuple[str, str]) -> str:
    return sha256 if isinstance(sha256, str) else f"starting {sha256[0]} and ending {sha256[1]}"


def verify(path: Path, spec: tuple[str, int, str | tuple[str, str]]) -> None:
    """Check a file's size and sha256 against spec = (name, size, sha256 or (prefix, suffix)); raise DatasetError."""
    _, size, sha256 = spec
    actual_size = Path(path).stat().st_size
    if actual_size != size:
        raise DatasetError(f"{path} has {actual_size} bytes, expected {size}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    actual = digest.hexdigest()
    matches = actual == sha256 if isinstance(sha256, str) else actual.startswith(sha256[0]) and actual.endswith(sha256[1])
    if not matches:
        raise DatasetError(f"{path} has sha256 {actual}, expected {_describe_sha256(sha256)}")


def _d4rl_instructions(env_id: str) -> str:
    name, size, sha256 = D4RL_KITCHEN_FILES[env_id]
    return (
        f"{env_id} needs {name} ({size} bytes, sha256 {_describe_sha256(sha256)}) from {D4RL_BASE_URL}/{name}; "
        f"put it in {dataset_dir()} (or point the D4RL_DATASET_DIR variable at the folder holding it)."
    )


def _fetch_d4rl(env_id: str) -> Path:
    """Path of the verified D4RL file for env_id.

    The file in dataset_dir() if there, else the copy shipped in EMBEDDED_D4RL_DIR, else one downloaded into
    dataset_dir().
    """
    spec = D4RL_KITCHEN_FILES[env_id]
    path, embedded = dataset_dir() / spec[0], EMBEDDED_D4RL_DIR / spec[0]
    if not path.exists() and embedded.is_file():
        path = embedded
    elif not path.exists():
        try:
            download(f"{D4RL_BASE_URL}/{spec[0]}", path)
        except OSError as e:  # urllib's URLError and HTTPError are OSErrors
            raise DatasetError(f"Could not download {spec[0]}: {e}. {_d4rl_instructions(env_id)}") from e
    try:
        verify(path, spec)
    except DatasetError as e:
        # Never replace a bad file silently: it may be a user's copy, or the mirror may be serving bad data.
        if path == embedded:
            fix = f"Restore the repository's copy with `git checkout -- {embedded}`"
        elif embedded.is_file():
            fix = f"Delete it and run again to use the copy shipped in {EMBEDDED_D4RL_DIR}"
        else:
            fix = "Delete it and run again to re-download it"
        raise DatasetError(f"{e}: the file is corrupt or incomplete. {fix}. {_d4rl_instructions(env_id)}") from None
    return path


def _close_last_episode(terminals: np.ndarray, timeouts: np.ndarray) -> None:
    """Mark the last row as a timeout when it is not terminal, so that it ends an episode (in place)."""
    timeouts[-1] |= not terminals[-1]


def relabel_kitchen_rewards(labels: np.ndarray, episode_ends: np.ndarray) -> np.ndarray:
    """Turn per-step counts of subtasks completed so far into per-step rewards for newly completed subtasks.

    r_t = label_t - label_{t-1} within each episode (label before its first step = 0), clipped at 0; an episode ends
    at every row where episode_ends is True.
    """
    previous = np.concatenate([[0.0], labels[:-1]]).astype(np.float32)
    previous[1:][episode_ends[:-1]] = 0.0  # a new episode starts after every end
    return np.clip(labels - previous, 0.0, None).astype(np.float32)


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    """Read a D4RL-layout HDF5 file (timeouts optional) and check its keys and shapes."""
    if not Path(path).is_file():
        raise DatasetError(f"Dataset file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in REQUIRED_KEYS if key not in f]
            if missing:
                raise DatasetError(f"{path} lacks the key(s) {missing}; {D4RL_LAYOUT}")
            data = {key: f[key][()] for key in REQUIRED_KEYS}
            data["timeouts"] = f["timeouts"][()] if "timeouts" in f else np.zeros(len(data["rewards"]), dtype=bool)
    except OSError as e:  # what h5py raises for a file that is not HDF5, or is truncated or damaged
        raise DatasetError(
            f"Cannot read {path} as HDF5 ({e}): it is not an HDF5 file, or it is truncated or damaged. Pass a complete "
            f"HDF5 file instead (copy or download it again); {D4RL_LAYOUT}"
        ) from None
    n = len(data["observations"])
    expected_ndim = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1}
    for key, ndim in expected_ndim.items():
        if data[key].ndim != ndim or len(data[key]) != n:
            raise DatasetError(f"{path}: {key} has shape {data[key].shape}, expected {ndim}-d with {n} rows like observations")
    if n == 0:
        raise DatasetError(f"{path} holds no transitions")
    data = {
        "observations": data["observations"].astype(np.float32),
        "actions": data["actions"].astype(np.float32),
        "rewards": data["rewards"].astype(np.float32),
        "terminals": data["terminals"].astype(bool),
        "timeouts": data["timeouts"].astype(bool),
    }
    _close_last_episode(data["terminals"], data["timeouts"])
    return data


def _relabel_kitchen(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Relabel a D4RL kitchen dataset's cumulative subtask counts into per-step rewards (in place)."""
    if data["observations"].shape[1] != KITCHEN_OBS_DIM:
        raise DatasetError(f"kitchen observations must be {KITCHEN_OBS_DIM}-dim, got {data['observations'].shape[1]}")
    data["rewards"] = relabel_kitchen_rewards(data["rewards"], data["terminals"] | data["timeouts"])
    return data


def minari_kitchen_to_d4rl(episodes, tasks: list[str]) -> dict[str, np.ndarray]:
    """Flatten Minari kitchen episodes (FrankaKitchen-v1 dict observations) into the D4RL layout.

    Minari's kitchen datasets were recorded with remove_task_when_completed=False, so their reward is the number of
    target subtasks currently within BONUS_THRESH of their goal, which drops when an object leaves it. The
    per-subtask achieved_goal entries give the D4RL label instead (subtasks completed at least once so far).
    """
    goal = kitchen_goal(tasks)
    parts = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for episode in episodes:
        obs = episode.observations
        # Minari stores T + 1 observations (the last one follows the last action); reward t is judged on obs t + 1.
        completed_once = [
            np.logical_or.accumulate(
                np.linalg.norm(obs["achieved_goal"][task][1:] - obs["desired_goal"][task][1:], axis=-1) < BONUS_THRESH
            )
            for task in tasks
        ]
        labels = np.sum(completed_once, axis=0).astype(np.float32)
        terminals = np.asarray(episode.terminations, dtype=bool)
        timeouts = np.asarray(episode.truncations, dtype=bool)
        _close_last_episode(terminals, timeouts)
        parts["observations"].append(kitchen_observation(obs["observation"][:-1], goal))
        parts["actions"].append(np.asarray(episode.actions, dtype=np.float32))
        parts["rewards"].append(relabel_kitchen_rewards(labels, terminals | timeouts))
        parts["terminals"].append(terminals)
        parts["timeouts"].append(timeouts)
    return {key: np.concatenate(values) for key, values in parts.items()}


def _load_minari(env_id: str) -> dict[str, np.ndarray]:
    import minari  # only this source needs it

    minari_id = MINARI_KITCHEN_IDS[env_id]
    try:
        dataset = minari.load_dataset(minari_id)
    except FileNotFoundError as e:
        raise DatasetError(
            f"Minari dataset {minari_id} is not available locally ({e}). Run `minari download {minari_id}` where you "
            "have internet access and copy the dataset folder here (see the MINARI_DATASETS_PATH variable)."
        ) from e
    return minari_kitchen_to_d4rl(dataset.iterate_episodes(), KITCHEN_TASKS[env_id])


def _natural_key(name: str) -> tuple:
    """demo_2 before demo_10: robomimic names its episodes demo_<integer>."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def check_robomimic_env_args(env_args: dict, env_id: str, path: Path) -> None:
    """Raise DatasetError unless a robomimic file's env metadata is env_id's task as the env here builds it."""
    expected = ROBOMIMIC_TASKS[env_id].robosuite_env
    kwargs = env_args.get("env_kwargs", {})
    problems = []
    if env_args.get("env_name") != expected:
        problems.append(f"it holds demonstrations of {env_args.get('env_name')!r}, {env_id} is robosuite's {expected!r}")
    if env_args.get("env_version") != ROBOSUITE_VERSION:
        problems.append(f"it was recorded with robosuite {env_args.get('env_version')}, this env is robosuite "
                        f"{ROBOSUITE_VERSION} (robomimic's *_v141.hdf5 files)")
    controller = kwargs.get("controller_configs", {}).get("type")
    if controller != "OSC_POSE":
        problems.append(f"its actions are for the {controller} controller, this env uses OSC_POSE")
    if kwargs.get("control_freq") != 20:
        problems.append(f"it was recorded at {kwargs.get('control_freq')} Hz, this env runs at 20 Hz")
    if problems:
        raise DatasetError(f"{path} does not match {env_id}: {'; '.join(problems)}. Pass the matching robomimic file "
                           "(e.g. can/mh/low_dim_v141.hdf5 for Robomimic-Can-v0, square/mh/low_dim_v141.hdf5 for "
                           "Robomimic-Square-v0), or leave --dataset-path out to use the generated demonstrations.")


def read_robomimic(path: Path, env_id: str, states: bool = False) -> dict[str, np.ndarray]:
    """Read a robomimic low-dim HDF5 file into the flat layout, after checking its env metadata against env_id.

    Observations concatenate ROBOMIMIC_OBS_KEYS in that order; episodes (data/demo_<i>, in the order of i) never
    terminate (DPPO's protocol): each one's last step is a timeout. Rewards are the file's (1 in the success state).
    With states=True the result also holds "states", float64 (N, 1 + nq + nv): each row's robosuite simulator state
    (data/demo_<i>/states, recorded before the row's action like its observation); a file without them is a
    DatasetError.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Dataset file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "env_args" not in f["data"].attrs:
                raise DatasetError(f"{path} is not a robomimic file: it has no data group with an env_args attribute")
            check_robomimic_env_args(json.loads(f["data"].attrs["env_args"]), env_id, path)
            names = sorted((name for name in f["data"] if name.startswith("demo")), key=_natural_key)
            if not names:
                raise DatasetError(f"{path} holds no demonstrations (no data/demo_<i> groups)")
            parts = {key: [] for key in ("observations", "actions", "rewards", "timeouts", "states")}
            for name in names:
                demo = f["data"][name]
                missing = [f"obs/{key}" for key in ROBOMIMIC_OBS_KEYS if f"obs/{key}" not in demo]
                missing += [key for key in ("actions", "rewards") if key not in demo]
                if missing:
                    raise DatasetError(f"{path}: data/{name} lacks {missing}; a robomimic low-dim file has them")
                if states and "states" not in demo:
                    raise DatasetError(
                        f"{path}: data/{name} lacks states (robosuite's flattened simulator states), which the camera "
                        "images are rendered from. Pass a robomimic file that has data/demo_<i>/states (robomimic's "
                        "released files and utils/make_demos.py's have them), or leave --dataset-path out to use the "
                        "generated demonstrations."
                    )
                parts["observations"].append(np.concatenate([demo[f"obs/{key}"][()] for key in ROBOMIMIC_OBS_KEYS], 1))
                parts["actions"].append(demo["actions"][()])
                parts["rewards"].append(demo["rewards"][()])
                if states:
                    parts["states"].append(demo["states"][()])
                    if len(parts["states"][-1]) != len(demo["actions"]):
                        raise DatasetError(f"{path}: data/{name} has {len(parts['states'][-1])} states for "
                                           f"{len(demo['actions'])} actions; each step has one of each")
                timeouts = np.zeros(len(demo["actions"]), dtype=bool)
                timeouts[-1] = True
                parts["timeouts"].append(timeouts)
    except OSError as e:  # what h5py raises for a file that is not HDF5, or is truncated or damaged
        raise DatasetError(f"Cannot read {path} as HDF5 ({e}): it is truncated or damaged. Copy or generate it "
                           "again.") from None
    data = {key: np.concatenate(value) for key, value in parts.items() if value}
    if data["observations"].shape[1] != ROBOMIMIC_OBS_DIM:
        raise DatasetError(f"{path}: the observation keys {ROBOMIMIC_OBS_KEYS} add up to "
                           f"{data['observations'].shape[1]} dims, {env_id} has {ROBOMIMIC_OBS_DIM}")
    result = {
        "observations": data["observations"].astype(np.float32),
        "actions": data["actions"].astype(np.float32),
        "rewards": data["rewards"].astype(np.float32),
        "terminals": np.zeros(len(data["actions"]), dtype=bool),
        "timeouts": data["timeouts"],
    }
    if states:
        result["states"] = data["states"].astype(np.float64)
    return result


def _generated_robomimic(env_id: str) -> Path:
    """The generated demonstrations of env_id (utils/make_demos.py's defaults), generating them on first use."""
    from utils.make_demos import demo_path, generate  # imports robosuite, which only these tasks need

    path = demo_path(env_id)
    message = (f"{env_id}: generating the scripted demonstrations once into {path} (python -m utils.make_demos "
               f"{env_id} does the same; set ROBOMIMIC_DEMO_DIR to put them elsewhere)")
    _create_once(path, partial(generate, env_id), message)
    return path


def _create_once(path: Path, create, message: str) -> None:
    """Prints message and calls create() (which writes path) unless path exists. Under a lock beside path, so that
    runs started together (several seeds, say) create it once: the others wait for it and then read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is writing {path}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(message)
            create()


def _generated_two_goals(source: str) -> Path:
    """TwoGoals-v0's demonstrations (utils/two_goals.py's defaults), generated on first use: a second."""
    from utils.two_goals import demo_path, generate

    if source != "scripted":
        raise ValueError(f"{TWO_GOALS_ID}'s demonstrations are generated (--dataset-source scripted); for a file of "
                         "your own pass --dataset-path")
    path = demo_path()
    _create_once(path, partial(generate, path), f"{TWO_GOALS_ID}: generating the demonstrations once into {path} "
                 "(python -m utils.two_goals does the same; set TWO_GOALS_DEMO_DIR to put them elsewhere)")
    return path


def _robomimic_file(env_id: str, source: str, dataset_path: str | None) -> Path:
    """The robomimic file of a robomimic id: dataset_path if given, else (source "scripted") the generated one."""
    if dataset_path is not None:
        return Path(dataset_path)
    if source != "scripted":
        raise ValueError(f"{env_id}'s built-in demonstrations are the scripted ones (--dataset-source scripted); "
                         "for a robomimic file pass --dataset-path")
    return _generated_robomimic(env_id)


def load_dataset(env_id: str, source: str = "d4rl", dataset_path: str | None = None) -> dict[str, np.ndarray]:
    """Load an offline dataset in D4RL's flat layout (see the module docstring).

    dataset_path: a D4RL-layout HDF5 file, no checksum; rewards are relabelled only for kitchen ids (D4RL's kitchen
    format); for robomimic ids a robomimic HDF5 file. Otherwise, for kitchen ids, source "d4rl" (verified file from
    dataset_dir(), else shipped with the repository, else downloaded) or "minari" (local Minari dataset); for
    robomimic ids source "scripted": the demonstrations of utils/make_demos.py (generated on first use); for
    TwoGoals-v0 source "scripted": those of utils/two_goals.py (generated on first use).
    The result is checked before anything trains on it: every value finite, and the env's dimensions (check_dataset).
    """
    check_env_id(env_id, has_dataset_path=dataset_path is not None)
    if is_pixels(env_id):
        raise ValueError(f"{env_id} is a camera-image task: load its demonstrations with load_pixel_dataset (the "
                         f"*_pixels.py scripts); its state task is {PIXEL_TASKS[env_id].state_env_id}")
    if is_robomimic(env_id):
        data = read_robomimic(_robomimic_file(env_id, source, dataset_path), env_id)
    elif dataset_path is not None:
        data = _read_hdf5(Path(dataset_path))
        data = _relabel_kitchen(data) if is_kitchen(env_id) else data
    elif env_id == TWO_GOALS_ID:
        data = _read_hdf5(_generated_two_goals(source))
    elif source == "d4rl":
        data = _relabel_kitchen(_read_hdf5(_fetch_d4rl(env_id)))
    elif source == "minari":
        data = _load_minari(env_id)
    else:
        raise ValueError(f"Unknown dataset source {source!r} for {env_id}; use 'd4rl' or 'minari'")
    check_dataset(data, env_id, dataset_path or f"the {source} dataset of {env_id}")
    return data


def check_dataset(data: dict[str, np.ndarray], env_id: str, name: str) -> None:
    """DatasetError unless observations, actions and rewards are finite and the dimensions are env_id's (state_dims)."""
    for key in ("observations", "actions", "rewards"):
        bad_rows = np.flatnonzero(~np.isfinite(data[key].reshape(len(data[key]), -1)).all(1))
        if len(bad_rows):
            raise DatasetError(f"{name}: {key} holds a non-finite value (nan or inf) at row {bad_rows[0]} "
                               f"({len(bad_rows)} rows in all): fix or drop those rows")
    obs_dim, action_dim = state_dims(env_id)
    found = (data["observations"].shape[1], data["actions"].shape[1])
    if found != (obs_dim, action_dim):
        raise DatasetError(f"{name} has {found[0]}-dim observations and {found[1]}-dim actions, but {env_id} has "
                           f"{obs_dim} and {action_dim}: these demonstrations are of another task")


# ------------------------------------------------------------------------------------------------ camera images
PIXEL_CACHE_LAYOUT = "an HDF5 file with a uint8 array pixels (rows, cameras, height, width, 3) and a key attribute"
PIXEL_CACHE_CHUNK = 32  # rows per HDF5 chunk of the cache, and per task of the render workers


def pixel_cache_key(env_id: str, states: np.ndarray) -> str:
    """sha256 of what the camera images of a pixel task's demonstrations depend on: the simulator states rendered
    (float64 bytes and shape), the state task (its model), the cameras, the image size and PIXEL_RENDERER_VERSION."""
    states = np.ascontiguousarray(states, dtype=np.float64)
    task = PIXEL_TASKS[env_id]
    header = json.dumps({"state_env_id": task.state_env_id, "cameras": task.cameras, "size": PIXEL_IMAGE_SIZE,
                         "renderer": PIXEL_RENDERER_VERSION, "shape": states.shape})
    return hashlib.sha256(header.encode() + states.tobytes()).hexdigest()


def pixel_cache_path(env_id: str, states: np.ndarray) -> Path:
    """Where the camera images of env_id's demonstrations with these simulator states are cached: kitchen under
    dataset_dir()/pixels ($D4RL_DATASET_DIR), robomimic next to the generated demonstrations ($ROBOMIMIC_DEMO_DIR)."""
    return _pixel_cache_file(env_id, pixel_cache_key(env_id, states))


def _pixel_cache_file(env_id: str, key: str) -> Path:
    if is_robomimic(PIXEL_TASKS[env_id].state_env_id):
        from utils.make_demos import demo_dir  # imports robosuite, which only these tasks need

        folder = demo_dir()
    else:
        folder = dataset_dir() / "pixels"
    return folder / f"{env_id}_{PIXEL_IMAGE_SIZE}px_{key[:16]}.hdf5"


def _render_rows(env, states: np.ndarray) -> np.ndarray:
    """Put the pixel env's simulator in each of states in turn and render its cameras: (N, cameras, 84, 84, 3)."""
    expected = env.simulator_state().shape[0]
    if states.ndim != 2 or states.shape[1] != expected:
        layout = "1 + nq + nv: time, qpos, qvel" if env.sim is not None else "nq: qpos"
        raise DatasetError(f"The demonstrations' simulator states have shape {states.shape}, the simulator of "
                           f"{env.task.state_env_id} needs (rows, {expected}) ({layout}): they were recorded with "
                           "another model.")
    frames = np.empty((len(states), *env.observation_space["pixels"].shape), dtype=np.uint8)
    for i, state in enumerate(states):
        env.set_simulator_state(state)
        frames[i] = env.render_pixels()
    return frames


_worker_envs = {}  # env id -> this render worker's pixel env, built once per process


def _render_block(arguments: tuple[str, np.ndarray]) -> np.ndarray:
    """_render_rows(env, states) for arguments = (env_id, states) with this process's env: what the pool maps."""
    env_id, states = arguments
    if env_id not in _worker_envs:
        # Reset once, as robomimic does before it replays a state: robosuite's reset hides the visualization sites
        # and places the visual-only objects (model settings, not part of the simulator state).
        _worker_envs[env_id] = build_env(env_id)
        _worker_envs[env_id].reset(seed=0)
    return _render_rows(_worker_envs[env_id], states)


def render_demo_pixels(env_id: str, states: np.ndarray, out=None, progress: bool = False,
                       workers: int = 1) -> np.ndarray:
    """The camera images (N, cameras, 84, 84, 3) uint8 of a pixel task's simulator set to each of states (N, d).

    states are in PixelObservation.simulator_state's layout (kitchen: qpos, 30; robomimic: robosuite's flattened
    state). Rendered with the task's own env: set_simulator_state, then render_pixels, the function the env renders
    its observations with, so that a demonstration's frame equals the env's at the same state.
    out: an array-like (N, cameras, 84, 84, 3) to write into (an HDF5 dataset, say), else a new array is returned.
    workers > 1: render blocks of rows in that many forked processes (each with its own env); only for a process
    that has no OpenGL context yet (the render process of cached_demo_pixels).
    """
    states = np.asarray(states, dtype=np.float64)
    block = PIXEL_CACHE_CHUNK  # rows per task
    blocks = [(env_id, states[start:start + block]) for start in range(0, len(states), block)]
    workers = max(1, min(workers, len(blocks)))
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(_render_block, blocks)  # in order
    else:
        results = map(_render_block, blocks)
    try:
        written = 0
        with tqdm(total=len(states), desc=f"rendering {env_id}", unit="frame", disable=not progress) as bar:
            for frames in results:
                if out is None:
                    out = np.empty((len(states), *frames.shape[1:]), dtype=np.uint8)
                out[written:written + len(frames)] = frames
                written += len(frames)
                bar.update(len(frames))
    finally:
        if workers > 1:
            pool.terminate()
        else:
            env = _worker_envs.pop(env_id, None)  # this process may be one that must not keep a context open
            if env is not None:
                env.close()
    return out


def _render_pixel_file(path: str, env_id: str, states: np.ndarray, key: str) -> None:
    """Render the camera images of states into a new HDF5 file at path (chunked, gzip), with a progress bar, in
    up to 4 processes (one per core)."""
    num_views = len(PIXEL_TASKS[env_id].cameras)
    size = PIXEL_IMAGE_SIZE
    with h5py.File(path, "w") as f:
        pixels = f.create_dataset("pixels", shape=(len(states), num_views, size, size, 3), dtype=np.uint8,
                                  chunks=(min(len(states), PIXEL_CACHE_CHUNK), num_views, size, size, 3),
                                  compression="gzip", compression_opts=4)
        render_demo_pixels(env_id, states, out=pixels, progress=True, workers=min(os.cpu_count() or 1, 4))
        f.attrs["key"] = key
        f.attrs["env_id"] = env_id
        f.attrs["cameras"] = json.dumps(PIXEL_TASKS[env_id].cameras)
        f.attrs["renderer_version"] = PIXEL_RENDERER_VERSION


def _render_pixel_file_main(path: str, env_id: str, states_path: str, key: str, error_path: str) -> None:
    """_render_pixel_file in the render process: the message of an expected error goes to error_path, for the
    caller to raise as a DatasetError."""
    try:
        _render_pixel_file(path, env_id, np.load(states_path), key)
    except (RuntimeError, ValueError) as e:  # DatasetError; no OpenGL backend; states that do not fit the model
        Path(error_path).write_text(str(e))
        raise SystemExit(2)


def _render_pixel_cache(path: Path, env_id: str, states: np.ndarray, key: str) -> None:
    """Render into path (through a partial file renamed at the end) in a new Python process.

    The process that loads the data then never creates an OpenGL context: the env workers it forks later (gymnasium's
    AsyncVectorEnv) start without an inherited EGL display, which some drivers cannot share across fork. (A plain
    `python -c`, not multiprocessing's spawn, which would import the caller's main module again.)
    """
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    states_path = path.with_name(f"{path.name}.{os.getpid()}.states.npy")
    error_path = path.with_name(f"{path.name}.{os.getpid()}.error")
    repo_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    code = "import sys; from utils.datasets import _render_pixel_file_main; _render_pixel_file_main(*sys.argv[1:])"
    try:
        np.save(states_path, states)
        result = subprocess.run([sys.executable, "-c", code, str(partial), env_id, str(states_path), key,
                                 str(error_path)], env=env, cwd=repo_root)
        if result.returncode != 0:
            if error_path.is_file():
                raise DatasetError(error_path.read_text())
            raise DatasetError(f"Rendering the camera images of {env_id} into {path} failed (the render process "
                               f"exited with code {result.returncode}; its error is printed above).")
        os.replace(partial, path)  # atomic: an interrupted render never leaves a file under the final name
    finally:
        for leftover in (partial, states_path, error_path):
            leftover.unlink(missing_ok=True)


def _read_pixel_cache(path: Path, key: str, num_rows: int, env_id: str) -> np.ndarray:
    """The cached images at path, after checking them against what they should hold; DatasetError if corrupt."""
    shape = (num_rows, len(PIXEL_TASKS[env_id].cameras), PIXEL_IMAGE_SIZE, PIXEL_IMAGE_SIZE, 3)
    fix = f"Delete it and run again to render the images anew ({PIXEL_CACHE_LAYOUT})."
    try:
        with h5py.File(path, "r") as f:
            if "pixels" not in f or f.attrs.get("key") != key:
                raise DatasetError(f"The cached camera images {path} are not the ones of these demonstrations (no "
                                   f"pixels array, or another key). {fix}")
            pixels = f["pixels"]
            if pixels.shape != shape or pixels.dtype != np.uint8:
                raise DatasetError(f"The cached camera images {path} have shape {pixels.shape} and dtype "
                                   f"{pixels.dtype}, expected {shape} uint8. {fix}")
            return pixels[()]
    except (OSError, KeyError, ValueError) as e:  # h5py: not HDF5, truncated, damaged chunks
        raise DatasetError(f"Cannot read the cached camera images {path} ({e}): the file is corrupt or incomplete. "
                           f"{fix}") from None


def cached_demo_pixels(env_id: str, states: np.ndarray) -> np.ndarray:
    """The camera images of env_id's simulator at each of states (N, d): rendered once (with a progress bar) into
    pixel_cache_path(env_id, states), read from there afterwards.

    Runs started together (several seeds, say) render once: the others wait on a lock for the file.
    """
    states = np.ascontiguousarray(states, dtype=np.float64)
    key = pixel_cache_key(env_id, states)
    path = _pixel_cache_file(env_id, key)
    _create_once(path, partial(_render_pixel_cache, path, env_id, states, key),
                 f"{env_id}: rendering the camera images of {len(states)} demonstration steps once into {path}")
    return _read_pixel_cache(path, key, len(states), env_id)


def _read_pixel_hdf5(path: Path) -> dict[str, np.ndarray]:
    """Read a D4RL-layout HDF5 file plus its uint8 "pixels" array (N, cameras, height, width, 3), "observations"
    being the state; the same checks as _read_hdf5, and pixels' shape."""
    data = _read_hdf5(path)
    layout = f"{D4RL_LAYOUT}, and for camera images a uint8 array pixels (rows, cameras, height, width, 3)"
    try:
        with h5py.File(path, "r") as f:
            if "pixels" not in f:
                raise DatasetError(f"{path} lacks the key 'pixels'; {layout}")
            pixels = f["pixels"]
            n = len(data["observations"])
            if pixels.ndim != 5 or pixels.shape[0] != n or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
                raise DatasetError(f"{path}: pixels has shape {pixels.shape} and dtype {pixels.dtype}, expected "
                                   f"uint8 ({n}, cameras, height, width, 3) with {n} rows like observations; {layout}")
            data["pixels"] = pixels[()]
    except OSError as e:
        raise DatasetError(f"Cannot read the pixels of {path} ({e}): the file is truncated or damaged. Pass a "
                           f"complete HDF5 file instead; {layout}") from None
    return data


def load_pixel_dataset(env_id: str, source: str = "d4rl", dataset_path: str | None = None) -> dict[str, np.ndarray]:
    """Load the demonstrations of a camera-image task with every row's camera images.

    For a pixel id (utils.envs.PIXEL_TASKS): its state task's dataset, from the same source / dataset_path as
    load_dataset takes for the state id (robomimic: source "scripted" or a robomimic file), with "observations" replaced
    by the proprioception (its first PIXEL_STATE_DIM = 9 entries, float32 (N, 9)) and "pixels", uint8
    (N, cameras, 84, 84, 3), rendered from each row's simulator state (kitchen: qpos = the D4RL observation's first
    30 entries, zero velocities; robomimic: data/demo_<i>/states) by the env's own renderer, and cached (see
    cached_demo_pixels). "actions", "rewards", "terminals", "timeouts" are the state dataset's, row for row.

    For another registered Gymnasium id (whose env has a Dict(pixels, state) observation): dataset_path is required,
    a D4RL-layout HDF5 file whose "observations" are the state, plus a uint8 "pixels" (N, cameras, H, W, 3) array.
    """
    check_env_id(env_id, has_dataset_path=dataset_path is not None)
    if is_kitchen(env_id) or is_robomimic(env_id):
        pixel_ids = [pixel_id for pixel_id, task in PIXEL_TASKS.items() if task.state_env_id == env_id]
        raise ValueError(f"{env_id} is a state task; its camera-image version is {pixel_ids[0]}")
    if not is_pixels(env_id):
        return _read_pixel_hdf5(Path(dataset_path))
    state_env_id = PIXEL_TASKS[env_id].state_env_id
    if is_robomimic(state_env_id):
        data = read_robomimic(_robomimic_file(state_env_id, source, dataset_path), state_env_id, states=True)
        states = data.pop("states")
    else:
        data = load_dataset(state_env_id, source, dataset_path)
        states = data["observations"][:, :KITCHEN_QPOS_DIM]  # robot (9) and object (21) joint positions
    data["pixels"] = cached_demo_pixels(env_id, states)
    data["observations"] = np.ascontiguousarray(data["observations"][:, :PIXEL_STATE_DIM])
    return data

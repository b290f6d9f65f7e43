"""Offline datasets in D4RL's flat layout: D4RL kitchen files (checksummed), Minari kitchen, robomimic HDF5 files
(real ones, or the demonstrations utils/make_demos.py generates), or any D4RL-style HDF5.

Every loader returns float32 observations (N, obs_dim), float32 actions (N, act_dim), float32 rewards (N,) and bool
terminals / timeouts (N,). Episode ends are terminals | timeouts, and the last row always ends an episode: if it is
neither, it is marked as a timeout, so that a file cut off mid-episode cannot merge with whatever comes after it.

Kitchen rewards are relabelled to the environment's convention (each subtask pays 1 once, at the step it is
completed): D4RL stores as reward the number of subtasks completed so far, see relabel_kitchen_rewards.
"""

import fcntl
import hashlib
import json
import os
import re
import urllib.request
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.envs import (
    BONUS_THRESH,
    KITCHEN_OBS_DIM,
    KITCHEN_TASKS,
    ROBOMIMIC_OBS_DIM,
    ROBOMIMIC_OBS_KEYS,
    ROBOMIMIC_TASKS,
    ROBOSUITE_VERSION,
    check_env_id,
    is_kitchen,
    is_robomimic,
    kitchen_goal,
    kitchen_observation,
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


def read_robomimic(path: Path, env_id: str) -> dict[str, np.ndarray]:
    """Read a robomimic low-dim HDF5 file into the flat layout, after checking its env metadata against env_id.

    Observations concatenate ROBOMIMIC_OBS_KEYS in that order; episodes (data/demo_<i>, in the order of i) never
    terminate (DPPO's protocol): each one's last step is a timeout. Rewards are the file's (1 in the success state).
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
            parts = {key: [] for key in ("observations", "actions", "rewards", "timeouts")}
            for name in names:
                demo = f["data"][name]
                missing = [f"obs/{key}" for key in ROBOMIMIC_OBS_KEYS if f"obs/{key}" not in demo]
                missing += [key for key in ("actions", "rewards") if key not in demo]
                if missing:
                    raise DatasetError(f"{path}: data/{name} lacks {missing}; a robomimic low-dim file has them")
                parts["observations"].append(np.concatenate([demo[f"obs/{key}"][()] for key in ROBOMIMIC_OBS_KEYS], 1))
                parts["actions"].append(demo["actions"][()])
                parts["rewards"].append(demo["rewards"][()])
                timeouts = np.zeros(len(demo["actions"]), dtype=bool)
                timeouts[-1] = True
                parts["timeouts"].append(timeouts)
    except OSError as e:  # what h5py raises for a file that is not HDF5, or is truncated or damaged
        raise DatasetError(f"Cannot read {path} as HDF5 ({e}): it is truncated or damaged. Copy or generate it "
                           "again.") from None
    data = {key: np.concatenate(value) for key, value in parts.items()}
    if data["observations"].shape[1] != ROBOMIMIC_OBS_DIM:
        raise DatasetError(f"{path}: the observation keys {ROBOMIMIC_OBS_KEYS} add up to "
                           f"{data['observations'].shape[1]} dims, {env_id} has {ROBOMIMIC_OBS_DIM}")
    return {
        "observations": data["observations"].astype(np.float32),
        "actions": data["actions"].astype(np.float32),
        "rewards": data["rewards"].astype(np.float32),
        "terminals": np.zeros(len(data["actions"]), dtype=bool),
        "timeouts": data["timeouts"],
    }


def _generated_robomimic(env_id: str) -> Path:
    """The generated demonstrations of env_id (utils/make_demos.py's defaults), generating them on first use."""
    from utils.make_demos import demo_path, generate  # imports robosuite, which only these tasks need

    path = demo_path(env_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Runs started together (several seeds, say) generate the file once: the others wait for it on this lock.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{env_id}: another process is generating {path}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            print(f"{env_id}: generating the scripted demonstrations once into {path} (python -m utils.make_demos "
                  f"{env_id} does the same; set ROBOMIMIC_DEMO_DIR to put them elsewhere)")
            generate(env_id)
    return path


def load_dataset(env_id: str, source: str = "d4rl", dataset_path: str | None = None) -> dict[str, np.ndarray]:
    """Load an offline dataset in D4RL's flat layout (see the module docstring).

    dataset_path: a D4RL-layout HDF5 file, no checksum; rewards are relabelled only for kitchen ids (D4RL's kitchen
    format); for robomimic ids a robomimic HDF5 file. Otherwise, for kitchen ids, source "d4rl" (verified file from
    dataset_dir(), else shipped with the repository, else downloaded) or "minari" (local Minari dataset); for
    robomimic ids source "scripted": the demonstrations of utils/make_demos.py (generated on first use).
    """
    check_env_id(env_id, has_dataset_path=dataset_path is not None)
    if is_robomimic(env_id):
        if dataset_path is not None:
            return read_robomimic(Path(dataset_path), env_id)
        if source != "scripted":
            raise ValueError(f"{env_id}'s built-in demonstrations are the scripted ones (--dataset-source scripted); "
                             "for a robomimic file pass --dataset-path")
        return read_robomimic(_generated_robomimic(env_id), env_id)
    if dataset_path is not None:
        data = _read_hdf5(Path(dataset_path))
        return _relabel_kitchen(data) if is_kitchen(env_id) else data
    if source == "d4rl":
        return _relabel_kitchen(_read_hdf5(_fetch_d4rl(env_id)))
    if source == "minari":
        return _load_minari(env_id)
    raise ValueError(f"Unknown dataset source {source!r} for {env_id}; use 'd4rl' or 'minari'")

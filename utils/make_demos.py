"""Generate multi-human-style demonstrations of Robomimic-Can-v0 / Robomimic-Square-v0 in robomimic's HDF5 format.

    python -m utils.make_demos Robomimic-Can-v0 [--num-demos 300] [--seed 0] [--workers N] [--output PATH]

robomimic's human datasets cannot be downloaded on every machine, so scripted operators (utils/operator_can.py,
utils/operator_square.py) stand in for its multi-human (MH) operators: several styles, speeds, noise, hesitations and
recovered regrasps. Episodes are attempted in order of their index; an episode is kept only if it reaches the task's
success state and holds it for HOLD_STEPS steps (like robomimic's MH sets, only successful demos, of mixed quality),
until --num-demos are kept. Episode i places the objects with seed (seed, i) and drives its operator with an RNG
seeded by (seed, i), so a file depends only on (GENERATOR_VERSION, seed, number of demos), not on --workers.

Without --output the file goes to the cache, demo_path(env_id, seed), which load_dataset reads (and fills on first
use). The layout is robomimic's: data.attrs["env_args"] (JSON: env_name, env_version, type 1, env_kwargs),
data.attrs["total"], data/demo_<i>/{actions, rewards, dones, states, obs/<key>} with attrs num_samples and
model_file, and mask/{train,valid}. next_obs is not stored (no reader here needs it).
"""
import argparse
import json
import multiprocessing
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from utils.envs import ROBOMIMIC_TASKS, ROBOSUITE_VERSION, import_robosuite, robosuite_kwargs

GENERATOR_VERSION = 1  # bump whenever a change to this file or to an operator changes the demonstrations
HOLD_STEPS = 8  # a demo ends once the success state has held this many steps (DPPO's success needs a 4-step chunk)
DEMO_FILE_PREFIX = {"Robomimic-Can-v0": "can", "Robomimic-Square-v0": "square"}
VALID_FRACTION = 0.1  # robomimic's MH sets hold out 10% of the demos in mask/valid


def operator_class(env_id: str):
    """The scripted operator of env_id's task (imported here: each module imports only numpy)."""
    if env_id == "Robomimic-Can-v0":
        from utils.operator_can import CanOperator

        return CanOperator
    from utils.operator_square import SquareOperator

    return SquareOperator


def demo_dir() -> Path:
    """Folder of the generated demonstrations: $ROBOMIMIC_DEMO_DIR, default ~/.robomimic/generated."""
    return Path(os.environ.get("ROBOMIMIC_DEMO_DIR", "~/.robomimic/generated")).expanduser()


def demo_path(env_id: str, seed: int = 0, num_demos: int = 300) -> Path:
    """The cache file of env_id's generated demonstrations, keyed by the generator's version, seed and size."""
    return demo_dir() / f"{DEMO_FILE_PREFIX[env_id]}_scripted_mh_gen{GENERATOR_VERSION}_seed{seed}_n{num_demos}.hdf5"


def env_args(env_id: str) -> dict:
    """robomimic's data.attrs["env_args"] for env_id's task."""
    kwargs = robosuite_kwargs(ROBOMIMIC_TASKS[env_id].robosuite_env)
    return {"env_name": kwargs.pop("env_name"), "env_version": ROBOSUITE_VERSION, "type": 1, "env_kwargs": kwargs}


_worker_env = {}  # env id -> this process's robosuite env, built once per process


def _robosuite_env(env_id: str):
    if env_id not in _worker_env:
        _worker_env[env_id] = import_robosuite().make(**robosuite_kwargs(ROBOMIMIC_TASKS[env_id].robosuite_env))
    return _worker_env[env_id]


def run_episode(env_id: str, seed: int, index: int) -> dict | None:
    """Attempt episode `index`: the recorded arrays if the operator succeeded within the task's time limit, else None.

    obs[t], states[t] are recorded before actions[t]; rewards[t] (1 in the success state) and dones[t] after it.
    """
    env = _robosuite_env(env_id)
    np.random.seed([seed, index])  # robosuite places the objects with numpy's global RNG
    raw_obs = env.reset()
    operator = operator_class(env_id)(env, np.random.default_rng([seed, index]))
    keys = [key for key in raw_obs if key not in ("object-state", "robot0_proprio-state")]
    record = {"obs": {key: [] for key in [*keys, "object"]}, "actions": [], "rewards": [], "states": []}
    held = 0
    for _ in range(ROBOMIMIC_TASKS[env_id].max_episode_steps):
        for key in keys:
            record["obs"][key].append(raw_obs[key])
        record["obs"]["object"].append(raw_obs["object-state"])
        record["states"].append(env.sim.get_state().flatten())
        action = np.clip(operator.act(raw_obs), -1.0, 1.0)
        raw_obs, reward, _, _ = env.step(action)
        record["actions"].append(action)
        record["rewards"].append(float(reward > 0))
        held = held + 1 if reward > 0 else 0
        if held == HOLD_STEPS:
            break
    if held < HOLD_STEPS:
        return None
    demo = {key: np.asarray(value) for key, value in record.items() if key != "obs"}
    demo["obs"] = {key: np.asarray(value) for key, value in record["obs"].items()}
    demo["dones"] = np.zeros(len(demo["actions"]), dtype=np.int64)
    demo["dones"][-1] = 1
    demo["model_file"] = env.sim.model.get_xml()
    demo["style"] = operator.style
    return demo


def _indexed_episode(arguments: tuple[str, int, int]) -> tuple[int, dict | None]:
    """(index, run_episode(env_id, seed, index)) for arguments = (env_id, seed, index): what the pool maps."""
    return arguments[2], run_episode(*arguments)


def write_demos(path: Path, env_id: str, demos: list[dict], attempts: int, seed: int) -> None:
    """Write demos in robomimic's layout to path (through a temporary file, renamed at the end)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")  # two writers of one file never share a partial file
    try:
        with h5py.File(partial, "w") as f:
            data = f.create_group("data")
            data.attrs["env_args"] = json.dumps(env_args(env_id))
            data.attrs["total"] = sum(len(demo["actions"]) for demo in demos)
            data.attrs["generator"] = json.dumps({"script": "utils/make_demos.py", "version": GENERATOR_VERSION,
                                                  "seed": seed, "attempts": attempts, "kept": len(demos)})
            for i, demo in enumerate(demos):
                group = data.create_group(f"demo_{i}")
                group.attrs["num_samples"] = len(demo["actions"])
                group.attrs["model_file"] = demo["model_file"]
                group.attrs["operator_style"] = demo["style"]
                arrays = {key: demo[key] for key in ("actions", "rewards", "dones", "states")}
                arrays.update({f"obs/{key}": value for key, value in demo["obs"].items()})
                for key, value in arrays.items():  # gzip: a third of the size; h5py and robomimic read it as is
                    group.create_dataset(key, data=value, compression="gzip")
            names = np.array([f"demo_{i}" for i in range(len(demos))], dtype="S")
            num_valid = int(round(VALID_FRACTION * len(demos)))
            f.create_dataset("mask/train", data=names[num_valid:])
            f.create_dataset("mask/valid", data=names[:num_valid])
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def generate(env_id: str, num_demos: int = 300, seed: int = 0, workers: int | None = None,
             output: Path | None = None, max_attempts_per_demo: int = 4) -> Path:
    """Generate num_demos successful demonstrations of env_id into output (default: the cache path); returns it.

    Raises RuntimeError if more than max_attempts_per_demo * num_demos episodes are needed.
    """
    if env_id not in DEMO_FILE_PREFIX:
        raise ValueError(f"No scripted operator for {env_id!r}; choose one of {', '.join(DEMO_FILE_PREFIX)}")
    if num_demos < 1:
        raise ValueError(f"--num-demos must be at least 1, got {num_demos}")
    output = Path(output) if output is not None else demo_path(env_id, seed, num_demos)
    workers = workers or min(os.cpu_count() or 1, 16)
    max_attempts = max_attempts_per_demo * num_demos
    tasks = ((env_id, seed, index) for index in range(max_attempts))
    demos, attempts = [], 0
    with tqdm(total=num_demos, desc=f"generating {output.name}", unit="demo") as bar:
        if workers == 1:
            results = map(_indexed_episode, tasks)
        else:  # imap keeps index order, so the kept demos do not depend on the number of workers
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_indexed_episode, tasks)
        try:
            for index, demo in results:
                attempts = index + 1
                if demo is not None:
                    demos.append(demo)
                    bar.update(1)
                    bar.set_postfix(success_rate=f"{len(demos) / attempts:.2f}")
                if len(demos) == num_demos:
                    break
        finally:
            if workers != 1:
                pool.terminate()
    if len(demos) < num_demos:
        raise RuntimeError(f"only {len(demos)} of {max_attempts} scripted episodes of {env_id} succeeded")
    write_demos(output, env_id, demos, attempts, seed)
    lengths = [len(demo["actions"]) for demo in demos]
    print(f"{env_id}: kept {num_demos} of {attempts} episodes (operator success rate {num_demos / attempts:.2f}), "
          f"{sum(lengths)} transitions, length mean {np.mean(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), "
          f"{output.stat().st_size / 1e6:.1f} MB -> {output}")
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("env_id", help=f"one of {', '.join(DEMO_FILE_PREFIX)}")
    parser.add_argument("--num-demos", type=int, default=300, help="successful demonstrations to keep (can-mh: 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the object placements and the operators")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core, at most 16)")
    parser.add_argument("--output", type=Path, default=None, help="file to write (default: the cache read by the scripts)")
    args = parser.parse_args()
    try:
        generate(args.env_id, args.num_demos, args.seed, args.workers, args.output)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

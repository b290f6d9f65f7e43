"""TwoGoals-v0 (utils/two_goals.py): the task's rewards, terminals and time-outs, its known optimum, and demonstrations
that are multimodal, state-dependent and of mixed quality, served like every other task's; every script on it, and the
picture command of docs/how_otpr_works.md (docs/how_otpr_works.py) on their runs."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from docs import how_otpr_works as pictures
from tests.e2e import ROOT, finish, start
from utils import two_goals as tg
from utils.datasets import load_dataset
from utils.envs import build_env, make_env, state_dims


def drive(env, position, action, steps):
    env.reset(seed=0)
    env.position = np.array(position, dtype=float)
    for _ in range(steps):
        result = env.step(np.asarray(action, dtype=np.float32))
        if result[2] or result[3]:
            break
    return result


def test_the_good_goal_pays_one_the_poor_half_and_both_end_the_episode():
    env = build_env("TwoGoals-v0")
    obs, reward, terminated, truncated, info = drive(env, tg.GOOD - [0.12, 0.0], [1, 0], steps=5)
    assert (reward, terminated, truncated, info["success"], info["normalized_score"]) == (1.0, True, False, True, 100.0)
    obs, reward, terminated, truncated, info = drive(env, tg.POOR + [0.12, 0.0], [-1, 0], steps=5)
    assert (reward, terminated, truncated, info["success"], info["normalized_score"]) == (0.5, True, False, False, 50.0)
    np.testing.assert_allclose(obs, env.position, atol=1e-6)


def test_after_horizon_steps_the_episode_is_cut_off_not_terminated():
    env = build_env("TwoGoals-v0")
    env.reset(seed=0)
    for step in range(1, tg.HORIZON + 1):
        obs, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))  # stays put
        assert not terminated and reward == 0.0 and truncated == (step == tg.HORIZON)
    assert info["normalized_score"] == 0.0 and not info["success"]


def test_an_action_moves_the_point_by_speed_and_is_clipped():
    env = build_env("TwoGoals-v0")
    env.reset(seed=0)
    start = env.position.copy()
    obs, *_ = env.step(np.array([3.0, -0.5], np.float32))
    np.testing.assert_allclose(obs, start + tg.SPEED * np.array([1.0, -0.5]), atol=1e-6)


def test_the_optimum_is_return_one_from_every_start():
    """The score is a fraction of the optimum only if the optimum is 1 wherever the point starts."""
    env = build_env("TwoGoals-v0")
    corners = [(-tg.START, -tg.START), (-tg.START, tg.START), (tg.START, -tg.START), (tg.START, tg.START)]
    for seed in range(200):
        env.reset(seed=seed)
        if seed < len(corners):
            env.position = np.array(corners[seed], dtype=float)
        for step in range(1, tg.HORIZON + 1):
            _, reward, terminated, truncated, info = env.step(tg.optimal_action(env.position))
            if terminated or truncated:
                break
        assert reward == 1.0 and info["success"] and info["normalized_score"] == 100.0
        assert step <= tg.FASTEST_STEPS < tg.HORIZON


def test_the_chunked_env_the_scripts_build_ends_a_chunk_at_the_goal():
    env = make_env("TwoGoals-v0", seed=0, idx=0, act_steps=4)()
    obs, _ = env.reset(seed=0)
    total, chunks = 0.0, 0
    while True:
        chunk = np.concatenate([tg.optimal_action(env.unwrapped.position)] * 4)
        obs, reward, terminated, truncated, info = env.step(chunk)
        total, chunks = total + reward, chunks + 1
        if terminated or truncated:
            break
    assert terminated and total == 1.0 and 1 <= info["chunk_steps"] <= 4 and chunks <= -(-tg.FASTEST_STEPS // 4)
    assert state_dims("TwoGoals-v0") == (env.observation_space.shape[0], env.action_space.shape[0] // 4) == (2, 2)


@pytest.fixture(scope="module")
def demos():
    return load_dataset("TwoGoals-v0", "scripted")  # into conftest's TWO_GOALS_DEMO_DIR


def episodes(data):
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [(data["observations"][s], data["rewards"][s:e + 1].sum(), data["timeouts"][e]) for s, e in zip(starts, ends)]


def test_the_demonstrations_are_multimodal_state_dependent_and_of_mixed_quality(demos):
    rows = episodes(demos)
    assert len(rows) == 200 and len(demos["observations"]) == len(demos["actions"]) == len(demos["rewards"])
    starts = np.array([row[0] for row in rows])
    returns = np.array([row[1] for row in rows])
    timed_out = np.array([row[2] for row in rows])
    good, poor = returns == tg.GOOD_REWARD, returns == tg.POOR_REWARD
    assert set(np.round(returns, 6)) == {0.0, 0.5, 1.0}
    assert 0.3 < good.mean() < 0.6 and 0.3 < poor.mean() < 0.6 and 0.04 < timed_out.mean() < 0.2
    assert (returns[timed_out] == 0).all()  # a dawdler runs out of time, unpaid
    # Both goals from the same starts (multimodal), but the good one more often on the right (state-dependent)
    for side in (starts[:, 0] < 0, starts[:, 0] > 0):
        assert good[side].sum() >= 10 and poor[side].sum() >= 10
    assert good[starts[:, 0] > 0].mean() > good[starts[:, 0] < 0].mean() + 0.1
    # The actions depend on the goal taken: an operator's first move is toward it
    episode_starts = np.concatenate([[0], np.flatnonzero(demos["terminals"] | demos["timeouts"])[:-1] + 1])
    first_action_x = demos["actions"][episode_starts, 0]
    assert (first_action_x[good] > 0).mean() > 0.9 and (first_action_x[poor] < 0).mean() > 0.9
    assert demos["actions"].min() >= -1 and demos["actions"].max() <= 1


def test_the_demonstrations_depend_only_on_the_seed_and_the_generator_command_writes_them(demos, tmp_path):
    path = tg.generate(tmp_path / "a.hdf5", num_demos=200, seed=0)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["observations"][:], demos["observations"])
        np.testing.assert_array_equal(f["actions"][:], demos["actions"])
    done = subprocess.run([sys.executable, "-m", "utils.two_goals", "--num-demos", "3", "--seed", "1", "--output",
                           str(tmp_path / "b.hdf5")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "wrote 3 demonstrations of TwoGoals-v0" in done.stdout
    with h5py.File(tmp_path / "b.hdf5") as f:
        assert (f["terminals"][:] | f["timeouts"][:]).sum() == 3
        assert not np.array_equal(f["observations"][:3], demos["observations"][:3])  # another seed, other starts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.hdf5", "b.hdf5"]  # no temporary file left


def test_only_the_generated_demonstrations_are_built_in():
    with pytest.raises(ValueError, match="--dataset-source scripted"):
        load_dataset("TwoGoals-v0", "d4rl")


SWEEP_LINES = [line.split() for line in (ROOT / "docs" / "sweeps" / "two_goals.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#") and "--seed 1 " in line + " "]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Seed 1's lines of docs/sweeps/two_goals.txt (the five scripts, otpr.py in two more modes), in one folder, with the
    budget cut to 2 iterations and the critic warm-up to none (so that OTPR fits its potentials): the task's settings
    come from each script's TASK_DEFAULTS."""
    folder = tmp_path_factory.mktemp("two_goals_runs")
    processes = []
    for script, *flags in SWEEP_LINES:
        per_iteration = 8 * (40 if script == "dppo_baseline.py" else 10) * 4  # TASK_DEFAULTS: envs x decisions x chunk
        processes.append(start(script, [*flags, "--pretrain-steps", "100", "--total-timesteps", str(2 * per_iteration),
                                        "--eval-episodes", "8", "--eval-frequency", "1", "--critic-warmup-iterations",
                                        "0"], folder))
    return folder, {flags[flags.index("--exp-name") + 1]: finish(process) for (_, *flags), process
                    in zip(SWEEP_LINES, processes)}


def test_the_sweep_runs_every_script_on_it_with_its_task_defaults(short_runs):
    folder, logs = short_runs
    assert sorted(logs) == sorted(pictures.METHODS) and len(SWEEP_LINES) == 7
    for exp_name, log in logs.items():
        (path,) = (folder / "runs").glob(f"TwoGoals-v0__{exp_name}__1__*/summary.json")
        summary = json.loads(path.read_text())
        assert summary["iterations"] == 2 and [entry["iteration"] for entry in summary["history"]] == [0, 1, 2]
        assert 0 <= summary["final"]["normalized_score"] <= 100 and summary["final"]["episodes"] == 8
        assert "torch threads: 1" in log
    assert len(list((folder / "runs" / "pretrained").glob("*.pt"))) == 1  # one pre-trained policy for every method


def test_the_picture_command_draws_every_picture_and_its_numbers(short_runs, tmp_path, monkeypatch):
    folder, _ = short_runs
    monkeypatch.chdir(folder)  # the runs' summaries name their pre-trained file relative to it
    pictures.main(["--runs", str(folder / "runs"), "--skip-sweep", "--out", str(tmp_path)])
    names = ("learning_curves", "rollouts", "candidates", "plan", "plan_unsupervised")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.png" for n in names] + ["numbers.json"])
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    assert sorted(numbers["learning"]) == sorted(pictures.METHODS)
    assert all(entry["seeds"] == 1 for entry in numbers["learning"].values())
    assert len(numbers["rollouts"]) == 1 + len(pictures.METHODS)  # the pre-trained policy, then each fine-tuned one
    assert len(numbers["candidates"]) == len(pictures.STATES)
    for entry in numbers["candidates"]:
        assert 0 <= entry["rightward"] <= 1 and 0 <= entry["selected_by_h"] <= 1
    for plan in (numbers["plan_otpr"], numbers["plan_otpr_u"]):
        assert 0 <= plan["zero_pairs"] < 1 and 0 <= plan["h_rightward_left_states"] <= 1 and plan["fit_steps"] > 0


class Toward:
    """A stand-in policy whose every chunk is the full-speed move toward `goal` from the state (unnormalised)."""

    def __init__(self, goal):
        self.goal = goal

    def sample(self, obs, deterministic=False, generator=None):
        assert deterministic  # rollouts draw the deterministic (DDIM) policy
        direction = torch.as_tensor(self.goal, dtype=torch.float32) - obs
        step = direction / direction.abs().amax(-1, keepdim=True).clamp(min=1e-6)
        return step.repeat(1, 4)


class Identity:
    def normalize(self, x):
        return x

    def unnormalize(self, x):
        return x


def test_rollouts_follow_the_policy_from_each_start_to_the_goal_it_heads_for():
    starts = np.array([[-0.2, -0.2], [0.0, 0.1], [0.25, 0.25]], dtype=np.float32)
    for goal, reward in ((tg.GOOD, tg.GOOD_REWARD), (tg.POOR, tg.POOR_REWARD)):
        paths, returns = pictures.rollouts(Toward(goal), Identity(), Identity(), 4, starts)
        assert (returns == reward).all()
        for path, start_point in zip(paths, starts):
            np.testing.assert_allclose(path[0], start_point)
            assert np.linalg.norm(path[-1] - goal) < tg.RADIUS and len(path) - 1 <= tg.HORIZON


def test_a_chunk_is_rightward_when_its_moves_add_up_to_the_right():
    chunks = np.array([[[1, 1]] * 4, [[-1, 1]] * 4, [[0, 1]] * 4, [[3, 0], [-1, 0], [-1, 0], [0, 0]]], dtype=float)
    # straight up is neither; a move beyond the action bound counts as the env clips it (1 - 1 - 1 < 0)
    np.testing.assert_array_equal(pictures.rightward(chunks), [True, False, False, False])

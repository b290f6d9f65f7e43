"""TwoGoals-v0: a point in the plane and two goals, one worth twice the other. Every script pre-trains and fine-tunes on
it in well under a minute on a CPU, and everything a method does can be drawn in the plane.

    python -m utils.two_goals [--num-demos 200] [--seed 0] [--output PATH]   # the demonstrations (made on first use too)

The task. The point starts uniformly in [-START, START]^2. An action a in [-1, 1]^2 moves it by SPEED * a. Coming
within RADIUS of GOOD pays 1 and ends the episode, within RADIUS of POOR pays 0.5 and ends it (terminal states);
after HORIZON steps without either the episode is cut off (a time-out: the state is not terminal, and a critic must
bootstrap through it). With the scripts' 4-action chunks an episode is 2-5 decisions.

The optimum is known: from the farthest start the good goal is FASTEST_STEPS < HORIZON steps away at full speed, so a
policy that always heads for it returns 1. The score is a percentage of that optimum: normalized_score = 100 * return,
and success means the good goal was reached.

The demonstrations are of mixed quality and multimodal, with actions that depend on the state. Each operator picks a
goal once, at the start: the good one with probability sigmoid(PREFERENCE * x0), so that operators who start on the
right more often take the good goal and those on the left the poor one; then heads for it at a speed of its own, with
noise. A tenth of the operators dawdle (DAWDLE_SPEED) and run out of time. A policy cloned from them scores about 65:
it splits between the goals where the operators did. Fine-tuning should move it to the good goal from every start.
"""
import argparse
import os
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

from utils.runtime import write_atomically

ENV_ID = "TwoGoals-v0"
START = 0.25  # starts are uniform in [-START, START]^2
GOOD, POOR = np.array([0.7, 0.7]), np.array([-0.7, 0.7])
GOOD_REWARD, POOR_REWARD = 1.0, 0.5
RADIUS = 0.1  # a goal is reached within this distance
SPEED = 0.1  # distance moved per step by an action of 1 along an axis
HORIZON = 20  # env steps before the time-out
# Full speed along the diagonal covers SPEED * sqrt(2) per step; from the farthest start (-START, -START):
FASTEST_STEPS = int(np.ceil((np.linalg.norm(GOOD + START) - RADIUS) / (SPEED * np.sqrt(2))))
assert FASTEST_STEPS < HORIZON  # the optimum, return 1, is reachable from every start

PREFERENCE = 4.0  # P(an operator takes the good goal) = sigmoid(PREFERENCE * x0): 27% at x0 = -START, 73% at +START
OPERATOR_SPEEDS = (0.6, 1.0)  # a careful operator's speed, uniform in this range (1: full speed toward the goal)
DAWDLE_FRACTION, DAWDLE_SPEED = 0.1, 0.25  # too slow to arrive within HORIZON steps
ACTION_NOISE = 0.15  # Gaussian, per action dimension
GENERATOR_VERSION = 1  # bump whenever a change here changes the demonstrations


class TwoGoalsEnv(gym.Env):
    """The task of the module docstring. info: "success" (the good goal reached) and "normalized_score" (100 x the
    return so far, the optimum being 1)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.render_mode = render_mode
        self.position, self.steps, self.episode_return = np.zeros(2), 0, 0.0

    def _info(self, reached_good: bool) -> dict:
        return {"success": reached_good, "normalized_score": 100.0 * self.episode_return}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-START, START, 2)
        self.steps, self.episode_return = 0, 0.0
        return self.position.astype(np.float32), self._info(False)

    def step(self, action):
        self.position = self.position + SPEED * np.clip(action, -1.0, 1.0)
        self.steps += 1
        reached_good = np.linalg.norm(self.position - GOOD) < RADIUS
        reached_poor = not reached_good and np.linalg.norm(self.position - POOR) < RADIUS
        reward = GOOD_REWARD if reached_good else POOR_REWARD if reached_poor else 0.0
        self.episode_return += reward
        terminated = bool(reached_good or reached_poor)
        truncated = not terminated and self.steps >= HORIZON
        return self.position.astype(np.float32), reward, terminated, truncated, self._info(bool(reached_good))

    def render(self, size: int = 128) -> np.ndarray:
        """The plane [-1, 1]^2 from above: the good goal green, the poor one orange, the point black."""
        image = np.full((size, size, 3), 255, np.uint8)
        grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size)[::-1]), -1) + 0.5) / size * 2 - 1  # (y, x)
        for centre, colour, radius in ((GOOD, (40, 160, 40), RADIUS), (POOR, (230, 130, 20), RADIUS),
                                       (self.position, (0, 0, 0), 0.03)):
            image[np.linalg.norm(grid - centre, axis=-1) < radius] = colour
        return image


def optimal_action(position: np.ndarray) -> np.ndarray:
    """Full speed toward the good goal (each axis at the largest step that does not overshoot it)."""
    return np.clip((GOOD - position) / SPEED, -1.0, 1.0)


# ------------------------------------------------------------------------------------------------ demonstrations
def operator_episode(rng: np.random.Generator) -> dict:
    """One operator's episode: a goal drawn at the start (sigmoid(PREFERENCE * x0) for the good one), a speed, noise."""
    env = TwoGoalsEnv()
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    goal = GOOD if rng.random() < 1 / (1 + np.exp(-PREFERENCE * obs[0])) else POOR
    speed = DAWDLE_SPEED if rng.random() < DAWDLE_FRACTION else rng.uniform(*OPERATOR_SPEEDS)
    rows = {"observations": [], "actions": [], "rewards": [], "terminals": [], "timeouts": []}
    done = False
    while not done:
        direction = (goal - env.position) / np.linalg.norm(goal - env.position)
        action = np.clip(speed * direction + ACTION_NOISE * rng.normal(size=2), -1.0, 1.0)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (obs, action, reward, terminated, truncated)):
            rows[key].append(value)
        obs, done = next_obs, terminated or truncated
    return rows


def generate(output: Path, num_demos: int = 200, seed: int = 0) -> Path:
    """Writes num_demos operator episodes in D4RL's flat HDF5 layout (observations, actions, rewards, terminals,
    timeouts) to output, through a temporary file so that a reader never sees half of it."""
    rng = np.random.default_rng(seed)
    episodes = [operator_episode(rng) for _ in range(num_demos)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(path: Path):
        with h5py.File(path, "w") as f:
            for key, dtype in (("observations", np.float32), ("actions", np.float32), ("rewards", np.float32),
                               ("terminals", bool), ("timeouts", bool)):
                f[key] = np.concatenate([np.asarray(episode[key], dtype) for episode in episodes])
            f.attrs["generator_version"], f.attrs["seed"] = GENERATOR_VERSION, seed

    write_atomically(output, write)
    return output


def demo_path(num_demos: int = 200, seed: int = 0) -> Path:
    """The cache file the scripts read, keyed by the generator's version, seed and size (under TWO_GOALS_DEMO_DIR,
    else ~/.cache/otpr/two_goals)."""
    folder = Path(os.environ.get("TWO_GOALS_DEMO_DIR", Path.home() / ".cache" / "otpr" / "two_goals"))
    return folder / f"two_goals_v{GENERATOR_VERSION}_seed{seed}_{num_demos}.hdf5"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-demos", type=int, default=200, help="operator episodes to record")
    parser.add_argument("--seed", type=int, default=0, help="seed of the operators and their starts")
    parser.add_argument("--output", type=Path, default=None, help="file to write (default: the cache the scripts read)")
    args = parser.parse_args()
    if args.num_demos < 1:
        parser.error(f"--num-demos must be at least 1, got {args.num_demos}")
    path = generate(args.output or demo_path(args.num_demos, args.seed), args.num_demos, args.seed)
    print(f"wrote {args.num_demos} demonstrations of {ENV_ID} to {path}")


if __name__ == "__main__":
    main()

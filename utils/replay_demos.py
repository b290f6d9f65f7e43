"""Replays every demonstration's actions open-loop in FrankaKitchen-v1 and counts the subtasks completed.

    python -m utils.replay_demos --env-id Kitchen-Complete-v0

The D4RL demonstrations were recorded in D4RL's own kitchen; how many subtasks their actions still complete here
measures the dynamics gap that a behaviour-cloned policy starts from.
"""
import argparse

import numpy as np

from utils.datasets import load_dataset
from utils.envs import build_env


def replay(env_id: str, seed: int = 0) -> list[int]:
    data = load_dataset(env_id)
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    env, completed = build_env(env_id), []
    for episode, (start, end) in enumerate(zip(starts, ends)):
        env.reset(seed=seed + episode)
        info = {"subtasks_completed": 0}
        for action in data["actions"][start : end + 1]:
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        completed.append(info["subtasks_completed"])
    return completed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Kitchen-Complete-v0")
    completed = replay(parser.parse_args().env_id)
    print(f"{len(completed)} demonstrations, subtasks completed per replay: {completed}, mean {np.mean(completed):.2f}")

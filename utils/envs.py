"""Environment construction: FrankaKitchen-v1 behind D4RL's kitchen interface, score bookkeeping and action chunks."""

import difflib
import os
from typing import Callable

import gymnasium as gym
import numpy as np
from farama_notifications import notifications

# gymnasium_robotics prints, on import, its farama_notifications entry for the installed version: for 1.4.2 a notice
# that the Adroit hand envs' rewards changed in 1.2.1. Drop that notice only (this project has no Adroit env); any
# other notice still prints.
notifications["gymnasium_robotics"] = {
    version: notice
    for version, notice in notifications.get("gymnasium_robotics", {}).items()
    if not notice.startswith("AdroitHand")
}
import gymnasium_robotics  # noqa: E402
from gymnasium_robotics.envs.franka_kitchen.kitchen_env import (  # noqa: E402
    BONUS_THRESH,  # noqa: F401  (re-exported: utils.datasets must not import gymnasium_robotics before this module)
    OBS_ELEMENT_GOALS,
    OBS_ELEMENT_INDICES,
)

gym.register_envs(gymnasium_robotics)

# Env id (the paper's names for D4RL's kitchen-{complete,partial,mixed}-v0) -> its four subtasks, as FrankaKitchen-v1
# task names.
KITCHEN_TASKS: dict[str, list[str]] = {
    "Kitchen-Complete-v0": ["microwave", "kettle", "light switch", "slide cabinet"],
    "Kitchen-Partial-v0": ["microwave", "kettle", "light switch", "slide cabinet"],
    "Kitchen-Mixed-v0": ["microwave", "kettle", "bottom burner", "light switch"],
}
KITCHEN_QPOS_DIM = 30  # 9 robot joints + 21 object coordinates; D4RL's goal vector is indexed like this qpos
KITCHEN_OBS_DIM = 60  # robot qpos (9) + object qpos (21) + goal (30)
VIDEO_WIDTH, VIDEO_HEIGHT = 320, 240
SUPPORTED_ENVS = (
    f"Supported: {', '.join(KITCHEN_TASKS)}, or any registered Gymnasium id with Box observation and action spaces "
    "together with --dataset-path."
)


def is_kitchen(env_id: str) -> bool:
    """Whether env_id is one of the D4RL kitchen ids served by FrankaKitchen-v1."""
    return env_id in KITCHEN_TASKS


def check_env_id(env_id: str, has_dataset_path: bool) -> None:
    """Raise ValueError unless env_id is a kitchen id, or a registered Gymnasium id and a dataset path is given.

    Looks the id up in Gymnasium's registry only; no env is built.
    """
    if is_kitchen(env_id):
        return
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, [*KITCHEN_TASKS, *gym.registry], n=1, cutoff=0.8)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown env id {env_id!r}.{suggestion} {SUPPORTED_ENVS}")
    if not has_dataset_path:
        raise ValueError(
            f"{env_id} has no built-in dataset (only {', '.join(KITCHEN_TASKS)} do): pass --dataset-path with a "
            "D4RL-layout HDF5 file of its demonstrations."
        )


def kitchen_goal(tasks: list[str]) -> np.ndarray:
    """D4RL's 30-dim goal vector: zero except at each task element's qpos indices, which hold its goal value."""
    goal = np.zeros(KITCHEN_QPOS_DIM, dtype=np.float32)
    for task in tasks:
        goal[OBS_ELEMENT_INDICES[task]] = OBS_ELEMENT_GOALS[task]
    return goal


def kitchen_observation(observation: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Map FrankaKitchen-v1's 59-dim "observation" entries (..., 59) to D4RL's 60-dim layout (..., 60), float32."""
    robot_qpos = observation[..., 0:9]
    object_qpos = observation[..., 18:39]  # skips the 9 robot joint velocities; object velocities are dropped
    goal = np.broadcast_to(goal, robot_qpos.shape[:-1] + goal.shape)
    return np.concatenate([robot_qpos, object_qpos, goal], axis=-1).astype(np.float32)


class KitchenD4RLAdapter(gym.Wrapper):
    """FrankaKitchen-v1 with D4RL's interface: 60-dim float32 observations and one reward per subtask, paid once.

    Adds to every info: "subtasks_completed" (int, so far in this episode), "success" (bool, all tasks done) and
    "normalized_score" (float, 25 per subtask for four tasks, the usual 0-100 kitchen scale).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.tasks = list(env.unwrapped.goal)
        self.goal = kitchen_goal(self.tasks)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (KITCHEN_OBS_DIM,), np.float32)
        self.subtasks_completed = 0

    def _add_score(self, info: dict) -> dict:
        info = dict(info)
        # The raw env hands out its own list and clears it in place on reset: keep a snapshot instead.
        info["episode_task_completions"] = list(info["episode_task_completions"])
        info["subtasks_completed"] = self.subtasks_completed
        info["success"] = self.subtasks_completed == len(self.tasks)
        info["normalized_score"] = 100.0 * self.subtasks_completed / len(self.tasks)
        return info

    def reset(self, **kwargs):
        """Reset the kitchen; the score bookkeeping starts at zero."""
        raw_obs, info = self.env.reset(**kwargs)
        self.subtasks_completed = 0
        return kitchen_observation(raw_obs["observation"], self.goal), self._add_score(info)

    def step(self, action):
        """Step once; the reward is the number of subtasks completed for the first time at this step."""
        raw_obs, _, terminated, truncated, info = self.env.step(action)
        # Derived from the episode's completion list, so a subtask pays once whatever the raw env's removal option.
        completed = len(info["episode_task_completions"])
        reward = float(completed - self.subtasks_completed)
        self.subtasks_completed = completed
        return kitchen_observation(raw_obs["observation"], self.goal), reward, terminated, truncated, self._add_score(info)


class ScoreInfo(gym.Wrapper):
    """Adds "success" and "normalized_score" (undiscounted return so far) to the infos of any Box-space env."""

    def __init__(self, env: gym.Env):
        for kind, space in (("observation", env.observation_space), ("action", env.action_space)):
            if not isinstance(space, gym.spaces.Box):
                env_name = env.spec.id if env.spec else type(env).__name__
                raise ValueError(f"{env_name} has a non-Box {kind} space {space}; only Box spaces are supported")
        super().__init__(env)
        self.episode_return = 0.0

    def _add_score(self, info: dict) -> dict:
        info = dict(info)
        info["success"] = bool(info.get("success", info.get("is_success", False)))
        info["normalized_score"] = self.episode_return
        return info

    def reset(self, **kwargs):
        """Reset the env and the running return."""
        obs, info = self.env.reset(**kwargs)
        self.episode_return = 0.0
        return obs, self._add_score(info)

    def step(self, action):
        """Step once and accumulate the return."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.episode_return += float(reward)
        return obs, reward, terminated, truncated, self._add_score(info)


class ActionChunk(gym.Wrapper):
    """Executes a flat chunk of act_steps actions per step; rewards are summed, the last obs/info is returned.

    The chunk stops early when the episode ends; info["chunk_steps"] says how many env steps actually ran.
    """

    def __init__(self, env: gym.Env, act_steps: int):
        if act_steps < 1:
            raise ValueError(f"act_steps must be >= 1, got {act_steps}")
        super().__init__(env)
        self.act_steps = act_steps
        self.action_shape = env.action_space.shape
        self.action_space = gym.spaces.Box(
            np.tile(env.action_space.low.ravel(), act_steps),
            np.tile(env.action_space.high.ravel(), act_steps),
            dtype=env.action_space.dtype,
        )

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        info["chunk_steps"] = 0  # present on every info, so vector envs always carry the key
        return obs, info

    def step(self, action):
        """Run the chunk's actions in order until it is exhausted or the episode ends."""
        actions = np.asarray(action).reshape((self.act_steps, *self.action_shape))
        total_reward = 0.0
        for chunk_steps, single_action in enumerate(actions, start=1):
            obs, reward, terminated, truncated, info = self.env.step(single_action)
            total_reward += float(reward)
            if terminated or truncated:
                break
        info["chunk_steps"] = chunk_steps
        return obs, total_reward, terminated, truncated, info


def _disable_costly_rendering(model) -> None:
    """Turn off shadows and reflections: they make software/EGL rendering of the kitchen scene several times slower."""
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0.0


def _request_headless_rendering() -> None:
    """Ask for EGL, the OpenGL backend that renders headless (servers, CI), unless the user chose a backend.

    Called only for rendering envs: `import mujoco` with MUJOCO_GL=egl loads libEGL, which machines without it lack.
    This is early enough even after mujoco is imported (also in AsyncVectorEnv workers forked later): gymnasium reads
    MUJOCO_GL when it renders the first frame, and mujoco.egl, imported then, first imports PyOpenGL, which fixes its
    platform from PYOPENGL_PLATFORM (`import mujoco` with MUJOCO_GL unset does not import PyOpenGL).
    """
    if os.environ.setdefault("MUJOCO_GL", "egl") == "egl":
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def build_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """One unchunked env: FrankaKitchen-v1 behind KitchenD4RLAdapter for kitchen ids, else gym.make + ScoreInfo."""
    if render_mode is not None:
        _request_headless_rendering()
    if is_kitchen(env_id):
        render_kwargs = {} if render_mode is None else dict(render_mode=render_mode, width=VIDEO_WIDTH, height=VIDEO_HEIGHT)
        # D4RL's semantics: each subtask pays once and the episode terminates once all four are done
        # (280-step truncation comes from the FrankaKitchen-v1 registration).
        env = gym.make(
            "FrankaKitchen-v1",
            tasks_to_complete=KITCHEN_TASKS[env_id],
            remove_task_when_completed=True,
            terminate_on_tasks_completed=True,
            disable_env_checker=True,  # its warnings about shared observation buffers concern the raw env we wrap
            **render_kwargs,
        )
        if render_mode is not None:
            _disable_costly_rendering(env.unwrapped.model)
        return KitchenD4RLAdapter(env)
    try:
        env = gym.make(env_id, render_mode=render_mode)
    except gym.error.Error as e:
        raise ValueError(f"Cannot create env {env_id!r} ({e}). {SUPPORTED_ENVS}") from e
    return ScoreInfo(env)


def make_env(
    env_id: str, seed: int, idx: int, act_steps: int, capture_video: bool = False, run_name: str = ""
) -> Callable[[], gym.Env]:
    """CleanRL-style thunk: adapted env, videos of env 0 to videos/{run_name}, action chunks, seeded action space."""

    def thunk() -> gym.Env:
        record = capture_video and idx == 0
        env = build_env(env_id, render_mode="rgb_array" if record else None)
        if record:
            # Inside the chunking so that every env step becomes a video frame.
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        env = ActionChunk(env, act_steps)
        env.action_space.seed(seed + idx)
        return env

    return thunk

"""Environment construction: FrankaKitchen-v1 behind D4RL's kitchen interface, robosuite's Can and Square behind
robomimic's low-dim interface with DPPO's protocol, score bookkeeping and action chunks."""

import contextlib
import difflib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RobomimicTask:
    """A robomimic low-dim task: its robosuite env class and DPPO's episode length (env steps)."""

    robosuite_env: str
    max_episode_steps: int


ROBOMIMIC_TASKS: dict[str, RobomimicTask] = {
    "Robomimic-Can-v0": RobomimicTask("PickPlaceCan", 300),
    "Robomimic-Square-v0": RobomimicTask("NutAssemblySquare", 400),
}
# robomimic's low_dim observation, in the order DPPO concatenates it: 3 + 4 + 2 + 14 = 23 dims for Can and Square.
ROBOMIMIC_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
ROBOMIMIC_OBS_DIM, ROBOMIMIC_ACTION_DIM = 23, 7
ROBOSUITE_VERSION = "1.4.1"
SUPPORTED_ENVS = (
    f"Supported: {', '.join([*KITCHEN_TASKS, *ROBOMIMIC_TASKS])}, or any registered Gymnasium id with Box observation "
    "and action spaces together with --dataset-path."
)


def is_kitchen(env_id: str) -> bool:
    """Whether env_id is one of the D4RL kitchen ids served by FrankaKitchen-v1."""
    return env_id in KITCHEN_TASKS


def is_robomimic(env_id: str) -> bool:
    """Whether env_id is one of the robomimic low-dim ids served by robosuite."""
    return env_id in ROBOMIMIC_TASKS


def check_env_id(env_id: str, has_dataset_path: bool) -> None:
    """Raise ValueError unless env_id is a kitchen or robomimic id, or a registered Gymnasium id and a dataset path
    is given.

    Looks the id up in Gymnasium's registry only; no env is built.
    """
    if is_kitchen(env_id) or is_robomimic(env_id):
        return
    if env_id not in gym.registry:
        known = [*KITCHEN_TASKS, *ROBOMIMIC_TASKS, *gym.registry]
        close = difflib.get_close_matches(env_id, known, n=1, cutoff=0.8)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown env id {env_id!r}.{suggestion} {SUPPORTED_ENVS}")
    if not has_dataset_path:
        raise ValueError(
            f"{env_id} has no built-in dataset (only {', '.join([*KITCHEN_TASKS, *ROBOMIMIC_TASKS])} do): pass "
            "--dataset-path with a D4RL-layout HDF5 file of its demonstrations."
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


def import_robosuite():
    """Import robosuite 1.4.1 without its import-time side effects, and return it.

    On import, robosuite forces MUJOCO_GL=egl (its macro MUJOCO_GPU_RENDERING) and loads an EGL context, which fails
    on machines without libEGL even when nothing is rendered; and it warns that no private macro file exists. Unless
    the user has a robosuite/macros_private.py, a stand-in turns GPU rendering off when MUJOCO_GL=disable (or another
    "off" value) is set, so that such machines can run the state tasks, and keeps robosuite's default otherwise.
    """
    if "robosuite" not in sys.modules:
        package = importlib.util.find_spec("robosuite")  # locates the package without importing it
        if package is None:
            raise ModuleNotFoundError(
                f"The robomimic tasks need robosuite=={ROBOSUITE_VERSION}: pip install -r requirements.txt -c constraints.txt"
            )
        has_private_macros = any(
            os.path.exists(os.path.join(folder, "macros_private.py")) for folder in package.submodule_search_locations
        )
        if not has_private_macros and "robosuite.macros_private" not in sys.modules:
            macros = types.ModuleType("robosuite.macros_private")
            gl = os.environ.get("MUJOCO_GL", "").lower()
            macros.MUJOCO_GPU_RENDERING = gl not in ("disable", "disabled", "off", "false", "0")
            sys.modules["robosuite.macros_private"] = macros
    import robosuite

    return robosuite


def robosuite_kwargs(robosuite_env: str, render: bool = False) -> dict:
    """robosuite.make's arguments for robomimic's low-dim datasets (robomimic v141, DPPO's env metadata): Panda,
    OSC_POSE deltas, 20 Hz control, sparse reward, no horizon (truncation is the wrapper's)."""
    robosuite = import_robosuite()
    return dict(
        env_name=robosuite_env,
        robots="Panda",
        controller_configs=robosuite.load_controller_config(default_controller="OSC_POSE"),
        has_renderer=False,
        has_offscreen_renderer=render,
        use_camera_obs=False,
        use_object_obs=True,
        reward_shaping=False,
        control_freq=20,
        ignore_done=True,
        # Objects are re-placed on every reset either way; a hard reset would also rebuild the model (slower).
        hard_reset=False,
    )


@contextlib.contextmanager
def _global_numpy_rng(rng: np.random.RandomState):
    """Let code that draws from numpy's global RNG (robosuite's object placement) draw from rng instead."""
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


def robomimic_observation(raw_obs: dict) -> np.ndarray:
    """robomimic's low-dim vector from robosuite's observation dict: its "object" key is robosuite's object-state."""
    parts = [raw_obs["object-state" if key == "object" else key] for key in ROBOMIMIC_OBS_KEYS]
    return np.concatenate(parts, axis=-1).astype(np.float32)


class RobomimicLowDim(gym.Env):
    """robosuite's Can or Square task with Gymnasium's API and robomimic's 23-dim low-dim observation.

    Reward: robosuite's sparse reward, 1 on every step in the task's success state. Episodes never terminate (DPPO's
    protocol; the time limit is make_env's). Infos carry "success_state" (this step) and "success" /
    "normalized_score" (some step so far was a success, 100 if so); ChunkSuccess refines them to DPPO's rule.
    Resets are seeded: reset(seed=s) fixes the object placement of this and the following resets.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, env_id: str, render_mode: str | None = None, camera: str = "agentview"):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        robosuite = import_robosuite()
        self.task = ROBOMIMIC_TASKS[env_id]
        self.env = robosuite.make(**robosuite_kwargs(self.task.robosuite_env, render=render_mode is not None))
        if render_mode is not None:
            _disable_costly_rendering(self.env.sim.model._model)
        self.render_mode, self.camera = render_mode, camera
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (ROBOMIMIC_OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ROBOMIMIC_ACTION_DIM,), np.float32)
        self.placement_rng = np.random.RandomState()
        self.succeeded = False

    def _info(self, success_state: bool) -> dict:
        self.succeeded |= success_state
        return {"success_state": success_state, "success": self.succeeded, "normalized_score": 100.0 * self.succeeded}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset robosuite with the objects placed by this env's own RNG (seeded by `seed` when given)."""
        super().reset(seed=seed)
        if seed is not None:
            self.placement_rng = np.random.RandomState(seed)
        with _global_numpy_rng(self.placement_rng):
            raw_obs = self.env.reset()
        self.succeeded = False
        return robomimic_observation(raw_obs), self._info(bool(self.env._check_success()))

    def step(self, action):
        """One 20 Hz control step; robosuite's own done flag is ignored (ignore_done) and never terminates."""
        raw_obs, reward, _, _ = self.env.step(np.asarray(action, dtype=np.float64))
        return robomimic_observation(raw_obs), float(reward), False, False, self._info(bool(reward > 0))

    def render(self):
        """The camera's image (height, width, 3), uint8, upright."""
        frame = self.env.sim.render(width=VIDEO_WIDTH, height=VIDEO_HEIGHT, camera_name=self.camera)
        return frame[::-1]

    def close(self):
        self.env.close()


class ChunkSuccess(gym.Wrapper):
    """DPPO's robomimic success rule on a chunked env: an episode succeeds once a chunk of act_steps actions was in
    the success state at every step (chunk reward = act_steps). Sets info "success" and "normalized_score" (100 if
    success) on every step.
    """

    def __init__(self, env: gym.Env, act_steps: int):
        super().__init__(env)
        self.act_steps = act_steps
        self.succeeded = False

    def _score(self, info: dict) -> dict:
        info["success"] = self.succeeded
        info["normalized_score"] = 100.0 * self.succeeded
        return info

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.succeeded = False
        return obs, self._score(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.succeeded |= reward >= self.act_steps
        return obs, reward, terminated, truncated, self._score(info)


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
    """One unchunked env: FrankaKitchen-v1 behind KitchenD4RLAdapter for kitchen ids, robosuite behind
    RobomimicLowDim and DPPO's time limit for robomimic ids, else gym.make + ScoreInfo."""
    if render_mode is not None:
        _request_headless_rendering()
    if is_robomimic(env_id):
        return gym.wrappers.TimeLimit(RobomimicLowDim(env_id, render_mode), ROBOMIMIC_TASKS[env_id].max_episode_steps)
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
    """CleanRL-style thunk: adapted env, videos of env 0 to videos/{run_name}, action chunks (with DPPO's success
    rule for robomimic ids), seeded action space."""

    def thunk() -> gym.Env:
        record = capture_video and idx == 0
        env = build_env(env_id, render_mode="rgb_array" if record else None)
        if record:
            # Inside the chunking so that every env step becomes a video frame.
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        env = ActionChunk(env, act_steps)
        if is_robomimic(env_id):
            env = ChunkSuccess(env, act_steps)
        env.action_space.seed(seed + idx)
        return env

    return thunk

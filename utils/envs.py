"""Environment construction: FrankaKitchen-v1 behind D4RL's kitchen interface, robosuite's Can and Square behind
robomimic's low-dim interface with DPPO's protocol, the small TwoGoals-v0 task (utils/two_goals.py), score bookkeeping
and action chunks; and the camera-image versions of the robot tasks (the *-Pixels-v0 ids: Dict(pixels, state)
observations rendered offscreen by MuJoCo)."""

import atexit
import contextlib
import difflib
import importlib.util
import multiprocessing
import os
import signal
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import mujoco
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

from utils.two_goals import ENV_ID as TWO_GOALS_ID, TwoGoalsEnv  # noqa: E402

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
KITCHEN_ACTION_DIM = 9  # the Franka arm's 7 joint velocities and its 2 gripper fingers
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


@dataclass(frozen=True)
class PixelTask:
    """A camera-image version of a kitchen or robomimic task: the state task it renders, and its cameras (the order of
    the observation's images). A camera is a camera of the task's MuJoCo model, or a name in FREE_CAMERAS."""

    state_env_id: str
    cameras: tuple[str, ...]


# Free (non-model) camera poses, in MjvCamera's terms. The kitchen model's own cameras (left_cap, right_cap) look at the
# counter from the side and miss most of the scene. "kitchen_overview" is the camera D4RL renders the kitchen with
# (the FrankaKitchen-v1 default: azimuth 70, elevation -35, looking at (-0.2, 0.5, 2.0)), pulled back from 2.2 m to
# 2.5 m so that the square image holds the robot, the microwave, the kettle on the stove, the knob panel with the
# light switch and both upper cabinets (the slide cabinet's door too, open or closed).
FREE_CAMERAS: dict[str, dict] = {
    "kitchen_overview": dict(distance=2.5, azimuth=70.0, elevation=-35.0, lookat=(-0.2, 0.5, 2.0)),
}
PIXEL_TASKS: dict[str, PixelTask] = {
    "Kitchen-Complete-Pixels-v0": PixelTask("Kitchen-Complete-v0", ("kitchen_overview",)),
    "Kitchen-Partial-Pixels-v0": PixelTask("Kitchen-Partial-v0", ("kitchen_overview",)),
    "Kitchen-Mixed-Pixels-v0": PixelTask("Kitchen-Mixed-v0", ("kitchen_overview",)),
    # robomimic's image datasets: the front view of the table and the wrist camera.
    "Robomimic-Can-Pixels-v0": PixelTask("Robomimic-Can-v0", ("agentview", "robot0_eye_in_hand")),
    "Robomimic-Square-Pixels-v0": PixelTask("Robomimic-Square-v0", ("agentview", "robot0_eye_in_hand")),
}
PIXEL_IMAGE_SIZE = 84  # square images, as robomimic's image datasets have them
PIXEL_STATE_DIM = 9  # proprioception: kitchen robot joint positions; robomimic eef pos (3), eef quat (4), gripper (2)
# Bump whenever a change here changes the rendered images (cameras, scene options): it keys the demonstrations'
# cached images (utils.datasets.load_pixel_dataset), so that stale caches are rendered anew.
PIXEL_RENDERER_VERSION = 1
_GL_OFF = ("disable", "disabled", "off", "false", "0")
BUILT_IN_IDS = [*KITCHEN_TASKS, *ROBOMIMIC_TASKS, TWO_GOALS_ID, *PIXEL_TASKS]  # the ids with their own data
SUPPORTED_ENVS = (
    f"Supported: {', '.join(BUILT_IN_IDS)}, or any registered Gymnasium id with "
    "Box observation and action spaces together with --dataset-path (for the camera-image scripts: a Dict(pixels, "
    "state) observation)."
)


def is_kitchen(env_id: str) -> bool:
    """Whether env_id is one of the D4RL kitchen ids served by FrankaKitchen-v1."""
    return env_id in KITCHEN_TASKS


def is_robomimic(env_id: str) -> bool:
    """Whether env_id is one of the robomimic low-dim ids served by robosuite."""
    return env_id in ROBOMIMIC_TASKS


def is_pixels(env_id: str) -> bool:
    """Whether env_id is the camera-image version of a kitchen or robomimic task (a key of PIXEL_TASKS)."""
    return env_id in PIXEL_TASKS


def check_env_id(env_id: str, has_dataset_path: bool) -> None:
    """Raise ValueError unless env_id is a kitchen, robomimic (state or camera images) or TwoGoals-v0 id, or a
    registered Gymnasium id and a dataset path is given.

    Looks the id up in Gymnasium's registry only; no env is built.
    """
    if env_id in BUILT_IN_IDS:
        return
    if env_id not in gym.registry:
        known = [*BUILT_IN_IDS, *gym.registry]
        close = difflib.get_close_matches(env_id, known, n=1, cutoff=0.8)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown env id {env_id!r}.{suggestion} {SUPPORTED_ENVS}")
    if not has_dataset_path:
        raise ValueError(
            f"{env_id} has no built-in dataset (only {', '.join(BUILT_IN_IDS)} do): pass --dataset-path with a "
            "D4RL-layout HDF5 file of its demonstrations."
        )


def state_dims(env_id: str) -> tuple[int, int]:
    """(observation dim, action dim) of a state task, the dimensions its demonstrations must have: the built-in ids'
    from their constants, any other Gymnasium id's from its spaces (built once, then closed)."""
    if is_kitchen(env_id):
        return KITCHEN_OBS_DIM, KITCHEN_ACTION_DIM
    if is_robomimic(env_id):
        return ROBOMIMIC_OBS_DIM, ROBOMIMIC_ACTION_DIM
    if env_id == TWO_GOALS_ID:
        return 2, 2
    env = build_env(env_id)
    try:
        return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    finally:
        env.close()


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


def is_pixel_space(space: gym.spaces.Space) -> bool:
    """Whether space is a camera-image observation space: Dict(pixels=Box uint8 (V, H, W, 3), state=Box (d,))."""
    return (
        isinstance(space, gym.spaces.Dict)
        and set(space.spaces) == {"pixels", "state"}
        and isinstance(space["pixels"], gym.spaces.Box)
        and space["pixels"].dtype == np.uint8
        and len(space["pixels"].shape) == 4
        and space["pixels"].shape[-1] == 3
        and isinstance(space["state"], gym.spaces.Box)
        and len(space["state"].shape) == 1
    )


class ScoreInfo(gym.Wrapper):
    """Adds "success" and "normalized_score" (undiscounted return so far) to the infos of any env with Box spaces (or
    a camera-image Dict(pixels, state) observation, see is_pixel_space)."""

    def __init__(self, env: gym.Env):
        for kind, space in (("observation", env.observation_space), ("action", env.action_space)):
            if not isinstance(space, gym.spaces.Box) and not (kind == "observation" and is_pixel_space(space)):
                env_name = env.spec.id if env.spec else type(env).__name__
                raise ValueError(
                    f"{env_name} has a non-Box {kind} space {space}; only Box spaces are supported (and, for the "
                    "camera-image scripts, Dict(pixels=Box uint8 (cameras, height, width, 3), state=Box (d,)) "
                    "observations)"
                )
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


_live_renderers = weakref.WeakSet()  # the CameraRenderers not closed yet, closed at exit
_renderers_closed_at_exit = False


class CameraRenderer:
    """Offscreen MuJoCo renderer of a fixed list of cameras of one simulator (an MjModel and its MjData).

    Uses gymnasium's OffScreenViewer, whose OpenGL backend is MUJOCO_GL's (EGL unless the user chose another, see
    _request_headless_rendering), with shadows and reflections off (_disable_costly_rendering). A camera is a camera of
    the model or a name in FREE_CAMERAS. hidden_geom_groups: geom groups not drawn (robosuite's offscreen renderer
    hides group 0, the collision meshes). Several renderers may live in one process: each makes its own OpenGL
    context current before drawing, and close() frees its MuJoCo and OpenGL contexts together.

    The OpenGL context is created by the first render(), not here: gymnasium's AsyncVectorEnv builds one env in the
    main process (for its spaces) before it forks the workers, and a worker forked after its parent initialized EGL
    hangs (Mesa's rendering threads do not survive a fork). So a process that has rendered must not fork env workers.
    """

    def __init__(self, model, data, cameras: tuple[str, ...], size: int, hidden_geom_groups: tuple[int, ...] = ()):
        if os.environ.get("MUJOCO_GL", "egl").lower() in _GL_OFF:
            raise RuntimeError(
                f"Camera images need offscreen rendering, but MUJOCO_GL={os.environ['MUJOCO_GL']} turns it off: unset "
                "MUJOCO_GL (EGL is used) or set it to egl or osmesa."
            )
        self.model, self.data, self.cameras, self.size = model, data, tuple(cameras), size
        self.hidden_geom_groups = tuple(hidden_geom_groups)
        self.camera_ids = []
        for camera in self.cameras:
            camera_id = -1 if camera in FREE_CAMERAS else mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            if camera not in FREE_CAMERAS and camera_id < 0:
                raise ValueError(f"The model has no camera {camera!r} (and it is not one of FREE_CAMERAS)")
            self.camera_ids.append(camera_id)
        _disable_costly_rendering(model)
        # The offscreen buffer only needs the image's size; the models' defaults (up to 2560 x 1920, multisampled)
        # make reading the pixels back several times slower.
        model.vis.global_.offwidth, model.vis.global_.offheight = size, size
        self.viewer = None

    def _open(self):
        """Create the OpenGL context and gymnasium's OffScreenViewer on it."""
        from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer  # imports glfw: only renderers need it

        try:
            viewer = OffScreenViewer(self.model, self.data, self.size, self.size)
        except Exception as e:  # libEGL missing, no GPU/driver for the backend, ...
            raise RuntimeError(
                f"Cannot create an offscreen OpenGL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({e!r}). "
                "Camera images need EGL (Debian/Ubuntu: apt-get install libegl1, plus libgl1-mesa-dri on machines "
                "without a GPU) or OSMesa (MUJOCO_GL=osmesa, apt-get install libosmesa6)."
            ) from e
        for group in self.hidden_geom_groups:
            viewer.vopt.geomgroup[group] = 0
        global _renderers_closed_at_exit
        if not _renderers_closed_at_exit:
            # Registered after the first OpenGL context exists, so that it runs before mujoco.egl's own exit handler
            # terminates the EGL display (handlers run last-registered first).
            atexit.register(lambda: [renderer.close() for renderer in list(_live_renderers)])
            _renderers_closed_at_exit = True
        _live_renderers.add(self)
        self.viewer = viewer

    def render(self) -> np.ndarray:
        """The cameras' images of the simulator's current qpos: (cameras, size, size, 3) uint8, upright RGB.

        Recomputes the position-dependent quantities the picture is made of (body, geom and camera poses) from qpos
        first, so that the image depends on qpos alone: after a physics step they lag one substep behind it. This
        leaves the simulation itself alone (the next step recomputes them anyway).
        """
        if self.viewer is None:
            self._open()
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_comPos(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)
        self.viewer.make_context_current()
        images = np.empty((len(self.cameras), self.size, self.size, 3), dtype=np.uint8)
        cam = self.viewer.cam
        for i, (camera, camera_id) in enumerate(zip(self.cameras, self.camera_ids)):
            if camera_id < 0:
                pose = FREE_CAMERAS[camera]
                cam.distance, cam.azimuth, cam.elevation = pose["distance"], pose["azimuth"], pose["elevation"]
                cam.lookat[:] = pose["lookat"]
            images[i] = self.viewer.render("rgb_array", camera_id=camera_id)  # flipped upright by the viewer
        return images

    def close(self) -> None:
        """Free the MuJoCo rendering context in this renderer's own OpenGL context, then the OpenGL context.

        (Freed later by the garbage collector, the MuJoCo context would delete the OpenGL objects of whichever context
        is current then, another renderer's.)
        """
        viewer, self.viewer = getattr(self, "viewer", None), None
        _live_renderers.discard(self)
        if viewer is not None:
            viewer.make_context_current()
            viewer.con.free()
            viewer.free()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the EGL display may already be terminated
            pass


class PixelObservation(gym.Wrapper):
    """A kitchen or robomimic task with camera-image observations: Dict(pixels, state).

    "pixels": (cameras, 84, 84, 3) uint8, upright RGB, one image per camera of PIXEL_TASKS[env_id].cameras, rendered
    by render_pixels from the simulator's state after the step. "state": the state task's observation[:9]
    (PIXEL_STATE_DIM; kitchen: the robot's 9 joint positions, robomimic: robot0_eef_pos, robot0_eef_quat,
    robot0_gripper_qpos), float32. Rewards, terminations and infos are the wrapped env's.

    Wraps the state task's env (built by build_env, possibly chunked: then one frame per chunk). render_pixels is
    also what utils.datasets renders the demonstrations with, after set_simulator_state: a demonstration's frame is
    the env's frame at the same state by construction. With render_mode "rgb_array", render() returns the first
    camera's image of the last observation (what RecordVideo records for these ids).
    """

    def __init__(self, env: gym.Env, env_id: str, render_mode: str | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        super().__init__(env)
        self.task = PIXEL_TASKS[env_id]
        _request_headless_rendering()
        if is_robomimic(self.task.state_env_id):
            self.sim = env.unwrapped.env.sim  # robosuite's MjSim
            model, data, hidden = self.sim.model._model, self.sim.data._data, (0,)  # robosuite hides collision meshes
        else:
            self.sim = None
            model, data, hidden = env.unwrapped.model, env.unwrapped.data, ()
        self.model, self.data = model, data
        self.renderer = CameraRenderer(model, data, self.task.cameras, PIXEL_IMAGE_SIZE, hidden)
        size, views = PIXEL_IMAGE_SIZE, len(self.task.cameras)
        self.observation_space = gym.spaces.Dict(
            {
                "pixels": gym.spaces.Box(0, 255, (views, size, size, 3), np.uint8),
                "state": gym.spaces.Box(-np.inf, np.inf, (PIXEL_STATE_DIM,), np.float32),
            }
        )
        self._render_mode = render_mode
        self.last_pixels = None

    @property
    def render_mode(self) -> str | None:
        return self._render_mode

    def render_pixels(self) -> np.ndarray:
        """The camera images of the simulator in its current state: (cameras, 84, 84, 3) uint8."""
        return self.renderer.render()

    def simulator_state(self) -> np.ndarray:
        """The simulator's state as the task's demonstrations store it (float64): kitchen, qpos (30: the D4RL
        observation's first 30 entries); robomimic, robosuite's flattened state (time, qpos, qvel)."""
        if self.sim is not None:
            return self.sim.get_state().flatten()
        return self.data.qpos.copy()

    def set_simulator_state(self, state: np.ndarray) -> None:
        """Put the simulator in a demonstration's state (simulator_state's layout) and forward it; raises ValueError
        if the state's size does not fit the model. Kitchen velocities are set to zero (D4RL stores none)."""
        state = np.asarray(state, dtype=np.float64)
        if self.sim is not None:
            expected = 1 + self.model.nq + self.model.nv
            if state.shape != (expected,):
                raise ValueError(f"a robosuite state of {self.task.state_env_id} has 1 + nq + nv = {expected} entries "
                                 f"(time, qpos, qvel), got shape {state.shape}")
            self.sim.set_state_from_flattened(state)
            self.sim.forward()
            return
        if state.shape != (self.model.nq,):
            raise ValueError(f"{self.task.state_env_id}'s model has nq = {self.model.nq} joint coordinates, got a "
                             f"qpos of shape {state.shape}")
        self.data.qpos[:] = state
        self.data.qvel[:] = 0.0
        mujoco.mj_forward(self.model, self.data)

    def _observation(self, state_obs: np.ndarray) -> dict:
        self.last_pixels = self.render_pixels()
        state = np.array(state_obs[:PIXEL_STATE_DIM], dtype=np.float32)
        return {"pixels": self.last_pixels, "state": state}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._observation(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._observation(obs), reward, terminated, truncated, info

    def render(self):
        """The first camera's image of the last observation (84, 84, 3), for RecordVideo; None without render_mode."""
        if self._render_mode is None or self.last_pixels is None:
            return None
        return self.last_pixels[0].copy()

    def close(self):
        self.renderer.close()
        super().close()


def build_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    """One unchunked env: FrankaKitchen-v1 behind KitchenD4RLAdapter for kitchen ids, robosuite behind
    RobomimicLowDim and DPPO's time limit for robomimic ids, the state task's env behind PixelObservation for pixel
    ids (render_mode "rgb_array" then returns observation images), TwoGoalsEnv (its own score and time-out) for
    TwoGoals-v0, else gym.make + ScoreInfo."""
    if is_pixels(env_id):
        _request_headless_rendering()  # before robosuite is imported, which fixes its OpenGL backend
        return PixelObservation(build_env(PIXEL_TASKS[env_id].state_env_id), env_id, render_mode)
    if env_id == TWO_GOALS_ID:
        return TwoGoalsEnv(render_mode)
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
    rule for robomimic ids), seeded action space.

    Pixel ids: the state task's chunked env behind PixelObservation, so that the cameras render once per chunk (the
    observation the agent sees); their videos record the first camera's observation images, one frame per chunk.
    """

    def thunk() -> gym.Env:
        if multiprocessing.parent_process() is not None:
            # a worker of AsyncVectorEnv, forked with the run's signal handlers: Ctrl-C reaches the whole process
            # group, and the run's own process stops cleanly (utils/runtime.py RunGuard), then ends this worker
            # with SIGTERM
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        record = capture_video and idx == 0
        if is_pixels(env_id):
            _request_headless_rendering()
            state_env_id = PIXEL_TASKS[env_id].state_env_id
            env = ActionChunk(build_env(state_env_id), act_steps)
            if is_robomimic(state_env_id):
                env = ChunkSuccess(env, act_steps)
            env = PixelObservation(env, env_id, render_mode="rgb_array" if record else None)
            if record:
                fps = max(1, round(env.metadata.get("render_fps", 10) / act_steps))
                env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", fps=fps)
            env.action_space.seed(seed + idx)
            return env
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

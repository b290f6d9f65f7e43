"""A scripted, human-like operator for robosuite's PickPlaceCan task (Panda arm, OSC_POSE delta controller).

It generates multi-human-style demonstrations (in the spirit of robomimic's can-mh): every episode draws an operator
style and per-episode parameters (gain, speed limit, noise, approach height, grasp jitter, pauses, ...) from the
given numpy Generator, so that a demo is reproducible from (env seed, operator rng seed).

    operator = CanOperator(env, np.random.default_rng(seed))   # after env.reset()
    action = operator.act(obs)                                   # (7,) in [-1, 1], once per env step

The operator is a waypoint state machine with a proportional position controller:

    approach (hover above the can, open the gripper) -> descend -> close -> lift -> carry (above the bin target)
    -> lower -> release -> retreat (and hover there)

It reads the can's and the eef's positions from the observation and the target compartment from the env. The
position command is proportional to the error, bounded above by the operator's speed and below by a small creeping
speed, plus Ornstein-Uhlenbeck noise that grows with the commanded speed. Pauses (near-zero motion) start at random.
The hand waits above the can until it is aligned, so that a finger does not land on the rim. A failed lift (the can
does not rise with the gripper) or a drop while carrying is detected from the can's height or its distance to the
gripper; the operator then opens the gripper, rises and grasps again. Some episodes deliberately start with a loose
grasp (the gripper is closed only for a step or two), which such a lift then reveals: a recovered regrasp, as in
human data. Orientation is held at the initial one by a weak proportional term, plus a little noise.
"""
import numpy as np

ROT_SCALE = 0.5  # rad of commanded rotation per unit of rotation action
OPEN, CLOSE, HOLD = -1.0, 1.0, 0.0  # gripper commands: the Panda gripper only uses the sign, 0 keeps the fingers

# Per-style ranges (low, high) of the per-episode parameters, each drawn uniformly:
#   gain          proportional gain, action units per m of position error
#   speed         limit on the norm of the position action (1: about 0.013 m per env step with OSC_POSE)
#   fine_speed    speed limit while going down to the can and into the bin, as a fraction of `speed`
#   noise         stationary std of the Ornstein-Uhlenbeck noise on the position action (action units), of which
#                 only NOISE_FLOOR is left when the hand is still (signal-dependent noise)
#   noise_tau     correlation time of that noise, in env steps
#   hover         height of the approach waypoint above the can's centre (m)
#   grasp_xy      std of the horizontal grasp offset from the can's axis (m)
#   grasp_z       height of the grasp point above the can's centre (m; at about 0.01 the fingers touch the floor)
#   tol           distance at which a waypoint counts as reached (m; twice that for hover, carry and release ones)
#   carry_z       eef height while carrying the can (m, world frame; bins' floors at 0.82, walls' tops at 0.90)
#   release_z     eef height at which the can is released above the target (m)
#   place_xy      std of the random horizontal offset of the release point (m, clipped to PLACE_JITTER_MAX)
#   grasp_wait    env steps the gripper is closed before lifting (the fingers take about 8 to close)
#   pause_rate    probability per env step of starting a pause (near-zero motion)
#   pause_len     length of a pause, env steps
#   loose_prob    probability that the first grasp is loose (closed for LOOSE_CLOSE_STEPS only), to be redone
STYLE_RANGES = {
    "careful": dict(gain=(8.0, 12.0), speed=(0.5, 0.7), fine_speed=(0.5, 0.7), noise=(0.0, 0.04),
                    noise_tau=(5.0, 15.0), hover=(0.08, 0.14), grasp_xy=(0.0, 0.003), grasp_z=(0.015, 0.022),
                    tol=(0.005, 0.01), carry_z=(1.06, 1.12), release_z=(0.93, 0.97), place_xy=(0.0, 0.01),
                    grasp_wait=(10, 16), pause_rate=(0.0, 0.01), pause_len=(3, 8), loose_prob=(0.0, 0.08)),
    "fast": dict(gain=(14.0, 22.0), speed=(0.7, 0.95), fine_speed=(0.6, 0.9), noise=(0.03, 0.08),
                 noise_tau=(3.0, 8.0), hover=(0.05, 0.09), grasp_xy=(0.0, 0.005), grasp_z=(0.015, 0.022),
                 tol=(0.01, 0.02), carry_z=(1.03, 1.08), release_z=(0.97, 1.03), place_xy=(0.0, 0.02),
                 grasp_wait=(8, 11), pause_rate=(0.0, 0.005), pause_len=(2, 5), loose_prob=(0.0, 0.1)),
    "sloppy": dict(gain=(10.0, 18.0), speed=(0.6, 0.9), fine_speed=(0.5, 0.8), noise=(0.08, 0.18),
                   noise_tau=(3.0, 10.0), hover=(0.06, 0.12), grasp_xy=(0.003, 0.008), grasp_z=(0.015, 0.03),
                   tol=(0.008, 0.015), carry_z=(1.03, 1.1), release_z=(0.95, 1.02), place_xy=(0.01, 0.025),
                   grasp_wait=(7, 12), pause_rate=(0.0, 0.01), pause_len=(2, 8), loose_prob=(0.1, 0.25)),
    "hesitant": dict(gain=(7.0, 12.0), speed=(0.65, 0.9), fine_speed=(0.5, 0.7), noise=(0.02, 0.07),
                     noise_tau=(5.0, 12.0), hover=(0.08, 0.15), grasp_xy=(0.0, 0.004), grasp_z=(0.015, 0.022),
                     tol=(0.006, 0.012), carry_z=(1.05, 1.12), release_z=(0.93, 0.99), place_xy=(0.0, 0.015),
                     grasp_wait=(10, 18), pause_rate=(0.008, 0.015), pause_len=(4, 10), loose_prob=(0.0, 0.08)),
}
INT_PARAMS = ("grasp_wait", "pause_len")  # drawn as integers, both ends included

PLACE_MARGIN = np.array([0.065, 0.08])  # nominal offset of the can's release point from its region's low corner (m)
PLACE_JITTER_MAX = 0.015  # bound on the release point's random offset (m): the can (radius 3.3 cm) clears the walls
MIN_SPEED = 0.1  # lower bound on the norm of the position action while a waypoint is not reached
NOISE_FLOOR = 0.3  # fraction of the position noise left when the hand is still (the rest scales with speed)
ROT_GAIN = 0.5  # fraction of the orientation error corrected per env step
ROT_NOISE = 0.01  # std of the white noise on the rotation action (action units)
ALIGN_TOL = 0.006  # horizontal distance (m) to the grasp point within which the open fingers clear the can's rim
ABOVE_CAN = 0.06  # eef height above the can's centre (m) at which the fingertips are just above its top
GRASP_Z_TOL = 0.005  # how far above the grasp height (m) the gripper may close
LIFT_CHECK = 0.04  # eef rise (m) after which a lift is checked: the can must have risen at least half as much
CLEARANCE = 0.08  # can rise (m) above its resting height before carrying it sideways, clear of the bin's walls
DROP_DIST = 0.06  # can-to-gripper distance (m) beyond which a carried can counts as dropped
PHASE_TIMEOUT = 40  # env steps after which a descent is ended where it is (e.g. a finger stuck on the can's rim)
OPEN_WAIT = 8  # env steps to open the gripper fully after a release or a failed grasp
LOOSE_CLOSE_STEPS = (1, 2)  # env steps of closing in a loose grasp (the fingers stop short of the can)


def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a quaternion in robosuite's (x, y, z, w) order."""
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_vector(R: np.ndarray) -> np.ndarray:
    """Axis-angle vector (unit axis times angle) of a rotation matrix whose angle is below pi."""
    angle = np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if angle < 1e-6:
        return 0.5 * axis  # small-angle limit
    return angle * axis / (2.0 * np.sin(angle))


class CanOperator:
    """Scripted PickPlaceCan operator of one of several styles, with per-episode random parameters.

    Styles (their parameter ranges are in STYLE_RANGES):
        careful:  slow and precise, little noise, centred grasps, lowers the can well into the bin before release.
        fast:     quick, high gain, loose tolerances, drops the can from higher up.
        sloppy:   noisy, off-centre and higher grasps, loose tolerances, often a loose first grasp to redo.
        hesitant: moderate speed with frequent pauses, and long waits while closing the gripper.

    The attributes style, params (the drawn parameters) and phase (the state machine's state) describe the episode.

    Args:
        env: the robosuite PickPlaceCan env, just reset (its target bin placement is read once, here).
        rng: the only source of randomness of the operator.
        style: one of STYLES, or None to draw one uniformly from rng.
    """

    STYLES = tuple(STYLE_RANGES)

    def __init__(self, env, rng: np.random.Generator, style: str | None = None):
        if style is None:
            style = self.STYLES[rng.integers(len(self.STYLES))]
        if style not in STYLE_RANGES:
            raise ValueError(f"unknown style {style!r}; expected one of {self.STYLES}")
        self.env = env
        self.rng = rng
        self.style = style
        self.params = {name: (int(rng.integers(low, high + 1)) if name in INT_PARAMS else float(rng.uniform(low, high)))
                       for name, (low, high) in STYLE_RANGES[style].items()}
        # The success region is the can's compartment of bin 2 (a quarter, walled); its far part is out of the
        # Panda's reach at the heights needed to release the can, so the operator aims near its corner closest to
        # the robot, clear of the dividers.
        region_low = env.target_bin_placements[env.object_to_id["can"], :2] - np.asarray(env.bin_size[:2]) / 4.0
        jitter = np.clip(rng.normal(0.0, self.params["place_xy"], 2), -PLACE_JITTER_MAX, PLACE_JITTER_MAX)
        self.place_xy = region_low + PLACE_MARGIN + jitter
        self.init_rot = None  # orientation to hold: the eef's at the first act()
        self.noise = np.zeros(3)  # Ornstein-Uhlenbeck state of the position-action noise
        self.pause_left = 0
        # steps of closing the gripper in the next grasp: the fingers stop short of the can in a loose one
        loose = rng.random() < self.params["loose_prob"]
        self.close_steps = int(rng.integers(*LOOSE_CLOSE_STEPS, endpoint=True)) if loose else self.params["grasp_wait"]
        self.gripper = OPEN
        self._new_grasp_offset()
        self._enter("approach")

    # ------------------------------------------------------------------------------------------------ public
    def act(self, obs: dict) -> np.ndarray:
        """Returns the (7,) action in [-1, 1] for this observation: position deltas, rotation deltas, gripper."""
        eef, can = np.asarray(obs["robot0_eef_pos"], float), np.asarray(obs["Can_pos"], float)
        rot = quat_to_mat(np.asarray(obs["robot0_eef_quat"], float))
        if self.init_rot is None:
            self.init_rot = rot
        self._update_noise()

        if self.pause_left > 0:  # a hesitation: the hand stays (nearly) still and the gripper keeps its command
            self.pause_left -= 1
            pos_action = 0.1 * self.noise
        else:
            if self.rng.random() < self.params["pause_rate"]:
                self.pause_left = self.params["pause_len"]
            target, speed = self._plan(eef, can)
            error = target - eef
            pos_action = self.params["gain"] * error
            # a proportional command bounded by the speed limit, and from below: a person does not creep up to a
            # waypoint exponentially slowly, but moves on at a small speed until (about) there
            norm = np.linalg.norm(pos_action)
            if norm > speed:
                pos_action *= speed / norm
            elif norm < MIN_SPEED and np.linalg.norm(error) > 0.5 * self.params["tol"]:
                pos_action *= MIN_SPEED / norm
            # signal-dependent noise, as in human reaching: fast moves are sloppier than slow, fine ones
            pos_action += self.noise * (NOISE_FLOOR + (1.0 - NOISE_FLOOR) * min(1.0, norm / speed))

        # rotation that takes the current orientation back to the initial one, in the world frame
        rot_error = rotation_vector(self.init_rot @ rot.T)
        rot_action = ROT_GAIN * rot_error / ROT_SCALE + self.rng.normal(0.0, ROT_NOISE, 3)
        return np.clip(np.concatenate([pos_action, rot_action, [self.gripper]]), -1.0, 1.0)

    # ------------------------------------------------------------------------------------------------ internals
    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.steps_in_phase = 0

    def _start_regrasp(self, eef: np.ndarray) -> None:
        self.open_eef = eef.copy()
        self._enter("regrasp")

    def _new_grasp_offset(self) -> None:
        self.grasp_offset = np.append(self.rng.normal(0.0, self.params["grasp_xy"], 2), self.params["grasp_z"])

    def _update_noise(self) -> None:
        # discretised OU process with stationary std `noise` and correlation time `noise_tau` steps
        decay = 1.0 / self.params["noise_tau"]
        self.noise += -decay * self.noise + self.params["noise"] * np.sqrt(2.0 * decay) * self.rng.normal(size=3)

    def _plan(self, eef: np.ndarray, can: np.ndarray) -> tuple[np.ndarray, float]:
        """Advances the state machine and returns the current position target and speed limit."""
        self.steps_in_phase += 1
        p, speed = self.params, self.params["speed"]
        fine = speed * p["fine_speed"]
        timed_out = self.steps_in_phase > PHASE_TIMEOUT

        if self.phase == "approach":
            self.gripper = OPEN
            target = can + self.grasp_offset + [0.0, 0.0, p["hover"]]
            if np.linalg.norm(target - eef) < 2.0 * p["tol"]:
                self._enter("descend")
            return target, speed

        if self.phase == "descend":  # follows the can, in case a finger nudged it
            target = can + self.grasp_offset
            error = target - eef
            if np.linalg.norm(error[:2]) > ALIGN_TOL and eef[2] > can[2] + ABOVE_CAN:
                target[2] = can[2] + ABOVE_CAN  # wait above the can until a finger would not land on its rim
            # close once around the can: near its axis and down to the grasp height (a grasp much higher, at the
            # can's top, slips out while carrying)
            if (np.linalg.norm(error[:2]) < p["tol"] and error[2] > -GRASP_Z_TOL) or timed_out:
                self.grasp_eef, self.grasp_can = eef.copy(), can.copy()
                self._enter("close")
            return target, fine

        if self.phase == "close":  # a loose grasp is lifted after the usual wait: the operator believes it is firm
            self.gripper = CLOSE if self.steps_in_phase <= self.close_steps else HOLD
            if self.steps_in_phase >= p["grasp_wait"]:
                self._enter("lift")
            return self.grasp_eef, fine

        if self.phase == "lift":
            target = np.append(self.grasp_eef[:2], p["carry_z"])
            eef_rise, can_rise = eef[2] - self.grasp_eef[2], can[2] - self.grasp_can[2]
            if eef_rise > LIFT_CHECK and can_rise < 0.5 * eef_rise:
                self._start_regrasp(eef)
            elif can_rise > CLEARANCE:
                self._enter("carry")
            return target, speed

        # while carrying and lowering, the operator watches the can, not the hand: it brings the can over the place
        if self.phase == "carry":
            target = np.append(self.place_xy + eef[:2] - can[:2], p["carry_z"])
            if np.linalg.norm(can - eef) > DROP_DIST:
                self._start_regrasp(eef)
            elif np.linalg.norm(target[:2] - eef[:2]) < 2.0 * p["tol"]:
                self._enter("lower")
            return target, speed

        if self.phase == "lower":
            target = np.append(self.place_xy + eef[:2] - can[:2], p["release_z"])
            # the carried can makes the arm sag a little: reaching the release height is enough, from above or below
            if (np.linalg.norm(target[:2] - eef[:2]) < 2.0 * p["tol"] and eef[2] < p["release_z"] + p["tol"]) \
                    or timed_out:
                self.release_eef = eef.copy()
                self._enter("release")
            return target, fine

        if self.phase == "release":
            self.gripper = OPEN
            if self.steps_in_phase >= OPEN_WAIT:
                self._enter("retreat")
            return self.release_eef, fine

        if self.phase == "retreat":
            return np.append(self.place_xy, p["carry_z"]), fine

        # regrasp: open the gripper where the hand is, then approach the can again with a fresh, firm grasp
        self.gripper = OPEN
        if self.steps_in_phase >= OPEN_WAIT:
            self.close_steps = p["grasp_wait"]
            self._new_grasp_offset()
            self._enter("approach")
        return self.open_eef, fine

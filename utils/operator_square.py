"""A scripted, human-like operator for robosuite 1.4.1's NutAssemblySquare (Panda, OSC_POSE delta control).

It generates multi-operator-style demonstrations (like robomimic's square-mh): grasp the square nut by its handle, carry
it over the square peg, turned so that its square hole is aligned with the peg, lower it down the peg, let go and move
away.

The operator is a waypoint state machine with proportional controllers on the end-effector position and on its full
orientation (kept pointing down, with a yaw target):

    approach (above the handle, fingers across it) -> descend -> close -> lift (until the nut clears the peg)
    -> transport (nut centre over the peg, handle towards the robot) -> insert (lower) -> release -> retreat

Transport and insertion are closed-loop on the nut's own pose, so the handle's offset from the nut centre and any slip
in the grasp are accounted for. The nut is placed with its handle pointing towards the robot: with the handle
sideways or away, the gripper over the peg would be near the edge of the Panda's reach, where the stretched arm gets
stuck in the OSC. For the same reason the nut is mostly turned before it is carried over the peg. Wrist turns go the
way that keeps joint 7 within its limits, even when that is the long way round, and the grasp (the gripper either
way round on the handle) is the one with the least wrist rotation in all, counting the turn to place the nut.

Recoveries: a failed grasp, a dropped nut or a nut that does not end around the peg make the operator open the
gripper and grasp again; a nut resting on the peg top (misaligned) is lifted, re-aligned and lowered again.

Variety comes from a style (STYLES) plus per-episode parameters drawn from the rng: gains, speed limits and action
smoothing, white and slowly drifting action noise, approach and carry heights, grasp offset jitter, alignment
tolerances, insertion speed, release height, pauses (a few steps of no motion at random points) and an occasional
deliberate release and regrasp. All randomness comes from the rng given to the operator, so a demo is reproducible
from (env seed, rng seed).
"""

import numpy as np

from utils.operator_can import quat_to_mat, rotation_vector

PEG_HALF_HEIGHT = 0.1  # half-height of the peg boxes in robosuite's pegs arena
NUT_HALF_THICKNESS = 0.01  # half-thickness of the nut's boxes
# The handle site is 0.054 m from the nut centre, but the ring's wall reaches 0.044 m: the middle of the handle's free
# part (out to 0.079 m) is this much further out, so that a finger is less likely to land on the ring.
HANDLE_OUTWARDS = 0.006
ON_PEG_HEIGHT = 0.05  # NutAssembly.on_peg: the nut centre must be below the table top + this
ON_PEG_XY = 0.03  # NutAssembly.on_peg: and within this of the peg axis in x and in y

DESCEND_STEPS = 60  # active steps after which the gripper closes even if it has not reached the grasp point
CLOSE_STEPS = 10  # steps with the gripper closing before lifting (the Panda fingers need about 9)
OPEN_STEPS = 8  # steps with the gripper opening before moving away
RETRY_HEIGHT = 0.03  # approach height (m) above the handle when grasping again
HOVER_HEIGHT = 0.025  # height (m) above the grasp point at which the fingertips just clear the nut
STALL_STEPS = 12  # active steps without downward progress of the nut that count as stuck during insertion
EMPTY_HAND = 0.012  # finger opening (m) below which the closed gripper holds nothing (about 0.03 on the handle)
WRIST_LIMIT = 2.6  # |joint 7| (rad) that wrist turns stay within (the Panda's limit is 2.8973)
MAX_TURN = 1.2  # largest yaw change (rad) put into one orientation target: below pi, so it turns the intended way
X_REACH = 0.19  # largest gripper x (m) while carrying: further out, the stretched arm nears its elbow singularity
X_TURNING = 0.08  # largest gripper x (m) while the nut still has more than TURN_FIRST to turn
TURN_FIRST = 0.5  # yaw (rad) still to turn above which the nut is kept back from the peg
INTEGRAL_DECAY = 0.95  # leak of the integral of the horizontal position error (a ~20-step memory)
INTEGRAL_GAIN = 0.05  # integral weight relative to the proportional gain, per step
INTEGRAL_ZONE = 0.015  # horizontal error (m) under which the integral is active
DRIFT_DECAY = 0.95  # per-step decay of the drifting action bias (an AR(1) process with a ~20-step memory)

# Per style: ranges (low, high) of the per-episode parameters, each drawn uniformly; the range of pause lengths (env
# steps, drawn per pause); the probability of a deliberate release and regrasp after the first grasp.
# Speeds are action norms (1 moves the gripper about 12 mm per env step), gains are action units per metre (per radian
# for rot_gain), heights and tolerances are metres (radians for tol_yaw), pause_rate is per env step.
_STYLES = {
    # slow, smooth and precise: tight tolerances, settles before lowering, lowers the nut all the way
    "careful": dict(
        ranges=dict(
            gain=(8.0, 12.0), speed=(0.35, 0.5), rot_gain=(1.5, 2.5), rot_speed=(0.5, 0.7), smooth=(0.4, 0.6),
            noise=(0.01, 0.04), drift=(0.0, 0.04), approach_height=(0.07, 0.12), carry_margin=(0.03, 0.06),
            grasp_jitter=(0.0, 0.003), tol_xy=(0.002, 0.003), tol_yaw=(0.03, 0.05), settle_steps=(4, 8),
            insert_speed=(0.15, 0.25), release_height=(0.0, 0.01), pause_rate=(0.0, 0.01),
        ),
        pause_len=(3, 8), regrasp_prob=0.05,
    ),
    # quick and decisive: high gains, low approach, lowers at once and drops the nut once it is around the peg
    "fast": dict(
        ranges=dict(
            gain=(14.0, 22.0), speed=(0.6, 0.9), rot_gain=(2.5, 4.0), rot_speed=(0.7, 1.0), smooth=(0.1, 0.3),
            noise=(0.02, 0.06), drift=(0.0, 0.05), approach_height=(0.03, 0.06), carry_margin=(0.015, 0.03),
            grasp_jitter=(0.002, 0.005), tol_xy=(0.003, 0.005), tol_yaw=(0.04, 0.08), settle_steps=(1, 2),
            insert_speed=(0.3, 0.5), release_height=(0.035, 0.06), pause_rate=(0.0, 0.005),
        ),
        pause_len=(2, 5), regrasp_prob=0.0,
    ),
    # imprecise: noisy, drifting and jerky commands, loose grasp and loose alignment tolerances
    "sloppy": dict(
        ranges=dict(
            gain=(10.0, 18.0), speed=(0.45, 0.7), rot_gain=(1.5, 3.5), rot_speed=(0.5, 0.9), smooth=(0.0, 0.3),
            noise=(0.08, 0.15), drift=(0.05, 0.12), approach_height=(0.03, 0.08), carry_margin=(0.015, 0.04),
            grasp_jitter=(0.004, 0.008), tol_xy=(0.005, 0.008), tol_yaw=(0.06, 0.12), settle_steps=(1, 2),
            insert_speed=(0.25, 0.45), release_height=(0.0, 0.015), pause_rate=(0.005, 0.02),
        ),
        pause_len=(2, 6), regrasp_prob=0.1,
    ),
    # unsure: medium speed, frequent and long pauses, often releases and regrasps the nut
    "hesitant": dict(
        ranges=dict(
            gain=(8.0, 14.0), speed=(0.45, 0.65), rot_gain=(1.5, 3.0), rot_speed=(0.6, 0.8), smooth=(0.3, 0.5),
            noise=(0.02, 0.06), drift=(0.0, 0.05), approach_height=(0.06, 0.12), carry_margin=(0.03, 0.06),
            grasp_jitter=(0.002, 0.005), tol_xy=(0.002, 0.004), tol_yaw=(0.03, 0.06), settle_steps=(3, 6),
            insert_speed=(0.15, 0.25), release_height=(0.0, 0.02), pause_rate=(0.015, 0.03),
        ),
        pause_len=(3, 12), regrasp_prob=0.3,
    ),
}


def _wrap(angle):
    """Angle wrapped to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _yaw(R):
    """Heading of a frame's x axis in the world's xy plane."""
    return np.arctan2(R[1, 0], R[0, 0])


def _gripper_down(yaw):
    """End-effector frame pointing down with its x axis along `yaw` (the Panda's fingers close along its y axis):
    a half turn about x, then the yaw about the world's z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, -1.0])


def _turn(delta, wrist):
    """The yaw change equivalent to `delta` (modulo 2 pi) that keeps joint 7 (now at `wrist`) within WRIST_LIMIT.

    With the gripper pointing down, turning the gripper's yaw by d turns joint 7 by about -d. The shorter way is
    preferred; the longer one is taken when the shorter would run the wrist into its limit.
    """
    options = _wrap(delta) + np.array([0.0, -2 * np.pi, 2 * np.pi])
    feasible = options[np.abs(wrist - options) < WRIST_LIMIT]
    candidates = feasible if feasible.size else options
    return candidates[np.argmin(np.abs(candidates))]


class SquareOperator:
    """Scripted demonstrator for NutAssemblySquare with a human-like style drawn per episode.

    Make one per episode, after env.reset(). act(obs) returns a (7,) action in [-1, 1]:
    [dx, dy, dz, dax, day, daz, gripper], gripper -1 open, +1 closed. The nut and end-effector poses are read from the
    observation; the handle site, the square peg (peg1) and the table height from the env (privileged state).
    After an episode, `recoveries` lists the (step, reason) of each regrasp or retry.
    """

    STYLES = tuple(_STYLES)

    def __init__(self, env, rng: np.random.Generator, style: str | None = None):
        self.env = env
        self.rng = rng
        self.style = style if style is not None else str(rng.choice(self.STYLES))
        spec = _STYLES[self.style]
        self.params = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in spec["ranges"].items()}
        self.params["settle_steps"] = round(self.params["settle_steps"])
        self.pause_len = spec["pause_len"]
        self.regrasps_left = int(rng.random() < spec["regrasp_prob"])

        self.peg_xy = np.array(env.sim.data.body_xpos[env.peg1_body_id][:2])
        self.peg_top = env.sim.data.body_xpos[env.peg1_body_id][2] + PEG_HALF_HEIGHT
        self.table_z = env.table_offset[2]
        # Nut centre height while carried: its bottom clears the peg top by carry_margin.
        self.carry_z = self.peg_top + NUT_HALF_THICKNESS + self.params["carry_margin"]
        # Nut centre height at which the gripper lets go (on_peg needs it below table + ON_PEG_HEIGHT).
        self.release_z = self.table_z + NUT_HALF_THICKNESS + 0.01 + self.params["release_height"]

        self.step = 0
        self.pause_left = 0
        self.prev_cmd = np.zeros(6)
        self.drift = np.zeros(6)
        self.hold_pos = None  # position held while the gripper closes or opens, and after the retreat
        self.recoveries = []
        self.approach_height = self.params["approach_height"]
        self._new_grasp_offset()
        self._set_phase("approach")

    def _new_grasp_offset(self):
        """Grasp point in the nut frame, from the handle site: the middle of the handle's free part, with jitter along
        the handle and across it, and a height above the handle's centre."""
        j = self.params["grasp_jitter"]
        self.grasp_offset = np.array([HANDLE_OUTWARDS + self.rng.uniform(-j, j), self.rng.uniform(-j, j), 0.0])
        self.grasp_dz = self.rng.uniform(0.0, 0.006)

    def _set_phase(self, phase):
        self.phase = phase
        self.phase_steps = 0
        self.integral = np.zeros(2)

    def _regrasp(self, eef, reason):
        """Open the gripper where it is, then approach the handle again with a new grasp jitter."""
        self.recoveries.append((self.step, reason))
        self.approach_height = RETRY_HEIGHT
        self.hold_pos = eef.copy()
        self._new_grasp_offset()
        self._set_phase("reopen")
        return self.hold_pos, 0.0, -1.0, self.params["speed"]

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=float)
        R_eef = quat_to_mat(obs["robot0_eef_quat"])
        nut = np.asarray(obs["SquareNut_pos"], dtype=float)
        R_nut = quat_to_mat(obs["SquareNut_quat"])
        wrist = np.arctan2(obs["robot0_joint_pos_sin"][6], obs["robot0_joint_pos_cos"][6])
        fingers = obs["robot0_gripper_qpos"][0] - obs["robot0_gripper_qpos"][1]
        self.step += 1
        if self.pause_left == 0:  # phase timeouts count active steps only
            self.phase_steps += 1

        target, turn, grip, speed = self._plan(eef, _yaw(R_eef), nut, R_nut, wrist, fingers)

        p = self.params
        error = target - eef
        # The OSC barely moves for small commands (a few mm of error), so a leaky integral of the horizontal error
        # makes the operator push harder when the gripper does not move, as a person would. It only integrates near
        # the target, else it would wind up during the travel and overshoot.
        if np.linalg.norm(error[:2]) < INTEGRAL_ZONE:
            self.integral = INTEGRAL_DECAY * self.integral + error[:2]
        else:
            self.integral = np.zeros(2)
        pos = p["gain"] * error
        pos[:2] += p["gain"] * INTEGRAL_GAIN * self.integral
        pos *= min(1.0, speed / max(np.linalg.norm(pos), 1e-9))  # speed limit, keeping the direction
        # Orientation: pointing down, yaw turned by `turn` (in steps below pi, so the turn goes the intended way).
        R_target = _gripper_down(_yaw(R_eef) + np.clip(turn, -MAX_TURN, MAX_TURN))
        rot = p["rot_gain"] * rotation_vector(R_target @ R_eef.T)
        rot *= min(1.0, p["rot_speed"] / max(np.linalg.norm(rot), 1e-9))
        cmd = np.concatenate([pos, rot])

        if self.pause_left > 0:
            self.pause_left -= 1
            cmd = np.zeros(6)
        elif self.phase not in ("close", "release") and self.rng.random() < p["pause_rate"]:
            self.pause_left = int(self.rng.integers(self.pause_len[0], self.pause_len[1] + 1))

        # Human-like command: low-passed, plus a slowly drifting bias and white noise (rotation noise is smaller).
        # The noise grows with the commanded speed (signal-dependent, as in human motor noise), so that fine
        # corrections near a target stay precise enough to converge.
        cmd = p["smooth"] * self.prev_cmd + (1 - p["smooth"]) * cmd
        self.prev_cmd = cmd
        self.drift = DRIFT_DECAY * self.drift + np.sqrt(1 - DRIFT_DECAY**2) * self.rng.normal(0.0, p["drift"], 6)
        effort = min(1.0, np.linalg.norm(cmd[:3]) / p["speed"])
        noise = (0.25 + 0.75 * effort) * (self.rng.normal(0.0, p["noise"], 6) + self.drift)
        noise[3:] *= 0.3
        return np.clip(np.concatenate([cmd + noise, [grip]]), -1.0, 1.0)

    @staticmethod
    def _grasp_turn(eef_yaw, nut_yaw, wrist):
        """Yaw change to grasp the handle: fingers across it, i.e. the gripper's x along the nut's x, either way round.

        Of the two ways round, the one with the least wrist rotation in all, counting the turn that will then place
        the nut with its handle towards the robot (the gripper turns the nut by the same angle).
        """
        best = None
        for flip in (0.0, np.pi):
            grasp_turn = _turn(nut_yaw + flip - eef_yaw, wrist)
            place_turn = _turn(np.pi - nut_yaw, wrist - grasp_turn)  # the wrist will be at wrist - grasp_turn
            cost = abs(grasp_turn) + abs(place_turn)
            if best is None or cost < best[0]:
                best = (cost, grasp_turn)
        return best[1]

    def _plan(self, eef, eef_yaw, nut, R_nut, wrist, fingers):
        """The state machine. Returns the target gripper position, the yaw change still to make, the gripper command
        and the speed limit."""
        p = self.params
        nut_yaw = _yaw(R_nut)
        speed = p["speed"]
        empty_hand = fingers < EMPTY_HAND

        if self.phase in ("approach", "descend"):
            handle = np.array(self.env.sim.data.site_xpos[self.env.object_site_ids[0]])
            grasp = handle + R_nut @ self.grasp_offset
            grasp[2] = handle[2] + self.grasp_dz
            turn = self._grasp_turn(eef_yaw, nut_yaw, wrist)
            if self.phase == "approach":
                above = grasp + np.array([0.0, 0.0, self.approach_height])
                if (np.linalg.norm((above - eef)[:2]) < p["tol_xy"] + 0.003 and abs(turn) < p["tol_yaw"]
                        and abs(above[2] - eef[2]) < 0.02):
                    self._set_phase("descend")
                return above, turn, -1.0, speed
            if np.linalg.norm((grasp - eef)[:2]) > p["tol_xy"] + 0.004 and self.phase_steps <= DESCEND_STEPS:
                # Off the handle: a finger would land on the nut's ring. Stay just above the nut and re-centre.
                return grasp + np.array([0.0, 0.0, HOVER_HEIGHT]), turn, -1.0, 0.7 * speed
            if eef[2] - grasp[2] < 0.004 or self.phase_steps > DESCEND_STEPS:
                self.hold_pos = grasp
                self._set_phase("close")
            return grasp, turn, -1.0, 0.7 * speed

        if self.phase == "close":
            if self.phase_steps >= CLOSE_STEPS:
                if self.regrasps_left > 0:  # as if unhappy with the grasp
                    self.regrasps_left -= 1
                    return self._regrasp(eef, "deliberate regrasp")
                self.nut_z0 = nut[2]
                self._set_phase("lift")
            return self.hold_pos, 0.0, 1.0, speed

        if self.phase == "reopen":
            if self.phase_steps >= OPEN_STEPS:
                self._set_phase("approach")
            return self.hold_pos, 0.0, -1.0, speed

        if self.phase == "lift":
            if empty_hand or (eef[2] > self.hold_pos[2] + 0.04 and nut[2] < self.nut_z0 + 0.015):
                return self._regrasp(eef, "failed grasp")  # closed on nothing, or the nut stayed down
            if nut[2] > self.peg_top + NUT_HALF_THICKNESS + 0.01:  # clear of the peg: move over while still rising
                self.aligned_steps = 0
                self._set_phase("transport")
            target = self.hold_pos.copy()
            target[2] = eef[2] + self.carry_z - nut[2]
            return target, 0.0, 1.0, speed

        if self.phase in ("transport", "insert"):
            if empty_hand or np.linalg.norm(nut - eef) > 0.1:
                return self._regrasp(eef, "dropped")
            # Control the nut: centre over the peg, handle towards the robot (nut yaw pi, a multiple of 90 degrees
            # as the peg needs); the gripper turns with the nut.
            xy_error = self.peg_xy - nut[:2]
            turn = _turn(np.pi - nut_yaw, wrist)
            target = eef.copy()
            target[:2] += xy_error
            # Keep the arm away from full stretch (the elbow's singularity, where the OSC gets stuck): turning the
            # nut swings it around the gripper, so turn it mostly before going over to the peg.
            target[0] = min(target[0], X_REACH if abs(turn) < TURN_FIRST else X_TURNING)
            if self.phase == "transport":
                target[2] += self.carry_z - nut[2]
                # Lower only once aligned for a few steps in a row, i.e. settled rather than passing through.
                aligned = np.linalg.norm(xy_error) < p["tol_xy"] and abs(turn) < p["tol_yaw"]
                self.aligned_steps = self.aligned_steps + 1 if aligned else 0
                if self.aligned_steps >= p["settle_steps"]:
                    self.best_z = nut[2]
                    self._set_phase("insert")
                return target, turn, 1.0, speed
            # Insert: lower the nut, but hold its height while it is off-centre above the peg top (re-align first).
            lowering = nut[2] < self.peg_top + NUT_HALF_THICKNESS or np.linalg.norm(xy_error) < 2 * p["tol_xy"]
            target[2] += (self.release_z if lowering else self.best_z) - nut[2]
            if nut[2] < self.best_z - 0.001 or not lowering:  # progress, or not trying: not stalled
                self.best_z = min(self.best_z, nut[2])
                self.phase_steps = 0
            if nut[2] < self.release_z + 0.003:
                self.hold_pos = eef.copy()
                self._set_phase("release")
            elif self.phase_steps > STALL_STEPS:
                if nut[2] > self.peg_top:  # resting on the peg top: lift, re-align, try again
                    self.recoveries.append((self.step, "stuck on the peg top"))
                    self.aligned_steps = 0
                    self._set_phase("transport")
                else:  # around the peg but jammed: let go, it usually slides down on its own
                    self.hold_pos = eef.copy()
                    self._set_phase("release")
            return target, turn, 1.0, p["insert_speed"]

        if self.phase == "release":
            if self.phase_steps >= OPEN_STEPS:
                self.hold_pos = self.hold_pos + np.array([0.0, 0.0, 0.1])
                self._set_phase("retreat")
            return self.hold_pos, 0.0, -1.0, speed

        # retreat: move up and wait; if the nut did not end around the peg, grasp it again
        on_peg = np.all(np.abs(nut[:2] - self.peg_xy) < ON_PEG_XY) and nut[2] < self.table_z + ON_PEG_HEIGHT
        if not on_peg and self.phase_steps > 20:
            return self._regrasp(eef, "nut not around the peg")
        return self.hold_pos, 0.0, -1.0, speed

"""Every algorithm script end to end on the robomimic tasks, from the small generated demo files shipped in the
repository, with a tiny budget (CPU, about a minute: the runs go in parallel, each in its own folder)."""
import json

import pytest
import torch

from tests.e2e import finish, start
from utils.datasets import EMBEDDED_ROBOMIMIC_DIR, read_robomimic

CAN, SQUARE = "Robomimic-Can-v0", "Robomimic-Square-v0"
SMALL_FILES = {CAN: EMBEDDED_ROBOMIMIC_DIR / "can_scripted_mh_gen1_seed0_n4.hdf5",
               SQUARE: EMBEDDED_ROBOMIMIC_DIR / "square_scripted_mh_gen1_seed0_n4.hdf5"}
COMMON = ["--seed", "3", "--pretrain-steps", "30", "--pretrained-dir", "pretrained", "--num-envs", "1",
          "--eval-episodes", "1", "--eval-frequency", "10", "--checkpoint-frequency", "1", "--denoising-steps", "4",
          "--actor-hidden", "32", "32", "32", "--critic-hidden", "32", "32", "--critic-warmup-iterations", "1"]
OFF_POLICY = ["--num-steps", "5", "--total-timesteps", "40", "--replay-ratio", "0.2", "--num-candidates", "2",
              "--critic-batch-size", "16", "--actor-batch-size", "16"]
FLAGS = {
    "otpr.py": OFF_POLICY + ["--ot-hidden", "16", "16", "--ot-batch-size", "16", "--num-keypoints", "8",
                             "--ot-max-steps", "20"],
    "idql_baseline.py": OFF_POLICY,
    "dql_baseline.py": OFF_POLICY,
    "qsm_baseline.py": OFF_POLICY,
    "dppo_baseline.py": ["--num-steps", "5", "--total-timesteps", "40", "--ft-denoising-steps", "2",
                         "--critic-hidden", "32", "32", "32"],  # DPPO's value network is residual: one width, odd count
}
RUNS = [(script, CAN) for script in FLAGS] + [("otpr.py", SQUARE), ("idql_baseline.py", SQUARE)]
ENV_STEPS = 40  # 2 iterations of 1 env x 5 decisions x 4 actions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every (script, task) run at once, each in its own folder; returns {(script, env id): folder}."""
    processes = {}
    for script, env_id in RUNS:
        cwd = tmp_path_factory.mktemp(f"{script[:-3]}_{env_id}")
        flags = ["--env-id", env_id, "--dataset-path", str(SMALL_FILES[env_id]), *COMMON, *FLAGS[script]]
        processes[script, env_id] = (cwd, start(script, flags, cwd))
    for cwd, process in processes.values():
        finish(process)
    return {key: cwd for key, (cwd, _) in processes.items()}


@pytest.mark.parametrize("script, env_id", RUNS)
def test_runs_evaluate_whole_episodes_under_dppos_success_rule(runs, script, env_id):
    (run,) = (runs[script, env_id] / "runs").glob(f"{env_id}__{script[:-3]}__3__*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_id"] == env_id and summary["env_steps"] == ENV_STEPS
    for entry in summary["history"]:
        assert entry["episodes"] == 1 and entry["success_rate"] in (0.0, 1.0)
        assert entry["normalized_score"] == 100 * entry["success_rate"]  # the score is the success rate in percent
        # reward 1 per env step in the success state, at most the whole 300/400-step episode
        assert 0 <= entry["episodic_return"] <= (300 if env_id == CAN else 400)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["args"]["gamma"] == 0.999  # the task's defaults reached the run
    (pretrained,) = (runs[script, env_id] / "pretrained").glob("*.pt")
    meta = torch.load(pretrained, weights_only=False)["meta"]
    assert meta["env_id"] == env_id and meta["obs_dim"] == 23 and meta["action_dim"] == 28


def test_off_policy_replay_starts_with_the_demonstrations(runs):
    (run,) = (runs["otpr.py", CAN] / "runs").glob(f"{CAN}__otpr__3__*")
    demos = read_robomimic(SMALL_FILES[CAN], CAN)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    episodes = int(demos["timeouts"].sum())
    chunks = len(demos["actions"]) - episodes * 4  # chunks of 4 that end inside their demo (a next state exists)
    assert checkpoint["replay"]["size"] == chunks + 10  # plus the 2 x 5 online decisions

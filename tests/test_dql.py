"""dql_baseline.py: DQL's actor and critic against known answers, then end to end on Kitchen-Complete-v0 with a tiny
budget (CPU, well under a minute).

Each unit test is built to fail under a one-line mistake: a Q term that does not reach the policy, a BC term that is
not plain score matching on the replay pairs, a target drawn at s instead of s', a dropped terminal mask or min over
the twin heads, a selection that is not softmax(Qbar).
"""
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dql_baseline as dql
import idql_baseline
from tests.e2e import bad_input_error, finish, run_dir, scalars, start

# One env (a SyncVectorEnv, no worker processes) keeps each run to a few seconds; the vector env, data and evaluation
# are shared code that tests/test_scripts.py runs with two.
TINY = [
    "--env-id", "Kitchen-Complete-v0", "--seed", "3", "--pretrain-steps", "50", "--pretrained-dir", "pretrained",
    "--num-envs", "1", "--num-steps", "10", "--total-timesteps", "120", "--eval-episodes", "1", "--eval-frequency", "10",
    "--critic-warmup-iterations", "1", "--checkpoint-frequency", "1", "--replay-ratio", "0.2", "--num-candidates", "2",
    "--actor-hidden", "64", "64", "64", "--critic-hidden", "32", "32", "--critic-batch-size", "32",
    "--actor-batch-size", "32", "--eval-protocols", "single", "select",
]
ITERATIONS, ENV_STEPS = 3, 120  # 120 // (1 env * 10 decisions * 4 actions per chunk)


# ----------------------------------------------------------------------------------------------------------------
# The actor: score matching on replay pairs + eta * normalised Q of the policy's own sample
# ----------------------------------------------------------------------------------------------------------------
class QuadraticQ(nn.Module):
    """Twin Q of known shape, maximal at a* = 0.5 for every state; the heads differ by a constant."""

    def forward(self, obs, actions):
        q = 1 - ((actions - 0.5) ** 2).sum(-1)
        return q, q + 0.5


@pytest.fixture(scope="module")
def cloned_policy():
    """A small diffusion policy behaviour-cloned on replay actions near -0.45, far from a*."""
    torch.manual_seed(0)
    args = dql.Args(actor_hidden=(32, 32, 32), denoising_steps=5)
    policy = dql.DiffusionPolicy(1, 1, args)
    batch = {"obs": torch.zeros(128, 1), "actions": -0.5 + 0.1 * torch.rand(128, 1)}
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(200):
        loss = policy.loss(batch["actions"], batch["obs"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy, batch, args


def mean_q_of_samples(policy, args):
    generator = torch.Generator().manual_seed(0)
    actions = policy.sample(torch.zeros(512, 1), min_std=args.min_sampling_std, generator=generator)
    return QuadraticQ()(None, actions)[0].mean().item()


def fine_tune(policy, batch, args, steps=40):
    policy = copy.deepcopy(policy)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    torch.manual_seed(1)
    for _ in range(steps):
        loss, _ = dql.dql_actor_loss(policy, QuadraticQ(), batch, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy


def test_the_q_term_raises_q_of_the_policys_samples(cloned_policy):
    """With eta large the policy's samples climb Q towards a*, away from the buffer's actions; with eta = 0 the same
    steps leave them where behaviour cloning put them. So the Q gradient does reach the network through the chain."""
    policy, batch, args = cloned_policy
    before = mean_q_of_samples(policy, args)
    assert before < 0.2  # samples near -0.45: Q = 1 - 0.95^2
    improved = mean_q_of_samples(fine_tune(policy, batch, dataclasses.replace(args, eta=5.0)), args)
    cloned = mean_q_of_samples(fine_tune(policy, batch, dataclasses.replace(args, eta=0.0)), args)
    assert improved > before + 0.5
    assert abs(cloned - before) < 0.1


def test_with_eta_zero_the_actor_loss_is_score_matching_on_the_replay_pairs(cloned_policy):
    policy, batch, args = cloned_policy
    args = dataclasses.replace(args, eta=0.0)
    gradients = []
    for loss_fn in (lambda: dql.dql_actor_loss(policy, QuadraticQ(), batch, args)[0],
                    lambda: policy.loss(batch["actions"], batch["obs"]).mean()):
        torch.manual_seed(0)
        policy.zero_grad()
        loss = loss_fn()
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in policy.parameters()]))
    (dql_loss, dql_grads), (dsm_loss, dsm_grads) = gradients
    torch.testing.assert_close(dql_loss, dsm_loss)
    for a, b in zip(dql_grads, dsm_grads):
        torch.testing.assert_close(a, b)


def test_the_q_term_is_normalised_by_the_other_heads_mean_abs_q(cloned_policy):
    """L_q = -mean Q_i / mean |Q_j|, (i, j) drawn at random: over many draws both orders occur, and nothing else."""
    policy, batch, args = cloned_policy
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        _, stats = dql.dql_actor_loss(policy, QuadraticQ(), batch, args)
        torch.manual_seed(seed)
        policy.loss(batch["actions"], batch["obs"])  # the same random numbers as the BC term drew
        q1, q2 = QuadraticQ()(None, dql.differentiable_sample(policy, batch["obs"], args).detach())
        candidates = {"12": -q1.mean() / q2.abs().mean(), "21": -q2.mean() / q1.abs().mean()}
        seen |= {order for order, value in candidates.items() if torch.isclose(stats["q"], value, rtol=1e-5)}
    assert seen == {"12", "21"}


# ----------------------------------------------------------------------------------------------------------------
# The critic: TD to min(Qbar1, Qbar2) at the EMA policy's action at s', masked at terminal states
# ----------------------------------------------------------------------------------------------------------------
class FirstCoordinate:
    """Stands for the EMA policy: its "sample" at a state x is the action x[0], so a' reveals where it was drawn."""

    def sample(self, obs, deterministic=False, min_std=0.0, noise_clip=3.0, generator=None):
        return obs[:, :1].clone()


def linear_twin_q(obs_dim, weights_and_biases):
    """Twin Q without hidden layers: head i computes w_i . [obs, action] + b_i exactly."""
    qf = dql.TwinQ(obs_dim, 1, ())
    for q, (weight, bias) in zip((qf.q1, qf.q2), weights_and_biases):
        q[0].weight.data.copy_(torch.tensor(weight, dtype=torch.float32)[None])
        q[0].bias.data.fill_(bias)
    return qf


def test_critic_targets_use_the_ema_policy_at_the_next_state_the_min_of_the_twins_and_the_terminal_mask():
    """Target heads Qbar1 = a + 1 and Qbar2 = 3a; a' = the first coordinate of s'. Transitions (r = 1, gamma = 0.9):
    a' = 1: min(2, 3) = 2 -> 2.8; a' = -1: min(0, -3) = -3 -> -1.7; a' = 2 but terminal -> 1.
    Dropping the min (head 1 only) gives 1.0 for the second, dropping the mask 3.7 for the third, and drawing a' at s
    (one-hot states) gives other targets for all three. The states are one-hot, so a linear Q fits any target."""
    torch.manual_seed(0)
    args = dql.Args(gamma=0.9, tau=0.0, min_sampling_std=0.01)
    qf_target = linear_twin_q(3, [([0, 0, 0, 1.0], 1.0), ([0, 0, 0, 3.0], 0.0)]).requires_grad_(False)
    qf = linear_twin_q(3, [([0, 0, 0, 0.0], 0.0)] * 2)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=5e-2)
    batch = {"obs": torch.eye(3), "actions": torch.zeros(3, 1), "rewards": torch.ones(3),
             "next_obs": torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [2.0, 0, 0]]),
             "terminated": torch.tensor([0.0, 0.0, 1.0])}
    for _ in range(600):
        stats = dql.update_q_critic(batch, qf, qf_target, FirstCoordinate(), q_optimizer, args)
    expected = torch.tensor([2.8, -1.7, 1.0])
    q1, q2 = qf(batch["obs"], batch["actions"])
    torch.testing.assert_close(q1, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(q2, expected, atol=1e-3, rtol=0)
    assert stats["q_loss"] < 1e-5


def test_polyak_step_moves_the_target_critics_by_tau():
    args = dql.Args(tau=0.25)
    qf = linear_twin_q(1, [([1.0, 1.0], 0.0)] * 2)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    before = [p.clone() for p in qf_target.parameters()]
    batch = {"obs": torch.ones(4, 1), "actions": torch.ones(4, 1), "rewards": torch.zeros(4),
             "next_obs": torch.ones(4, 1), "terminated": torch.ones(4)}
    dql.update_q_critic(batch, qf, qf_target, FirstCoordinate(), torch.optim.SGD(qf.parameters(), lr=0.1), args)
    for target, old, new in zip(qf_target.parameters(), before, qf.parameters()):
        torch.testing.assert_close(target, old + 0.25 * (new.detach() - old))


# ----------------------------------------------------------------------------------------------------------------
# Action selection and the shared pre-trained checkpoint
# ----------------------------------------------------------------------------------------------------------------
class FixedCandidates:
    values = torch.tensor([-0.9, -0.3, 0.3, 0.9])

    def sample(self, obs):
        return self.values.repeat(len(obs) // len(self.values))[:, None]


def test_candidates_are_drawn_by_softmax_of_the_min_target_q():
    """Qbar = min(2a, 3a) + 40 (the offset tests the overflow guard): probabilities softmax(2a or 3a) over the four."""
    qf_target = linear_twin_q(1, [([0.0, 2.0], 40.0), ([0.0, 3.0], 40.0)])
    weigh = lambda obs, actions: dql.softmax_q_weights(obs, actions, qf_target)
    chosen, lever = dql.select_candidates(torch.zeros(20000, 1), FixedCandidates().sample, weigh,
                                             dql.Args(num_candidates=4), generator=torch.Generator().manual_seed(0))
    assert not lever["all_zero"].any()
    expected = torch.softmax(torch.tensor([-2.7, -0.9, 0.6, 1.8]), 0)
    frequencies = torch.stack([(chosen[:, 0] == v).float().mean() for v in FixedCandidates.values])
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_dql_loads_the_same_pretrained_checkpoint_as_the_other_scripts():
    """The file is named by the pre-training config and the data only: DQL's own flags leave it unchanged."""
    flags = {"env_id": "Kitchen-Mixed-v0", "seed": 7, "pretrain_steps": 1000}
    data = {"observations": np.zeros((3, 60), np.float32), "actions": np.ones((3, 9), np.float32)}
    own = dql.pretrained_checkpoint_path(dql.Args(**flags, eta=1.0, policy_ema_decay=0.9, actor_batch_size=64), data)
    assert own == idql_baseline.pretrained_checkpoint_path(idql_baseline.Args(**flags), data)
    assert dql.PRETRAIN_FIELDS == idql_baseline.PRETRAIN_FIELDS


# ----------------------------------------------------------------------------------------------------------------
# End to end: summary, TensorBoard, checkpoints, --resume, bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run to the end. Its first checkpoint is copied aside the moment it appears: a checkpoint is replaced
    atomically, so the copy is exactly what a run killed at that point leaves behind."""
    cwd, snapshot = tmp_path_factory.mktemp("dql_e2e"), tmp_path_factory.mktemp("dql_snapshot")
    process = start("dql_baseline.py", TINY, cwd)
    while not list((cwd / "runs").glob("*/checkpoint.pt")):
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    path = run_dir(cwd, "dql_baseline")
    (snapshot / "runs" / path.name).mkdir(parents=True)
    shutil.copy(path / "checkpoint.pt", snapshot / "runs" / path.name)
    log = finish(process)
    shutil.copytree(cwd / "pretrained", snapshot / "pretrained")
    return cwd, log, snapshot


def test_end_to_end_summary_tensorboard_and_checkpoint(uninterrupted):
    cwd, log, _ = uninterrupted
    assert "saved the pre-trained policy" in log
    path = run_dir(cwd, "dql_baseline")
    summary = json.loads((path / "summary.json").read_text())
    assert summary["env_steps"] == ENV_STEPS and summary["iterations"] == ITERATIONS
    assert [entry["iteration"] for entry in summary["history"]] == [0, ITERATIONS]
    for key in ("pretrained", "final", "best"):
        assert 0 <= summary[key]["success_rate"] <= 1 and 0 <= summary[key]["normalized_score"] <= 100
    for entry in summary["history"]:  # the headline is the first protocol; both are kept
        assert set(entry["protocols"]) == {"single", "select"}
        assert entry["normalized_score"] == entry["protocols"]["single"]["normalized_score"]
    assert summary["SPS"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["time_per_iteration_s"]) == {"env", "sampling", "critic", "ot", "actor", "eval"}
    assert summary["time_per_iteration_s"]["ot"] == 0 and summary["time_per_iteration_s"]["actor"] > 0
    (pretrained,) = (cwd / "pretrained").glob("*.pt")
    assert summary["pretrained_checkpoint"] == str(Path("pretrained") / pretrained.name)

    logged = scalars(path)
    for tag in ("charts/success_rate", "charts/normalized_score", "charts/episodic_return",
                "eval_single/normalized_score", "eval_select/success_rate"):
        assert len(logged[tag]) == 2
    assert len(logged["losses/q"]) == ITERATIONS and len(logged["losses/q_values"]) == ITERATIONS
    for tag in ("losses/actor", "losses/actor_bc", "losses/actor_q"):
        assert len(logged[tag]) == ITERATIONS - 1  # the actor trains after the one warm-up iteration
    for tag in ("charts/SPS", "time/env", "time/critic", "time/actor", "time/ot"):
        assert tag in logged
    assert "losses/v" not in logged and not any(tag.startswith("ot/") for tag in logged)

    checkpoint = torch.load(path / "checkpoint.pt", weights_only=False)
    assert checkpoint["script"] == "dql_baseline.py"
    assert checkpoint["iteration"] == ITERATIONS and checkpoint["global_step"] == ENV_STEPS
    assert checkpoint["replay"]["size"] > ITERATIONS * 10  # demonstrations plus every online decision
    assert "vf" not in checkpoint
    # the EMA that draws the critic's targets has left the pre-trained weights but lags the policy
    start = torch.load(pretrained, weights_only=False)["policy"]
    ema, policy = checkpoint["ema_policy"], checkpoint["policy"]
    assert not all(torch.equal(ema[key], start[key]) for key in ema)
    assert not all(torch.equal(ema[key], policy[key]) for key in ema)
    final = torch.load(path / "dql_baseline.pt", weights_only=False)["policy"]
    assert all(torch.equal(final[key], policy[key]) for key in final)


@pytest.fixture(scope="module")
def resumed(uninterrupted, tmp_path_factory):
    """The run resumed from its first checkpoint (the snapshot) and, in another folder, from a copy of its last one
    (written before its final evaluation): two independent processes, run at once."""
    cwd, _, snapshot = uninterrupted
    path, last = run_dir(cwd, "dql_baseline"), tmp_path_factory.mktemp("dql_last")
    shutil.copytree(cwd / "pretrained", last / "pretrained")
    (last / "runs" / path.name).mkdir(parents=True)
    shutil.copy(path / "checkpoint.pt", last / "runs" / path.name)
    first_checkpoint = torch.load(snapshot / "runs" / path.name / "checkpoint.pt", weights_only=False)
    processes = [start("dql_baseline.py", ["--resume", str(Path("runs") / path.name)], folder) for folder in (snapshot, last)]
    logs = [finish(process) for process in processes]
    return first_checkpoint, snapshot / "runs" / path.name, last / "runs" / path.name, logs


def test_resume_continues_an_interrupted_run(uninterrupted, resumed):
    """Resumed from its first checkpoint, the run does what the uninterrupted one did: same iterations, evaluations,
    env steps and buffer size, the pre-trained evaluation kept rather than redone, the actor and its EMA trained on.
    (Its later scores may differ: on resume the environments restart from a reset, mid-episode states are not saved.)"""
    first_checkpoint, folder, _, logs = resumed
    assert first_checkpoint["iteration"] == 1 and "resumed" in logs[0]
    summary = json.loads((folder / "summary.json").read_text())
    reference = json.loads((run_dir(uninterrupted[0], "dql_baseline") / "summary.json").read_text())
    for key in ("env_steps", "iterations", "pretrained"):
        assert summary[key] == reference[key]
    assert [entry["iteration"] for entry in summary["history"]] == [0, ITERATIONS]
    final = torch.load(folder / "checkpoint.pt", weights_only=False)
    reference_checkpoint = torch.load(run_dir(uninterrupted[0], "dql_baseline") / "checkpoint.pt", weights_only=False)
    assert final["iteration"] == ITERATIONS and final["replay"]["size"] == reference_checkpoint["replay"]["size"]
    ema, before = final["ema_policy"], first_checkpoint["ema_policy"]
    assert not all(torch.equal(ema[key], before[key]) for key in ema)
    assert len(scalars(folder)["losses/actor"]) == ITERATIONS - 1  # iterations 1 and 2, both after the resume


def test_resuming_the_last_checkpoint_reproduces_the_uninterrupted_run(uninterrupted, resumed):
    """Resumed from its last checkpoint, the run ends with exactly the uninterrupted run's history and weights: the
    restored state, RNG and evaluation are the same."""
    path, folder = run_dir(uninterrupted[0], "dql_baseline"), resumed[2]
    resumed_summary = json.loads((folder / "summary.json").read_text())
    assert resumed_summary["history"] == json.loads((path / "summary.json").read_text())["history"]
    weights = [torch.load(run / "dql_baseline.pt", weights_only=False)["policy"] for run in (path, folder)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


BAD_INPUT = [
    (["--env-id", "Kitchen-Compleat-v0"], "Unknown env id 'Kitchen-Compleat-v0'"),
    (["--eta", "-1"], "--eta must be at least 0"),
    (["--buffer-size", "100000000000"], "GiB for its rows, more than the"),
    (["--policy-ema-decay", "1.5"], "--policy-ema-decay must lie in [0, 1]"),
    (["--actor-batch-size", "0"], "--actor-batch-size must be positive"),
    (["--resume", "idql_run"], "checkpoint of idql_baseline.py"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[flags[0] for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "idql_run").mkdir()
    torch.save({"script": "idql_baseline.py", "rng": {}}, tmp_path / "idql_run" / "checkpoint.pt")
    assert message in bad_input_error("dql_baseline.py", flags, tmp_path, monkeypatch, capsys)

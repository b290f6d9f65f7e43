"""qsm_baseline.py: the Q-score-matching loss and the critic against known answers, and the script end to end.

The unit tests fail under a one-line mistake: a flipped sign or a lost sigma_k in the score target, the gradient taken
at the clean action or from one critic head, a dropped terminal mask or min over the target twins, a critic target at
the buffer's action instead of the policy's, a softmax normalised across states. The end-to-end tests run the script
on Kitchen-Complete-v0 with a tiny budget (about 50 s of CPU in all).
"""
import ast
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import idql_baseline
import qsm_baseline as qsm
from tests.e2e import ROOT, bad_input_error, finish, scalars, start

A_STAR = 0.5  # the maximiser of the toy critics


class QuadraticTwinQ(nn.Module):
    """Q1 = -|a - a*|^2 and Q2 = -3 |a - a*|^2: the mean of their action-gradients is 4 (a* - a)."""

    def forward(self, obs, actions):
        distance = ((actions - A_STAR) ** 2).sum(-1)
        return -distance, -3 * distance


def toy_policy(action_dim: int, **overrides):
    args = qsm.Args(actor_hidden=(32, 32, 32), denoising_steps=10, **overrides)
    return qsm.DiffusionPolicy(1, action_dim, args), args


class ExactNoise(nn.Module):
    """A denoiser that outputs -sign * alpha * scale_k * 4 (a* - a) at the action it is given (or at `clean`),
    scale_k = sigma_k or 1: the optimum of the QSM loss with that scale if sign = 1 and the action is the noisy one."""

    def __init__(self, alphas_cumprod, alpha, scaled_by_sigma, sign=1.0, clean=None):
        super().__init__()
        self.alphas_cumprod, self.alpha, self.scaled_by_sigma, self.sign, self.clean = \
            alphas_cumprod, alpha, scaled_by_sigma, sign, clean

    def forward(self, noisy, k, obs):
        sigma = (1 - self.alphas_cumprod[k][:, None]).sqrt() if self.scaled_by_sigma else 1.0
        at = noisy if self.clean is None else self.clean
        return -self.sign * self.alpha * sigma * 4 * (A_STAR - at)


@pytest.mark.parametrize("score_target", ["score", "noise"])
def test_qsm_target_is_alpha_times_the_q_gradient_at_the_noisy_action(score_target):
    """The loss vanishes for eps_theta = -alpha sigma_k grad_a Q(a_k) (`score`: implied score -eps/sigma_k = alpha
    grad Q) or -alpha grad_a Q(a_k) (`noise`, DPPO), and only for it: not with the sign flipped, nor with the other
    scale, nor with the gradient at the clean action."""
    policy, args = toy_policy(2, q_grad_scale=3.0, score_target=score_target)
    obs, actions = torch.zeros(512, 1), torch.rand(512, 2) * 2 - 1
    exact = partial(ExactNoise, policy.alphas_cumprod, 3.0)

    def loss_with(network):
        policy.network = network
        torch.manual_seed(0)
        return qsm.qsm_actor_loss(policy, QuadraticTwinQ(), obs, actions, args).item()

    scaled = score_target == "score"
    assert loss_with(exact(scaled)) < 1e-10
    assert loss_with(exact(scaled, sign=-1.0)) > 1.0
    assert loss_with(exact(not scaled)) > 0.1
    assert loss_with(exact(scaled, clean=actions)) > 0.1


def test_qsm_moves_the_policy_towards_the_maximiser_of_q():
    """A policy behaviour-cloned on actions near -0.5; 100 QSM steps with the gradient of Q = -|a - 0.5|^2 move its
    DDIM samples from -0.50 to about 0.01 (with the sign of the gradient term flipped, away to about -0.54)."""
    torch.manual_seed(0)
    policy, args = toy_policy(1, q_grad_scale=0.5)
    obs = torch.zeros(256, 1)
    demos = lambda: -0.5 + 0.1 * torch.randn(256, 1)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(200):
        loss = policy.loss(demos(), obs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mean_sample = lambda: policy.sample(torch.zeros(400, 1), deterministic=True,
                                        generator=torch.Generator().manual_seed(0)).mean().item()
    before = mean_sample()
    assert before == pytest.approx(-0.5, abs=0.1)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(100):
        loss = qsm.qsm_actor_loss(policy, QuadraticTwinQ(), obs, demos(), args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mean_sample()
    assert abs(after - A_STAR) < 0.7 * abs(before - A_STAR)


class FixedPolicy:
    """A policy whose every sample is the chunk 0.75."""

    def sample(self, obs, deterministic=False, min_std=0.0, noise_clip=3.0, generator=None):
        return torch.full((len(obs), 1), 0.75)


def test_td_target_is_the_min_of_the_target_twins_at_the_policys_action_and_stops_at_terminals():
    """Target heads Qbar1 = 4 + 2a, Qbar2 = 6 - 2a; the policy plays a' = 0.75: min = 4.5 (mean 5, Qbar1 5.5; at the
    buffer's action 0 it would be 4). Q converges to r = 1 on the terminal transition and 1 + 0.9 * 4.5 = 5.05 on
    the other."""
    torch.manual_seed(0)
    args = qsm.Args(gamma=0.9, tau=0.0)
    qf_target = qsm.TwinQ(1, 1, ()).requires_grad_(False)
    for head, (slope, bias) in ((qf_target.q1, (2.0, 4.0)), (qf_target.q2, (-2.0, 6.0))):
        head[0].weight.data.copy_(torch.tensor([[0.0, slope]]))
        head[0].bias.data.fill_(bias)
    qf = qsm.TwinQ(1, 1, ())  # linear in (s, a), as the target must be for Polyak averaging: exact here
    optimizer = torch.optim.Adam(qf.parameters(), lr=1e-2)
    batch = {"obs": torch.tensor([[-1.0], [1.0]]), "actions": torch.zeros(2, 1), "rewards": torch.tensor([1.0, 1.0]),
             "next_obs": torch.zeros(2, 1), "terminated": torch.tensor([1.0, 0.0])}
    for _ in range(1500):
        stats = qsm.update_q_critic(batch, qf, qf_target, FixedPolicy(), optimizer, args)
    assert set(stats) == {"q_loss", "q_values"}
    for q in qf(batch["obs"], batch["actions"]):
        torch.testing.assert_close(q, torch.tensor([1.0, 5.05]), atol=0.05, rtol=0)


class FixedCandidates:
    """A policy whose S = 4 samples for every state are the chunks -0.9, -0.3, 0.3 and 0.9."""

    values = torch.tensor([-0.9, -0.3, 0.3, 0.9])

    def sample(self, obs):
        return self.values.repeat(len(obs) // len(self.values))[:, None]


def test_select_protocol_draws_by_a_softmax_of_q_within_each_state():
    """Qbar = 200 s + 2 a: per state, softmax(2 a) over the four candidates, whatever the state's own level (a
    softmax across the batch would give the s = 0 states no mass at all)."""
    args = qsm.Args(num_candidates=4)
    qf_target = qsm.TwinQ(1, 1, ())
    for head in (qf_target.q1, qf_target.q2):
        head[0].weight.data.copy_(torch.tensor([[200.0, 2.0]]))
        head[0].bias.data.zero_()
    obs = torch.cat([torch.zeros(3000, 1), torch.ones(3000, 1)])
    weigh = partial(qsm.softmax_q_weights, qf_target=qf_target)
    chosen, lever = qsm.select_candidates(obs, FixedCandidates().sample, weigh, args,
                                             generator=torch.Generator().manual_seed(0))
    assert not lever["all_zero"].any()
    expected = torch.softmax(2 * FixedCandidates.values, 0)
    for half in (chosen[:3000, 0], chosen[3000:, 0]):
        frequencies = torch.stack([(half == value).float().mean() for value in FixedCandidates.values])
        torch.testing.assert_close(frequencies, expected, atol=0.025, rtol=0)


def definitions(path: Path) -> dict[str, str]:
    """Source text of every top-level function, class and single-name assignment of a file, by name."""
    source = path.read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


def test_shared_definitions_are_textually_identical_to_idql_baseline():
    """`diff idql_baseline.py qsm_baseline.py` shows only the method: every definition the two files share by name
    reads the same, except the flags; pre-training is among them, so both use the same checkpoint file."""
    idql, ours = definitions(ROOT / "idql_baseline.py"), definitions(ROOT / "qsm_baseline.py")
    for name in ("PRETRAIN_FIELDS", "pretrained_checkpoint_path", "read_pretrained", "pretrain", "pretrain_and_save",
                 "DiffusionPolicy", "TwinQ", "ReplayBuffer", "Normalizer", "evaluate", "select_candidates",
                 "check_args", "read_resume_state", "new_run_dir", "rng_state", "set_rng_state"):
        assert name in ours
    differing = {name for name in idql.keys() & ours.keys() if idql[name] != ours[name]}
    assert differing <= {"Args", "MAY_BE_ZERO", "FRACTIONS", "TASK_DEFAULTS"}, differing
    # TASK_DEFAULTS are flags too, per task, but the same tasks, and their pre-training flags agree: one checkpoint file
    assert qsm.TASK_DEFAULTS.keys() == idql_baseline.TASK_DEFAULTS.keys()
    for env_id, theirs in idql_baseline.TASK_DEFAULTS.items():
        pretraining = [field for field in qsm.PRETRAIN_FIELDS if field in theirs or field in qsm.TASK_DEFAULTS[env_id]]
        assert [qsm.TASK_DEFAULTS[env_id].get(f) for f in pretraining] == [theirs.get(f) for f in pretraining], env_id
    shared = dict(seed=5, pretrain_steps=123, actor_hidden=(64, 64, 64))
    data = {"observations": np.zeros((3, 60), np.float32), "actions": np.ones((3, 9), np.float32)}
    assert qsm.pretrained_checkpoint_path(qsm.Args(**shared), data) == \
        idql_baseline.pretrained_checkpoint_path(idql_baseline.Args(**shared), data)


# ----------------------------------------------------------------------------------------------------------------
# End to end (tests/test_scripts.py's tiny budget with one env and 5 denoising steps: the 280-step evaluation
# episodes cost most): one uninterrupted run, and the same run interrupted and resumed
# ----------------------------------------------------------------------------------------------------------------
TINY = [
    "--env-id", "Kitchen-Complete-v0", "--seed", "3", "--pretrain-steps", "50", "--pretrained-dir", "pretrained",
    "--num-envs", "1", "--num-steps", "10", "--total-timesteps", "120", "--eval-episodes", "1", "--eval-frequency", "2",
    "--critic-warmup-iterations", "1", "--checkpoint-frequency", "1", "--replay-ratio", "0.2", "--num-candidates", "2",
    "--actor-hidden", "64", "64", "64", "--critic-hidden", "32", "32", "--critic-batch-size", "32",
    "--actor-batch-size", "32", "--eval-protocols", "single", "select", "--denoising-steps", "5",
]
ITERATIONS, ENV_STEPS = 3, 120  # 120 // (1 env * 10 decisions * 4 actions per chunk)


def wait_for(pattern: str, cwd: Path, process) -> Path:
    for _ in range(3000):
        found = [path for path in cwd.glob(pattern) if "partial" not in path.name]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.1)
    raise TimeoutError(pattern)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`whole` pre-trains and runs uninterrupted; `cut`, the same run, starts once the pre-trained file exists, is
    killed after its first checkpoint and resumed; then the finished `whole` is resumed once more (evaluation only)."""
    cwd = tmp_path_factory.mktemp("qsm_e2e")
    whole = start("qsm_baseline.py", TINY + ["--exp-name", "whole"], cwd)
    wait_for("pretrained/*.pt", cwd, whole)
    cut = start("qsm_baseline.py", TINY + ["--exp-name", "cut"], cwd)
    cut_checkpoint = wait_for("runs/*__cut__3__*/checkpoint.pt", cwd, cut)
    cut.kill()
    cut_log = cut.communicate()[0]
    interrupted = torch.load(cut_checkpoint, weights_only=False)
    resumed = start("qsm_baseline.py", ["--resume", str(cut_checkpoint.parent)], cwd)

    whole_log = finish(whole)
    (whole_dir,) = (cwd / "runs").glob("*__whole__3__*")
    result = {"cwd": cwd, "whole_dir": whole_dir, "cut_dir": cut_checkpoint.parent, "whole_log": whole_log,
              "cut_log": cut_log, "interrupted": interrupted, "whole_scalars": scalars(whole_dir),
              "whole_summary": json.loads((whole_dir / "summary.json").read_text()),
              "whole_checkpoint": torch.load(whole_dir / "checkpoint.pt", weights_only=False)}
    again = start("qsm_baseline.py", ["--resume", str(whole_dir)], cwd)
    finish(resumed)
    finish(again)
    return result


def test_summary_tensorboard_and_checkpoint(e2e):
    summary = e2e["whole_summary"]
    assert summary["exp_name"] == "whole" and summary["env_steps"] == ENV_STEPS and summary["iterations"] == ITERATIONS
    assert [entry["iteration"] for entry in summary["history"]] == [0, 2, 3]
    for key in ("pretrained", "final", "best"):
        assert 0 <= summary[key]["success_rate"] <= 1 and 0 <= summary[key]["normalized_score"] <= 100
        assert summary[key]["episodes"] == 1
    for entry in summary["history"]:  # the headline is the first protocol, `single`; every protocol is kept
        assert set(entry["protocols"]) == {"single", "select"}
        assert entry["normalized_score"] == entry["protocols"]["single"]["normalized_score"]
    assert summary["SPS"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["time_per_iteration_s"]) == {"env", "sampling", "critic", "ot", "actor", "eval"}
    assert summary["time_per_iteration_s"]["ot"] == 0 and summary["time_per_iteration_s"]["actor"] > 0

    logged = e2e["whole_scalars"]
    for tag in ("charts/success_rate", "charts/normalized_score", "charts/episodic_return",
                "eval_single/normalized_score", "eval_select/success_rate"):
        assert len(logged[tag]) == 3
    assert len(logged["losses/q"]) == ITERATIONS and len(logged["losses/actor"]) == ITERATIONS - 1  # 1 warm-up
    for tag in ("charts/SPS", "losses/q_values", "time/env", "time/sampling", "time/critic", "time/actor"):
        assert tag in logged
    assert not any(tag.startswith("ot/") or tag == "losses/v" for tag in logged)

    checkpoint = e2e["whole_checkpoint"]
    assert checkpoint["script"] == "qsm_baseline.py"
    assert checkpoint["iteration"] == ITERATIONS and checkpoint["global_step"] == ENV_STEPS
    assert {"policy", "qf", "qf_target", "q_optimizer", "actor_optimizer", "replay"} <= checkpoint.keys()
    assert "vf" not in checkpoint
    assert checkpoint["replay"]["size"] > ITERATIONS * 10  # demonstrations plus every online decision
    assert (e2e["whole_dir"] / "whole.pt").exists()
    # the shared pre-trained checkpoint: saved once by `whole`, loaded by `cut`
    assert "saved the pre-trained policy" in e2e["whole_log"] and "loaded the pre-trained policy" in e2e["cut_log"]
    pretrained = [path.name for path in (e2e["cwd"] / "pretrained").iterdir()]
    assert pretrained == [Path(summary["pretrained_checkpoint"]).name]  # one file, no partial state left


def test_resume_continues_an_interrupted_run_like_the_uninterrupted_one(e2e):
    """Up to the checkpoint the interrupted run is the uninterrupted one, number for number; after the resume it does
    the same work (env steps, evaluations, updates, buffer) and logs each step once. Numbers after the resume differ:
    the shared loop re-seeds the training envs at a resume, where the uninterrupted run continues its episodes."""
    whole, interrupted = e2e["whole_summary"], e2e["interrupted"]
    assert 1 <= interrupted["iteration"] < ITERATIONS
    summary = json.loads((e2e["cut_dir"] / "summary.json").read_text())
    assert summary["env_steps"] == ENV_STEPS and summary["iterations"] == ITERATIONS
    assert [entry["iteration"] for entry in summary["history"]] == [0, 2, 3]
    done = len(interrupted["history"])
    assert summary["history"][:done] == interrupted["history"] == whole["history"][:done]
    rows = interrupted["replay"]["size"]  # the same decisions, in the same order, up to the checkpoint
    for key, stored in interrupted["replay"]["data"].items():
        assert torch.equal(stored, e2e["whole_checkpoint"]["replay"]["data"][key][:rows])

    final = torch.load(e2e["cut_dir"] / "checkpoint.pt", weights_only=False)
    reference = e2e["whole_checkpoint"]
    assert final["replay"]["size"] == reference["replay"]["size"]
    for optimizer in ("q_optimizer", "actor_optimizer"):  # as many updates as the uninterrupted run, none redone
        assert final[optimizer]["state"][0]["step"] == reference[optimizer]["state"][0]["step"]
    logged = scalars(e2e["cut_dir"])
    assert len(logged["losses/q"]) == ITERATIONS and len(logged["eval_single/normalized_score"]) == 3


def test_resuming_a_finished_run_evaluates_the_restored_weights(e2e):
    """The finished `whole` resumed from its last checkpoint only evaluates again: the same scores and weights."""
    again = json.loads((e2e["whole_dir"] / "summary.json").read_text())
    assert again["history"] == e2e["whole_summary"]["history"]
    policy = torch.load(e2e["whole_dir"] / "whole.pt", weights_only=False)["policy"]
    assert all(torch.equal(policy[key], e2e["whole_checkpoint"]["policy"][key]) for key in policy)


BAD_INPUT = [
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--q-grad-scale", "0"], "--q-grad-scale must be positive"),
    (["--actor-lr", "-1"], "--actor-lr must be positive"),
    (["--tau", "1.5"], "--tau must lie in [0, 1]"),
    (["--env-id", "Kitchen-Compleat-v0"], "Unknown env id 'Kitchen-Compleat-v0'"),
    (["--resume", "runs/no_such_run"], "no checkpoint at runs/no_such_run"),
    (["--resume", "idql_run"], "checkpoint of idql_baseline.py"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[flags[0] for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    """In-process (runpy), so that the cases cost no interpreter start each."""
    (tmp_path / "idql_run").mkdir()
    torch.save({"script": "idql_baseline.py", "rng": {}}, tmp_path / "idql_run" / "checkpoint.pt")
    assert message in bad_input_error("qsm_baseline.py", flags, tmp_path, monkeypatch, capsys)

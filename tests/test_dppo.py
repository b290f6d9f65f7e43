"""dppo_baseline.py: DPPO's parts against known answers, then end to end on Kitchen-Complete-v0 with a tiny budget.

Each part test is built to fail under a one-line mistake: a swapped min/max or a reversed clip schedule in the
surrogate, a missing std floor, a truncation treated as a termination or an advantage that runs into the next
episode, a policy loss with the wrong sign, a sampler that is not the shared one.
"""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dppo_baseline as dppo
import idql_baseline
from tests.e2e import bad_input_error, finish, run_dir, scalars, start

ROOT = Path(__file__).resolve().parents[1]
# One env (no worker processes: the test's cost is start-up and env steps) x 70 decisions of 4 actions per iteration:
# every exploration episode (280 steps) is truncated on the iteration's last decision, so the value targets bootstrap
# from final_obs there; 2 iterations, the first value-only; envs reset every iteration, so that a resumed run can be
# compared with an uninterrupted one exactly.
TINY = [
    "--env-id", "Kitchen-Complete-v0", "--seed", "3", "--pretrain-steps", "50", "--pretrained-dir", "pretrained",
    "--num-envs", "1", "--num-steps", "70", "--total-timesteps", "560", "--eval-episodes", "1", "--eval-frequency", "2",
    "--critic-warmup-iterations", "1", "--checkpoint-frequency", "1", "--reset-at-iteration",
    "--actor-hidden", "64", "64", "64", "--critic-hidden", "32", "32", "32",
]
ITERATIONS, ENV_STEPS = 2, 560


# ----------------------------------------------------------------------------------------------------------------
# The clipped surrogate and its per-step clip schedule
# ----------------------------------------------------------------------------------------------------------------
def surrogate(log_ratio: float, advantage: float, k: int, args):
    """The loss of one pair and its gradient with respect to the new log-likelihood."""
    new_log_prob = torch.tensor([log_ratio], requires_grad=True)
    loss, _, clipfrac = dppo.ppo_policy_loss(new_log_prob, torch.zeros(1), torch.tensor([advantage]),
                                             torch.tensor([k]), args)
    loss.backward()
    return loss.item(), new_log_prob.grad.item(), clipfrac.item()


def test_clip_schedule_gives_the_noisiest_step_the_smallest_clip():
    args = dppo.Args(ft_denoising_steps=10, clip_coef=0.01, clip_coef_base=0.001, clip_coef_rate=3.0)
    eps = dppo.clip_coefficients(torch.arange(10), args)  # k = 0 (last step) ... 9 (noisiest fine-tuned step)
    assert eps[9].item() == pytest.approx(0.001) and eps[0].item() == pytest.approx(0.01)
    assert (eps[:-1] > eps[1:]).all()  # strictly smaller as the steps get noisier
    # exponential growth from the noisy end: the middle step is much nearer the base than the mean of the two ends
    assert eps[5].item() == pytest.approx(0.001 + 0.009 * math.expm1(3 * 4 / 9) / math.expm1(3))
    # DPPO's kitchen default is flat
    assert torch.allclose(dppo.clip_coefficients(torch.arange(10), dppo.Args()), torch.full((10,), 0.01))


@pytest.mark.parametrize("k", [0, 9])
def test_clipped_surrogate_is_bounded_by_the_clip_and_flat_beyond_it(k):
    args = dppo.Args(ft_denoising_steps=10, clip_coef=0.01, clip_coef_base=0.001, gamma_denoising=1.0)
    eps = dppo.clip_coefficients(torch.tensor(k), args).item()
    above, below = math.log(1 + 3 * eps), math.log(1 - 3 * eps)
    # A > 0: the gain is capped at (1 + eps) A and gives no gradient beyond it ...
    loss, grad, clipped = surrogate(above, 2.0, k, args)
    assert -loss == pytest.approx(2.0 * (1 + eps)) and grad == 0.0 and clipped == 1.0
    # ... while a ratio below 1 - eps is not clipped: PPO keeps the pessimistic (unclipped) term
    loss, grad, clipped = surrogate(below, 2.0, k, args)
    assert -loss == pytest.approx(2.0 * (1 - 3 * eps)) and grad == pytest.approx(-2.0 * (1 - 3 * eps)) and clipped == 1.0
    # A < 0: symmetric, the gradient vanishes below 1 - eps and not above 1 + eps
    loss, grad, _ = surrogate(below, -2.0, k, args)
    assert -loss == pytest.approx(-2.0 * (1 - eps)) and grad == 0.0
    loss, grad, _ = surrogate(above, -2.0, k, args)
    assert -loss == pytest.approx(-2.0 * (1 + 3 * eps)) and grad == pytest.approx(2.0 * (1 + 3 * eps))
    # inside the clip range the surrogate is r A, as in plain policy gradient
    loss, grad, clipped = surrogate(math.log(1 + eps / 2), 2.0, k, args)
    assert -loss == pytest.approx(2.0 * (1 + eps / 2)) and grad == pytest.approx(-2.0 * (1 + eps / 2)) and clipped == 0.0


def test_denoising_discount_weighs_the_noisier_steps_less():
    args = dppo.Args(ft_denoising_steps=10, gamma_denoising=0.9)
    loss_last, _, _ = surrogate(0.0, 1.0, 0, args)
    loss_noisy, _, _ = surrogate(0.0, 1.0, 9, args)
    assert loss_last == pytest.approx(-1.0) and loss_noisy == pytest.approx(-(0.9**9))


# ----------------------------------------------------------------------------------------------------------------
# The diffusion MDP: the chain sampler, the frozen and fine-tuned networks, the Gaussian step likelihood
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def policy_and_args():
    torch.manual_seed(0)
    args = dppo.Args(actor_hidden=(32, 32, 32), denoising_steps=20, ft_denoising_steps=10)
    return dppo.DiffusionPolicy(3, 2, args), args


def test_denoising_log_prob_is_the_gaussian_step_with_the_std_floor(policy_and_args):
    policy, args = policy_and_args
    obs, x = torch.randn(64, 3), torch.randn(64, 2)
    for k, expected_std in ((15, policy.posterior_std[15].item()), (0, 0.1)):  # sigma_0 = 0 is floored to 0.1
        assert expected_std >= 0.1
        steps = torch.full((64,), k)
        mean = dppo.denoising_mean(policy, x, steps, obs)
        x_next = mean + 0.5 * expected_std * torch.randn(64, 2)
        expected = torch.distributions.Normal(mean, expected_std).log_prob(x_next).mean(-1)
        torch.testing.assert_close(dppo.denoising_log_prob(policy, obs, x, x_next, steps, 0.1), expected)
    # a step far from the mean is clamped per dimension, as DPPO does, instead of dominating the ratio
    far = dppo.denoising_log_prob(policy, obs, x, mean + 10.0, steps, 0.1)
    torch.testing.assert_close(far, torch.full((64,), dppo.LOG_PROB_MIN))


def test_chain_sampler_is_the_shared_ddpm_sampler_and_keeps_the_fine_tuned_steps(policy_and_args):
    policy, args = policy_and_args
    obs = torch.randn(16, 3)
    torch.manual_seed(1)
    chain = dppo.sample_chain(policy, obs, args)
    torch.manual_seed(1)
    action = policy.sample(obs, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
    assert chain.shape == (16, args.ft_denoising_steps + 1, 2)
    torch.testing.assert_close(chain[:, -1].clamp(-1, 1), action, rtol=0, atol=0)
    # each recorded step is one Gaussian step of the sampler: noise at most noise_clip stds from its mean
    for j in range(args.ft_denoising_steps):
        k = torch.full((16,), args.ft_denoising_steps - 1 - j)
        std = policy.posterior_std[k][:, None].clamp(min=args.min_sampling_std)
        noise = (chain[:, j + 1] - dppo.denoising_mean(policy, chain[:, j], k, obs)) / std
        assert noise.abs().max() <= args.noise_clip + 1e-4 and noise.std() > 0.3


def test_only_the_last_ft_denoising_steps_use_the_trainable_copy(policy_and_args):
    policy, args = policy_and_args
    obs, x = torch.randn(8, 3), torch.randn(8, 2)
    pretrained = copy.deepcopy(policy)
    policy.network = dppo.FineTunedDenoiser(policy.network, args.ft_denoising_steps)
    # before fine-tuning the split policy is the pre-trained one: iteration 0 evaluates the shared checkpoint
    generator = lambda: torch.Generator().manual_seed(0)
    torch.testing.assert_close(policy.sample(obs, deterministic=True, generator=generator()),
                               pretrained.sample(obs, deterministic=True, generator=generator()), rtol=0, atol=0)
    assert not any(p.requires_grad for p in policy.network.frozen.parameters())
    with torch.no_grad():
        for p in policy.network.finetuned.parameters():
            p.add_(0.1)
    for k, changed in ((args.ft_denoising_steps - 1, True), (args.ft_denoising_steps, False)):
        steps = torch.full((8,), k)
        same = torch.equal(policy.network(x, steps, obs), pretrained.network(x, steps, obs))
        assert same != changed


def test_ppo_updates_move_the_policy_toward_the_rewarded_action():
    """One state, reward -|a - 0.5|^2: a few PPO iterations with the surrogate, the step likelihoods and the chain
    sampler of the script pull the sampled actions toward 0.5; the frozen first steps stay as they were."""
    torch.manual_seed(0)
    args = dppo.Args(denoising_steps=6, ft_denoising_steps=3, actor_hidden=(32, 32, 32), clip_coef=0.2,
                     clip_coef_base=0.1)
    policy = dppo.DiffusionPolicy(1, 1, args)
    policy.network = dppo.FineTunedDenoiser(policy.network, args.ft_denoising_steps)
    frozen = copy.deepcopy(policy.network.frozen.state_dict())
    optimizer = torch.optim.AdamW(policy.network.finetuned.parameters(), lr=3e-3, weight_decay=0.0)
    obs, target = torch.zeros(256, 1), 0.5
    pair_obs = obs.repeat_interleave(args.ft_denoising_steps, 0)
    pair_k = torch.arange(args.ft_denoising_steps - 1, -1, -1).repeat(len(obs))

    def distance():
        return (dppo.sample_chain(policy, obs, args)[:, -1].clamp(-1, 1) - target).abs().mean().item()

    before = distance()
    for iteration in range(15):
        chain = dppo.sample_chain(policy, obs, args)
        reward = -((chain[:, -1, 0].clamp(-1, 1) - target) ** 2)
        advantages = ((reward - reward.mean()) / (reward.std() + 1e-8)).repeat_interleave(args.ft_denoising_steps)
        x, x_next = chain[:, :-1].flatten(0, 1), chain[:, 1:].flatten(0, 1)
        with torch.no_grad():
            old = dppo.denoising_log_prob(policy, pair_obs, x, x_next, pair_k, args.min_logprob_std)
        for epoch in range(5):
            new = dppo.denoising_log_prob(policy, pair_obs, x, x_next, pair_k, args.min_logprob_std)
            loss, _, _ = dppo.ppo_policy_loss(new, old, advantages, pair_k, args)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert distance() < 0.3 * before
    assert all(torch.equal(frozen[key], value) for key, value in policy.network.frozen.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# GAE over decisions and the running reward scale
# ----------------------------------------------------------------------------------------------------------------
def test_gae_bootstraps_truncations_from_final_obs_and_never_crosses_an_episode_end():
    """Env 0: decision 1 terminates its episode, decision 2 is truncated (final_obs has V = 7), decision 3 starts a
    third episode that the rollout cuts (V(next obs) = 50). Env 1: one episode throughout. gamma = lambda = 0.5.
    DPPO's GAE (D21) would bootstrap decision 2 from the reset state's value and carry decision 3's advantage into it."""
    t = lambda *rows: torch.tensor(rows, dtype=torch.float32).T  # rows per env -> (steps, envs)
    rewards = t([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    values = t([10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0])
    next_values = t([20.0, 99.0, 7.0, 50.0], [0.0, 0.0, 0.0, 8.0])  # 99: V of a terminal state, must not count
    terminated = t([0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    done = t([0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    advantages, returns = dppo.compute_gae(rewards, values, next_values, terminated, done, gamma=0.5, gae_lambda=0.5)
    a3 = 4 + 0.5 * 50 - 40  # -11
    a2 = 3 + 0.5 * 7 - 30  # -23.5: bootstrapped from final_obs, and no a3 in it
    a1 = 2 - 20  # -18: terminated, no bootstrap, no a2 in it
    a0 = 1 + 0.5 * 20 - 10 + 0.25 * a1  # -3.5
    b3 = 1 + 0.5 * 8
    b2 = 1 + 0.25 * b3
    b1 = 1 + 0.25 * b2
    b0 = 1 + 0.25 * b1
    torch.testing.assert_close(advantages, t([a0, a1, a2, a3], [b0, b1, b2, b3]))
    torch.testing.assert_close(returns, advantages + values)


def test_running_reward_scale_divides_by_the_std_of_discounted_returns_that_restart_with_episodes():
    scaler = dppo.RunningRewardScaler(num_envs=1, gamma=0.5)
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0]]).numpy()
    starts = torch.tensor([[1.0], [0.0], [1.0], [0.0]]).numpy()  # two episodes of two decisions
    scaled = scaler(rewards, starts)
    returns = torch.tensor([1.0, 1.5, 1.0, 1.5], dtype=torch.float64)  # restarted at the second episode
    count = 1e-4 + 4
    delta = returns.mean().item()
    var = (1.0 * 1e-4 + returns.var(unbiased=False).item() * 4 + delta**2 * 1e-4 * 4 / count) / count
    assert scaler.var == pytest.approx(var)
    assert scaled[:, 0] == pytest.approx([1 / math.sqrt(var + 1e-8)] * 4)
    assert scaler.returns[0] == pytest.approx(1.5)  # carried into the next iteration's rollout


# ----------------------------------------------------------------------------------------------------------------
# End to end: summary, TensorBoard, checkpoints, the shared pre-trained file, exact --resume, bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """The whole run in one folder, and beside it (at the same time: two cores) a run stopped at its first
    checkpoint, which pre-trains the same weights for itself; that run is then resumed to the whole budget."""
    whole, cut = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("cut")
    processes = [start("dppo_baseline.py", TINY, whole), start("dppo_baseline.py", TINY + ["--exp-name", "cut", "--total-timesteps", "280"], cut)]
    whole_log, _ = finish(processes[0]), finish(processes[1])
    # the stopped run is asked to go on: the same Args but the whole budget (its checkpoint is at iteration 1)
    checkpoint_file = run_dir(cut, "cut") / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    assert checkpoint["iteration"] == 1
    checkpoint["args"]["total_timesteps"] = ENV_STEPS
    torch.save(checkpoint, checkpoint_file)
    resume_log = finish(start("dppo_baseline.py", ["--resume", str(checkpoint_file.parent)], cut))
    return whole, cut, whole_log, resume_log


def test_summary_tensorboard_and_checkpoint(workdirs):
    whole, _, log, _ = workdirs
    path = run_dir(whole, "dppo_baseline")
    summary = json.loads((path / "summary.json").read_text())
    assert summary["env_steps"] == ENV_STEPS and summary["iterations"] == ITERATIONS
    assert [entry["iteration"] for entry in summary["history"]] == [0, 2]
    for key in ("pretrained", "final", "best"):
        assert 0 <= summary[key]["success_rate"] <= 1 and 0 <= summary[key]["normalized_score"] <= 100
        assert summary[key]["episodes"] == 1
    assert set(summary["history"][0]["protocols"]) == {"single"}
    assert summary["SPS"] > 0 and summary["wall_time_s"] > 0
    assert set(summary["time_per_iteration_s"]) == {"env", "sampling", "critic", "ot", "actor", "eval"}
    assert summary["time_per_iteration_s"]["ot"] == 0 and summary["time_per_iteration_s"]["actor"] > 0

    logged = scalars(path)
    for tag in ("charts/success_rate", "charts/normalized_score", "eval_single/normalized_score"):
        assert len(logged[tag]) == 2
    for tag in ("losses/v", "losses/explained_variance", "charts/SPS", "time/env", "time/critic", "time/actor"):
        assert len(logged[tag]) == ITERATIONS
    for tag in ("losses/actor", "losses/approx_kl", "losses/clipfrac"):
        assert len(logged[tag]) == ITERATIONS - 1  # not during the one critic warm-up iteration
    assert len(logged["charts/train_episodic_return"]) == ITERATIONS  # truncated once per iteration
    assert not any(tag.startswith(("ot/", "losses/q")) for tag in logged)

    checkpoint = torch.load(path / "checkpoint.pt", weights_only=False)
    assert checkpoint["script"] == "dppo_baseline.py"
    assert checkpoint["iteration"] == ITERATIONS and checkpoint["global_step"] == ENV_STEPS
    assert set(checkpoint) >= {"policy", "vf", "actor_optimizer", "critic_optimizer", "reward_scaler", "rng"}
    # the shared pre-trained file: the frozen copy still is its network, the fine-tuned copy has moved
    assert "loaded the pre-trained policy" not in log and "saved the pre-trained policy" in log
    (pretrained_file,) = (whole / "pretrained").glob("*.pt")
    assert summary["pretrained_checkpoint"] == str(Path("pretrained") / pretrained_file.name)
    pretrained = torch.load(pretrained_file, weights_only=False)["policy"]
    final = torch.load(path / "dppo_baseline.pt", weights_only=False)["policy"]
    networks = [key[len("network."):] for key in pretrained if key.startswith("network.")]
    assert all(torch.equal(final[f"network.frozen.{key}"], pretrained[f"network.{key}"]) for key in networks)
    assert not all(torch.equal(final[f"network.finetuned.{key}"], pretrained[f"network.{key}"]) for key in networks)


def test_every_method_derives_the_same_pretrained_file():
    """Same env, data, seed and pre-training flags: the same file as idql_baseline.py (and so as otpr.py)."""
    data = {"observations": np.zeros((3, 60), np.float32), "actions": np.ones((3, 9), np.float32)}
    assert dppo.pretrained_checkpoint_path(dppo.Args(), data) == \
        idql_baseline.pretrained_checkpoint_path(idql_baseline.Args(), data)
    assert dppo.PRETRAIN_FIELDS == idql_baseline.PRETRAIN_FIELDS


def test_resume_continues_exactly_as_an_uninterrupted_run(workdirs):
    whole, cut, _, resume_log = workdirs
    assert "resumed" in resume_log
    uninterrupted = json.loads((run_dir(whole, "dppo_baseline") / "summary.json").read_text())
    resumed = json.loads((run_dir(cut, "cut") / "summary.json").read_text())
    assert resumed["env_steps"] == ENV_STEPS and resumed["history"] == uninterrupted["history"]
    a = torch.load(run_dir(whole, "dppo_baseline") / "checkpoint.pt", weights_only=False)
    b = torch.load(run_dir(cut, "cut") / "checkpoint.pt", weights_only=False)
    for key in ("policy", "vf"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert a["reward_scaler"]["var"] == b["reward_scaler"]["var"]


BAD_INPUT = [
    (["--num-envs", "0"], "--num-envs must be positive"),
    (["--clip-coef", "1.5"], "--clip-coef must lie in [0, 1]"),
    (["--gae-lambda", "-0.1"], "--gae-lambda must lie in [0, 1]"),
    (["--min-logprob-std", "0"], "--min-logprob-std must be positive"),
    (["--ft-denoising-steps", "30"], "--ft-denoising-steps 30 exceeds --denoising-steps 20"),
    (["--num-envs", "1", "--num-steps", "1", "--ft-denoising-steps", "1"], "--num-minibatches 5 leaves fewer than 2"),
    (["--env-id", "Kitchen-Compleat-v0"], "Unknown env id 'Kitchen-Compleat-v0'"),
    (["--resume", "runs/no_such_run"], "no checkpoint at runs/no_such_run"),
    (["--resume", "idql_run"], "checkpoint of idql_baseline.py"),
    (["--actor-hidden", "256", "128", "256"], "--actor-hidden 256 128 256: the residual denoising MLP has one width"),
    (["--critic-hidden", "256", "256"], "--critic-hidden 256 256: the residual value network has one width"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[" ".join(flags) for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    """In-process (runpy), so that the cases cost no interpreter start each."""
    (tmp_path / "idql_run").mkdir()
    torch.save({"script": "idql_baseline.py"}, tmp_path / "idql_run" / "checkpoint.pt")
    assert message in bad_input_error("dppo_baseline.py", flags, tmp_path, monkeypatch, capsys)

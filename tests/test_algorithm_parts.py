"""The parts shared by otpr.py and idql_baseline.py, and OTPR's actor objectives, each against a known answer.

Each test is built to fail under a one-line mistake: a flipped expectile, a dropped terminal mask, ignored actor
weights, a broken chunking of the demonstrations, a uniform choice among candidates, or biased episode counting.
"""
import copy
import dataclasses
import importlib
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import idql_baseline
import otpr

BOTH = pytest.mark.parametrize("module", [otpr, idql_baseline], ids=["otpr", "idql"])


def linear_twin_q(module, obs_dim, action_dim, weight):
    """Twin Q that both compute weight . [obs, action] exactly (no hidden layer)."""
    qf = module.TwinQ(obs_dim, action_dim, ())
    for q in (qf.q1, qf.q2):
        q[0].weight.data.copy_(torch.as_tensor(weight, dtype=torch.float32)[None])
        q[0].bias.data.zero_()
    return qf


@BOTH
def test_value_is_the_upper_expectile_of_q(module):
    """V(s) trained by update_critics on Q(s, a) = a, a ~ U[-1, 1], converges to the 0.9-expectile, which is 0.5:
    0.9 (1 - v)^2 = 0.1 (1 + v)^2. A flipped expectile gives -0.5."""
    torch.manual_seed(0)
    args = module.Args(expectile=0.9, tau=0.0, gamma=0.99)
    qf_target = linear_twin_q(module, 1, 1, [0.0, 1.0]).requires_grad_(False)
    qf = copy.deepcopy(qf_target).requires_grad_(True)
    vf = module.mlp(1, (), 1)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=1e-3)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=2e-2)
    for _ in range(600):
        batch = {"obs": torch.zeros(512, 1), "actions": torch.rand(512, 1) * 2 - 1, "rewards": torch.zeros(512),
                 "next_obs": torch.zeros(512, 1), "terminated": torch.zeros(512)}
        module.update_critics(batch, qf, qf_target, vf, q_optimizer, v_optimizer, args)
    assert vf(torch.zeros(1, 1)).item() == pytest.approx(0.5, abs=0.05)


@BOTH
def test_td_target_stops_at_terminal_states(module):
    """With V = 10 everywhere, Q converges to r on terminal transitions and to r + gamma * 10 on the others."""
    torch.manual_seed(0)
    args = module.Args(gamma=0.9, tau=0.0)
    qf = module.TwinQ(1, 1, (32,))
    qf_target = copy.deepcopy(qf).requires_grad_(False)  # only feeds V, which does not learn here
    vf = module.mlp(1, (), 1)
    vf[0].weight.data.zero_()
    vf[0].bias.data.fill_(10.0)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=1e-2)
    v_optimizer = torch.optim.SGD(vf.parameters(), lr=0.0)  # V stays at 10
    batch = {"obs": torch.tensor([[-1.0], [1.0]]), "actions": torch.zeros(2, 1), "rewards": torch.tensor([1.0, 1.0]),
             "next_obs": torch.zeros(2, 1), "terminated": torch.tensor([1.0, 0.0])}
    for _ in range(1500):
        module.update_critics(batch, qf, qf_target, vf, q_optimizer, v_optimizer, args)
    q1, q2 = qf(batch["obs"], batch["actions"])
    torch.testing.assert_close(q1, torch.tensor([1.0, 10.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(q2, torch.tensor([1.0, 10.0]), atol=0.05, rtol=0)


@BOTH
def test_fused_adam_is_a_fast_path_to_the_same_critic_updates(module):
    """The scripts' fused optimizers (one kernel for every parameter) compute what the plain per-tensor Adam computes:
    after ten IQL critic updates at the paper's widths the weights agree within 1e-5 (a step moves a weight up to 1e-3)."""
    args = module.Args()
    batch = {"obs": torch.randn(256, 60), "actions": torch.rand(256, 36) * 2 - 1, "rewards": torch.rand(256),
             "next_obs": torch.randn(256, 60), "terminated": (torch.rand(256) < 0.1).float()}
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        qf = module.TwinQ(60, 36, args.critic_hidden)
        qf_target, vf = copy.deepcopy(qf).requires_grad_(False), module.mlp(60, args.critic_hidden, 1)
        optimizers = [torch.optim.Adam(net.parameters(), lr=args.critic_lr, fused=fused) for net in (qf, vf)]
        for _ in range(10):
            module.update_critics(batch, qf, qf_target, vf, *optimizers, args)
        weights[fused] = torch.cat([p.flatten() for net in (qf, qf_target, vf) for p in net.parameters()])
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=0)


@pytest.mark.parametrize("script", ["otpr", "otpr_pixels", "idql_baseline", "dql_baseline", "dppo_baseline",
                                    "qsm_baseline"])
def test_cpu_mish_is_a_fast_path_to_torch_mish(script):
    """Every script's Mish (on the CPU, the three-op form) computes F.mish's values and gradients, with autograd on and
    off, over the range where softplus switches to the identity (x > 20) and where it underflows."""
    mish = importlib.import_module(script).Mish()
    x = torch.cat([torch.linspace(-60, 60, 4001), torch.randn(4000) * 3]).double().requires_grad_(True)
    with torch.no_grad():
        torch.testing.assert_close(mish(x), torch.nn.functional.mish(x), atol=1e-12, rtol=1e-12)
    y = mish(x)
    (grad,) = torch.autograd.grad(y, x, torch.linspace(-1, 1, len(x), dtype=torch.float64))
    x_ref = x.detach().requires_grad_(True)
    y_ref = torch.nn.functional.mish(x_ref)
    (grad_ref,) = torch.autograd.grad(y_ref, x_ref, torch.linspace(-1, 1, len(x), dtype=torch.float64))
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12)


@BOTH
def test_demonstrations_are_cut_into_chunks_that_respect_episode_ends(module):
    """Episode 1: 5 steps ending in a terminal; episode 2: 4 steps ending in a timeout; chunks of 2."""
    t = np.arange(9, dtype=np.float32)
    dataset = {"observations": t[:, None], "actions": 10 + t[:, None], "rewards": 100 + t,
               "terminals": np.isin(np.arange(9), [4]), "timeouts": np.isin(np.arange(9), [8])}
    chunks = module.make_chunk_transitions(dataset, chunk_size=2)
    # starts 0-3 of episode 1 (the last one reaches the terminal, so it needs no next state) and 5-6 of episode 2
    # (start 7 would run into the timeout with no state after it)
    torch.testing.assert_close(chunks["obs"][:, 0], torch.tensor([0.0, 1, 2, 3, 5, 6]))
    torch.testing.assert_close(chunks["actions"], torch.tensor([[10.0, 11], [11, 12], [12, 13], [13, 14], [15, 16], [16, 17]]))
    torch.testing.assert_close(chunks["rewards"], torch.tensor([201.0, 203, 205, 207, 211, 213]))
    torch.testing.assert_close(chunks["next_obs"][:, 0], torch.tensor([2.0, 3, 4, 4, 7, 8]))
    torch.testing.assert_close(chunks["terminated"], torch.tensor([0.0, 0, 0, 1, 0, 0]))


class FixedCandidates:
    """A policy whose S samples for every state are the chunks -0.9, -0.3, 0.3 and 0.9."""

    values = torch.tensor([-0.9, -0.3, 0.3, 0.9])

    def sample(self, obs):
        return self.values.repeat(len(obs) // len(self.values))[:, None]


@BOTH
def test_candidates_are_drawn_in_proportion_to_their_weights(module):
    args = module.Args(num_candidates=4)
    obs = torch.zeros(4000, 1)
    obs[:1000] = 1.0  # states with a zero weight for every candidate
    weigh = lambda o, a: torch.where(o[..., 0] > 0, 0.0, torch.tensor([0.0, 0.0, 1.0, 3.0]).expand(len(o), 4))
    chosen, lever = module.select_candidates(obs, FixedCandidates().sample, weigh, args,
                                             generator=torch.Generator().manual_seed(0))
    assert chosen.shape == (4000, 1)
    assert lever["all_zero"][:1000].all() and not lever["all_zero"][1000:].any()
    # the lever of the weights 0, 0, 1, 3: an effective 1.6 candidates, the top one drawn 3/4 of the time; uniform: 4
    torch.testing.assert_close(lever["candidate_ess"][1000:], torch.full((3000,), 1.6))
    torch.testing.assert_close(lever["top_candidate_prob"][1000:], torch.full((3000,), 0.75))
    torch.testing.assert_close(lever["candidate_ess"][:1000], torch.full((1000,), 4.0))
    torch.testing.assert_close(lever["top_candidate_prob"][:1000], torch.full((1000,), 0.25))
    # mean distance over the 12 ordered pairs of -0.9, -0.3, 0.3, 0.9: (3 x 0.6 + 2 x 1.2 + 1.8) x 2 / 12 = 1.0
    torch.testing.assert_close(lever["candidate_spread"], torch.full((4000,), 1.0))
    weighted = chosen[1000:, 0]
    assert (weighted > 0).all() and (weighted > 0.5).float().mean() == pytest.approx(0.75, abs=0.03)
    uniform = chosen[:1000, 0]  # no mass anywhere: the policy's own distribution
    assert (uniform < 0).float().mean() == pytest.approx(0.5, abs=0.06)


@BOTH
def test_effective_sample_size_and_candidate_spread_of_known_vectors(module):
    ess = module.effective_sample_size
    torch.testing.assert_close(ess(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 5], [1, 1, 0, 0], [1, 3, 0, 0]])),
                               torch.tensor([4.0, 1.0, 2.0, 1.6]))
    assert ess(torch.zeros(3)) == 0
    # spread is a root mean square over the chunk's dimensions: two candidates (0, 0) and (1, 1) are 1 apart per dim
    candidates = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    lever = module.selection_lever(torch.ones(2, 2), candidates, torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(lever["candidate_spread"], torch.tensor([1.0, 0.0]))


class EpisodesOfKnownLength:
    """A vector env whose env i plays episodes of lengths[i] steps that succeed iff successes[i]."""

    def __init__(self, lengths, successes):
        self.num_envs, self.lengths, self.successes = len(lengths), np.array(lengths), np.array(successes)
        self.t = np.zeros(self.num_envs, dtype=int)

    def reset(self, seed=None):
        self.t[:] = 0
        return np.zeros((self.num_envs, 1), dtype=np.float32), {}

    def step(self, actions):
        self.t += 1
        done = self.t == self.lengths
        self.t[done] = 0
        info = {"final_info": {"normalized_score": 100.0 * self.successes, "success": self.successes.copy()}}
        reward = done * self.successes.astype(float)
        return np.zeros((self.num_envs, 1), np.float32), reward, done, np.zeros_like(done), info


class ZeroPolicy:
    def sample(self, obs, deterministic=False, min_std=0.0, noise_clip=3.0, generator=None):
        return torch.zeros(len(obs), 1)


@BOTH
@pytest.mark.parametrize("lengths, successes, episodes, expected", [
    ([1, 5], [True, False], 4, 0.5),  # the quick successes may not fill the evaluation
    ([1, 5, 3], [True, False, True], 2, 0.5),  # more envs than episodes: env 3 does not count
    ([2, 2, 7], [False, True, True], 7, 4 / 7),  # quotas 3 + 2 + 2, the first env failing
])
def test_evaluation_counts_a_fixed_quota_of_episodes_per_env(module, lengths, successes, episodes, expected):
    identity = module.Normalizer(np.array([-1.0]), np.array([1.0]))
    args = module.Args(eval_episodes=episodes)
    result = module.evaluate(EpisodesOfKnownLength(lengths, successes), ZeroPolicy(), None, identity, identity, args,
                             torch.device("cpu"), "single")
    assert result["episodes"] == episodes
    assert result["success_rate"] == pytest.approx(expected)
    assert result["normalized_score"] == pytest.approx(100 * expected)


def bimodal_replay(module, n=512):
    """One state, half of its actions at +0.8 and half at -0.8."""
    replay = module.ReplayBuffer(n, 1, 1, "cpu")
    actions = torch.where(torch.arange(n) % 2 == 0, 0.8, -0.8)[:, None]
    replay.add({"obs": torch.zeros(n, 1), "actions": actions, "rewards": torch.zeros(n), "next_obs": torch.zeros(n, 1),
                "terminated": torch.zeros(n)})
    return replay


def train_actor(policy, replay, weigh, transport_cost, args, optimizer, num_updates):
    """The actor phase of one iteration, as otpr.py runs it."""
    sample_exploring = partial(policy.sample, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
    for obs, actions, weights in otpr.actor_minibatches(sample_exploring, replay, weigh, args, num_updates):
        loss, _ = otpr.actor_loss(policy, obs, actions, weights, transport_cost, args)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def bimodal_policy():
    """A small diffusion policy behaviour-cloned on the bimodal replay buffer."""
    torch.manual_seed(0)
    args = otpr.Args(actor_hidden=(64, 64, 64), denoising_steps=10, actor_batch_size=256, actor_objective="buffer")
    policy = otpr.DiffusionPolicy(1, 1, args)
    train_actor(policy, bimodal_replay(otpr), None, None, args, torch.optim.Adam(policy.parameters(), lr=3e-3), 600)
    return policy, args


def fraction_positive(policy, n=400):
    return (policy.sample(torch.zeros(n, 1), deterministic=True) > 0).float().mean().item()


def test_the_pretrained_bimodal_policy_keeps_both_modes(bimodal_policy):
    policy, _ = bimodal_policy
    assert 0.3 < fraction_positive(policy) < 0.7


@pytest.mark.parametrize("objective", ["aligned", "plan", "resampled"])
def test_every_guided_objective_moves_the_policy_towards_the_weighted_actions(bimodal_policy, objective):
    """Weights 1 on a > 0 and 0 on a < 0: the guided objectives make the policy unimodal at +0.8; the unweighted
    `buffer` objective keeps both modes (above)."""
    policy, args = bimodal_policy
    policy = copy.deepcopy(policy)
    args = dataclasses.replace(args, actor_objective=objective, actor_batch_size=64, num_candidates=4,
                               guidance="advantage", min_sampling_std=0.05)
    weigh = lambda obs, actions: (actions[..., 0] > 0).float()
    torch.manual_seed(1)
    train_actor(policy, bimodal_replay(otpr), weigh, None, args, torch.optim.Adam(policy.parameters(), lr=1e-3), 150)
    assert fraction_positive(policy) > 0.9


def test_aligned_minibatches_weigh_each_distinct_buffer_row_once_with_its_own_weight():
    """The fast path (weights of the distinct rows drawn in the iteration) gives every minibatch the weights that
    weighing the minibatch itself gives."""
    torch.manual_seed(0)
    replay = otpr.ReplayBuffer(64, 3, 2, "cpu")
    replay.add({"obs": torch.randn(40, 3), "actions": torch.rand(40, 2), "rewards": torch.zeros(40),
                "next_obs": torch.zeros(40, 3), "terminated": torch.zeros(40)})
    weighed = []

    def weigh(obs, actions):
        weighed.append(len(obs))
        return obs.sum(-1) * actions.prod(-1)  # any function of the pair

    args = otpr.Args(actor_objective="aligned", actor_batch_size=32)
    minibatches = list(otpr.actor_minibatches(None, replay, weigh, args, num_updates=5))
    assert len(weighed) == 1 and weighed[0] <= 40  # one call, on distinct rows only (5 x 32 draws from 40 rows)
    for obs, actions, weights in minibatches:
        assert obs.shape == (32, 3) and actions.shape == (32, 2)
        torch.testing.assert_close(weights, obs.sum(-1) * actions.prod(-1))
        # every pair is a buffer row, not a mix of one row's state and another's action
        rows = (replay.data["obs"][:40, None] == obs[None]).all(-1).float().argmax(0)
        torch.testing.assert_close(replay.data["actions"][rows], actions)


def per_pair_stub():
    """A policy whose per-pair DSM loss is a known function of the pair: its value is |a - s|^2."""
    return SimpleNamespace(loss=lambda actions, obs: (actions - obs[:, :1]).pow(2).sum(-1))


def test_actor_loss_weighs_pairs_by_guidance_normalised_to_mean_one():
    obs, actions = torch.zeros(4, 1), torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # per-pair losses 1, 4, 9, 16
    args = otpr.Args(actor_objective="aligned", ot_mode="unsupervised")
    loss = lambda weights: otpr.actor_loss(per_pair_stub(), obs, actions, weights, None, args)[0]
    torch.testing.assert_close(loss(None), torch.tensor(7.5))
    torch.testing.assert_close(loss(torch.tensor([0.0, 0.0, 0.0, 1.0])), torch.tensor(16.0))  # weight 4 after normalising
    torch.testing.assert_close(loss(torch.tensor([1.0, 0.0, 1.0, 0.0])), loss(torch.tensor([5.0, 0.0, 5.0, 0.0])))
    torch.testing.assert_close(loss(torch.tensor([1.0, 0.0, 1.0, 0.0])), torch.tensor(5.0))
    lever = otpr.actor_loss(per_pair_stub(), obs, actions, torch.tensor([1.0, 0.0, 1.0, 0.0]), None, args)[1]
    assert lever["keypoint_loss_share"] == 0 and lever["batch_ess"] == 0.5  # no keypoint block; 2 of 4 pairs count
    assert otpr.actor_loss(per_pair_stub(), obs, actions, None, None, args)[1]["batch_ess"] == 1


def test_masked_mode_adds_the_keypoint_block_with_its_plan_mass():
    """(1 - m) x the weighted replay part + m x the keypoint part, m = K / (K + N) with K the keypoints drawn (here 2,
    fewer than --num-keypoints, as from a dataset of 2 chunks); none in the `buffer` objective. The keypoint share
    logged is the keypoint term's part of the loss."""
    args = otpr.Args(actor_objective="aligned", num_keypoints=128, ot_batch_size=6)
    keypoints = otpr.TransportCost(torch.zeros(2, 1), torch.tensor([[5.0], [7.0]]), args)
    assert keypoints.keypoint_mass == 0.25 and otpr.keypoint_mass(2, args) == 0.25
    assert keypoints.epsilon == pytest.approx(args.ot_epsilon / 0.75)
    obs, actions, weights = torch.zeros(3, 1), torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0.0, 1.0, 2.0])
    masked, lever = otpr.actor_loss(per_pair_stub(), obs, actions, weights, keypoints, args)
    replay_part = (torch.tensor([1.0, 4.0, 9.0]) * weights).mean()  # weights have mean 1
    torch.testing.assert_close(masked, 0.75 * replay_part + 0.25 * torch.tensor(37.0))
    torch.testing.assert_close(lever["keypoint_loss_share"], 0.25 * torch.tensor(37.0) / masked)
    torch.testing.assert_close(lever["batch_ess"], torch.tensor(9 / 15))  # (0 + 1 + 2)^2 / (3 x (0 + 1 + 4))
    unweighted, lever = otpr.actor_loss(per_pair_stub(), obs, actions, None, keypoints,
                                        dataclasses.replace(args, actor_objective="buffer"))
    torch.testing.assert_close(unweighted, torch.tensor(14 / 3))
    assert lever["keypoint_loss_share"] == 0


def test_score_matching_loss_is_one_value_per_pair_independent_of_the_batch(bimodal_policy):
    """policy.loss returns a value per pair; a pair's value depends on that pair (and its own noise) only, so that
    putting the keypoint block in the same batch as the replay pairs computes the same loss."""
    policy, _ = bimodal_policy
    obs, actions = torch.randn(6, 1), torch.rand(6, 1)
    torch.manual_seed(0)
    together = policy.loss(actions, obs)
    torch.manual_seed(0)
    k = torch.randint(policy.num_steps, (6,))
    noise = torch.randn_like(actions)
    for i in range(6):
        abar = policy.alphas_cumprod[k[i]]
        noisy = abar.sqrt() * actions[i] + (1 - abar).sqrt() * noise[i]
        alone = (policy.network(noisy[None], k[i : i + 1], obs[i : i + 1]) - noise[i]).pow(2).mean()
        torch.testing.assert_close(together[i], alone)


def test_q_guidance_is_normalised_per_state():
    """exp(beta (Q - V(s))): a state's weights do not depend on the other states in the batch."""
    torch.manual_seed(0)
    qf = linear_twin_q(otpr, 1, 1, [5.0, 1.0])  # Q = 5 s + a: states differ by far more than actions
    vf = otpr.mlp(1, (), 1)
    vf[0].weight.data.fill_(5.0)
    vf[0].bias.data.zero_()  # V(s) = 5 s
    args = otpr.Args(guidance="q", guidance_beta=2.0)
    cost = SimpleNamespace(fitted=False)
    obs, actions = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.5], [0.5]])
    w = otpr.guidance_weights(obs, actions, qf, vf, None, None, cost, args)
    torch.testing.assert_close(w, torch.exp(torch.tensor([1.0, 1.0])))  # equal advantages, equal weights
    alone = otpr.guidance_weights(obs[:1], actions[:1], qf, vf, None, None, cost, args)
    torch.testing.assert_close(alone, w[:1])


@BOTH
def test_a_non_finite_loss_stops_the_run_naming_the_step(module):
    module.check_finite(torch.tensor(1.5), "critic loss", 5)
    with pytest.raises(FloatingPointError, match="critic loss is nan at step 7: lower the learning rates"):
        module.check_finite(torch.tensor(float("nan")), "critic loss", 7)
    with pytest.raises(FloatingPointError, match="actor loss is inf at step 0"):
        module.check_finite(torch.tensor(float("inf")), "actor loss", 0)


@BOTH
def test_the_pretrained_file_changes_with_the_demonstrations_and_the_config(module):
    """A new generator version or an edited file must not reuse the policy pre-trained on the old data."""
    data = {"observations": np.arange(12, dtype=np.float32).reshape(4, 3), "actions": np.zeros((4, 2), np.float32)}
    path = module.pretrained_checkpoint_path(module.Args(), data)
    assert path == module.pretrained_checkpoint_path(module.Args(), {k: v.copy() for k, v in data.items()})
    assert path.parent == Path("runs/pretrained") and path.name.startswith("Kitchen-Complete-v0__d4rl__seed1__")
    edited_obs = {**data, "observations": data["observations"] + np.eye(4, 3, dtype=np.float32)}
    edited_actions = {**data, "actions": data["actions"] + 1}
    longer = module.Args(pretrain_steps=1000)
    others = [module.pretrained_checkpoint_path(module.Args(), edited_obs),
              module.pretrained_checkpoint_path(module.Args(), edited_actions),
              module.pretrained_checkpoint_path(longer, data)]
    assert len({path, *others}) == 4
    given = module.Args(pretrained_checkpoint="mine.pt")
    assert module.pretrained_checkpoint_path(given, data) == Path("mine.pt")


def test_pretraining_on_data_with_a_nan_stops_at_the_first_check(tmp_path):
    """The pre-training loss is read every 100 steps (not every step, which would stall a GPU): step 0 is one."""
    args = otpr.Args(actor_hidden=(16, 16, 16), denoising_steps=3, pretrain_steps=150, cuda_graphs=False)
    policy = otpr.DiffusionPolicy(2, 3, args)
    obs = torch.zeros(10, 2)
    obs[:, 0] = float("nan")
    writer = SimpleNamespace(add_scalar=lambda *a: None)
    with pytest.raises(FloatingPointError, match="pre-training loss is nan at step 0"):
        otpr.pretrain(policy, obs, torch.zeros(10, 3), args, writer, tmp_path / "partial.pt")


@BOTH
def test_runs_started_in_the_same_second_get_folders_of_their_own(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = [module.new_run_dir("Kitchen-Complete-v0__otpr__1__100") for _ in range(3)]
    assert [folder.name for folder in folders] == ["Kitchen-Complete-v0__otpr__1__100",
                                                   "Kitchen-Complete-v0__otpr__1__100_1",
                                                   "Kitchen-Complete-v0__otpr__1__100_2"]
    assert all(folder.is_dir() and folder.parent == Path("runs") for folder in folders)

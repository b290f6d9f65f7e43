"""The CUDA-graph path (CudaGraph, on by default on a GPU) computes what the plain path computes.

These tests need a GPU and are skipped without one (CI has none): run them on a GPU machine with
`python -m pytest tests/test_cuda_graphs.py`. docs/speed.md records where they last passed. Each test runs the same
updates from the same weights, inputs and seed twice, plainly and through CudaGraph (two eager warm-up calls, one
capture, replays), and compares the weights and losses after them. The tolerance, 1e-5 relative, allows for a
different but equally valid order of float32 sums; a dropped kernel, a stale input or a shifted random stream moves
the results by far more (the actor's weights move by about 1e-4 relative per update). Pre-training is graphed in
every script, the critic, actor and exploration in otpr.py and idql_baseline.py, the potential fit in otpr.py, and
otpr_pixels.py's critic update with the critics' own encoder (written without a GPU at hand: not yet run)."""
import copy
from functools import partial

import pytest
import torch

import dppo_baseline
import dql_baseline
import idql_baseline
import otpr
import otpr_pixels
import qsm_baseline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
MODULES = pytest.mark.parametrize("module", [otpr, idql_baseline], ids=["otpr", "idql"])
ALL_MODULES = [otpr, idql_baseline, dql_baseline, qsm_baseline, dppo_baseline]
UPDATES = 6  # two warm-up calls, the capture, three replays
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module):
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def random_batches(obs_dim, action_dim, batch_size):
    return [{"obs": torch.randn(batch_size, obs_dim, device="cuda"),
             "actions": torch.rand(batch_size, action_dim, device="cuda") * 2 - 1,
             "rewards": torch.rand(batch_size, device="cuda"),
             "next_obs": torch.randn(batch_size, obs_dim, device="cuda"),
             "terminated": (torch.rand(batch_size, device="cuda") < 0.1).float()} for _ in range(UPDATES)]


@MODULES
def test_graphed_critic_updates_equal_plain_ones(module):
    torch.manual_seed(0)
    args = module.Args(critic_hidden=(64, 64))
    qf = module.TwinQ(5, 8, args.critic_hidden).cuda()
    vf = module.mlp(5, args.critic_hidden, 1).cuda()
    nets = [{"qf": copy.deepcopy(qf), "qf_target": copy.deepcopy(qf).requires_grad_(False), "vf": copy.deepcopy(vf)}
            for _ in range(2)]
    for net in nets:
        net["q_optimizer"] = torch.optim.Adam(net["qf"].parameters(), lr=1e-3, fused=True, capturable=True)
        net["v_optimizer"] = torch.optim.Adam(net["vf"].parameters(), lr=1e-3, fused=True, capturable=True)
    plain, graphed = nets
    update = module.CudaGraph(partial(module.update_critics, **graphed, args=args), enabled=True)
    for batch in random_batches(5, 8, 256):
        expected = module.update_critics(batch, **plain, args=args)
        stats = update(batch)
        for key in expected:
            torch.testing.assert_close(stats[key], expected[key], **TOLERANCE)
    assert update.graph is not None  # the last updates were replays
    for key in ("qf", "qf_target", "vf"):
        assert_same_weights(plain[key], graphed[key])


def actor_setup(module, seed=0):
    torch.manual_seed(seed)
    args = module.Args(actor_hidden=(64, 64, 64), denoising_steps=5)
    policy = module.DiffusionPolicy(5, 8, args).cuda()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3, fused=True, capturable=True)
    return args, policy, optimizer


def test_graphed_otpr_actor_updates_equal_plain_ones():
    """Weighted DSM with the keypoint block, the default objective: includes the random steps and noise of the loss."""
    transport_cost = otpr.TransportCost(torch.randn(128, 5), torch.rand(128, 8) * 2 - 1, otpr.Args()).cuda()
    batches = [(b["obs"], b["actions"], b["rewards"] + 0.1) for b in random_batches(5, 8, 128)]
    results = []
    for graphs in (False, True):
        args, policy, optimizer = actor_setup(otpr)

        def actor_step(obs, actions, weights):
            loss, _ = otpr.actor_loss(policy, obs, actions, weights, transport_cost, args)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        step = otpr.CudaGraph(actor_step, enabled=graphs)
        torch.cuda.manual_seed(1)
        losses = torch.stack([step(*batch).clone() for batch in batches])
        results.append((losses, policy))
    (plain_losses, plain_policy), (graphed_losses, graphed_policy) = results
    torch.testing.assert_close(graphed_losses, plain_losses, **TOLERANCE)
    assert_same_weights(plain_policy, graphed_policy)


def test_graphed_idql_actor_updates_equal_plain_ones():
    batches = [(b["obs"], b["actions"]) for b in random_batches(5, 8, 128)]
    results = []
    for graphs in (False, True):
        args, policy, optimizer = actor_setup(idql_baseline)

        def actor_step(obs, actions):
            loss = policy.loss(actions, obs).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.detach()

        step = idql_baseline.CudaGraph(actor_step, enabled=graphs)
        torch.cuda.manual_seed(1)
        losses = torch.stack([step(*batch).clone() for batch in batches])
        results.append((losses, policy))
    torch.testing.assert_close(results[1][0], results[0][0], **TOLERANCE)
    assert_same_weights(results[0][1], results[1][1])


@MODULES
def test_graphed_exploration_samples_equal_plain_ones(module):
    """The 20-step DDPM loop with the std floor and noise clip, on fresh states every call."""
    args, policy, _ = actor_setup(module)
    sample = partial(policy.sample, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
    states = [torch.randn(32, 5, device="cuda") for _ in range(UPDATES)]
    torch.cuda.manual_seed(2)
    plain = [sample(s) for s in states]
    explore = module.CudaGraph(sample, enabled=True)
    torch.cuda.manual_seed(2)
    graphed = [explore(s).clone() for s in states]
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b, a, **TOLERANCE)
    with pytest.raises(ValueError, match="shape"):
        explore(torch.randn(16, 5, device="cuda"))


class NoWriter:
    def add_scalar(self, *args):
        pass


@pytest.mark.parametrize("module", ALL_MODULES, ids=lambda m: m.__name__)
def test_graphed_pretraining_equals_plain(module, tmp_path):
    """Behaviour cloning with the learning-rate schedule set in place before each step, and the EMA, in every script."""
    dataset_obs, dataset_actions = torch.randn(500, 5, device="cuda"), torch.rand(500, 8, device="cuda") * 2 - 1
    results = []
    for graphs in (False, True):
        args = module.Args(actor_hidden=(64, 64, 64), denoising_steps=5, pretrain_steps=40, cuda_graphs=graphs)
        torch.manual_seed(0)
        policy = module.DiffusionPolicy(5, 8, args).cuda()
        losses = module.pretrain(policy, dataset_obs, dataset_actions, args, NoWriter(), tmp_path / "none.pt")
        results.append((losses, policy))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert_same_weights(results[0][1], results[1][1])


def test_graphed_potential_fit_equals_plain():
    """Chunks of 25 dual-ascent steps, replayed on fresh problems (as every OTPR iteration draws one)."""
    torch.manual_seed(0)
    problems = [(torch.randn(64, 5, device="cuda"), torch.rand(64, 8, device="cuda") * 2 - 1,
                 torch.randn(64, 64, device="cuda")) for _ in range(UPDATES)]
    results = []
    for graphs in (False, True):
        torch.manual_seed(1)
        u_net, v_net = otpr.mlp(5, (64, 64), 1, torch.nn.SiLU).cuda(), otpr.mlp(8, (64, 64), 1, torch.nn.SiLU).cuda()
        optimizer = torch.optim.Adam([*u_net.parameters(), *v_net.parameters()], lr=1e-3, fused=True, capturable=True)
        ascend = otpr.CudaGraph(partial(otpr.dual_ascent, u_net, v_net, optimizer, epsilon=0.2, num_steps=25), graphs)
        duals = torch.stack([ascend(states, actions, cost, None).clone() for states, actions, cost in problems])
        results.append((duals, u_net, v_net))
    torch.testing.assert_close(results[1][0], results[0][0], **TOLERANCE)
    assert_same_weights(results[0][1], results[1][1])
    assert_same_weights(results[0][2], results[1][2])


def test_graphed_pixel_critic_updates_with_their_own_encoder_equal_plain_ones():
    """otpr_pixels.py --critic-encoder own: the Q loss trains the ResNet-18 through randomly shifted images."""
    args = otpr_pixels.Args(critic_hidden=(64, 64), encoder_keypoints=4)
    feature_dim = 2 * 4 + 2  # one camera's keypoints, then the state
    batches = [{"pixels": torch.randint(256, (16, 1, 3, 64, 64), dtype=torch.uint8, device="cuda"),
                "state": torch.randn(16, 2, device="cuda"), **batch}
               for batch in random_batches(feature_dim, 8, 16)]
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        encoder = otpr_pixels.Encoder((1, 3, 64, 64), 2, args).cuda()
        qf = otpr_pixels.TwinQ(feature_dim, 8, args.critic_hidden).cuda()
        vf = otpr_pixels.mlp(feature_dim, args.critic_hidden, 1).cuda()
        q_parameters = [{"params": qf.parameters()}, {"params": encoder.parameters(), "lr": 1e-4}]
        nets = {"qf": qf, "qf_target": copy.deepcopy(qf).requires_grad_(False), "vf": vf,
                "q_optimizer": torch.optim.Adam(q_parameters, lr=1e-3, fused=True, capturable=True),
                "v_optimizer": torch.optim.Adam(vf.parameters(), lr=1e-3, fused=True, capturable=True)}
        update = otpr_pixels.CudaGraph(partial(otpr_pixels.update_critics, **nets, args=args, critic_encoder=encoder),
                                       graphs)
        torch.cuda.manual_seed(1)
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            losses = torch.stack([update({k: v for k, v in batch.items() if k != "obs"})["q_loss"].clone()
                                  for batch in batches])
        results.append((losses, encoder, qf))
    torch.testing.assert_close(results[1][0], results[0][0], **TOLERANCE)
    assert_same_weights(results[0][1], results[1][1])
    assert_same_weights(results[0][2], results[1][2])

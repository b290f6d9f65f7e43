"""The OT pieces of otpr.py against POT's exact L2-regularised OT (Blondel et al., 2018).

With uniform weights mu_i = 1/n, nu_j = 1/m, our problem min E_pi[c] + eps E_{mu x nu}[(d pi / d(mu x nu))^2] is POT's
min <pi, C> + (reg / 2) ||pi||^2 with reg = 2 eps n m, and the two duals coincide: u = alpha, v = beta.
"""
import copy
from functools import partial

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

import otpr

# Neural potentials fitted by `fit_potentials` must reproduce POT's plan within this total-variation distance.
PLAN_TV_TOLERANCE = 0.02


def pot_solution(cost: torch.Tensor, epsilon: float):
    n, m = cost.shape
    plan, log = ot.smooth.smooth_ot_dual(np.full(n, 1 / n), np.full(m, 1 / m), cost.double().numpy(),
                                         2 * epsilon * n * m, reg_type="l2", stopThr=1e-12, numItermax=5000, log=True)
    return plan, torch.as_tensor(log["alpha"]), torch.as_tensor(log["beta"])


def fit_tabular_potentials(cost, epsilon, mask=None, max_steps=6000, tolerance=0.005):
    """Potentials on one-hot inputs: the networks of otpr.py act as tables, so the fit can be exact."""
    torch.manual_seed(0)
    n, m = cost.shape
    u_net = otpr.mlp(n, (64, 64), 1, torch.nn.SiLU)
    v_net = otpr.mlp(m, (64, 64), 1, torch.nn.SiLU)
    optimizer = torch.optim.Adam([*u_net.parameters(), *v_net.parameters()], lr=1e-3)
    states, actions = torch.eye(n), torch.eye(m)
    ascend = partial(otpr.dual_ascent, u_net, v_net, optimizer, epsilon=epsilon, num_steps=25)
    stats = otpr.fit_potentials(ascend, u_net, v_net, states, actions, cost, epsilon, mask,
                                max_steps=max_steps, tolerance=tolerance, check_every=25)
    with torch.no_grad():
        h = otpr.compatibility(u_net(states), v_net(actions).T, cost, epsilon)
    return h if mask is None else h * mask, stats


@pytest.fixture
def cost():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 2, generator=generator), torch.randn(10, 2, generator=generator)
    return torch.cdist(x, y) ** 2


def test_compatibility_and_dual_match_pot_at_its_optimum(cost):
    epsilon = 0.05
    plan, alpha, beta = pot_solution(cost, epsilon)
    u, v, c = alpha[:, None], beta[None, :], cost.double()
    h = otpr.compatibility(u, v, c, epsilon)
    n, m = cost.shape
    np.testing.assert_allclose(h.numpy() / (n * m), plan, atol=1e-9)  # d pi = H d mu d nu (Eq. 6)
    # Eq. 5 equals POT's dual objective, which at the optimum equals the regularised primal value.
    primal = (plan * cost.double().numpy()).sum() + epsilon * n * m * (plan**2).sum()
    assert otpr.l2_dual_objective(u, v, c, epsilon).item() == pytest.approx(primal, rel=1e-6)
    # First-order optimality: E_a H = 1 for every state and E_s H = 1 for every action.
    np.testing.assert_allclose(h.mean(1).numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(h.mean(0).numpy(), 1, atol=1e-5)


def test_dual_is_smaller_away_from_the_optimum(cost):
    epsilon = 0.05
    _, alpha, beta = pot_solution(cost, epsilon)
    best = otpr.l2_dual_objective(alpha[:, None], beta[None], cost.double(), epsilon)
    perturbed = otpr.l2_dual_objective(alpha[:, None] + 0.05 * torch.randn(12, 1, dtype=torch.float64), beta[None],
                                       cost.double(), epsilon)
    assert perturbed < best


@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.5])
def test_fitted_potentials_recover_pot_plan(cost, epsilon):
    plan, _, _ = pot_solution(cost, epsilon)
    h, stats = fit_tabular_potentials(cost, epsilon)
    n, m = cost.shape
    ours = h.numpy() / (n * m)
    assert 0.5 * np.abs(ours - plan).sum() < PLAN_TV_TOLERANCE
    assert stats["residual_s"] < 0.005 and stats["residual_a"] < 0.005
    np.testing.assert_allclose(h.mean(1).numpy(), 1, atol=0.02)  # E_a H = 1 per state


def test_masked_ot_matches_keypoints_and_equals_pot_with_forbidden_pairs():
    generator = torch.Generator().manual_seed(1)
    num_keys, n = 3, 9
    size = num_keys + n
    cost = torch.rand(size, size, generator=generator)
    mask = torch.zeros(size, size)
    mask[num_keys:, num_keys:] = 1
    mask[range(num_keys), range(num_keys)] = 1
    epsilon = 0.05
    h, stats = fit_tabular_potentials(cost, epsilon, mask)
    plan = h / size**2
    # every keypoint state sends all its mass mu_k = 1 / size to its own keypoint action
    np.testing.assert_allclose(plan.diagonal()[:num_keys].numpy(), 1 / size, rtol=0.02)
    # masked rows and columns carry no mass
    assert plan[:num_keys, num_keys:].abs().max() == 0 and plan[num_keys:, :num_keys].abs().max() == 0
    # the masked problem is POT's problem with the masked pairs priced out
    reference, _, _ = pot_solution(cost + 100.0 * (1 - mask), epsilon)
    assert 0.5 * np.abs(plan.numpy() - reference).sum() < PLAN_TV_TOLERANCE


def test_transport_cost_modes_and_separate_standardisation():
    torch.manual_seed(0)
    qf = otpr.TwinQ(5, 3, (16,))
    s, a = torch.randn(7, 5), torch.randn(7, 3)
    keys = (torch.randn(4, 5), torch.randn(4, 3))
    unsupervised = otpr.TransportCost(*keys, otpr.Args(ot_mode="unsupervised"))
    torch.testing.assert_close(unsupervised(qf, s, a), -qf.min(s, a))  # c = -Q (Eq. 8) before any rescaling
    guidance_only = otpr.TransportCost(*keys, otpr.Args(ot_mode="masked", ot_alpha=1.0))
    g = guidance_only(qf, s, a, all_pairs=True)
    assert g.shape == (7, 7) and (g >= 0).all() and (g <= np.log(2) + 1e-6).all()  # JS is in [0, ln 2]
    torch.testing.assert_close(g.diagonal(), guidance_only(qf, s, a))  # all pairs and aligned pairs agree
    mixed = otpr.TransportCost(*keys, otpr.Args(ot_mode="masked", ot_alpha=0.25))
    torch.testing.assert_close(mixed(qf, s, a), 0.75 * -qf.min(s, a) + 0.25 * guidance_only(qf, s, a))
    # A fit's problem sets the spread of -Q and of G separately: both terms enter with unit spread, whatever the
    # magnitude of Q, so alpha keeps its meaning as Q grows.
    for q_magnitude in (1.0, 1000.0):
        scaled_qf = copy.deepcopy(qf)
        for q in (scaled_qf.q1, scaled_qf.q2):
            q[-1].weight.data *= q_magnitude
            q[-1].bias.data *= q_magnitude
        cost = mixed(scaled_qf, s, a, all_pairs=True, rescale=True)
        negative_q = -scaled_qf.min(s[:, None].expand(-1, 7, -1), a[None].expand(7, -1, -1))
        expected = 0.75 * negative_q / negative_q.std() + 0.25 * g / g.std()
        torch.testing.assert_close(cost, expected)
        torch.testing.assert_close(mixed(scaled_qf, s, a), expected.diagonal())  # later costs use the same spreads


def test_cost_matrix_in_blocks_has_the_values_of_one_call():
    """The all-pairs cost is computed a block of states at a time (in_blocks): every pair exactly once and in place,
    whatever the block size, including blocks that do not divide the rows and inputs that are expanded views."""
    torch.manual_seed(0)
    qf = otpr.TwinQ(5, 3, (16,))
    s, a = torch.randn(7, 5), torch.randn(6, 3)
    pairs = s[:, None].expand(-1, 6, -1), a[None].expand(7, -1, -1)
    for pairs_per_block in (1, 6, 13, 100):
        torch.testing.assert_close(otpr.in_blocks(qf.min, *pairs, pairs_per_block=pairs_per_block), qf.min(*pairs))
    aligned = torch.randn(10, 5), torch.randn(10, 3)
    torch.testing.assert_close(otpr.in_blocks(qf.min, *aligned, pairs_per_block=3), qf.min(*aligned))
    # at the default block size a 90 x 70 problem takes two blocks (58 + 32 states)
    s, a = torch.randn(90, 5), torch.randn(70, 3)
    cost = otpr.TransportCost(torch.randn(4, 5), torch.randn(4, 3), otpr.Args(ot_mode="unsupervised"))
    expected = -qf.min(s[:, None].expand(-1, 70, -1), a[None].expand(90, -1, -1))
    torch.testing.assert_close(cost(qf, s, a, all_pairs=True), expected)


def test_masked_problem_separates_into_the_replay_block_and_closed_form_keypoints():
    """Eq. 14 with K keypoints and N replay samples = the replay-only problem at epsilon (K + N) / N carrying mass
    N / (K + N), plus mass 1 / (K + N) on each keypoint's own action (what otpr.py fits and adds)."""
    num_keys, n, epsilon = 3, 9, 0.05
    size = num_keys + n
    cost = torch.rand(size, size, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(size, size)
    mask[num_keys:, num_keys:] = 1
    mask[range(num_keys), range(num_keys)] = 1
    full, _, _ = pot_solution(cost + 100.0 * (1 - mask), epsilon)  # masked pairs priced out

    args = otpr.Args(num_keypoints=num_keys, ot_batch_size=n, ot_epsilon=epsilon)
    assert otpr.keypoint_mass(num_keys, args) == pytest.approx(num_keys / size)
    replay_epsilon = otpr.TransportCost(torch.zeros(num_keys, 2), torch.zeros(num_keys, 2), args).epsilon
    assert replay_epsilon == pytest.approx(epsilon * size / n)
    replay_block, _, _ = pot_solution(cost[num_keys:, num_keys:], replay_epsilon)
    separated = np.zeros((size, size))
    separated[num_keys:, num_keys:] = (1 - otpr.keypoint_mass(num_keys, args)) * replay_block
    separated[range(num_keys), range(num_keys)] = otpr.keypoint_mass(num_keys, args) / num_keys
    np.testing.assert_allclose(separated, full, atol=1e-6)

    # and the neural fit of the replay block alone reproduces POT's replay block
    h, _ = fit_tabular_potentials(cost[num_keys:, num_keys:], replay_epsilon)
    assert 0.5 * np.abs(h.numpy() / n**2 - replay_block).sum() < PLAN_TV_TOLERANCE
    assert otpr.keypoint_mass(128, otpr.Args(ot_mode="unsupervised")) == 0.0


def test_relation_vectors_and_js():
    torch.manual_seed(0)
    keys = torch.randn(5, 3)
    r = otpr.relation_vectors(torch.randn(8, 3), keys, tau=0.1)
    torch.testing.assert_close(r.sum(-1), torch.ones(8))
    assert otpr.relation_vectors(keys, keys, tau=0.01).argmax(-1).tolist() == list(range(5))  # nearest is itself
    assert otpr.js_divergence(r, r).abs().max() < 1e-6
    one_hot = torch.eye(5)
    assert otpr.js_divergence(one_hot[0], one_hot[1]).item() == pytest.approx(np.log(2), abs=1e-6)


class TableQ:
    """Q(s, a) = s^T Q a on one-hot states and actions: a critic whose value of every pair is known."""

    def __init__(self, table):
        self.table = table

    def min(self, obs, actions):
        return ((obs @ self.table) * actions).sum(-1)


class FixedDraws:
    """A replay buffer whose draws are fixed: states on the first call, actions on the second (fit_transport's order)."""

    def __init__(self, states, actions):
        self.draws = [{"obs": states}, {"actions": actions}]

    def sample(self, batch_size, keys):
        draw = self.draws.pop(0)
        assert len(next(iter(draw.values()))) == batch_size and set(draw) == set(keys)
        return draw


@pytest.mark.parametrize("ot_mode", ["masked", "unsupervised"])
def test_the_fit_and_every_use_of_h_solve_the_one_problem_pot_solves(ot_mode):
    """fit_transport on a critic with a known table, then H where the guidance uses it, against POT's plan for the cost
    built here from the paper's formulas: (1 - alpha) (-Q) / std + alpha JS / std (Eq. 8, 13-14) at the replay block's
    epsilon (K + N) / N x eps. Any one-line disagreement between the fit and its uses (a transposed pair matrix, the
    cost or epsilon of one and not the other, the spreads reset at use, the `fitted` flag never set) fails here; the
    states and actions are as many (n = m), so a transposition does not fail on shapes."""
    n, num_keys, epsilon = 10, 6, 0.05
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(n, n, generator=generator) * 3  # not symmetric: the orientation matters
    states, actions = torch.eye(n), torch.eye(n)
    keypoint_obs, keypoint_actions = torch.rand(num_keys, n, generator=generator), torch.rand(num_keys, n, generator=generator)
    args = otpr.Args(ot_mode=ot_mode, ot_epsilon=epsilon, ot_batch_size=n, num_keypoints=num_keys, ot_alpha=0.5,
                     ot_max_steps=6000, ot_tolerance=0.005, ot_check_every=25)
    transport_cost = otpr.TransportCost(keypoint_obs, keypoint_actions, args)
    qf, vf = TableQ(table), lambda obs: torch.zeros(*obs.shape[:-1], 1)
    torch.manual_seed(0)
    u_net, v_net = otpr.mlp(n, (64, 64), 1, torch.nn.SiLU), otpr.mlp(n, (64, 64), 1, torch.nn.SiLU)
    optimizer = torch.optim.Adam([*u_net.parameters(), *v_net.parameters()], lr=1e-3)
    ascend = partial(otpr.dual_ascent, u_net, v_net, optimizer, epsilon=transport_cost.epsilon, num_steps=25)
    weigh = partial(otpr.guidance_weights, qf_target=qf, vf=vf, u_net=u_net, v_net=v_net,
                    transport_cost=transport_cost, args=args)
    all_pairs = states[:, None].expand(-1, n, -1), actions[None].expand(n, -1, -1)
    before_fit = weigh(*all_pairs)  # before the first fit: IDQL's weights on the sign of Q - V
    torch.testing.assert_close(before_fit, torch.where(table > 0, 0.7, 0.3))

    otpr.fit_transport(ascend, u_net, v_net, qf, transport_cost, FixedDraws(states, actions), args)

    negative_q = -table
    if ot_mode == "masked":
        relation = lambda x, keys: torch.softmax(-(1 - F.normalize(x, dim=-1) @ F.normalize(keys, dim=-1).T) / 0.1, -1)
        guide = otpr.js_divergence(relation(states, keypoint_obs)[:, None], relation(actions, keypoint_actions)[None])
        cost, replay_epsilon = 0.5 * negative_q / negative_q.std() + 0.5 * guide / guide.std(), epsilon * (num_keys + n) / n
    else:
        cost, replay_epsilon = negative_q / negative_q.std(), epsilon
    plan, _, _ = pot_solution(cost, replay_epsilon)
    fitted_h = otpr.compatibility(u_net(states), v_net(actions).T, transport_cost(qf, states, actions, all_pairs=True),
                                  transport_cost.epsilon).detach()
    assert 0.5 * np.abs(fitted_h.numpy() / n**2 - plan).sum() < PLAN_TV_TOLERANCE
    # H where candidates are selected and pairs weighted: the same values, on any subset of pairs (3 states' here)
    torch.testing.assert_close(weigh(states[:3, None].expand(-1, n, -1), actions[None].expand(3, -1, -1)), fitted_h[:3])
    # the plan moves mass: it is not the independent coupling, so H is not flat
    assert 0.5 * np.abs(plan - 1 / n**2).sum() > 0.3
    # a resumed run restores the fit: the flag and the spreads travel in the state dict
    restored = otpr.TransportCost(keypoint_obs, keypoint_actions, args)
    restored.load_state_dict(transport_cost.state_dict())
    assert restored.fitted and restored.q_scale == transport_cost.q_scale and restored.g_scale == transport_cost.g_scale


def test_h_is_blind_to_any_part_of_the_cost_that_depends_on_the_state_or_the_action_alone(cost):
    """The plan, hence H, is the same for c(s, a) and c(s, a) + f(s) + g(a): u absorbs f and v absorbs g (u - f and
    v - g are optimal for the shifted cost). So the guidance can only prefer, among one state's candidates, what the
    critic prefers at that state relative to other states: an action that Q rates higher at every state gains nothing
    (docs/otpr.md, "How much the guidance acts"). ot_diagnostics' candidate_v_cost_correlation measures this in a run."""
    epsilon = 0.05
    generator = torch.Generator().manual_seed(2)
    f, g = torch.randn(12, 1, generator=generator) * 5, torch.randn(1, 10, generator=generator) * 5
    plan, alpha, beta = pot_solution(cost, epsilon)
    shifted_plan, shifted_alpha, shifted_beta = pot_solution(cost + f + g, epsilon)
    np.testing.assert_allclose(shifted_plan, plan, atol=1e-6)  # entries about 1e-2
    h = otpr.compatibility(alpha[:, None], beta[None], cost.double(), epsilon)
    shifted_h = otpr.compatibility(shifted_alpha[:, None], shifted_beta[None], (cost + f + g).double(), epsilon)
    np.testing.assert_allclose(shifted_h.numpy(), h.numpy(), atol=1e-5)
    # the potentials carry the shift: v rises with g, one for one (up to a constant traded with u)
    np.testing.assert_allclose((shifted_beta - beta - g[0].double()).numpy(), (shifted_beta - beta - g[0].double())[0].item(),
                               atol=1e-5)


def test_correlation_of_rows():
    x = torch.tensor([[1.0, 2, 3, 4], [1, 1, 1, 1], [4, 3, 2, 1]])
    y = torch.tensor([[2.0, 4, 6, 8], [1, 2, 3, 4], [1, 2, 3, 4]])
    torch.testing.assert_close(otpr.correlation(x, y), torch.tensor([1.0, 0.0, -1.0]))
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    np.testing.assert_allclose(otpr.correlation(x, y).numpy(), [np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)],
                               atol=1e-6)

"""Measures why otpr.py fits the potentials on the replay block only (docs/otpr.md, implementation detail 7).

    python -m utils.masked_ot_probe

Builds the Eq. 12-14 problem on the real kitchen demonstrations twice, with otpr.py's defaults: (a) the joint masked
problem, K keypoint pairs prepended to N replay states and actions with the keypoint mask, and (b) the replay block
alone under the same keypoint-guided cost, at the epsilon the masked problem gives it (otpr.keypoint_mass). Each is
refitted on fresh draws for a few rounds (warm-started), and the plan is checked on held-out draws. Q is an untrained
critic, so the cost is mostly the keypoint guidance.
"""
import time
from functools import partial

import numpy as np
import torch

import otpr
from utils.datasets import load_dataset


def main(rounds: int = 4, max_steps: int = 3000) -> None:
    torch.manual_seed(0)
    args = otpr.Args()
    data = load_dataset(args.env_id)
    chunks = otpr.make_chunk_transitions(data, args.chunk_size)
    obs = otpr.Normalizer(data["observations"].min(0), data["observations"].max(0)).normalize(chunks["obs"])
    low, high = (np.tile(f(data["actions"], 0), args.chunk_size) for f in (np.min, np.max))
    actions = otpr.Normalizer(low, high).normalize(chunks["actions"])
    qf = otpr.TwinQ(obs.shape[1], actions.shape[1], (256, 256, 256))
    keys = torch.randperm(len(obs))[: args.num_keypoints]
    cost_fn = otpr.TransportCost(obs[keys], actions[keys], args)
    num_keys, n = args.num_keypoints, args.ot_batch_size

    def problem(joint: bool):
        states, acts = obs[torch.randint(len(obs), (n,))], actions[torch.randint(len(obs), (n,))]
        cost = cost_fn(qf, states, acts, all_pairs=True)
        if not joint:
            return states, acts, cost, None
        size = num_keys + n
        full, mask = torch.zeros(size, size), torch.zeros(size, size)
        full[num_keys:, num_keys:], mask[num_keys:, num_keys:] = cost, 1
        full[range(num_keys), range(num_keys)] = cost_fn(qf, cost_fn.keypoint_obs, cost_fn.keypoint_actions)
        mask[range(num_keys), range(num_keys)] = 1
        return torch.cat([cost_fn.keypoint_obs, states]), torch.cat([cost_fn.keypoint_actions, acts]), full, mask

    for joint in (True, False):
        u_net = otpr.mlp(obs.shape[1], args.ot_hidden, 1, torch.nn.SiLU)
        v_net = otpr.mlp(actions.shape[1], args.ot_hidden, 1, torch.nn.SiLU)
        optimizer = torch.optim.Adam([*u_net.parameters(), *v_net.parameters()], lr=args.ot_lr)
        for round_ in range(rounds):
            states, acts, cost, mask = problem(joint)
            spread = cost[mask > 0].std() if joint else cost.std()
            epsilon = args.ot_epsilon if joint else cost_fn.epsilon
            start = time.perf_counter()
            ascend = partial(otpr.dual_ascent, u_net, v_net, optimizer, epsilon=epsilon, num_steps=args.ot_check_every)
            fit = otpr.fit_potentials(ascend, u_net, v_net, states, acts, cost / spread, epsilon, mask,
                                      max_steps=max_steps, tolerance=args.ot_tolerance, check_every=args.ot_check_every)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                states, acts, cost, mask = problem(joint)
                h = otpr.compatibility(u_net(states), v_net(acts).T, cost / spread, epsilon)
                heldout = otpr.marginal_residuals(h, mask)
            print(f"{'joint masked' if joint else 'replay block'} round {round_}: {fit['steps']} steps in "
                  f"{seconds:.1f} s, fit residuals {fit['residual_s']:.3f} / {fit['residual_a']:.3f}, "
                  f"held-out residuals {heldout[0]:.3f} / {heldout[1]:.3f}")


if __name__ == "__main__":
    main()

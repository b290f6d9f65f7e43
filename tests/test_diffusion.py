"""The DDPM of otpr.py trained on a known 2-D mixture reproduces its modes and weights."""
import numpy as np
import pytest
import torch

import otpr

MODES = torch.tensor([[-0.6, -0.5], [0.6, -0.5], [0.0, 0.6]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
STD = 0.05


def mixture(n, generator):
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MODES[component] + STD * torch.randn(n, 2, generator=generator)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = otpr.DiffusionPolicy(obs_dim=1, action_dim=2, args=otpr.Args(actor_hidden=(128, 128, 128)))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3000)
    obs = torch.zeros(512, 1)
    for _ in range(3000):
        loss = model.loss(mixture(512, generator), obs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


def assignment(samples):
    distance = torch.cdist(samples, MODES)
    return distance.min(1).values, distance.argmin(1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_sampler_reproduces_modes_and_weights(policy, deterministic):
    generator = torch.Generator().manual_seed(1)
    samples = policy.sample(torch.zeros(4000, 1), deterministic=deterministic, generator=generator)
    distance, component = assignment(samples)
    assert (distance < 5 * STD).float().mean() > 0.85  # samples lie on the modes
    frequencies = torch.bincount(component, minlength=3).float() / len(samples)
    np.testing.assert_allclose(frequencies.numpy(), WEIGHTS.numpy(), atol=0.05)


def test_deterministic_sampler_is_a_function_of_the_seed(policy):
    obs = torch.zeros(16, 1)
    first = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(3))
    second = policy.sample(obs, deterministic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_exploration_std_floor_spreads_samples(policy):
    generator = torch.Generator().manual_seed(2)
    samples = policy.sample(torch.zeros(4000, 1), min_std=0.1, generator=generator)
    distance, _ = assignment(samples)
    assert distance.mean() > assignment(policy.sample(torch.zeros(4000, 1), generator=generator))[0].mean()


def test_cosine_schedule():
    model = otpr.DiffusionPolicy(obs_dim=1, action_dim=2, args=otpr.Args(actor_hidden=(8,)))
    abar = model.alphas_cumprod
    assert abar.shape == (20,) and (abar[1:] < abar[:-1]).all()
    assert abar[-1] < 1e-3 and abar[0] > 0.99  # ends at (almost) pure noise, starts at (almost) clean
    assert model.posterior_std[0] == 0  # the last reverse step adds no noise

"""bridger_baseline.py: the interpolant, its losses and samplers against known answers, each source against what it
claims, then end to end on every task family with a tiny budget (CPU, about a minute together).

Each unit test is built to fail under a one-line mistake: a coefficient or derivative of the interpolant off, a loss
with a flipped sign or the wrong head, the latent noise left out of x_t or of the drift's target, a sampler on the
wrong time grid or step, the SDE's score term with the wrong sign or scale, a source that ignores the state or fits
the wrong moments, the source's loss never added, a trained file not reused, a resumed run that evaluates again.
"""
import dataclasses
import json
import math
import time

import pytest
import torch

import bridger_baseline as bridger
from tests.e2e import bad_input_error, finish, scalars, start, write_pendulum_demonstrations
from tests.test_robomimic_scripts import SMALL_FILES


def args_with(**changes) -> bridger.Args:
    return dataclasses.replace(bridger.Args(actor_hidden=(32, 32, 32), cvae_hidden=(32, 32), cvae_latent_dim=2),
                               **changes)


# ----------------------------------------------------------------------------------------------------------------
# The interpolant and its losses
# ----------------------------------------------------------------------------------------------------------------
def test_the_interpolant_starts_at_the_source_and_ends_at_the_demonstration():
    ends = bridger.interpolant(torch.tensor([0.0, 1.0]))
    assert ends["w0"].flatten().tolist() == [1.0, 0.0] and ends["w1"].flatten().tolist() == [0.0, 1.0]
    assert ends["gamma"].flatten().tolist() == [0.0, 0.0]  # no latent noise at either end
    x0, x1, z = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    for t, expected in ((0.0, x0), (1.0, x1)):
        assert torch.allclose(bridger.interpolate(x0, x1, z, torch.full((3,), t), 0.5), expected)


def test_the_interpolants_time_derivatives_match_finite_differences():
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    c, ahead, behind = (bridger.interpolant(t + s) for s in (0.0, h, -h))
    for name in ("w0", "w1", "gamma"):
        numeric = (ahead[name] - behind[name]) / (2 * h)
        assert torch.allclose(c["d" + name], numeric, atol=1e-6), name
    assert torch.allclose(c["w0"], (1 - t[:, None]) ** 3)  # the paper's power3 weights
    assert torch.allclose(c["gamma"] ** 2, 2 * t[:, None] * (1 - t[:, None]))


def test_each_loss_against_its_hand_computed_value():
    """One pair, one dimension, t = 0.25: w0 = 27/64, w0' = -27/16, w1' = 27/16, gamma = sqrt(0.375),
    gamma' = 0.5 / sqrt(0.375); x0 = 1, x1 = -1, z = 2, d = 0.1; the heads v = 0.5, s = -1, b = 2."""
    x0, x1, z, t = torch.tensor([[1.0]]), torch.tensor([[-1.0]]), torch.tensor([[2.0]]), torch.tensor([0.25])
    losses = bridger.interpolant_losses(torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([[2.0]]),
                                        x0, x1, z, t, noise_scale=0.1)
    interpolant_velocity = -27 / 16 * 1 + 27 / 16 * -1  # = -3.375
    assert losses["velocity"].item() == pytest.approx(0.5 * 0.25 - interpolant_velocity * 0.5)  # 1.8125
    assert losses["score"].item() == pytest.approx(0.5 * 1 + 2 * -1)  # -1.5
    drift_target = interpolant_velocity + 0.1 * (0.5 / math.sqrt(0.375)) * 2
    assert losses["drift"].item() == pytest.approx(0.5 * 4 - drift_target * 2)
    assert bridger.interpolate(x0, x1, z, t, 0.1).item() == pytest.approx(27 / 64 - 37 / 64 + 0.1 * math.sqrt(0.375) * 2)


def test_each_loss_is_minimised_by_its_conditional_expectation():
    """With x_t fixed (one state of the pair), the heads that minimise the summed loss are the batch means of their
    targets: E[dI/dt], -E[z] and E[dI/dt + d gamma' z]."""
    torch.manual_seed(0)
    n, t, d = 4096, torch.full((4096,), 0.3), 0.2
    x0, x1, z = torch.randn(n, 1), 2 + torch.randn(n, 1), torch.randn(n, 1)
    c = bridger.interpolant(t)
    targets = {"velocity": c["dw0"] * x0 + c["dw1"] * x1, "score": -z}
    targets["drift"] = targets["velocity"] + d * c["dgamma"] * z
    best = {name: target.mean() for name, target in targets.items()}
    for name in best:
        def total(value):
            heads = {key: torch.full((n, 1), float(best[key])) for key in best}
            heads[name] = torch.full((n, 1), float(value))
            return bridger.interpolant_losses(heads["velocity"], heads["score"], heads["drift"], x0, x1, z, t, d)[name].mean()
        assert total(best[name]) < min(total(best[name] + 0.05), total(best[name] - 0.05)), name


def test_the_policys_loss_is_the_three_losses_of_its_draws_plus_the_sources():
    torch.manual_seed(0)
    args = args_with(source="cvae", noise_scale=0.2)
    obs, actions = torch.randn(16, 3), torch.rand(16, 2) * 2 - 1
    policy = bridger.InterpolantPolicy(3, 2, bridger.make_source(args, 3, actions), args)
    torch.manual_seed(1)
    loss = policy.loss(actions, obs)
    torch.manual_seed(1)  # the same draws, in the loss's order: source sample, t, z, then the CVAE's latent
    x0 = policy.source.sample(obs)
    t = bridger.T_MIN + (1 - 2 * bridger.T_MIN) * torch.rand(16)
    z = torch.randn_like(actions)
    x_t = bridger.interpolate(x0, actions, z, t, 0.2)
    expected = sum(bridger.interpolant_losses(*policy.heads(x_t, t, obs), x0, actions, z, t, 0.2).values())
    expected = expected + policy.source.loss(actions, obs)
    assert loss.shape == (16,) and torch.allclose(loss, expected, atol=1e-6)
    # the CVAE learns through this loss; the interpolant's draws do not reach it
    loss.mean().backward()
    assert policy.source.decoder[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling: with the exact drift and score, the samplers carry the source onto the known target
# ----------------------------------------------------------------------------------------------------------------
def gaussian_heads(mean: float, std: float, d: float):
    """The exact (v, s, b) of the interpolant from N(0, 1) to N(mean, std^2), independent, per dimension:
    x_t ~ N(w1 mean, w0^2 + w1^2 std^2 + d^2 gamma^2), and each head is a regression on x_t - w1 mean."""
    def heads(x, t, obs):
        c = bridger.interpolant(t)
        variance = c["w0"] ** 2 + c["w1"] ** 2 * std**2 + d**2 * c["gamma"] ** 2
        centered = (x - c["w1"] * mean) / variance
        expected_x0, expected_x1 = c["w0"] * centered, mean + c["w1"] * std**2 * centered
        expected_z = d * c["gamma"] * centered
        velocity = c["dw0"] * expected_x0 + c["dw1"] * expected_x1
        return velocity, -expected_z, velocity + d * c["dgamma"] * expected_z
    return heads


@pytest.mark.parametrize("deterministic, d", [(True, 0.0), (True, 0.3), (False, 0.3)], ids=["ode", "ode_noisy", "sde"])
def test_sampling_with_the_exact_fields_transports_the_source_onto_the_target(deterministic, d):
    torch.manual_seed(0)
    args = args_with(source="gaussian", noise_scale=d if d else 1e-3)
    policy = bridger.InterpolantPolicy(1, 1, bridger.make_source(args, 1, torch.zeros(4, 1)), args)
    policy.heads = gaussian_heads(mean=0.4, std=0.1, d=d)
    generator = torch.Generator().manual_seed(0)
    x, _ = policy.sample(torch.zeros(20000, 1), num_steps=400, deterministic=deterministic, generator=generator)
    assert x.mean().item() == pytest.approx(0.4, abs=0.01) and x.std().item() == pytest.approx(0.1, abs=0.01)


def test_the_euler_steps_land_a_point_target_exactly():
    """Toward a single chunk x* with d = 0 the drift is b = -3 (x - x*) / (1 - t), and Euler's factor 1 - 3 dt / (1 - t)
    is 0 on the step that starts at t = 1 - 3 dt: from any source sample, 4 or more steps on the grid t_n = n / N land
    on x* exactly. (With 3 that step is t = 0, taken as T_MIN; with 2 the factors are about -1/2 and -2: the sample
    ends near where it started.)"""
    args = args_with(source="data", noise_scale=1e-3)
    demonstrations = torch.rand(64, 3) * 2 - 1
    policy = bridger.InterpolantPolicy(1, 3, bridger.make_source(args, 1, demonstrations), args)
    target = torch.tensor([0.3, -0.2, 0.1])
    policy.heads = lambda x, t, obs: (None, None, -3 * (x - target) / (1 - t[:, None]))
    obs, generator = torch.zeros(8, 1), torch.Generator().manual_seed(0)
    for num_steps in (4, 5, 10, 20):
        x1, x0 = policy.sample(obs, num_steps, deterministic=True, generator=generator)
        assert torch.allclose(x1, target, atol=1e-5) and not torch.allclose(x0, target, atol=0.1)
    x0 = policy.source.sample(obs, torch.Generator().manual_seed(1))
    assert torch.allclose(policy.transport(x0, obs, 2, deterministic=True), x0.clamp(-1, 1), atol=0.01)
    # what the run logs of the same transport: distances from the source and the sample to the demonstrated chunk
    demo = torch.rand(8, 3) * 2 - 1
    distances = bridger.transport_distances(policy, obs, demo, 10, torch.Generator().manual_seed(1))
    x0 = policy.source.sample(obs.repeat(2, 1), torch.Generator().manual_seed(1))  # the two samples per state it drew
    rms = lambda a, b: ((a - b) ** 2).mean().sqrt().item()
    assert distances["source_to_demo"] == pytest.approx(rms(x0, demo.repeat(2, 1)))
    assert distances["sample_to_demo"] == pytest.approx(rms(target.expand(8, 3), demo), abs=1e-5)
    assert distances["source_to_sample"] == pytest.approx(rms(x0, target.expand(16, 3)), abs=1e-5)
    assert distances["source_spread"] == pytest.approx(rms(*x0.chunk(2))) and distances["source_spread"] > 0.1
    assert distances["sample_spread"] == pytest.approx(0, abs=1e-5)  # every sample lands on the one target


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def test_the_data_source_has_the_demonstrations_mean_and_covariance():
    torch.manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [-0.2, 0.1, 0.05]])
    demonstrations = torch.randn(5000, 3) @ mixing.T + torch.tensor([0.5, -0.3, 0.1])
    source = bridger.make_source(args_with(source="data"), 2, demonstrations)
    assert torch.allclose(source.mean, demonstrations.mean(0), atol=1e-6)
    assert torch.allclose(source.cholesky @ source.cholesky.T, torch.cov(demonstrations.T), atol=1e-5)
    samples = source.sample(torch.zeros(200000, 2), torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), demonstrations.mean(0), atol=0.01)
    assert torch.allclose(torch.cov(samples.T), torch.cov(demonstrations.T), atol=0.01)
    standard = bridger.make_source(args_with(source="gaussian"), 2, demonstrations)
    samples = standard.sample(torch.zeros(200000, 2), torch.Generator().manual_seed(0))
    assert torch.allclose(samples.mean(0), torch.zeros(3), atol=0.01)
    assert torch.allclose(torch.cov(samples.T), torch.eye(3), atol=0.01)
    assert source.loss(demonstrations, torch.zeros(5000, 2)).abs().sum() == 0  # nothing to learn


def test_the_cvae_source_learns_the_chunk_of_each_state():
    """Two states, two chunks: after training on its loss alone, the CVAE's samples for each state lie near that
    state's chunk (a decoder that ignored the state would sample both states' chunks alike)."""
    torch.manual_seed(0)
    args = args_with(source="cvae", cvae_kl_weight=1.0)
    obs = torch.tensor([[1.0], [-1.0]]).repeat(128, 1)
    actions = torch.where(obs > 0, torch.tensor([0.6, -0.6]), torch.tensor([-0.5, 0.5])) + 0.05 * torch.randn(256, 2)
    source = bridger.make_source(args, 1, actions)
    optimizer = torch.optim.Adam(source.parameters(), lr=3e-3)
    for _ in range(600):
        loss = source.loss(actions, obs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(0)
    for state, chunk in ((1.0, [0.6, -0.6]), (-1.0, [-0.5, 0.5])):
        samples = source.sample(torch.full((512, 1), state), generator)
        assert torch.allclose(samples.mean(0), torch.tensor(chunk), atol=0.1), (state, samples.mean(0))


class Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


class LatentTwice(torch.nn.Module):
    """A decoder of a 2-dim chunk whose both dimensions are the (1-dim) latent, the last input."""

    def forward(self, x):
        return x[:, -1:].expand(-1, 2)


def test_the_cvae_loss_is_its_negative_elbo_per_dimension(monkeypatch):
    args = args_with(source="cvae", cvae_kl_weight=0.5, cvae_latent_dim=1)
    source = bridger.make_source(args, 1, torch.zeros(4, 2))
    mean, log_var = torch.tensor([[0.5]]), torch.tensor([[math.log(0.25)]])
    monkeypatch.setattr(source, "encoder", Constant(torch.cat([mean, log_var], dim=-1)))
    monkeypatch.setattr(source, "decoder", LatentTwice())
    monkeypatch.setattr(torch, "randn_like", torch.ones_like)  # the reparameterised latent: mean + std * 1 = 1.0
    loss = source.loss(torch.tensor([[0.3, -0.2]]), torch.zeros(1, 1))
    kl = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    assert loss.item() == pytest.approx(((1.0 - 0.3) ** 2 + (1.0 + 0.2) ** 2 + 0.5 * kl) / 2)


class RecordingPolicy:
    """Stands in for the policy in evaluate(): records how it is asked to sample, and moves the source's zero chunk
    to 0.5 in every dimension; its source records its own calls."""

    def __init__(self):
        self.calls = set()
        self.source = RecordingSource(self.calls)

    def sample(self, obs, num_steps, deterministic=False, generator=None):
        self.calls.add((num_steps, deterministic))
        return torch.full((len(obs), 8), 0.5), torch.zeros(len(obs), 8)


class RecordingSource:
    def __init__(self, calls):
        self.calls = calls

    def sample(self, obs, generator=None):
        self.calls.add(("source", None))
        return torch.zeros(len(obs), 8)


@pytest.mark.parametrize("protocol, call, moved", [("single", (7, True), 0.5), ("sde", (7, False), 0.5),
                                                   ("source", ("source", None), 0.0)])
def test_evaluation_samples_with_the_protocols_sampler_and_step_count(protocol, call, moved):
    args = bridger.Args(env_id="TwoGoals-v0", num_envs=1, eval_episodes=1)
    envs = bridger.make_vector_env(args, 0, 1)
    normalizer = bridger.Normalizer(-torch.ones(8).numpy(), torch.ones(8).numpy())
    obs_normalizer = bridger.Normalizer(-torch.ones(envs.single_observation_space.shape).numpy(),
                                        torch.ones(envs.single_observation_space.shape).numpy())
    policy = RecordingPolicy()
    result = bridger.evaluate(envs, policy, obs_normalizer, normalizer, args, torch.device("cpu"), protocol, 7)
    envs.close()
    assert policy.calls == {call} and result["episodes"] == 1
    assert result["source_to_sample"] == pytest.approx(moved)  # how far sampling moved the source's samples


# ----------------------------------------------------------------------------------------------------------------
# End to end: every task family, the trained file reused, resume, bad input
# ----------------------------------------------------------------------------------------------------------------
TINY = ["--seed", "3", "--pretrain-steps", "60", "--pretrained-dir", "pretrained", "--num-envs", "1",
        "--eval-episodes", "1", "--actor-hidden", "32", "32", "32", "--cvae-hidden", "16", "16",
        "--denoising-steps", "3", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per task family and source, at once, each in its own folder: {name: (folder, output)}."""
    pendulum = tmp_path_factory.mktemp("data") / "pendulum.hdf5"
    write_pendulum_demonstrations(pendulum)
    cases = {
        "kitchen_cvae": ["--env-id", "Kitchen-Complete-v0", "--eval-protocols", "single", "sde"],
        "kitchen_data": ["--env-id", "Kitchen-Complete-v0", "--source", "data"],
        "can_gaussian": ["--env-id", "Robomimic-Can-v0", "--dataset-path",
                         str(SMALL_FILES["Robomimic-Can-v0"]), "--source", "gaussian"],
        "square_data": ["--env-id", "Robomimic-Square-v0", "--dataset-path",
                        str(SMALL_FILES["Robomimic-Square-v0"]), "--source", "data"],
        "two_goals": ["--env-id", "TwoGoals-v0", "--eval-episodes", "8", "--num-envs", "8"],
        "pendulum": ["--env-id", "Pendulum-v1", "--dataset-path", str(pendulum)],
    }
    processes = {}
    for name, flags in cases.items():
        cwd = tmp_path_factory.mktemp(name)
        processes[name] = (cwd, start("bridger_baseline.py", [*TINY, *flags, "--exp-name", name], cwd))
    return {name: (cwd, finish(process)) for name, (cwd, process) in processes.items()}


def run_folder(cwd, name):
    (folder,) = (cwd / "runs").glob(f"*__{name}__3__*")
    return folder


@pytest.mark.parametrize("name", ["kitchen_cvae", "kitchen_data", "can_gaussian", "square_data", "two_goals", "pendulum"])
def test_a_run_trains_evaluates_every_step_count_and_logs_the_transport(runs, name):
    cwd, _ = runs[name]
    folder = run_folder(cwd, name)
    summary = json.loads((folder / "summary.json").read_text())
    assert [entry["denoising_steps"] for entry in summary["history"]] == [3, 2]
    assert summary["final"] == summary["history"][0]  # the first step count is the headline
    for entry in summary["history"]:
        assert set(entry["transport"]) == {"source_to_demo", "sample_to_demo", "source_to_sample", "source_spread",
                                           "sample_spread"}
        assert entry["transport"]["source_to_sample"] > 0  # sampling moved the source's samples
    logged = scalars(folder)
    assert len(logged["eval_single/normalized_score"]) == 2 and len(logged["transport/source_to_demo"]) == 2
    assert "losses/pretrain_interpolant" in logged
    (trained,) = (cwd / "pretrained").glob("*.pt")
    meta = torch.load(trained, weights_only=False)["meta"]
    assert meta["config"]["source"] == summary["source"]
    if name == "pendulum":  # no reference scores for a custom task: the "normalized score" is the return
        assert summary["final"]["normalized_score"] == pytest.approx(summary["final"]["episodic_return"])
        assert summary["final"]["episodic_return"] < 0
    if name in ("can_gaussian", "square_data"):  # DPPO's success rule: the score is the success rate in percent
        assert summary["final"]["normalized_score"] == 100 * summary["final"]["success_rate"]


def test_the_sde_protocol_is_evaluated_beside_the_ode(runs):
    summary = json.loads((run_folder(runs["kitchen_cvae"][0], "kitchen_cvae") / "summary.json").read_text())
    assert set(summary["history"][0]["protocols"]) == {"single", "sde"}


def test_a_second_run_reuses_the_trained_policy(runs):
    cwd, _ = runs["two_goals"]
    output = finish(start("bridger_baseline.py", [*TINY, "--env-id", "TwoGoals-v0", "--eval-episodes", "8",
                                                  "--num-envs", "8", "--exp-name", "again"], cwd))
    assert "loaded the trained policy" in output and "behaviour cloning" not in output
    first = json.loads((run_folder(cwd, "two_goals") / "summary.json").read_text())
    again = json.loads((run_folder(cwd, "again") / "summary.json").read_text())
    assert again["history"][0]["protocols"] == first["history"][0]["protocols"]  # same policy, same evaluation


def test_resume_continues_after_the_evaluations_done(runs):
    """A run killed after its first evaluation's checkpoint continues with the second only."""
    cwd, _ = runs["two_goals"]
    flags = [*TINY, "--env-id", "TwoGoals-v0", "--eval-episodes", "96", "--num-envs", "8", "--exp-name", "cut",
             "--denoising-steps", "3", "2", "4"]
    process = start("bridger_baseline.py", flags, cwd)
    for _ in range(1200):
        found = list((cwd / "runs").glob("*__cut__3__*/checkpoint.pt"))
        if found:
            break
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.1)
    process.kill()
    process.communicate()
    saved = torch.load(found[0], weights_only=False)
    assert len(saved["history"]) in (1, 2) and not (found[0].parent / "summary.json").exists()
    output = finish(start("bridger_baseline.py", ["--resume", str(found[0].parent)], cwd))
    assert f"resumed {found[0].parent.name} after {len(saved['history'])} of 3 evaluations" in output
    summary = json.loads((found[0].parent / "summary.json").read_text())
    assert [entry["denoising_steps"] for entry in summary["history"]] == [3, 2, 4]
    assert summary["history"][0] == saved["history"][0]  # kept, not evaluated again
    assert len(scalars(found[0].parent)["eval_single/normalized_score"]) == 3  # no point doubled


BAD_INPUT = [
    (["--env-id", "Kitchen-Compleat-v0"], "Unknown env id 'Kitchen-Compleat-v0'"),
    (["--env-id", "Kitchen-Complete-Pixels-v0"], "is a camera-image task"),
    (["--denoising-steps", "10", "0"], "--denoising-steps must be positive"),
    (["--noise-scale", "0"], "--noise-scale must be positive"),
    (["--cvae-kl-weight", "nan"], "--cvae-kl-weight must be a finite number"),
    (["--actor-hidden", "64", "32", "64"], "the residual denoising MLP has one width"),
    (["--exp-name", "../outside"], "must be a plain name"),
    (["--resume", "runs/no_such_run"], "no checkpoint at runs/no_such_run"),
    (["--pretrained-checkpoint", "ddpm.pt"], "holds another network: --source None (asked: cvae)"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[" ".join(flags[:2]) for flags, _ in BAD_INPUT])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, monkeypatch, capsys, flags, message):
    """A DDPM policy of the other scripts is not a BRIDGER policy: its file is refused, not loaded half-way."""
    torch.save({"meta": {"env_id": "Kitchen-Complete-v0", "obs_dim": 60, "action_dim": 36,
                         "config": {"actor_hidden": [512, 512, 512], "time_dim": 16, "denoising_steps": 20}},
                "policy": {}, "obs_normalizer": {}, "action_normalizer": {}}, tmp_path / "ddpm.pt")
    assert message in bad_input_error("bridger_baseline.py", flags, tmp_path, monkeypatch, capsys)


def test_resume_refuses_another_scripts_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "other").mkdir()
    torch.save({"script": "otpr.py", "run_name": "x", "rng": {}}, tmp_path / "other" / "checkpoint.pt")
    message = bad_input_error("bridger_baseline.py", ["--resume", "other"], tmp_path, monkeypatch, capsys)
    assert "is a checkpoint of otpr.py" in message

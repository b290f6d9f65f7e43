# BRIDGER (Chen et al., "Don't Start from Scratch: Behavioral Refinement via Interpolant-based Policy Diffusion",
# RSS 2024, arXiv 2402.16075): behaviour cloning with a stochastic interpolant that carries a sample of a source policy
# onto the demonstrated action chunk, instead of denoising from a standard Gaussian. Imitation only: no fine-tuning.
# Docs and measured results: docs/bridger.md. `diff idql_baseline.py bridger_baseline.py` shows the policy class that
# differs (and the fine-tuning that BRIDGER does not have).
import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.datasets import DatasetError, load_dataset
from utils.envs import make_env
from utils.runtime import (RateWatch, RunGuard, check_writable, finish_tracking, load_checkpoint, save_checkpoint,
                           save_summary, set_threads, start_tracking)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the run name)"""
    seed: int = 1
    """seed of the experiment (also selects the trained policy's file)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is present, run on it; otherwise fall back to the CPU with a message"""
    threads: int = 0
    """torch CPU threads (0: OMP_NUM_THREADS if set, else the cores other processes leave idle; utils/runtime.py)"""
    cuda_graphs: bool = True
    """on a GPU, replay each training step as one CUDA graph"""
    capture_video: bool = False
    """if toggled, record videos of the first evaluation env to `videos/<run_name>`"""
    track: bool = False
    """if toggled, mirror this run's TensorBoard logs, config and videos to Weights & Biases (utils/runtime.py)"""
    wandb_project_name: str = "otpr"
    """the Weights & Biases project (with --track)"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases team or user (with --track; default: your W&B default)"""
    wandb_tags: tuple[str, ...] = ()
    """tags of the Weights & Biases run (with --track); utils.benchmark adds the sweep's, the commit's and the preset's"""
    resume: Optional[str] = None
    """a run directory or checkpoint file to continue from (its saved Args are used, except `cuda` and `threads`)"""

    # Task and data
    env_id: str = "Kitchen-Complete-v0"
    """the environment id: Kitchen-{Complete,Mixed,Partial}-v0, Robomimic-{Can,Square}-v0, TwoGoals-v0 (TASK_DEFAULTS), or any Gymnasium id with Box spaces plus --dataset-path"""
    dataset_source: Literal["d4rl", "minari", "scripted"] = "d4rl"
    """where the demonstrations come from: kitchen: D4RL's HDF5 files (D4RL_DATASET_DIR) or Minari's D4RL/kitchen datasets; robomimic: utils/make_demos.py's scripted operators"""
    dataset_path: Optional[str] = None
    """an HDF5 file in D4RL's layout (robomimic's for Robomimic ids); overrides --dataset-source (required for other env ids)"""
    chunk_size: int = 4
    """actions per policy decision (action chunk), all executed open-loop"""

    # Interpolant policy and behaviour-cloning pre-training (the same budget as the other scripts' DDPM policy)
    source: Literal["gaussian", "data", "cvae"] = "cvae"
    """the source policy x0: a standard Gaussian, a Gaussian fitted to the demonstrated chunks, or a CVAE of the chunk given the state (the paper's informative source)"""
    noise_scale: float = 0.03
    """d, the scale of the interpolant's latent noise gamma(t) d z (the paper's beta_max)"""
    denoising_steps: tuple[int, ...] = (10,)
    """Euler steps from the source sample to the action chunk when sampling; each value is evaluated, the first is the headline"""
    time_dim: int = 16
    """width of the time embedding"""
    actor_hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the residual MLP of the three heads (DPPO's DiffusionMLP, as the DDPM policy's)"""
    cvae_latent_dim: int = 16
    """latent width of the CVAE source"""
    cvae_hidden: tuple[int, ...] = (256, 256)
    """hidden widths of the CVAE source's encoder and decoder"""
    cvae_kl_weight: float = 0.01
    """weight of the CVAE's KL term against its summed squared reconstruction error (1.0 loses the demonstrations' modes, docs/bridger.md)"""
    pretrain_steps: int = 80000
    """behaviour-cloning gradient steps (DPPO's kitchen recipe; docs/kitchen_complete.md has the sweep)"""
    pretrain_batch_size: int = 128
    """minibatch size of behaviour-cloning pre-training"""
    pretrain_lr: float = 1e-3
    """peak learning rate of pre-training (cosine decay to a tenth of it)"""
    ema_decay: float = 0.995
    """decay of the exponential moving average of the weights (the EMA weights are evaluated)"""
    pretrain_checkpoint_frequency: int = 5000
    """save the pre-training state every this many steps; an interrupted pre-training continues from it"""
    pretrained_dir: str = "runs/pretrained"
    """folder of the shared pre-trained checkpoints, one per env, dataset, seed and pre-training config"""
    pretrained_checkpoint: Optional[str] = None
    """load this pre-trained checkpoint instead of the one derived from the config"""

    # Evaluation, logging, checkpoints
    num_envs: int = 2
    """parallel evaluation environments (asynchronous when more than one)"""
    eval_episodes: int = 100
    """episodes per evaluation (same initial states and noise every time)"""
    eval_protocols: tuple[Literal["single", "sde", "source"], ...] = ("single",)
    """evaluation protocols, the first is the headline: one sample of the ODE dx = b dt (deterministic given the source sample), one of the paper's SDE, or the source's own sample, not transported (what the interpolant adds to it)"""


# Bad flag values end the run before it starts: numbers must be positive except these, and FRACTIONS lie in [0, 1].
MAY_BE_ZERO = ("seed", "threads", "ema_decay", "cvae_kl_weight")
FRACTIONS = ("ema_decay",)

# The tasks' settings of the other scripts' pre-training, so that BRIDGER trains on the same data for the same budget
# as the DDPM policy every fine-tuner starts from (Can: the 5,000-step start, docs/robomimic.md).
TASK_DEFAULTS = {
    "Robomimic-Can-v0": dict(dataset_source="scripted", pretrain_steps=5000),
    "Robomimic-Square-v0": dict(dataset_source="scripted"),
    "TwoGoals-v0": dict(dataset_source="scripted", actor_hidden=(128, 128, 128), pretrain_steps=5000,
                        pretrain_batch_size=256, num_envs=8, eval_episodes=48),
}


# ----------------------------------------------------------------------------------------------------------------
# Data: min-max normalisation, action chunks
# ----------------------------------------------------------------------------------------------------------------
class Normalizer:
    """Maps the dataset's [min, max] of every dimension to [-1, 1]; near-constant dimensions keep a small scale."""

    def __init__(self, low: np.ndarray, high: np.ndarray, min_half_range: float = 1e-2):
        self.center = torch.as_tensor((high + low) / 2, dtype=torch.float32)
        self.half_range = torch.as_tensor(np.maximum((high - low) / 2, min_half_range), dtype=torch.float32)

    def to(self, device):
        self.center, self.half_range = self.center.to(device), self.half_range.to(device)
        return self

    def normalize(self, x):
        return (x - self.center) / self.half_range

    def unnormalize(self, x):
        return x * self.half_range + self.center

    def state_dict(self):
        return {"center": self.center.cpu(), "half_range": self.half_range.cpu()}

    def load_state_dict(self, state):
        self.center, self.half_range = state["center"].to(self.center), state["half_range"].to(self.center)


def make_chunk_transitions(dataset: dict, chunk_size: int) -> dict:
    """Cuts every episode into (s_t, a_{t:t+C}, reward sum, s_{t+C}, terminated) decisions, the rewards summed as
    the online ActionChunk wrapper sums them. A chunk that would run past the episode end is kept only if the
    episode terminated there (no s_{t+C} is needed then)."""
    ends = np.flatnonzero(dataset["terminals"] | dataset["timeouts"])
    ends = np.union1d(ends, [len(dataset["actions"]) - 1])
    starts = np.concatenate([[0], ends[:-1] + 1])
    obs, actions, rewards, next_obs, terminated = [], [], [], [], []
    for start, end in zip(starts, ends):
        length = end - start + 1
        for t in range(length - chunk_size + 1):
            last = t + chunk_size  # index (within the episode) of the next decision's state
            if last == length and not dataset["terminals"][end]:
                continue
            obs.append(dataset["observations"][start + t])
            actions.append(dataset["actions"][start + t : start + last].reshape(-1))
            rewards.append(dataset["rewards"][start + t : start + last].sum())
            next_obs.append(dataset["observations"][start + min(last, length - 1)])
            terminated.append(last == length)
    if not obs:
        raise ValueError(f"the dataset has no episode of at least --chunk-size {chunk_size} steps")
    as_tensor = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return {"obs": as_tensor(obs), "actions": as_tensor(actions), "rewards": as_tensor(rewards),
            "next_obs": as_tensor(next_obs), "terminated": as_tensor(terminated)}



# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
class Mish(nn.Module):
    """Mish(x) = x tanh(softplus(x)): F.mish on a GPU, one fused kernel; on the CPU the three ops, whose vectorised
    kernels beat F.mish's forward and backward at every batch this code runs (docs/speed.md, item 4)."""

    def forward(self, x):
        return F.mish(x) if x.is_cuda else x * torch.tanh(F.softplus(x))


def mlp(input_dim: int, hidden: tuple[int, ...], output_dim: int, activation=Mish) -> nn.Sequential:
    layers, dim = [], input_dim
    for width in hidden:
        layers += [nn.Linear(dim, width), activation()]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, output_dim))


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("frequencies", torch.exp(-math.log(10000) * torch.arange(half) / (half - 1)))

    def forward(self, k):
        angles = k.float()[:, None] * self.frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """Pre-activation block y = x + W2 Mish(W1 Mish(x)), as in DPPO's residual MLP."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(Mish(), nn.Linear(width, width), Mish(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.net(x)


# ----------------------------------------------------------------------------------------------------------------
# Source policies: where the interpolant starts (Sec. III of the paper)
# ----------------------------------------------------------------------------------------------------------------
class GaussianSource(nn.Module):
    """x0 ~ N(mean, L L^T) whatever the state: the standard Gaussian (mean 0, L = I, what DDPM starts from) or a
    Gaussian fitted to the demonstrated chunks (fit)."""

    def __init__(self, mean, cholesky):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("cholesky", cholesky)

    @staticmethod
    def fit(actions):
        """The demonstrated chunks' mean and covariance (a little jitter keeps a constant dimension factorisable)."""
        centered = actions.double() - actions.double().mean(0)
        jitter = 1e-6 * torch.eye(actions.shape[1], dtype=torch.float64)
        covariance = centered.T @ centered / (len(actions) - 1) + jitter
        return GaussianSource(actions.double().mean(0).float(), torch.linalg.cholesky(covariance).float())

    def sample(self, obs, generator=None):
        noise = torch.randn(len(obs), len(self.mean), device=obs.device, generator=generator)
        return self.mean + noise @ self.cholesky.T

    def loss(self, actions, obs):
        return actions.new_zeros(len(actions))  # nothing to learn


class CVAESource(nn.Module):
    """x0 = decoder(s, u), u ~ N(0, I): a conditional VAE of the chunk given the state, the paper's informative source.
    It learns together with the interpolant: its loss (the negative ELBO, per dimension of the chunk) joins the
    interpolant's, whose training draws its samples without gradient."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.latent_dim, self.kl_weight = args.cvae_latent_dim, args.cvae_kl_weight
        self.encoder = mlp(obs_dim + action_dim, args.cvae_hidden, 2 * self.latent_dim)
        self.decoder = mlp(obs_dim + self.latent_dim, args.cvae_hidden, action_dim)

    def sample(self, obs, generator=None):
        latent = torch.randn(len(obs), self.latent_dim, device=obs.device, generator=generator)
        return self.decoder(torch.cat([obs, latent], dim=-1))

    def loss(self, actions, obs):
        mean, log_var = self.encoder(torch.cat([obs, actions], dim=-1)).chunk(2, dim=-1)
        latent = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        reconstruction = self.decoder(torch.cat([obs, latent], dim=-1))
        kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1)
        return (((reconstruction - actions) ** 2).sum(-1) + self.kl_weight * kl) / actions.shape[1]


def make_source(args: Args, obs_dim: int, actions) -> nn.Module:
    """The --source policy over normalised chunks; `actions` are the normalised demonstrated chunks (the data fit)."""
    if args.source == "gaussian":
        return GaussianSource(torch.zeros(actions.shape[1]), torch.eye(actions.shape[1]))
    if args.source == "data":
        return GaussianSource.fit(actions)
    return CVAESource(obs_dim, actions.shape[1], args)


# ----------------------------------------------------------------------------------------------------------------
# The stochastic interpolant from the source to the demonstrated chunk, its three heads and their losses
# ----------------------------------------------------------------------------------------------------------------
T_MIN = 1e-3  # t is drawn from [T_MIN, 1 - T_MIN] and integrated over it: gamma'(t) is infinite at 0 and 1


def interpolant(t) -> dict:
    """The paper's "power3" interpolant x_t = w0(t) x0 + w1(t) x1 + d gamma(t) z and its time derivatives, for t of
    shape (n,), as (n, 1) columns: w0 = (1 - t)^3, w1 = 1 - w0, gamma = sqrt(2 t (1 - t)). At t = 0 it is the source
    sample x0, at t = 1 the demonstrated chunk x1."""
    t = t[:, None]
    w0, gamma = (1 - t) ** 3, (2 * t * (1 - t)).sqrt()
    return {"w0": w0, "w1": 1 - w0, "dw0": -3 * (1 - t) ** 2, "dw1": 3 * (1 - t) ** 2,
            "gamma": gamma, "dgamma": (1 - 2 * t) / gamma}


def interpolate(x0, x1, z, t, noise_scale: float):
    """x_t = w0(t) x0 + w1(t) x1 + d gamma(t) z, the point of the interpolant at times t (n,) for the pairs (x0, x1)."""
    c = interpolant(t)
    return c["w0"] * x0 + c["w1"] * x1 + noise_scale * c["gamma"] * z


def interpolant_losses(velocity, score, drift, x0, x1, z, t, noise_scale: float) -> dict:
    """The paper's three losses, per pair (mean over the chunk's dimensions), each minimised by a conditional
    expectation given x_t, where dI/dt = w0' x0 + w1' x1 is the velocity of the interpolant without its noise:
    velocity  L_v = 1/2 |v|^2 - dI/dt . v            -> v = E[dI/dt | x_t]
    score     L_s = 1/2 |s|^2 + z . s                -> s = -E[z | x_t] = d gamma(t) grad log rho_t(x_t)
    drift     L_b = 1/2 |b|^2 - (dI/dt + d gamma'(t) z) . b  -> b = E[dx_t/dt | x_t]
    (the ODE dx = b dt keeps x_t's law)."""
    c = interpolant(t)
    interpolant_velocity = c["dw0"] * x0 + c["dw1"] * x1
    return {"velocity": (0.5 * velocity**2 - interpolant_velocity * velocity).mean(-1),
            "score": (0.5 * score**2 + z * score).mean(-1),
            "drift": (0.5 * drift**2 - (interpolant_velocity + noise_scale * c["dgamma"] * z) * drift).mean(-1)}


class InterpolantMLP(nn.Module):
    """(v, s, b)(x_t, t, s): the three heads as one residual MLP with 3 x action_dim outputs, DenoisingMLP's layers, so
    that BRIDGER and the DDPM policy differ in where sampling starts, not in the network or its cost per step. The time
    t in [0, 1] is embedded as 1000 t: the sinusoid's frequencies are made for DDPM's integer steps."""

    def __init__(self, obs_dim: int, action_dim: int, time_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(time_dim), nn.Linear(time_dim, 2 * time_dim), Mish(), nn.Linear(2 * time_dim, time_dim)
        )
        width = hidden[0]
        self.input = nn.Linear(action_dim + time_dim + obs_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range((len(hidden) - 1) // 2)])
        self.output = nn.Linear(width, 3 * action_dim)

    def forward(self, x, t, obs):
        h = torch.cat([x, self.time_embedding(1000 * t), obs], dim=-1)
        return self.output(self.blocks(self.input(h)))


class InterpolantPolicy(nn.Module):
    """BRIDGER's policy over normalised action chunks in [-1, 1]: a source sample carried to a chunk by the learned
    drift, with the three heads trained on the interpolant between the source's sample and the demonstrated chunk of
    the same state (independent given the state)."""

    def __init__(self, obs_dim: int, action_dim: int, source: nn.Module, args: Args):
        super().__init__()
        self.action_dim, self.noise_scale, self.source = action_dim, args.noise_scale, source
        self.network = InterpolantMLP(obs_dim, action_dim, args.time_dim, args.actor_hidden)

    def heads(self, x, t, obs):
        """(velocity, score, drift), each of x's shape."""
        return self.network(x, t, obs).chunk(3, dim=-1)

    def loss(self, actions, obs):
        """L_v + L_s + L_b of one draw of (x0, t, z) per pair, plus the source's own loss (CVAE), one value per pair."""
        with torch.no_grad():
            x0 = self.source.sample(obs)
        t = T_MIN + (1 - 2 * T_MIN) * torch.rand(len(actions), device=actions.device)
        z = torch.randn_like(actions)
        x_t = interpolate(x0, actions, z, t, self.noise_scale)
        losses = interpolant_losses(*self.heads(x_t, t, obs), x0, actions, z, t, self.noise_scale)
        return losses["velocity"] + losses["score"] + losses["drift"] + self.source.loss(actions, obs)

    @torch.no_grad()
    def transport(self, x0, obs, num_steps: int, deterministic: bool = False, generator=None):
        """Carries source samples x0 from t = 0 to 1 in num_steps Euler steps. Deterministic: the ODE dx = b dt.
        Otherwise the paper's SDE dx = (b + eps(t) grad log rho_t) dt + sqrt(2 eps(t)) dW, which keeps x_t's law for
        any eps(t) >= 0; eps(t) = d^2 (1 - t), the paper's 1 - t in units of the interpolant's own noise d^2."""
        x, dt = x0, 1.0 / num_steps
        for n in range(num_steps):
            t = torch.full((len(obs),), n * dt, device=obs.device).clamp(T_MIN, 1 - T_MIN)
            _, score, drift = self.heads(x, t, obs)
            if deterministic:
                x = x + drift * dt
            else:
                eps = self.noise_scale**2 * (1 - t[:, None])
                grad_log_density = score / (self.noise_scale * interpolant(t)["gamma"])
                noise = torch.randn(x.shape, device=x.device, generator=generator)
                x = x + (drift + eps * grad_log_density) * dt + (2 * eps * dt).sqrt() * noise
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, obs, num_steps: int, deterministic: bool = False, generator=None):
        """A chunk per state, and the source's sample it was carried from."""
        x0 = self.source.sample(obs, generator)
        return self.transport(x0, obs, num_steps, deterministic, generator), x0


@torch.no_grad()
def transport_distances(policy, obs, actions, num_steps: int, generator) -> dict:
    """The mechanism, as root mean squares over the normalised chunk's dimensions, from two source samples per state
    carried by the ODE: how far the source starts from the demonstrated chunk of the same state and how far sampling
    carries it (source_to_demo, sample_to_demo, source_to_sample), and how far apart one state's two samples are before
    and after (source_spread, sample_spread). A source near every state's average chunk is near in the first measure
    but has no spread: from such a source the ODE cannot choose between the demonstrations' modes."""
    x0 = policy.source.sample(obs.repeat(2, 1), generator)
    x1 = policy.transport(x0, obs.repeat(2, 1), num_steps, deterministic=True)
    rms = lambda a, b: ((a - b) ** 2).mean().sqrt().item()
    demo = actions.repeat(2, 1)
    return {"source_to_demo": rms(x0, demo), "sample_to_demo": rms(x1, demo), "source_to_sample": rms(x0, x1),
            "source_spread": rms(*x0.chunk(2)), "sample_spread": rms(*x1.chunk(2))}


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs: on a GPU, each update runs as one captured graph (docs/speed.md)
# ----------------------------------------------------------------------------------------------------------------
def graph_input_tensors(inputs) -> list:
    """The tensors among the inputs of a CudaGraph (tensors, dicts of tensors, or None), in a fixed order."""
    return [t for x in inputs if x is not None for t in (x.values() if isinstance(x, dict) else [x])]


class CudaGraph:
    """Calls fn(*inputs), on a GPU as one captured CUDA graph. This algorithm's updates and denoising loops are many
    small kernels whose launch costs more than their arithmetic; a graph replays them all with one launch
    (docs/speed.md). The first `warmup` calls run eagerly on a side stream, as capture requires, and count like any
    other call; the next one captures fn on static copies of its inputs and replays it; later calls copy their inputs
    in and replay. Inputs keep their shapes from then on; outputs are the graph's own tensors, overwritten by the next
    call. CUDA's random numbers are graph-safe: a replay draws what an eager call would. Disabled, it calls fn."""

    def __init__(self, fn, enabled: bool, warmup: int = 2):
        self.fn, self.enabled, self.warmup, self.calls, self.graph = fn, enabled, warmup, 0, None

    def __call__(self, *inputs):
        if not self.enabled:
            return self.fn(*inputs)
        if self.calls < self.warmup:
            self.calls += 1
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                outputs = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side_stream)
            return outputs
        if self.graph is None:
            self.static_inputs = [x if x is None else {k: v.clone() for k, v in x.items()} if isinstance(x, dict)
                                  else x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = self.fn(*self.static_inputs)
        else:
            for static, new in zip(graph_input_tensors(self.static_inputs), graph_input_tensors(inputs), strict=True):
                if static.shape != new.shape:
                    raise ValueError(f"CudaGraph input of shape {tuple(new.shape)}, captured {tuple(static.shape)}")
                static.copy_(new)
        self.graph.replay()
        return self.static_outputs


# ----------------------------------------------------------------------------------------------------------------
# Behaviour cloning, saved to one file per config (as the other scripts' shared pre-trained policy)
# ----------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


PRETRAIN_FIELDS = ("env_id", "dataset_source", "dataset_path", "chunk_size", "source", "noise_scale", "time_dim",
                   "actor_hidden", "cvae_latent_dim", "cvae_hidden", "cvae_kl_weight", "pretrain_steps",
                   "pretrain_batch_size", "pretrain_lr", "ema_decay", "seed")


def pretrained_checkpoint_path(args: Args, dataset: dict) -> Path:
    """The shared pre-trained checkpoint's file, named by the pre-training config and the demonstrations' content: new
    data (another generator version, an edited file) is pre-trained anew instead of reusing a policy of the old."""
    if args.pretrained_checkpoint is not None:
        return Path(args.pretrained_checkpoint)
    config = {field: getattr(args, field) for field in PRETRAIN_FIELDS}
    config["data"] = hashlib.sha256(np.ascontiguousarray(dataset["observations"]).tobytes()
                                    + np.ascontiguousarray(dataset["actions"]).tobytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    source = "custom" if args.dataset_path else args.dataset_source
    return Path(args.pretrained_dir) / f"{args.env_id}__{source}__seed{args.seed}__{digest}.pt"


def read_pretrained(path: Path, chunks: dict, args: Args) -> Optional[dict]:
    """The saved pre-trained policy for this config, or None if it has yet to be trained; refuses another task's."""
    if not path.exists():
        if args.pretrained_checkpoint is not None:
            raise FileNotFoundError(f"--pretrained-checkpoint {path} does not exist")
        return None
    checkpoint = load_checkpoint(path)
    if not {"meta", "policy", "obs_normalizer", "action_normalizer"} <= set(checkpoint):
        raise ValueError(f"{path} is not a pre-trained policy file (an unfinished pre-training's .partial.pt, or another "
                         "kind of checkpoint): give the .pt file a finished pre-training saved under "
                         f"{args.pretrained_dir}/")
    expected = {"env_id": args.env_id, "obs_dim": chunks["obs"].shape[1], "action_dim": chunks["actions"].shape[1]}
    mismatched = {k: (checkpoint["meta"].get(k), v) for k, v in expected.items() if checkpoint["meta"].get(k) != v}
    if mismatched:
        remedy = ("give a pre-trained file of this task" if args.pretrained_checkpoint is not None
                  else "pass --pretrained-checkpoint for this task or delete the file")
        raise ValueError(f"pre-trained checkpoint {path} was made for another task: {mismatched} (saved, expected): "
                         f"{remedy}")
    saved = checkpoint["meta"]["config"]
    differing = [field for field in ("source", "actor_hidden", "time_dim", "cvae_latent_dim", "cvae_hidden")
                 if json.dumps(saved.get(field)) != json.dumps(getattr(args, field))]  # a tuple saved as a list too
    if differing:
        raise ValueError(f"pre-trained checkpoint {path} holds another network: " + ", ".join(
            f"--{field.replace('_', '-')} {saved.get(field)} (asked: {getattr(args, field)})" for field in differing)
            + ": give the flags it was pre-trained with, or another file")
    return checkpoint


def pretrain(policy, dataset_obs, dataset_actions, args: Args, writer, partial_path: Path,
             guard: Optional[RunGuard] = None) -> list[float]:
    """BC on the demonstrations: AdamW, linear warm-up then cosine decay, EMA of the weights (loaded for fine-tuning).
    Its state goes to `partial_path` every --pretrain-checkpoint-frequency steps and when the guard asks to stop, and an
    interrupted pre-training continues from there to the same weights as an uninterrupted one."""
    # The learning rate is a tensor on the policy's device, set in place before every step from the schedule, so that
    # the step can be one CUDA graph
    lr = torch.zeros((), device=dataset_obs.device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-6, fused=True, capturable=True)
    warmup = max(1, args.pretrain_steps // 100)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.pretrain_steps)))
    ema = copy.deepcopy(policy).requires_grad_(False)
    resumable = {"policy": policy, "ema": ema, "optimizer": optimizer}
    start, losses = 0, []
    if partial_path.exists():
        state = load_checkpoint(partial_path)
        for key, module in resumable.items():
            module.load_state_dict(state[key])
        optimizer.param_groups[0].update(lr=lr, capturable=True)  # not the saved values: the steps read this tensor
        start, losses = state["step"], state["losses"]
        set_rng_state(state["rng"])
        print(f"continuing the interrupted pre-training at step {start} from {partial_path}")

    def bc_step(obs, actions):
        loss = policy.loss(actions, obs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    bc_update = CudaGraph(bc_step, args.cuda_graphs and dataset_obs.device.type == "cuda")
    rate_watch = RateWatch("pre-training", "steps", torch.get_num_threads())
    label = f"behaviour cloning from the {args.source} source"
    for step in tqdm(range(start, args.pretrain_steps), label, args.pretrain_steps, initial=start, mininterval=5):
        idx = torch.randint(len(dataset_obs), (args.pretrain_batch_size,), device=dataset_obs.device)
        lr.fill_(args.pretrain_lr * schedule(step))
        loss = bc_update(dataset_obs[idx], dataset_actions[idx])
        with torch.no_grad():  # copy for the first 1000 steps, then average
            decay = args.ema_decay if step >= 1000 else 0.0
            torch._foreach_lerp_(list(ema.parameters()), list(policy.parameters()), 1 - decay)
        if step % 100 == 0:  # checked here, not every step: reading a GPU's loss waits for its queue to drain
            check_finite(loss, "pre-training loss", step)
            losses.append(loss.item())
            writer.add_scalar("losses/pretrain_interpolant", loss.item(), step)
            rate_watch.tick(step, time.perf_counter())
        stopping = guard is not None and guard.stop_requested and step + 1 < args.pretrain_steps
        if stopping or ((step + 1) % args.pretrain_checkpoint_frequency == 0 and step + 1 < args.pretrain_steps):
            save_checkpoint(partial_path, {"step": step + 1, "losses": losses, "rng": rng_state(),
                                           **{key: module.state_dict() for key, module in resumable.items()}})
        if stopping:
            guard.stop(f"stopped pre-training at step {step + 1} of {args.pretrain_steps}, saved in {partial_path}: "
                       "the same command continues it")
    policy.load_state_dict(ema.state_dict())
    return losses


def pretrain_and_save(policy, chunks, obs_normalizer, action_normalizer, path: Path, args: Args, writer,
                      guard: Optional[RunGuard] = None) -> dict:
    """Pre-trains on a forked RNG, so that a run that pre-trains and a later run that loads the file continue with
    the same random numbers, and saves the policy with its normalisers."""
    device = next(policy.parameters()).device
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_suffix(".partial.pt")
    start = time.time()
    with torch.random.fork_rng():
        losses = pretrain(policy, obs_normalizer.normalize(chunks["obs"].to(device)),
                          action_normalizer.normalize(chunks["actions"].to(device)), args, writer, partial_path, guard)
    meta = {"env_id": args.env_id, "obs_dim": chunks["obs"].shape[1], "action_dim": chunks["actions"].shape[1],
            "config": {field: getattr(args, field) for field in PRETRAIN_FIELDS}, "losses": losses,
            "seconds": time.time() - start}  # of this process, when an interrupted pre-training was continued
    checkpoint = {"meta": meta, "policy": policy.state_dict(), "obs_normalizer": obs_normalizer.state_dict(),
                  "action_normalizer": action_normalizer.state_dict()}
    save_checkpoint(path, checkpoint)
    partial_path.unlink(missing_ok=True)
    print(f"saved the pre-trained policy to {path}")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and helpers
# ----------------------------------------------------------------------------------------------------------------
def parse_args() -> Args:
    """Reads the command line; a task's TASK_DEFAULTS replace the defaults of the flags not given, and
    `--env-id <id> --help` shows them."""
    env_id_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    env_id_flag.add_argument("--env-id", "--env_id", default=Args.env_id)
    env_id = env_id_flag.parse_known_args()[0].env_id
    return tyro.cli(Args, default=dataclasses.replace(Args(), env_id=env_id, **TASK_DEFAULTS.get(env_id, {})))


def check_args(args: Args):
    """Raises ValueError naming the first flag whose value cannot work."""
    for field in dataclasses.fields(args):
        value, flag = getattr(args, field.name), "--" + field.name.replace("_", "-")
        values = value if isinstance(value, tuple) else (value,)
        if not values and field.name != "wandb_tags":  # a run may have no W&B tags
            raise ValueError(f"{flag} needs at least one value")
        if isinstance(value, bool) or not all(isinstance(x, (int, float)) for x in values):
            continue
        if not all(math.isfinite(x) for x in values):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if field.name in FRACTIONS and not all(0 <= x <= 1 for x in values):
            raise ValueError(f"{flag} must lie in [0, 1], got {value}")
        if not all(x >= 0 if field.name in MAY_BE_ZERO else x > 0 for x in values):
            raise ValueError(f"{flag} must be {'at least 0' if field.name in MAY_BE_ZERO else 'positive'}, got {value}")
    if args.exp_name in ("", ".", "..") or any(separator in args.exp_name for separator in "/\\"):
        raise ValueError(f"--exp-name {args.exp_name!r} must be a plain name: it names a folder under runs/")
    if len(set(args.actor_hidden)) != 1 or len(args.actor_hidden) % 2 == 0:
        raise ValueError(f"--actor-hidden {' '.join(map(str, args.actor_hidden))}: the residual denoising MLP has one "
                         "width and an odd number of layers (an input layer and two per residual block), e.g. "
                         "512 512 512")


def read_resume_state(resume: str, script: str) -> dict:
    path = Path(resume) / "checkpoint.pt" if Path(resume).is_dir() else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path} (give a run folder under runs/ that "
                                "holds a checkpoint.pt, or the file itself)")
    state = load_checkpoint(path)
    if state.get("script") != script:
        raise ValueError(f"{path} is a checkpoint of {state.get('script')}: resume it with that script")
    run_name = str(state.get("run_name"))
    if run_name in ("", ".", "..") or Path(run_name).name != run_name or "\\" in run_name:
        raise ValueError(f"{path} names its run {run_name!r}, which is not a folder name under runs/: it was not "
                         f"written by {script}")
    if "rng" not in state:
        raise ValueError(f"{path} was written by an older version of {script}, whose state this version cannot "
                         "restore: start a new run")
    return state


def new_run_dir(run_name: str) -> Path:
    """Creates runs/<run_name> for this run alone: a run of the same name started in the same second gets the next
    free suffix (_1, _2, ...) instead of writing into the other's folder."""
    for suffix in range(1000):
        path = Path("runs") / (run_name if suffix == 0 else f"{run_name}_{suffix}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if path.is_dir():
                continue
            raise PermissionError(f"cannot create {path}/: a file of that name is in the way") from None
        except OSError as error:
            raise PermissionError(f"cannot create {path}/ ({error.strerror}): run from a folder you can write to") from None
    raise FileExistsError(f"runs/{run_name} and 999 suffixed folders exist already")


def check_finite(value, name: str, step: int):
    if not torch.isfinite(value):
        raise FloatingPointError(f"{name} is {value.item()} at step {step}: lower the learning rates, check the "
                                 "dataset for NaN/inf, or resume from the last checkpoint with other settings")


def make_vector_env(args: Args, seed: int, num_envs: int, capture_video: bool = False, run_name: str = ""):
    env_fns = [make_env(args.env_id, seed, i, args.chunk_size, capture_video, run_name) for i in range(num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
    return vector_cls(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)




@torch.no_grad()
def evaluate(envs, policy, obs_normalizer, action_normalizer, args: Args, device, protocol: str,
             num_steps: int) -> dict:
    """Runs `eval_episodes` episodes, always from the same initial states and noise. Protocol `single`: one sample of
    the ODE per state (deterministic given the source's sample); `sde`: one sample of the SDE; `source`: the source's
    sample as it is (num_steps unused). Each env runs a quota of episodes fixed in advance, so that short (successful)
    episodes are not counted first and more often. source_to_sample: how far sampling moved the source's samples on the
    states the policy visits (root mean square per normalised chunk dimension; 0 under `source`), to set beside the
    same distance on the demonstrations' states (transport_distances)."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    quota = args.eval_episodes // envs.num_envs + (np.arange(envs.num_envs) < args.eval_episodes % envs.num_envs)
    obs, _ = envs.reset(seed=args.seed + 100_000)
    episode_return = np.zeros(envs.num_envs)
    returns, scores, successes, moved = [], [], [], []
    while len(returns) < args.eval_episodes:
        obs_n = obs_normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if protocol == "source":
            actions = start = policy.source.sample(obs_n, generator).clamp(-1, 1)
        else:
            actions, start = policy.sample(obs_n, num_steps, deterministic=protocol == "single", generator=generator)
        moved.append(((actions - start.clamp(-1, 1)) ** 2).mean(-1))
        obs, reward, terminated, truncated, info = envs.step(action_normalizer.unnormalize(actions).cpu().numpy())
        episode_return += reward
        for i in np.flatnonzero((terminated | truncated) & (quota > 0)):
            returns.append(episode_return[i])
            scores.append(info["final_info"]["normalized_score"][i])
            successes.append(info["final_info"]["success"][i])
            quota[i] -= 1
        episode_return[terminated | truncated] = 0
    return {"episodic_return": float(np.mean(returns)), "normalized_score": float(np.mean(scores)),
            "success_rate": float(np.mean(successes)), "episodes": len(returns),
            "source_to_sample": torch.cat(moved).mean().sqrt().item()}


if __name__ == "__main__":
    args = parse_args()
    guard = RunGuard()  # Ctrl-C saves what was done and says how to continue
    try:  # bad input ends here, before a run folder exists, with one message and exit code 2
        resume_state = None
        if args.resume is not None:
            resume_state = read_resume_state(args.resume, os.path.basename(__file__))
            args = dataclasses.replace(Args(**resume_state["args"]), cuda=args.cuda, threads=args.threads,
                                       resume=args.resume)
        check_args(args)
        dataset = load_dataset(args.env_id, args.dataset_source, args.dataset_path)
        chunks = make_chunk_transitions(dataset, args.chunk_size)
        pretrained_path = pretrained_checkpoint_path(args, dataset)
        pretrained = read_pretrained(pretrained_path, chunks, args)
        if pretrained is None:
            check_writable(pretrained_path.parent)
        if resume_state:
            check_writable(Path("runs") / resume_state["run_name"])
        run_dir = (Path("runs") / resume_state["run_name"] if resume_state
                   else new_run_dir(f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"))
        guard.run_dir, run_name = run_dir, run_dir.name  # from here on a failed start's folder is removed at exit
        tracking = start_tracking(args, run_dir) if args.track else None  # before the SummaryWriter, which it mirrors
    except (ValueError, DatasetError, OSError) as error:  # OSError: a missing file, a folder it cannot write
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    set_threads(args.threads)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: no GPU available, running on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Normalisation, the source and the interpolant policy, trained on the demonstrations (or loaded if trained before)
    obs_dim, action_dim = chunks["obs"].shape[1], chunks["actions"].shape[1]
    obs_normalizer = Normalizer(dataset["observations"].min(0), dataset["observations"].max(0)).to(device)
    action_normalizer = Normalizer(*(np.tile(f(dataset["actions"], 0), args.chunk_size) for f in (np.min, np.max))).to(device)
    demo_obs = obs_normalizer.normalize(chunks["obs"].to(device))
    demo_actions = action_normalizer.normalize(chunks["actions"].to(device))
    source = make_source(args, obs_dim, demo_actions.cpu())
    policy = InterpolantPolicy(obs_dim, action_dim, source, args).to(device)
    if pretrained is None:
        pretrained = pretrain_and_save(policy, chunks, obs_normalizer, action_normalizer, pretrained_path, args, writer,
                                       guard)
    else:
        print(f"loaded the trained policy from {pretrained_path}")
    policy.load_state_dict(pretrained["policy"])
    obs_normalizer.load_state_dict(pretrained["obs_normalizer"])
    action_normalizer.load_state_dict(pretrained["action_normalizer"])

    # Evaluate at every --denoising-steps, each followed by a checkpoint that --resume continues from
    eval_envs = make_vector_env(args, args.seed + 100_000, args.num_envs, args.capture_video, run_name)
    probe = torch.randperm(len(demo_obs), generator=torch.Generator().manual_seed(args.seed))[:1024].to(device)
    history, timings = [], {"eval": 0.0, "wall": 0.0}
    if resume_state is not None:
        history, timings = resume_state["history"], resume_state["timings"]
        set_rng_state(resume_state["rng"])
        print(f"resumed {run_name} after {len(history)} of {len(args.denoising_steps)} evaluations")
    start_time = time.time() - timings["wall"]
    for index in range(len(history), len(args.denoising_steps)):
        num_steps = args.denoising_steps[index]
        tic = time.perf_counter()
        results = {protocol: evaluate(eval_envs, policy, obs_normalizer, action_normalizer, args, device, protocol,
                                      num_steps) for protocol in args.eval_protocols}
        seconds = time.perf_counter() - tic
        timings["eval"] += seconds
        distances = transport_distances(policy, demo_obs[probe], demo_actions[probe], num_steps,
                                        torch.Generator(device=device).manual_seed(args.seed))
        history.append({"iteration": index, "denoising_steps": num_steps, "env_steps": 0,
                        **results[args.eval_protocols[0]], "protocols": results, "transport": distances,
                        "eval_seconds": seconds})
        for protocol, result in results.items():
            for key in ("success_rate", "normalized_score", "episodic_return", "source_to_sample"):
                writer.add_scalar(f"eval_{protocol}/{key}", result[key], num_steps)
        for key, value in distances.items():
            writer.add_scalar(f"transport/{key}", value, num_steps)
        writer.flush()
        headline = results[args.eval_protocols[0]]
        print(f"{num_steps} denoising steps: score {headline['normalized_score']:.1f}, success "
              f"{headline['success_rate']:.2f}, source to demonstration {distances['source_to_demo']:.3f}, sample to "
              f"demonstration {distances['sample_to_demo']:.3f} ({seconds:.0f} s)")
        timings["wall"] = time.time() - start_time
        save_checkpoint(run_dir / "checkpoint.pt", {
            "script": os.path.basename(__file__), "args": vars(args), "run_name": run_name, "history": history,
            "timings": timings, "rng": rng_state()})
        if guard.stop_requested and index + 1 < len(args.denoising_steps):
            guard.stop(f"stopped after {index + 1} of {len(args.denoising_steps)} evaluations, checkpoint saved")

    timings["wall"] = time.time() - start_time
    headline = history[0]
    summary = {
        "env_id": args.env_id, "exp_name": args.exp_name, "seed": args.seed, "source": args.source,
        "pretrained_checkpoint": str(pretrained_path), "training_seconds": pretrained["meta"]["seconds"],
        # behaviour cloning only: the trained policy is the start and the result, at the headline step count
        "pretrained": headline, "final": headline, "best": headline, "history": history,
        "env_steps": 0, "iterations": 0, "wall_time_s": timings["wall"],
    }
    save_summary(run_dir / "summary.json", summary)  # last: a summary says the run finished
    print(json.dumps({str(h["denoising_steps"]): {k: h[k] for k in ("normalized_score", "success_rate")}
                      for h in history}, indent=2))
    eval_envs.close()
    writer.close()
    finish_tracking(tracking, run_name)

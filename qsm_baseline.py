# QSM: Q-score matching (Psenka et al., 2024, ICML, arXiv 2312.11752): the diffusion policy's score is regressed onto
# alpha times the action-gradient of a learned Q. Docs: docs/qsm.md. `diff idql_baseline.py qsm_baseline.py` shows
# what QSM changes in IDQL's program.
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
from functools import partial
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
                           save_summary, set_threads, start_tracking, whole_iterations)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the run name)"""
    seed: int = 1
    """seed of the experiment (also selects the shared pre-trained checkpoint)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is present, run on it; otherwise fall back to the CPU with a message"""
    threads: int = 0
    """torch CPU threads (0: OMP_NUM_THREADS if set, else the cores other processes leave idle; utils/runtime.py)"""
    cuda_graphs: bool = True
    """on a GPU, replay each pre-training step as one CUDA graph (docs/speed.md)"""
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

    # Diffusion policy and behaviour-cloning pre-training
    denoising_steps: int = 20
    """number of DDPM steps K (cosine schedule)"""
    time_dim: int = 16
    """width of the diffusion-step embedding"""
    actor_hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the residual denoising MLP (DPPO's DiffusionMLP)"""
    pretrain_steps: int = 80000
    """behaviour-cloning gradient steps (DPPO's kitchen recipe; docs/kitchen_complete.md has the sweep)"""
    pretrain_batch_size: int = 128
    """minibatch size of behaviour-cloning pre-training"""
    pretrain_lr: float = 1e-3
    """peak learning rate of pre-training (cosine decay to a tenth of it)"""
    ema_decay: float = 0.995
    """decay of the exponential moving average of the pre-trained weights (the EMA weights are fine-tuned)"""
    pretrain_checkpoint_frequency: int = 5000
    """save the pre-training state every this many steps; an interrupted pre-training continues from it"""
    pretrained_dir: str = "runs/pretrained"
    """folder of the shared pre-trained checkpoints, one per env, dataset, seed and pre-training config"""
    pretrained_checkpoint: Optional[str] = None
    """load this pre-trained checkpoint instead of the one derived from the config"""

    # Online fine-tuning
    total_timesteps: int = 50400
    """environment steps of online fine-tuning, whole iterations of num_envs x num_steps x chunk_size (0: evaluate the pre-trained policy only)"""
    num_envs: int = 2
    """parallel environments (asynchronous when more than one), for exploration and for evaluation"""
    num_steps: int = 70
    """policy decisions per environment per iteration"""
    buffer_size: int = 1000000
    """replay buffer capacity in decisions (chunks)"""
    offline_data_in_buffer: bool = True
    """if toggled, the replay buffer starts with the demonstrations (rewards relabelled to the env's reward)"""
    gamma: float = 0.99
    """discount per decision (per chunk)"""
    replay_ratio: float = 1.0
    """gradient steps per collected decision (critic and actor alike)"""
    critic_batch_size: int = 256
    """minibatch size of the critic updates"""
    actor_batch_size: int = 1024
    """minibatch size of the actor updates"""
    critic_hidden: tuple[int, ...] = (512, 512, 512)
    """hidden widths of the Q networks"""
    critic_lr: float = 1e-3
    """learning rate of Q"""
    actor_lr: float = 1e-5
    """learning rate of the denoising network during fine-tuning"""
    tau: float = 0.005
    """Polyak rate of the target Q networks"""
    critic_warmup_iterations: int = 2
    """iterations of critic-only training before the policy is improved"""
    num_candidates: int = 8
    """policy samples S per state among which the `select` evaluation protocol draws one"""
    min_sampling_std: float = 0.01
    """floor on the DDPM noise std of every denoising step while exploring and sampling the critic's target actions"""
    noise_clip: float = 3.0
    """clip on the DDPM noise while exploring"""

    # Q-score matching (QSM)
    q_grad_scale: float = 10.0
    """alpha: the policy's score is regressed onto alpha * grad_a Q (DPPO's q_grad_coeff: 10; the authors' M_q: 50)"""
    score_target: Literal["score", "noise"] = "score"
    """what is matched to alpha grad_a Q: the implied score -eps_theta / sqrt(1 - abar_k) (the paper) or -eps_theta (DPPO's code)"""

    # Evaluation, logging, checkpoints
    eval_frequency: int = 10
    """evaluate every this many iterations (iteration 0 evaluates the pre-trained policy)"""
    eval_episodes: int = 100
    """episodes per evaluation (same initial states and noise every time)"""
    eval_protocols: tuple[Literal["single", "select"], ...] = ("single",)
    """evaluation protocols, the first is the headline: one DDIM sample (DPPO's QSM evaluation), or S DDIM samples and one drawn by softmax(Qbar)"""
    checkpoint_frequency: int = 5
    """save a resumable checkpoint every this many iterations"""


# Bad flag values end the run before it starts: numbers must be positive except these, and FRACTIONS lie in [0, 1].
MAY_BE_ZERO = ("seed", "threads", "total_timesteps", "ema_decay", "critic_warmup_iterations", "min_sampling_std")
FRACTIONS = ("ema_decay", "gamma", "tau")

# The paper's Robomimic settings (DPPO's protocol) replace the kitchen defaults above for these env ids; flags given on
# the command line still win. Can pre-trains for 5,000 steps: on the clean scripted demonstrations the full recipe
# leaves no room to fine-tune (success 0.94-0.96), so, as DPPO starts Can from an early checkpoint, fine-tuning
# starts from a policy that succeeds about 70% of the time (docs/robomimic.md, section 4).
TASK_DEFAULTS = {
    "Robomimic-Can-v0": dict(dataset_source="scripted", pretrain_steps=5000, gamma=0.999,
                             critic_hidden=(256, 256, 256), buffer_size=250_000, num_steps=75),
    "Robomimic-Square-v0": dict(dataset_source="scripted", gamma=0.999, critic_hidden=(256, 256, 256),
                                buffer_size=250_000, num_steps=100),
    # The small task of utils/two_goals.py: settings that pre-train and fine-tune in under a minute on 2 CPU cores
    # (docs/how_otpr_works.md; 5,000 pre-training steps clone the operators' score, 2,000 do not).
    # Critic batches of 128: its TD target runs the whole denoising chain at the next states (as DQL's does).
    "TwoGoals-v0": dict(dataset_source="scripted", actor_hidden=(128, 128, 128), pretrain_steps=5000,
                        pretrain_batch_size=256, num_envs=8, eval_frequency=5, eval_episodes=48,
                        critic_hidden=(128, 128), buffer_size=100_000, num_steps=10, total_timesteps=6400,
                        actor_lr=1e-4, critic_batch_size=128),
}


# ----------------------------------------------------------------------------------------------------------------
# Data: min-max normalisation, action chunks, replay buffer
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


class ReplayBuffer:
    """FIFO buffer of normalised decisions, held as tensors on the training device."""

    @staticmethod
    def check_fits(capacity: int, obs_dim: int, action_dim: int, on_gpu: bool):
        """ValueError unless `capacity` rows fit in the memory free where they will be held (the storage is reserved
        at once: a buffer larger than memory would fail, or be killed, only once it filled)."""
        needed = capacity * (2 * obs_dim + action_dim + 2) * 4
        if on_gpu:
            free, where = torch.cuda.mem_get_info()[0], "on the GPU"
        else:
            meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
            available = [line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
            free, where = (int(available[0]) * 1024 if available else math.inf), "in memory"
        if needed > free:
            raise ValueError(f"--buffer-size {capacity} needs {needed / 2**30:.1f} GiB for its rows, more than the "
                             f"{free / 2**30:.1f} GiB free {where}: lower --buffer-size")

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.data = {
            "obs": torch.empty(capacity, obs_dim, device=device),
            "actions": torch.empty(capacity, action_dim, device=device),
            "rewards": torch.empty(capacity, device=device),
            "next_obs": torch.empty(capacity, obs_dim, device=device),
            "terminated": torch.empty(capacity, device=device),
        }

    def add(self, batch: dict):
        n = len(batch["obs"])
        idx = (self.pos + torch.arange(n, device=self.data["obs"].device)) % self.capacity
        for key, value in batch.items():
            self.data[key][idx] = value.to(self.data[key])
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, batch_size: int, keys=("obs", "actions", "rewards", "next_obs", "terminated")):
        idx = torch.randint(self.size, (batch_size,), device=self.data["obs"].device)
        return {key: self.data[key][idx] for key in keys}

    def state_dict(self):
        # a copy of the filled rows only: saving a slice of the preallocated storage would save all of it
        return {"pos": self.pos, "size": self.size,
                "data": {k: v[: self.size].to("cpu", copy=True) for k, v in self.data.items()}}

    def load_state_dict(self, state):
        self.pos, self.size = state["pos"], state["size"]
        for key, value in state["data"].items():
            self.data[key][: self.size] = value.to(self.data[key])


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


class DenoisingMLP(nn.Module):
    """eps_theta(a_k, k, s): predicts the noise in a flattened noisy action chunk, given the step k and the state."""

    def __init__(self, obs_dim: int, action_dim: int, time_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(time_dim), nn.Linear(time_dim, 2 * time_dim), Mish(), nn.Linear(2 * time_dim, time_dim)
        )
        width = hidden[0]
        self.input = nn.Linear(action_dim + time_dim + obs_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range((len(hidden) - 1) // 2)])
        self.output = nn.Linear(width, action_dim)

    def forward(self, noisy_actions, k, obs):
        x = torch.cat([noisy_actions, self.time_embedding(k), obs], dim=-1)
        return self.output(self.blocks(self.input(x)))


class DiffusionPolicy(nn.Module):
    """DDPM with a cosine schedule and noise prediction over normalised action chunks in [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.action_dim, self.num_steps = action_dim, args.denoising_steps
        self.network = DenoisingMLP(obs_dim, action_dim, args.time_dim, args.actor_hidden)
        # Cosine schedule (Nichol & Dhariwal, 2021): abar(u) = cos^2(((u + s) / (1 + s)) * pi / 2), u = k / K.
        u = torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64)
        abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        schedule = {
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            # DDPM posterior q(a_{k-1} | a_k, a_0): mean = coef_x0 * a_0 + coef_xk * a_k, variance below.
            "posterior_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_coef_xk": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
            "posterior_std": (betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)).sqrt(),
        }
        for name, value in schedule.items():
            self.register_buffer(name, value.float())

    def loss(self, actions, obs):
        """Denoising score matching with w(t) = 1 (Eq. 7 in noise-prediction form, Eq. 21), one value per pair."""
        k = torch.randint(self.num_steps, (len(actions),), device=actions.device)
        noise = torch.randn_like(actions)
        abar = self.alphas_cumprod[k][:, None]
        noisy = abar.sqrt() * actions + (1 - abar).sqrt() * noise
        return F.mse_loss(self.network(noisy, k, obs), noise, reduction="none").mean(-1)

    @torch.no_grad()
    def sample(self, obs, deterministic: bool = False, min_std: float = 0.0, noise_clip: float = 3.0, generator=None):
        """Exploration: DDPM ancestral sampling with the noise std floored at `min_std` on every step (DPPO).
        Deterministic: DDIM with eta = 0 on the same K steps, an ODE map from the initial noise to the action."""
        x = torch.randn(len(obs), self.action_dim, device=obs.device, generator=generator)
        for k in reversed(range(self.num_steps)):
            steps = torch.full((len(obs),), k, device=obs.device, dtype=torch.long)
            eps = self.network(x, steps, obs)
            abar = self.alphas_cumprod[k]
            x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
            if deterministic:
                eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
                x = self.alphas_cumprod_prev[k].sqrt() * x0 + (1 - self.alphas_cumprod_prev[k]).sqrt() * eps
            else:
                mean = self.posterior_coef_x0[k] * x0 + self.posterior_coef_xk[k] * x
                std = self.posterior_std[k].clamp(min=min_std)
                x = mean + std * torch.randn_like(x).clamp(-noise_clip, noise_clip)
        return x.clamp(-1, 1)


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + action_dim, hidden, 1), mlp(obs_dim + action_dim, hidden, 1)

    def forward(self, obs, actions):
        x = torch.cat([obs, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def min(self, obs, actions):
        return torch.minimum(*self(obs, actions))


# ----------------------------------------------------------------------------------------------------------------
# QSM critic: twin Q by TD to min(Qbar1, Qbar2) at an action the current policy samples at s', Polyak target
# ----------------------------------------------------------------------------------------------------------------
def update_q_critic(batch, qf, qf_target, policy, q_optimizer, args: Args) -> dict:
    """One TD step of both heads towards y = r + gamma (1 - terminated) min(Qbar1, Qbar2)(s', a'), a' ~ pi(. | s')
    drawn with the exploration sampler (DPPO's QSM; the authors' code draws a' from an EMA copy of the policy)."""
    with torch.no_grad():
        next_actions = policy.sample(batch["next_obs"], min_std=args.min_sampling_std, noise_clip=args.noise_clip)
        next_q = qf_target.min(batch["next_obs"], next_actions)
        td_target = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * next_q
    q1, q2 = qf(batch["obs"], batch["actions"])
    q_loss = F.mse_loss(q1, td_target) + F.mse_loss(q2, td_target)
    q_optimizer.zero_grad()
    q_loss.backward()
    q_optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), args.tau)
    return {"q_loss": q_loss.detach(), "q_values": q1.detach().mean()}


# ----------------------------------------------------------------------------------------------------------------
# Q-score matching: the policy's score at noised replay actions regressed onto alpha grad_a Q there
# ----------------------------------------------------------------------------------------------------------------
def qsm_actor_loss(policy, qf, obs, actions, args: Args):
    """k ~ U{0..K-1}, a_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps, g = the mean of the two current critics'
    action-gradients at a_k, held fixed; the network's implied score at (a_k, k, s) is regressed onto alpha g. The
    paper's Theorems 4.1 and 4.3 (its Fig. 1): where the score and grad_a Q disagree, aligning them raises Q.

    Sign and scale. The forward process gives the noisy marginal the score grad log p_k(a_k) = -E[eps | a_k] / sigma_k,
    sigma_k = sqrt(1 - abar_k), and denoising score matching trains eps_theta towards E[eps | a_k]; so a
    noise-prediction network implies the score -eps_theta / sigma_k, the convention DiffusionPolicy.sample relies on.
    Matching that score to alpha g means eps_theta = -alpha sigma_k g; regressing eps_theta onto it is the score-space
    loss sigma_k^2 |score - alpha g|^2, which is DSM's own weighting of the noise levels (`score_target score`).
    DPPO and the authors' code regress -eps_theta onto alpha g (`score_target noise`): an implied score
    alpha g / sigma_k, 1 to 1 / sigma_0 = 11 times larger with 20 cosine steps."""
    k = torch.randint(policy.num_steps, (len(actions),), device=actions.device)
    abar = policy.alphas_cumprod[k][:, None]
    noisy = (abar.sqrt() * actions + (1 - abar).sqrt() * torch.randn_like(actions)).requires_grad_(True)
    # at the NOISY action, as both released codes take it (the paper's algorithm box writes the clean action)
    q1, q2 = qf(obs, noisy)
    q_grad = torch.autograd.grad((q1.sum() + q2.sum()) / 2, noisy)[0]  # no graph: the critics get no gradient
    sigma = (1 - abar).sqrt() if args.score_target == "score" else 1.0
    return F.mse_loss(policy.network(noisy.detach(), k, obs), -args.q_grad_scale * sigma * q_grad)


# ----------------------------------------------------------------------------------------------------------------
# Action selection of the `select` evaluation protocol: S samples of the diffusion policy, one drawn by softmax(Qbar)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def softmax_q_weights(obs, actions, qf_target):
    """exp(Qbar(s, a_i) - max_j Qbar(s, a_j)), Qbar = min(Qbar1, Qbar2), over the S candidates of each state:
    select_candidates normalises them to softmax_i Qbar(s, a_i) (temperature 1, Diffusion-QL's selection, as
    dql_baseline.py draws). Shifting by the state's maximum only avoids overflow."""
    q = qf_target.min(obs, actions)
    return torch.exp(q - q.max(dim=-1, keepdim=True).values)


@torch.no_grad()
def select_candidates(obs, sample, weigh, args: Args, generator=None):
    """Draws S chunks per state with `sample` (states -> chunks: the exploring or the deterministic sampler) and keeps
    one per state, drawn with probability proportional to weigh(s, a).
    Returns the kept chunks (n, action_dim) and the selection's lever per state (selection_lever)."""
    n, num_candidates = len(obs), args.num_candidates
    candidates = sample(obs.repeat_interleave(num_candidates, 0)).view(n, num_candidates, -1)
    weights = weigh(obs[:, None].expand(-1, num_candidates, -1), candidates)
    all_zero = weights.sum(1) == 0
    weights[all_zero] = 1.0  # a state given no mass: fall back to the policy's own distribution
    choice = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return candidates[torch.arange(n, device=obs.device), choice], selection_lever(weights, candidates, all_zero)


def effective_sample_size(weights):
    """(sum w)^2 / sum w^2 along the last dimension: n for n equal weights, 1 when one weight takes all."""
    return weights.sum(-1) ** 2 / (weights**2).sum(-1).clamp(min=1e-30)


def selection_lever(weights, candidates, all_zero) -> dict:
    """How much the weights (n, S) decide which of each state's S candidates (n, S, d) is executed, per state:
    candidate_ess: effective number of candidates (S: the choice is uniform; 1: one candidate takes all);
    top_candidate_prob: the largest selection probability; candidate_spread: the mean distance between two
    candidates, as a root mean square over the d normalised action dimensions (flat weights over alike candidates
    and flat weights over distinct ones are told apart by it); all_zero: every weight was 0 (the choice was uniform)."""
    num_candidates, dim = candidates.shape[1:]
    distances = torch.cdist(candidates, candidates).sum((1, 2)) / max(1, num_candidates * (num_candidates - 1))
    return {"candidate_ess": effective_sample_size(weights),
            "top_candidate_prob": weights.max(1).values / weights.sum(1),
            "candidate_spread": distances / math.sqrt(dim), "all_zero": all_zero}



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
# Behaviour-cloning pre-training, shared by every method through one checkpoint file
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


PRETRAIN_FIELDS = ("env_id", "dataset_source", "dataset_path", "chunk_size", "denoising_steps", "time_dim",
                   "actor_hidden", "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "ema_decay", "seed")


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
    differing = [field for field in ("actor_hidden", "time_dim", "denoising_steps")
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
    label = f"pre-training, then fine-tuning {args.total_timesteps} env steps"
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
            writer.add_scalar("losses/pretrain_dsm", loss.item(), step)
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
    whole_iterations(args.total_timesteps, args.num_envs, args.num_steps, args.chunk_size)
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
def evaluate(envs, policy, weigh, obs_normalizer, action_normalizer, args: Args, device, protocol: str) -> dict:
    """Runs `eval_episodes` episodes, always from the same initial states and noise. Protocol `single`: one DDIM
    sample per state; `select`: S DDIM samples and one drawn in proportion to the guidance weights. Each env runs a
    quota of episodes fixed in advance, so that short (successful) episodes are not counted first and more often."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    quota = args.eval_episodes // envs.num_envs + (np.arange(envs.num_envs) < args.eval_episodes % envs.num_envs)
    obs, _ = envs.reset(seed=args.seed + 100_000)
    episode_return = np.zeros(envs.num_envs)
    returns, scores, successes = [], [], []
    while len(returns) < args.eval_episodes:
        obs_n = obs_normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if protocol == "single":
            actions = policy.sample(obs_n, deterministic=True, generator=generator)
        else:
            deterministic = partial(policy.sample, deterministic=True, generator=generator)
            actions, _ = select_candidates(obs_n, deterministic, weigh, args, generator=generator)
        obs, reward, terminated, truncated, info = envs.step(action_normalizer.unnormalize(actions).cpu().numpy())
        episode_return += reward
        for i in np.flatnonzero((terminated | truncated) & (quota > 0)):
            returns.append(episode_return[i])
            scores.append(info["final_info"]["normalized_score"][i])
            successes.append(info["final_info"]["success"][i])
            quota[i] -= 1
        episode_return[terminated | truncated] = 0
    return {"episodic_return": float(np.mean(returns)), "normalized_score": float(np.mean(scores)),
            "success_rate": float(np.mean(successes)), "episodes": len(returns)}


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
        ReplayBuffer.check_fits(args.buffer_size, chunks["obs"].shape[1], chunks["actions"].shape[1],
                                args.cuda and torch.cuda.is_available())
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
    threads = set_threads(args.threads)
    # On resume, drop only what the interrupted process logged after its checkpoint's step.
    writer = SummaryWriter(str(run_dir), purge_step=resume_state["global_step"] + 1 if resume_state else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: no GPU available, running on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Normalisation and the shared pre-trained policy
    obs_dim, action_dim = chunks["obs"].shape[1], chunks["actions"].shape[1]
    obs_normalizer = Normalizer(dataset["observations"].min(0), dataset["observations"].max(0)).to(device)
    action_normalizer = Normalizer(*(np.tile(f(dataset["actions"], 0), args.chunk_size) for f in (np.min, np.max))).to(device)
    policy = DiffusionPolicy(obs_dim, action_dim, args).to(device)
    if pretrained is None:
        pretrained = pretrain_and_save(policy, chunks, obs_normalizer, action_normalizer, pretrained_path, args, writer,
                                       guard)
    else:
        print(f"loaded the pre-trained policy from {pretrained_path}")
    policy.load_state_dict(pretrained["policy"])
    obs_normalizer.load_state_dict(pretrained["obs_normalizer"])
    action_normalizer.load_state_dict(pretrained["action_normalizer"])
    normalized_chunks = {key: value.to(device) for key, value in chunks.items()}
    for key, normalizer in (("obs", obs_normalizer), ("next_obs", obs_normalizer), ("actions", action_normalizer)):
        normalized_chunks[key] = normalizer.normalize(normalized_chunks[key])

    # ALGO LOGIC: initialize agent here
    qf = TwinQ(obs_dim, action_dim, args.critic_hidden).to(device)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    # fused: one kernel updates every parameter, on the CPU as on the GPU (docs/speed.md)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.critic_lr, fused=True)
    actor_optimizer = torch.optim.Adam(policy.parameters(), lr=args.actor_lr, fused=True)
    replay = ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)
    if args.offline_data_in_buffer:
        replay.add(normalized_chunks)
    checkpointed = {"policy": policy, "qf": qf, "qf_target": qf_target, "q_optimizer": q_optimizer,
                    "actor_optimizer": actor_optimizer, "replay": replay}
    weigh = partial(softmax_q_weights, qf_target=qf_target)

    envs = make_vector_env(args, args.seed, args.num_envs)
    eval_envs = make_vector_env(args, args.seed + 100_000, args.num_envs, args.capture_video, run_name)
    num_iterations = whole_iterations(args.total_timesteps, args.num_envs, args.num_steps, args.chunk_size)
    updates_per_iteration = max(1, int(args.num_envs * args.num_steps * args.replay_ratio))

    start_iteration, global_step, best, history = 0, 0, None, []
    timings = {key: 0.0 for key in ("env", "sampling", "critic", "ot", "actor", "eval", "wall")}
    if resume_state is not None:
        for key, module in checkpointed.items():
            module.load_state_dict(resume_state[key])
        start_iteration, global_step, best = resume_state["iteration"], resume_state["global_step"], resume_state["best"]
        history, timings = resume_state["history"], resume_state["timings"]
        set_rng_state(resume_state["rng"])
        print(f"resumed {run_name} at iteration {start_iteration} ({global_step} env steps)")

    # TRY NOT TO MODIFY: start the game
    obs, _ = envs.reset(seed=args.seed + start_iteration)
    episode_return = np.zeros(args.num_envs)
    start_time = time.time() - timings["wall"]
    # the time left from the average rate since the start, evaluations included (smoothing=0): the job's time left
    progress = tqdm(desc=f"fine-tuning {args.exp_name}", total=args.total_timesteps, initial=global_step,
                    unit=" env steps", mininterval=5, smoothing=0)
    rate_watch = RateWatch("fine-tuning", "env steps", threads)
    for iteration in range(start_iteration, num_iterations + 1):
        if iteration % args.eval_frequency == 0 or iteration == num_iterations:
            tic = time.perf_counter()
            results = {protocol: evaluate(eval_envs, policy, weigh, obs_normalizer, action_normalizer, args, device,
                                          protocol) for protocol in args.eval_protocols}
            timings["eval"] += time.perf_counter() - tic
            scores = results[args.eval_protocols[0]]
            history.append({"iteration": iteration, "env_steps": global_step, **scores, "protocols": results})
            best = scores if best is None or scores["normalized_score"] > best["normalized_score"] else best
            for protocol, result in results.items():
                for key in ("success_rate", "normalized_score", "episodic_return"):
                    writer.add_scalar(f"eval_{protocol}/{key}", result[key], global_step)
            for key in ("success_rate", "normalized_score", "episodic_return"):
                writer.add_scalar(f"charts/{key}", scores[key], global_step)
            writer.flush()
            progress.set_postfix_str(f"evaluation at {global_step}: score {scores['normalized_score']:.1f}, "
                                     f"success {scores['success_rate']:.2f}")
        if iteration == num_iterations:
            break

        # Collect num_steps decisions per env, executing one policy sample per state: QSM explores with its policy
        for step in range(args.num_steps):
            tic = time.perf_counter()
            obs_n = obs_normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
            actions = policy.sample(obs_n, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
            env_actions = action_normalizer.unnormalize(actions).cpu().numpy()
            timings["sampling"] += time.perf_counter() - tic

            tic = time.perf_counter()
            next_obs, reward, terminated, truncated, info = envs.step(env_actions)
            timings["env"] += time.perf_counter() - tic
            done = terminated | truncated
            chunk_steps = info["chunk_steps"].copy()  # a finished env reports its last chunk in final_info
            if done.any():
                chunk_steps[done] = info["final_info"]["chunk_steps"][done]
            global_step += int(chunk_steps.sum())
            real_next_obs = next_obs.copy()
            for i in np.flatnonzero(done):
                real_next_obs[i] = info["final_obs"][i]
            replay.add({
                "obs": obs_n,
                "actions": actions,
                "rewards": torch.as_tensor(reward, dtype=torch.float32),
                "next_obs": obs_normalizer.normalize(torch.as_tensor(real_next_obs, dtype=torch.float32, device=device)),
                "terminated": torch.as_tensor(terminated, dtype=torch.float32),
            })
            episode_return += reward
            for i in np.flatnonzero(done):
                writer.add_scalar("charts/train_episodic_return", episode_return[i], global_step)
                writer.add_scalar("charts/train_normalized_score", info["final_info"]["normalized_score"][i], global_step)
            episode_return[done] = 0
            obs = next_obs

        # ALGO LOGIC: training
        tic = time.perf_counter()
        for update in range(updates_per_iteration):
            critic_stats = update_q_critic(replay.sample(args.critic_batch_size), qf, qf_target, policy, q_optimizer, args)
        check_finite(critic_stats["q_loss"], "critic loss", global_step)
        timings["critic"] += time.perf_counter() - tic

        if iteration >= args.critic_warmup_iterations:
            tic = time.perf_counter()
            for update in range(updates_per_iteration):
                # QSM: no behaviour cloning; the score at noised replay actions is matched to alpha grad_a Q there
                batch = replay.sample(args.actor_batch_size, ("obs", "actions"))
                loss = qsm_actor_loss(policy, qf, batch["obs"], batch["actions"], args)
                actor_optimizer.zero_grad()
                loss.backward()
                actor_optimizer.step()
            check_finite(loss, "actor loss", global_step)
            writer.add_scalar("losses/actor", loss.item(), global_step)
            timings["actor"] += time.perf_counter() - tic

        timings["wall"] = time.time() - start_time
        writer.add_scalar("losses/q", critic_stats["q_loss"].item(), global_step)
        writer.add_scalar("losses/q_values", critic_stats["q_values"].item(), global_step)
        writer.add_scalar("charts/SPS", int(global_step / timings["wall"]), global_step)
        for key in ("env", "sampling", "critic", "ot", "actor", "eval"):
            writer.add_scalar(f"time/{key}", timings[key] / (iteration + 1), global_step)

        progress.update(global_step - progress.n)
        rate_watch.tick(global_step, timings["wall"] - timings["eval"])
        stopping = guard.stop_requested and iteration + 1 < num_iterations
        if (iteration + 1) % args.checkpoint_frequency == 0 or iteration + 1 == num_iterations or stopping:
            save_checkpoint(run_dir / "checkpoint.pt", {
                "script": os.path.basename(__file__), "args": vars(args), "run_name": run_name,
                "iteration": iteration + 1, "global_step": global_step,
                "best": best, "history": history, "timings": timings, "rng": rng_state(),
                **{key: module.state_dict() for key, module in checkpointed.items()},
            })
            writer.flush()
        if stopping:
            guard.stop(f"stopped after iteration {iteration + 1} of {num_iterations} ({global_step} env steps), "
                       "checkpoint saved")

    progress.close()
    timings["wall"] = time.time() - start_time
    iterations_run = max(1, num_iterations)
    summary = {
        "env_id": args.env_id, "exp_name": args.exp_name, "seed": args.seed, "pretrained_checkpoint": str(pretrained_path),
        "pretrained": history[0], "final": history[-1], "best": best, "history": history,
        "env_steps": global_step, "iterations": num_iterations, "wall_time_s": timings["wall"],
        "SPS": global_step / timings["wall"],
        "time_per_iteration_s": {key: timings[key] / iterations_run for key in ("env", "sampling", "critic", "ot", "actor", "eval")},
    }
    save_checkpoint(run_dir / f"{args.exp_name}.pt", {"args": vars(args), "policy": policy.state_dict(),
                    "obs_normalizer": obs_normalizer.state_dict(), "action_normalizer": action_normalizer.state_dict()})
    save_summary(run_dir / "summary.json", summary)  # last: a summary says the run finished
    print(json.dumps({k: summary[k] for k in ("pretrained", "final", "best", "env_steps", "wall_time_s", "SPS")}, indent=2))
    envs.close()
    eval_envs.close()
    writer.close()
    finish_tracking(tracking, run_name)

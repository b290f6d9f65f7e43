# OTPR: fine-tuning a score-based diffusion policy with optimal transport (Sun et al., 2025, arXiv 2502.12631).
# Docs and measured results: docs/otpr.md. `diff idql_baseline.py otpr.py` shows what OT adds to IDQL.
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
    """on a GPU, replay each pre-training step, critic update, potential-fit chunk, actor update and exploration sample as one CUDA graph"""
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
    """hidden widths of the Q and V networks"""
    critic_lr: float = 1e-3
    """learning rate of Q and V"""
    actor_lr: float = 1e-5
    """learning rate of the denoising network during fine-tuning"""
    tau: float = 0.005
    """Polyak rate of the target Q networks"""
    expectile: float = 0.7
    """IQL expectile of V (paper: 0.7; the released code trains V with 0.8)"""
    critic_warmup_iterations: int = 2
    """iterations of critic-only training before the policy is improved"""
    num_candidates: int = 8
    """policy samples S per state among which one is selected (exploration, and the `select` evaluation protocol)"""
    min_sampling_std: float = 0.01
    """floor on the DDPM noise std of every denoising step while exploring (DPPO's 0.1 collapses fine-tuning here)"""
    noise_clip: float = 3.0
    """clip on the DDPM noise while exploring"""

    # Optimal transport (OTPR)
    guidance: Literal["ot", "q", "advantage"] = "ot"
    """what selects candidates and weights the actor loss: OT compatibility H, exp(beta (Q - V)), or IDQL's expectile weights (Fig. 3)"""
    guidance_beta: float = 10.0
    """inverse temperature of the `q` guidance"""
    ot_mode: Literal["masked", "unsupervised"] = "masked"
    """keypoint-guided masked OT (Eq. 12-14) or plain OT with cost -Q (the paper's OTPR-U)"""
    ot_epsilon: float = 0.2
    """L2 regularisation epsilon of Eq. 5 / Eq. 14, in units of the standardised cost"""
    ot_alpha: float = 0.5
    """masked mode: cost = (1-alpha)*(-Q) + alpha*JS guidance (Eq. 14), each standardised; the released code's 1.0 ignores Q"""
    keypoint_tau: float = 0.1
    """temperature of the softmax relation vectors to the keypoints (Eq. 13)"""
    num_keypoints: int = 128
    """expert (state, action-chunk) pairs drawn once from the dataset and used as keypoints"""
    ot_batch_size: int = 256
    """replay states and (independently drawn) replay actions in the OT problem of each iteration"""
    ot_hidden: tuple[int, ...] = (256, 256)
    """hidden widths of the potentials u(s) and v(a) (SiLU MLPs)"""
    ot_lr: float = 1e-3
    """learning rate of the potentials"""
    ot_max_steps: int = 1000
    """most Adam steps of one potential fit (potentials are warm-started across iterations)"""
    ot_check_every: int = 25
    """Adam steps of a potential fit between two checks of its marginal residuals"""
    ot_tolerance: float = 0.1
    """a fit stops once both marginal residuals |E_a H - 1| and |E_s H - 1| on its batch are below this"""
    actor_objective: Literal["resampled", "plan", "aligned", "buffer"] = "aligned"
    """actor loss: Sec. 4.4 resampled targets, Eq. 10 over state x action pairs, guidance-weighted buffer pairs, or the released code's unweighted DSM"""

    # Evaluation, logging, checkpoints
    eval_frequency: int = 10
    """evaluate every this many iterations (iteration 0 evaluates the pre-trained policy)"""
    eval_episodes: int = 100
    """episodes per evaluation (same initial states and noise every time)"""
    eval_protocols: tuple[Literal["single", "select"], ...] = ("single",)
    """evaluation protocols, the first is the headline: one DDIM sample (the paper's S = 1), or S DDIM samples and one drawn by the guidance"""
    checkpoint_frequency: int = 5
    """save a resumable checkpoint every this many iterations"""


# Bad flag values end the run before it starts: numbers must be positive except these, and FRACTIONS lie in [0, 1].
MAY_BE_ZERO = ("seed", "threads", "total_timesteps", "ema_decay", "critic_warmup_iterations", "min_sampling_std", "ot_alpha")
FRACTIONS = ("ema_decay", "gamma", "tau", "expectile", "ot_alpha")

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
    # V's expectile 0.9 (IDQL's antmaze value) makes IDQL's weights |tau - 1(Q < V)| 0.9 / 0.1 instead of 0.7 / 0.3: at
    # 0.7 a candidate is at most 2.3 times as likely as another, and IDQL barely moved here (docs/how_otpr_works.md).
    "TwoGoals-v0": dict(dataset_source="scripted", actor_hidden=(128, 128, 128), pretrain_steps=5000,
                        pretrain_batch_size=256, num_envs=8, eval_frequency=5, eval_episodes=48,
                        critic_hidden=(128, 128), buffer_size=100_000, num_steps=10, total_timesteps=6400,
                        actor_lr=1e-4, expectile=0.9, ot_hidden=(64, 64), ot_batch_size=128, num_keypoints=64),
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
# IQL critics: V by expectile regression on min(Qbar1, Qbar2), twin Q by TD to V(s'), Polyak target
# ----------------------------------------------------------------------------------------------------------------
def expectile_loss(diff, expectile: float):
    weight = torch.where(diff > 0, expectile, 1 - expectile)
    return (weight * diff**2).mean()


def update_critics(batch, qf, qf_target, vf, q_optimizer, v_optimizer, args: Args) -> dict:
    with torch.no_grad():
        q_target = qf_target.min(batch["obs"], batch["actions"])
    v_loss = expectile_loss(q_target - vf(batch["obs"]).squeeze(-1), args.expectile)
    v_optimizer.zero_grad()
    v_loss.backward()
    v_optimizer.step()

    with torch.no_grad():
        next_v = vf(batch["next_obs"]).squeeze(-1)
        td_target = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * next_v
    q1, q2 = qf(batch["obs"], batch["actions"])
    q_loss = F.mse_loss(q1, td_target) + F.mse_loss(q2, td_target)
    q_optimizer.zero_grad()
    q_loss.backward()
    q_optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), args.tau)
    return {"q_loss": q_loss.detach(), "v_loss": v_loss.detach(), "q_values": q1.detach().mean()}


# ----------------------------------------------------------------------------------------------------------------
# Optimal transport: L2-regularised dual (Eq. 5), compatibility H (Eq. 6), keypoint-guided masked OT (Eq. 12-14)
# ----------------------------------------------------------------------------------------------------------------
def compatibility(u, v, cost, epsilon: float):
    """H(s, a) = max(0, u(s) + v(a) - c(s, a)) / (2 epsilon) (Eq. 6); the plan is d pi = H d mu d nu."""
    return F.relu(u + v - cost) / (2 * epsilon)


def l2_dual_objective(u, v, cost, epsilon: float, mask=None):
    """F(u, v) = E_mu[u] + E_nu[v] - E_{mu x nu}[M * max(0, u + v - c)^2] / (4 epsilon) (Eq. 5; Eq. 14 with a mask M),
    for empirical uniform measures: u of shape (n, 1), v of shape (1, m), cost (n, m)."""
    penalty = F.relu(u + v - cost) ** 2
    if mask is not None:
        penalty = penalty * mask
    return u.mean() + v.mean() - penalty.mean() / (4 * epsilon)


def marginal_residuals(h, mask=None) -> tuple[float, float]:
    """Mean |E_a H(s, .) - 1| over states and |E_s H(., a) - 1| over actions: both vanish at the optimum of Eq. 5."""
    if mask is not None:
        h = h * mask
    return (h.mean(1) - 1).abs().mean().item(), (h.mean(0) - 1).abs().mean().item()


def dual_ascent(u_net, v_net, optimizer, states, actions, cost, mask=None, epsilon: float = 1.0, num_steps: int = 25):
    """`num_steps` Adam steps up the dual of one fixed problem (full batch); returns the objective before the last."""
    for _ in range(num_steps):
        loss = -l2_dual_objective(u_net(states), v_net(actions).T, cost, epsilon, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return -loss.detach()


def fit_potentials(ascend, u_net, v_net, states, actions, cost, epsilon, mask=None, max_steps=2000, tolerance=0.05,
                   check_every=25) -> dict:
    """Ascends the dual of one fixed problem until both marginal residuals are below `tolerance`, checking them after
    each call of ascend(states, actions, cost, mask): dual_ascent with u, v, their optimizer, epsilon and `check_every`
    steps bound (one CUDA graph on a GPU). Stops after `max_steps` steps, rounded up to a multiple of `check_every`."""
    for step in range(check_every, max_steps + check_every, check_every):
        dual = ascend(states, actions, cost, mask)
        with torch.no_grad():
            residuals = marginal_residuals(compatibility(u_net(states), v_net(actions).T, cost, epsilon), mask)
        if max(residuals) < tolerance:
            break
    return {"steps": step, "dual": dual.item(), "residual_s": residuals[0], "residual_a": residuals[1]}


def relation_vectors(x, keypoints, tau: float):
    """R_k(x) = softmax_k(-cosine_distance(x, x_k) / tau) over the K keypoints (Eq. 13)."""
    cosine = F.normalize(x, dim=-1) @ F.normalize(keypoints, dim=-1).T
    return torch.softmax(-(1 - cosine) / tau, dim=-1)


def js_divergence(p, q):
    """Jensen-Shannon divergence along the last dimension (broadcasting), in [0, ln 2]."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (torch.log(a + 1e-10) - torch.log(b + 1e-10))).sum(-1)
    return (kl(p, m) + kl(q, m)) / 2


def keypoint_mass(num_keypoints: int, args: Args) -> float:
    """Mass K / (K + N) of the keypoint block of the masked plan, K the keypoints drawn (fewer than --num-keypoints
    when the dataset has fewer chunks), N = --ot-batch-size (0 without keypoints: unsupervised OT).

    The mask of Eq. 12 keeps, in the keypoint rows and columns, only the diagonal. Eq. 14 over K keypoints and N replay
    samples then separates: each keypoint pair (s_k, a_k) is a one-variable problem whose optimum is H = K + N, i.e.
    plan mass 1 / (K + N) on its own action whatever the cost; and the replay block is Eq. 5 between the N replay
    states and actions at epsilon (K + N) / N, carrying the remaining mass N / (K + N). So the replay block is fitted
    alone and the keypoint block is added in closed form (tests/test_ot.py checks both against POT)."""
    return num_keypoints / (num_keypoints + args.ot_batch_size) if args.ot_mode == "masked" else 0.0


def in_blocks(fn, *inputs, pairs_per_block: int = 4096):
    """fn over inputs that share their leading shape, one slice of the first dimension (about `pairs_per_block` pairs)
    at a time, concatenated: the values of one call, but each block's activations stay in the CPU's cache (the OT cost
    matrix: 1.3 s instead of 1.9 s on this project's 2-core CPU, docs/speed.md, item 5)."""
    rows = max(1, pairs_per_block * len(inputs[0]) // max(1, inputs[0][..., 0].numel()))
    return torch.cat([fn(*block) for block in zip(*(x.split(rows) for x in inputs))])


class TransportCost(nn.Module):
    """c(s, a) = -min(Qbar1, Qbar2)(s, a) (Eq. 8), in masked mode mixed with the keypoint guidance
    G(s, a) = JS(R^s(s) || R^a(a)) as (1 - alpha) c + alpha G (Eq. 13-14). One function serves the potential fit,
    the selection of candidates and the actor weights, so H is always computed with the cost u, v were fitted to.

    -Q and G are each divided by their own spread on the last fitted problem, so that alpha weighs two unit-scale terms
    throughout a run and epsilon does not have to follow the magnitude of Q as it grows. `epsilon` is the one of the
    replay block (see keypoint_mass); `fitted` says whether u, v have been fitted yet."""

    def __init__(self, keypoint_obs, keypoint_actions, args: Args):
        super().__init__()
        self.register_buffer("keypoint_obs", keypoint_obs)
        self.register_buffer("keypoint_actions", keypoint_actions)
        self.register_buffer("q_scale", torch.ones(()))
        self.register_buffer("g_scale", torch.ones(()))
        self.alpha = args.ot_alpha if args.ot_mode == "masked" else 0.0
        self.tau = args.keypoint_tau
        self.keypoint_mass = keypoint_mass(len(keypoint_actions), args)
        self.epsilon = args.ot_epsilon / (1 - self.keypoint_mass)
        self.fitted = False

    def get_extra_state(self):
        return {"fitted": self.fitted}

    def set_extra_state(self, state):
        self.fitted = state["fitted"]

    @torch.no_grad()
    def forward(self, qf_target, obs, actions, all_pairs: bool = False, rescale: bool = False):
        """Cost of aligned pairs (any leading shape) or, with `all_pairs`, of every state with every action (n, m).
        `rescale` first sets the spreads of -Q and G from this problem (once per potential fit)."""
        if self.alpha > 0:
            rel_s = relation_vectors(obs, self.keypoint_obs, self.tau)
            rel_a = relation_vectors(actions, self.keypoint_actions, self.tau)
        if all_pairs:
            obs, actions = obs[:, None].expand(-1, len(actions), -1), actions[None].expand(len(obs), -1, -1)
            if self.alpha > 0:
                rel_s, rel_a = rel_s[:, None], rel_a[None]
        cost = 0.0
        if self.alpha < 1:
            negative_q = -in_blocks(qf_target.min, obs, actions)
            if rescale:
                self.q_scale.copy_(negative_q.std().clamp(min=1e-6))
            cost = (1 - self.alpha) * negative_q / self.q_scale
        if self.alpha > 0:
            guide = js_divergence(rel_s, rel_a)
            if rescale:
                self.g_scale.copy_(guide.std().clamp(min=1e-6))
            cost = cost + self.alpha * guide / self.g_scale
        return cost


def fit_transport(ascend, u_net, v_net, qf_target, transport_cost: TransportCost, replay, args: Args) -> dict:
    """Alg. 2 on the replay block: fit u, v on one OT problem between independently drawn replay states and actions,
    warm-started from the previous iteration's potentials."""
    states = replay.sample(args.ot_batch_size, ("obs",))["obs"]
    actions = replay.sample(args.ot_batch_size, ("actions",))["actions"]
    cost = transport_cost(qf_target, states, actions, all_pairs=True, rescale=True)
    stats = fit_potentials(ascend, u_net, v_net, states, actions, cost, transport_cost.epsilon,
                           max_steps=args.ot_max_steps, tolerance=args.ot_tolerance, check_every=args.ot_check_every)
    transport_cost.fitted = True
    return stats


def correlation(x, y):
    """Pearson correlation along the last dimension (0 where either is constant)."""
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-12)


@torch.no_grad()
def ot_diagnostics(u_net, v_net, qf_target, transport_cost: TransportCost, replay, sample_exploring,
                   args: Args) -> dict:
    """The fitted plan on a held-out draw the fit never saw: marginal residuals and the fraction of pairs with H = 0;
    and what decides whether H can tell one state's candidates apart (docs/otpr.md, "How much the guidance acts"):
    cost_state_share, cost_action_share: the shares of the cost's variance over the draw's pairs explained by the
        state alone and by the action alone (u(s) and v(a) absorb these parts; only the rest shapes the plan);
    candidate_cost_spread: the std of the cost among S exploration samples of one state, over 2 epsilon (a cost
        difference of 2 epsilon moves H by 1, its mean over actions), averaged over 64 of the draw's states;
    candidate_q_spread: the std of Q among those samples over the scale of -Q in the cost (q_scale);
    candidate_h_q_correlation: the correlation of H with Q among them (1: H ranks them as Q does);
    candidate_v_cost_correlation: the correlation of v(a) with the cost among them. H sees the cost only through
        u(s) + v(a) - c(s, a), and v absorbs any part of the cost that depends on the action alone (adding g(a) to c
        adds g to the optimal v and leaves H unchanged), so near 1 means the candidates' cost differences are mostly
        such a part, which H cannot see;
    selection_q_gain: how much higher Q is, in stds of Q among them, for the candidate drawn in proportion to H than
        for one drawn uniformly (0: the guidance does not prefer what the critic prefers)."""
    states = replay.sample(args.ot_batch_size, ("obs",))["obs"]
    actions = replay.sample(args.ot_batch_size, ("actions",))["actions"]
    cost = transport_cost(qf_target, states, actions, all_pairs=True)
    h = compatibility(u_net(states), v_net(actions).T, cost, transport_cost.epsilon)
    stats = {"frac_zero_h": (h == 0).float().mean().item(), "q_scale": transport_cost.q_scale.item(),
             "g_scale": transport_cost.g_scale.item(),
             "cost_state_share": (cost.mean(1).var() / cost.var()).item(),
             "cost_action_share": (cost.mean(0).var() / cost.var()).item()}
    stats["heldout_residual_s"], stats["heldout_residual_a"] = marginal_residuals(h)
    candidate_states = states[:64, None].expand(-1, args.num_candidates, -1)
    candidates = sample_exploring(candidate_states.reshape(-1, states.shape[-1])).view(*candidate_states.shape[:2], -1)
    candidate_cost, candidate_v = transport_cost(qf_target, candidate_states, candidates), v_net(candidates).squeeze(-1)
    candidate_h = compatibility(u_net(candidate_states).squeeze(-1), candidate_v, candidate_cost, transport_cost.epsilon)
    q = qf_target.min(candidate_states, candidates)
    standardised_q = (q - q.mean(1, keepdim=True)) / q.std(1, keepdim=True).clamp(min=1e-8)
    stats["candidate_cost_spread"] = (candidate_cost.std(1).mean() / (2 * transport_cost.epsilon)).item()
    stats["candidate_q_spread"] = (q.std(1).mean() / transport_cost.q_scale).item()
    stats["candidate_h_q_correlation"] = correlation(candidate_h, q).mean().item()
    stats["candidate_v_cost_correlation"] = correlation(candidate_v, candidate_cost).mean().item()
    selection = candidate_h / candidate_h.sum(1, keepdim=True).clamp(min=1e-30)
    stats["selection_q_gain"] = (selection * standardised_q).sum(1).mean().item()
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Guidance: which candidate is executed (Sec. 4.4) and how the actor's score-matching targets are chosen (Eq. 10)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def guidance_weights(obs, actions, qf_target, vf, u_net, v_net, transport_cost: TransportCost, args: Args):
    """Non-negative weights of (state, action-chunk) pairs of any leading shape:
    ot: the compatibility H (Eq. 6), once the potentials are fitted;
    q: exp(beta (Q - V(s))), measured against the state's own value and capped at 100;
    advantage (and ot before the first fit): IDQL's expectile weights |tau - 1(Q - V(s) < 0)|."""
    if args.guidance == "ot" and transport_cost.fitted:
        cost = transport_cost(qf_target, obs, actions)
        return compatibility(u_net(obs).squeeze(-1), v_net(actions).squeeze(-1), cost, transport_cost.epsilon)
    advantage = qf_target.min(obs, actions) - vf(obs).squeeze(-1)
    if args.guidance == "q":
        return torch.exp((args.guidance_beta * advantage).clamp(max=math.log(100)))
    return torch.where(advantage > 0, args.expectile, 1 - args.expectile)


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


def actor_minibatches(sample_exploring, replay, weigh, args: Args, num_updates: int):
    """The (states, action chunks, guidance weights or None) of each actor update of one iteration, by --actor-objective:
    resampled: Sec. 4.4, S policy samples per replay state, one drawn in proportion to the guidance, as DSM targets;
    plan: Eq. 10, every pair of sqrt(B) replay states and sqrt(B) independently drawn replay actions, weighted by the
        guidance (with OT: the plan density H, so this is DSM on the plan's conditional, Theorem 4.3);
    aligned: the buffer's own (s, a) pairs weighted by the guidance: Eq. 10's weighting on the joint samples of the
        buffer instead of Eq. 10's integral over mu x nu (neither Eq. 10 nor Sec. 4.4; the released code has it
        commented out). The critics and potentials stay fixed through the actor updates, and so does every pair's
        weight: it is computed once per distinct buffer row that the iteration's minibatches draw (with the default
        budget at most a ninth of the draws);
    buffer: the released code's unweighted buffer pairs (OT acts only through what was executed).
    Minibatches are made as the updates ask for them: `resampled` samples the policy of the current update
    (`sample_exploring`: states -> exploration chunks)."""
    if args.actor_objective == "aligned":
        idx = torch.randint(replay.size, (num_updates, args.actor_batch_size), device=replay.data["obs"].device)
        rows, position = idx.unique(return_inverse=True)
        weights = in_blocks(weigh, replay.data["obs"][rows], replay.data["actions"][rows])[position]
        for update in range(num_updates):
            yield replay.data["obs"][idx[update]], replay.data["actions"][idx[update]], weights[update]
        return
    for _ in range(num_updates):
        if args.actor_objective == "plan":
            n = math.isqrt(args.actor_batch_size)
            obs = replay.sample(n, ("obs",))["obs"][:, None].expand(-1, n, -1)
            actions = replay.sample(n, ("actions",))["actions"][None].expand(n, -1, -1)
            yield obs.reshape(n * n, -1), actions.reshape(n * n, -1), weigh(obs, actions).reshape(-1)
        else:
            batch = replay.sample(args.actor_batch_size, ("obs", "actions"))
            if args.actor_objective == "resampled":
                batch["actions"], _ = select_candidates(batch["obs"], sample_exploring, weigh, args)
            yield batch["obs"], batch["actions"], None


def actor_loss(policy, obs, actions, weights, transport_cost: TransportCost, args: Args):
    """Score matching on one minibatch, each pair weighted by its guidance weight normalised to mean 1 (Eq. 10's H
    weighting, on whichever pairs actor_minibatches drew).
    In masked mode the plan's keypoint block adds DSM on the keypoint pairs with its mass K / (K + N) (keypoint_mass),
    so every keypoint state is matched to its own action; both blocks go through the network as one batch."""
    with_keypoints = args.guidance == "ot" and args.actor_objective != "buffer" and args.ot_mode == "masked"
    if with_keypoints:
        obs = torch.cat([obs, transport_cost.keypoint_obs])
        actions = torch.cat([actions, transport_cost.keypoint_actions])
    per_pair = policy.loss(actions, obs)
    num_keypoints = len(transport_cost.keypoint_obs) if with_keypoints else 0
    replay_part, keypoint_part = per_pair.split([len(per_pair) - num_keypoints, num_keypoints])
    # the guidance's lever on what is learned: the effective share of the batch its weights use (1: unweighted)
    batch_ess = torch.ones((), device=per_pair.device)
    if weights is not None:
        replay_part = replay_part * weights / weights.mean().clamp(min=1e-8)
        batch_ess = effective_sample_size(weights) / len(weights)
    if not with_keypoints:
        return replay_part.mean(), {"batch_ess": batch_ess, "keypoint_loss_share": torch.zeros_like(batch_ess)}
    keypoint_term = transport_cost.keypoint_mass * keypoint_part.mean()
    loss = (1 - transport_cost.keypoint_mass) * replay_part.mean() + keypoint_term
    return loss, {"batch_ess": batch_ess, "keypoint_loss_share": (keypoint_term / loss).detach()}


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
    if args.ot_mode == "unsupervised" and args.ot_alpha != Args.ot_alpha:
        raise ValueError(f"--ot-alpha {args.ot_alpha} weighs the keypoint guidance of --ot-mode masked; the cost of "
                         "--ot-mode unsupervised is -Q alone: drop --ot-alpha, or use --ot-mode masked")


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
    vf = mlp(obs_dim, args.critic_hidden, 1).to(device)
    # fused: one kernel updates every parameter, on the CPU as on the GPU; capturable: the step may be part of a
    # CUDA graph (docs/speed.md)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.critic_lr, fused=True, capturable=True)
    v_optimizer = torch.optim.Adam(vf.parameters(), lr=args.critic_lr, fused=True, capturable=True)
    actor_optimizer = torch.optim.Adam(policy.parameters(), lr=args.actor_lr, fused=True, capturable=True)
    replay = ReplayBuffer(args.buffer_size, obs_dim, action_dim, device)
    if args.offline_data_in_buffer:
        replay.add(normalized_chunks)
    checkpointed = {"policy": policy, "qf": qf, "qf_target": qf_target, "vf": vf, "q_optimizer": q_optimizer,
                    "v_optimizer": v_optimizer, "actor_optimizer": actor_optimizer, "replay": replay}
    # OTPR: potentials u(s), v(a), and the keypoints, a fixed set of expert pairs so that the cost is one function.
    # Initialised on a forked RNG: every random number shared with idql_baseline.py stays the same.
    with torch.random.fork_rng():
        u_net = mlp(obs_dim, args.ot_hidden, 1, nn.SiLU).to(device)
        v_net = mlp(action_dim, args.ot_hidden, 1, nn.SiLU).to(device)
    ot_optimizer = torch.optim.Adam([*u_net.parameters(), *v_net.parameters()], lr=args.ot_lr, fused=True,
                                    capturable=True)
    keypoint_idx = torch.randperm(len(normalized_chunks["obs"]), generator=torch.Generator().manual_seed(args.seed))
    keypoint_idx = keypoint_idx[: args.num_keypoints].to(device)
    transport_cost = TransportCost(normalized_chunks["obs"][keypoint_idx], normalized_chunks["actions"][keypoint_idx],
                                   args).to(device)
    checkpointed.update(u_net=u_net, v_net=v_net, ot_optimizer=ot_optimizer, transport_cost=transport_cost)
    weigh = partial(guidance_weights, qf_target=qf_target, vf=vf, u_net=u_net, v_net=v_net,
                    transport_cost=transport_cost, args=args)

    # On a GPU every critic update, actor update and exploration sample is one CUDA graph (CudaGraph): same computation,
    # one launch instead of hundreds
    graphs = args.cuda_graphs and device.type == "cuda"
    critic_update = CudaGraph(partial(update_critics, qf=qf, qf_target=qf_target, vf=vf, q_optimizer=q_optimizer,
                                      v_optimizer=v_optimizer, args=args), graphs)
    sample_exploring = partial(policy.sample, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
    explore = CudaGraph(sample_exploring, graphs)
    # OTPR: the potential fit ascends in chunks of --ot-check-every steps, one graph each
    ascend = CudaGraph(partial(dual_ascent, u_net, v_net, ot_optimizer, epsilon=transport_cost.epsilon,
                               num_steps=args.ot_check_every), graphs)

    def actor_step(obs_batch, actions_batch, weights):
        loss, lever = actor_loss(policy, obs_batch, actions_batch, weights, transport_cost, args)
        actor_optimizer.zero_grad()
        loss.backward()
        actor_optimizer.step()
        return {"loss": loss.detach(), **lever}

    actor_update = CudaGraph(actor_step, graphs)

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

        # Collect num_steps decisions per env, executing one guided candidate per state (Sec. 4.4)
        levers = []
        for step in range(args.num_steps):
            tic = time.perf_counter()
            obs_n = obs_normalizer.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
            actions, lever = select_candidates(obs_n, explore, weigh, args)
            levers.append(lever)
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
            critic_stats = critic_update(replay.sample(args.critic_batch_size))
        check_finite(critic_stats["q_loss"] + critic_stats["v_loss"], "critic loss", global_step)
        timings["critic"] += time.perf_counter() - tic

        if iteration >= args.critic_warmup_iterations:
            if args.guidance == "ot":
                tic = time.perf_counter()
                ot_stats = fit_transport(ascend, u_net, v_net, qf_target, transport_cost, replay, args)
                check_finite(torch.tensor(ot_stats["dual"]), "OT dual objective", global_step)
                if iteration % args.eval_frequency == 0:  # held-out checks cost as much as the fit's cost matrix
                    ot_stats.update(ot_diagnostics(u_net, v_net, qf_target, transport_cost, replay, sample_exploring,
                                                    args))
                timings["ot"] += time.perf_counter() - tic
                for key, value in ot_stats.items():
                    writer.add_scalar(f"ot/{key}", value, global_step)

            tic = time.perf_counter()
            actor_levers = []
            for obs_batch, actions_batch, weights in actor_minibatches(sample_exploring, replay, weigh, args,
                                                                       updates_per_iteration):
                actor_stats = actor_update(obs_batch, actions_batch, weights)
                # stacked, hence copied: a CUDA graph's outputs are overwritten by its next replay
                actor_levers.append(torch.stack([actor_stats["batch_ess"], actor_stats["keypoint_loss_share"]]))
            check_finite(actor_stats["loss"], "actor loss", global_step)
            writer.add_scalar("losses/actor", actor_stats["loss"].item(), global_step)
            # the lever of the guidance on what is learned: how unequal the pairs' weights are, and the keypoints' part
            batch_ess, keypoint_loss_share = torch.stack(actor_levers).mean(0).tolist()
            writer.add_scalar("guidance/batch_ess", batch_ess, global_step)
            writer.add_scalar("guidance/keypoint_loss_share", keypoint_loss_share, global_step)
            timings["actor"] += time.perf_counter() - tic
        # the lever of the guidance on what is executed: how much it discriminates among a state's S candidates
        for key in ("candidate_ess", "top_candidate_prob", "candidate_spread"):
            writer.add_scalar(f"guidance/{key}", torch.cat([lever[key] for lever in levers]).mean().item(), global_step)
        writer.add_scalar("guidance/frac_states_all_zero", torch.cat([lever["all_zero"] for lever in levers]).float()
                          .mean().item(), global_step)

        timings["wall"] = time.time() - start_time
        writer.add_scalar("losses/q", critic_stats["q_loss"].item(), global_step)
        writer.add_scalar("losses/v", critic_stats["v_loss"].item(), global_step)
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

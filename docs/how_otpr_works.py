"""Draws the pictures of docs/how_otpr_works.md from TwoGoals-v0 runs of the five scripts (and of otpr.py in two more
modes), after running them:

    python -m docs.how_otpr_works            # the sweep docs/sweeps/two_goals.txt (skips finished runs), then the PNGs

It lives in docs/, not utils/, because it imports the scripts (otpr.py for its plan and weights, every script for
its policy), which nothing in utils/ may. Each picture is drawn from saved files only:
- learning_curves.png: every method's normalized score over env steps, mean and min-max over 5 seeds (summary.json);
- rollouts.png: each method's deterministic policy from 24 fixed starts, pre-trained and fine-tuned (seed 1's files);
- candidates.png: S = 64 exploration samples at three states, coloured by Q, by OTPR's H and by IDQL's weights (all
  three from the fine-tuned OTPR run's critics and potentials: seed 1's checkpoint.pt);
- plan.png: one potential fit on a batch of replay states x replay actions, its plan H beside Q (the same checkpoint);
  plan_unsupervised.png: the same for the OTPR-U run (--ot-mode unsupervised, seed 1).
It prints the numbers the page quotes.
"""
import argparse
import dataclasses
import functools
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from utils import two_goals
from utils.benchmark import curves, load_summaries
from utils.runtime import load_checkpoint

SWEEP = Path("docs/sweeps/two_goals.txt")
OUT = Path("docs/how_otpr_works")
# exp name in the sweep -> script. otpr_q: otpr.py with --guidance q (exp(beta (Q - V)) in place of H); otpr_u: with
# --ot-mode unsupervised (the cost -Q alone, no keypoints: the paper's OTPR-U)
METHODS = {"otpr": "otpr.py", "otpr_u": "otpr.py", "otpr_q": "otpr.py", "idql": "idql_baseline.py",
           "dql": "dql_baseline.py", "qsm": "qsm_baseline.py", "dppo": "dppo_baseline.py"}
STATES = np.array([[-0.2, 0.0], [0.0, 0.0], [0.2, 0.0]], dtype=np.float32)  # the states of candidates.png


def run_dir(runs: Path, exp_name: str, seed: int) -> Path:
    """The finished run of the sweep's line (exp_name, seed)."""
    folders = [f for f in sorted(runs.glob(f"{two_goals.ENV_ID}__{exp_name}__{seed}__*")) if (f / "summary.json").is_file()]
    if not folders:
        raise SystemExit(f"no finished run {exp_name} seed {seed} under {runs}: run `python -m utils.benchmark queue {SWEEP}`")
    return folders[-1]


def load_policy(module, saved: dict, args):
    """The script's DiffusionPolicy with the saved weights, and its normalizers. DPPO's fine-tuned network is its
    FineTunedDenoiser (frozen early steps, a trained copy for the last ones)."""
    obs_dim, action_dim = 2, 2 * args.chunk_size
    policy = module.DiffusionPolicy(obs_dim, action_dim, args)
    if any(key.startswith("network.finetuned.") for key in saved["policy"]):
        policy.network = module.FineTunedDenoiser(policy.network, args.ft_denoising_steps)
    policy.load_state_dict(saved["policy"])
    obs_normalizer = module.Normalizer(np.zeros(obs_dim), np.ones(obs_dim))
    action_normalizer = module.Normalizer(np.zeros(action_dim), np.ones(action_dim))
    obs_normalizer.load_state_dict(saved["obs_normalizer"])
    action_normalizer.load_state_dict(saved["action_normalizer"])
    return policy.eval(), obs_normalizer, action_normalizer


def script_args(module, saved_args: dict):
    """The script's Args from saved flags (lists back to tuples; keys the script does not know, left out)."""
    fields = {f for f in module.Args.__dataclass_fields__}
    return module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved_args.items() if k in fields})


def rollouts(policy, obs_normalizer, action_normalizer, chunk_size: int, starts: np.ndarray, seed: int = 0):
    """Paths (list of (T, 2) arrays) and returns of the deterministic (DDIM) policy from each start."""
    generator = torch.Generator().manual_seed(seed)
    env = two_goals.TwoGoalsEnv()
    paths, returns = [], []
    for start in starts:
        env.reset(seed=0)
        env.position = start.astype(np.float64)
        obs, path, done, total = start.astype(np.float32), [start], False, 0.0
        while not done:
            chunk = policy.sample(obs_normalizer.normalize(torch.as_tensor(obs)[None]), deterministic=True,
                                  generator=generator)
            for action in action_normalizer.unnormalize(chunk)[0].view(chunk_size, -1).numpy():
                obs, reward, terminated, truncated, _ = env.step(action)
                path.append(obs)
                total += reward
                done = terminated or truncated
                if done:
                    break
        paths.append(np.array(path))
        returns.append(total)
    return paths, np.array(returns)


def otpr_parts(path: Path):
    """otpr.py's module, Args and the fine-tuned run's policy, critics, potentials, cost and replay (checkpoint.pt)."""
    otpr = importlib.import_module("otpr")
    saved = load_checkpoint(path)
    args = script_args(otpr, saved["args"])
    obs_dim, action_dim = 2, 2 * args.chunk_size
    parts = {"policy": otpr.DiffusionPolicy(obs_dim, action_dim, args),
             "qf_target": otpr.TwinQ(obs_dim, action_dim, args.critic_hidden),
             "vf": otpr.mlp(obs_dim, args.critic_hidden, 1),
             "u_net": otpr.mlp(obs_dim, args.ot_hidden, 1, torch.nn.SiLU),
             "v_net": otpr.mlp(action_dim, args.ot_hidden, 1, torch.nn.SiLU),
             "transport_cost": otpr.TransportCost(torch.zeros(args.num_keypoints, obs_dim),
                                                  torch.zeros(args.num_keypoints, action_dim), args),
             "replay": otpr.ReplayBuffer(saved["replay"]["size"], obs_dim, action_dim, "cpu")}
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    return otpr, args, parts


def figure(rows: int, cols: int, size_in: tuple[float, float]):
    """A Figure on the Agg canvas (no display needed, pyplot left alone) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=100)
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols, squeeze=False))


def draw_plane(ax, title: str):
    from matplotlib.patches import Circle, Rectangle

    for goal, color in ((two_goals.GOOD, "tab:green"), (two_goals.POOR, "tab:orange")):
        ax.add_patch(Circle(goal, two_goals.RADIUS, color=color, alpha=0.4))
    corner, side = -two_goals.START, 2 * two_goals.START  # where episodes start
    ax.add_patch(Rectangle((corner, corner), side, side, fill=False, linestyle=":", color="grey"))
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-0.45, 1.1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def move_x(chunks: np.ndarray) -> np.ndarray:
    """How far along x each action chunk (..., steps, 2) moves the point, in units of SPEED (actions clipped as the
    env clips them)."""
    return np.clip(chunks, -1, 1)[..., 0].sum(-1)


def rightward(chunks: np.ndarray) -> np.ndarray:
    """Whether each action chunk moves the point right, toward the good goal's side (the good goal is at x = 0.7, the
    poor one at x = -0.7, both at y = 0.7)."""
    return move_x(chunks) > 0


def candidates_picture(otpr, args, parts, normalizers, out: Path, num_candidates: int = 64) -> dict:
    """S exploration samples at each of STATES, drawn as 4-step paths, coloured by Q, H and IDQL's weights; returns
    per state the share of rightward candidates (toward the good goal), the probability that H and IDQL's weights
    select one of them, and the mean Q of the rightward and the leftward ones."""
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    obs_normalizer, action_normalizer = normalizers
    torch.manual_seed(0)
    obs = obs_normalizer.normalize(torch.as_tensor(STATES)).repeat_interleave(num_candidates, 0)
    with torch.no_grad():
        actions = parts["policy"].sample(obs, min_std=args.min_sampling_std, noise_clip=args.noise_clip)
        q = parts["qf_target"].min(obs, actions)
        weights = {guidance: otpr.guidance_weights(obs, actions, parts["qf_target"], parts["vf"], parts["u_net"],
                                                   parts["v_net"], parts["transport_cost"],
                                                   dataclasses.replace(args, guidance=guidance))
                   for guidance in ("ot", "advantage")}
    shape = (len(STATES), num_candidates)
    chunks = action_normalizer.unnormalize(actions).view(*shape, args.chunk_size, 2).numpy()
    good = rightward(chunks)
    colourings = {"Q(s, a) (target critic)": q, "OTPR: H(s, a) (Eq. 6)": weights["ot"],
                  "IDQL: |tau - 1(Q < V)|": weights["advantage"]}
    fig, axes = figure(len(colourings), len(STATES), (11, 10))
    numbers = []
    for row, (name, value) in enumerate(colourings.items()):
        value = value.view(shape).numpy()
        for col, state in enumerate(STATES):
            ax = axes[row, col]
            draw_plane(ax, f"{name}\nat s = ({state[0]:+.1f}, {state[1]:+.1f})")
            paths = state + two_goals.SPEED * np.cumsum(np.clip(chunks[col], -1, 1), axis=1)
            low, high = value[col].min(), value[col].max()
            colours = (value[col] - low) / max(high - low, 1e-12)
            for path, c in zip(paths, colours):
                ax.plot(*np.vstack([state, path]).T, color=viridis(c), lw=1)
            ax.plot(*state, "k.", ms=6)
            ax.text(-0.95, -0.4, f"{low:.2f} (dark) to {high:.2f} (yellow)", fontsize=7)
    for col, state in enumerate(STATES):
        h, idql = weights["ot"].view(shape)[col].numpy(), weights["advantage"].view(shape)[col].numpy()
        numbers.append({"state": state.tolist(), "rightward": float(good[col].mean()),
                        "selected_by_h": float((h * good[col]).sum() / max(h.sum(), 1e-12)),
                        "selected_by_idql": float((idql * good[col]).sum() / idql.sum()),
                        "q_rightward": float(q.view(shape)[col].numpy()[good[col]].mean()) if good[col].any() else None,
                        "q_leftward": float(q.view(shape)[col].numpy()[~good[col]].mean()) if (~good[col]).any() else None})
    fig.suptitle(f"{num_candidates} exploration samples (4-step chunks) of the fine-tuned OTPR policy at three states,\n"
                 "coloured in each panel from its lowest value (dark) to its highest (yellow)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    return {"candidates": numbers}


def plan_picture(otpr, args, parts, normalizers, out: Path) -> dict:
    """One fit of Alg. 2 as fit_transport makes it (ot_batch_size replay states and independently drawn replay actions,
    the potentials warm-started from the run's), then Q and the plan H over all its pairs, states sorted by x and
    actions by their chunk's move along x. Returns the fit's residuals and how H splits the actions' mass."""
    obs_normalizer, action_normalizer = normalizers
    torch.manual_seed(1)
    batch_size, cost_fn = args.ot_batch_size, parts["transport_cost"]
    states = parts["replay"].sample(batch_size, ("obs",))["obs"]
    actions = parts["replay"].sample(batch_size, ("actions",))["actions"]
    x = obs_normalizer.unnormalize(states)[:, 0].numpy()
    chunks = action_normalizer.unnormalize(actions).view(batch_size, args.chunk_size, 2).numpy()
    by_x, by_move = np.argsort(x), np.argsort(move_x(chunks))
    states, actions, x, chunks = states[by_x], actions[by_move], x[by_x], chunks[by_move]  # the plan ignores order
    cost = cost_fn(parts["qf_target"], states, actions, all_pairs=True, rescale=True)
    optimizer = torch.optim.Adam([*parts["u_net"].parameters(), *parts["v_net"].parameters()], lr=args.ot_lr)
    ascend = functools.partial(otpr.dual_ascent, parts["u_net"], parts["v_net"], optimizer, epsilon=cost_fn.epsilon,
                               num_steps=args.ot_check_every)
    fit = otpr.fit_potentials(ascend, parts["u_net"], parts["v_net"], states, actions, cost, cost_fn.epsilon,
                              max_steps=args.ot_max_steps, tolerance=args.ot_tolerance, check_every=args.ot_check_every)
    with torch.no_grad():
        q = parts["qf_target"].min(states[:, None].expand(-1, batch_size, -1), actions[None].expand(batch_size, -1, -1))
        h = otpr.compatibility(parts["u_net"](states), parts["v_net"](actions).T, cost, cost_fn.epsilon)
    fig, axes = figure(1, 2, (11, 4.8))
    for ax, (name, value) in zip(axes[0], (("Q(s, a)", q), ("H(s, a): the plan's density (Eq. 6)", h))):
        image = ax.imshow(value.numpy(), aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("replay action chunks, by their move along x (left to right)", fontsize=8)
        ax.set_ylabel("replay states, by x (left to right)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"One OT fit: {batch_size} replay states x {batch_size} replay action chunks (fine-tuned OTPR, "
                 f"--ot-mode {args.ot_mode})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    left, right, to_right = x < 0, x > 0, rightward(chunks)
    h, q = h.numpy(), q.numpy()
    share = lambda rows: float(h[rows][:, to_right].sum() / max(h[rows].sum(), 1e-12))  # noqa: E731
    gain = lambda rows: float(q[rows][:, to_right].mean() - q[rows][:, ~to_right].mean())  # noqa: E731
    return {"plan": {"fit_steps": fit["steps"], "residual_s": fit["residual_s"], "residual_a": fit["residual_a"],
                     "rightward_actions": float(to_right.mean()), "zero_pairs": float((h == 0).mean()),
                     "h_rightward_left_states": share(left), "h_rightward_right_states": share(right),
                     "q_rightward_minus_leftward_left_states": gain(left),
                     "q_rightward_minus_leftward_right_states": gain(right)}}


def learning_curves_picture(runs: Path, out: Path) -> dict:
    """Normalized score over env steps, mean over seeds and min-max band, one line per method: over the off-policy
    methods' budget (left) and over DPPO's (right)."""
    found = [(d, s) for d, s in load_summaries(runs) if s.get("env_id") == two_goals.ENV_ID and s.get("exp_name") in METHODS]
    data = curves(found)
    fig, axes = figure(1, 2, (12, 4.8))
    numbers = {}
    for color, name in enumerate(METHODS):
        if (two_goals.ENV_ID, name) not in data:
            continue
        d = data[(two_goals.ENV_ID, name)]
        mean, low, high = d["normalized_score"]
        for ax in axes[0]:
            ax.plot(d["env_steps"], mean, marker="o", ms=3, color=f"C{color}", label=f"{name} ({d['seeds']} seeds)")
            ax.fill_between(d["env_steps"], low, high, color=f"C{color}", alpha=0.15, linewidth=0)
        members = [s for _, s in found if s["exp_name"] == name]
        finals = [s["final"]["normalized_score"] for s in members]
        numbers[name] = {"seeds": d["seeds"], "pretrained": float(np.mean([s["pretrained"]["normalized_score"]
                                                                           for s in members])),
                         "final": float(np.mean(finals)), "finals": finals, "env_steps": float(d["env_steps"][-1]),
                         "wall_time_s": float(np.mean([s["wall_time_s"] for s in members]))}
    off_policy_steps = max([v["env_steps"] for k, v in numbers.items() if k != "dppo"], default=1.0)
    for ax, right in zip(axes[0], (off_policy_steps * 1.05, None)):
        ax.set(xlabel="env steps", ylabel="normalized score (100: the optimum)", ylim=(-2, 102))
        ax.set_xlim(0, right)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("the off-policy methods' budget", fontsize=10)
    axes[0, 1].set_title("DPPO's budget", fontsize=10)
    axes[0, 1].legend(title="mean over seeds; band: min-max", fontsize=8, title_fontsize=8)
    fig.suptitle(f"{two_goals.ENV_ID}: fine-tuning each method from the same pre-trained policies, 48 episodes per point",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    return {"learning": numbers}


def rollouts_picture(runs: Path, out: Path, num_starts: int = 24) -> dict:
    """Seed 1's deterministic policy from num_starts fixed starts: the shared pre-trained policy, then each method's."""
    starts = np.random.default_rng(0).uniform(-two_goals.START, two_goals.START, (num_starts, 2)).astype(np.float32)
    panels = []
    for name, script in METHODS.items():
        folder = run_dir(runs, name, 1)
        module = importlib.import_module(Path(script).stem)
        if not panels:
            pretrained = json.loads((folder / "summary.json").read_text())["pretrained_checkpoint"]
            saved = load_checkpoint(Path(pretrained))
            panels.append(("pre-trained (shared)", module, saved, script_args(module, saved["meta"]["config"])))
        saved = load_checkpoint(folder / f"{name}.pt")
        panels.append((f"{name}, fine-tuned", module, saved, script_args(module, saved["args"])))
    cols = (len(panels) + 1) // 2
    fig, axes = figure(2, cols, (4 * cols, 6.5))
    numbers = {}
    colours = {two_goals.GOOD_REWARD: "tab:green", two_goals.POOR_REWARD: "tab:orange", 0.0: "tab:grey"}
    for ax, (title, module, saved, args) in zip(axes.flat, panels):
        paths, returns = rollouts(*load_policy(module, saved, args), args.chunk_size, starts)
        numbers[title] = {"mean_return": float(returns.mean()), "good": float((returns == two_goals.GOOD_REWARD).mean())}
        draw_plane(ax, f"{title}: return {returns.mean():.2f}, good goal {numbers[title]['good']:.0%}")
        for path, ret in zip(paths, returns):
            ax.plot(*path.T, color=colours[ret], lw=1, alpha=0.8)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"The deterministic (DDIM) policy of seed 1 from {num_starts} fixed starts; green: good goal, orange: "
                 "poor goal, grey: time-out", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    return {"rollouts": numbers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the runs to draw from are (the sweep "
                        "itself writes under ./runs)")
    parser.add_argument("--parallel", type=int, default=2, help="runs of the sweep at once")
    parser.add_argument("--skip-sweep", action="store_true", help="draw from the runs there are, run nothing")
    parser.add_argument("--out", type=Path, default=OUT, help="where the PNGs and numbers.json go")
    options = parser.parse_args(argv)
    if not options.skip_sweep:
        subprocess.run([sys.executable, "-m", "utils.benchmark", "queue", str(SWEEP), "--parallel",
                        str(options.parallel), "--threads", "1"], check=True)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    numbers = {**learning_curves_picture(options.runs, out / "learning_curves.png"),
               **rollouts_picture(options.runs, out / "rollouts.png")}
    for name, picture in (("otpr", "plan.png"), ("otpr_u", "plan_unsupervised.png")):
        folder = run_dir(options.runs, name, 1)
        otpr, args, parts = otpr_parts(folder / "checkpoint.pt")
        _, *normalizers = load_policy(otpr, load_checkpoint(folder / f"{name}.pt"), args)
        if name == "otpr":
            numbers.update(candidates_picture(otpr, args, parts, normalizers, out / "candidates.png"))
        numbers[f"plan_{name}"] = plan_picture(otpr, args, parts, normalizers, out / picture)["plan"]
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()

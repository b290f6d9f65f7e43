"""Run the methods side by side over seeds, on this machine or a Ray cluster, report their summaries as markdown
tables, and plot their curves.

    python -m utils.benchmark run [--scripts otpr.py idql_baseline.py ...] --seeds 1 2 [--parallel N] [--threads T] \
        -- --total-timesteps 100000
    python -m utils.benchmark run --preset NAME [--parallel N] [--threads T]     (NAME: a file of docs/sweeps/)
    python -m utils.benchmark queue sweep.txt [--parallel N] [--threads T]
    ... run or queue ... --launcher ray [--address auto] [--cpus-per-run C] [--gpus-per-run G] [--retries R]
    ... run or queue ... --track [--wandb-project-name P] [--wandb-entity E]
    python -m utils.benchmark report runs [more_roots ...] [--group-by exp_name]
    python -m utils.benchmark plot runs [more_roots ...] --out docs/kitchen_complete.png [--title TITLE]
    python -m utils.benchmark speed [--device cuda|cpu] [--num-envs N] [--script otpr.py] [-- more script flags]

A sweep is a list of runs, each named by its (env id, exp name, seed), the start of its folder
runs/<env id>__<exp name>__<seed>__<start time>. `run` makes one from scripts x seeds (a run's exp name is its
script's, unless the flags after -- give one) or takes a preset, the sweep file docs/sweeps/<NAME>.txt; `queue` takes
any sweep file (one `script --env-id E --exp-name X --seed N ...` line per run). Started again, a sweep skips its
finished runs (summary.json) and continues its interrupted ones (`--resume` from their checkpoint.pt): a sweep longer
than a session. Runs of one env id that fine-tune one seed's pre-trained policy wait for the first of them to have
made or loaded it (its log says "pre-trained policy"), so that every method fine-tunes the same file.

`--launcher local` (the default) starts up to --parallel runs at once as processes (run: all; queue: 1), with
--threads torch/OpenMP threads each (default 1: on a 2-core CPU more threads only contend; on a 16-core GPU machine
e.g. --parallel 8 --threads 2). Logs go to runs/benchmark_logs/<env id>__<exp name>__<seed>.log.
`--launcher ray` makes each run a Ray task on the cluster at --address (none: a local Ray instance) that requests
--cpus-per-run CPUs and --gpus-per-run GPUs; the results come back to this machine's runs/ whether the cluster shares
a file system or not, and a run whose worker dies is continued from its checkpoint (utils/ray_launcher.py).
`--track` runs every script with --track (Weights & Biases), tagged sweep:<name>, commit:<hash> and preset:<name>.

Ctrl-C during `run` or `queue` asks each running run once to stop at its next safe point, where it saves a checkpoint
(a run's own Ctrl-C handling, utils/runtime.py), and waits for them; a second Ctrl-C makes them stop at once.

`report` prints one row per run (every <root>/*/summary.json), then one row per (env id, exp name) aggregated over
its seeds, then each run's score at every evaluation. `plot` draws success rate and normalized score over env steps,
one line per exp name (mean over seeds, band from the min to the max over seeds).

`speed` measures, on this machine, the env-only SPS (random actions, the same vector env as training), the training
SPS of a short run of the script at its default sizes (evaluation excluded), their ratio, the seconds per iteration of
every phase with the OT phase split into its cost matrix and its potential fit, and pre-training steps per second.
"""
import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCRIPTS = ("otpr.py", "idql_baseline.py", "dql_baseline.py", "qsm_baseline.py", "dppo_baseline.py")  # run's default
PHASES = ("env", "sampling", "critic", "ot", "actor", "eval")  # the usual order; other phases follow in file order
PHASE_NAMES = {"ot": "OT"}
PRETRAINED_MARKER = "pre-trained policy"  # "saved the pre-trained policy to ..." / "loaded the pre-trained policy from ..."


# --------------------------------------------------------------------------------------------------------- sweeps
SWEEPS = Path(__file__).resolve().parents[1] / "docs" / "sweeps"  # --preset NAME is the sweep file SWEEPS/NAME.txt
DEFAULT_ENV_ID = "Kitchen-Complete-v0"  # every script's --env-id default


@dataclass
class SweepRun:
    """One run of a sweep: the script and its flags as a command line has them, and the (env id, exp name, seed) that
    name its folder runs/<env id>__<exp name>__<seed>__<start time>, by which a sweep started again finds it."""
    tokens: list[str]
    env_id: str
    exp_name: str
    seed: str

    @property
    def name(self) -> str:
        return f"{self.env_id}__{self.exp_name}__{self.seed}"


def flag_value(tokens: Sequence[str], flag: str, default: str | None = None) -> str | None:
    """The value that follows `flag` in a command line (its last occurrence wins, as in the scripts), or `default`."""
    positions = [i for i, token in enumerate(tokens) if token == flag and i + 1 < len(tokens)]
    return tokens[positions[-1] + 1] if positions else default


def runs_of_scripts(scripts: Sequence[str], seeds: Sequence[int], extra: Sequence[str]) -> list[SweepRun]:
    """`run --scripts ... --seeds ... -- extra`: every script for every seed, with the extra flags; a run's exp name is
    the script's own default (its file name) unless the flags give one."""
    return [SweepRun([script, "--seed", str(seed), *extra], flag_value(extra, "--env-id", DEFAULT_ENV_ID),
                     flag_value(extra, "--exp-name", Path(script).stem), str(seed))
            for seed in seeds for script in scripts]


def read_sweep(path: Path) -> list[SweepRun]:
    """The runs of a sweep file: one command line per run (`script --flag value ...`; blank lines and # comments
    skipped), each naming --env-id, --exp-name and --seed, no two the same."""
    runs = []
    for line in Path(path).read_text().splitlines():
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        missing = [flag for flag in ("--env-id", "--exp-name", "--seed") if flag_value(tokens, flag) is None]
        if missing:
            raise ValueError(f"sweep line {line.strip()!r} does not give {missing[0]}: every line names --env-id, "
                             "--exp-name and --seed, so that its run can be found and continued")
        runs.append(SweepRun(tokens, *(flag_value(tokens, flag) for flag in ("--env-id", "--exp-name", "--seed"))))
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: two lines name the same (env id, exp name, seed)")
    return runs


def presets() -> list[str]:
    """The names `--preset` accepts: the sweep files of docs/sweeps/."""
    return sorted(path.stem for path in SWEEPS.glob("*.txt"))


def preset_path(name: str) -> Path:
    """docs/sweeps/<name>.txt, or a ValueError listing the presets."""
    if name not in presets():
        raise ValueError(f"no preset {name!r}; the presets are the sweep files of docs/sweeps/: {', '.join(presets())}")
    return SWEEPS / f"{name}.txt"


def pretrained_seed(run: SweepRun) -> str:
    """The seed of the pre-trained policy a run fine-tunes: its own, or the one in the name of the file that
    --pretrained-checkpoint gives (runs/pretrained/<env id>__<data>__seed<N>__<config digest>.pt)."""
    match = re.search(r"__seed(\d+)__", flag_value(run.tokens, "--pretrained-checkpoint", ""))
    return match.group(1) if match else run.seed


def leaders(runs: Sequence[SweepRun]) -> list[int | None]:
    """For each run, the index of the run it waits for (None: it starts when a slot is free). Runs of one env id and
    pre-trained seed usually share a pre-trained file (the scripts name it by the pre-training's config): the first of
    them pre-trains it and the others start once it has saved or loaded one, or has ended, so that no two of them train
    the same file at once and every method fine-tunes the same policy."""
    first, waits_for = {}, []
    for index, run in enumerate(runs):
        key = (run.env_id, pretrained_seed(run))
        waits_for.append(first.get(key))
        first.setdefault(key, index)
    return waits_for


def unfinished(runs: Sequence[SweepRun], runs_root: Path) -> list[SweepRun]:
    """The runs of a sweep that have no finished folder (summary.json) under runs_root; a finished one is named and
    skipped, so that a sweep started again runs nothing twice (to rerun one: delete its folder, or change --exp-name)."""
    todo = []
    for run in runs:
        if any((folder / "summary.json").is_file() for folder in Path(runs_root).glob(f"{run.name}__*")):
            print(f"done before: {' '.join(run.tokens)}", flush=True)
        else:
            todo.append(run)
    return todo


def resumable_folder(name: str, runs_root: Path) -> Path | None:
    """The newest folder of the run `name` (<env id>__<exp name>__<seed>) that holds a checkpoint.pt, which `--resume`
    continues; None to start afresh."""
    folders = [f for f in sorted(Path(runs_root).glob(f"{name}__*")) if (f / "checkpoint.pt").is_file()]
    return folders[-1] if folders else None


def with_tracking(runs: Sequence[SweepRun], sweep: str, preset: str | None, project: str,
                  entity: str | None) -> list[SweepRun]:
    """--track passed through to every run, with W&B tags naming the sweep, the commit and the preset."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=SWEEPS, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    tags = [f"sweep:{sweep}"[:64], f"commit:{commit}", *([f"preset:{preset}"] if preset else [])]
    flags = ["--track", "--wandb-project-name", project, *(["--wandb-entity", entity] if entity else []),
             "--wandb-tags", *tags]
    return [dataclasses.replace(run, tokens=[*run.tokens, *flags]) for run in runs]


# ---------------------------------------------------------------------------------------------- local launcher
def job_environment(threads: int) -> dict:
    """The environment of a started run: `threads` OpenMP/MKL/torch threads, and unbuffered output, so that the logs
    are live (and the pre-trained marker shows as soon as it is printed)."""
    thread_vars = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    return {**os.environ, **{name: str(threads) for name in thread_vars}, "PYTHONUNBUFFERED": "1"}


def start_job(command: list[str], handle, env: dict) -> subprocess.Popen:
    """A run in a session of its own: Ctrl-C at the terminal reaches this tool alone, which passes it on once
    (stop_jobs), so that each run is asked to stop exactly once and saves its checkpoint."""
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_jobs(processes: Sequence[subprocess.Popen]) -> None:
    """Ctrl-C (or an error) here: asks every running run to stop at its next safe point, as Ctrl-C does (it saves a
    checkpoint that the same sweep resumes), and waits for them; a second Ctrl-C makes them stop at once."""
    alive = [process for process in processes if process.poll() is None]
    if alive:
        print(f"stopping {len(alive)} running run(s) at their next safe point, with a checkpoint (Ctrl-C again stops "
              "them at once)", file=sys.stderr, flush=True)
    for process in alive:
        process.send_signal(signal.SIGINT)
    try:
        for process in alive:
            process.wait()
    except KeyboardInterrupt:
        for process in alive:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in alive:
            process.wait()


def launch_local(runs: Sequence[SweepRun], parallel: int | None = None, threads: int = 1,
                 runs_root: Path = Path("runs"), logs: Path = Path("runs/benchmark_logs"), poll_s: float = 2.0) -> None:
    """Runs the sweep's unfinished runs as processes on this machine, at most `parallel` at a time (None: all), each
    with `threads` threads; an interrupted run (a folder with checkpoint.pt) continues with `--resume`; a run that
    shares its env id and seed with an earlier one waits for it (leaders). Logs: <logs>/<run name>.log, appended to.
    Raises SystemExit naming the failed runs, if any."""
    if parallel is not None and parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    env = job_environment(threads)
    runs = unfinished(runs, runs_root)
    jobs = []  # dicts: run, command, log, leader (a job or None), state, process, handle, start, marker
    for run, leader in zip(runs, leaders(runs)):
        folder = resumable_folder(run.name, runs_root)
        command = [sys.executable, run.tokens[0], *(["--resume", str(folder)] if folder else run.tokens[1:])]
        jobs.append({"run": run, "command": command, "log": logs / f"{run.name}.log", "state": "pending",
                     "leader": None if leader is None else jobs[leader], "process": None, "handle": None,
                     "start": None, "marker": False})
    limit = parallel or max(len(jobs), 1)

    def has_marker(job) -> bool:
        if not job["marker"] and job["log"].exists():
            job["marker"] = PRETRAINED_MARKER in job["log"].read_text(errors="ignore")
        return job["marker"]

    try:
        while any(job["state"] in ("pending", "running") for job in jobs):
            for job in jobs:
                if job["state"] == "running" and (code := job["process"].poll()) is not None:
                    job["handle"].close()
                    job["state"] = "done" if code == 0 else "failed"
                    print(f"[{time.strftime('%H:%M:%S')}] {'done' if code == 0 else f'FAILED (exit {code})'} after "
                          f"{(time.time() - job['start']) / 60:.1f} min: {' '.join(job['command'])}", flush=True)
            running = sum(job["state"] == "running" for job in jobs)
            for job in jobs:
                leader = job["leader"]
                ready = leader is None or leader["state"] in ("done", "failed") or has_marker(leader)
                if job["state"] == "pending" and ready and running < limit:
                    print(f"[{time.strftime('%H:%M:%S')}] start: {' '.join(job['command'])}  (log: {job['log']})",
                          flush=True)
                    job["handle"] = job["log"].open("a")
                    job["process"] = start_job(job["command"], job["handle"], env)
                    job["state"], job["start"] = "running", time.time()
                    running += 1
            if any(job["state"] in ("pending", "running") for job in jobs):
                time.sleep(poll_s)
    except BaseException:  # Ctrl-C or an error here: do not leave the jobs this call started running unattended
        stop_jobs([job["process"] for job in jobs if job["state"] == "running"])
        raise
    failed = [" ".join(job["command"]) for job in jobs if job["state"] == "failed"]
    if failed:
        raise SystemExit(f"failed: {failed} (see {logs})")


def launch(runs: Sequence[SweepRun], launcher: str = "local", parallel: int | None = None, threads: int = 1,
           runs_root: Path = Path("runs"), logs: Path = Path("runs/benchmark_logs"), poll_s: float = 2.0,
           **ray_options) -> None:
    """Runs a sweep through the chosen launcher: `local` (processes on this machine) or `ray` (tasks on a Ray cluster,
    utils/ray_launcher.py; needs requirements-sweeps.txt)."""
    if launcher == "local":
        return launch_local(runs, parallel, threads, runs_root, logs, poll_s)
    from utils.ray_launcher import launch_ray

    return launch_ray(runs, parallel=parallel, threads=threads, runs_root=runs_root, logs=logs, poll_s=poll_s,
                      **ray_options)


def run(scripts: Sequence[str], seeds: Sequence[int], extra: Sequence[str], parallel: int | None = None,
        threads: int = 1, logs: Path = Path("runs/benchmark_logs"), poll_s: float = 2.0, launcher: str = "local",
        runs_root: Path = Path("runs"), **ray_options) -> None:
    """Runs every script for every seed with the extra flags (runs_of_scripts); a seed's first script runs first and
    pre-trains the seed's shared policy, the others start once it is there. Raises SystemExit naming failed runs."""
    launch(runs_of_scripts(scripts, seeds, extra), launcher, parallel, threads, runs_root, logs, poll_s, **ray_options)


# -------------------------------------------------------------------------------------------------------- report
def load_summaries(roots: Path | Sequence[Path]) -> list[tuple[Path, dict]]:
    """(run folder, summary) of every <root>/*/summary.json (or <root>/summary.json), sorted by env, exp, seed."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    paths = {}
    for root in map(Path, roots):
        for path in [root / "summary.json", *root.glob("*/summary.json")]:
            if path.is_file():
                paths.setdefault(path.resolve(), path)
    runs = [(path.parent, json.loads(path.read_text())) for path in paths.values()]
    return sorted(runs, key=lambda r: (str(r[1].get("env_id", "")), str(r[1].get("exp_name", "")),
                                       _seed_key(r[1].get("seed")), str(r[0])))


def _seed_key(seed):
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def final_protocols(summary: dict) -> dict[str, dict]:
    """The final evaluation's extra protocols ({"single": {...}, "select": {...}}), or {} when it has none."""
    final = summary.get("final") or (summary.get("history") or [{}])[-1]
    protocols = final.get("protocols") or (summary.get("history") or [{}])[-1].get("protocols") or {}
    return {name: scores for name, scores in protocols.items() if isinstance(scores, dict)}


def _num(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _mean_std(values: Sequence[float], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{format(float(np.mean(values)), spec)} ± {format(float(np.std(values, ddof=0)), spec)}"


def group_runs(runs: list[tuple[Path, dict]], group_by: str) -> dict[tuple[str, str], list[dict]]:
    """The summaries of the runs, keyed by (env_id, summary[group_by]), in the order of `runs`. Runs of one key but of
    different budgets (iterations) are not pooled: each budget is a group of its own, its name followed by the budget."""
    key = lambda s: (str(s.get("env_id", "-")), str(s.get(group_by, "-")))
    budgets: dict[tuple[str, str], set] = {}
    for _, s in runs:
        budgets.setdefault(key(s), set()).add(s.get("iterations"))
    groups: dict[tuple[str, str], list[dict]] = {}
    for _, s in runs:
        env_id, name = key(s)
        if len(budgets[env_id, name]) > 1:
            name = f"{name} ({s.get('iterations')} iterations)"
        groups.setdefault((env_id, name), []).append(s)
    return groups


def aggregate(runs: list[tuple[Path, dict]], group_by: str = "exp_name") -> list[dict]:
    """One dict per (env_id, summary[group_by]) over its runs: the numbers of the aggregate table (std: ddof=0)."""
    rows = []
    for (env_id, name), members in group_runs(runs, group_by).items():
        score = lambda key: [m[key]["normalized_score"] for m in members if key in m]
        final = np.array(score("final"), dtype=float)
        protocols: dict[str, list[float]] = {}
        for m in members:
            for protocol, scores in final_protocols(m).items():
                protocols.setdefault(protocol, []).append(scores["normalized_score"])
        rows.append({
            "env_id": env_id, "group": name, "runs": len(members), "seeds": len({str(m.get("seed")) for m in members}),
            "pretrained": score("pretrained"), "final": final.tolist(), "best": score("best"),
            "final_success": [m["final"]["success_rate"] for m in members if "final" in m],
            "final_min": float(final.min()) if final.size else None,
            "final_max": float(final.max()) if final.size else None,
            "env_steps": [m["env_steps"] for m in members if "env_steps" in m],
            "wall_min": float(np.mean([m["wall_time_s"] / 60 for m in members if "wall_time_s" in m] or [np.nan])),
            "SPS": float(np.mean([m["SPS"] for m in members if "SPS" in m] or [np.nan])),
            "protocols": protocols,
        })
    return rows


def report(roots: Path | Sequence[Path], group_by: str = "exp_name") -> str:
    """Markdown: one row per run, one row per (env id, group) over seeds, then the score at each evaluation."""
    runs = load_summaries(roots)
    if not runs:
        return f"no summary.json under {roots}"
    several_envs = len({s.get("env_id") for _, s in runs}) > 1
    phases = [p for p in PHASES if any(p in s.get("time_per_iteration_s", {}) for _, s in runs)]
    for _, s in runs:
        phases += [p for p in s.get("time_per_iteration_s", {}) if p not in phases]
    protocols = sorted({p for _, s in runs for p in final_protocols(s)})

    header = ["run", *(["env"] if several_envs else []), "seed", "pre-trained score", "final score", "best score",
              "final success", "exploration score, all / last 50 episodes", "env steps", "wall (min)", "SPS",
              " / ".join(PHASE_NAMES.get(p, p) for p in phases) + " (s per iteration)",
              *(["final score per protocol (" + " / ".join(protocols) + ")"] if protocols else [])]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    curves, ot_rows, guidance_rows = [], [], []
    for run_dir, s in runs:
        t = s.get("time_per_iteration_s", {})
        split = " / ".join(_num(t.get(p), ".2f") for p in phases)
        logged = scalars(run_dir)
        train = logged.get("charts/train_normalized_score", [])
        exploration = f"{sum(train) / len(train):.1f} / {sum(train[-50:]) / len(train[-50:]):.1f}" if train else "-"
        cells = [s.get("exp_name", "-"), *([s.get("env_id", "-")] if several_envs else []), s.get("seed", "-"),
                 _num(s["pretrained"]["normalized_score"], ".1f"), _num(s["final"]["normalized_score"], ".1f"),
                 _num(s["best"]["normalized_score"], ".1f"), _num(s["final"]["success_rate"], ".2f"), exploration,
                 s.get("env_steps", "-"), _num(s["wall_time_s"] / 60 if "wall_time_s" in s else None, ".0f"),
                 _num(s.get("SPS"), ".0f"), split]
        if protocols:
            final = final_protocols(s)
            cells.append(" / ".join(_num(final[p]["normalized_score"], ".1f") if p in final else "-" for p in protocols))
        rows.append("| " + " | ".join(map(str, cells)) + " |")
        points = ", ".join(f"{evaluation_label(h)}: {h['normalized_score']:.1f}" for h in s.get("history", []))
        env_note = f" [{s.get('env_id')}]" if several_envs else ""
        curves.append(f"- {s.get('exp_name')}{env_note} seed {s.get('seed')} "
                      f"({s['final'].get('episodes', '?')} episodes per evaluation): {points}")
        for prefix, tags, table in (("ot", OT_TAGS, ot_rows), ("guidance", GUIDANCE_TAGS, guidance_rows)):
            means = {tag: sum(values) / len(values) for tag in tags if (values := logged.get(f"{prefix}/{tag}"))}
            if means:
                table.append(f"| {s.get('exp_name')} | {s.get('seed')} | "
                             + " | ".join(f"{means.get(k, float('nan')):.3f}" for k in tags) + " |")

    aggregate_header = [group_by, "env", "seeds", "pre-trained score", "final score", "best score", "final success",
                        "final score range (min-max)", "env steps", "mean wall (min)", "mean SPS",
                        *(["final score per protocol (" + " / ".join(protocols) + ")"] if protocols else [])]
    aggregate_rows = ["| " + " | ".join(aggregate_header) + " |", "|" + "---|" * len(aggregate_header)]
    for a in aggregate(runs, group_by):
        steps = sorted(set(a["env_steps"]))
        cells = [a["group"], a["env_id"], str(a["seeds"]) + (f" ({a['runs']} runs)" if a["runs"] != a["seeds"] else ""),
                 _mean_std(a["pretrained"], ".1f"), _mean_std(a["final"], ".1f"), _mean_std(a["best"], ".1f"),
                 _mean_std(a["final_success"], ".2f"), f"{_num(a['final_min'], '.1f')}-{_num(a['final_max'], '.1f')}",
                 "-" if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}",
                 _num(a["wall_min"], ".0f"), _num(a["SPS"], ".0f")]
        if protocols:
            cells.append(" / ".join(_mean_std(a["protocols"].get(p, []), ".1f") for p in protocols))
        aggregate_rows.append("| " + " | ".join(cells) + " |")

    lines = [*rows, "", f"Over seeds, per (env, {group_by}): mean ± std (population std, ddof=0) over its runs:",
             *aggregate_rows, "", "Normalized score at each evaluation (env steps: score):", *curves]
    by_steps = denoising_steps_table(runs, group_by)
    if by_steps:
        lines += ["", "Behaviour cloning evaluated at several denoising step counts (bridger_baseline.py): normalized "
                  "score, mean ± std over seeds:", *by_steps]
    if guidance_rows:
        lines += ["", "The guidance's lever (guidance/* in docs/otpr.md), mean over the run's iterations:",
                  "| run | seed | " + " | ".join(GUIDANCE_TAGS) + " |", "|" + "---|" * (len(GUIDANCE_TAGS) + 2),
                  *guidance_rows]
    if ot_rows:
        lines += ["", "OT fit, mean over the run's fits (held-out and candidate columns: evaluation iterations only):",
                  "| run | seed | " + " | ".join(OT_TAGS) + " |", "|" + "---|" * (len(OT_TAGS) + 2), *ot_rows]
    return "\n".join(lines)


def evaluation_label(entry: dict) -> str:
    """What an evaluation of a run's history is at: its denoising step count (bridger_baseline.py) or its env steps."""
    if "denoising_steps" in entry:
        return f"{entry['denoising_steps']} denoising steps"
    return str(entry.get("env_steps", "?"))


def denoising_steps_table(runs: list[tuple[Path, dict]], group_by: str = "exp_name") -> list[str]:
    """Markdown rows, one per (env id, group) whose runs evaluate at several denoising step counts, one column per
    step count (most first): the normalized score's mean ± std over the group's runs. [] when no run does."""
    groups = {key: members for key, members in group_runs(runs, group_by).items()
              if all("denoising_steps" in h for m in members for h in m.get("history", [])) and
              all(m.get("history") for m in members)}
    if not groups:
        return []
    counts = sorted({h["denoising_steps"] for members in groups.values() for m in members for h in m["history"]},
                    reverse=True)
    rows = [f"| {group_by} | env | seeds | " + " | ".join(f"{n} steps" for n in counts) + " |",
            "|" + "---|" * (3 + len(counts))]
    for (env_id, name), members in groups.items():
        scores = {n: [h["normalized_score"] for m in members for h in m["history"] if h["denoising_steps"] == n]
                  for n in counts}
        rows.append(f"| {name} | {env_id} | {len(members)} | " + " | ".join(_mean_std(scores[n], ".1f") for n in counts)
                    + " |")
    return rows


OT_TAGS = ("steps", "residual_s", "residual_a", "heldout_residual_s", "heldout_residual_a", "frac_zero_h", "q_scale",
           "g_scale", "cost_state_share", "candidate_h_q_correlation", "candidate_v_cost_correlation",
           "selection_q_gain")
GUIDANCE_TAGS = ("candidate_ess", "top_candidate_prob", "candidate_spread", "frac_states_all_zero", "batch_ess",
                 "keypoint_loss_share")


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar series of a run, read once; {} when the run has no (readable) event files."""
    if not any(Path(run_dir).glob("events.out.tfevents*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir))
        events.Reload()
        return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    except Exception as error:  # a truncated or foreign events file should not hide the other runs
        print(f"warning: could not read the TensorBoard events of {run_dir}: {error!r}", file=sys.stderr)
        return {}


# ---------------------------------------------------------------------------------------------------------- plot
def curves(runs: list[tuple[Path, dict]], group_by: str = "exp_name") -> dict[tuple[str, str], dict]:
    """Per (env_id, group): the evaluations every seed has, aligned by iteration (history index when absent).

    Returns {key: {"seeds": n, "env_steps": mean over seeds, <metric>: (mean, min, max) arrays}} for the metrics
    success_rate and normalized_score. Evaluations that not every seed reached are left out, so that each point is
    over the same seeds.
    """
    out = {}
    for key, members in group_runs(runs, group_by).items():
        by_iteration = [{h.get("iteration", i): h for i, h in enumerate(m.get("history", []))} for m in members]
        common = sorted(set.intersection(*(set(b) for b in by_iteration)))
        entry = {"seeds": len(members),
                 "env_steps": np.array([np.mean([b[i]["env_steps"] for b in by_iteration]) for i in common])}
        for metric in ("success_rate", "normalized_score"):
            values = np.array([[b[i][metric] for b in by_iteration] for i in common], dtype=float)
            values = values.reshape(len(common), len(members))
            entry[metric] = (values.mean(axis=1), values.min(axis=1), values.max(axis=1))
        out[key] = entry
    return out


def plot(roots: Path | Sequence[Path], out: Path, title: str | None = None, group_by: str = "exp_name",
         size_in: tuple[float, float] = (11.0, 4.2), dpi: int = 100):
    """Writes a PNG with two panels (success rate, normalized score) over env steps; returns the Figure.

    One line per (env id, group): the mean over seeds, with a band from the min to the max over seeds. The image is
    size_in * dpi pixels. Rendered with the Agg canvas directly, so it needs no display and leaves pyplot alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = load_summaries(roots)
    if not runs:
        raise SystemExit(f"no summary.json under {roots}")
    data = curves(runs, group_by)
    several_envs = len({env for env, _ in data}) > 1
    fig = Figure(figsize=size_in, dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("success_rate", "success rate", (-0.02, 1.02)), ("normalized_score", "normalized score", (-2, 102)))
    for ax, (metric, label, ylim) in zip(axes, panels):
        for color, ((env_id, name), d) in enumerate(sorted(data.items())):
            mean, low, high = d[metric]
            line_label = f"{name}{f' ({env_id})' if several_envs else ''}, {d['seeds']} seed{'s' * (d['seeds'] != 1)}"
            ax.plot(d["env_steps"], mean, marker="o", markersize=3, color=f"C{color}", label=line_label)
            ax.fill_between(d["env_steps"], low, high, color=f"C{color}", alpha=0.2, linewidth=0)
        ax.set_xlabel("env steps")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[1].legend(title="line: mean over seeds; band: min-max", fontsize=8, title_fontsize=8, loc="best")
    envs = sorted({env for env, _ in data})
    fig.suptitle(title or f"{', '.join(envs)}: evaluation over fine-tuning ({len(runs)} runs)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # no bbox_inches="tight": the PNG keeps the figure's size
    return fig


# --------------------------------------------------------------------------------------------------------- speed
def env_only_sps(env_id: str, num_envs: int, chunk_size: int, seconds: float) -> float:
    """Env steps per second of the training loop's vector env under uniformly random action chunks."""
    import gymnasium as gym

    from utils.envs import make_env

    env_fns = [make_env(env_id, 0, i, chunk_size) for i in range(num_envs)]
    vector_cls = gym.vector.AsyncVectorEnv if num_envs > 1 else gym.vector.SyncVectorEnv
    envs = vector_cls(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    envs.action_space.seed(0)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, info = envs.step(envs.action_space.sample())
        chunk_steps = info["chunk_steps"].copy()  # counted as the training loop counts them
        done = terminated | truncated
        if done.any():
            chunk_steps[done] = info["final_info"]["chunk_steps"][done]
        steps += int(chunk_steps.sum())
    elapsed = time.perf_counter() - start
    envs.close()
    return steps / elapsed


def ot_cost_seconds(module, args, obs_dim: int, action_dim: int, device: str, repeats: int = 5) -> float:
    """Seconds to build one iteration's OT cost matrix (all ot_batch_size^2 pairs through the target critics) with the
    run's sizes, timed alone on random data: the rest of the run's OT phase is the potential fit."""
    import torch

    qf = module.TwinQ(obs_dim, action_dim, args.critic_hidden).to(device)
    keypoints = torch.randn(args.num_keypoints, obs_dim, device=device), torch.randn(args.num_keypoints, action_dim, device=device)
    cost = module.TransportCost(*keypoints, args).to(device)
    states = torch.randn(args.ot_batch_size, obs_dim, device=device)
    actions = torch.rand(args.ot_batch_size, action_dim, device=device) * 2 - 1
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cost(qf, states, actions, all_pairs=True, rescale=True)  # warm-up
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        cost(qf, states, actions, all_pairs=True, rescale=True)
    synchronize()
    return (time.perf_counter() - start) / repeats


def script_args(module, flags: Sequence[str]):
    """The Args that the script parses from these flags, its env id's TASK_DEFAULTS included."""
    argv, sys.argv = sys.argv, [module.__name__, *flags]
    try:
        return module.parse_args()
    finally:
        sys.argv = argv


def speed(script: str = "otpr.py", device: str = "cpu", num_envs: int = 2, iterations: int = 4, env_seconds: float = 20.0,
          pretrain_steps: int = 500, extra: Sequence[str] = ()) -> dict:
    """One measurement of where the time goes; returns the numbers it prints (see the module docstring)."""
    import torch

    module = importlib.import_module(Path(script).stem)
    args = script_args(module, extra)
    steps_per_iteration = num_envs * args.num_steps * args.chunk_size
    command = [sys.executable, str(Path(script).resolve()), "--exp-name", "speed", "--num-envs", str(num_envs),
               "--total-timesteps", str(iterations * steps_per_iteration), "--critic-warmup-iterations", "0",
               "--eval-episodes", str(num_envs), "--eval-frequency", str(10**9), "--pretrain-steps", str(pretrain_steps),
               "--pretrain-checkpoint-frequency", str(10**9), "--checkpoint-frequency", "1",
               *(["--no-cuda"] if device == "cpu" else []), *extra]
    # Removed however this ends: Ctrl-C stops the run (it shares the process group), and SIGTERM unwinds as Ctrl-C does
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="speed_") as workdir:
        print(f"speed: {script} on {device}, {pretrain_steps} pre-training steps, then {iterations} iterations of "
              f"{steps_per_iteration} env steps (in {workdir}; its progress below)", file=sys.stderr, flush=True)
        subprocess.run(command, cwd=workdir, check=True, stdout=subprocess.DEVNULL)  # the script's progress: stderr
        ((run_dir, summary),) = load_summaries(Path(workdir) / "runs")
        (pretrained,) = (Path(workdir) / "runs" / "pretrained").glob("*.pt")
        meta = torch.load(pretrained, weights_only=False)["meta"]
        run_args = module.Args(**torch.load(run_dir / "checkpoint.pt", weights_only=False)["args"])
    signal.signal(signal.SIGTERM, previous_handler)
    phases = dict(summary["time_per_iteration_s"])
    train_seconds = summary["wall_time_s"] - phases.pop("eval") * summary["iterations"]
    if phases.get("ot", 0) > 0:  # the OT phase, in its place, split in two
        cost = ot_cost_seconds(module, run_args, meta["obs_dim"], meta["action_dim"], device)
        split = {"OT cost matrix": cost, "OT fit": max(0.0, phases["ot"] - cost)}
        phases = {k: v for key, value in phases.items() for k, v in (split.items() if key == "ot" else [(key, value)])}
    phases.pop("ot", None)
    print(f"speed: {env_seconds:.0f} s of env-only stepping", file=sys.stderr, flush=True)
    result = {"script": script, "device": device, "num_envs": num_envs, "iterations": summary["iterations"],
              "env_only_sps": env_only_sps(summary["env_id"], num_envs, run_args.chunk_size, env_seconds),
              "training_sps": summary["env_steps"] / train_seconds, "seconds_per_iteration": phases,
              "pretrain_steps_per_s": pretrain_steps / meta["seconds"]}
    result["ratio"] = result["training_sps"] / result["env_only_sps"]
    return result


def speed_table(result: dict) -> str:
    phases = result["seconds_per_iteration"]
    return "\n".join([
        "| script | device | envs | env-only SPS | training SPS | ratio | " + " | ".join(phases) + " (s per iteration) | pre-training steps/s |",
        "|" + "---|" * (7 + len(phases)),
        f"| {result['script']} | {result['device']} | {result['num_envs']} | {result['env_only_sps']:.0f} | "
        f"{result['training_sps']:.0f} | {result['ratio']:.2f} | " + " | ".join(f"{v:.2f}" for v in phases.values())
        + f" | {result['pretrain_steps_per_s']:.0f} |",
    ])


# ----------------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sweep_options = argparse.ArgumentParser(add_help=False)  # how any sweep runs: `run` and `queue`
    sweep_options.add_argument("--threads", type=int, default=1, help="OpenMP/MKL/torch threads per run (default: 1)")
    sweep_options.add_argument("--launcher", choices=["local", "ray"], default="local",
                               help="local: processes on this machine; ray: tasks on a Ray cluster "
                                    "(utils/ray_launcher.py)")
    sweep_options.add_argument("--address", default=None,
                               help="with --launcher ray: the cluster (auto: the one this machine belongs to; default: "
                                    "a local Ray instance)")
    sweep_options.add_argument("--cpus-per-run", type=float, default=1, help="with --launcher ray: CPUs a run requests")
    sweep_options.add_argument("--gpus-per-run", type=float, default=0,
                               help="with --launcher ray: GPUs a run requests (0.25: four runs share a GPU)")
    sweep_options.add_argument("--retries", type=int, default=2,
                               help="with --launcher ray: times a run whose worker died is continued from its "
                                    "checkpoint")
    sweep_options.add_argument("--track", action="store_true",
                               help="every run logs to Weights & Biases, tagged with the sweep, the commit and the "
                                    "preset")
    sweep_options.add_argument("--wandb-project-name", default="otpr", help="with --track: the W&B project")
    sweep_options.add_argument("--wandb-entity", default=None, help="with --track: the W&B team or user")
    sweep_options.add_argument("--logs", type=Path, default=Path("runs/benchmark_logs"), help=argparse.SUPPRESS)
    sweep_options.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    run_parser = commands.add_parser("run", parents=[sweep_options],
                                     help="run scripts x seeds (arguments after -- go to every script), or a preset")
    run_parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), help="scripts to run (default: the five)")
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[1], help="each script runs once per seed")
    run_parser.add_argument("--preset", default=None,
                            help=f"a named sweep instead of scripts x seeds: {', '.join(presets())} (docs/sweeps/)")
    run_parser.add_argument("--parallel", type=int, default=None, help="at most this many runs at once (default: all)")
    run_parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every script")
    queue_parser = commands.add_parser("queue", parents=[sweep_options],
                                       help="run a sweep file of command lines; started again, skips finished runs "
                                            "and resumes interrupted ones")
    queue_parser.add_argument("file", type=Path)
    queue_parser.add_argument("--parallel", type=int, default=None,
                              help="at most this many runs at once (default: 1 locally; with ray, what the cluster "
                                   "fits)")
    report_parser = commands.add_parser("report", help="markdown tables of every summary.json under the folders")
    report_parser.add_argument("roots", type=Path, nargs="*", default=[Path("runs")])
    report_parser.add_argument("--group-by", default="exp_name", help="summary.json key to aggregate seeds by")
    plot_parser = commands.add_parser("plot", help="PNG of success rate and normalized score over env steps")
    plot_parser.add_argument("roots", type=Path, nargs="*", default=[Path("runs")])
    plot_parser.add_argument("--out", type=Path, required=True)
    plot_parser.add_argument("--title", default=None)
    plot_parser.add_argument("--group-by", default="exp_name", help="summary.json key that names a line")
    speed_parser = commands.add_parser("speed", help="env-only and training SPS, time per phase, pre-training speed")
    speed_parser.add_argument("--script", default="otpr.py")
    speed_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    speed_parser.add_argument("--num-envs", type=int, default=2)
    speed_parser.add_argument("--iterations", type=int, default=4, help="training iterations timed (default: 4)")
    speed_parser.add_argument("--env-seconds", type=float, default=20.0, help="seconds of env-only stepping")
    speed_parser.add_argument("--pretrain-steps", type=int, default=500, help="pre-training steps timed")
    speed_parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the script")
    parsed = parser.parse_args(argv)
    if parsed.command in ("run", "queue"):
        try:
            extra = [a for a in getattr(parsed, "extra", []) if a != "--"]
            if parsed.command == "queue" or parsed.preset:
                if extra:
                    raise ValueError(f"flags after -- go with --scripts, not with a sweep file or preset: {extra}")
                path = parsed.file if parsed.command == "queue" else preset_path(parsed.preset)
                runs, sweep = read_sweep(path), Path(path).stem
            else:
                runs, sweep = runs_of_scripts(parsed.scripts, parsed.seeds, extra), "run"
            if parsed.track:
                runs = with_tracking(runs, sweep, getattr(parsed, "preset", None), parsed.wandb_project_name,
                                     parsed.wandb_entity)
            ray_options = {}
            if parsed.command == "queue" and parsed.launcher == "local":
                parsed.parallel = parsed.parallel or 1
            if parsed.launcher == "ray":
                importlib.import_module("utils.ray_launcher")  # without Ray: one line here, not a traceback later
                ray_options = {"address": parsed.address, "cpus_per_run": parsed.cpus_per_run,
                               "gpus_per_run": parsed.gpus_per_run, "retries": parsed.retries}
            for name in ("parallel", "threads"):
                if (getattr(parsed, name) or 1) < 1:
                    raise ValueError(f"--{name} must be at least 1, got {getattr(parsed, name)}")
        except (ValueError, FileNotFoundError, ImportError) as error:  # a sweep it cannot run: one line, exit code 2
            parser.exit(2, f"error: {error}\n" if not isinstance(error, ImportError) else
                        f"error: --launcher ray needs Ray: pip install -r requirements-sweeps.txt -c constraints.txt "
                        f"({error})\n")
        try:
            launch(runs, parsed.launcher, parsed.parallel, parsed.threads, logs=parsed.logs, poll_s=parsed.poll,
                   **ray_options)
        except ValueError as error:  # resources the cluster does not have: one line, exit code 2
            parser.exit(2, f"error: {error}\n")
    elif parsed.command == "report":
        print(report(parsed.roots, parsed.group_by))
    elif parsed.command == "speed":
        result = speed(parsed.script, parsed.device, parsed.num_envs, parsed.iterations, parsed.env_seconds,
                       parsed.pretrain_steps, [a for a in parsed.extra if a != "--"])
        print(json.dumps(result, indent=2))
        print(speed_table(result))
    else:
        plot(parsed.roots, parsed.out, parsed.title, parsed.group_by)
        print(f"wrote {parsed.out}")


if __name__ == "__main__":
    main()

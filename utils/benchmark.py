"""Run the methods side by side over seeds, and report their summaries as a markdown table.

    python -m utils.benchmark run --scripts otpr.py idql_baseline.py --seeds 1 2 -- --total-timesteps 100000
    python -m utils.benchmark report runs/

`run` starts every (script, seed) job at once with one torch thread each (two cores: more threads only contend), and
starts a seed's other scripts only after the first script has written that seed's shared pre-trained checkpoint, so
that every method fine-tunes the same file. Logs go to runs/benchmark_logs/.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(scripts: list[str], seeds: list[int], extra: list[str]) -> None:
    logs = Path("runs/benchmark_logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs, waiting = [], []
    for seed in seeds:
        for position, script in enumerate(scripts):
            command = [sys.executable, script, "--seed", str(seed), *extra]
            log = logs / f"{Path(script).stem}__seed{seed}.log"
            if position == 0:
                print(" ".join(command), flush=True)
                jobs.append(subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env))
                first_log = log
            else:
                waiting.append((first_log, command, log))
    while waiting:  # start the others once the first script of their seed has pre-trained (or loaded) the policy
        for item in list(waiting):
            first_log, command, log = item
            if "pre-trained policy" in first_log.read_text(errors="ignore"):
                print(" ".join(command), flush=True)
                jobs.append(subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env))
                waiting.remove(item)
        time.sleep(5)
    failed = [job.args for job in jobs if job.wait() != 0]
    if failed:
        raise SystemExit(f"failed: {failed} (see {logs})")


def report(root: Path) -> str:
    """One row per run, then the score at each evaluation, from every runs/*/summary.json below `root`."""
    rows = ["| run | seed | pre-trained score | final score | best score | final success | exploration score, all / last 50"
            " episodes | env steps | wall (min) | SPS | env / sampling / critic / OT / actor / eval (s per iteration) |",
            "|" + "---|" * 11]
    curves, ot_rows = [], []
    for path in sorted(root.glob("*/summary.json")):
        s = json.loads(path.read_text())
        t = s["time_per_iteration_s"]
        split = " / ".join(f"{t[k]:.2f}" for k in ("env", "sampling", "critic", "ot", "actor", "eval"))
        logged = scalars(path.parent)
        train = logged.get("charts/train_normalized_score", [])
        exploration = f"{sum(train) / len(train):.1f} / {sum(train[-50:]) / len(train[-50:]):.1f}" if train else "-"
        rows.append(f"| {s['exp_name']} | {s['seed']} | {s['pretrained']['normalized_score']:.1f} | "
                    f"{s['final']['normalized_score']:.1f} | {s['best']['normalized_score']:.1f} | "
                    f"{s['final']['success_rate']:.2f} | {exploration} | {s['env_steps']} | "
                    f"{s['wall_time_s'] / 60:.0f} | {s['SPS']:.0f} | {split} |")
        points = ", ".join(f"{h['env_steps']}: {h['normalized_score']:.1f}" for h in s["history"])
        curves.append(f"- {s['exp_name']} seed {s['seed']} ({s['final']['episodes']} episodes per evaluation): {points}")
        ot_stats = {tag: sum(values) / len(values) for tag in OT_TAGS if (values := logged.get(f"ot/{tag}"))}
        if ot_stats:
            ot_rows.append(f"| {s['exp_name']} | {s['seed']} | " + " | ".join(f"{ot_stats.get(k, float('nan')):.3f}" for k in OT_TAGS) + " |")
    lines = rows + ["", "Normalized score at each evaluation (env steps: score):", *curves]
    if ot_rows:
        lines += ["", "OT fit, mean over the run's fits (held-out columns: evaluation iterations only):",
                  "| run | seed | " + " | ".join(OT_TAGS) + " |", "|" + "---|" * (len(OT_TAGS) + 2), *ot_rows]
    return "\n".join(lines)


OT_TAGS = ("steps", "residual_s", "residual_a", "heldout_residual_s", "heldout_residual_a", "frac_zero_h",
           "frac_states_all_zero_h", "keypoint_match_rate")


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every TensorBoard scalar series of a run, read once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run scripts x seeds; arguments after -- go to every script")
    run_parser.add_argument("--scripts", nargs="+", default=["otpr.py", "idql_baseline.py"])
    run_parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    run_parser.add_argument("extra", nargs=argparse.REMAINDER)
    report_parser = commands.add_parser("report", help="markdown table of every summary.json under a folder")
    report_parser.add_argument("root", type=Path, nargs="?", default=Path("runs"))
    parsed = parser.parse_args()
    if parsed.command == "run":
        run(parsed.scripts, parsed.seeds, [a for a in parsed.extra if a != "--"])
    else:
        print(report(parsed.root))

import json

import numpy as np
import pytest

from utils.benchmark import aggregate, load_summaries, main, plot, report, run


def scores(score, success, episodes=10):
    return {"normalized_score": score, "success_rate": success, "episodes": episodes, "episodic_return": score / 25}


def write_summary(folder, exp_name="otpr", seed=2, pretrained=25.0, final=50.0, best=75.0, final_success=0.1,
                  env_steps=5600, wall_time_s=600.0, sps=9.3, history=None, env_id="Kitchen-Complete-v0", **extra):
    summary = {
        "env_id": env_id, "exp_name": exp_name, "seed": seed, "pretrained_checkpoint": "runs/pretrained/x.pt",
        "pretrained": scores(pretrained, 0.0), "final": scores(final, final_success),
        "best": scores(best, 0.2), "env_steps": env_steps, "iterations": 10, "wall_time_s": wall_time_s, "SPS": sps,
        "history": history or [{"env_steps": 0, **scores(pretrained, 0.0)}, {"env_steps": env_steps, **scores(final, final_success)}],
        "time_per_iteration_s": {"env": 1.0, "sampling": 2.0, "critic": 3.0, "ot": 4.0, "actor": 5.0, "eval": 6.0},
        **extra,
    }
    if "protocols" in summary["history"][-1]:
        summary["final"] = summary["history"][-1]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def test_report_has_a_row_and_a_curve_per_run(tmp_path):
    write_summary(tmp_path / "run_a")  # no TensorBoard events in the folder: the exploration column says "-"
    table = report(tmp_path)
    assert "| otpr | 2 | 25.0 | 50.0 | 75.0 | 0.10 | - | 5600 | 10 | 9 | 1.00 / 2.00 / 3.00 / 4.00 / 5.00 / 6.00 |" in table
    assert "- otpr seed 2 (10 episodes per evaluation): 0: 25.0, 5600: 50.0" in table
    assert "protocol" not in table


def test_report_shows_each_runs_guidance_lever_and_ot_diagnostics_as_means(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    write_summary(tmp_path / "run_a")
    writer = SummaryWriter(str(tmp_path / "run_a"))
    for step, (ess, gain) in enumerate([(8.0, 0.0), (6.0, 0.5)]):
        writer.add_scalar("guidance/candidate_ess", ess, step)
        writer.add_scalar("ot/selection_q_gain", gain, step)
    writer.close()
    write_summary(tmp_path / "run_b", exp_name="idql", seed=3)  # no events: no row in either table
    table = report(tmp_path)
    guidance = table[table.index("The guidance's lever"):]
    assert "| otpr | 2 | 7.000 | nan |" in guidance and "| idql |" not in guidance
    ot_table = table[table.index("OT fit"):]
    assert ot_table.splitlines()[1].split(" | ")[-1] == "selection_q_gain |"
    assert ot_table.splitlines()[3].endswith("| 0.250 |")


def test_aggregate_row_is_mean_std_and_range_over_three_seeds(tmp_path):
    finals, pretrained, best, success = [10.0, 40.0, 70.0], [0.0, 5.0, 10.0], [20.0, 50.0, 80.0], [0.0, 0.25, 0.5]
    for seed in range(3):
        write_summary(tmp_path / f"otpr_{seed}", seed=seed, pretrained=pretrained[seed], final=finals[seed],
                      best=best[seed], final_success=success[seed], wall_time_s=60.0 * (seed + 1), sps=10.0 * (seed + 1))
    write_summary(tmp_path / "idql_1", exp_name="idql", seed=1, final=5.0, env_steps=5000)
    (row,) = [a for a in aggregate(load_summaries(tmp_path)) if a["group"] == "otpr"]
    assert row["seeds"] == 3 and row["final_min"] == 10.0 and row["final_max"] == 70.0
    assert np.mean(row["final"]) == pytest.approx(40.0) and np.std(row["final"]) == pytest.approx(np.sqrt(600.0))
    assert row["wall_min"] == pytest.approx(2.0) and row["SPS"] == pytest.approx(20.0)
    table = report(tmp_path)
    header = ("| exp_name | env | seeds | pre-trained score | final score | best score | final success |"
              " final score range (min-max) | env steps | mean wall (min) | mean SPS |")
    assert header in table and "ddof=0" in table
    # std (ddof=0): finals 10/40/70 -> sqrt(600) = 24.49; pre-trained 0/5/10 -> 4.08; success 0/.25/.5 -> 0.204
    assert ("| otpr | Kitchen-Complete-v0 | 3 | 5.0 ± 4.1 | 40.0 ± 24.5 | 50.0 ± 24.5 | 0.25 ± 0.20 | 10.0-70.0 |"
            " 5600 | 2 | 20 |") in table
    assert "| idql | Kitchen-Complete-v0 | 1 | 25.0 ± 0.0 | 5.0 ± 0.0 | 75.0 ± 0.0 | 0.10 ± 0.00 | 5.0-5.0 | 5000 | 10 | 9 |" in table


def test_runs_of_different_budgets_are_not_pooled(tmp_path):
    write_summary(tmp_path / "short_1", seed=1, final=40.0)
    write_summary(tmp_path / "short_2", seed=2, final=60.0)
    write_summary(tmp_path / "long_1", seed=1, final=90.0, iterations=20)
    rows = {row["group"]: row for row in aggregate(load_summaries(tmp_path))}
    assert set(rows) == {"otpr (10 iterations)", "otpr (20 iterations)"}
    assert rows["otpr (10 iterations)"]["final"] == [40.0, 60.0] and rows["otpr (20 iterations)"]["final"] == [90.0]


def test_report_reads_several_roots_and_groups_by_another_key(tmp_path):
    write_summary(tmp_path / "a" / "run_1", seed=1, final=20.0, variant="x")
    write_summary(tmp_path / "b" / "run_2", seed=2, final=40.0, variant="x")
    table = report([tmp_path / "a", tmp_path / "b"], group_by="variant")
    assert "| variant | env | seeds |" in table
    assert "| x | Kitchen-Complete-v0 | 2 | 25.0 ± 0.0 | 30.0 ± 10.0 |" in table
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) is None


def test_protocols_column_appears_when_the_history_has_protocols(tmp_path):
    for seed, (single, select) in enumerate([(10.0, 30.0), (20.0, 50.0)]):
        history = [{"iteration": 0, "env_steps": 0, **scores(0.0, 0.0)},
                   {"iteration": 10, "env_steps": 5600, **scores(25.0, 0.0),
                    "protocols": {"single": scores(single, 0.0), "select": scores(select, 0.0)}}]
        write_summary(tmp_path / f"run_{seed}", seed=seed, history=history)
    table = report(tmp_path)
    assert "final score per protocol (select / single)" in table
    assert "| 30.0 / 10.0 |" in table and "| 50.0 / 20.0 |" in table  # per run
    assert "| 40.0 ± 10.0 / 15.0 ± 5.0 |" in table  # aggregate


def test_report_tables_scores_by_denoising_steps_over_seeds(tmp_path):
    """bridger_baseline.py's runs evaluate one policy at several step counts: a row per group, a column per count."""
    for seed, scores_by_steps in ((1, {10: 40.0, 2: 10.0}), (2, {10: 60.0, 2: 30.0})):
        history = [{"denoising_steps": n, "env_steps": 0, **scores(value, 0.0)} for n, value in scores_by_steps.items()]
        write_summary(tmp_path / f"b{seed}", exp_name="bridger_cvae", seed=seed, history=history)
    write_summary(tmp_path / "other", exp_name="idql", seed=1)  # no step counts: not in the table
    text = report(tmp_path)
    assert "| bridger_cvae | Kitchen-Complete-v0 | 2 | 50.0 ± 10.0 | 20.0 ± 10.0 |" in text
    table = text.split("Behaviour cloning evaluated at several denoising step counts")[1]
    assert "| exp_name | env | seeds | 10 steps | 2 steps |" in table and "idql" not in table
    assert "- bridger_cvae seed 1 (10 episodes per evaluation): 10 denoising steps: 40.0, 2 denoising steps: 10.0" in text


def test_plot_writes_a_png_of_the_figure_size_with_two_panels(tmp_path):
    for seed, (steps, values) in enumerate([((0, 5600, 11200), (0.0, 25.0, 50.0)), ((0, 5640, 11300), (0.0, 50.0, 100.0))]):
        history = [{"iteration": i * 10, "env_steps": s, **scores(v, v / 100)} for i, (s, v) in enumerate(zip(steps, values))]
        write_summary(tmp_path / "runs" / f"otpr_{seed}", seed=seed, history=history)
    write_summary(tmp_path / "runs" / "idql_1", exp_name="idql", seed=1)
    out = tmp_path / "docs" / "curves.png"
    fig = plot(tmp_path / "runs", out, title="test", size_in=(8.0, 3.0), dpi=50)
    from matplotlib.image import imread

    image = imread(out)
    assert out.stat().st_size > 0 and image.shape[:2] == (150, 400)
    assert [ax.get_ylabel() for ax in fig.axes] == ["success rate", "normalized score"]
    assert all(ax.get_xlabel() == "env steps" for ax in fig.axes)
    left, right = image[:, :200, :3], image[:, 200:, :3]
    assert (left < 0.5).any() and (right < 0.5).any()  # both halves have drawn axes, not a blank canvas
    otpr_line = [line for line in fig.axes[1].get_lines() if line.get_label().startswith("otpr")][0]
    np.testing.assert_allclose(otpr_line.get_xdata(), [0, 5620, 11250])  # aligned by iteration, mean env steps
    np.testing.assert_allclose(otpr_line.get_ydata(), [0.0, 37.5, 75.0])
    assert "min-max" in fig.axes[1].get_legend().get_title().get_text()


FAKE_SCRIPT = """import os, sys, time
name, seed = os.path.basename(__file__), sys.argv[sys.argv.index("--seed") + 1]
record = lambda event: open({record!r}, "a").write(f"{{name}} {{seed}} {{event}} {{time.time()}}\\n")
record("start")
time.sleep(0.1)
record("marker")  # before the print, so the marker time precedes any start it unblocks
print("loaded the pre-trained policy from x", os.environ["OMP_NUM_THREADS"], sys.argv[1:])
time.sleep(0.1)
record("end")
"""


def fake_scripts(tmp_path):
    record = tmp_path / "events.txt"
    for name in ("first.py", "second.py"):
        (tmp_path / name).write_text(FAKE_SCRIPT.format(record=str(record)))
    return [str(tmp_path / "first.py"), str(tmp_path / "second.py")], record


def read_events(record):
    events = {}
    for line in record.read_text().splitlines():
        name, seed, event, stamp = line.split()
        events.setdefault((name, int(seed)), {})[event] = float(stamp)
    return events


def test_run_with_parallel_one_runs_every_job_one_at_a_time(tmp_path):
    scripts, record = fake_scripts(tmp_path)
    run(scripts, [1, 2], ["--flag", "3"], parallel=1, threads=2, logs=tmp_path / "logs", poll_s=0.01)
    events = read_events(record)
    assert set(events) == {(name, seed) for name in ("first.py", "second.py") for seed in (1, 2)}
    intervals = sorted((e["start"], e["end"]) for e in events.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:]))
    log = (tmp_path / "logs" / "Kitchen-Complete-v0__second__2.log").read_text()  # <env id>__<exp name>__<seed>
    assert "pre-trained policy from x 2 ['--seed', '2', '--flag', '3']" in log


def test_run_starts_a_seeds_other_scripts_after_the_pretrained_marker(tmp_path):
    scripts, record = fake_scripts(tmp_path)
    main(["run", "--scripts", *scripts, "--seeds", "1", "2", "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    events = read_events(record)
    for seed in (1, 2):
        assert events[("second.py", seed)]["start"] >= events[("first.py", seed)]["marker"]
    # no --parallel: both seeds' first scripts ran at the same time
    assert events[("first.py", 2)]["start"] < events[("first.py", 1)]["end"]


def test_run_reports_a_failed_first_script_and_then_starts_its_seeds_other_scripts(tmp_path):
    """Without the seed's pre-trained file the others pre-train it themselves or fail on their own: each failure is
    named once, and no run waits forever."""
    (tmp_path / "broken.py").write_text("raise SystemExit(3)\n")
    scripts, record = fake_scripts(tmp_path)
    with pytest.raises(SystemExit, match=r"failed: \[.*broken.py --seed 1.*\]") as failure:
        run([str(tmp_path / "broken.py"), scripts[1]], [1], [], logs=tmp_path / "logs", poll_s=0.01)
    assert "second.py" not in str(failure.value)
    assert set(read_events(record)) == {("second.py", 1)}


def test_speed_measures_env_only_and_training_sps_and_splits_the_ot_phase(capsys):
    """A tiny real run of otpr.py (one env, two iterations, small networks): the numbers are consistent."""
    tiny = ["--critic-hidden", "32", "32", "--actor-hidden", "64", "64", "64", "--actor-batch-size", "32",
            "--critic-batch-size", "32", "--ot-batch-size", "32", "--num-keypoints", "16", "--ot-hidden", "32", "32",
            "--replay-ratio", "0.1", "--num-steps", "10"]  # 2 iterations = 2 x 1 env x 10 decisions x 4 actions
    main(["speed", "--num-envs", "1", "--iterations", "2", "--env-seconds", "2", "--pretrain-steps", "30", "--", *tiny])
    output = capsys.readouterr().out
    result = json.loads(output[: output.index("\n|")])
    assert result["iterations"] == 2 and result["num_envs"] == 1  # sized from the given --num-steps
    assert list(result["seconds_per_iteration"]) == ["env", "sampling", "critic", "OT cost matrix", "OT fit", "actor"]
    assert all(value >= 0 for value in result["seconds_per_iteration"].values())
    assert result["env_only_sps"] > 0 and result["pretrain_steps_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["training_sps"] / result["env_only_sps"])
    # training does what env-only stepping does and more: it cannot be faster
    assert result["training_sps"] < result["env_only_sps"]
    assert "| otpr.py | cpu | 1 |" in output


def test_speed_sizes_its_iterations_as_the_script_parses_its_flags():
    import otpr
    from utils.benchmark import script_args

    assert script_args(otpr, []).num_steps == otpr.Args().num_steps
    assert script_args(otpr, ["--env-id", "Robomimic-Can-v0"]).num_steps == 75  # the task's defaults
    assert script_args(otpr, ["--env-id", "Robomimic-Can-v0", "--num-steps", "7", "--chunk-size", "2"]).num_steps == 7


QUEUED_SCRIPT = """import os, sys, time
from pathlib import Path
args = sys.argv[1:]
open({record!r}, "a").write(" ".join(args) + "\\n")
if "--fail" in args:
    raise SystemExit(3)
if "--resume" not in args:
    folder = Path("runs") / f"{{args[args.index('--env-id') + 1]}}__{{args[args.index('--exp-name') + 1]}}__{{args[args.index('--seed') + 1]}}__{{time.time_ns()}}"
    folder.mkdir(parents=True)
else:
    folder = Path(args[args.index("--resume") + 1])
(folder / "summary.json").write_text("{{}}")
"""


def test_queue_skips_finished_runs_resumes_interrupted_ones_and_starts_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "commands.txt"
    (tmp_path / "fake.py").write_text(QUEUED_SCRIPT.format(record=str(record)))
    finished = tmp_path / "runs" / "Env-v0__done__1__100"
    interrupted = tmp_path / "runs" / "Env-v0__cut__1__100"
    for folder in (finished, interrupted):
        folder.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    (interrupted / "checkpoint.pt").write_bytes(b"")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# a comment\n"
                     "fake.py --env-id Env-v0 --exp-name done --seed 1\n"
                     "fake.py --env-id Env-v0 --exp-name cut --seed 1 --flag 2\n\n"
                     "fake.py --env-id Env-v0 --exp-name new --seed 1\n"
                     "fake.py --env-id Env-v0 --exp-name new --seed 2\n")
    main(["queue", str(sweep), "--parallel", "2", "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    commands = sorted(record.read_text().splitlines())
    assert commands == sorted(["--resume runs/Env-v0__cut__1__100", "--env-id Env-v0 --exp-name new --seed 1",
                               "--env-id Env-v0 --exp-name new --seed 2"])
    # started again, the whole sweep is finished: nothing runs
    main(["queue", str(sweep), "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    assert len(record.read_text().splitlines()) == 3


def test_queue_reports_failed_lines_and_refuses_lines_it_could_not_find_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "commands.txt"
    (tmp_path / "fake.py").write_text(QUEUED_SCRIPT.format(record=str(record)))
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("fake.py --env-id Env-v0 --exp-name bad --seed 1 --fail\n"
                     "fake.py --env-id Env-v0 --exp-name good --seed 1\n")
    with pytest.raises(SystemExit, match="failed: .*--exp-name bad"):
        main(["queue", str(sweep), "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    assert len(list((tmp_path / "runs").glob("Env-v0__good__1__*/summary.json"))) == 1
    sweep.write_text("fake.py --env-id Env-v0 --seed 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["queue", str(sweep)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: sweep line 'fake.py --env-id Env-v0 --seed 1' does not give --exp-name")


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm"])
def test_speed_shows_its_progress_and_removes_its_folder_when_stopped(tmp_path, how):
    """Ctrl-C reaches the measured run too (one process group); SIGTERM reaches the benchmark alone. Either way the
    temporary run folder is gone and what it printed says what it was doing."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = [sys.executable, "-m", "utils.benchmark", "speed", "--num-envs", "1", "--pretrain-steps", "100000",
               "--", "--actor-hidden", "64", "64", "64", "--num-steps", "10"]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], text=True, start_new_session=True,
                               env={**os.environ, "TMPDIR": str(temporary), "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(1200):  # until the measured run writes its pre-training progress
        if list(temporary.glob("speed_*/runs/*/events.*")):
            break
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.1)
    time.sleep(2)
    if how == "ctrl_c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.terminate()
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "speed: otpr.py on cpu, 100000 pre-training steps, then 4 iterations of 40 env steps" in output
    assert "pre-training" in output  # the script's own progress
    assert not list(temporary.glob("speed_*"))  # (torch may leave its own cache there)


STOPPABLE_SCRIPT = """import signal, sys, time
from pathlib import Path
signals = []
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
Path({ready!r} + sys.argv[-1]).write_text("")
while not signals:
    time.sleep(0.01)
time.sleep(0.5)  # a second SIGINT within this would be the run's "stop at once"
Path({record!r} + sys.argv[-1]).write_text(str(len(signals)))
raise SystemExit(130)
"""


@pytest.mark.parametrize("command", ["queue", "run"])
def test_ctrl_c_asks_each_running_run_once_to_stop_and_waits_for_it(tmp_path, command):
    """The runs are in sessions of their own: the terminal's Ctrl-C reaches the tool, which passes one SIGINT to each
    run (a run stops at its next safe point on the first, at once on the second) and waits for them to save."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "stoppable.py").write_text(STOPPABLE_SCRIPT.format(ready=str(tmp_path / "ready_"),
                                                                   record=str(tmp_path / "signals_")))
    (tmp_path / "sweep.txt").write_text("stoppable.py --env-id Env-v0 --exp-name a --seed 1\n"
                                        "stoppable.py --env-id Env-v0 --exp-name b --seed 2\n")
    arguments = (["queue", "sweep.txt", "--parallel", "2"] if command == "queue"
                 else ["run", "--scripts", "stoppable.py", "--seeds", "1", "2", "--parallel", "2"])
    tool = subprocess.Popen([sys.executable, "-m", "utils.benchmark", *arguments, "--poll", "0.05"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                            start_new_session=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            # Ctrl-C as a terminal delivers it, even when the suite itself runs where SIGINT is ignored
                            # (the background of a non-interactive shell): an ignored signal stays ignored across exec
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(600):
        if len(list(tmp_path.glob("ready_*"))) == 2:
            break
        time.sleep(0.05)
    os.killpg(tool.pid, signal.SIGINT)  # the terminal's Ctrl-C: the tool's group only
    output = tool.communicate(timeout=60)[0]
    assert "stopping 2 running run(s) at their next safe point" in output
    assert sorted(path.read_text() for path in tmp_path.glob("signals_*")) == ["1", "1"], output


# ----------------------------------------------------------------------------------------------------------------
# Presets (docs/sweeps/*.txt), leaders, --track, launcher errors
# ----------------------------------------------------------------------------------------------------------------
RECORDING_SCRIPT = """import sys
open({record!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
"""


def test_every_preset_line_is_a_command_its_script_accepts(monkeypatch):
    """Each line of each sweep file parses with its script's own flags and TASK_DEFAULTS and passes its checks (a
    budget of whole iterations, positive sizes), so that a preset never fails hours into a sweep on a typo."""
    import importlib
    import sys

    from utils.benchmark import SWEEPS, presets, read_sweep

    assert {"smoke", "paper_state", "kitchen_otpr_idql", "kitchen_five_methods", "can_five_methods", "square_five_methods",
            "bridger_two_goals", "two_goals", "actor_objective"} <= set(presets())
    checked = 0
    for name in presets():
        for sweep_run in read_sweep(SWEEPS / f"{name}.txt"):
            module = importlib.import_module(sweep_run.tokens[0].removesuffix(".py"))
            monkeypatch.setattr(sys, "argv", sweep_run.tokens)
            args = module.parse_args()
            module.check_args(args)
            assert (args.env_id, args.exp_name, str(args.seed)) == (sweep_run.env_id, sweep_run.exp_name, sweep_run.seed)
            checked += 1
    assert checked > 300


def test_a_presets_pretrained_checkpoint_is_the_file_its_seed_1_lines_make(monkeypatch):
    import sys

    import otpr
    from utils.benchmark import SWEEPS, flag_value, read_sweep
    from utils.datasets import load_dataset

    runs = read_sweep(SWEEPS / "kitchen_five_methods.txt")
    named = {flag_value(r.tokens, "--pretrained-checkpoint") for r in runs} - {None}
    (seed_1_otpr,) = [r for r in runs if r.seed == "1" and r.tokens[0] == "otpr.py"]
    monkeypatch.setattr(sys, "argv", seed_1_otpr.tokens)
    args = otpr.parse_args()
    made = otpr.pretrained_checkpoint_path(args, load_dataset(args.env_id, args.dataset_source, args.dataset_path))
    assert named == {str(made)}


def test_runs_of_one_env_and_pretrained_seed_wait_for_the_first_of_them():
    from utils.benchmark import SWEEPS, leaders, read_sweep

    runs = read_sweep(SWEEPS / "kitchen_five_methods.txt")
    waits_for = leaders(runs)
    assert waits_for[0] is None and set(waits_for[1:]) == {0}  # seed 2 fine-tunes seed 1's file: it waits too
    runs = read_sweep(SWEEPS / "can_five_methods.txt")
    firsts = {run.seed: index for index, run in reversed(list(enumerate(runs)))}
    assert leaders(runs) == [None if firsts[run.seed] == index else firsts[run.seed] for index, run in enumerate(runs)]


def test_run_preset_runs_the_named_sweep_file_and_passes_tracking_with_its_tags(tmp_path, monkeypatch, capsys):
    import subprocess

    import utils.benchmark as benchmark

    monkeypatch.chdir(tmp_path)
    record = tmp_path / "argv.txt"
    (tmp_path / "fake.py").write_text(RECORDING_SCRIPT.format(record=str(record)))
    presets_dir = tmp_path / "sweeps"
    presets_dir.mkdir()
    (presets_dir / "tiny.txt").write_text("# a comment\nfake.py --env-id Env-v0 --exp-name a --seed 1\n"
                                          "fake.py --env-id Env-v0 --exp-name b --seed 2 --x 1\n")
    monkeypatch.setattr(benchmark, "SWEEPS", presets_dir)
    main(["run", "--preset", "tiny", "--parallel", "2", "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    assert sorted(record.read_text().splitlines()) == ["--env-id Env-v0 --exp-name a --seed 1",
                                                       "--env-id Env-v0 --exp-name b --seed 2 --x 1"]
    record.unlink()
    main(["run", "--preset", "tiny", "--track", "--wandb-project-name", "proj", "--wandb-entity", "team",
          "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=benchmark.SWEEPS).stdout.strip() or "unknown"
    for line in record.read_text().splitlines():
        assert line.endswith(f"--track --wandb-project-name proj --wandb-entity team --wandb-tags sweep:tiny "
                             f"commit:{commit} preset:tiny"), line
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no preset 'nope'; the presets are the sweep files of docs/sweeps/: tiny\n"


def test_queue_with_track_tags_runs_with_the_sweep_files_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "argv.txt"
    (tmp_path / "fake.py").write_text(RECORDING_SCRIPT.format(record=str(record)))
    (tmp_path / "mine.txt").write_text("fake.py --env-id Env-v0 --exp-name a --seed 1\n")
    main(["queue", "mine.txt", "--track", "--logs", str(tmp_path / "logs"), "--poll", "0.01"])
    (line,) = record.read_text().splitlines()
    assert " --track --wandb-project-name otpr --wandb-tags sweep:mine commit:" in line and "preset:" not in line


def test_the_ray_launcher_without_ray_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    (tmp_path / "sweep.txt").write_text("fake.py --env-id Env-v0 --exp-name a --seed 1\n")
    result = subprocess.run([sys.executable, "-m", "utils.benchmark", "queue", "sweep.txt", "--launcher", "ray"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --launcher ray needs Ray: pip install -r requirements-sweeps.txt")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("Env-v0__*"))

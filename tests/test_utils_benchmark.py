import json

from utils.benchmark import report


def test_report_has_a_row_and_a_curve_per_run(tmp_path):
    scores = lambda score, success: {"normalized_score": score, "success_rate": success, "episodes": 10,
                                     "episodic_return": score / 25}
    summary = {
        "exp_name": "otpr", "seed": 2, "pretrained": scores(25.0, 0.0), "final": scores(50.0, 0.1),
        "best": scores(75.0, 0.2), "env_steps": 5600, "wall_time_s": 600.0, "SPS": 9.3,
        "history": [{"env_steps": 0, **scores(25.0, 0.0)}, {"env_steps": 5600, **scores(50.0, 0.1)}],
        "time_per_iteration_s": {"env": 1.0, "sampling": 2.0, "critic": 3.0, "ot": 4.0, "actor": 5.0, "eval": 6.0},
    }
    (tmp_path / "run_a").mkdir()
    (tmp_path / "run_a" / "summary.json").write_text(json.dumps(summary))
    table = report(tmp_path)
    assert "| otpr | 2 | 25.0 | 50.0 | 75.0 | 0.10 | - | 5600 | 10 | 9 | 1.00 / 2.00 / 3.00 / 4.00 / 5.00 / 6.00 |" in table
    assert "- otpr seed 2 (10 episodes per evaluation): 0: 25.0, 5600: 50.0" in table

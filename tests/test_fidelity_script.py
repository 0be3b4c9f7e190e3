"""scripts/fidelity.py: its rows file, its report against the teacher and its argument checks (the
distills and evals it runs are the CLI's, tested elsewhere)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from swd.train.checkpoints import STATE_FILE

from conftest import ROOT

spec = importlib.util.spec_from_file_location("fidelity", ROOT / "scripts" / "fidelity.py")
fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity)


def test_rows_are_read_again_before_each_append(tmp_path):
    out = tmp_path / "rows.json"
    fidelity.append_row(out, {"name": "a"})
    out.write_text(json.dumps(json.loads(out.read_text()) + [{"name": "from another runner"}]))
    fidelity.append_row(out, {"name": "b"})
    assert [r["name"] for r in json.loads(out.read_text())] == ["a", "from another runner", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # no temporary file left behind


def test_reference_images_and_eval_overrides_are_exclusive(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fidelity.py"), "--out", str(tmp_path / "r.json"),
                           "--reference-images", "500", "--eval-override", "eval.reference=data/x", "--setting", "s"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "give one" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_report_judges_each_row_against_the_teacher_and_keeps_the_first_copy(tmp_path):
    teacher = tmp_path / "eval.json"
    teacher.write_text(json.dumps({"fid": 80.0, "recall": 0.10, "class_accuracy": 0.90, "steps": 28, "unrelated": 1}))
    row = {"name": "s", "steps": 300, "num_samples": 1000}
    (tmp_path / "a.json").write_text(json.dumps([{**row, "fid": 100.0, "recall": 0.08, "class_accuracy": 0.87}]))
    (tmp_path / "b.json").write_text(json.dumps([{**row, "fid": 1.0, "recall": 1.0, "class_accuracy": 1.0},
                                                 {**row, "name": "t", "fid": 101.0, "recall": 0.2, "class_accuracy": 0.95}]))
    out = fidelity.report([tmp_path / "a.json", tmp_path / "b.json"], teacher, "cmd")
    assert "unrelated" not in out["teacher"] and out["teacher"]["command"] == "cmd"
    s, t = out["rows"]
    assert (s["fid_vs_teacher"], s["recall_vs_teacher"], s["class_accuracy_vs_teacher_points"]) == (1.25, 0.8, -3.0)
    assert s["meets_targets"] is True  # every target met exactly at its bound
    assert t["fid_vs_teacher"] == 1.262 and t["meets_targets"] is False


def test_figure_draws_settings_and_learning_curves(tmp_path):
    row = {"fid": 100.0, "recall": 0.05, "class_accuracy": 0.85}
    rows = [{"name": "a", "steps": 300, **row}, {"name": "b", "steps": 300, **row, "recall": None},
            {"name": "a", "steps": 600, **row, "fid": 90.0}]
    teacher = {"fid": 75.0, "recall": 0.1, "class_accuracy": 0.9}
    path = fidelity.figure(rows, teacher, tmp_path / "f.png")
    assert path.stat().st_size > 10_000


def test_report_judges_text_rows_on_subcategory_accuracy(tmp_path):
    teacher = tmp_path / "eval.json"
    teacher.write_text(json.dumps({"fid": 140.0, "recall": 0.06, "class_accuracy": None, "subcategory_accuracy": 0.32}))
    (tmp_path / "a.json").write_text(json.dumps([{"name": "s", "steps": 200, "num_samples": 2000, "fid": 160.0, "recall": 0.012,
                                                  "class_accuracy": None, "subcategory_accuracy": 0.28}]))
    out = fidelity.report([tmp_path / "a.json"], teacher, "cmd")
    row = out["rows"][0]
    assert row["subcategory_accuracy_vs_teacher_points"] == -4.0 and row["recall_vs_teacher"] == 0.2
    assert "subcategory_accuracy_points_min" in out["targets"] and row["meets_targets"] is False


def test_report_extends_an_earlier_report_with_new_rows(tmp_path):
    """An earlier results file is both a row source and the teacher's reference (with its command)."""
    teacher = tmp_path / "eval.json"
    teacher.write_text(json.dumps({"fid": 80.0, "recall": 0.10, "class_accuracy": 0.90}))
    row = {"steps": 300, "num_samples": 1000, "recall": 0.08, "class_accuracy": 0.87}
    (tmp_path / "a.json").write_text(json.dumps([{**row, "name": "old", "fid": 100.0}]))
    earlier = tmp_path / "fidelity.json"
    earlier.write_text(json.dumps(fidelity.report([tmp_path / "a.json"], teacher, "teacher cmd")))
    (tmp_path / "b.json").write_text(json.dumps([{**row, "name": "new", "fid": 96.0}, {**row, "name": "old", "fid": 1.0}]))
    out = fidelity.report([earlier, tmp_path / "b.json"], earlier, "")
    assert out["teacher"]["command"] == "teacher cmd" and out["teacher"]["fid"] == 80.0
    assert [(r["name"], r["fid"], r["fid_vs_teacher"]) for r in out["rows"]] == [("old", 100.0, 1.25), ("new", 96.0, 1.2)]


def test_a_budget_already_trained_and_measured_is_not_run_again(tmp_path):
    """A study stopped between a budget's eval and its row: rerun, it takes the row from what is on disk."""
    import argparse

    run_dir = tmp_path / "runs" / "s"
    for step in (300, 400):  # complete checkpoints, as swd distill writes them
        (run_dir / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step}" / STATE_FILE).write_text(json.dumps({"step": step}))
    (run_dir / "checkpoints" / "latest").write_text("step_300\n")
    (run_dir / "student").mkdir()
    (run_dir / "student" / "student.json").write_text(json.dumps({"step": 300}))
    (run_dir / "eval_300").mkdir()
    (run_dir / "eval_300" / "eval.json").write_text(json.dumps({"fid": 90.0, "recall": 0.1, "num_samples": 1000}))
    args = argparse.Namespace(runs=tmp_path / "runs", swd="false", config="c.yaml", eval_override=[], reference_images=1000,
                              num_samples=1000)  # `false` as swd: any command run would stop the study
    row = fidelity.measure_setting("s", [], 300, args)
    assert (row["fid"], row["recall"], row["steps"]) == (90.0, 0.1, 300)
    with pytest.raises(SystemExit, match="failed"):  # another sample count: the eval runs again
        fidelity.measure_setting("s", [], 300, argparse.Namespace(**{**vars(args), "num_samples": 2000}))
    (run_dir / "student" / "student.json").write_text(json.dumps({"step": 200}))  # stopped before exporting 300
    with pytest.raises(SystemExit, match="failed"):  # the distillation runs again (it resumes and exports)
        fidelity.measure_setting("s", [], 300, args)
    with pytest.raises(SystemExit, match="already past 300"):
        (run_dir / "checkpoints" / "latest").write_text("step_400\n")
        fidelity.measure_setting("s", [], 300, args)


def test_report_keeps_the_commands_of_the_reports_it_extends(tmp_path):
    teacher = tmp_path / "eval.json"
    teacher.write_text(json.dumps({"fid": 80.0, "recall": 0.10, "class_accuracy": 0.90}))
    (tmp_path / "a.json").write_text(json.dumps([{"name": "a", "steps": 300, "num_samples": 1000, "fid": 90.0, "recall": 0.1,
                                                  "class_accuracy": 0.9}]))
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    script = [sys.executable, str(ROOT / "scripts" / "fidelity.py")]
    subprocess.run([*script, "--out", str(first), "--report", str(tmp_path / "a.json"), "--teacher", str(teacher)], check=True)
    subprocess.run([*script, "--out", str(second), "--report", str(first), "--teacher", str(first)], check=True)
    done = json.loads(second.read_text())
    assert done["earlier_commands"] == [json.loads(first.read_text())["command"]] and len(done["rows"]) == 1


def test_settings_run_with_several_seeds_are_judged_on_their_means(tmp_path):
    teacher = tmp_path / "eval.json"
    teacher.write_text(json.dumps({"fid": 80.0, "recall": 0.10, "class_accuracy": 0.90}))
    base = {"steps": 450, "num_samples": 1000, "class_accuracy": 0.88}
    rows = [{**base, "name": "g", "overrides": ["x=1"], "fid": 90.0, "recall": 0.09},            # seed 0: meets the targets
            {**base, "name": "g-seed1", "overrides": ["x=1", "seed=1"], "fid": 100.0, "recall": 0.06},
            {**base, "name": "g-seed2", "overrides": ["x=1", "seed=2"], "fid": 110.0, "recall": 0.06},
            {**base, "name": "h", "overrides": [], "fid": 95.0, "recall": 0.05}]               # one seed: no group
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = fidelity.report([tmp_path / "rows.json"], teacher, "cmd")
    assert out["rows"][0]["meets_targets"] is True
    (group,) = out["seed_means"]
    assert (group["setting"], group["steps"], group["seeds"]) == ("g", 450, [0, 1, 2])
    assert (group["fid_mean"], group["fid_min"], group["fid_max"]) == (100.0, 90.0, 110.0)
    assert group["recall_mean"] == 0.07 and group["recall_vs_teacher"] == 0.7
    assert group["fid_vs_teacher"] == 1.25 and group["meets_targets"] is False  # FID at its bound, recall short
    path = fidelity.figure(out["rows"], out["teacher"], tmp_path / "f.png")
    assert path.stat().st_size > 10_000

"""The report shell scripts: syntax, argument checks, and the skip-when-measured rule that lets
scripts/reproduce.sh resume (a fake `swd` that fails stands for any real eval, so a skipped eval is
one the script did not call)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
EVAL_KEYS = ("name", "steps", "fid", "class_accuracy", "precision", "recall", "seconds_per_image", "nfe", "guidance", "device")


def run(script, *args, cwd):
    env = {**os.environ, "SWD": "false", "PY": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def fake_eval(path, num_samples, name):
    path.mkdir(parents=True, exist_ok=True)
    (path / "eval.json").write_text(json.dumps({k: 1.0 for k in EVAL_KEYS} | {"name": name, "num_samples": num_samples}))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_teacher_report_rejects_an_unknown_part(tmp_path):
    out = run("teacher_report.sh", "10", "students", cwd=tmp_path)
    assert out.returncode == 2 and "PART must be scalewise, teacher, json or all" in out.stderr


def test_teacher_report_skips_what_is_measured_and_reruns_a_different_sample_count(tmp_path):
    fake_eval(tmp_path / "runs/report/teacher", 10, "teacher-28")
    fake_eval(tmp_path / "runs/report/scalewise", 10, "scalewise-4-undistilled")
    (tmp_path / "results").mkdir()
    assert run("teacher_report.sh", "10", "all", cwd=tmp_path).returncode == 0  # `swd` never called
    rows = json.loads((tmp_path / "results/teacher.json").read_text())
    assert [r["name"] for r in rows] == ["teacher-28", "scalewise-4-undistilled"]
    assert rows[0]["command"] == "bash scripts/teacher_report.sh 10"
    assert run("teacher_report.sh", "20", "teacher", cwd=tmp_path).returncode != 0  # 10 samples are not 20: eval runs


def test_reproduce_stops_when_a_distillation_fails(tmp_path):
    out = run("reproduce.sh", "10", cwd=tmp_path)
    assert out.returncode != 0 and "distillations done" not in out.stdout
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "results").exists()

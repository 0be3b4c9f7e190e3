"""scripts/schedule_study.py: the rows it reads and the target it judges (its timing and pictures run on
the study's own students)."""

import importlib.util
import json

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("schedule_study", ROOT / "scripts" / "schedule_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def entry(fid, tokens, recall=0.04, seconds=0.01):
    return {"fid": fid, "token_ratio": tokens, "recall": recall, "sample_seconds_per_image": seconds}


@pytest.mark.parametrize("fid, tokens, meets", [
    (104.0, 0.540, True),    # within 1.05x at fewer tokens
    (110.0, 0.540, False),   # more than 1.05x the hand-set's FID
    (100.0, 0.600, False),   # better FID, but more tokens than the hand-set
    (105.0, 0.551, True),    # exactly the hand-set's tokens, within 1.05x
])
def test_the_target_needs_both_fid_and_tokens(fid, tokens, meets):
    out = study.compare({"hand_set": entry(100.0, 0.551), "recommended": entry(fid, tokens, recall=0.02, seconds=0.005)})
    row = out["recommended"]
    assert row["meets_target"] is meets
    assert row["fid_vs_hand_set"] == round(fid / 100.0, 3) and row["recall_vs_hand_set"] == 0.5
    assert row["sample_seconds_vs_hand_set"] == 0.5 and "hand_set" not in out


def test_rows_are_picked_at_the_budget_first_file_first(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([{"name": "x", "steps": 300, "fid": 1.0}, {"name": "x", "steps": 600, "fid": 2.0}]))
    b.write_text(json.dumps([{"name": "x", "steps": 300, "fid": 3.0}, {"name": "y", "steps": 300, "fid": 4.0}]))
    rows = study.load_rows([a, b], 300)
    assert {n: r["fid"] for n, r in rows.items()} == {"x": 1.0, "y": 4.0}


def test_the_figure_draws_the_schedule_command_rows_from_the_results_files(tmp_path):
    schedule = json.loads((ROOT / "results" / "schedule.json").read_text())
    rows = study.schedule_figure_rows(schedule)
    assert [r["label"] for r in rows] == ["swd schedule: 16-16-24-32", "swd schedule, grid sigmas: 16-16-26-32"]
    assert rows[0]["fid"] == schedule["fashion_mnist"]["recommended"]["fid"]
    assert {r["question"] for r in rows} == {study.SCHEDULE_QUESTION}
    ablations = json.loads((ROOT / "results" / "ablations.json").read_text())
    path = study.figure(ablations["rows"] + rows, ablations["teacher"], tmp_path / "ablations.png")
    assert path.stat().st_size > 10_000


def test_redraw_needs_no_rows_and_a_study_run_names_the_missing_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ablations.png"
    monkeypatch.setattr("sys.argv", ["schedule_study.py", "--redraw", "--figure", str(out),
                                     "--ablations-out", str(ROOT / "results" / "ablations.json"),
                                     "--schedule-out", str(ROOT / "results" / "schedule.json")])
    study.main()
    assert out.stat().st_size > 10_000
    monkeypatch.setattr("sys.argv", ["schedule_study.py"])
    with pytest.raises(SystemExit):
        study.main()
    assert "--rows is required" in capsys.readouterr().err

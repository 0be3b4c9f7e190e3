"""scripts/peer_bench.py: the real command against the authors' src/ on a tiny model, and its error
for a folder without their files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "peer_bench.py"
# SWD_AUTHORS_SRC, else ../shared/peer/swd-authors beside the repository, else the workplace's copy
# (a clone made elsewhere, e.g. under /tmp, has no ../shared)
CANDIDATES = [Path(p) for p in (os.environ.get("SWD_AUTHORS_SRC"), ROOT / ".." / "shared" / "peer" / "swd-authors",
                                "/work/shared/peer/swd-authors") if p]
AUTHORS = next((c for c in CANDIDATES if (c / "src" / "losses.py").is_file()), CANDIDATES[0])
TINY = ["--layers", "2", "--heads", "2", "--head-dim", "16", "--latent", "16", "--batch-size", "2", "--rounds", "1",
        "--warmup", "0", "--critic-updates", "1", "--memory-layers", "2", "--memory-heads", "2", "--memory-head-dim", "32",
        "--memory-latent", "16", "--device", "cpu", "--threads", "1"]


def peer_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_peer_bench_writes_the_ratios_of_swd_against_the_authors_losses(tmp_path):
    if not (AUTHORS / "src" / "losses.py").is_file():
        pytest.fail(f"the authors' code is missing: expected {AUTHORS.resolve()}/src/losses.py (../shared/peer/swd-authors "
                    "beside the repository root, holding their src/; or set SWD_AUTHORS_SRC)")
    out = tmp_path / "peer_bench.json"
    proc = peer_bench("--authors-src", str(AUTHORS), "--out", str(out), *TINY)
    assert proc.returncode == 0, f"peer_bench.py failed:\n{proc.stdout}\n{proc.stderr}"
    r = json.loads(out.read_text())
    for key in ("ratio_scalewise", "ratio_fullres", "ratio_mmd", "memory_ratio", "memory_ratio_folded"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    variants = {"scalewise-full", "scalewise-mmd", "fullres-full", "fullres-mmd"}
    assert set(r["raw"]["seconds_per_round"]) == {f"{side}/{v}" for side in ("swd", "authors") for v in variants}
    assert all(len(t) == 1 and t[0] > 0 for t in r["raw"]["seconds_per_round"].values())
    assert r["batch_size"] == 2 and r["device"] == "cpu" and r["model"]["layers"] == 2 and r["model"]["input"] == [4, 16, 16]
    assert r["memory_model"]["width"] == 64 and "RSS" in r["peak_memory_kind"]
    assert "--authors-src" in r["command"] and r["critic_updates"] == 1
    # the authors hold a second copy of the base for their fake model; swd one base
    assert r["params_held"]["authors/scalewise-full"] > r["params_held"]["swd/scalewise-full"]
    assert "swd / authors" in proc.stdout
    # the tiny models are narrow at rank 16: "auto" folds them, and the folded run holds one copy more
    assert r["fold_adapters"] == {"setting": "auto", "timing_model_folds": True, "memory_model_folds": True}
    assert r["peak_memory_mb"].keys() == {"swd", "swd-folded", "authors"}


def test_peer_bench_says_in_one_line_what_a_bad_authors_folder_lacks(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "losses.py").write_text("")
    proc = peer_bench("--authors-src", str(tmp_path), "--out", str(tmp_path / "out.json"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]  # the last line, whatever a library may have warned before it
    assert message.startswith("peer_bench.py: --authors-src"), proc.stderr
    assert "src/flow_matching_sampler.py" in message and "src/losses.py" not in message and str(tmp_path) in message
    assert not (tmp_path / "out.json").exists()

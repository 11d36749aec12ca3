"""Resume through the command line as the README writes it: kill -9, rerun the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

STEPS = 120
# the smoke experiment with a longer run and a light export/bench, so three runs stay quick
ARGS = ["+experiment=smoke", f"train.steps={STEPS}", "train.ckpt_every=10", "train.progress=false",
        "export.bundle=false", "variants=[teacher_torch_fp32,student_torch_fp32]"]


def _env(tmp_path):
    return {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _cmd(*extra):
    return [sys.executable, "-m", "distill", *ARGS, "threads=1", *extra]


def _runs(work: Path) -> list[Path]:
    root = work / "outputs" / "smoke"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def _latest_step(work: Path) -> int:
    best = 0
    for run in _runs(work):
        f = run / "checkpoints" / "latest.json"
        try:
            best = max(best, json.loads(f.read_text())["step"])
        except (OSError, ValueError):
            pass
    return best


def _run_to_end(work, tmp_path, *extra):
    r = subprocess.run(_cmd(*extra), cwd=work, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:07d}" / "student.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command_and_reaches_the_same_weights(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # 1. start, and kill -9 once a checkpoint past step 10 exists and before the run ends
    p = subprocess.Popen(_cmd(), cwd=work, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _latest_step(work) < 20 and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before it could be killed: " + p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = _latest_step(work)
    assert 20 <= killed_at < STEPS
    assert len(_runs(work)) == 1
    first = _runs(work)[0]
    assert not (first / "report.json").exists()

    # 2. the same command continues that run (no second folder) from its last checkpoint
    r = _run_to_end(work, tmp_path)
    assert f"resuming the unfinished run {first}" in r.stdout
    assert _runs(work) == [first]
    report = json.loads((first / "report.json").read_text())
    assert report["training"]["resumed_from_step"] >= killed_at - 10 and report["training"]["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice

    # 3. after a finished run the same command starts a new run, which trains from step 0 to the same weights
    _run_to_end(work, tmp_path)
    runs = _runs(work)
    assert len(runs) == 2
    second = next(r for r in runs if r != first)
    fresh = json.loads((second / "report.json").read_text())
    assert fresh["training"]["resumed_from_step"] is None and fresh["training"]["steps"] == STEPS
    a, b = _final_weights(first), _final_weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


@pytest.mark.slow
def test_resume_with_a_different_config_names_the_keys_exit_2(tmp_path):
    run_dir = tmp_path / "pinned"
    base = [f"hydra.run.dir={run_dir}", "train.steps=20", "train.ckpt_every=5"]
    r = subprocess.run(_cmd(*base, "train.stop_after_steps=5"), cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest.json").exists()
    r = subprocess.run(_cmd(*base, "train.optimizer.lr=0.01", "student.builder.vision.layers=1"), cwd=tmp_path,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume")
    assert "student.builder.vision.layers" in lines[0] and "train.optimizer.lr" in lines[0]
    assert "train.resume=never" in lines[0]


@pytest.mark.slow
def test_an_unfinished_run_with_another_config_is_not_continued(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(_cmd("train.stop_after_steps=10"), cwd=work, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run_to_end(work, tmp_path, "train.stop_after_steps=10", "train.optimizer.lr=0.01")
    assert "resuming the unfinished run" not in r.stdout
    assert len(_runs(work)) == 2

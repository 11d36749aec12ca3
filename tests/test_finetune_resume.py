"""A fine-tune killed with SIGKILL resumes with the same command, as a distillation run does: the
rerun continues the unfinished run folder from the fine-tune's last checkpoint (LoRA through peft,
class-balanced sampling), logs no step twice, and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_resume_cli import _env, _runs

STEPS = 40
ARGS = ["+experiment=smoke", "threads=1", "finetune=lora", f"finetune.train.steps={STEPS}",
        "finetune.train.ckpt_every=5", "finetune.train.eval_every=0", "+finetune.train.progress=false",
        "finetune.train.log_every=1",
        "finetune.class_balanced=true", "finetune.chain_eval=false", "finetune.wise_ft.alpha=1.0",
        "finetune.then=export", "export.bundle=false", "variants=[teacher_torch_fp32,student_torch_fp32]"]


def _latest_step(work: Path) -> int:
    best = 0
    for run in _runs(work):
        try:
            best = max(best, json.loads((run / "finetune/checkpoints/latest.json").read_text())["step"])
        except (OSError, ValueError):
            pass
    return best


def _run_to_end(work: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "distill", *ARGS], cwd=work, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _final(run: Path) -> dict:
    (f,) = (run / "finetune/checkpoints" / f"step_{STEPS:07d}").glob("*.safetensors")
    return load_file(str(f))


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_with_the_same_command_and_reaches_the_same_weights(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "distill", *ARGS], cwd=work, env=_env(tmp_path),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _latest_step(work) < 10 and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the fine-tune ended before it could be killed: " + p.stderr.read().decode()[-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = _latest_step(work)
    assert 10 <= killed_at < STEPS and len(_runs(work)) == 1
    first = _runs(work)[0]

    r = _run_to_end(work, tmp_path)
    assert f"resuming the unfinished run {first}" in r.stdout and _runs(work) == [first]
    section = json.loads((first / "finetune/finetune.json").read_text())
    assert section["steps"] == STEPS and section["method"] == "lora"
    steps = [json.loads(line)["step"] for line in (first / "finetune/metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice, none missing

    _run_to_end(work, tmp_path)  # finished: the same command starts a fresh run
    (second,) = [r for r in _runs(work) if r != first]
    a, b = _final(first), _final(second)
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_the_fine_tune_config_is_part_of_a_runs_identity_but_its_cadence_is_not(tmp_path):
    from hydra import compose, initialize_config_dir

    from distill import runs
    from tests.conftest import REPO

    def ident(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return runs.identity(compose(config_name="config", overrides=["+experiment=smoke", "finetune=lora",
                                                                          *overrides]))

    base = ident()
    assert runs.differing_keys(base, ident("finetune.lora.rank=4")) == ["finetune.lora.rank"]
    assert runs.differing_keys(base, ident("finetune.train.optimizer.lr=0.1")) == ["finetune.train.optimizer.lr"]
    assert runs.differing_keys(base, ident("finetune.train.ckpt_every=7", "finetune.train.log_every=3")) == []
    # a run killed while fine-tuning has only the fine-tune's checkpoint, and is resumable
    run = tmp_path / "run"
    (run / "finetune/checkpoints").mkdir(parents=True)
    assert not runs.has_checkpoint(run)
    (run / "finetune/checkpoints/latest.json").write_text('{"step": 5}')
    assert runs.has_checkpoint(run)

"""Runs started together: each writes into its own folder, none resumes a folder a live run holds,
a teacher-cache entry is built once; and a checkpoint is resumed only against a recorded config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill import runs
from distill.cache import DELAY_ENV, KILL_ENV
from distill.errors import UserError
from tests.conftest import REPO

CFG = {"seed": 0, "train": {"resume": "auto", "steps": 10, "optimizer": {"lr": 1e-3}}, "student": {"width": 64}}

# a second process that takes a run folder, as `python -m distill` does, and holds it until stdin closes
HOLD = """
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from distill import runs
out = runs.select_run_dir(OmegaConf.create(json.loads(sys.argv[1])), Path(sys.argv[2]), pinned=sys.argv[3] == "1")
print(out, flush=True)
sys.stdin.read()
"""


def _cfg(**train):
    return OmegaConf.create({**CFG, "train": {**CFG["train"], **train}})


class _Holder:
    """A live process holding a run folder."""

    def __init__(self, out: Path, pinned: bool, cfg=CFG):
        self.p = subprocess.Popen([sys.executable, "-c", HOLD, json.dumps(cfg), str(out), "1" if pinned else "0"],
                                  cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.dir = Path(self.p.stdout.readline().strip())

    def stop(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


@pytest.fixture
def release():
    """Release, after the test, the folders this process locked (they live until the process ends)."""
    yield
    for d in list(getattr(runs, "_held", {})):
        runs._unlock(d)


def _with_checkpoint(run_dir: Path, cfg, status="running") -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 5}))
    runs.write_state(run_dir, status, runs.identity(cfg))
    return run_dir


def test_a_taken_time_stamped_folder_sends_the_next_runs_to_numbered_siblings(tmp_path, release):
    out = tmp_path / "outputs" / "smoke" / "2026-12-07_12-00-00"
    first = _Holder(out, pinned=False)
    try:
        assert first.dir == out
        assert runs.select_run_dir(_cfg(), out, pinned=False) == out.with_name(out.name + "-1")
        assert runs.select_run_dir(_cfg(), out, pinned=False) == out.with_name(out.name + "-2")
        assert (out.with_name(out.name + "-1") / runs.RUN_STATE).exists()
    finally:
        first.stop()
    # the holder is gone: its lock went with it, and the folder is free again
    assert runs.select_run_dir(_cfg(), out, pinned=False) == out


def test_a_pinned_folder_held_by_a_live_run_is_one_line(tmp_path, release):
    out = tmp_path / "run"
    first = _Holder(out, pinned=True)
    try:
        with pytest.raises(UserError) as e:
            runs.select_run_dir(_cfg(), out, pinned=True)
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg and f"process {first.p.pid}" in msg and "out_dir" in msg
    finally:
        first.stop()


def test_an_unfinished_run_held_by_a_live_process_is_not_resumed(tmp_path, release):
    parent = tmp_path / "outputs"
    busy = _with_checkpoint(parent / "2026-12-07_11-00-00", _cfg())
    holder = _Holder(busy, pinned=True)  # still training in it
    try:
        fresh = parent / "2026-12-07_12-00-00"
        assert runs.select_run_dir(_cfg(), fresh, pinned=False) == fresh
    finally:
        holder.stop()
    later = parent / "2026-12-07_13-00-00"
    assert runs.select_run_dir(_cfg(), later, pinned=False) == busy  # its process ended: resumable now
    assert not later.exists()  # the fresh folder it left is removed


# ------------------------------------------------------------- resume without run_state.json


def test_a_checkpoint_without_run_state_or_config_is_refused_in_one_line(tmp_path):
    run_dir = _with_checkpoint(tmp_path / "run", _cfg())
    (run_dir / runs.RUN_STATE).unlink()
    with pytest.raises(UserError) as e:
        runs.check_resumable(run_dir, runs.identity(_cfg()))
    msg = str(e.value)
    assert "\n" not in msg and str(run_dir) in msg and runs.RUN_STATE in msg and "train.resume=never" in msg


def test_a_checkpoint_without_run_state_is_checked_against_its_config_yaml(tmp_path):
    run_dir = _with_checkpoint(tmp_path / "run", _cfg())
    (run_dir / runs.RUN_STATE).unlink()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(_cfg(), resolve=True))
    runs.check_resumable(run_dir, runs.identity(_cfg(progress=False)))  # same identity: a control key differs
    other = OmegaConf.merge(_cfg(), {"train": {"optimizer": {"lr": 5e-4}}})
    with pytest.raises(UserError, match=r"train\.optimizer\.lr"):
        runs.check_resumable(run_dir, runs.identity(other))


def test_pinned_resume_of_a_folder_without_run_state_goes_through_the_check(tmp_path, release):
    run_dir = _with_checkpoint(tmp_path / "run", _cfg())
    (run_dir / runs.RUN_STATE).unlink()
    with pytest.raises(UserError, match="neither run_state.json nor config.yaml"):
        runs.select_run_dir(_cfg(), run_dir, pinned=True)


# ------------------------------------------------------------- end to end: three commands at once

ARGS = ["+experiment=smoke", "threads=1", "train.progress=false", "export.bundle=false",
        "variants=[teacher_torch_fp32,student_torch_fp32]"]


@pytest.mark.slow
def test_three_runs_started_together_on_an_empty_cache(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in (KILL_ENV, "RANK", "WORLD_SIZE")},
           "DISTILL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           DELAY_ENV: "0:15"}  # whoever builds holds the build open 15 s, so the others arrive while it runs
    # an experiment whose Hydra folder has no time stamp: all three get the same one, as commands
    # started within the same second do, without the command line pinning it
    extra = tmp_path / "conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "smoke_together.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n"
                                              "hydra:\n  run:\n    dir: outputs/smoke/together\n")
    work = tmp_path / "work"
    work.mkdir()
    args = [f"--config-dir={tmp_path / 'conf'}", "+experiment=smoke_together", *ARGS[1:]]
    procs = [subprocess.Popen([sys.executable, "-m", "distill", *args], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-3000:] for _, e in outs)
    logs = "\n".join(o for o, _ in outs)
    assert logs.count("teacher cache built:") == 1, logs
    assert logs.count("teacher cache hit") == 2
    reports = [Path(m) for o, _ in outs for m in re.findall(r"^report: (.+)$", o, re.M)]
    assert sorted(r.parent.name for r in reports) == ["together", "together-1", "together-2"]
    for r in reports:
        assert json.loads((r.parent / "report.json").read_text())
        assert json.loads((r.parent / runs.RUN_STATE).read_text())["status"] == "finished"
        assert (r.parent / ".hydra" / "config.yaml").exists()
        log_text = (r.parent / "__main__.log").read_text()  # Hydra's job log followed the run to its folder
        assert log_text.count("report written to") == 1 and f"report written to {r}" in log_text
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert json.loads((entry / "manifest.json").read_text())["items"] > 0

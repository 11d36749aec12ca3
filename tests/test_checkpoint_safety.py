"""Checkpoints cannot run code when a run resumes, and a damaged newest checkpoint is set aside
while the run continues from the newest intact one."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.engine import fit
from distill.engine.checkpoint import (Checkpointer, find_checkpoint, load_state, save_state, verify,
                                       write_manifest)
from distill.errors import UserError
from tests.test_engine import Regression, _cfg


class _Payload:
    """A pickle that writes a file when it is unpickled, as a crafted state.pt would run any code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def _malicious_checkpoint(root: Path, sentinel: Path) -> Path:
    """``root/step_0000010/state.pt`` holding only the payload, and a latest.json pointing at it."""
    ckpt = root / "step_0000010"
    ckpt.mkdir(parents=True)
    torch.save({"step": 10, "optimizer": _Payload(sentinel)}, ckpt / "state.pt")
    (root / "latest.json").write_text(json.dumps({"step": 10, "path": ckpt.name}))
    return ckpt


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_crafted_state_pt_is_refused_and_never_unpickled(tmp_path):
    sentinel = tmp_path / "pwned.txt"
    root = tmp_path / "run" / "checkpoints"
    ckpt = _malicious_checkpoint(root, sentinel)
    # the payload works: unpickling it is what a resume must never do
    torch.load(ckpt / "state.pt", weights_only=False)
    assert sentinel.read_text() == "pwned"
    sentinel.unlink()
    task = Regression()
    opt = torch.optim.AdamW(task.model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for call in (lambda: find_checkpoint(str(ckpt), root),  # train.resume=<that checkpoint>
                 lambda: find_checkpoint(str(tmp_path / "run"), root),  # train.resume=<its run folder>
                 lambda: find_checkpoint("auto", root),  # train.resume=auto in that run
                 lambda: load_state(ckpt),
                 lambda: Checkpointer(root, task.modules()).restore(ckpt, opt, sched, torch.device("cpu")),
                 lambda: fit(Regression(), _cfg(steps=12, resume=str(ckpt)), tmp_path / "new", torch.device("cpu")),
                 lambda: fit(Regression(), _cfg(steps=12, resume="auto"), tmp_path / "run", torch.device("cpu"))):
        with pytest.raises(UserError) as err:
            call()
        msg = _one_line(err)
        assert "older clip-distill (state.pt, a pickle)" in msg and "can run code" in msg, msg
        assert "resume=never" in msg
        assert not sentinel.exists()
    assert ckpt.exists()  # refused, not set aside: it is not damaged, and the user decides


@pytest.mark.slow
def test_a_crafted_state_pt_is_refused_by_the_command_line_exit_2(tmp_path):
    from hydra import compose, initialize_config_dir

    from distill import runs
    from tests.conftest import REPO

    sentinel = tmp_path / "pwned.txt"
    ckpt = _malicious_checkpoint(tmp_path / "evil" / "checkpoints", sentinel)
    # the crafted folder also claims this config, so the run gets as far as loading the checkpoint
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        runs.write_state(tmp_path / "evil", "running", runs.identity(compose(config_name="config",
                                                                             overrides=["+experiment=smoke"])))
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "distill", "+experiment=smoke", "threads=1", f"train.resume={ckpt}",
                        "train.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "older clip-distill (state.pt, a pickle)" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not sentinel.exists()


def test_the_state_round_trips_exactly_without_pickle(tmp_path):
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"params": [0], "betas": (0.9, 0.999), "lr": 0.1 / 3, "foreach": None,
                                             "tower": "text"}]},
             "best": float("-inf"), "bad_evals": np.int64(2), "score": np.float32(0.25), "nan": float("nan"),
             "shared": [torch.arange(4)[1:3], torch.arange(3)], "odd": {"__tensor__": "not a reference"},
             "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False])}
    save_state(tmp_path, state)
    write_manifest(tmp_path, 3)
    assert not any(p.suffix in (".pt", ".pkl") for p in tmp_path.iterdir())
    back = load_state(tmp_path)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # tuple and int keys kept
    assert list(back["optimizer"]["state"]) == [0]
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    assert back["best"] == float("-inf") and back["bad_evals"] == 2 and back["score"] == 0.25
    assert back["nan"] != back["nan"] and back["odd"] == {"__tensor__": "not a reference"}
    assert [t.tolist() for t in back["shared"]] == [[1, 2], [0, 1, 2]]
    assert back["empty"].shape == (0, 2) and back["flag"].tolist() == [True, False]


def test_resume_restores_every_rng_exactly(tmp_path):
    task = Regression()
    opt = torch.optim.AdamW(task.model.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    task.model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    np.random.normal()  # numpy's cached Gaussian is part of its state
    ck = Checkpointer(tmp_path, task.modules())
    path = ck.save(1, opt, sched, {"best": 0.5, "data": {"readers": {"0": {"pos": 7}}}})
    want = (torch.rand(3), np.random.normal(size=3), np.random.rand(), random.random(), random.gauss(0, 1))
    weights, opt_state = task.model.weight.detach().clone(), opt.state_dict()
    other = Regression()
    other.model.weight.data.zero_()
    opt2 = torch.optim.AdamW(other.model.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    state = Checkpointer(tmp_path, other.modules()).restore(path, opt2, sched2, torch.device("cpu"))
    got = (torch.rand(3), np.random.normal(size=3), np.random.rand(), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]
    assert torch.equal(other.model.weight, weights) and state["step"] == 1 and state["best"] == 0.5
    assert state["data"] == {"readers": {"0": {"pos": 7}}}
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])


def _truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bit_flip(ckpt: Path) -> None:
    f = ckpt / "state.tensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))


def _delete_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()


def _delete_manifest(ckpt: Path) -> None:  # a save killed before its manifest, copied by hand
    (ckpt / "manifest.json").unlink()


def _empty(ckpt: Path) -> None:
    for f in ckpt.iterdir():
        f.unlink()


DAMAGES = [_truncate, _bit_flip, _delete_weights, _delete_manifest, _empty]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_last_intact(tmp_path, damage, caplog):
    full = Regression()
    fit(full, _cfg(steps=12), tmp_path / "a", torch.device("cpu"))
    fit(Regression(), _cfg(steps=12, ckpt_every=3, stop_after_steps=6), tmp_path / "b", torch.device("cpu"))
    root = tmp_path / "b" / "checkpoints"
    damage(root / "step_0000006")
    assert verify(root / "step_0000006") is not None and verify(root / "step_0000003") is None
    resumed = Regression()
    resumed.model.weight.data.zero_()
    with caplog.at_level(logging.WARNING, logger="distill.engine.checkpoint"):
        out = fit(resumed, _cfg(steps=12, ckpt_every=3, resume="auto"), tmp_path / "b", torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_0000006 is damaged" in warnings[0] and "set aside" in warnings[0], warnings
    assert out["resumed_from_step"] == 3 and torch.equal(full.model.weight, resumed.model.weight)
    assert (root / "damaged_step_0000006").is_dir()  # kept for inspection, never deleted
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000009", "step_0000012"]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_no_intact_checkpoint_stops_with_one_line(tmp_path, damage, caplog):
    fit(Regression(), _cfg(steps=12, ckpt_every=3, stop_after_steps=6), tmp_path / "b", torch.device("cpu"))
    root = tmp_path / "b" / "checkpoints"
    for ckpt in list(root.glob("step_*")):
        damage(ckpt)
    with pytest.raises(UserError) as err:
        fit(Regression(), _cfg(steps=12, resume="auto"), tmp_path / "b", torch.device("cpu"))
    msg = _one_line(err)
    assert f"no intact checkpoint in {root}" in msg and "train.resume=never" in msg, msg
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["damaged_step_0000003", "damaged_step_0000006"]
    with pytest.raises(UserError, match="no intact checkpoint"):  # the rerun says the same, nothing is deleted
        find_checkpoint("auto", root)


def test_an_explicit_damaged_checkpoint_is_named_not_replaced(tmp_path):
    fit(Regression(), _cfg(steps=12, ckpt_every=3, stop_after_steps=6), tmp_path / "b", torch.device("cpu"))
    ckpt = tmp_path / "b" / "checkpoints" / "step_0000006"
    _bit_flip(ckpt)
    with pytest.raises(UserError) as err:
        find_checkpoint(str(ckpt), tmp_path / "c" / "checkpoints")
    msg = _one_line(err)
    assert "step_0000006: that checkpoint is damaged (state.tensors does not match its sha256)" in msg, msg
    assert ckpt.exists()
    # its run folder resumes from the newest intact one
    assert find_checkpoint(str(tmp_path / "b"), tmp_path / "c" / "checkpoints").name == "step_0000003"


def test_a_fine_tune_without_intact_checkpoints_names_its_own_resume_key(tmp_path):
    root = tmp_path / "run" / "finetune" / "checkpoints"
    (root / "step_0000005").mkdir(parents=True)  # a checkpoint folder left empty
    with pytest.raises(UserError) as err:
        find_checkpoint("auto", root)
    assert "finetune.train.resume=never" in _one_line(err)
    assert (root / "damaged_step_0000005").is_dir() and not (root / "step_0000005").exists()


def test_a_half_written_save_of_a_killed_run_is_removed_by_the_next_save(tmp_path):
    task = Regression()
    opt = torch.optim.AdamW(task.model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stale = tmp_path / ".tmp_step_0000005"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    path = Checkpointer(tmp_path, task.modules()).save(10, opt, sched, {})
    assert not stale.exists() and path.name == "step_0000010" and verify(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_0000010"]

"""`python -m distill list` prints every registered part, and every registered part is built here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distill.catalog import catalog, registries
from distill.losses import TERMS, DistillLoss
from tests.conftest import REPO

REGISTRY_SECTIONS = ("loss terms", "deployment variants", "data sources", "fine-tune methods", "teachers",
                     "student towers")


def test_list_command_prints_every_registry_and_every_config_group():
    r = subprocess.run([sys.executable, "-m", "distill", "list"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    regs = registries()
    assert [f"{reg.kind}s" for reg in regs] == list(REGISTRY_SECTIONS)
    for reg in regs:
        assert f"{reg.kind}s:" in out, reg.kind
        for name in reg.names():
            assert f"  {name} " in out, (reg.kind, name)
    assert {"lora", "head", "none"} <= set(regs[3].names()) and "OpenClipTeacher" in regs[4].names()
    groups = sorted(d.name for d in (REPO / "conf").iterdir() if d.is_dir())
    assert {"bench", "data", "experiment", "finetune", "loss", "student", "teacher", "train"} <= set(groups)
    for group in groups:  # every folder of conf/, not a hand-kept list
        assert f"config group {group} (" in out, group
        for yaml in (REPO / "conf" / group).glob("*.yaml"):
            assert f"  {yaml.stem} " in out, (group, yaml.stem)
    assert "config group experiment (+experiment=NAME):" in out and "config group teacher (teacher=NAME):" in out
    assert all(desc for entries in catalog().values() for _, desc in entries)  # every part says what it is


@pytest.mark.parametrize("name", list(TERMS))
def test_every_registered_loss_term_computes_and_backpropagates(name):
    g = torch.Generator().manual_seed(0)
    s = {k: torch.randn(4, 8, generator=g, requires_grad=True) for k in ("image_features", "text_features")}
    t = {k: torch.nn.functional.normalize(torch.randn(4, 12, generator=g), dim=-1) for k in s}
    extra = {"student_text": torch.randn(3, 8, generator=g, requires_grad=True),
             "teacher_text": torch.nn.functional.normalize(torch.randn(3, 12, generator=g), dim=-1)}
    loss = DistillLoss(weights={name: 1.0}, student_dim=8, teacher_dim=12)
    if loss.uses_text_bank:  # what DistillTask.prepare does with the training captions
        loss.set_text_bank(torch.randn(5, 12, generator=g))
    out = loss({**s, "logit_scale": torch.tensor(10.0)}, {**t, "logit_scale": 100.0}, has_pairs=True, extra=extra)
    assert list(out) == [f"{name}_loss"] and torch.isfinite(out[f"{name}_loss"])
    out[f"{name}_loss"].backward()
    assert any(v.grad is not None for v in (*s.values(), extra["student_text"]))

"""`python -m distill list` prints every registered part, and every registered part is built here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distill.catalog import GROUPS, catalog
from distill.losses import TERMS, DistillLoss
from tests.conftest import REPO


def test_list_command_prints_every_registered_part():
    r = subprocess.run([sys.executable, "-m", "distill", "list"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for section in ("loss terms:", "deployment variants:", "data sources:", *(f"{s}:" for s in GROUPS)):
        assert section in out, section
    from distill.variants import VARIANTS

    for name in [*TERMS, *VARIANTS]:
        assert f"  {name} " in out, name
    for section, group in GROUPS.items():
        for yaml in (REPO / "conf" / group).glob("*.yaml"):
            assert f"  {yaml.stem} " in out or out.rstrip().endswith(yaml.stem), (section, yaml.stem)
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

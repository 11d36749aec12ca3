"""Domain fine-tuning, first slice: trainable selection per method, the contrastive loss, WiSE-FT
and a FineTuneTask trained through the engine."""

from __future__ import annotations

import open_clip
import pytest
import torch

from distill.data import TrainSet, ViewSpec
from distill.engine import EngineConfig, fit
from distill.engine.config import defaults
from distill.errors import UserError
from distill.finetune import FineTuneTask, clip_contrastive, select_trainable, wise_ft
from tests.conftest import TINY_TEACHER_CFG, ArraySource


def _clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_TEACHER_CFG)


def _names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_methods_select_the_right_parameters():
    m = _clip()
    full = select_trainable(m, "full")
    assert full["trainable"] == full["total"]
    select_trainable(m, "lock_image")
    names = _names(m)
    assert "visual.proj" in names and "token_embedding.weight" in names
    assert not any(n.startswith("visual.") and n != "visual.proj" for n in names)
    select_trainable(m, "lock_image", unlocked_layers=1)  # the tiny tower has one block: it trains again
    assert any(n.startswith("visual.transformer.resblocks.0.") for n in _names(m))
    select_trainable(m, "lock_text")
    assert not any(n.startswith(("token_embedding", "transformer.", "positional_embedding")) for n in _names(m))
    assert "visual.conv1.weight" in _names(m)
    head = select_trainable(m, "head")
    assert _names(m) == {"visual.proj", "text_projection", "logit_scale"} and head["trainable"] < full["trainable"] / 10
    with pytest.raises(UserError, match="unknown: use one of"):
        select_trainable(m, "lora2")


def test_contrastive_loss_matches_the_formula_and_masks_same_label_negatives():
    g = torch.Generator().manual_seed(0)
    i, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    s = torch.tensor(10.0)
    ni, nt = torch.nn.functional.normalize(i, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    logits = s * ni @ nt.T
    want = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                  + torch.nn.functional.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(clip_contrastive(i, t, s), want)
    labels = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 say the same thing: not each other's negatives
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")
    want = 0.5 * (torch.nn.functional.cross_entropy(masked, torch.arange(4))
                  + torch.nn.functional.cross_entropy(masked.T, torch.arange(4)))
    torch.testing.assert_close(clip_contrastive(i, t, s, labels), want)


def test_wise_ft_interpolates_and_checks_its_inputs():
    a, b = _clip(0).state_dict(), _clip(1).state_dict()
    assert all(torch.equal(v, a[k]) for k, v in wise_ft(a, b, 0.0).items())
    assert all(torch.equal(v, b[k]) for k, v in wise_ft(a, b, 1.0).items())
    mid = wise_ft(a, b, 0.5)
    torch.testing.assert_close(mid["visual.proj"], (a["visual.proj"] + b["visual.proj"]) / 2)
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        wise_ft(a, b, 1.5)
    with pytest.raises(UserError, match="same base"):
        wise_ft(a, {k: v for k, v in b.items() if k != "visual.proj"}, 0.5)


def test_lock_image_fine_tuning_trains_the_text_side_only_and_lowers_the_loss(tmp_path):
    model = _clip()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = TrainSet([ArraySource(16)], ViewSpec(size=32, views=1))
    cfg = EngineConfig.from_mapping(defaults(steps=60, batch_size=8, optimizer={"lr": 1e-2, "weight_decay": 0.0},
                                             scheduler={"warmup_steps": 0}, num_workers=0, log_every=1, eval_every=0,
                                             ckpt_every=0, resume="never", tensorboard=False, progress=False))
    task = FineTuneTask(model, ds, open_clip.SimpleTokenizer(context_length=16), cfg, method="lock_image")
    out = fit(task, cfg, tmp_path, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("visual.") and k != "visual.proj")
    assert not torch.equal(after["token_embedding.weight"], before["token_embedding.weight"])
    import json

    losses = [json.loads(l)["contrastive_loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert out["method"] == "lock_image" and out["trainable_params"] < out["total_params"]

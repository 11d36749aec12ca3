"""One preprocessing for training, evaluation and the edge: parity over an image zoo, the stored spec."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from distill import datasets, preprocess
from distill.data import eval_view, load_eval_set
from distill.edge import BundleError, load_bundle
from distill.encoders import ClipEncoder, normalize_images
from distill.errors import UserError
from distill.bundle import write_bundle
from distill.export import default_preprocess, export_onnx
from distill.onnx_tools import sha256_file
from distill.imageio import load_rgb

REPO = Path(__file__).resolve().parents[1]
SIZE, CTX = 32, 16
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=SIZE),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=CTX, vocab_size=49408))
LABELS = ["frog", "bird", "cat"]


def _rgb_noise(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gradient(h, w):
    """A smooth (h, w, 3) uint8 image, cheap to build and to compress at any size."""
    x = (np.arange(w, dtype=np.uint32) * 255 // max(1, w - 1)).astype(np.uint8)
    y = (np.arange(h, dtype=np.uint32) * 255 // max(1, h - 1)).astype(np.uint8)
    return np.stack([np.broadcast_to(x[None], (h, w)), np.broadcast_to(y[:, None], (h, w)),
                     np.add.outer(y, x)], -1)  # uint8 wrap-around in the last channel: sharp edges too


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> None:
    img.save(path, fmt, **kw)


def _rgba(rng):
    a = np.full((40, 56), 255, np.uint8)
    a[:, :20] = 0  # fully transparent, with coloured pixels under it (black on the old edge path)
    a[:, 20:28] = 128
    return Image.fromarray(np.dstack([_rgb_noise(rng, 40, 56), a]), "RGBA")


def _palette(rng, transparency):
    idx = rng.integers(0, 16, (44, 30), dtype=np.uint8)
    idx[:10] = 0
    img = Image.fromarray(idx, "P")
    img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
    img.info["transparency"] = transparency
    return img


def _build(name: str, path: Path, rng) -> None:
    if name == "rgba.png":
        _save(_rgba(rng), path)
    elif name == "palette_transparent_index.png":
        _save(_palette(rng, 0), path, transparency=0)
    elif name == "palette_alpha_table.png":
        _save(_palette(rng, 0), path, transparency=bytes([0, 64, 128, 200] + [255] * 12))
    elif name == "palette_transparent.gif":
        _save(_palette(rng, 0), path, transparency=0)
    elif name == "palette_opaque.png":
        img = _palette(rng, 0)
        del img.info["transparency"]
        _save(img, path)
    elif name == "gray16.png":
        a = rng.integers(1000, 40000, (36, 28)).astype(np.uint16)
        img = Image.fromarray(a)
        assert img.mode == "I;16"
        _save(img, path)
    elif name == "gray16_big_endian.tif":
        a = rng.integers(0, 65536, (30, 40)).astype(np.uint16)
        _save(Image.fromarray(a).convert("I").convert("I;16B"), path)
    elif name == "int32.tif":
        a = rng.integers(-100_000, 3_000_000, (33, 47)).astype(np.int32)
        img = Image.fromarray(a, "I")
        _save(img, path)
    elif name == "float32.tif":
        _save(Image.fromarray(rng.standard_normal((25, 35)).astype(np.float32) * 7.5, "F"), path)
    elif name == "cmyk.jpg":
        _save(Image.fromarray(_rgb_noise(rng, 40, 52)).convert("CMYK"), path, "JPEG", quality=95)
    elif name == "ycbcr.tif":
        _save(Image.fromarray(_rgb_noise(rng, 24, 30)).convert("YCbCr"), path)
    elif name == "lab.tif":
        _save(Image.fromarray(_rgb_noise(rng, 24, 30)).convert("LAB"), path)
    elif name == "gray.png":
        _save(Image.fromarray(rng.integers(0, 256, (50, 38), dtype=np.uint8), "L"), path)
    elif name == "gray_alpha.png":
        la = np.dstack([rng.integers(0, 256, (30, 30), dtype=np.uint8),
                        np.tile(np.array([0, 90, 255], np.uint8), 10)[None].repeat(30, 0)])
        _save(Image.fromarray(la, "LA"), path)
    elif name == "bilevel.png":
        _save(Image.fromarray(rng.integers(0, 2, (40, 40), dtype=np.uint8) * 255).convert("1"), path)
    elif name == "rgb.jpg":
        _save(Image.fromarray(_rgb_noise(rng, 48, 64)), path, "JPEG")
    elif name == "tiny_upscaled.png":
        _save(Image.fromarray(_rgb_noise(rng, 9, 20)), path)
    elif name == "huge_5000x4000.png":  # reduced after decoding (factor 2)
        _save(Image.fromarray(_gradient(4000, 5000)), path, compress_level=1)
    elif name == "huge_5000x4000.jpg":
        _save(Image.fromarray(_gradient(4000, 5000)), path, "JPEG", quality=85)
    elif name == "huge_8400x8300.jpg":  # both sides >= 2 * max_side: JPEG draft decode at 1/2
        _save(Image.fromarray(_gradient(8300, 8400)), path, "JPEG", quality=85)
    else:
        raise AssertionError(name)


ZOO = ["rgba.png", "palette_transparent_index.png", "palette_alpha_table.png", "palette_transparent.gif",
       "palette_opaque.png", "gray16.png", "gray16_big_endian.tif", "int32.tif", "float32.tif", "cmyk.jpg",
       "ycbcr.tif", "lab.tif", "gray.png", "gray_alpha.png", "bilevel.png", "rgb.jpg", "tiny_upscaled.png",
       "huge_5000x4000.png", "huge_5000x4000.jpg", "huge_8400x8300.jpg"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{name: path} of the zoo files (one class folder, so the pipeline's ClassFolder reads it), and
    {name: reason} for the cases this Pillow cannot write or read back."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "things").mkdir()
    rng = np.random.default_rng(0)
    paths, skipped = {}, {}
    for name in ZOO:
        p = root / "things" / name
        try:
            _build(name, p, rng)
            with Image.open(p) as im:
                im.load()
        except (OSError, ValueError, KeyError) as e:
            skipped[name] = f"this Pillow cannot write/read {name}: {type(e).__name__}: {e}"
            p.unlink(missing_ok=True)
            continue
        paths[name] = p
    return root, paths, skipped


def _path(zoo, name) -> Path:
    _, paths, skipped = zoo
    if name in skipped:
        pytest.skip(skipped[name])
    return paths[name]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    work = tmp_path_factory.mktemp("pre")
    info = export_onnx(model, work / "onnx", image_size=SIZE, context_length=CTX, exporter="legacy",
                       towers=("image",))
    gen = torch.Generator().manual_seed(1)
    cls = torch.nn.functional.normalize(torch.randn(len(LABELS), 32, generator=gen), dim=-1)
    bundle = write_bundle(work / "bundle", image_onnx=info["image"]["path"], class_embeddings=cls.numpy(),
                          labels=LABELS, preprocess=default_preprocess(SIZE), context_length=CTX)
    return model, bundle


def _pipeline_input(path: Path, size: int = SIZE) -> np.ndarray:
    """What the pipeline feeds the student for an eval image: load_rgb -> eval_view -> normalize_images."""
    return normalize_images(eval_view(load_rgb(path), size)[None])[0].numpy()


# ---------------------------------------------------------------------------- parity over the zoo

@pytest.mark.parametrize("name", ZOO)
def test_edge_input_equals_pipeline_input(zoo, tiny_bundle, name):
    path = _path(zoo, name)
    _, bundle_dir = tiny_bundle
    edge = load_bundle(bundle_dir, "fp32").load_image(path)  # the edge runtime's own loader
    assert edge.shape == (3, SIZE, SIZE) and edge.dtype == np.float32
    np.testing.assert_array_equal(edge, _pipeline_input(path))
    # the public numpy entry points agree with it too (an opened file, and a path)
    with Image.open(path) as im:
        np.testing.assert_array_equal(preprocess.preprocess_image(im, default_preprocess(SIZE)), edge)
    np.testing.assert_array_equal(preprocess.load_image(path, default_preprocess(SIZE)), edge)


def test_eval_set_and_edge_embeddings_agree(zoo, tiny_bundle):
    """The pipeline's eval set (ClassFolder -> load_eval_set) and the edge runtime give the same
    arrays and, through the fp32 ONNX encoder and the PyTorch student, the same embeddings."""
    root, paths, _ = zoo
    model, bundle_dir = tiny_bundle
    es = load_eval_set("zoo", datasets.ClassFolder(str(root)), SIZE)
    assert es.skipped == 0 and len(es.keys) == len(paths)
    b = load_bundle(bundle_dir, "fp32")
    edge_x = np.stack([b.load_image(k) for k in es.keys])
    np.testing.assert_array_equal(edge_x, normalize_images(es.images).numpy())
    edge_emb, errors = b.embed_images(es.keys)
    assert not errors
    torch_emb = ClipEncoder(model, None, SIZE).encode_image(es.images).numpy()
    cos = (edge_emb * torch_emb).sum(-1)
    assert cos.min() >= 0.9999, dict(zip(es.keys, cos.round(6)))


@pytest.mark.parametrize("size", [SIZE, 17, 224])
def test_eval_view_is_open_clips_eval_transform(zoo, size):
    """eval_view (numpy, shared with the edge) gives the numbers of torchvision's Resize + CenterCrop +
    ToTensor and of open_clip's eval transform, so teacher caches built before stay valid."""
    _, paths, _ = zoo
    tv = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])
    oc = open_clip.image_transform(size, is_train=False, resize_mode="shortest", interpolation="bicubic")
    for name, p in paths.items():
        if name.startswith("huge") and size != SIZE:
            continue  # the huge cases only add time here; the resize arithmetic is covered by the rest
        img = load_rgb(p)
        got = eval_view(img, size)
        assert torch.equal(got, tv(img)), name
        assert torch.equal(normalize_images(got[None])[0], oc(img)), name


def test_transparency_is_white_and_high_bit_depth_is_rescaled_on_the_edge(zoo, tiny_bundle):
    _, bundle_dir = tiny_bundle
    b = load_bundle(bundle_dir, "fp32")
    spec = b.preprocess
    white = preprocess.normalize(np.ones((3, 1, 1), np.float32), spec)[:, 0, 0]
    # 56x40 -> 44x32, crop from column 6: the first ~9 output columns were transparent (black on the old path)
    x = b.load_image(_path(zoo, "rgba.png"))
    np.testing.assert_allclose(x[:, :, :7], np.broadcast_to(white[:, None, None], (3, SIZE, 7)), atol=1e-6)
    g = preprocess.open_rgb(_path(zoo, "gray16.png"))
    assert np.asarray(g).min() == 0 and np.asarray(g).max() == 255


def test_old_edge_conversion_differs_from_training(zoo):
    """What the issue measured: PIL's convert("RGB") (the old edge path) puts transparency on black."""
    p = _path(zoo, "rgba.png")
    with Image.open(p) as im:
        old = np.asarray(im.convert("RGB"))
    new = np.asarray(load_rgb(p))
    assert (new[:, :20] == 255).all() and not (old[:, :20] == 255).all()


def test_cli_classify_uses_the_pipelines_preprocessing(zoo, tiny_bundle):
    model, bundle_dir = tiny_bundle
    names = [n for n in ("rgba.png", "palette_transparent_index.png", "gray16.png", "cmyk.jpg") if n in zoo[1]]
    files = [str(zoo[1][n]) for n in names]
    cmd = ["classify", "--bundle", str(bundle_dir), "--precision", "fp32", "--top-k", "3", "--json", *files]
    r = subprocess.run([sys.executable, "-m", "distill.edge", *cmd], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    cls = torch.from_numpy(np.load(bundle_dir / "class_embeddings.npy"))
    x = torch.stack([eval_view(load_rgb(f), SIZE) for f in files])
    probs = (100.0 * ClipEncoder(model, None, SIZE).encode_image(x) @ cls.T).softmax(-1)
    for line, p in zip(r.stdout.splitlines(), probs):
        got = json.loads(line)["top_k"]
        top = torch.topk(p, 3)
        assert [t["label"] for t in got][0] == LABELS[int(top.indices[0])]
        np.testing.assert_allclose([t["score"] for t in got], top.values.numpy(), atol=1e-4)


# ---------------------------------------------------------------------------- the spec in the bundle

def test_bundle_stores_the_complete_spec(tiny_bundle):
    _, bundle_dir = tiny_bundle
    stored = json.loads((bundle_dir / "preprocess.json").read_text())
    assert stored == preprocess.check_spec(default_preprocess(SIZE)) == default_preprocess(SIZE)
    assert stored["rgb"] == {"max_side": 4096, "reduce_modes": ["RGB", "RGBA", "L", "LA", "CMYK"],
                             "high_bit_depth": "rescale_range", "palette": "composite", "alpha": "composite",
                             "background": [255, 255, 255], "other_modes": "pil_convert"}
    assert stored["resize_mode"] == "shortest" and stored["interpolation"] == "bicubic"
    assert tuple(stored["mean"]) == open_clip.constants.OPENAI_DATASET_MEAN
    assert tuple(stored["std"]) == open_clip.constants.OPENAI_DATASET_STD
    assert load_bundle(bundle_dir, "fp32").preprocess == stored


def _rewrite_preprocess(src: Path, dst: Path, spec: dict) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "preprocess.json").write_text(json.dumps(spec))
    meta = json.loads((dst / "bundle.json").read_text())
    meta["files"]["preprocess.json"] = sha256_file(dst / "preprocess.json")
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


def test_older_bundle_without_rgb_rules_gets_the_training_rules(zoo, tiny_bundle, tmp_path):
    _, bundle_dir = tiny_bundle
    old = {k: v for k, v in default_preprocess(SIZE).items() if k != "rgb"}  # what bundles held before
    b = load_bundle(_rewrite_preprocess(bundle_dir, tmp_path / "old", old), "fp32")
    assert b.preprocess == default_preprocess(SIZE)
    p = _path(zoo, "rgba.png")
    np.testing.assert_array_equal(b.load_image(p), _pipeline_input(p))


@pytest.mark.parametrize("bad", [{"rgb": {"alpha": "drop"}}, {"resize_mode": "longest"}, {"interpolation": "box"},
                                 {"rgb": {"gamma": 2.2}}, {"size": [32, 48]}, {"std": [0.2, 0.0, 0.3]}])
def test_a_spec_the_runtime_cannot_follow_is_refused(tiny_bundle, tmp_path, bad):
    _, bundle_dir = tiny_bundle
    spec = {**default_preprocess(SIZE), **bad}
    if "rgb" in bad:
        spec["rgb"] = {**default_preprocess(SIZE)["rgb"], **bad["rgb"]}
    with pytest.raises(preprocess.SpecError):
        preprocess.check_spec(spec)
    with pytest.raises(UserError, match="preprocess"):
        write_bundle(tmp_path / "w", image_onnx=bundle_dir / "image_encoder.onnx",
                     class_embeddings=np.load(bundle_dir / "class_embeddings.npy"), labels=LABELS, preprocess=spec,
                     context_length=CTX)
    bad_dir = _rewrite_preprocess(bundle_dir, tmp_path / "bad", spec)
    with pytest.raises(BundleError, match="preprocess.json"):
        load_bundle(bad_dir, "fp32")
    r = subprocess.run([sys.executable, "-m", "distill.edge", "classify", "--bundle", str(bad_dir), "x.png"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "preprocess.json" in r.stderr


def test_spec_accepts_open_clip_style_values():
    spec = preprocess.check_spec({"size": (224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                  "rgb": {"background": (0, 0, 0), "max_side": 1024}, "fill_color": 0})
    assert spec["size"] == 224 and spec["mean"] == [0.5] * 3 and spec["rgb"]["background"] == [0, 0, 0]
    assert spec["rgb"]["max_side"] == 1024 and spec["rgb"]["alpha"] == "composite" and spec["fill_color"] == 0


def test_preprocessing_modules_are_torch_free():
    code = ("import distill.preprocess, distill.imageio, distill.edge, sys; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_spec_background_is_followed():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    black = preprocess.to_rgb(rgba, {**preprocess.DEFAULT_RGB, "background": [0, 0, 0]})
    assert black.getpixel((0, 0)) == (0, 0, 0) and preprocess.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    spec = preprocess.check_spec({"size": 8, "rgb": {"background": [0, 0, 255]}})
    x = preprocess.load_image(io.BytesIO(buf.getvalue()), spec)
    np.testing.assert_allclose(x[:, 0, 0], preprocess.normalize(np.array([0, 0, 1], np.float32).reshape(3, 1, 1),
                                                                 spec)[:, 0, 0])

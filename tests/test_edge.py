"""distill.edge: torch-free import, CLI classify equals the PyTorch student, bad inputs and bad bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision import transforms as T

from distill.bundle import write_bundle
from distill.export import default_preprocess, export_onnx
from distill.imageio import load_rgb
from distill.quantize import quantize_dynamic_onnx

REPO = Path(__file__).resolve().parents[1]
SIZE, CTX = 32, 16
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=SIZE),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=CTX, vocab_size=49408))
LABELS = ["frog", "bird", "cat", "car", "apple", "flower"]


def tuxpaint_pngs(n: int) -> list[str]:
    """n real photos from the tuxpaint-stamps-default Debian package (sorted, so the choice is stable)."""
    try:
        out = subprocess.run(["dpkg", "-L", "tuxpaint-stamps-default"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("Debian package tuxpaint-stamps-default is not installed "
                    "(apt-get install --no-install-recommends tuxpaint-stamps-default)")
    pngs = sorted(p for p in out.stdout.split() if p.endswith(".png") and "/stamps/animals/" in p and Path(p).is_file())
    if len(pngs) < n:
        pytest.skip(f"tuxpaint-stamps-default has only {len(pngs)} animal PNGs, need {n}")
    return pngs[:: max(1, len(pngs) // n)][:n]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.edge", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    work = tmp_path_factory.mktemp("edge")
    # legacy exporter: 20x faster for a fixture; the dynamo path and its parity are covered in test_export
    info = export_onnx(model, work / "onnx", image_size=SIZE, context_length=CTX, exporter="legacy")
    int8 = quantize_dynamic_onnx(info["image"]["path"], work / "onnx" / "image_encoder.int8.onnx")
    with torch.no_grad():
        cls = torch.nn.functional.normalize(
            model.encode_text(open_clip.tokenize([f"a photo of a {c}." for c in LABELS], context_length=CTX)), dim=-1)
    bundle = write_bundle(work / "bundle", image_onnx=info["image"]["path"], image_int8_onnx=int8,
                          text_onnx=info["text"]["path"], class_embeddings=cls.numpy(), labels=LABELS,
                          preprocess=default_preprocess(SIZE), context_length=CTX, extra={"test": True})
    return model, cls, bundle


def test_import_is_torch_free():
    code = ("import distill.edge, sys; bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_bundle_layout(student_bundle):
    _, _, bundle = student_bundle
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["format_version"] == 1 and meta["embed_dim"] == 32 and meta["context_length"] == CTX
    assert set(meta["files"]) >= {"image_encoder.onnx", "image_encoder.int8.onnx", "text_encoder.onnx",
                                  "class_embeddings.npy", "labels.json", "preprocess.json",
                                  "tokenizer/bpe_simple_vocab_16e6.txt.gz", "tokenizer/tokenizer.json",
                                  "golden.json", "edge.py", "runtime/distill/edge.py", "requirements.txt"}
    assert all(len(h) == 64 for h in meta["files"].values()) and "torch" in meta["producer"]


def test_cli_classify_matches_pytorch_student(student_bundle):
    model, cls, bundle = student_bundle
    images = tuxpaint_pngs(4)
    r = _run("classify", "--bundle", str(bundle), "--precision", "fp32", "--top-k", "3", "--json", *images)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["image"] for g in got] == images
    tf = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE), T.ToTensor(),
                    T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    # the training data's RGB rule (transparency onto white), not PIL's convert("RGB") (onto black)
    x = torch.stack([tf(load_rgb(p)) for p in images])
    with torch.no_grad():
        probs = (100.0 * torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ cls.T).softmax(-1)
    for g, p in zip(got, probs):
        top = torch.topk(p, 3)
        assert [t["label"] for t in g["top_k"]][0] == LABELS[int(top.indices[0])]
        np.testing.assert_allclose([t["score"] for t in g["top_k"]], top.values.numpy(), atol=1e-3)
    # int8 runs end to end and gives a proper distribution
    r8 = _run("classify", "--bundle", str(bundle), "--top-k", "6", "--json", *images[:2])
    assert r8.returncode == 0, r8.stderr
    for line in r8.stdout.splitlines():
        assert abs(sum(t["score"] for t in json.loads(line)["top_k"]) - 1.0) < 1e-4


def test_unreadable_image_is_reported_and_the_rest_processed(student_bundle, tmp_path):
    _, _, bundle = student_bundle
    good = tuxpaint_pngs(2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(good[0]).read_bytes()[:200])  # a truncated PNG
    r = _run("classify", "--bundle", str(bundle), "--top-k", "2", good[0], str(broken), good[1])
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and str(broken) in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(good[0]) and lines[1].startswith(good[1])
    # embed: readable rows only, in order, with their names
    out = tmp_path / "e.npy"
    r = _run("embed", "--bundle", str(bundle), "--images", good[0], str(broken), good[1], "-o", str(out))
    assert r.returncode == 1 and np.load(out).shape == (2, 32)
    assert json.loads(Path(str(out) + ".json").read_text())["rows"] == good


def test_embed_texts_matches_pytorch(student_bundle, tmp_path):
    model, _, bundle = student_bundle
    from distill.edge import load_bundle

    texts = ["a photo of a frog.", "", "a very long caption " * 20]
    got = load_bundle(bundle, "fp32").embed_texts(texts)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(texts, context_length=CTX)), dim=-1)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    out = tmp_path / "t.npy"
    assert _run("embed", "--bundle", str(bundle), "--texts", *texts, "-o", str(out)).returncode == 0
    np.testing.assert_allclose(np.load(out), got, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "modified", "no_bundle"])
def test_bad_bundle_exits_2_with_one_line(student_bundle, tmp_path, damage):
    _, _, bundle = student_bundle
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    if damage == "missing":
        (bad / "class_embeddings.npy").unlink()
    elif damage == "modified":
        labels = json.loads((bad / "labels.json").read_text())
        (bad / "labels.json").write_text(json.dumps(labels[::-1]))
    else:
        (bad / "bundle.json").unlink()
    r = _run("classify", "--bundle", str(bad), tuxpaint_pngs(1)[0])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "rebuild" in r.stderr
    name = {"missing": "class_embeddings.npy", "modified": "labels.json", "no_bundle": "bundle.json"}[damage]
    assert name in r.stderr


def _contrast_pngs(folder: Path) -> list[str]:
    """Four images of very different pixel ranges, so per-batch int8 activation scales differ."""
    rng = np.random.default_rng(0)
    paths = []
    for i, scale in enumerate([10, 60, 255, 0]):
        p = folder / f"contrast{i}.png"
        Image.fromarray((rng.random((40, 48, 3)) * scale).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_int8_scores_do_not_depend_on_the_other_images(student_bundle, tmp_path):
    _, _, bundle = student_bundle
    from distill.edge import load_bundle

    images = _contrast_pngs(tmp_path)
    b = load_bundle(bundle, "auto")
    assert b.precision == "int8" and b.default_batch_size == 1
    alone = [b.classify([p], top_k=6)[0]["top_k"] for p in images]
    together = b.classify(images, top_k=6)
    assert [r["top_k"] for r in together] == alone  # bit-identical scores and cosines
    emb_alone = np.concatenate([b.embed_images([p])[0] for p in images])
    assert np.array_equal(b.embed_images(images)[0], emb_alone)
    # why the default is 1: a shared batch shares dynamic int8's activation scales, and the scores move
    batched = b.classify(images, top_k=6, batch_size=len(images))
    assert any(r["top_k"] != a for r, a in zip(batched, alone))
    # the CLI uses the same default
    one = _run("classify", "--bundle", str(bundle), "--top-k", "6", "--json", images[0])
    many = _run("classify", "--bundle", str(bundle), "--top-k", "6", "--json", *images)
    assert one.returncode == many.returncode == 0, one.stderr + many.stderr
    assert json.loads(one.stdout.splitlines()[0]) == json.loads(many.stdout.splitlines()[0])
    assert "dynamic int8" in " ".join(_run("classify", "--help").stdout.split())


def test_fp32_keeps_batching(student_bundle):
    _, _, bundle = student_bundle
    from distill.edge import FP32_BATCH_SIZE, load_bundle

    assert load_bundle(bundle, "fp32").default_batch_size == FP32_BATCH_SIZE > 1

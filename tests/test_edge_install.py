"""The README's install of the edge runtime without PyTorch, done for real: ``pip install --no-deps``
of this package into a fresh folder, plus onnxruntime, numpy and Pillow only, then classification
by a fresh interpreter that cannot import torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from distill.bundle import write_bundle
from distill.export import default_preprocess, export_onnx
from distill.quantize import quantize_dynamic_onnx
from tests.conftest import link_edge_deps

REPO = Path(__file__).resolve().parents[1]
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=1, head_width=32, patch_size=16, image_size=32),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408))


def _bundle(work: Path) -> Path:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    info = export_onnx(model, work / "onnx", image_size=32, context_length=16, exporter="legacy")
    int8 = quantize_dynamic_onnx(info["image"]["path"], work / "onnx" / "image_encoder.int8.onnx")
    labels = ["a red square", "a green square", "a blue square"]
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(labels, context_length=16)), dim=-1)
    return write_bundle(work / "bundle", image_onnx=info["image"]["path"], image_int8_onnx=int8,
                        text_onnx=info["text"]["path"], class_embeddings=cls.numpy(), labels=labels,
                        preprocess=default_preprocess(32), context_length=16)


def _torch_free_site(work: Path) -> Path:
    """``pip install --no-deps`` of a copy of this repository, next to links to the three runtime
    dependencies (and the shared libraries their wheels carry) taken from this environment."""
    src = work / "src"
    shutil.copytree(REPO / "distill", src / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    site = work / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    deps = link_edge_deps(work / "deps")
    return site


def test_pip_no_deps_install_classifies_without_torch(tmp_path):
    bundle = _bundle(tmp_path)
    site = _torch_free_site(tmp_path)
    img = tmp_path / "red.png"
    Image.new("RGBA", (40, 30), (220, 20, 20, 255)).save(img)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{tmp_path / 'deps'}"
    py = [sys.executable, "-S"]  # -S: no site-packages, so nothing of this environment but the links above
    no_torch = subprocess.run([*py, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    r = subprocess.run([*py, "-m", "distill.edge", "classify", "--bundle", str(bundle), "--top-k", "3", "--json", str(img)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    where = subprocess.run([*py, "-c", "import distill; print(distill.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(site))  # the installed copy ran, not this checkout
    # the same answer as the runtime in this (torch-bearing) environment
    from distill.edge import load_bundle

    (want,) = load_bundle(bundle).classify([img], top_k=3)
    got = json.loads(r.stdout)
    got = got[0] if isinstance(got, list) else got
    assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
    np.testing.assert_allclose([t["score"] for t in got["top_k"]], [t["score"] for t in want["top_k"]], atol=1e-6)

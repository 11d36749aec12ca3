"""A bundle stands alone: copied anywhere, it runs with its own runtime (runtime/distill/ + edge.py) in a
fresh venv that holds only its requirements, never imports torch, and checks itself against its golden
vectors; tampering is one BundleError line; the int8 text encoder ships and is used under int8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from distill import edge
from distill.errors import UserError
from distill.bundle import GOLDEN_TEXTS, runtime_modules, write_bundle
from distill.export import default_preprocess, export_onnx
from distill.onnx_tools import CHECKSUMS, write_checksums
from distill.quantize import quantize_dynamic_onnx
from tests.conftest import link_edge_deps

REPO = Path(__file__).resolve().parents[1]
CTX = 16
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=1, head_width=32, patch_size=16, image_size=32),
           text_cfg=dict(width=32, layers=2, heads=2, context_length=CTX, vocab_size=49408))
LABELS = ["a red square", "a green square", "a blue square"]
# installed by a .pth line in the fresh venv: any import of torch (or what pulls it in) fails loudly
NO_TORCH_HOOK = '''import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
            raise ImportError("BLOCKED: the bundle runtime imported " + name + " (it must run without PyTorch)")
        return None
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, bundle with both int8 towers, older-style bundle without the int8 text encoder)."""
    work = tmp_path_factory.mktemp("standalone")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    info = export_onnx(model, work / "onnx", image_size=32, context_length=CTX, exporter="legacy")
    int8 = {t: quantize_dynamic_onnx(info[t]["path"], work / "onnx" / f"{t}_encoder.int8.onnx") for t in info}
    with torch.no_grad():
        cls = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(LABELS, context_length=CTX)), dim=-1)
    kw = dict(image_onnx=info["image"]["path"], image_int8_onnx=int8["image"], text_onnx=info["text"]["path"],
              class_embeddings=cls.numpy(), labels=LABELS, preprocess=default_preprocess(32), context_length=CTX)
    bundle = write_bundle(work / "bundle", text_int8_onnx=int8["text"], **kw)
    older = write_bundle(work / "older", **kw)
    return model, bundle, older


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv's python that sees only onnxruntime, numpy and Pillow (links to this environment's
    packages and the shared libraries their wheels carry), with torch imports blocked."""
    work = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "env")], check=True, timeout=120)
    deps = link_edge_deps(work / "deps")
    (deps / "_no_torch.py").write_text(NO_TORCH_HOOK)
    site = next((work / "env").glob("lib/python3*/site-packages"))
    # the repo on the path too, after the deps: an installed distill must not shadow the bundle's copy
    (site / "bundle_deps.pth").write_text(f"{deps}\nimport _no_torch\n{REPO}\n")
    return work / "env" / "bin" / "python"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def _py(python: Path | str, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)


def _images(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, (rgba, size) in enumerate([((220, 20, 20, 255), (40, 30)), ((20, 200, 40, 128), (33, 50)),
                                      ((10, 10, 230, 255), (64, 64))]):
        paths.append(folder / f"img{i}.png")
        Image.new("RGBA", size, rgba).save(paths[-1])
    return paths


def test_bundle_carries_its_runtime_requirements_readme_and_checksums(built):
    _, bundle, _ = built
    meta = json.loads((bundle / "bundle.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - set(meta["files"]) == {"bundle.json", CHECKSUMS}  # every other file is in the manifest
    for m in runtime_modules():  # copies of the package's own modules, byte for byte
        assert (bundle / "runtime/distill" / f"{m}.py").read_bytes() == (REPO / "distill" / f"{m}.py").read_bytes()
    assert {"edge", "errors", "onnx_tools", "preprocess", "tokenizer_np"} == set(runtime_modules())
    assert {"edge.py", "runtime/distill/__init__.py", "requirements.txt", "README.md", "golden.json",
            "text_encoder.int8.onnx", "golden/gradient.png", "golden/gradient.pixels.npy"} <= set(meta["files"])
    from importlib.metadata import version
    reqs = [r for r in (bundle / "requirements.txt").read_text().splitlines() if r and not r.startswith("#")]
    # pinned to what computed the golden vectors: this process's versions
    assert reqs == [f"{n}=={version(n)}" for n in ("onnxruntime", "numpy", "Pillow")]
    readme = (bundle / "README.md").read_text()
    for needle in ("pip install -r requirements.txt", "python edge.py classify", "--texts", "--images",
                   "python edge.py serve", "sha256sum -c SHA256SUMS", "python edge.py selftest", "golden.json"):
        assert needle in readme, needle
    sums = dict(reversed(line.split("  ", 1)) for line in (bundle / CHECKSUMS).read_text().splitlines())
    assert set(sums) == on_disk - {CHECKSUMS}
    if shutil.which("sha256sum"):
        r = subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS], cwd=bundle, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    golden = json.loads((bundle / "golden.json").read_text())
    assert [t["text"] for t in golden["texts"]] == list(GOLDEN_TEXTS)
    assert set(golden["embeddings"]) == set(edge.ENCODERS) and len(golden["images"]) == 4


def test_fresh_venv_runs_the_copied_bundle_without_torch(built, venv, tmp_path):
    _, bundle, _ = built
    copy = tmp_path / "device" / "bundle"
    shutil.copytree(bundle, copy)
    elsewhere = tmp_path / "cwd"
    imgs = _images(elsewhere)
    blocked = _py(venv, "-c", "import torch", cwd=elsewhere)
    assert blocked.returncode != 0 and "BLOCKED" in blocked.stderr  # the hook is live in this venv
    launcher = str(copy / "edge.py")
    r = _py(venv, launcher, "classify", "--top-k", "3", "--json", *map(str, imgs), cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = edge.load_bundle(bundle).classify(imgs, top_k=3)
    assert [[t["label"] for t in g["top_k"]] for g in got] == [[t["label"] for t in w["top_k"]] for w in want]
    np.testing.assert_allclose([[t["score"] for t in g["top_k"]] for g in got],
                               [[t["score"] for t in w["top_k"]] for w in want], atol=1e-6)
    r = _py(venv, launcher, "embed", "--images", *map(str, imgs), "-o", "img.npy", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]
    want_emb = edge.load_bundle(bundle).embed_images(imgs)[0]
    np.testing.assert_allclose(np.load(elsewhere / "img.npy"), want_emb, atol=1e-6)
    texts = ["a photo of a cat.", "café"]
    for precision in ("fp32", "int8"):
        r = _py(venv, launcher, "embed", "--precision", precision, "--texts", *texts, "-o", "t.npy", cwd=elsewhere)
        assert r.returncode == 0, r.stderr[-2000:]
        np.testing.assert_allclose(np.load(elsewhere / "t.npy"),
                                   edge.load_bundle(bundle, precision).embed_texts(texts), atol=1e-6)
    r = _py(venv, launcher, "selftest", cwd=elsewhere)
    assert r.returncode == 0 and "selftest passed" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("ok   ") == 1 + 4 + 4  # tokens, 4 golden images' pixels, 4 encoder files


def test_the_bundle_copy_of_distill_runs_and_nothing_imports_torch(built, venv, tmp_path):
    _, bundle, _ = built
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    # the launcher as __main__, then report which distill ran and whether torch got in
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], 'selftest']\ntry:\n runpy.run_path(sys.argv[0], "
            "run_name='__main__')\nexcept SystemExit as e:\n print('RC', e.code)\nimport distill.edge\n"
            "print('EDGE', distill.edge.__file__)\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')))\n"
            "print('DISTILL', sorted(m for m in sys.modules if m.startswith('distill.')))")
    r = _py(venv, "-c", code, str(copy / "edge.py"), cwd=tmp_path)
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0].isupper() and " " in line)
    assert out.get("RC") == "0", r.stdout + r.stderr
    assert out["EDGE"].startswith(str(copy / "runtime" / "distill")), out["EDGE"]  # not the repo on the path
    assert out["HEAVY"] == "[]"
    assert set(eval(out["DISTILL"])) <= {f"distill.{m}" for m in runtime_modules()}  # noqa: S307 - our own output
    # and the test would notice: a runtime that imports torch fails in this venv
    errors_py = copy / "runtime/distill/errors.py"
    errors_py.write_text(errors_py.read_text() + "\nimport torch  # noqa\n")
    r = _py(venv, str(copy / "edge.py"), "selftest", cwd=tmp_path)
    assert r.returncode != 0 and "BLOCKED" in r.stderr


def test_serve_defaults_to_the_bundle_folder(built, venv, tmp_path):
    _, bundle, _ = built
    proc = subprocess.Popen([str(venv), str(bundle / "edge.py"), "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read(2000) if proc.poll() is not None else line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url.replace("/web/", "/golden.json"), timeout=10) as resp:
            assert json.loads(resp.read())["format"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_tampered_golden_or_runtime_is_one_bundle_error_line(built, tmp_path):
    _, bundle, _ = built
    for rel in ("golden.json", "golden/checker.pixels.npy", "runtime/distill/errors.py", "edge.py"):
        bad = tmp_path / rel.replace("/", "_")
        shutil.copytree(bundle, bad)
        with open(bad / rel, "ab") as f:
            f.write(b"\n# changed\n" if rel.endswith(".py") else b" ")
        for cmd in (["selftest"], ["classify", str(bad / "golden/gradient.png")]):
            r = subprocess.run([sys.executable, str(bad / "edge.py"), *cmd], capture_output=True, text=True,
                               cwd=tmp_path, env=_env(), timeout=120)
            _one_line_error(r, rel, "sha256 does not match bundle.json")
        with pytest.raises(edge.BundleError, match=rel):
            edge.load_bundle(bad)


def _rewrite(bundle: Path, rel: str, change) -> None:
    """Change a file and record its new sha256, as a bundle would look with golden vectors that the
    runtime no longer reproduces (the manifest is consistent; the numbers are not)."""
    doc = json.loads((bundle / rel).read_text())
    change(doc)
    (bundle / rel).write_text(json.dumps(doc))
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["files"][rel] = edge.onnx_tools.sha256_file(bundle / rel)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def test_selftest_reports_each_mismatch_and_exits_1(built, tmp_path):
    _, bundle, _ = built
    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)

    def off(doc):
        doc["texts"][0]["tokens"][1] += 1
        rows = np.asarray(doc["embeddings"]["image_encoder.int8.onnx"]["rows"])
        doc["embeddings"]["image_encoder.int8.onnx"]["rows"] = (rows + 0.2 * np.roll(rows, 1, axis=1)).tolist()

    _rewrite(bad, "golden.json", off)
    r = subprocess.run([sys.executable, str(bad / "edge.py"), "selftest"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and "tokens" in fails[0] and "image_encoder.int8.onnx" in fails[1], r.stdout
    assert "selftest FAILED: 7 of 9" in r.stdout
    # an older bundle without golden vectors: one line saying so
    (bad / "golden.json").unlink()
    _one_line_error(subprocess.run([sys.executable, "-m", "distill.edge", "selftest", "--bundle", str(bad)],
                                   capture_output=True, text=True, cwd=REPO, timeout=120), "golden.json")


def test_int8_text_encoder_parity_and_auto_keeps_fp32_text(built):
    model, bundle, older = built
    texts = [*GOLDEN_TEXTS, "a photo of a frog.", "two dogs"]
    fp32, int8, auto = (edge.load_bundle(bundle, p) for p in ("fp32", "int8", "auto"))
    assert (fp32.text_precision, int8.text_precision, auto.text_precision) == ("fp32", "int8", "fp32")
    assert auto.precision == "int8" and int8.text_file == "text_encoder.int8.onnx"
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(open_clip.tokenize(texts, context_length=CTX)), dim=-1)
    e32, e8 = fp32.embed_texts(texts), int8.embed_texts(texts)
    np.testing.assert_allclose(e32, ref.numpy(), atol=1e-5)
    cos = np.sum(e32 * e8, axis=-1)
    assert cos.min() > 0.98 and not np.array_equal(e32, e8), cos  # the int8 file really ran, and stays close
    # one text per run by default under int8, so a text's embedding does not depend on the others
    assert np.array_equal(int8.embed_texts(texts[:1]), e8[:1])
    # an older bundle without text_encoder.int8.onnx: int8 falls back to the fp32 text encoder
    old = edge.load_bundle(older, "int8")
    assert old.precision == "int8" and old.text_precision == "fp32"
    np.testing.assert_allclose(old.embed_texts(texts), e32, atol=1e-6)
    with pytest.raises(edge.BundleError, match="text_encoder.int8.onnx"):
        edge.load_bundle(older, "fp32", text_precision="int8").embed_texts(["x"])


def test_write_checksums_covers_files_added_after_write_bundle(built, tmp_path):
    _, bundle, _ = built
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    (b / "mobile").mkdir()
    (b / "mobile" / "model.ort").write_bytes(b"ort bytes")
    meta = json.loads((b / "bundle.json").read_text())
    meta["files"]["mobile/model.ort"] = edge.onnx_tools.sha256_file(b / "mobile" / "model.ort")
    (b / "bundle.json").write_text(json.dumps(meta))
    write_checksums(b)
    sums = (b / CHECKSUMS).read_text()
    assert "  mobile/model.ort\n" in sums and f"{edge.onnx_tools.sha256_file(b / 'bundle.json')}  bundle.json\n" in sums
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS], cwd=b).returncode == 0
    edge.load_bundle(b)
    with pytest.raises(UserError, match="bundle.json"):
        write_checksums(tmp_path / "nothing")

"""The bundle's browser page (distill/web) in headless Chromium, against distill.edge on the same files.

- preprocess.js gives Pillow's pixels bit for bit from the same RGBA (node, random images and specs);
- ``python -m distill.edge serve`` sends the COOP/COEP headers and the types the page needs;
- write_bundle copies the page and onnxruntime-web into bundle/web/ (and without the npm files warns once);
- the page, driven through the DevTools protocol over a pipe (no extra Python package: tools/browser_driver.py,
  which the benchmarks share): fp32 image embeddings within cosine 0.999 of distill.edge's, int8 top-1 the
  same as distill.edge classify, text embeddings from tokenizer.js + the text encoder within cosine 0.999 of
  distill.edge's, an undecodable file named while the rest go on, a clear message for an empty prompt list,
  text and image search, and a sha256 manifest that catches a modified file (and is skipped when there is none).

Needs Debian's chromium-headless-shell (``apt-get install --no-install-recommends chromium-headless-shell``,
tools/setup.sh does) and the npm runtime (``npm ci`` in distill/web); without them the tests skip with one
line, with CI set they fail. The screenshot of the classified page goes to tests/artifacts/web_page.png and
benchmarks/results/web_page.png.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))  # tools/ is not a package (as for pin_smoke in test_pipeline)
# the DevTools driver and the page's server live in tools/browser_driver.py (the benchmarks use them too)
from browser_driver import (  # noqa: E402
    INSTALL_CHROMIUM,
    BrowserUnavailable,
    Chromium,
    Server,
    chromium_binary,
    drop_files,
)
from browser_driver import tuxpaint_pngs as _tuxpaint_pngs  # noqa: E402

WEB = REPO / "distill" / "web"
ARTIFACTS = REPO / "tests" / "artifacts"
SIZE, CTX = 32, 16
CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=SIZE),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=CTX, vocab_size=49408))
LABELS = ["frog", "bird", "cat", "car", "apple", "flower"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _missing(msg: str):
    if _ci():
        pytest.fail(msg)  # CI must run these tests, not skip them
    pytest.skip(msg)


def tuxpaint_pngs(n: int) -> list[str]:
    """The driver's Tux Paint photos; a missing package skips (fails under CI)."""
    try:
        return _tuxpaint_pngs(n)
    except BrowserUnavailable as e:
        _missing(str(e))


# ---------------------------------------------------------------------------- fixtures

def build_bundle(work: Path, *, model_cfg: dict = CFG, size: int = SIZE, ctx: int = CTX, labels=LABELS) -> Path:
    """A tiny random open_clip student exported the way test_edge does (legacy exporter, ORT dynamic int8)."""
    import open_clip
    import torch

    from distill.bundle import write_bundle
    from distill.export import default_preprocess, export_onnx
    from distill.quantize import quantize_dynamic_onnx

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**model_cfg).eval()
    info = export_onnx(model, work / "onnx", image_size=size, context_length=ctx, exporter="legacy")
    int8 = quantize_dynamic_onnx(info["image"]["path"], work / "onnx" / "image_encoder.int8.onnx")
    with torch.no_grad():
        cls = torch.nn.functional.normalize(
            model.encode_text(open_clip.tokenize([f"a photo of a {c}." for c in labels], context_length=ctx)), dim=-1)
    return write_bundle(work / "bundle", image_onnx=info["image"]["path"], image_int8_onnx=int8,
                        text_onnx=info["text"]["path"], class_embeddings=cls.numpy(), labels=labels,
                        preprocess=default_preprocess(size), context_length=ctx,
                        extra={"templates": TEMPLATES})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from distill.bundle import ORT_WEB_DIST, ORT_WEB_FILES

    if not all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES):
        _missing(f"onnxruntime-web is not installed: npm ci --prefix {WEB} (tools/setup.sh does)")
    return build_bundle(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Real photos plus the modes and formats the page must decode like Pillow: RGBA PNGs (the Tux Paint
    stamps), a JPEG, grayscale, palette with transparency, a tall one, and an undecodable file."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    pngs = tuxpaint_pngs(8)
    out = list(pngs)
    src = Image.open(pngs[0]).convert("RGBA")
    flat = Image.new("RGB", src.size, (255, 255, 255))
    flat.paste(src, mask=src.getchannel("A"))
    flat.save(d / "stamp.jpg", quality=92)
    flat.convert("L").save(d / "stamp_gray.png")
    Image.open(pngs[1]).convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE).save(d / "stamp_palette.png")
    Image.open(pngs[2]).convert("RGB").resize((60, 400)).save(d / "tall.png")
    gray16 = (np.asarray(flat.convert("L"), np.uint16) * 200 + 1000).astype(np.uint16)
    Image.fromarray(gray16).save(d / "gray16.png")  # 16-bit gray: Pillow rescales its range; the browser sees 8 bits
    flat.save(d / "rgb_trns.png", transparency=(255, 255, 255))  # a colour key Pillow ignores on RGB
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": Pillow (and so distill.edge) ignores it, the page must too
    flat.resize((flat.width, flat.height // 2)).save(d / "exif_rotated.jpg", exif=exif)
    (d / "broken.png").write_bytes(Path(pngs[3]).read_bytes()[:300])  # a truncated PNG
    out += [str(d / n) for n in ("stamp.jpg", "stamp_gray.png", "stamp_palette.png", "tall.png", "exif_rotated.jpg",
                                 "gray16.png", "rgb_trns.png", "broken.png")]
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        _missing(f"headless Chromium not found: {INSTALL_CHROMIUM}")
    b = Chromium(binary, tmp_path_factory.mktemp("profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle)
    yield s
    s.close()


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _open(browser: Chromium, url: str) -> dict:
    browser.navigate(url)
    return browser.eval("window.clipDemo ? clipDemo.ready.then(() => clipDemo.report()) : Promise.reject(new Error('no clipDemo'))")


# ---------------------------------------------------------------------------- no browser needed

def test_preprocess_js_matches_pillow_bit_for_bit(tmp_path):
    """Same decoded RGBA in, same float32 model input out: resize (every filter, both pass orders),
    centre crop, huge-image reduction (premultiplied for RGBA/LA), alpha composite, normalisation."""
    from PIL import Image

    from distill import preprocess as P

    node = shutil.which("node")
    if node is None:
        _missing("node not found: apt-get install nodejs (tools/setup.sh does)")
    rng = np.random.default_rng(0)
    cases, blob = [], bytearray()
    for i in range(48):
        w, h = int(rng.integers(1, 320)), int(rng.integers(1, 320))
        if i % 8 == 5:
            w, h = int(rng.integers(3, 30)), int(rng.integers(200, 400))  # tall: Pillow 13 runs the vertical pass first
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        if i % 3 == 0:  # smooth content as well as noise
            yy, xx = np.mgrid[0:h, 0:w]
            a[..., 0], a[..., 1] = (xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1))
        mode = ["RGB", "RGBA", "L", "LA", "P"][i % 5]
        img = Image.fromarray(a, "RGBA")
        img = img.convert("RGB").convert("P") if mode == "P" else img.convert(mode)
        spec = {"size": [32, 224, 64, 17][i % 4], "interpolation": ["bicubic", "bilinear", "lanczos", "nearest"][(i // 4) % 4],
                "resize_mode": "squash" if i % 7 == 3 else "shortest"}
        if i % 5 in (1, 3):
            spec["rgb"] = {"max_side": int(rng.integers(20, 120)), "background": [int(x) for x in rng.integers(0, 256, 3)]}
        spec = P.check_spec(spec)
        expected = P.preprocess_image(img.copy(), spec)
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)  # what a browser decoder hands over
        cases.append({"w": w, "h": h, "mode": mode, "spec": spec, "off": len(blob), "eoff": len(blob) + rgba.size,
                      "n": expected.size})
        blob += rgba.tobytes() + expected.astype(np.float32).tobytes()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "blob.bin").write_bytes(bytes(blob))
    script = tmp_path / "check.mjs"
    script.write_text("""
import { readFile } from "node:fs/promises";
const pre = await import(process.argv[2]);
const cases = JSON.parse(await readFile(process.argv[3] + "/cases.json", "utf8"));
const blob = await readFile(process.argv[3] + "/blob.bin");
const bad = [];
for (const c of cases) {
  const rgba = new Uint8ClampedArray(blob.buffer, blob.byteOffset + c.off, c.w * c.h * 4);
  const want = new Float32Array(blob.buffer.slice(blob.byteOffset + c.eoff, blob.byteOffset + c.eoff + c.n * 4));
  const got = pre.preprocessRgba(rgba, c.w, c.h, pre.checkSpec(c.spec), { mode: c.mode });
  let diff = got.length === want.length ? 0 : Infinity;
  for (let i = 0; i < want.length && diff !== Infinity; i++) diff = Math.max(diff, Math.abs(want[i] - got[i]));
  if (diff !== 0) bad.push(`${c.w}x${c.h} ${c.mode} ${c.spec.interpolation} max_side ${c.spec.rgb.max_side}: ${diff}`);
}
console.log(JSON.stringify({ cases: cases.length, bad }));
""")
    r = subprocess.run([node, str(script), (WEB / "preprocess.js").as_uri(), str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["cases"] == 48 and res["bad"] == [], res["bad"][:10]


def test_write_bundle_copies_the_page_and_runtime_into_the_manifest(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    for rel in ("web/index.html", "web/app.js", "web/preprocess.js", "web/tokenizer.js", "web/ort/ort.wasm.min.mjs",
                "web/ort/ort-wasm-simd-threaded.mjs", "web/ort/ort-wasm-simd-threaded.wasm"):
        assert rel in meta["files"] and (bundle / rel).is_file(), rel
    assert meta["extra"]["templates"] == TEMPLATES
    from distill.edge import load_bundle

    load_bundle(bundle)  # the sha256 check covers the page too


def test_write_bundle_without_the_npm_runtime_warns_once_and_still_writes(bundle, tmp_path, monkeypatch, caplog):
    from distill import bundle as bundle_mod
    from distill.edge import load_bundle

    monkeypatch.setattr(bundle_mod, "ORT_WEB_DIST", tmp_path / "no_node_modules")
    caplog.set_level("WARNING", logger="distill.bundle")
    out = bundle_mod.write_bundle(tmp_path / "b", image_onnx=bundle / "image_encoder.onnx",
                              class_embeddings=np.load(bundle / "class_embeddings.npy"), labels=LABELS,
                              preprocess={"size": SIZE}, context_length=CTX)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "npm ci" in warnings[0], warnings
    files = json.loads((out / "bundle.json").read_text())["files"]
    assert "web/index.html" in files and not any(f.startswith("web/ort/") for f in files)
    assert load_bundle(out).classify([tuxpaint_pngs(1)[0]])[0]["top_k"]


def test_serve_sends_isolation_headers_and_types(bundle, tmp_path):
    s = Server(bundle)
    try:
        with urllib.request.urlopen(s.url) as r:
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b"app.js" in r.read()
        for rel, ctype in (("web/app.js", "text/javascript"), ("web/ort/ort-wasm-simd-threaded.mjs", "text/javascript"),
                           ("web/ort/ort-wasm-simd-threaded.wasm", "application/wasm")):
            with urllib.request.urlopen(f"{s.root}/{rel}") as r:
                assert r.headers["Content-Type"].startswith(ctype), (rel, r.headers["Content-Type"])
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        # gzip for browsers that take it, the same bytes once decompressed
        req = urllib.request.Request(f"{s.root}/web/ort/ort-wasm-simd-threaded.wasm", headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req) as r:
            assert r.headers["Content-Encoding"] == "gzip" and r.headers["Content-Type"] == "application/wasm"
            body = r.read()
        raw = (bundle / "web/ort/ort-wasm-simd-threaded.wasm").read_bytes()
        assert gzip.decompress(body) == raw and len(body) < len(raw) / 2
        with urllib.request.urlopen(s.root + "/") as r:  # the root redirects to the page
            assert r.url.endswith("/web/")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{s.root}/web/nothing.js")
    finally:
        s.close()
    r = subprocess.run([sys.executable, "-m", "distill.edge", "serve", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "web/index.html" in r.stderr


# ---------------------------------------------------------------------------- in the browser

def test_page_fp32_matches_edge_and_handles_bad_input(browser, server, bundle, images):
    from distill.edge import load_bundle

    rep = _open(browser, server.url + "?precision=fp32")
    assert rep["precision"] == "fp32" and rep["manifest"] and rep["crossOriginIsolated"], rep
    rep = drop_files(browser, images)
    by_name = {Path(i["name"]).name: i for i in rep["images"]}
    # the truncated file is named, and every other image is still embedded
    assert by_name["broken.png"]["error"] and any("broken.png" in m["text"] for m in rep["messages"])
    good = [p for p in images if not p.endswith("broken.png")]
    assert all(by_name[Path(p).name]["embedding"] for p in good)
    ref = load_bundle(bundle, "fp32")
    emb, errors = ref.embed_images(good, batch_size=1)
    assert not errors
    cos = {Path(p).name: _cos(by_name[Path(p).name]["embedding"], e) for p, e in zip(good, emb)}
    print("fp32 image embedding cosine, browser vs distill.edge:", {k: round(v, 7) for k, v in cos.items()})
    assert min(cos.values()) >= 0.999, cos
    # prompts = the bundle's labels: its class embeddings, the same scores as distill.edge classify
    assert rep["classifier"]["fromBundle"]
    py = {Path(r["image"]).name: r for r in ref.classify(good, top_k=len(LABELS), batch_size=1)}
    for name, r in py.items():
        assert by_name[name]["top"][0]["label"] == r["top_k"][0]["label"], name
        np.testing.assert_allclose(by_name[name]["top"][0]["score"], r["top_k"][0]["score"], atol=2e-3)
    # text: tokenizer.js + the text encoder give distill.edge's text embeddings
    texts = ["a photo of a cat.", "A drawing of a BIRD!", "zebra crossing at night", "café au lait"]
    js = browser.eval(f"clipDemo.embedTexts({json.dumps(texts)})")
    py_text = ref.embed_texts(texts)
    assert min(_cos(a, b) for a, b in zip(js, py_text)) >= 0.999
    # typed prompts go through the templates; an empty list gets a message, not a crash
    browser.eval("clipDemo.setPrompts('')")
    browser.eval("clipDemo.classify().then(() => clipDemo.idle())")
    rep = browser.eval("clipDemo.report()")
    assert any("No prompts" in m["text"] for m in rep["messages"]) and all(i["top"] is None for i in rep["images"])
    prompts = ["dog", "cat", "bird", "fish", "horse"]
    browser.eval(f"clipDemo.setPrompts({json.dumps(chr(10).join(prompts))})")
    browser.eval("clipDemo.classify().then(() => clipDemo.idle())")
    rep = browser.eval("clipDemo.report()")
    assert rep["classifier"] == {"prompts": prompts, "fromBundle": False}
    t = ref.embed_texts([tpl.format(p) for p in prompts for tpl in TEMPLATES]).reshape(len(prompts), len(TEMPLATES), -1)
    clf = t.mean(1) / np.linalg.norm(t.mean(1), axis=-1, keepdims=True)
    for p, e in zip(good, emb):
        got = {Path(i["name"]).name: i for i in rep["images"]}[Path(p).name]["top"][0]["label"]
        assert got == prompts[int(np.argmax(clf @ e))], p
    browser.screenshot(ARTIFACTS / "web_page.png")
    (REPO / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ARTIFACTS / "web_page.png", REPO / "benchmarks" / "results" / "web_page.png")
    # search: text -> images ranked by cosine; image -> the others ranked by similarity to it
    browser.eval("clipDemo.search('a photo of a cat.').then(() => clipDemo.idle())")
    order = browser.eval("[...document.querySelectorAll('#grid .card')].map(c => c.dataset.name)")
    q = ref.embed_texts(["a photo of a cat."])[0]
    want = [Path(good[i]).name for i in np.argsort(-(emb @ q), kind="stable")]
    assert [Path(n).name for n in order][:3] == want[:3]
    browser.eval("document.querySelector('#grid .card').click()")
    assert browser.eval("document.querySelector('#grid .card.selected') !== null")


def test_page_int8_top1_agrees_with_edge_on_a_folder(browser, server, bundle, images, tmp_path):
    from distill.edge import load_bundle

    rep = _open(browser, server.url)  # auto: int8, as distill.edge
    assert rep["precision"] == "int8"
    good = [p for p in images if not p.endswith("broken.png")]
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, p in enumerate(good):
        shutil.copy(p, (folder / "more" if i % 2 else folder) / Path(p).name)
    (folder / "notes.txt").write_text("not an image: a folder's other files are skipped")
    rep = drop_files(browser, [str(folder)], selector="#folder")
    assert sorted(Path(i["name"]).name for i in rep["images"]) == sorted(Path(p).name for p in good)
    got = {Path(i["name"]).name: i["top"][0]["label"] for i in rep["images"]}
    ref = {Path(r["image"]).name: r["top_k"][0]["label"] for r in load_bundle(bundle).classify(good, top_k=1)}
    agree = sum(got[k] == v for k, v in ref.items()) / len(ref)
    print(f"int8 top-1 agreement, browser vs distill.edge: {agree:.3f} on {len(ref)} images")
    assert agree >= 0.99, (got, ref)


def test_page_checks_the_manifest_and_skips_it_when_absent(browser, bundle, tmp_path):
    bad = tmp_path / "modified"
    shutil.copytree(bundle, bad)
    labels = json.loads((bad / "labels.json").read_text())
    (bad / "labels.json").write_text(json.dumps(labels[::-1]))
    s = Server(bad)
    try:
        browser.navigate(s.url)
        msg = browser.eval("clipDemo.ready.then(() => 'loaded', e => e.message)")
        assert "labels.json" in msg and "sha256" in msg
        shown = browser.eval("document.getElementById('messages').textContent")
        assert "sha256 does not match" in shown
    finally:
        s.close()
    bare = tmp_path / "no_manifest"
    shutil.copytree(bundle, bare)
    (bare / "bundle.json").unlink()
    s = Server(bare)
    try:
        rep = _open(browser, s.url)
        assert not rep["manifest"] and rep["precision"] == "int8"
        assert any("no bundle.json" in m["text"] for m in rep["messages"])
    finally:
        s.close()


def test_page_without_the_runtime_says_how_to_get_it(browser, bundle, tmp_path):
    bare = tmp_path / "no_runtime"
    shutil.copytree(bundle, bare)
    shutil.rmtree(bare / "web" / "ort")
    s = Server(bare)
    try:
        browser.navigate(s.url)
        assert "npm ci" in browser.eval("clipDemo.ready.then(() => 'loaded', e => e.message)")
        assert "npm ci" in browser.eval("document.getElementById('messages').textContent")
    finally:
        s.close()

"""Torch-free inference on an exported bundle: onnxruntime + numpy + Pillow only.

This module must never import torch (directly or through another module): it is what runs on the
device. ``tests/test_edge.py`` checks that in a fresh interpreter.

Bundle (a folder written by ``distill.bundle.write_bundle``; it stands alone on a device):
    edge.py                     launcher: ``python edge.py classify IMG...`` runs runtime/ on this folder
    runtime/distill/            this module and the torch-free modules it imports, copied from the package
    requirements.txt            onnxruntime, numpy, Pillow (``pip install -r requirements.txt``)
    README.md                   the commands, checksum verification and how a port checks itself
    image_encoder.onnx          "pixels" (B,3,S,S) float32 normalised -> "embedding" (B,D)
    image_encoder.int8.onnx     optional ORT dynamic int8 of the above
    text_encoder.onnx           optional "tokens" (B,L) int64 -> "embedding" (B,D)
    text_encoder.int8.onnx      optional ORT dynamic int8 of the above (used with precision int8)
    tokenizer/                  bpe_simple_vocab_16e6.txt.gz + tokenizer.json (context_length)
    class_embeddings.npy        (C,D) float32, L2-normalised rows (zero-shot classifier)
    labels.json                 C label strings
    preprocess.json             the preprocessing spec (distill.preprocess): size, mean, std,
                                interpolation, resize_mode and the rgb conversion rules
    golden.json, golden/        golden vectors: fixed texts -> token ids -> each text encoder's output,
                                fixed PNGs -> preprocessed pixels (golden/*.pixels.npy) -> each image
                                encoder's output, one input per run (``selftest`` recomputes them)
    web/                        the browser page (``serve``)
    bundle.json                 format_version, embed_dim, files {relative path: sha256}, producer
    SHA256SUMS                  every listed file and bundle.json, for ``sha256sum -c SHA256SUMS``

Preprocessing is ``distill.preprocess``, the same code the training and evaluation data go through,
following the bundle's preprocess.json: decode -> RGB (transparency composited on white, 16/32-bit
rescaled by range, huge images reduced) -> resize the shortest side to S (PIL bicubic) -> centre crop
S x S -> /255 -> (x - mean) / std. A preprocess.json without rgb rules (older bundles) gets the
project's rules, which are what every student was trained with.

Batching: with the int8 model images go through one at a time by default, because ORT's dynamic
int8 computes activation scales over the whole batch, so an image's scores would otherwise depend on
the other images in its batch; fp32 batches 16 by default. ``--batch-size`` overrides both. Texts
follow the same rule (int8 text encoder: one text per run; fp32: 64).

Precision: ``int8`` runs image_encoder.int8.onnx and, when the bundle has it, text_encoder.int8.onnx
(older bundles: the fp32 text encoder); ``fp32`` runs the fp32 files; ``auto`` is int8 for images when
the bundle has it and fp32 for text (see ``AUTO_TEXT_PRECISION``).

Classification scores are CLIP's: softmax over ``logit_scale * cosine`` (logit_scale from
bundle.json, 100 by default) across all labels; the raw cosine is reported next to each score.

CLI (exit codes: 0 all good, 1 some images could not be read (one stderr line each; the rest are
still processed) or a selftest value is off tolerance, 2 bad bundle or usage (one stderr line)):
    python -m distill.edge classify --bundle DIR [--precision auto|int8|fp32] [--top-k 5] [--batch-size N]
                                    [--json] IMAGE...
    python -m distill.edge embed --bundle DIR [--batch-size N] (--images IMG... | --texts TEXT...) -o out.npy
    python -m distill.edge serve DIR [--port 8765] [--host 127.0.0.1]   the bundle's browser page (web/)
    python -m distill.edge selftest --bundle DIR     recompute golden.json; exit 1 on a mismatch
From inside a bundle, ``python edge.py COMMAND ...`` is the same with --bundle (serve: DIR) defaulting to
the bundle's own folder.
"""

from __future__ import annotations

import argparse
import email.utils
import functools
import gzip
import http.server
import io
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill import onnx_tools
from distill import preprocess as _pre
from distill.errors import UserError, one_line
from distill.preprocess import preprocess_image  # noqa: F401 - the public name benchmarks import from here

SUPPORTED_FORMAT_VERSIONS = (1,)
TEXT_INT8_FILE = "text_encoder.int8.onnx"
# encoder file -> (input kind, precision); golden.json holds an output for each of these in the bundle
ENCODERS = {"image_encoder.onnx": ("image", "fp32"), "image_encoder.int8.onnx": ("image", "int8"),
            "text_encoder.onnx": ("text", "fp32"), TEXT_INT8_FILE: ("text", "int8")}
# auto keeps fp32 text: a prompt is embedded once and kept, so int8's faster text run rarely pays for its
# drift from fp32 (benchmarks/results/config_choices.md, "Edge runtime").
AUTO_TEXT_PRECISION = "fp32"
REBUILD_HINT = ("rebuild the bundle (re-run the export stage: python -m distill ... export.bundle=true, "
                "or distill.bundle.write_bundle) or copy the whole folder again")
FP32_BATCH_SIZE = 16
TEXT_FP32_BATCH_SIZE = 64
GOLDEN_FILE = "golden.json"
# selftest tolerances, also written into golden.json for ports: fp32 differs only by summation order, while
# int8 can move by a whole quantisation step on another CPU's kernels yet must stay above the int8-vs-fp32
# gap, so its floor lies between the two (benchmarks/results/config_choices.md, "Edge runtime").
GOLDEN_MIN_COSINE = {"fp32": 0.9999, "int8": 0.995}
# the Python runtime reproduces Pillow's pixels exactly, and 1.5 grey levels (/ 255 / std in golden.json)
# leaves a port's own bicubic room to round a level differently
GOLDEN_PIXEL_LEVELS = 1.5


class BundleError(UserError):
    """The bundle folder is missing, incomplete, modified or inconsistent. One line; exit code 2."""


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class Bundle:
    """A verified bundle with ONNX Runtime sessions (text session and tokenizer built on first use)."""

    path: Path
    meta: dict[str, Any]
    precision: str
    preprocess: dict[str, Any]
    labels: list[str]
    class_embeddings: np.ndarray  # (C, D)
    image_session: Any
    text_precision: str = "fp32"
    threads: int | None = None
    providers: Sequence[str] | None = None
    _text: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.meta.get("logit_scale", 100.0))

    @property
    def default_batch_size(self) -> int:
        # ORT's dynamic int8 quantizes activations with scales computed over the whole batch, so one
        # image per run is the only way an image's int8 scores do not depend on the other images.
        return 1 if self.precision == "int8" else FP32_BATCH_SIZE

    def load_image(self, path: str | Path) -> np.ndarray:
        """One image file -> (3, S, S) float32 normalised, exactly as the training/eval data are
        preprocessed (distill.preprocess). Raises on unreadable files."""
        return _pre.load_image(path, self.preprocess)

    def _embed_images(self, paths: Sequence[str | Path], batch_size: int | None = None
                      ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        batch_size = self.default_batch_size if batch_size is None else max(1, int(batch_size))
        rows: list[np.ndarray] = []
        ok: list[int] = []
        errors: list[tuple[str, str]] = []
        pending: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                out = self.image_session.run(None, {"pixels": np.stack(pending)})[0]  # (b, D)
                rows.append(_unit(out))
                pending.clear()

        for i, p in enumerate(paths):
            try:
                pending.append(self.load_image(p))
            except Exception as e:  # noqa: BLE001 - any decode failure is reported for that file only
                errors.append((str(p), one_line(e)))
                continue
            ok.append(i)
            if len(pending) == batch_size:
                flush()
        flush()
        emb = np.concatenate(rows) if rows else np.zeros((0, self.embed_dim), np.float32)
        return emb, ok, errors

    def embed_images(self, paths: Sequence[str | Path], batch_size: int | None = None
                     ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Image files -> ((N_ok, D) float32 L2-normalised, in input order of the readable files,
        [(path, reason), ...] for the files that could not be read). batch_size None: 1 for int8
        (scores independent of the other images), 16 for fp32."""
        emb, _, errors = self._embed_images(paths, batch_size)
        return emb, errors

    @property
    def text_file(self) -> str:
        return TEXT_INT8_FILE if self.text_precision == "int8" else "text_encoder.onnx"

    def _text_parts(self):
        if self._text is None:
            if self.text_file not in self.meta["files"]:
                raise BundleError(f"{self.path}: bundle has no {self.text_file}; rebuild it with text_onnx= "
                                  f"(text_int8_onnx= for int8)")
            from distill.tokenizer_np import NumpyTokenizer

            self._text = _session(self.path / self.text_file, self.threads, self.providers)
            self._tokenizer = NumpyTokenizer.from_dir(self.path / "tokenizer")
        return self._text, self._tokenizer

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """B strings -> (B, D) float32 L2-normalised, with the text encoder of ``text_precision``.
        batch_size None: 1 for int8 (a text's embedding does not depend on the others), 64 for fp32."""
        if batch_size is None:
            batch_size = 1 if self.text_precision == "int8" else TEXT_FP32_BATCH_SIZE
        batch_size = max(1, int(batch_size))
        sess, tok = self._text_parts()
        out = [sess.run(None, {"tokens": tok(list(texts[i:i + batch_size]))})[0]
               for i in range(0, len(texts), batch_size)]
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)

    def classify(self, paths: Sequence[str | Path], top_k: int = 5, batch_size: int | None = None
                 ) -> list[dict[str, Any]]:
        """Zero-shot top-k per image, one result per input path, in order. batch_size None: 1 for
        int8 (an image's scores do not depend on the other images), 16 for fp32.

        Each result: {"image", "top_k": [{"label", "score", "cosine"}, ...]} where score is the
        softmax over logit_scale * cosine across all labels; or {"image", "error"} if unreadable.
        """
        emb, ok, errors = self._embed_images(paths, batch_size)
        cos = np.zeros((len(emb), len(self.labels)), np.float32)  # (N_ok, C)
        for r, e in enumerate(emb):  # one matrix-vector product per image: BLAS may round (N, D) @ (D, C) by N
            cos[r] = self.class_embeddings @ e
        logits = self.logit_scale * cos
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        k = max(1, min(int(top_k), len(self.labels)))
        results: list[dict[str, Any]] = [{"image": str(p)} for p in paths]
        for row, i in enumerate(ok):
            order = np.argsort(-prob[row], kind="stable")[:k]
            results[i]["top_k"] = [{"label": self.labels[j], "score": float(prob[row, j]), "cosine": float(cos[row, j])}
                                   for j in order]
        err = dict(errors)
        for r in results:
            if "top_k" not in r:
                r["error"] = err.get(r["image"], "unreadable")
        return results


def _session(path: Path, threads: int | None, providers: Sequence[str] | None):
    try:
        return onnx_tools.session(path, threads, providers)
    except onnx_tools.OnnxFileError as e:
        raise BundleError(f"{e}; {REBUILD_HINT}") from None


def _read_manifest(root: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """bundle.json -> (meta, files, embed_dim), or BundleError naming what is wrong."""
    meta_path = root / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: not found, {root} is not a bundle; " + REBUILD_HINT)
    try:
        meta = json.loads(meta_path.read_text())
        files: dict[str, str] = meta["files"]
        embed_dim = int(meta["embed_dim"])
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{meta_path}: unreadable ({one_line(e)}); " + REBUILD_HINT) from None
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(f"{meta_path}: format_version {meta.get('format_version')!r} is not supported by this "
                          f"runtime (supports {SUPPORTED_FORMAT_VERSIONS}); update distill or " + REBUILD_HINT)
    for required in ("image_encoder.onnx", "class_embeddings.npy", "labels.json", "preprocess.json"):
        if required not in files:
            raise BundleError(f"bundle.json lists no {required}; " + REBUILD_HINT)
    return meta, files, embed_dim


def verify_files(root: str | Path, files: dict[str, str], check_sha256: bool = True) -> None:
    """Every listed file exists (and matches its sha256): the models, the runtime copy and the golden
    vectors alike. Raises BundleError naming the first file that does not."""
    for rel, digest in files.items():
        f = Path(root) / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle; " + REBUILD_HINT)
        if check_sha256 and onnx_tools.sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 does not match bundle.json (modified or partly copied); " + REBUILD_HINT)


def _precisions(precision: str, text_precision: str | None, files: dict[str, str]) -> tuple[str, str]:
    """(image precision, text precision) for a requested precision; older bundles without the int8 text
    encoder keep fp32 text under int8."""
    if precision not in ("auto", "int8", "fp32"):
        raise BundleError(f"unknown precision {precision!r}; use auto, int8 or fp32")
    image = ("int8" if "image_encoder.int8.onnx" in files else "fp32") if precision == "auto" else precision
    if text_precision is None:
        text_precision = AUTO_TEXT_PRECISION if precision == "auto" else precision
        if text_precision == "int8" and TEXT_INT8_FILE not in files:
            text_precision = "fp32"
    if text_precision not in ("int8", "fp32"):
        raise BundleError(f"unknown text precision {text_precision!r}; use int8 or fp32")
    return image, text_precision


def load_bundle(path: str | Path, precision: str = "auto", *, threads: int | None = None,
                providers: Sequence[str] | None = None, verify: bool = True,
                text_precision: str | None = None) -> Bundle:
    """Open and verify a bundle: every file listed in bundle.json exists and matches its sha256, and
    the embedding sizes (bundle.json, class_embeddings.npy, ONNX outputs) agree.

    precision: "int8" (image_encoder.int8.onnx, and text_encoder.int8.onnx when the bundle has it),
    "fp32" (the fp32 files) or "auto" (int8 images when the bundle has them, ``AUTO_TEXT_PRECISION``
    text). text_precision overrides the text side. Raises BundleError (one line naming the file and how
    to rebuild) otherwise.
    """
    root = Path(path)
    meta, files, embed_dim = _read_manifest(root)
    verify_files(root, files, verify)
    precision, text_precision = _precisions(precision, text_precision, files)
    image_file = "image_encoder.int8.onnx" if precision == "int8" else "image_encoder.onnx"
    if image_file not in files:
        raise BundleError(f"{root}: bundle has no {image_file}; use --precision fp32 or rebuild with int8 enabled")
    emb = np.load(root / "class_embeddings.npy").astype(np.float32)
    labels = json.loads((root / "labels.json").read_text())
    try:
        pre = _pre.check_spec(json.loads((root / "preprocess.json").read_text()))
    except (ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"{root / 'preprocess.json'}: {one_line(e)}; " + REBUILD_HINT) from None
    if emb.ndim != 2 or emb.shape[1] != embed_dim or emb.shape[0] != len(labels):
        raise BundleError(f"class_embeddings.npy shape {emb.shape} disagrees with embed_dim {embed_dim} and "
                          f"{len(labels)} labels; " + REBUILD_HINT)
    sess = _session(root / image_file, threads, providers)
    out_dim = sess.get_outputs()[0].shape[-1]
    if isinstance(out_dim, int) and out_dim != embed_dim:
        raise BundleError(f"{image_file}: output size {out_dim} != embed_dim {embed_dim}; " + REBUILD_HINT)
    if sess.get_inputs()[0].name != "pixels":
        raise BundleError(f"{image_file}: input is {sess.get_inputs()[0].name!r}, expected 'pixels'; " + REBUILD_HINT)
    return Bundle(path=root, meta=meta, precision=precision, preprocess=pre, labels=list(labels),
                  class_embeddings=_unit(emb), image_session=sess, text_precision=text_precision,
                  threads=threads, providers=providers)


# ---------------------------------------------------------------------------- golden vectors

def golden_inputs(root: str | Path, texts: Sequence[str], images: Sequence[str],
                  spec: dict[str, Any] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fixed texts and the bundle's golden images -> ((N, L) int64 token ids from the bundle's tokenizer,
    [(3, S, S) float32 normalised pixels per image, by the bundle's preprocess.json])."""
    from distill.tokenizer_np import NumpyTokenizer

    root = Path(root)
    if spec is None:
        spec = _pre.check_spec(json.loads((root / "preprocess.json").read_text()))
    tokens = NumpyTokenizer.from_dir(root / "tokenizer")(list(texts))
    return tokens, [_pre.load_image(root / rel, spec) for rel in images]


def golden_embeddings(root: str | Path, files: Sequence[str], tokens: np.ndarray, pixels: Sequence[np.ndarray],
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """Each encoder file's raw outputs (the towers L2-normalise): {file: (N, D) float32}, one input per
    run, because dynamic int8 scales activations over the whole batch and a port must be able to match."""
    out: dict[str, np.ndarray] = {}
    for rel in files:
        if rel not in ENCODERS:
            raise BundleError(f"{GOLDEN_FILE} names {rel!r}, which is not an encoder file; " + REBUILD_HINT)
        kind = ENCODERS[rel][0]
        sess = _session(Path(root) / rel, threads, None)
        inputs = [{"tokens": t[None]} for t in tokens] if kind == "text" else [{"pixels": p[None]} for p in pixels]
        out[rel] = np.stack([sess.run(None, feed)[0][0] for feed in inputs]).astype(np.float32)
    return out


def _check_tokens(golden: dict[str, Any], tokens: np.ndarray) -> tuple[bool, str]:
    bad = [t["text"] for t, got in zip(golden["texts"], tokens) if list(map(int, got)) != list(t["tokens"])]
    if bad:
        return False, f"tokens: {len(bad)} of {len(tokens)} texts differ from golden.json, first {bad[0]!r}"
    return True, f"tokens: {len(tokens)} texts, ids identical"


def _check_pixels(root: Path, golden: dict[str, Any], pixels: Sequence[np.ndarray]) -> list[tuple[bool, str]]:
    tol = float(golden["tolerance"]["pixels_max_abs"])
    lines = []
    for img, got in zip(golden["images"], pixels):
        want = np.load(root / img["pixels"]["file"])
        if want.shape != got.shape:
            lines.append((False, f"pixels {img['file']}: shape {got.shape} != golden {want.shape}"))
            continue
        d = float(np.abs(got - want).max())
        lines.append((d <= tol, f"pixels {img['file']}: max abs diff {d:.3g} (tol {tol:.3g})"))
    return lines


def _check_embeddings(golden: dict[str, Any], got: dict[str, np.ndarray]) -> list[tuple[bool, str]]:
    lines = []
    for rel, e in golden["embeddings"].items():
        want = np.asarray(e["rows"], np.float32)
        tol = float(golden["tolerance"]["min_cosine"][e["precision"]])
        if want.shape != got[rel].shape:
            lines.append((False, f"{rel}: output shape {got[rel].shape} != golden {want.shape}"))
            continue
        cos = float(np.min(np.sum(_unit(got[rel]) * _unit(want), axis=-1))) if len(want) else 1.0
        mad = float(np.abs(got[rel] - want).max()) if want.size else 0.0
        lines.append((cos >= tol, f"{rel} ({e['precision']}, {len(want)} {e['input']}): min cosine {cos:.7f} "
                                  f"(tol {tol}), max abs diff {mad:.2e}"))
    return lines


def selftest(bundle: str | Path, threads: int | None = None) -> tuple[bool, list[str]]:
    """Recompute the bundle's golden vectors with this runtime (tokenizer, preprocessing, every encoder
    file) and compare: (all passed, one line per check). Raises BundleError for a bundle that fails its
    sha256 check or has no golden.json."""
    b = load_bundle(bundle, "fp32", threads=threads)  # sha256 of every listed file, golden ones included
    if GOLDEN_FILE not in b.meta["files"]:
        raise BundleError(f"{b.path}: bundle has no {GOLDEN_FILE} (older bundle); " + REBUILD_HINT)
    try:
        golden = json.loads((b.path / GOLDEN_FILE).read_text())
        texts, images = [t["text"] for t in golden["texts"]], [i["file"] for i in golden["images"]]
        tokens, pixels = golden_inputs(b.path, texts, images, b.preprocess)
        checks = [_check_tokens(golden, tokens), *_check_pixels(b.path, golden, pixels)]
        got = golden_embeddings(b.path, list(golden["embeddings"]), tokens, pixels, threads)
        checks += _check_embeddings(golden, got)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise BundleError(f"{b.path / GOLDEN_FILE}: unreadable ({one_line(e)}); " + REBUILD_HINT) from None
    ok = all(c[0] for c in checks)
    lines = [f"{'ok  ' if passed else 'FAIL'} {line}" for passed, line in checks]
    failed = sum(not c[0] for c in checks)
    lines.append(f"selftest {'passed' if ok else 'FAILED'}: {len(checks) - failed} of {len(checks)} checks "
                 f"against {GOLDEN_FILE}")
    return ok, lines


# ---------------------------------------------------------------------------- serve

# wasm threads need SharedArrayBuffer, which browsers give only to cross-origin isolated pages
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}
COMPRESSIBLE = (".wasm", ".onnx", ".mjs", ".js", ".html", ".json", ".npy")  # not the tokenizer's .gz


def _inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path``, every symlink resolved, lies inside ``root``'s real folder."""
    root, real = os.path.realpath(root), os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class _BundleHandler(http.server.SimpleHTTPRequestHandler):
    """Static files of a bundle with the COOP/COEP headers wasm threads need, gzip for browsers that
    take it (compressed once per file version and kept), ``/`` redirected to the page."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".npy": "application/octet-stream"}
    gzipped: dict[str, tuple[int, bytes]] = {}
    lock = threading.Lock()

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        self.send_header("Cache-Control", "no-cache")  # a rebuilt bundle is picked up on reload
        super().end_headers()

    def _not_modified(self, st: os.stat_result) -> bool:
        since = self.headers.get("If-Modified-Since")
        try:
            return bool(since) and int(st.st_mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False

    def send_head(self):
        path = self.translate_path(self.path)  # http.server has dropped '..', but not symlinks
        # a folder is served as its index.html (or a listing), so that file is what must stay inside
        if not _inside(self.directory, os.path.join(path, "index.html") if os.path.isdir(path) else path):
            self.send_error(404, "File not found")  # as for a missing file: nothing about what lies outside
            return None
        if (not os.path.isfile(path) or Path(path).suffix not in COMPRESSIBLE
                or "gzip" not in self.headers.get("Accept-Encoding", "")):
            return super().send_head()
        st = os.stat(path)
        if self._not_modified(st):
            self.send_response(304)
            self.end_headers()
            return None
        with self.lock:  # one compression per file version, however many requests come at once
            cached = self.gzipped.get(path)
            if cached is None or cached[0] != st.st_mtime_ns:
                cached = self.gzipped[path] = (st.st_mtime_ns, gzip.compress(Path(path).read_bytes(), 6, mtime=0))
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(cached[1])))
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        self.send_header("Vary", "Accept-Encoding")
        self.end_headers()
        return io.BytesIO(cached[1])

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] in ("", "/"):
            self.send_response(302)
            self.send_header("Location", "/web/")
            self.end_headers()
            return
        super().do_GET()

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if str(code).isdigit() and int(code) >= 400:  # only failures: a page load is ~20 requests
            super().log_request(code, size)


def _symlink_warning(root: Path) -> str | None:
    """One line when the bundle holds symlinks (a copy made without dereferencing them), else None."""
    links, outside = [], []
    for folder, dirs, files in os.walk(root):  # does not descend into linked folders
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                rel = os.path.relpath(path, root)
                links.append(rel)
                if not _inside(root, path):
                    outside.append(rel)
    if not links:
        return None
    where = f"{len(outside)} of them lead outside it and are not served (e.g. {outside[0]})" if outside else \
        "all resolve inside it"
    return (f"warning: {root} holds {len(links)} symlink{'s' * (len(links) != 1)} (e.g. {links[0]}); {where}: "
            f"copy the bundle with cp -rL (or rsync -L) so it holds real files")


def serving_line(root: Path, host: str, port: int) -> str:
    """The line ``serve`` prints: the address the server really listens on, and how to open the page."""
    if host in ("", "0.0.0.0"):
        return (f"serving {root} at http://0.0.0.0:{port}/web/ (every network interface: open "
                f"http://127.0.0.1:{port}/web/ here or this machine's address elsewhere; Ctrl-C stops)")
    return f"serving {root} at http://{host}:{port}/web/ (Ctrl-C stops)"


def serve(bundle: str | Path, port: int = 8765, host: str = "127.0.0.1") -> int:
    """Serve a bundle folder over HTTP for its browser page (bundle/web/index.html) with the COOP/COEP
    headers that wasm threads need, gzip-compressed for browsers that take it (the wasm runtime and the
    models shrink by a half to three quarters). Prints one line with the page's URL (port 0 picks a
    free port); runs until interrupted. Raises BundleError when the folder has no page. Only files whose
    real path (symlinks resolved) lies inside the bundle are served; one stderr line warns of symlinks."""
    root = Path(bundle).resolve()
    if not (root / "web" / "index.html").is_file():
        raise BundleError(f"{root}: no web/index.html, so no browser page to serve; " + REBUILD_HINT)
    try:
        server = http.server.ThreadingHTTPServer((host, port), functools.partial(_BundleHandler, directory=str(root)))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    warning = _symlink_warning(root)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(serving_line(root, *server.server_address[:2]), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ---------------------------------------------------------------------------- CLI

BATCH_HELP = ("images (or texts) per ONNX run (default: 1 with an int8 model, because dynamic int8 computes its "
              "activation scales over the whole batch and an image's scores would change with the other "
              "images; 16 images or 64 texts with fp32)")


def _parser(default_bundle: str | None = None, prog: str = "python -m distill.edge") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    where = {"required": True} if default_bundle is None else {"default": default_bundle,
                                                                "help": "default: this bundle (%(default)s)"}
    c = sub.add_parser("classify", help="zero-shot top-k labels per image (softmax over logit_scale * cosine)")
    c.add_argument("--bundle", **where)
    c.add_argument("--precision", default="auto", choices=["auto", "int8", "fp32"])
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    c.add_argument("--json", action="store_true", help="one JSON object per image (JSON Lines)")
    c.add_argument("images", nargs="+")
    e = sub.add_parser("embed", help="L2-normalised embeddings to a .npy file (readable inputs only, in order)")
    e.add_argument("--bundle", **where)
    e.add_argument("--precision", default="auto", choices=["auto", "int8", "fp32"],
                   help="auto: int8 images when the bundle has them, fp32 text; int8: int8 text too when present")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None, help=BATCH_HELP)
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", nargs="+")
    g.add_argument("--texts", nargs="+")
    e.add_argument("-o", "--output", required=True)
    s = sub.add_parser("serve", help="serve the bundle's browser page (web/) locally, with the COOP/COEP headers "
                                     "wasm threads need")
    s.add_argument("bundle", **({} if default_bundle is None else {"nargs": "?", "default": default_bundle}))
    s.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    s.add_argument("--host", default="127.0.0.1")
    t = sub.add_parser("selftest", help=f"recompute the bundle's golden vectors ({GOLDEN_FILE}) with this runtime; "
                                        "exit 1 when one is off tolerance")
    t.add_argument("--bundle", **where)
    t.add_argument("--threads", type=int, default=None)
    return p


def _classify(bundle: Bundle, args: argparse.Namespace) -> int:
    failed = 0
    for r in bundle.classify(args.images, top_k=args.top_k, batch_size=args.batch_size):
        if "error" in r:
            failed += 1
            print(f"error: {r['image']}: {r['error']}", file=sys.stderr)
        elif args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"{r['image']}: " + ", ".join(f"{t['label']} {t['score']:.4f}" for t in r["top_k"]))
    return 1 if failed else 0


def _embed(bundle: Bundle, args: argparse.Namespace) -> int:
    failed = 0
    if args.images:
        emb, errors = bundle.embed_images(args.images, batch_size=args.batch_size)
        for p, why in errors:
            print(f"error: {p}: {why}", file=sys.stderr)
        failed = len(errors)
        bad = {p for p, _ in errors}
        rows = [p for p in args.images if p not in bad]
    else:
        emb, rows = bundle.embed_texts(args.texts, batch_size=args.batch_size), list(args.texts)
    np.save(args.output, emb)
    Path(str(args.output) + ".json").write_text(json.dumps({"rows": rows}, ensure_ascii=False))
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output} (row order in {args.output}.json)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None, default_bundle: str | Path | None = None,
         prog: str = "python -m distill.edge") -> int:
    """CLI entry; returns the exit code (0 ok, 1 some images unreadable or a selftest mismatch, 2 bad
    bundle/usage). default_bundle (the bundle's own edge.py launcher passes its folder) makes --bundle
    optional."""
    try:
        args = _parser(None if default_bundle is None else str(default_bundle), prog).parse_args(argv)
    except SystemExit as e:  # argparse prints its own one-line usage error
        return 2 if e.code else 0
    try:
        if args.cmd == "serve":
            return serve(args.bundle, args.port, args.host)
        if args.cmd == "selftest":
            ok, lines = selftest(args.bundle, threads=args.threads)
            print("\n".join(lines))
            return 0 if ok else 1
        bundle = load_bundle(args.bundle, args.precision, threads=args.threads)
        return _classify(bundle, args) if args.cmd == "classify" else _embed(bundle, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

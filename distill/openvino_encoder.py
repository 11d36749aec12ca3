"""OpenVINO's CPU runtime behind the ONNX dual encoder's interface: the same exported files,
preprocessing and tokenizer as ``OnnxDualEncoder``, run by ``openvino.Core().compile_model``.

openvino is imported when an encoder is built, so the rest of the package works without it; a
file OpenVINO cannot convert or run raises ``OpenVinoFileError``, one line naming the file and
OpenVINO's reason (its messages carry several lines of source locations first).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from distill.errors import UserError
from distill.teachers.onnx_teacher import OnnxDualEncoder

__all__ = ["OpenVinoDualEncoder", "OpenVinoFileError", "openvino_module", "reason"]


class OpenVinoFileError(UserError):
    """OpenVINO cannot convert or run an ONNX file. One line naming the file and the reason."""


def openvino_module() -> Any:
    """The ``openvino`` package, or a one-line UserError that names the install command."""
    try:
        import openvino
    except ImportError as e:
        raise UserError(f"the OpenVINO runtime is not installed ({e}); pip install openvino") from None
    return openvino


_NOISE = re.compile(r"Exception from \S+:\d+:|Check '.*?' failed at \S+:\d+:|FrontEnd API failed with \w+:|"
                    r"Model wasn't fully converted\.|Failed operations detailed log:|-- ")


def reason(err: BaseException) -> str:
    """OpenVINO's message on one line, at most 300 characters: its summary first ("Conversion is
    failed for: Op-N"), then the detail, without the source locations it prefixes every step with."""
    text, _, summary = str(err).partition("Summary:")

    def clean(part: str) -> str:
        return " ".join(_NOISE.sub(" ", part).split())

    detail = clean(text)
    out = f"{clean(summary)} ({detail})" if clean(summary) and detail else clean(summary) or detail
    return (out or type(err).__name__)[:300]


class _CompiledFile:
    """One ONNX file compiled for OpenVINO's CPU plugin, with the two calls of an onnxruntime
    session that OnnxDualEncoder makes (``run`` and ``get_inputs``)."""

    def __init__(self, core: Any, path: Path, threads: int | None, inputs: Sequence[Any]) -> None:
        # f32: on CPUs with bf16 (AVX512_BF16, AMX) OpenVINO would otherwise run the fp32 file in bf16;
        # LATENCY: one stream, the single-request setting onnxruntime's session is measured in.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.path, self._inputs = path, list(inputs)
        try:
            self._model = core.compile_model(str(path), "CPU", config)
            self._request = self._model.create_infer_request()
        except Exception as e:
            raise OpenVinoFileError(f"OpenVINO cannot run {path.name}: {reason(e)}") from None
        self._output = self._model.output(0)

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def run(self, _names: Any, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feed.values()
        try:
            out = self._request.infer([x])  # share_outputs=False (the default): the result is a copy
        except Exception as e:
            raise OpenVinoFileError(f"OpenVINO failed running {self.path.name}: {reason(e)}") from None
        return [np.asarray(out[self._output])]


class OpenVinoDualEncoder(OnnxDualEncoder):
    """``OnnxDualEncoder`` (same arguments, files, preprocessing, tokenizer, stats) whose two files
    run on OpenVINO's CPU plugin with ``threads`` inference threads (None: OpenVINO's choice)."""

    def __init__(self, bundle: str | Path | None = None, image_onnx: str | Path | None = None,
                 text_onnx: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                 preprocess: dict[str, Any] | None = None, logit_scale: float = 100.0,
                 threads: int | None = None, precision: str = "fp32") -> None:
        ov = openvino_module()  # before any work, so a missing package is the first and only error
        # the parent reads the files' inputs, preprocessing and tokenizer through one-thread
        # onnxruntime sessions, which are then replaced by the compiled files
        super().__init__(bundle=bundle, image_onnx=image_onnx, text_onnx=text_onnx, tokenizer_dir=tokenizer_dir,
                         preprocess=preprocess, logit_scale=logit_scale, threads=1, precision=precision)
        core = ov.Core()
        self._img = _CompiledFile(core, self.image_onnx, threads, self._img.get_inputs())
        self._txt = _CompiledFile(core, self.text_onnx, threads, self._txt.get_inputs())
        self.name = f"openvino:{self.image_onnx.name}"
        self.openvino_version = str(ov.__version__)
        # another runtime computes slightly different numbers: its teacher cache must not be the ORT one
        self.fingerprint = hashlib.sha256(f"{self.fingerprint}:openvino".encode()).hexdigest()[:16]

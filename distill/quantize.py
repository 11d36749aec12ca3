"""int8 variants: ORT dynamic and static (QDQ) quantisation of ONNX files, and torch dynamic int8.

The int8 ONNX route is export fp32 -> quantise the file with onnxruntime.quantization: a
torch.ao-quantised model cannot be exported by either exporter (pytorch/pytorch#123555).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

DYNAMIC_MODES = ("s8_per_channel_reduce_range", "u8u8", "s8")
# The file is built once for CPUs we do not know: 7-bit weights stay exact on AVX2 without VNNI, where
# plain "s8" saturates, and s8 weights are near the fastest on VNNI, whose kernels take u8 x s8 only
# (onnxruntime's advice for x86). Plain "s8" suits targets that all have VNNI or ARM dot-product
# instructions (export.int8.mode). Measurements: benchmarks/results/config_choices.md, "int8 mode".
DEFAULT_DYNAMIC_MODE = "s8_per_channel_reduce_range"


class QuietRoot:
    """onnxruntime's quantizer logs every skipped MatMul through the *root* logger at INFO, which
    buries the run log; hold the root logger at WARNING while it runs."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(max(self.level, logging.WARNING))

    def __exit__(self, *exc) -> None:
        logging.getLogger().setLevel(self.level)


def pre_process(src: Path, dst: Path) -> None:
    """ORT's recommended pre-processing (shape inference, graph optimisation) before quantising.

    skip_symbolic_shape=True: the symbolic shape inference fails on the dynamic batch axis.
    """
    from onnxruntime.quantization import quant_pre_process

    with QuietRoot():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_dynamic_onnx(src: str | Path, dst: str | Path, mode: str = DEFAULT_DYNAMIC_MODE,
                          op_types: Sequence[str] | None = None) -> Path:
    """ORT dynamic int8 (weights int8 offline, activations quantised per call) of an ONNX file.

    mode: "s8_per_channel_reduce_range" (QInt8 weights, per-channel, reduce_range: safe on AVX2
    without VNNI), "u8u8" (QUInt8 weights) or "s8" (plain QInt8; saturates on AVX2 without VNNI).
    op_types: the ONNX ops to quantise (default: onnxruntime's, which include Conv).
    Input/output names and shapes are unchanged: (B, ...) -> (B, D).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if mode not in DYNAMIC_MODES:
        from distill.errors import UserError

        raise UserError(f"unknown int8 mode {mode!r}; use one of {', '.join(DYNAMIC_MODES)}")
    kw = {
        "s8_per_channel_reduce_range": dict(weight_type=QuantType.QInt8, per_channel=True, reduce_range=True),
        "u8u8": dict(weight_type=QuantType.QUInt8, per_channel=False, reduce_range=False),
        "s8": dict(weight_type=QuantType.QInt8, per_channel=False, reduce_range=False),
    }[mode]
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(src, pre)
        with QuietRoot():
            quantize_dynamic(str(pre), str(dst), nodes_to_exclude=_standard_attention_nodes(pre),
                             **({"op_types_to_quantize": list(op_types)} if op_types else {}), **kw)
    return dst


def _standard_attention_nodes(path: Path) -> list[str]:
    """Names of ONNX-domain ``Attention`` nodes (opset 23+, what the exporter makes of SDPA there).

    onnxruntime's quantizer (1.32) takes every node typed "Attention" for its contrib op and turns
    it into com.microsoft QAttention, copying attributes QAttention does not have (``is_causal``):
    the file then fails to load. Left in float, the fused attention still runs; the projections
    around it (MatMul/Gemm) are quantised as usual.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


class ArrayReader:
    """onnxruntime CalibrationDataReader over an iterable of input batches."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self.input_name = input_name
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        self.count += 1
        return {self.input_name: np.ascontiguousarray(x)}

    def rewind(self) -> None:  # a one-pass reader: ORT's calibrators read each batch once
        pass


def quantize_static_onnx(src: str | Path, dst: str | Path, calibration: Iterable[np.ndarray],
                         input_name: str = "pixels", method: str = "minmax",
                         op_types: tuple[str, ...] | str = ("MatMul", "Gemm", "Conv"),
                         per_channel: bool = True, reduce_range: bool = True, fp32_first_convs: int = 0) -> Path:
    """ORT static int8 in QDQ format, activation ranges calibrated on ``calibration`` batches.

    calibration: arrays shaped like the model input, e.g. (B, 3, S, S) float32 normalised pixels
    (drawn by the pipeline from the configured data). method: "minmax" | "percentile" | "entropy".
    Activations are uint8, weights int8 per-channel with reduce_range (the U8S8 pairing ORT
    recommends on x86; reduce_range keeps AVX2 without VNNI from saturating). Only MatMul, Gemm
    and Conv are quantised by default: LayerNorm/Softmax/GELU stay fp32, where int8 costs accuracy
    for little speed.

    op_types="all": every op type onnxruntime can quantise (its QLinear and QDQ registries: also
    Add, Mul, Relu, Clip, Sigmoid, pooling, Concat...), so a conv tower's tensors stay int8 from one
    convolution to the next instead of passing through a DequantizeLinear/QuantizeLinear pair at
    each residual Add; ORT then runs QLinearConv/QLinearAdd chains. fp32_first_convs: leave the
    first N Conv nodes (graph order, after pre-processing) fp32, e.g. 2 for the stem and the first
    block's convolution at full resolution, where int8 costs the most accuracy. For ReLU/ReLU6 conv
    towers (MobileNetV4, EfficientNet-Lite0) ``op_types="all", fp32_first_convs=2`` was 1.6-1.9x
    faster than dynamic int8 at batch 1 with cosine >= 0.995 to fp32; HardSwish/GELU towers and
    ViTs stayed faster with dynamic int8 (benchmarks/results/int8_static_opsets.md).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        from distill.errors import UserError

        raise UserError(f"unknown calibration method {method!r}; use one of {', '.join(methods)}")
    it = iter(calibration)
    first = next(it, None)
    if first is None:
        from distill.errors import UserError

        raise UserError("static int8 got no calibration batches; set export.int8.calibration_images > 0")
    if isinstance(op_types, str) and op_types != "all":
        from distill.errors import UserError

        raise UserError(f"op_types {op_types!r}: give a list of ONNX op types or \"all\"")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = ArrayReader(itertools.chain([first], it), input_name)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        pre_process(src, pre)
        keep = _first_convs(pre, int(fp32_first_convs))
        with QuietRoot():
            # op_types_to_quantize=None: every op type onnxruntime quantises (QLinear + QDQ registries)
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, nodes_to_exclude=keep,
                            op_types_to_quantize=None if op_types == "all" else list(op_types),
                            per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], extra_options={"CalibTensorRangeSymmetric": False})
    log.info("static QDQ int8 of %s calibrated on %d batches (%s)", src.name, reader.count, method)
    return dst


def _first_convs(path: Path, n: int) -> list[str]:
    """Names of the first ``n`` Conv nodes of an ONNX file, in graph order (named first when unnamed)."""
    if n <= 0:
        return []
    import onnx

    model = onnx.load(str(path))
    convs = [node for node in model.graph.node if node.op_type == "Conv"][:n]
    if any(not node.name for node in convs):  # nodes_to_exclude matches by name
        for i, node in enumerate(model.graph.node):
            node.name = node.name or f"_node_{i}_{node.op_type}"
        onnx.save(model, str(path))
    return [node.name for node in convs]


def torch_dynamic_int8(model):
    """torch dynamic int8 of every nn.Linear (a copy; PyTorch deployment only, not exportable to ONNX).

    open_clip's attention keeps fp32: nn.MultiheadAttention's in-projection is a raw parameter,
    and its out_proj is a NonDynamicallyQuantizableLinear, which quantize_dynamic skips by design
    (the fused attention reads ``out_proj.weight`` as a tensor, which a quantised Linear lacks).
    So only the MLPs, and the projections that are nn.Linear, are int8.

    torch.ao.quantization is deprecated in favour of torchao (not installed here); its
    DeprecationWarning and the quantised-tensor deprecation UserWarning are silenced in this call
    only, so the rest of the program still sees other warnings.
    """
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.quantize_per_tensor.*deprecated.*")
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    # open_clip's text tower asks resblocks[0].mlp.c_fc.weight.dtype for its cast dtype; on a
    # quantised Linear ``weight`` is a method, so encode_text would raise. open_clip reads
    # ``int8_original_dtype`` first (its hook for int8 Linears): activations here stay fp32.
    for mod in q.modules():
        if type(mod).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            mod.int8_original_dtype = torch.float32
    return q.eval()

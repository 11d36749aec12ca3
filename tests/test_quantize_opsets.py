"""distill.quantize.quantize_static_onnx's op set options on a tiny conv tower: op_types="all" keeps the
tensors int8 between convolutions (fewer Q/DQ nodes left after ORT's fusions), fp32_first_convs leaves
the stem fp32; the defaults are unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from distill.errors import UserError
from distill.quantize import quantize_static_onnx


class TinyConvTower(nn.Module):
    """Stem conv + BN + ReLU6, a residual depthwise/pointwise block, global pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyConvTower().eval()
    path = tmp_path_factory.mktemp("opsets") / "tower.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(path), input_names=["pixels"],
                          output_names=["embedding"], dynamo=False, opset_version=17,
                          dynamic_axes={"pixels": {0: "batch"}})
    return path


def _calib():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(2, 3, 32, 32)).astype(np.float32) for _ in range(4)]


def _run(path, x, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _qdq_left(path):
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)


def test_all_ops_keeps_add_int8_and_leaves_fewer_qdq(fp32, tmp_path):
    default = quantize_static_onnx(fp32, tmp_path / "default.onnx", _calib())
    every = quantize_static_onnx(fp32, tmp_path / "all.onnx", _calib(), op_types="all")
    x = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    ref = _run(fp32, x)
    for path in (default, every):
        assert _cos(_run(path, x), ref).min() > 0.98

    def add_quantised(path):  # is the residual Add's output quantised (a QuantizeLinear reads it)?
        g = onnx.load(str(path)).graph
        add = next(n for n in g.node if n.op_type == "Add")
        return any(n.op_type == "QuantizeLinear" and add.output[0] in n.input for n in g.node)

    assert not add_quantised(default)  # the default still quantises Conv/MatMul/Gemm only
    assert add_quantised(every)
    # ORT fuses DQ -> Add -> Q into QLinearAdd: fewer Q/DQ pairs remain in the optimised graph
    _run(default, x[:1], optimized=tmp_path / "default.opt.onnx")
    _run(every, x[:1], optimized=tmp_path / "all.opt.onnx")
    assert _qdq_left(tmp_path / "all.opt.onnx") < _qdq_left(tmp_path / "default.opt.onnx")


def test_fp32_first_convs_leaves_the_stem_float(fp32, tmp_path):
    dst = quantize_static_onnx(fp32, tmp_path / "skip.onnx", _calib(), op_types="all", fp32_first_convs=1)
    g = onnx.load(str(dst)).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == 3
    assert convs[0].input[1] in inits  # the stem's weight stays a float initializer
    assert all(producers.get(c.input[1]) == "DequantizeLinear" for c in convs[1:])  # the others int8
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    assert _cos(_run(dst, x), _run(fp32, x)).min() > 0.98


def test_op_types_string_must_be_all(fp32, tmp_path):
    with pytest.raises(UserError, match="op_types"):
        quantize_static_onnx(fp32, tmp_path / "bad.onnx", _calib(), op_types="Conv")


def test_the_pipeline_static_variant_takes_the_op_set_from_the_config(tmp_path):
    """export.int8.static_op_types / static_fp32_first_convs reach student_onnx_static_int8 of a conv student."""
    import json

    from hydra import compose, initialize_config_dir

    from distill.pipeline import run
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+experiment=smoke", "student=tiny_timm", f"out_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}",
            "train.steps=2", "export.bundle=false", "export.int8.static_op_types=all",
            "export.int8.static_fp32_first_convs=2", "bench.repeats=1", "bench.rounds=1", "bench.warmup=0",
            "bench.batch_sizes=[1]", "bench.settle_s=0.0", "++bench.ceilings=false",
            "variants=[teacher_torch_fp32,student_onnx_fp32,student_onnx_int8,student_onnx_static_int8]"])
    run(cfg)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["variants"]["student_onnx_static_int8"]["status"] == "ok", report["variants"]["student_onnx_static_int8"]
    model = onnx.load(str(tmp_path / "run" / "export" / "onnx" / "image_encoder.static_int8.onnx"))
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) > 2
    # the first two convolutions read fp32 weights (no DequantizeLinear), the later ones int8 ones
    assert all(produced_by.get(c.input[1]) != "DequantizeLinear" for c in convs[:2])
    assert all(produced_by.get(c.input[1]) == "DequantizeLinear" for c in convs[2:])
    assert any(n.op_type == "QuantizeLinear" and produced_by.get(n.input[0]) == "Add" for n in model.graph.node) or \
        sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > len(convs)  # beyond the convs: "all" ops

"""distill.quantize: ORT dynamic modes, static QDQ with calibration, torch dynamic int8."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch

from distill.errors import UserError
from distill.export import export_onnx, random_inputs
from distill.quantize import DYNAMIC_MODES, quantize_dynamic_onnx, quantize_static_onnx, torch_dynamic_int8

CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=32),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    out = tmp_path_factory.mktemp("q")
    # legacy exporter: 20x faster for a test fixture; the dynamo path is covered in test_export
    info = export_onnx(model, out, image_size=32, context_length=16, exporter="legacy")
    return model, info


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("mode", DYNAMIC_MODES)
def test_dynamic_modes(fp32, tmp_path, mode):
    _, info = fp32
    x = random_inputs("image", 4, image_size=32, seed=3)
    t = open_clip.tokenize(["a cat", "a photo of a dog", "", "red car on a road"], context_length=16).numpy()
    for kind, inp in (("image", x), ("text", t)):
        dst = quantize_dynamic_onnx(info[kind]["path"], tmp_path / f"{kind}.int8.onnx", mode=mode)
        assert "DynamicQuantizeLinear" in _ops(dst) or "MatMulInteger" in _ops(dst)
        ref, got = _run(info[kind]["path"], inp), _run(dst, inp)
        assert got.shape == ref.shape
        assert _cos(got, ref).min() > 0.99, (kind, mode, _cos(got, ref))


def test_dynamic_int8_is_smaller_and_default_mode(fp32, tmp_path):
    _, info = fp32
    dst = quantize_dynamic_onnx(info["image"]["path"], tmp_path / "image.int8.onnx")
    from pathlib import Path

    assert dst.stat().st_size < 0.5 * Path(info["image"]["path"]).stat().st_size
    # the default (s8_per_channel_reduce_range): int8 weights, one scale per output channel, and
    # reduce-range values in [-64, 64] (onnxruntime's 7-bit range), which is what keeps the pairwise u8 x s8
    # sums within 16 bits (2 x 255 x 64 = 32640) on AVX2 CPUs without VNNI
    inits = {i.name: i for i in onnx.load(str(dst)).graph.initializer}
    weights = [n for n in inits if n.endswith("_quantized")]
    assert weights
    for n in weights:
        assert inits[n].data_type == onnx.TensorProto.INT8, n
        w = onnx.numpy_helper.to_array(inits[n])
        assert int(np.abs(w.astype(np.int32)).max()) <= 64, (n, w.min(), w.max())
        scale = inits[n[: -len("_quantized")] + "_scale"]
        assert list(scale.dims) == [w.shape[-1]], (n, list(scale.dims))
    with pytest.raises(UserError, match="unknown int8 mode"):
        quantize_dynamic_onnx(info["image"]["path"], tmp_path / "bad.onnx", mode="int4")


def test_static_qdq_with_calibration(fp32, tmp_path):
    _, info = fp32
    calib = [random_inputs("image", 2, image_size=32, seed=s) for s in range(4)]
    dst = quantize_static_onnx(info["image"]["path"], tmp_path / "image.static.onnx", calib)
    ops = _ops(dst)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = random_inputs("image", 3, image_size=32, seed=99)
    assert _cos(_run(dst, x), _run(info["image"]["path"], x)).min() > 0.98
    with pytest.raises(UserError, match="no calibration batches"):
        quantize_static_onnx(info["image"]["path"], tmp_path / "empty.onnx", [])


def test_torch_dynamic_int8(fp32):
    model, _ = fp32
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the torch.ao deprecation is handled inside
        q = torch_dynamic_int8(model)
    blk = q.visual.transformer.resblocks[0]
    assert type(blk.mlp.c_fc).__module__.startswith("torch.ao.nn.quantized.dynamic")
    # MHA out_proj is NonDynamicallyQuantizableLinear: left in fp32 so the fused attention still works
    assert type(blk.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert type(model.visual.transformer.resblocks[0].mlp.c_fc) is torch.nn.Linear  # the original is untouched
    x = torch.from_numpy(random_inputs("image", 2, image_size=32, seed=5))
    tok = open_clip.tokenize(["a cat", "a dog"], context_length=16)
    with torch.no_grad():
        for a, b in ((q.encode_image(x), model.encode_image(x)), (q.encode_text(tok), model.encode_text(tok))):
            assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_dynamic_int8_of_an_opset23_export_keeps_the_fused_attention(tmp_path):
    """At opset 23 the exporter writes SDPA as ONNX Attention; ORT's quantizer would turn that into a
    contrib QAttention that cannot load. The attention stays float; the projections become int8."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    info = export_onnx(model, tmp_path, image_size=32, context_length=16, opset=23, towers=("image",),
                       attention="native")  # matmul (the default) writes no Attention node
    assert "Attention" in _ops(info["image"]["path"])
    dst = quantize_dynamic_onnx(info["image"]["path"], tmp_path / "image.int8.onnx")
    ops = _ops(dst)
    assert "Attention" in ops and "QAttention" not in ops and "MatMulInteger" in ops
    x = random_inputs("image", 3, image_size=32, seed=1)
    assert _cos(_run(dst, x), _run(info["image"]["path"], x)).min() > 0.99

"""distill.export: open_clip local-dir round trip, self-checked ONNX export, broken-parity detection."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
from onnx import numpy_helper

from distill.errors import ExportCheckError
from distill.export import check_onnx_file, export_onnx, random_inputs, save_open_clip_dir, ImageTower

CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=16, image_size=32),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408))


def _tiny(seed: int = 0, **extra) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**CFG, **extra).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny()
    out = tmp_path_factory.mktemp("onnx")
    return model, out, export_onnx(model, out, image_size=32, context_length=16)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_dir_reloads_bit_exactly(tmp_path, quick_gelu):
    model = _tiny(quick_gelu=quick_gelu)
    cfg = {**CFG, "quick_gelu": quick_gelu}
    d = save_open_clip_dir(model, cfg, tmp_path / "oc")
    meta = json.loads((d / "open_clip_config.json").read_text())
    assert meta["model_cfg"] == json.loads(json.dumps(cfg)) and meta["preprocess_cfg"]["size"] == 32
    again, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(d))
    again.eval()
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 32, 32)
    tok = open_clip.get_tokenizer("local-dir:" + str(d))(["a cat", "a dog"])
    assert tok.shape == (2, 16)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))
        assert torch.equal(model.encode_text(tok), again.encode_text(tok))
    # the activation really round-trips (QuickGELU vs GELU changes outputs: open_clip#771)
    assert type(again.visual.transformer.resblocks[0].mlp.gelu).__name__ == ("QuickGELU" if quick_gelu else "GELU")
    assert preprocess.transforms[0].size == 32


def test_onnx_parity_numbers_and_embedded_weights(exported):
    _, out, info = exported
    for kind in ("image", "text"):
        r = info[kind]
        assert r["path"] == str(out / f"{kind}_encoder.onnx")
        assert r["opset"] == 20 and r["exporter"] == "dynamo"
        assert 0.9999 <= r["min_cosine"] <= 1.0 + 1e-6 and 0 <= r["max_abs_err"] < 1e-4
        m = onnx.load(r["path"], load_external_data=False)
        assert not any(i.external_data for i in m.graph.initializer)  # weights inside the file
        assert [o.name for o in m.graph.output] == ["embedding"]
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx", "text_encoder.onnx"]


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(exported, batch):
    model, out, _ = exported
    img = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    x = random_inputs("image", batch, image_size=32, seed=7)
    t = open_clip.tokenize([f"photo number {i}" for i in range(batch)], context_length=16).numpy()
    gi, gt = img.run(None, {"pixels": x})[0], txt.run(None, {"tokens": t})[0]
    with torch.no_grad():
        ri = torch.nn.functional.normalize(model.encode_image(torch.from_numpy(x)), dim=-1).numpy()
        rt = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(t)), dim=-1).numpy()
    assert gi.shape == (batch, 32) and gt.shape == (batch, 32)
    np.testing.assert_allclose(gi, ri, atol=1e-5)
    np.testing.assert_allclose(gt, rt, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(gi, axis=-1), 1.0, atol=1e-5)


def test_corrupted_weight_fails_parity_with_one_line(exported, tmp_path):
    model, out, _ = exported
    m = onnx.load(str(out / "image_encoder.onnx"))
    big = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)) if i.data_type == onnx.TensorProto.FLOAT else 0)
    w = numpy_helper.to_array(big).copy()
    w.flat[: w.size // 2] *= -3.0  # a corrupted half of the largest weight matrix
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    bad = tmp_path / "image_encoder.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ExportCheckError) as e:
        check_onnx_file(bad, ImageTower(model).eval(), "image", image_size=32)
    msg = str(e.value)
    assert "\n" not in msg and "image_encoder.onnx" in msg and "min cosine" in msg and "exporter=" in msg
    assert e.value.exit_code == 2


def test_legacy_fallback_when_dynamo_raises(tmp_path, monkeypatch):
    model = _tiny(seed=1)
    real = torch.onnx.export

    def flaky(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", flaky)
    info = export_onnx(model, tmp_path, image_size=32, context_length=16, towers=("image",))
    assert info["image"]["exporter"] == "legacy" and info["image"]["min_cosine"] >= 0.9999
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the legacy export
    with pytest.raises(ExportCheckError, match="dynamo ONNX export failed.*exporter='legacy'"):
        export_onnx(model, tmp_path / "d", image_size=32, context_length=16, exporter="dynamo", towers=("image",))


def test_patch_matmul_equals_the_conv_patch_embedding():
    from distill.export import PatchMatMul

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=True)
    x = torch.randn(2, 3, 12, 16)
    assert PatchMatMul.applies_to(conv)
    torch.testing.assert_close(PatchMatMul(conv)(x), conv(x), atol=1e-5, rtol=1e-5)
    assert not PatchMatMul.applies_to(torch.nn.Conv2d(3, 8, kernel_size=4, stride=2))  # overlapping patches
    assert not PatchMatMul.applies_to(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1))
    assert not PatchMatMul.applies_to(None)


def _image_ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_exported_patch_embedding_is_a_matmul_by_default_and_matches_the_model(exported, tmp_path):
    model, out, info = exported
    assert "Conv" not in _image_ops(info["image"]["path"]) and info["image"]["min_cosine"] >= 0.9999
    assert not isinstance(model.visual.conv1, torch.nn.Identity) and isinstance(model.visual.conv1, torch.nn.Conv2d)
    conv = export_onnx(model, tmp_path, image_size=32, context_length=16, towers=("image",), patch_embed="conv",
                       exporter="legacy")
    assert "Conv" in _image_ops(conv["image"]["path"])
    x = random_inputs("image", 3, image_size=32, seed=5)
    a = ort.InferenceSession(info["image"]["path"], providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    b = ort.InferenceSession(conv["image"]["path"], providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    from distill.errors import UserError

    with pytest.raises(UserError, match="patch_embed='pixel' is unknown"):
        export_onnx(model, tmp_path, image_size=32, context_length=16, patch_embed="pixel")


@pytest.mark.parametrize("batch_first", [True, False])
def test_matmul_attention_equals_multihead_attention(batch_first):
    from distill.export import MatMulAttention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    ours = MatMulAttention(mha)
    assert MatMulAttention.applies_to(mha)
    for mask in (None, causal, causal.isinf()):  # none, additive float, boolean (True = masked)
        want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        got, weights = ours(x, x, x, need_weights=False, attn_mask=mask)
        assert weights is None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    y = torch.randn_like(x)  # cross-attention goes to the wrapped module unchanged
    torch.testing.assert_close(ours(x, y, y)[0], mha(x, y, y)[0])
    assert not MatMulAttention.applies_to(torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    assert not MatMulAttention.applies_to(None)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_exported_attention_is_matmul_by_default_fewer_nodes_same_outputs(exported, tmp_path):
    from distill.errors import UserError

    model, out, info = exported
    native = export_onnx(model, tmp_path, image_size=32, context_length=16, attention="native")
    blocks_before = [type(b.attn) for b in model.visual.transformer.resblocks + model.transformer.resblocks]
    assert all(t is torch.nn.MultiheadAttention for t in blocks_before)  # the model is put back as it was
    for kind, name, x in (("image", "pixels", random_inputs("image", 3, image_size=32, seed=6)),
                          ("text", "tokens", random_inputs("text", 3, context_length=16, seed=6))):
        ours, theirs = _ops(info[kind]["path"]), _ops(native[kind]["path"])
        assert len(ours) < len(theirs) and ours.count("Transpose") < theirs.count("Transpose"), kind
        a = ort.InferenceSession(info[kind]["path"], providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        b = ort.InferenceSession(native[kind]["path"], providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(UserError, match="attention='flash' is unknown"):
        export_onnx(model, tmp_path, image_size=32, context_length=16, attention="flash")

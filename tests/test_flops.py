"""FLOP counts: analytic open_clip counts against open_clip's published figures and against the
MatMul/Gemm/Conv sum of the exported ONNX graph."""

from __future__ import annotations

import warnings

import onnx
import open_clip
import pytest
import torch

from distill.flops import clip_flops, onnx_flops, text_flops, vit_flops

TINY = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32, patch_size=8, image_size=32),
            text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=1000))


@pytest.mark.parametrize("name,image_g,text_g", [
    ("ViT-B-32", 8.82, 5.96),  # open_clip docs/model_profile.csv (image_gflops, text_gflops)
    ("ViT-B-16", 35.13, 5.96),
    ("ViT-L-14", 162.03, 13.30),
])
def test_clip_flops_matches_open_clip_reference(name, image_g, text_g):
    f = clip_flops(open_clip.get_model_config(name))
    assert f["image"] / 1e9 == pytest.approx(image_g, rel=0.01)
    assert f["text"] / 1e9 == pytest.approx(text_g, rel=0.01)


def test_vit_flops_hand_count():
    # 2x2 patches of 4 px, width 8, 1 layer, mlp 4: tokens N=5
    conv = 4 * 8 * 3 * 4 * 4
    block = 5 * 8 * 24 + 2 * 5 * 5 * 8 + 5 * 8 * 8 + 2 * 5 * 8 * 32
    assert vit_flops(8, 1, 2, 4, 8, 4.0, output_dim=6) == 2 * (conv + block + 8 * 6)
    assert text_flops(8, 2, 2, 3, 2.0, output_dim=4) == 2 * (2 * (3 * 8 * 24 + 2 * 9 * 8 + 3 * 8 * 8 + 2 * 3 * 8 * 16)
                                                             + 8 * 4)


def test_clip_flops_rejects_towers_it_does_not_model():
    with pytest.raises(ValueError, match="onnx_flops"):
        clip_flops(dict(embed_dim=8, vision_cfg=dict(timm_model_name="resnet18"), text_cfg={}))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY).eval()
    d = tmp_path_factory.mktemp("onnx")
    vis, txt = d / "image.onnx", d / "text.onnx"

    class Text(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            return self.m.encode_text(tokens)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the product's route: dynamo exporter, opset 20, dynamic batch (example batch 2: export
        # specialises a dim whose example size is 1)
        torch.onnx.export(model.visual, (torch.rand(2, 3, 32, 32),), str(vis), input_names=["image"],
                          dynamo=True, opset_version=20, verbose=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
        # legacy exporter (fast, and its Reshape-to-computed-shape defeats onnx's static inference,
        # so it exercises the run-once fallback)
        torch.onnx.export(Text(model), (torch.randint(0, 1000, (2, 16)),), str(txt), input_names=["tokens"],
                          dynamo=False, opset_version=17, dynamic_axes={"tokens": {0: "batch"}})
    return vis, txt


def test_onnx_flops_equals_analytic_count(tiny_onnx):
    vis, txt = tiny_onnx
    expected = clip_flops(TINY)
    # exact: both count only matrix products (LayerNorm, softmax, GELU, adds are in neither)
    assert onnx_flops(vis) == expected["image"]
    assert onnx_flops(txt) == expected["text"]
    by_op = onnx_flops(vis, by_op=True)
    assert by_op["Conv"] == 2 * 16 * 64 * 3 * 8 * 8  # 4x4 patches of 3*8*8 -> 64


def test_onnx_flops_batch_override_scales_linearly(tiny_onnx):
    vis, _ = tiny_onnx
    assert onnx_flops(vis, input_shapes={"image": (4, 3, 32, 32)}) == 4 * onnx_flops(vis)
    with pytest.raises(ValueError, match="graph inputs are"):
        onnx_flops(vis, input_shapes={"pixels": (1, 3, 32, 32)})


def test_onnx_flops_counts_int8_graph_like_fp32(tiny_onnx, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    vis, _ = tiny_onnx
    q = tmp_path / "image_int8.onnx"
    quantize_dynamic(str(vis), str(q), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "MatMulInteger" in ops or "ConvInteger" in ops
    assert onnx_flops(q) == onnx_flops(vis)


# ------------------------------------------------------------- teacher params/FLOPs, any loading path


def test_local_dir_and_onnx_teachers_get_params_and_flops(tmp_path, tiny_teacher):
    """local-dir/hf-hub teachers have no named config and ONNX teachers no modules: both used
    to report empty params and FLOPs."""
    from conftest import TINY_TEACHER_CFG

    from distill import flops
    from distill.export import export_onnx, save_open_clip_dir

    def teacher_stats(t):
        s = t.stats()
        return s["params"], s["flops"], s["files"]
    from distill.teachers.onnx_teacher import OnnxDualEncoder
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    ref_p, ref_f, _ = teacher_stats(tiny_teacher)
    assert ref_f == flops.clip_flops(TINY_TEACHER_CFG) and ref_p["total"] > ref_p["image"] > 0
    save_open_clip_dir(tiny_teacher.model, TINY_TEACHER_CFG, tmp_path / "oc")
    local = OpenClipTeacher(model_name=f"local-dir:{tmp_path / 'oc'}")
    # open_clip gives no config for a folder: the teacher reads the folder's open_clip_config.json
    assert local.model_cfg["vision_cfg"] == TINY_TEACHER_CFG["vision_cfg"]
    assert teacher_stats(local)[:2] == (ref_p, ref_f)

    info = export_onnx(tiny_teacher.model, tmp_path / "onnx", image_size=32, context_length=16)
    onnx_t = OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"])
    p, f, files = teacher_stats(onnx_t)
    assert f == ref_f  # the graph count agrees with the analytic one
    for k in ("image", "text", "total"):  # exporters fold a few constants into or out of the graph
        assert abs(p[k] - ref_p[k]) / ref_p[k] < 0.01, (k, p, ref_p)
    assert sorted(files) == sorted([info["image"]["path"], info["text"]["path"]])


def test_model_cfg_from_module_declines_towers_it_cannot_model():
    import open_clip
    from conftest import TINY_TEACHER_CFG

    from distill.flops import model_cfg_from_module

    model = open_clip.model.CLIP(**{**TINY_TEACHER_CFG, "vision_cfg": {**TINY_TEACHER_CFG["vision_cfg"],
                                                                         "attentional_pool": True}})
    assert model_cfg_from_module(model) is None
    assert model_cfg_from_module(object()) is None

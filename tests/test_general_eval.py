"""The `general` report section: each variant against the teacher on held-out images without labels
(image cosine, top-1 agreement over a class-prompt bank, k-NN agreement), from metrics to report.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill import evaluation, metrics
from distill.bench import Variant, measure_variants
from distill.data import EvalSet
from distill.data_build import build_general_sets
from distill.errors import UserError
from distill.report import render_markdown, summarize
from tests.conftest import ArraySource

N, D = 24, 8
CLASSES = [f"class{i}" for i in range(6)]


def _table(seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


TEACHER = _table(0)
TEXT = _table(1)[: len(CLASSES)]


class TableEncoder:
    """Image i (a constant image of value i / 100) -> row i of a table; prompt "a class{c}" -> TEXT[c]."""

    image_size = 4

    def __init__(self, table: torch.Tensor, text: torch.Tensor = TEXT):
        self.table, self.text = table, text

    def encode_image(self, images):
        return self.table[(images[:, 0, 0, 0] * 100).round().long().clamp(max=N - 1)]

    def encode_text(self, texts):
        return torch.stack([self.text[int(t.rsplit("class", 1)[1].rstrip("."))] if "class" in t else self.text[0]
                            for t in texts])


IMAGES = torch.stack([torch.full((3, 4, 4), i / 100) for i in range(N)])


def _sets(k: int = 3):
    es = EvalSet("held", IMAGES, classnames=CLASSES, templates=["a {}."])
    es.knn_k = k
    return {"classification": {}, "retrieval": {}, "general": {"held": es}}


def test_knn_overlap_is_one_for_the_same_geometry_and_low_for_an_unrelated_one():
    rot = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))[0]
    assert metrics.knn_overlap(TEACHER, TEACHER @ rot, 5).min().item() == pytest.approx(1.0)
    # neighbour sets, not vectors: a space of another size with the same geometry agrees fully
    assert metrics.knn_overlap(TEACHER, torch.cat([TEACHER, torch.zeros(N, 3)], 1), 5).mean().item() == 1.0
    unrelated = metrics.knn_overlap(TEACHER, _table(7), 5).mean().item()
    assert unrelated < 0.6  # chance is k / (N - 1) ~ 0.22
    # hand-made, points on a circle: A at 0, 10, 30 degrees gives nearest neighbours 1, 0, 1; B at 0, 30, 8
    # degrees gives 2, 2, 0 (no overlap); C at 0, 12, 40 degrees orders them as A does
    def circle(*deg):
        r = torch.deg2rad(torch.tensor(deg))
        return torch.stack([r.cos(), r.sin()], 1)

    a = circle(0.0, 10.0, 30.0)
    assert metrics.knn_overlap(a, circle(0.0, 30.0, 8.0), 1).tolist() == [0.0, 0.0, 0.0]
    assert metrics.knn_overlap(a, circle(0.0, 12.0, 40.0), 1).tolist() == [1.0, 1.0, 1.0]
    b = circle(0.0, 30.0, 8.0)
    with pytest.raises(ValueError):
        metrics.knn_overlap(a, b, 3)


def test_general_agreement_with_itself_is_perfect_and_a_noisy_copy_is_below_with_intervals():
    ref = evaluation.evaluate(TableEncoder(TEACHER), _sets(), general=True)
    assert set(ref) == {"classification", "retrieval", "general"}
    same = evaluation.agreement(ref, ref)["general/held"]
    assert same["image_cosine"] == pytest.approx(1.0) and same["top1"] == 1.0 and same["knn"] == 1.0
    assert same["n"] == N and same["knn_k"] == 3
    noisy = F.normalize(TEACHER + 0.6 * _table(5), dim=-1)
    other = evaluation.evaluate(TableEncoder(noisy), _sets(), general=True)
    agr = evaluation.agreement(other, ref)["general/held"]
    cos = F.cosine_similarity(noisy, TEACHER, dim=-1).mean().item()
    assert agr["image_cosine"] == pytest.approx(cos, abs=1e-6)
    want_top1 = ((noisy @ TEXT.T).argmax(1) == (TEACHER @ TEXT.T).argmax(1)).float().mean().item()
    assert agr["top1"] == pytest.approx(want_top1)
    assert agr["knn"] < 1.0
    for key in ("image_cosine", "top1", "knn"):
        lo, hi = agr[f"{key}_ci95"]
        assert lo <= agr[key] <= hi and lo < hi
    # training-time evaluation never pays for the prompt bank
    assert "general" not in evaluation.evaluate(TableEncoder(TEACHER), _sets())


def test_bench_rows_summary_and_markdown_carry_a_general_section_for_every_variant():
    rows = measure_variants([Variant("teacher_torch_fp32", "teacher", "torch", "fp32", TableEncoder(TEACHER)),
                             Variant("student_torch_fp32", "student", "torch", "fp32",
                                     TableEncoder(F.normalize(TEACHER + 0.3 * _table(9), dim=-1))),
                             Variant("student_onnx_int8", "student", "onnxruntime", "int8",
                                     TableEncoder(F.normalize(TEACHER + 0.5 * _table(9), dim=-1)))],
                            _sets(), batch_sizes=(1,), threads=1, reference="teacher_torch_fp32", warmup=0,
                            repeats=1, settle_s=0, own_reference={"student_onnx_int8": "student_torch_fp32"})
    report = {"experiment": "t", "variants": rows}
    summ = summarize(report)
    gen = summ["general"]
    assert set(gen) == {"teacher_torch_fp32", "student_torch_fp32", "student_onnx_int8"}
    s, q = gen["student_torch_fp32"]["held"], gen["student_onnx_int8"]["held"]
    assert s["reference"] == "teacher_torch_fp32" and s["n"] == N
    assert 0 < q["image_cosine"] < s["image_cosine"] < 1.0  # more noise, further from the teacher
    md = render_markdown({**report, "summary": summ})
    assert "## General (away from the training domains)" in md
    assert "`held`: 24 images, k = 3" in md
    line = next(li for li in md.splitlines() if li.startswith("| `student_onnx_int8`") and "[" in li)
    assert f"{q['image_cosine']:.3f}" in line and f"{100 * q['knn']:.2f}" in line


def test_general_sets_from_config_use_the_imagenet_prompt_bank_and_refuse_bad_settings():
    src = {"_target_": "tests.conftest.ArraySource", "n": 12}
    cfg = OmegaConf.create({"eval": {"general": [{"name": "g", "source": src, "classes": "imagenet", "k": 4}]}})
    sets = build_general_sets(cfg, 8)
    es = sets["g"]
    assert len(es) == 12 and len(es.classnames) == 1000 and es.knn_k == 4
    assert es.labels is None and es.captions is None
    assert es.classnames[:2] == ["tench", "goldfish"]
    own = OmegaConf.create({"eval": {"general": [{"name": "g", "source": src, "classes": ["a", "b"], "k": 2}]}})
    assert build_general_sets(own, 8)["g"].classnames == ["a", "b"]
    for bad, needle in [({"classes": "cifar"}, "classes='cifar' unknown"), ({"k": 12}, "too few for k=12"),
                        ({"k": 0}, "k >= 1")]:
        cfg = OmegaConf.create({"eval": {"general": [{"name": "g", "source": src, **bad}]}})
        with pytest.raises(UserError, match=needle):
            build_general_sets(cfg, 8)
    assert ArraySource  # the source the config names

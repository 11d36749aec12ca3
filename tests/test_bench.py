"""The harness computes the right numbers: call counts, failure isolation, metrics, agreement, sizes.
No timing is asserted (only the structure of timing results)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from distill.bench import (Variant, count_params, environment, file_size_mb, matmul_ceiling, measure_peak_rss,
                           measure_variants, time_fn)
from distill.metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier

CLASSES = ["red", "green", "blue"]


class ColourEncoder:
    """Tiny deterministic dual encoder: image -> mean RGB, text -> one-hot of the colour it names."""

    image_size = 8

    def __init__(self, noise: float = 0.0):
        self.noise = noise
        self.image_calls = 0

    def encode_image(self, images):
        self.image_calls += 1
        feats = images.mean(dim=(2, 3)) + self.noise  # (B, 3)
        return F.normalize(feats, dim=-1)

    def encode_text(self, texts):
        rows = [[float(c in t) for c in CLASSES] for t in texts]
        return F.normalize(torch.tensor(rows) + 1e-3, dim=-1)


class BrokenEncoder(ColourEncoder):
    def encode_image(self, images):
        raise RuntimeError("session lost\nsecond line of a long message")


def _eval_sets():
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    return {
        "classification": {"colours": {"images": images, "labels": torch.tensor([0, 2]), "classnames": CLASSES,
                                       "templates": ["a {} picture", lambda c: f"{c}!"]}},
        "retrieval": {"pairs": {"images": images, "captions": [["a red square", "red"], ["blue"]]}},
    }


def test_time_fn_calls_and_structure():
    calls, syncs = [], []
    t = time_fn(lambda: calls.append(1), warmup=2, repeats=5, sync=lambda: syncs.append(1))
    assert len(calls) == 7 and len(syncs) == 6  # once after warm-up, once per timed call
    assert set(t) == {"median_ms", "p90_ms", "mean_ms", "min_ms", "repeats"} and t["repeats"] == 5
    assert t["min_ms"] <= t["median_ms"] <= t["p90_ms"]


def test_time_fn_p90_is_nearest_rank(monkeypatch):
    import distill.bench as bench

    ticks = iter([0.0, 0.001, 1.0, 1.002, 2.0, 2.003, 3.0, 3.004, 4.0, 4.010])  # 1, 2, 3, 4, 10 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    t = time_fn(lambda: None, warmup=0, repeats=5, sync=lambda: None)
    assert (t["median_ms"], t["p90_ms"], t["min_ms"], t["mean_ms"]) == (3.0, 10.0, 1.0, 4.0)


def test_measure_variants_isolates_failures_and_computes_metrics():
    good = ColourEncoder()
    variants = [
        Variant("teacher_torch_fp32", "teacher", "torch", "fp32", good, params={"image": 3, "text": 0, "total": 3},
                flops={"image": 1000, "text": 10}),
        Variant("student_onnx_int8", "student", "onnxruntime", "int8", BrokenEncoder()),
        Variant("student_torch_fp32", "student", "torch", "fp32", ColourEncoder(noise=0.5), flops={"image": 500}),
    ]
    ceilings = {"torch_fp32_gflops": 2.0}
    rows = measure_variants(variants, _eval_sets(), batch_sizes=(1, 2), threads=1, reference="teacher_torch_fp32",
                            warmup=1, repeats=2, settle_s=0, ceilings=ceilings,
                            own_reference={"student_torch_fp32": "student_torch_fp32"})
    assert list(rows) == [v.name for v in variants]

    failed = rows["student_onnx_int8"]
    assert failed["status"] == "failed"
    assert failed["reason"] == "RuntimeError: session lost second line of a long message"

    t = rows["teacher_torch_fp32"]
    assert t["status"] == "ok"
    lat = t["latency"]
    assert {"image_b1_median_ms", "image_b1_p90_ms", "image_b2_median_ms", "text_b1_median_ms"} <= set(lat)
    assert t["throughput_img_s"] == pytest.approx(2 / (lat["image_b2_median_ms"] / 1e3), rel=1e-3)
    rate = 1000 * 2 / (lat["image_b2_median_ms"] / 1e3) / 1e9
    assert t["achieved"]["image_b2_gflops_s"] == pytest.approx(rate, abs=0.01)
    assert t["achieved"]["ceiling"] == "torch_fp32_gflops"
    # the red image and the blue image are classified right; captions retrieve their images
    assert t["zeroshot"]["colours"] == {"top1": 1.0, "top1_ci95": [1.0, 1.0], "top5": 1.0}
    assert t["retrieval"]["pairs"]["i2t_r1"] == 1.0 and t["retrieval"]["pairs"]["t2i_r1"] == 1.0
    # agreement of an encoder with itself
    assert t["agreement"]["colours"] == {"image_cosine": pytest.approx(1.0), "top1": 1.0}
    assert t["agreement"]["retrieval/pairs"]["image_cosine"] == pytest.approx(1.0)
    assert good.image_calls > 0

    s = rows["student_torch_fp32"]
    assert s["status"] == "ok" and s["achieved"]["ceiling"] == "torch_fp32_gflops"
    sets = _eval_sets()["classification"]["colours"]
    enc = ColourEncoder(noise=0.5)
    emb = enc.encode_image(sets["images"])
    expected = zero_shot_accuracy(emb, zero_shot_classifier(enc.encode_text, CLASSES, sets["templates"]),
                                  sets["labels"])
    assert {k: s["zeroshot"]["colours"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    lo, hi = s["zeroshot"]["colours"]["top1_ci95"]
    assert lo <= expected["top1"] <= hi
    assert {f"{k}_ci95" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")} <= set(
        s["retrieval"]["pairs"])
    ref_emb = ColourEncoder().encode_image(sets["images"])
    assert s["agreement"]["colours"]["image_cosine"] == pytest.approx(
        float(F.cosine_similarity(emb, ref_emb).mean()), abs=1e-6)
    assert s["agreement"]["colours"]["image_cosine"] < 0.99
    assert s["agreement_own"]["reference"] == "student_torch_fp32"
    assert s["agreement_own"]["colours"] == {"image_cosine": pytest.approx(1.0), "top1": 1.0}
    assert "agreement_own" not in t


class LoggingEncoder(ColourEncoder):
    """Records which encoder ran each call, in order, into a shared log; can fail on its Nth image call."""

    def __init__(self, name, log, fail_after=None):
        super().__init__()
        self.name, self.log, self.fail_after = name, log, fail_after

    def encode_image(self, images):
        self.log.append(self.name)
        if self.fail_after is not None and self.image_calls >= self.fail_after:
            raise RuntimeError("stalled session")
        return super().encode_image(images)


def test_measure_variants_interleaves_rounds_and_isolates_a_timing_failure():
    log = []
    a, b = LoggingEncoder("a", log), LoggingEncoder("b", log)
    c = LoggingEncoder("c", log)
    variants = [Variant(n, "student", "torch", "fp32", e) for n, e in (("a", a), ("b", b), ("c", c))]
    # c passes its accuracy pass (one call per timed shape + 2 eval encodes = 3 calls) and fails while timed
    c.fail_after = 3
    rows = measure_variants(variants, _eval_sets(), batch_sizes=(1,), threads=1, reference="a",
                            warmup=1, repeats=5, rounds=3, settle_s=0)
    assert rows["c"]["status"] == "failed" and rows["c"]["reason"] == "RuntimeError: stalled session"
    for name in ("a", "b"):
        row = rows[name]
        assert row["status"] == "ok"
        # ceil(5 / 3) = 2 timed calls per round, 3 rounds: one median per round
        assert [len(v) for v in row["latency_rounds"].values()] == [3, 3]
        assert row["latency"]["image_b1_median_ms"] > 0
    timing = log[log.index("c", 0) + 3:]  # the accuracy passes ran a, b, c in order, 3 image calls each
    # round r visits the variants rotated by r: a b c | b c a | c a b; c raises on its first timed
    # call and is skipped after, so the visits read a b c | b a | a b
    runs = [n for i, n in enumerate(timing) if i == 0 or timing[i - 1] != n]
    assert runs == ["a", "b", "c", "b", "a", "b"]
    # every timed visit is warm-up + timed calls of each shape: 1 + 2 image calls
    assert timing.count("a") == timing.count("b") == 3 * 3


def test_measure_variants_reference_failed_and_bad_reference():
    rows = measure_variants([Variant("t", "teacher", "torch", "fp32", BrokenEncoder()),
                             Variant("s", "student", "torch", "fp32", ColourEncoder())],
                            _eval_sets(), batch_sizes=(1,), threads=1, reference="t", warmup=0, repeats=1)
    assert rows["t"]["status"] == "failed" and "reference variant failed" in rows["s"]["agreement"]["note"]
    with pytest.raises(ValueError, match="reference"):
        measure_variants([Variant("s", "student", "torch", "fp32", ColourEncoder())], {}, threads=1, reference="x")
    with pytest.raises(ValueError, match="role"):
        Variant("s", "pupil", "torch", "fp32", ColourEncoder())


def test_measure_peak_rss_sees_an_allocation():
    holder = []
    m = measure_peak_rss(lambda: holder.append(torch.ones(40 * 1024 * 1024 // 4)))  # 40 MiB, touched
    assert m["peak_rss_mb"] > 0
    if m["delta_mb"] is not None:  # Linux: peak reset per call
        assert m["delta_mb"] >= 35


def test_count_params_and_file_size(tmp_path):
    assert count_params(torch.nn.Linear(4, 3)) == 15
    w = numpy_helper.from_array(np.ones((256, 256), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 256])], initializer=[w])
    model = helper.make_model(graph)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    total = (path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size) / 1e6
    assert file_size_mb(path) == pytest.approx(total, abs=1e-3)
    assert (tmp_path / "m.onnx.data").stat().st_size >= 256 * 256 * 4
    with pytest.raises(FileNotFoundError):
        file_size_mb(tmp_path / "nope.onnx")


def test_matmul_ceiling_keys():
    c = matmul_ceiling(threads=1, n=64, repeats=2)
    for key in ("torch_fp32_gflops", "ort_fp32_gflops", "ort_int8_gops", "fp32_gflops", "int8_gops"):
        assert c[key] > 0
    assert c["fp32_gflops"] == c["torch_fp32_gflops"] and c["int8_gops"] == c["ort_int8_gops"]


def test_environment_fields():
    env = environment()
    assert env["torch"] == torch.__version__ and env["logical_cores"] >= 1
    assert isinstance(env["cpu_flags"], list) and env["cpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_time_fn_synchronises_cuda_by_default(monkeypatch):
    a = torch.randn(256, 256, device="cuda")
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *x: (calls.append(1), real(*x)))
    time_fn(lambda: a @ a, warmup=1, repeats=3)
    assert len(calls) == 4


def test_interleaved_times_visits_every_call_each_round_in_rotated_order():
    from distill.bench import interleaved_times

    log = []
    calls = {n: (lambda n=n: log.append(n)) for n in ("a", "b", "c")}
    out = interleaved_times(calls, rounds=3, per_round=2, warmup=1, settle_s=0)
    assert {n: [len(r) for r in rounds] for n, rounds in out.items()} == {n: [2, 2, 2] for n in "abc"}
    assert all(t >= 0 for rounds in out.values() for r in rounds for t in r)
    # 1 warm-up + 2 timed calls per visit; the visiting order rotates by one each round
    visits = [log[i] for i in range(0, len(log), 3)]
    assert visits == ["a", "b", "c", "b", "c", "a", "c", "a", "b"] and len(log) == 27
    with pytest.raises(ValueError, match="rounds"):
        interleaved_times(calls, rounds=0, per_round=1)


def test_environment_section_lists_every_field_in_one_code_block():
    from distill.bench import environment, environment_section

    env = environment()
    lines = environment_section(env)
    assert lines[0] == "## Environment" and lines.count("```") == 2
    assert [l.split(":")[0] for l in lines[3:-2]] == list(env)

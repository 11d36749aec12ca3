"""A key that is misspelt or does nothing is one line and exit 2 before any work (distill/validate.py):
the known keys are derived from the config files, so every shipped config passes and a new option
file extends them by itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from distill import validate
from distill.validate import ConfigError, check_config, known_keys
from tests.conftest import REPO

CONF = REPO / "conf"


def _cfg(*overrides, experiment="smoke"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])


def _problems(*overrides, experiment="smoke"):
    with pytest.raises(ConfigError) as e:
        check_config(_cfg(*overrides, experiment=experiment))
    return e.value.problems


def test_misspelt_group_and_key_are_one_line_each_with_the_closest_name():
    assert _problems("+trian.steps=5") == ["trian is not a setting; closest: train, variants (fix the name or drop it)"]
    assert _problems("+train.stepz=5") == ["train.stepz is not a setting; closest: steps (fix the name or drop it)"]


@pytest.mark.parametrize("override, line", [
    # a `_target_`-built object takes its callable's parameters
    ("+teacher.model_nam=x", "teacher.model_nam is not a setting of OpenClipTeacher; closest: model_name"),
    ("+train.optimizer.beta=0.9", "train.optimizer.beta is not a setting of AdamW; closest: betas"),
    ("+data.eval.classification.0.source.per_klass=2",
     "data.eval.classification[0].source.per_klass is not a setting of fashion_mnist; closest: per_class"),
    ("+data.train.corpus.extr=[a]", "data.train.corpus.extr is not a setting of build_corpus; closest: extra"),
    # the student's image tower takes the keys its kind declares
    ("+student.builder.vision.widht=8", "student.builder.vision.widht is not a setting of kind=vit; closest: width"),
    ("+student.builder.vision.timm_pool=avg", "student.builder.vision.timm_pool is not a setting of kind=vit"),
    # plain maps take the keys the files give them, at any depth
    ("+finetune.wise_ft.alpah=0.5", "finetune.wise_ft.alpah is not a setting; closest: alpha"),
    ("+finetune.train.stepz=3", "finetune.train.stepz is not a setting; closest: steps"),
    ("+data.train.corpus.words.limt=3", "data.train.corpus.words.limt is not a setting; closest: limit"),
])
def test_unknown_key_at_any_depth(override, line):
    (p,) = _problems(override)
    assert p.startswith(line), p


def test_open_subtrees_and_keys_the_code_reads_are_accepted():
    check_config(_cfg("+teacher.model_cfg.quick_gelu=true",  # free-form open_clip config
                      "+bench.targets.run_minutes={at_most: 5.0}",  # report summary names
                      "+loss.weights.clip=1.0", "train.lr_scale={text: 2.0}",
                      "+student.embed_dim=64", "+student.builder.vision.pool_type=avg", "++bench.ceilings=false",
                      "+finetune.train.progress=false", "+data.train.corpus.extra=[a cat]",
                      "++data.eval.retrieval.0.source.limit=8", "+train.optimizer.amsgrad=true"))
    assert list(validate._check_keys(_cfg("+train.stepz=1"))) != []


def test_a_timm_tower_takes_its_own_keys():
    (p,) = _problems("student=tiny_timm", "+student.builder.vision.timm_pol=avg")
    assert p.startswith("student.builder.vision.timm_pol is not a setting of kind=timm; closest: timm_pool"), p
    assert list(validate._check_keys(_cfg("student=tiny_timm", "+student.builder.vision.timm_model_kwargs.x=1"))) == []


def test_model_name_beside_an_inline_model_cfg_is_one_line():
    assert _problems("teacher.model_name=ViT-B-99") == [
        "teacher.model_name=ViT-B-99 is ignored beside the inline teacher.model_cfg, which builds the model: drop it, "
        "or use teacher=openclip for a model named by teacher.model_name"]


@pytest.mark.parametrize("image, text", [("[]", "[]"), ("['']", "''")])
def test_empty_lora_targets_are_one_line(image, text):
    (p,) = _problems("finetune=lora", f"finetune.lora.targets.image={image}", f"finetune.lora.targets.text={text}")
    assert p.startswith("finetune.lora.targets has no target in any tower (image, text all empty)")
    check_config(_cfg("finetune=lora", "finetune.lora.targets.image=[]"))  # one tower still tunes


def _every_config():
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir()):
        for f in sorted((CONF / group).glob("*.yaml")):
            yield [f"+experiment={f.stem}"] if group == "experiment" else ["+experiment=smoke", f"{group}={f.stem}"]


@pytest.mark.parametrize("overrides", list(_every_config()), ids=" ".join)
def test_every_shipped_config_has_only_known_keys(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    assert list(validate._check_keys(cfg)) == []


def test_known_keys_come_from_the_files(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "student" / "wide.yaml").write_text(
        "defaults: [tiny, {tower@builder.vision: big}, _self_]\nname: wide\nbuilder: {text: {new_text_knob: 1}}\n")
    (conf / "student" / "tower").mkdir()
    (conf / "student" / "tower" / "big.yaml").write_text("width: 128\nnew_tower_knob: 2\n")
    (conf / "experiment" / "extra.yaml").write_text("# @package _global_\nnew_root_key: 1\nbench: {new_bench: 2}\n")
    keys = known_keys(str(conf))
    assert {"new_text_knob", "width", "mode"} <= set(keys.at("student.builder.text").children)
    assert "new_tower_knob" in keys.at("student.builder.vision").children
    assert "new_root_key" in keys.children and "new_bench" in keys.at("bench").children
    assert "new_tower_knob" not in known_keys().at("student.builder.vision").children
    assert "progress" in keys.at("finetune.train").children  # the engine's keys, from conf/train


def _cli(tmp_path, *overrides):
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "distill", "+experiment=smoke", *overrides,
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("overrides, needle", [
    (["+trian.steps=5"], "error: trian is not a setting; closest: train"),
    (["finetune=lora", "finetune.lora.targets.image=[]", "finetune.lora.targets.text=[]"],
     "error: finetune.lora.targets has no target in any tower"),
])
def test_cli_exits_2_with_one_line_before_the_teacher(tmp_path, overrides, needle):
    r, seconds = _cli(tmp_path, *overrides)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(needle), r.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # nothing was built
    assert seconds < 120  # imports only, on a loaded 2-core machine; the smoke pipeline takes far longer

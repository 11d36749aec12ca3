"""Mixup / cutmix consistent with the teacher (data.train.mix): seeded per item, the teacher cache
embeds the mixed pixels and stores each item's view parameters, mixed items are not caption pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distill.cache import build_or_load, cache_fingerprint
from distill.data import MixSpec, TrainSet, ViewSpec, augmented_view, collate
from distill.errors import UserError
from tests.conftest import REPO, ArraySource


def _set(mode="both", prob=0.7, alpha=1.0, views=2, augment=True, broken=(), n=8, corpus=(), **src):
    return TrainSet([ArraySource(n, broken=broken, **src)],
                    ViewSpec(size=24, views=views, augment=augment, seed=3,
                             mix={"mode": mode, "prob": prob, "alpha": alpha}), corpus)


def _mixed(ds, kind):
    return [j for j in range(len(ds)) if ds.view_params(j)["mix"] == kind]


def test_pixels_and_params_are_the_same_in_two_instances():
    a, b = _set(), _set()
    assert a.fingerprint() == b.fingerprint()
    for j in range(len(a)):
        assert torch.equal(a.load_view(j), b.load_view(j)), j
        assert a.view_params(j) == b.view_params(j), j
    kinds = {a.view_params(j)["mix"] for j in range(len(a))}
    assert kinds == {"none", "mixup", "cutmix"}  # both picks either, and prob < 1 leaves some unmixed
    # the order of access (a memo, a worker that starts elsewhere) changes nothing
    c = _set()
    for j in reversed(range(len(c))):
        assert torch.equal(c[j]["image"], a.load_view(j)) and c[j]["params"] == a.view_params(j)


def test_mixup_is_lam_a_plus_one_minus_lam_b_of_the_base_views():
    ds = _set(mode="mixup", prob=1.0)
    assert len(_mixed(ds, "mixup")) == len(ds)
    for j in range(len(ds)):
        p = ds.view_params(j)
        assert p["partner"] // 2 != j // 2 and 0 <= p["partner"] < len(ds)  # another image
        a, _ = ds.base_view(j)
        b, _ = ds.base_view(p["partner"])
        # the partner's base view is its own crop, unmixed
        assert torch.equal(b, augmented_view(ds.sources[0].open(p["partner"] // 2), 24, ds.view_seed(p["partner"]),
                                             scale=(0.6, 1.0)))
        lam = p["lam"]
        assert 0.0 <= lam <= 1.0 and p["box"] is None
        assert torch.allclose(ds.load_view(j), lam * a + (1 - lam) * b, atol=1e-6)


def test_cutmix_box_area_matches_lam_and_pastes_the_partner():
    ds = _set(mode="cutmix", prob=1.0, n=12)
    mixed = _mixed(ds, "cutmix")
    assert len(mixed) >= len(ds) - 2  # only a box rounded to nothing stays unmixed
    for j in mixed:
        p = ds.view_params(j)
        box = p["box"]
        assert p["lam"] == pytest.approx(1 - box["h"] * box["w"] / 24 ** 2, abs=1e-12)
        assert box["top"] >= 0 and box["left"] >= 0 and box["top"] + box["h"] <= 24 and box["left"] + box["w"] <= 24
        a, _ = ds.base_view(j)
        b, _ = ds.base_view(p["partner"])
        inside = torch.zeros(24, 24, dtype=torch.bool)
        inside[box["top"]:box["top"] + box["h"], box["left"]:box["left"] + box["w"]] = True
        v = ds.load_view(j)
        assert torch.equal(v[:, inside], b[:, inside]) and torch.equal(v[:, ~inside], a[:, ~inside])
    lams = [ds.view_params(j)["lam"] for j in mixed]
    assert len(set(lams)) > 3  # drawn per item


def test_mixed_items_are_not_pairs_and_keep_their_text():
    ds = _set(prob=0.6)
    mixed = [j for j in range(len(ds)) if ds.view_params(j)["mix"] != "none"]
    plain = [j for j in range(len(ds)) if j not in mixed]
    assert mixed and plain
    plain_ds = _set(mode="none")
    for j in range(len(ds)):
        assert ds.paired(j) == (j in plain)
        assert ds.captioned(j)
        assert ds.text_index(j) == plain_ds.text_index(j)  # the base item's caption
        assert ds[j]["paired"] == (j in plain) and ds[j]["text_index"] == plain_ds.text_index(j)
    batch = collate([ds[mixed[0]], ds[plain[0]]])
    assert batch["paired"] is False
    assert batch["pair_mask"].tolist() == [False, True] and batch["caption_mask"].tolist() == [True, True]
    assert batch["params"][0]["mix"] != "none" and batch["params"][1]["mix"] == "none"


def test_resampled_texts_leave_a_mixed_item_its_caption():
    """A mixed captioned item keeps its caption in training; only uncaptioned images draw corpus texts."""
    from distill.compose import train_defaults
    from distill.engine import EngineConfig
    from distill.train import DistillTask

    cap, nocap = ArraySource(4, name="a"), ArraySource(4, captions=False, name="b")
    ds = TrainSet([cap, nocap], ViewSpec(size=24, views=1, augment=True, seed=3, mix={"mode": "mixup", "prob": 1.0}),
                  corpus=["x one", "x two", "x three"])
    cfg = EngineConfig.from_mapping(train_defaults(batch_size=8, resample_corpus_texts=True, extra_texts=0))
    task = DistillTask(torch.nn.Identity(), torch.nn.Identity(), ds, lambda t: t, cfg, 24,
                       teacher=SimpleNamespace(logit_scale=100.0))
    batch = collate([ds[j] for j in range(8)])
    assert not batch["pair_mask"].any()
    texts, index = task._texts(batch, step=0, micro=0)
    assert texts[:4] == [f"a photo of thing number {i}" for i in range(4)]
    assert all(t.startswith("x ") for t in texts[4:])


def test_unreadable_partner_leaves_the_item_unmixed_and_counted():
    ds = _set(mode="mixup", prob=1.0, broken=(2,))
    hit = [j for j in range(len(ds)) if j // 2 != 2 and ds.mix_plan(j)["partner"] // 2 == 2]
    assert hit, "no item drew the broken image as its partner: pick another seed"
    for j in hit:
        p = ds.view_params(j)
        assert p["valid"] and p["mix"] == "none" and p["partner"] is None and p["lam"] == 1.0
        assert torch.equal(ds.load_view(j), ds.base_view(j)[0]) and ds.paired(j)
    assert ds.skips.count >= 1 and ds.skips.first[0][0] == "synthetic/2"
    assert not ds.view_params(4)["valid"] and ds.load_view(4) is None  # the broken image itself
    other = _set(mode="mixup", prob=1.0, broken=(2,))
    assert [other.view_params(j) for j in hit] == [ds.view_params(j) for j in hit]


def test_teacher_cache_embeds_the_mixed_pixels_and_stores_the_params(tmp_path, tiny_teacher):
    ds = TrainSet([ArraySource(10, broken=(7,))],
                  ViewSpec(size=32, views=2, augment=True, seed=1, mix={"mode": "both", "prob": 0.8}))
    cache = build_or_load(tiny_teacher, ds, tmp_path, chunk_size=6, batch_size=4, progress=False)
    assert cache.manifest["views"] == ds.spec.describe() and "mix=both" in cache.manifest["views"]
    mixed = [j for j in range(len(ds)) if ds.view_params(j)["mix"] != "none"]
    assert {ds.view_params(j)["mix"] for j in mixed} == {"mixup", "cutmix"}
    j = torch.tensor(mixed[:6])
    online = tiny_teacher.encode_image(torch.stack([ds.load_view(i) for i in j.tolist()]))
    assert torch.allclose(cache.image_targets(j), online, atol=2e-3)  # fp16 storage
    # not the teacher's embedding of the unmixed view
    base = tiny_teacher.encode_image(torch.stack([ds.base_view(i)[0] for i in j.tolist()]))
    assert not torch.allclose(cache.image_targets(j), base, atol=2e-3)
    for i in range(len(ds)):
        assert cache.view_params(i) == ds.view_params(i), i
    assert not cache.view_params(14)["valid"] and cache.view_params(14)["mix"] == "none"
    # read back from disk by a fresh load (a cache hit), with the same fingerprint
    again = build_or_load(tiny_teacher, _copy(ds), tmp_path, progress=False)
    assert again.path == cache.path and again.view_params(mixed[0]) == ds.view_params(mixed[0])


def _copy(ds):
    return TrainSet(ds.sources, ViewSpec(**{**ds.spec.__dict__}), ds.corpus)


def test_interrupted_mixed_build_resumes_to_the_same_entry(tmp_path, tiny_teacher):
    ds = _set(n=6)
    ref = build_or_load(tiny_teacher, ds, tmp_path / "ref", chunk_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(tiny_teacher, _set(n=6), tmp_path / "r", chunk_size=4, progress=False, _stop_after_chunks=2)
    # a chunk an earlier version saved has no params: the assembly computes them
    (part,) = (tmp_path / "r").glob("*.partial")
    first = part / "chunks" / "image-000000.npz"
    with np.load(first) as z:
        old = {k: z[k] for k in z.files if k != "params"}
    np.savez(first, **old)
    got = build_or_load(tiny_teacher, _set(n=6), tmp_path / "r", chunk_size=4, progress=False)
    np.testing.assert_array_equal(np.asarray(got.image_emb), np.asarray(ref.image_emb))
    np.testing.assert_array_equal(np.asarray(got.params), np.asarray(ref.params))


def test_fingerprint_follows_the_mix_and_mode_none_keeps_the_old_one(tiny_teacher):
    none = _set(mode="none", n=6)
    # what HEAD computed before mixing existed, for this very set (describe and fingerprint unchanged)
    assert none.spec.describe() == "size=24;views=2;augment=True;scale=(0.6, 1.0);seed=3"
    assert none.fingerprint() == "f7318f44ba50939a"
    plain = TrainSet([ArraySource(6)], ViewSpec(size=24, views=2, augment=True, seed=3))
    assert plain.fingerprint() == "f7318f44ba50939a"
    fps = {cache_fingerprint(tiny_teacher, _set(mode=m, prob=p, alpha=a, n=6))
           for m, p, a in [("none", 0.5, 1.0), ("mixup", 0.5, 1.0), ("cutmix", 0.5, 1.0), ("both", 0.5, 1.0),
                           ("both", 0.6, 1.0), ("both", 0.5, 0.4)]}
    assert len(fps) == 6
    # mode none: prob and alpha do nothing, so they do not split the cache either
    assert _set(mode="none", prob=0.1, alpha=3.0, n=6).fingerprint() == none.fingerprint()


def test_mode_none_keeps_the_old_pixels():
    src = ArraySource(4)
    ds = TrainSet([src], ViewSpec(size=24, views=2, augment=True, seed=3))
    for j in range(len(ds)):
        want = augmented_view(src.open(j // 2), 24, ds.view_seed(j), scale=(0.6, 1.0))
        assert torch.equal(ds.load_view(j), want) and ds.paired(j)
        p = ds.view_params(j)
        assert p["mix"] == "none" and p["partner"] is None and p["crop"]["h"] > 0
    ds_eval = TrainSet([src], ViewSpec(size=24))
    assert ds_eval.view_params(0)["crop"] is None


@pytest.mark.parametrize("mix, line", [
    ({"mode": "mixcut"}, "data.train.mix.mode='mixcut' is not known: use none, mixup, cutmix or both"),
    ({"mode": "mixup", "prob": 1.5}, "data.train.mix.prob=1.5 is not in [0, 1]"),
    ({"mode": "mixup", "prob": -0.1}, "data.train.mix.prob=-0.1 is not in [0, 1]"),
    ({"mode": "cutmix", "alpha": 0}, "data.train.mix.alpha=0 must be a positive number"),
    ({"mode": "cutmix", "alpha": -1.0}, "data.train.mix.alpha=-1.0 must be a positive number"),
    ({"mode": "both", "beta": 1.0}, "data.train.mix.beta is not a setting"),
])
def test_bad_mix_values_are_one_line(mix, line):
    with pytest.raises(UserError) as e:
        MixSpec.from_config(mix)
    assert line in str(e.value) and "\n" not in str(e.value)


def _compose(*overrides, experiment="smoke"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])


def test_config_validator_knows_the_keys_and_checks_the_values():
    from distill.validate import ConfigError, check_config

    check_config(_compose())
    check_config(_compose("data.train.mix.mode=both", "data.train.mix.prob=1", "data.train.mix.alpha=0.2"))
    check_config(_compose("data.train.mix.mode=cutmix", experiment="offline"))
    with pytest.raises(ConfigError) as e:
        check_config(_compose("data.train.mix.mode=blend", "data.train.mix.prob=2", "+data.train.mix.alhpa=1"))
    lines = e.value.problems
    assert any("data.train.mix.alhpa is not a setting; closest: alpha" in p for p in lines), lines
    assert any("data.train.mix.mode='blend' is not known" in p for p in lines), lines
    assert any("data.train.mix.prob=2 is not in [0, 1]" in p for p in lines), lines
    check_config(_compose("data.train.mix.mode=mixup", "finetune=lora"))  # the fine-tune reads unmixed views


def test_the_fine_tune_reads_each_item_unmixed_with_its_caption():
    ds = _set(mode="mixup", prob=1.0)
    assert ds.unmixed() is not ds and _set(mode="none").unmixed().spec.mix.mode == "none"
    un = ds.unmixed()
    mixed = _mixed(ds, "mixup")
    assert mixed and len(un) == len(ds) and un.texts is ds.texts and un.spec is ds.spec
    for j in mixed[:4]:
        assert not ds.paired(j) and un.paired(j)
        item = un[j]
        assert item["paired"] and item["text_index"] == ds.text_index(j)
        assert torch.equal(item["image"], ds.base_view(j)[0]) and not torch.equal(item["image"], ds.load_view(j))
        assert torch.equal(un.load_view(j), item["image"])
    batch = collate([un[j] for j in mixed[:4]])
    assert bool(batch["pair_mask"].all())


def test_a_stream_with_mix_is_one_line_before_any_work():
    from distill.data_build import build_data

    cfg = OmegaConf.create({"image_size": 32, "train": {
        "sources": [], "mix": {"mode": "mixup", "prob": 0.5, "alpha": 1.0},
        "stream": {"_target_": "distill.streaming.StreamingShards", "urls": "/nonexistent/shard-{0..3}.tar"}},
        "eval": {"classification": [{"name": "x", "source": {"_target_": "no.such.module"}}]}})
    with pytest.raises(UserError) as e:
        build_data(cfg)  # raised before the eval sets (whose source does not even import) are built
    msg = str(e.value)
    assert "\n" not in msg and "data.train.mix.mode=none" in msg and "stream" in msg
    cfg.train.mix.mode = "none"
    cfg.train.mix.prob = 7
    with pytest.raises(UserError, match=r"data.train.mix.prob=7 is not in \[0, 1\]"):
        build_data(cfg)


def test_online_teacher_trains_on_the_mixed_pixels_like_the_cache(tmp_path, tiny_teacher):
    import open_clip

    from distill.compose import train_defaults
    from distill.losses import DistillLoss
    from distill.train import train
    from tests.test_train import STUDENT_CFG

    ds = TrainSet([ArraySource(8)], ViewSpec(size=32, views=2, augment=True, seed=1,
                                             mix={"mode": "both", "prob": 0.8}))
    cache = build_or_load(tiny_teacher, ds, tmp_path / "cache", progress=False)
    tok = open_clip.SimpleTokenizer(context_length=16)
    cfg = train_defaults(steps=2, batch_size=4, num_workers=0, seed=0, log_every=1, eval_every=0, ckpt_every=0,
                         resume="never", tensorboard=False, progress=False, scheduler={"warmup_steps": 1})
    cfg["optimizer"] = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05}
    losses = {}
    for name, kw in (("cache", {"cache": cache}), ("online", {"teacher": tiny_teacher})):
        torch.manual_seed(0)
        student = open_clip.model.CLIP(**STUDENT_CFG)
        loss = DistillLoss(weights={"feature_mse": 1.0, "contrastive_kd": 1.0, "clip": 1.0}, temperature_mode="fixed",
                           temperature=0.05, student_dim=32, teacher_dim=32)
        out = train(student=student, loss_fn=loss, dataset=ds, tokenizer=tok, cfg=cfg, out_dir=tmp_path / name,
                    device=torch.device("cpu"), **kw)
        assert out["target_source"] == name
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert losses["cache"] == pytest.approx(losses["online"], rel=2e-3)  # same mixed targets, up to fp16


def test_smoke_run_with_mixing_through_the_command_line(tmp_path):
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["+experiment=smoke", "data.train.mix.mode=both", "data.train.mix.prob=0.8", "data.train.augment=true",
            "data.train.views=2", "train.steps=2", "train.ckpt_every=0", "train.progress=false", "threads=1",
            "export.bundle=false", "variants=[teacher_torch_fp32,student_torch_fp32]",
            f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["training"]["steps"] == 2 and np.isfinite(report["training"]["final_loss"])
    entry = next((tmp_path / "cache").glob("*/manifest.json"))
    manifest = json.loads(entry.read_text())
    assert "mix=both:prob=0.8:alpha=1.0" in manifest["views"]
    params = np.load(entry.parent / "view_params.npy")
    assert len(params) == manifest["items"] and (params["mix"] > 0).any() and (params["mix"] == 0).any()


def test_a_fine_tune_then_distillation_with_mixing_runs_end_to_end(tmp_path):
    """finetune=lora tunes the teacher on real pairs (unmixed views) while the student learns the mixed ones."""
    env = {**os.environ, "DISTILL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["+experiment=smoke", "data.train.mix.mode=mixup", "data.train.mix.prob=1.0", "data.train.augment=true",
            "finetune=lora", "finetune.train.steps=2", "finetune.train.eval_every=0", "finetune.train.ckpt_every=0",
            "finetune.train.log_every=1", "finetune.chain_eval=false", "finetune.wise_ft.alpha=1.0", "train.steps=2",
            "train.ckpt_every=0",
            "train.progress=false", "threads=1", "export.bundle=false",
            "variants=[teacher_torch_fp32,student_torch_fp32]", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["finetune"]["steps"] == 2 and report["training"]["steps"] == 2
    log = (tmp_path / "run" / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert sum("contrastive_loss" in line for line in log) == 2  # no batch skipped as "not all pairs"

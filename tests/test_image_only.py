"""Image-only sources (no captions: image-side terms only) and data.train.image_only_ratio's batch mix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from distill import data_build, datasets
from distill.compose import compose
from distill.data import ResumableSampler, TrainSet, ViewSpec
from distill.errors import UserError
from distill.validate import ConfigError, check_config


def _batches(sampler, n_batches):
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.bs)] for _ in range(n_batches)]


IMG_ONLY = [i >= 30 for i in range(40)]  # items 30..39 are image-only


def test_mix_puts_the_ratio_in_every_batch_and_resumes_exactly():
    s = ResumableSampler(40, seed=1, batch_size=8, image_only=IMG_ONLY, image_only_ratio=0.25)
    full = _batches(s, 12)
    assert all(sum(i >= 30 for i in b) == 2 for b in full)  # 10 image-only items of 40, yet 2 of 8 each batch
    assert len({i for b in full for i in b if i >= 30}) == 10  # the image-only group cycles through all of them
    resumed = _batches(ResumableSampler(40, seed=1, start=5 * 8, batch_size=8, image_only=IMG_ONLY,
                                        image_only_ratio=0.25), 7)
    assert resumed == full[5:]
    mid = ResumableSampler(40, seed=1, start=5 * 8 + 3, batch_size=8, image_only=IMG_ONLY, image_only_ratio=0.25)
    assert list(itertools.islice(iter(mid), 13)) == [i for b in full[5:] for i in b][3:16]
    again = _batches(ResumableSampler(40, seed=1, batch_size=8, image_only=IMG_ONLY, image_only_ratio=0.25), 12)
    assert again == full


def test_mix_ratio_is_exact_over_batches_and_splits_across_ranks():
    s = ResumableSampler(40, seed=2, batch_size=8, image_only=IMG_ONLY, image_only_ratio=0.3)
    got = _batches(s, 10)
    assert sum(i >= 30 for b in got for i in b) == 24  # floor(10 * 8 * 0.3)
    r0 = _batches(ResumableSampler(40, seed=2, batch_size=4, world_size=2, rank=0, image_only=IMG_ONLY,
                                   image_only_ratio=0.3), 10)
    r1 = _batches(ResumableSampler(40, seed=2, batch_size=4, world_size=2, rank=1, image_only=IMG_ONLY,
                                   image_only_ratio=0.3), 10)
    assert [a + b for a, b in zip(r0, r1)] == got


def test_mix_extremes_and_unreadable_groups():
    only = _batches(ResumableSampler(40, batch_size=4, image_only=IMG_ONLY, image_only_ratio=1.0), 5)
    assert all(i >= 30 for b in only for i in b)
    none = _batches(ResumableSampler(40, batch_size=4, image_only=IMG_ONLY, image_only_ratio=0.0), 20)
    assert all(i < 30 for b in none for i in b)
    with pytest.raises(UserError, match="no readable image-only"):
        ResumableSampler(40, batch_size=4, image_only=IMG_ONLY, image_only_ratio=0.5, valid=[not x for x in IMG_ONLY])


class _Src:
    def __init__(self, name, n, captions=None, image_only=False):
        self.name, self.n, self.captions = name, n, captions
        self.labels = self.classnames = None
        if image_only:
            self.image_only = True

    def __len__(self):
        return self.n

    def key(self, i):
        return f"{self.name}/{i}"

    def open(self, i):
        return Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0))


def test_trainset_image_only_items_are_unpaired_and_ratio_is_checked():
    paired = _Src("pairs", 4, captions=[f"cap {i}" for i in range(4)])
    imgs = datasets.ImageOnly(_Src("imgs", 3, captions=["not used"] * 3))
    ds = TrainSet([paired, imgs], ViewSpec(size=8, views=2), corpus=["a photo of a cat."], image_only_ratio=0.5)
    assert ds.image_only_items() == [False] * 8 + [True] * 6
    assert [ds.paired(j) for j in range(len(ds))] == [True] * 8 + [False] * 6
    assert all(ds.texts[ds.text_index(j)] == "a photo of a cat." for j in range(8, 14))
    assert "not used" not in ds.texts
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(UserError, match=r"image_only_ratio=.* not in \[0, 1\]"):
            TrainSet([paired, imgs], ViewSpec(size=8), corpus=["t"], image_only_ratio=bad)
    with pytest.raises(UserError, match="no training source is image-only"):
        TrainSet([paired], ViewSpec(size=8), image_only_ratio=0.2)
    with pytest.raises(UserError, match="every training source is image-only"):
        TrainSet([imgs], ViewSpec(size=8), corpus=["t"], image_only_ratio=0.2)
    assert datasets.repeat(imgs, 2).image_only and datasets.mixup(imgs, 2).image_only


def test_image_files_and_csv_images(tmp_path):
    for k in range(3):
        sub = tmp_path / "imgs" / ("a" if k else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), k * 50, np.uint8)).save(sub / f"x{k}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    src = datasets.image_files(str(tmp_path / "imgs"))
    assert len(src) == 3 and src.captions is None and datasets.is_image_only(src)
    assert src.open(0).size == (6, 6)
    csv = tmp_path / "list.csv"
    csv.write_text("filepath,other\nimgs/x0.png,1\nimgs/a/x1.png,2\n")
    c = datasets.csv_images(str(csv), sep=",")
    assert len(c) == 2 and c.captions is None and c.image_only and str(csv) in c.identity_files()
    with pytest.raises(UserError, match="no column 'path'"):
        datasets.csv_images(str(csv), img_key="path", sep=",")


def test_config_refuses_bad_ratio_and_image_only_retrieval():
    cfg = compose(["data=offline_pool", "data.train.image_only_ratio=1.5",
                   "+data.eval.retrieval=[{name: pool, source: {_target_: distill.datasets.image_only, "
                   "source: {_target_: distill.datasets.tuxpaint, split: val}}}]"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    problems = e.value.problems
    assert any(p.startswith("data.train.image_only_ratio=1.5 is not in [0, 1]") for p in problems)
    assert any(p.startswith("data.eval.retrieval[0].source is image-only") for p in problems)
    assert all("\n" not in p for p in problems)


def test_build_eval_sets_refuses_image_only_retrieval_before_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the eval set was loaded before the check")

    monkeypatch.setattr(data_build, "load_eval_set", boom)
    cfg = OmegaConf.create({"image_size": 8, "eval": {"retrieval": [
        {"name": "pool", "source": {"_target_": "distill.datasets.image_only",
                                    "source": {"_target_": "distill.datasets.image_files", "root": "/nonexistent"}}}]}})
    monkeypatch.setattr(datasets, "image_files", lambda root: datasets.ImageOnly(_Src("imgs", 2)))
    with pytest.raises(UserError, match="retrieval eval set pool is image-only"):
        data_build.build_eval_sets(cfg)


def test_offline_pool_is_opt_in():
    assert compose(["data=offline"]).data.train.get("image_only_ratio") is None
    cfg = compose(["data=offline_pool"])
    assert 0 < cfg.data.train.image_only_ratio < 1
    assert cfg.data.train.image_only_sources[0]._target_ == "distill.pool.general_pool"
    assert OmegaConf.to_container(cfg.data.train.sources) == OmegaConf.to_container(compose(["data=offline"]).data.train.sources)

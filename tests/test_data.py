import torch

from distill.data import ResumableSampler, TrainSet, ViewSpec, augmented_view, build_corpus, collate, eval_view
from tests.conftest import ArraySource


def test_views_are_deterministic_and_in_range():
    src = ArraySource(4)
    ds = TrainSet([src], ViewSpec(size=24, views=3, augment=True, seed=5))
    a, b = ds[4]["image"], ds[4]["image"]
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    # different views of one image differ, and the seed is stable across instances
    assert not torch.equal(ds[3]["image"], ds[4]["image"])
    ds2 = TrainSet([src], ViewSpec(size=24, views=3, augment=True, seed=5))
    assert ds2.view_seed(4) == ds.view_seed(4)
    assert ds2.fingerprint() == ds.fingerprint()
    assert TrainSet([src], ViewSpec(size=24, views=3, augment=True, seed=6)).fingerprint() != ds.fingerprint()


def test_eval_view_matches_augment_off():
    src = ArraySource(2)
    ds = TrainSet([src], ViewSpec(size=16))
    assert torch.equal(ds[1]["image"], eval_view(src.open(1), 16))
    v = augmented_view(src.open(0), 16, seed=1)
    assert v.shape == (3, 16, 16)


def test_unpaired_images_draw_texts_from_corpus_and_captions_pair():
    cap, nocap = ArraySource(3, name="a"), ArraySource(3, captions=False, name="b")
    ds = TrainSet([cap, nocap], ViewSpec(size=16), corpus=["x one", "x two"])
    assert ds.paired(0) and not ds.paired(3)
    assert ds.texts[ds.text_index(0)] == "a photo of thing number 0"
    assert ds.texts[ds.text_index(4)] in ("x one", "x two")
    batch = collate([ds[0], ds[1]])
    assert batch["paired"] is True and batch["image"].shape == (2, 3, 16, 16)
    assert collate([ds[0], ds[3]])["paired"] is False


def test_broken_images_are_skipped_and_counted():
    src = ArraySource(5, broken=(1, 3))
    ds = TrainSet([src], ViewSpec(size=16))
    batch = collate([ds[i] for i in range(5)])
    assert batch["index"].tolist() == [0, 2, 4]
    assert batch["skipped"] == [1, 3]
    assert ds.skips.count == 2


def test_corpus_excludes_eval_prompts_verbatim():
    corpus = build_corpus(templates=["a photo of a {}."], imagenet_classes=True,
                          extra=["A photo of a sandal"], exclude=["a photo of a sandal."])
    assert len(corpus) > 900
    assert all(t.lower().rstrip(".") != "a photo of a sandal" for t in corpus)


def test_sampler_resumes_and_splits_ranks():
    full = ResumableSampler(10, seed=3, batch_size=4)
    stream = [i for _, i in zip(range(24), iter(full))]
    assert sorted(stream[:10]) == list(range(10))  # an epoch is a permutation
    resumed = ResumableSampler(10, seed=3, start=8, batch_size=4)
    assert [i for _, i in zip(range(16), iter(resumed))] == stream[8:24]
    r0 = ResumableSampler(10, seed=3, batch_size=2, rank=0, world_size=2)
    r1 = ResumableSampler(10, seed=3, batch_size=2, rank=1, world_size=2)
    a = [i for _, i in zip(range(4), iter(r0))]
    b = [i for _, i in zip(range(4), iter(r1))]
    assert a[:2] + b[:2] + a[2:] + b[2:] == stream[:8]
    valid = [i % 2 == 0 for i in range(10)]
    assert all(i % 2 == 0 for _, i in zip(range(12), iter(ResumableSampler(10, valid=valid, batch_size=2))))

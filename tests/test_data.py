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


def test_view_memo_returns_bit_identical_views_within_its_budget_and_decodes_each_once():
    from distill.data import EvalSet, attach_view_memo

    spec = ViewSpec(size=24, views=2, augment=True, seed=3)
    plain = TrainSet([ArraySource(6, broken=(5,))], spec)
    src = ArraySource(6, broken=(5,))  # the same images
    memod = TrainSet([src], spec)
    evals = EvalSet("e", source=src, indices=[0, 1, 2, 3], size=20, labels=torch.zeros(4, dtype=torch.long))
    opened = []
    src.open = (lambda f: (lambda i: opened.append(i) or f(i)))(src.open)
    # room for the 4 eval views (3x20x20) and 7 of the 10 readable training views (3x24x24)
    memo = attach_view_memo(memod, {"classification": {"e": evals}}, (4 * 1200 + 7 * 1728) / 2**20)
    first = next(evals.chunks(4))
    assert torch.equal(first, torch.stack([eval_view(ArraySource(6).open(i), 20) for i in range(4)]))
    for _ in range(3):
        for j in range(len(plain)):
            a, b = memod[j]["image"], plain[j]["image"]
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))  # bit-identical hits
        assert torch.equal(next(evals.chunks(4)), first)
    st = memo.stats()
    assert st["views"] == 11 and st["full"] and st["hits"] == 2 * 7 + 3 * 4
    # eval: 4 opens once; training: 12 in the first pass, then only the 3 views past the budget and
    # the broken image's 2 items (still counted as skipped every time) in each later pass
    assert len(opened) == 4 + 12 + 2 * (3 + 2) and memod.skips.count == 6
    assert attach_view_memo(memod, {}, 0) is None


def test_view_memo_is_left_alone_inside_a_dataloader_worker(monkeypatch):
    import distill.data as data

    memo = data.ViewMemo(1)
    memo.put("k", torch.full((3, 2, 2), 0.2))
    monkeypatch.setattr(data, "get_worker_info", lambda: object())  # as in a worker process
    memo.put("w", torch.zeros(3, 2, 2))
    assert memo.get("k") is None and memo.stats()["views"] == 1
    monkeypatch.setattr(data, "get_worker_info", lambda: None)
    assert torch.equal(memo.get("k"), torch.full((3, 2, 2), 51 / 255)) and memo.get("w") is None


def test_skipped_images_are_named_for_the_report():
    """The report names what was skipped (first SkipLog.keep, with the count), not just how many."""
    from distill.data import load_eval_set
    from distill.imageio import SkipLog
    from distill.report import render_markdown, skipped_inputs

    src = ArraySource(6, broken=(1, 4), name="arr")
    es = load_eval_set("arr-set", src, 16)
    assert es.skipped == 2 and [f["key"] for f in es.skip_log["first"]] == [src.key(1), src.key(4)]
    many = SkipLog()
    for i in range(SkipLog.keep + 5):
        many.add(f"img{i}", "truncated")
    report = {"training": {"cache": {"skipped": 3, "skipped_first": ["a.png", "b.png", "c.png"]},
                           "skipped_inputs": many.as_dict(),
                           "data": {"eval_skipped": {"arr-set": 2}, "eval_skipped_first": {"arr-set": es.skip_log["first"]}}}}
    rows = skipped_inputs(report)
    assert [(w, n, len(f)) for w, n, f in rows] == [("training images (teacher cache)", 3, 3),
                                                    ("training images (read while training)", 25, SkipLog.keep),
                                                    ("eval set arr-set", 2, 2)]
    md = render_markdown({**report, "experiment": "x", "environment": {}, "variants": {}, "summary": {}})
    assert "## Skipped inputs" in md and "a.png; b.png; c.png" in md and ", and 5 more" in md and src.key(4) in md

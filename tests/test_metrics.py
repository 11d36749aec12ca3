"""Metrics on hand-made embeddings whose right answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.metrics import (agreement, as_percent, openai_templates, retrieval_recall, top1_agreement,
                             zero_shot_accuracy, zero_shot_classifier)

E = torch.eye(4)


def test_retrieval_permutation_case():
    # caption j = basis vector perm[j]; caption i is the right one for image i
    perm = torch.tensor([0, 2, 1, 3])
    text = E[perm]  # images 0 and 3 match their caption; 1 and 2 see the other one's caption as best
    r = retrieval_recall(E, text, ks=(1, 2, 4))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5
    # image 1's own caption (=e2) scores 0, tied with captions 0 and 3, below caption 2 (=e1):
    # pessimistic ties put it at rank 3 -> a hit only at k=4
    assert r["i2t_r2"] == 0.5 and r["i2t_r4"] == 1.0
    assert retrieval_recall(E, E, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_retrieval_graded_ranks():
    # caption i is the image's own vector mixed with the next image's: rank of the right caption known
    img = E
    text = F.normalize(torch.stack([E[0], 0.4 * E[1] + E[2], E[2] + 0.1 * E[3], E[2]]), dim=-1)
    r = retrieval_recall(img, text, ks=(1, 2, 4))
    # i2t ranks (wrong captions scoring >= the right one): img0 0; img1 0 (only caption with e1);
    # img2: cap3 (1.0) >= cap2 (0.995) -> 1; img3: right cap3 scores 0, cap2 0.0995 > 0 and cap0, cap1 tie at 0 -> 3
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r4"]) == (0.5, 0.75, 1.0)
    # t2i ranks: cap0 0; cap1: img2 (0.93) > img1 (0.37) -> 1; cap2 0; cap3 (=e2): right img3 scores 0,
    # img2 1.0, img0 and img1 tie at 0 -> 3
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r4"]) == (0.5, 0.75, 1.0)


def test_ties_are_pessimistic():
    const = torch.ones(4, 3)  # a collapsed encoder: every score equal
    r = retrieval_recall(const, const, ks=(1, 4))
    assert r["i2t_r1"] == 0.0 and r["t2i_r4"] == 1.0
    acc = zero_shot_accuracy(const, torch.ones(5, 3), torch.tensor([0, 1, 2, 3]), ks=(1, 5))
    assert acc == {"top1": 0.0, "top5": 1.0}


def test_multi_caption_retrieval():
    # 2 images, 5 captions: captions 0,1,2 -> image 0; captions 3,4 -> image 1
    img = E[:2]
    text = torch.stack([E[2], E[1] + 0.1 * E[0], E[0], E[1], E[3]])
    owner = [0, 0, 0, 1, 1]
    r = retrieval_recall(img, text, ks=(1, 2), image_for_text=owner)
    # i2t: image 0's best caption is caption 2 (=e0): hit@1; image 1 best is caption 3 (=e1) ahead of caption 1: hit@1
    assert r["i2t_r1"] == 1.0
    # t2i: cap0 (e2) ties 0/0 -> rank 1 (pessimistic) miss@1; cap1 -> image 1 scores higher: miss@1;
    # cap2 hit; cap3 hit; cap4 (e3) ties -> miss@1.  2/5 at 1, all at 2.
    assert r["t2i_r1"] == pytest.approx(0.4) and r["t2i_r2"] == 1.0
    with pytest.raises(ValueError, match="image_for_text"):
        retrieval_recall(img, text)
    with pytest.raises(ValueError, match="image index"):
        retrieval_recall(img, text, image_for_text=[0, 0, 0, 1, 2])


def test_zero_shot_accuracy_known_answers():
    classifier = E  # 4 classes
    images = torch.stack([E[0], E[1] + 0.5 * E[2], 0.9 * E[3] + E[1], E[0] + 0.2 * E[3]])
    labels = torch.tensor([0, 2, 3, 3])
    acc = zero_shot_accuracy(images, classifier, labels, ks=(1, 2, 3))
    assert acc == {"top1": 0.25, "top2": 1.0, "top3": 1.0}


def test_zero_shot_classifier_means_normalised_templates():
    # encoder: "a X" -> unit vector of X, "big X" -> 3 * unit vector of (X + e3), unnormalised on purpose
    basis = {"cat": E[0], "dog": E[1]}

    def encode_text(texts):
        out = []
        for t in texts:
            kind, name = t.split(" ", 1)
            out.append(basis[name] if kind == "a" else 3 * (basis[name] + E[3]))
        return torch.stack(out)

    clf = zero_shot_classifier(encode_text, ["cat", "dog"], ["a {}", lambda c: f"big {c}"], batch_size=3)
    s = 2 ** -0.5
    expected = F.normalize(torch.tensor([[1 + s, 0, 0, s], [0, 1 + s, 0, s]]) / 2, dim=-1)
    assert clf.shape == (2, 4)
    torch.testing.assert_close(clf, expected)
    # same maths as open_clip's builder
    assert torch.allclose(clf.norm(dim=-1), torch.ones(2))


def test_openai_templates_are_open_clips_80():
    t = openai_templates()
    assert len(t) == 80 and callable(t[0]) and "cat" in t[0]("cat")


def test_agreement_and_top1_agreement():
    a = torch.randn(6, 8)
    assert agreement(a, a) == pytest.approx(1.0)
    assert agreement(a, -a) == pytest.approx(-1.0)
    assert agreement(a, 5 * a) == pytest.approx(1.0)  # scale-free
    la = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    lb = torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 0, 3], [0, 1, 0]])
    assert top1_agreement(la, lb) == 0.5
    with pytest.raises(ValueError):
        agreement(a, a[:3])


def test_as_percent():
    assert as_percent({"top1": 0.123456, "top5": 1.0}) == {"top1": 12.35, "top5": 100.0}

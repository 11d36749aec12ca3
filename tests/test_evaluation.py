"""The one evaluation path (distill.evaluation): hand-computed numbers on a tiny set, streamed ==
all-at-once, bootstrap intervals, and the intervals in report.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill import evaluation
from distill.bench import Variant, measure_variants
from distill.data import EvalSet, eval_view, load_eval_set
from distill.metrics import bootstrap_ci
from distill.evaluation import evaluate_encoder
from distill.report import render_markdown
from tests.conftest import ArraySource

E = torch.eye(4)
CLASSES = ["cat", "dog", "bird"]
# image i is a constant image of value i / 10, so a table encoder can tell which image it was given
IMAGES = torch.stack([torch.full((3, 4, 4), i / 10) for i in range(4)])
STUDENT = F.normalize(torch.stack([E[0], E[1] + 0.5 * E[2], E[2], E[0] + 0.2 * E[1]]), dim=-1)
TEACHER = torch.stack([E[0], E[1], E[2], E[1]])
TEXTS = {"a cat": E[0], "a dog": E[1], "a bird": E[2], "c0": E[0], "c1": E[1], "c2": E[2], "c3": E[3]}


class TableEncoder:
    """Image i -> row i of a fixed table, text -> a fixed vector; records the image batch sizes it saw."""

    image_size = 4

    def __init__(self, table: torch.Tensor):
        self.table, self.batches = table, []

    def encode_image(self, images):
        self.batches.append(images.shape[0])
        # clamped: the bench also times it on random images
        return self.table[(images[:, 0, 0, 0] * 10).round().long().clamp(max=len(self.table) - 1)]

    def encode_text(self, texts):
        return torch.stack([TEXTS.get(t, E[3]) for t in texts])  # the bench times one caption of its own


def _sets(images=IMAGES):
    return {"classification": {"pets": EvalSet("pets", images, labels=torch.tensor([0, 2, 2, 1]),
                                               classnames=CLASSES, templates=["a {}"])},
            "retrieval": {"caps": EvalSet("caps", images, captions=["c0", "c1", "c2", "c3"])}}


def test_one_path_matches_a_hand_computation():
    res = evaluation.evaluate(TableEncoder(STUDENT), _sets())
    # argmax classes [cat, dog, bird, cat] vs labels [cat, bird, bird, dog]; 3 classes, so top5 is everything
    assert res["classification"]["pets"].metrics == {"top1": 0.5, "top5": 1.0}
    # image 3 and caption 3 (= e3) score 0 against each other, tied with 3 wrong candidates: rank 3
    want = {"i2t_r1": 0.75, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 0.75, "t2i_r5": 1.0, "t2i_r10": 1.0}
    assert res["retrieval"]["caps"].metrics == want
    # the training-time path and the bench give the same numbers
    flat = evaluate_encoder(TableEncoder(STUDENT), _sets())
    assert flat == {"pets/top1": 0.5, "pets/top5": 1.0, **{f"caps/{k}": v for k, v in want.items()}}
    rows = measure_variants([Variant("t", "teacher", "torch", "fp32", TableEncoder(TEACHER)),
                             Variant("s", "student", "torch", "fp32", TableEncoder(STUDENT))], _sets(),
                            batch_sizes=(1,), threads=1, reference="t", warmup=0, repeats=1, settle_s=0)
    s = rows["s"]
    assert {k: s["zeroshot"]["pets"][k] for k in ("top1", "top5")} == {"top1": 0.5, "top5": 1.0}
    assert {k: s["retrieval"]["caps"][k] for k in want} == want
    # agreement with the teacher table: argmax [0,1,2,0] vs [0,1,2,1]; cosines 1, 1/sqrt(1.25), 1, 0.2/sqrt(1.04)
    cos = (2 + 1 / math.sqrt(1.25) + 0.2 / math.sqrt(1.04)) / 4
    assert s["agreement"]["pets"] == {"image_cosine": pytest.approx(cos, abs=1e-6), "top1": 0.75}
    assert s["agreement"]["retrieval/caps"]["image_cosine"] == pytest.approx(cos, abs=1e-6)
    assert rows["t"]["agreement"]["pets"] == {"image_cosine": pytest.approx(1.0), "top1": 1.0}


def test_row_puts_each_interval_next_to_its_metric():
    r = evaluation.evaluate(TableEncoder(STUDENT), _sets())
    row = r["classification"]["pets"].row()
    assert list(row) == ["top1", "top1_ci95", "top5"]
    assert row["top1_ci95"][0] <= row["top1"] <= row["top1_ci95"][1]
    assert list(r["retrieval"]["caps"].row())[:2] == ["i2t_r1", "i2t_r1_ci95"]
    assert evaluation.evaluate(TableEncoder(STUDENT), _sets(), resamples=0)["retrieval"]["caps"].ci95 == {}


def test_chunked_load_is_bit_identical_to_the_all_at_once_path():
    src = ArraySource(7, labels=True, broken=(2,))
    es = load_eval_set("synthetic", src, 24)
    # the old loader: every readable image through the eval transform, stacked at once
    old = torch.stack([eval_view(src.open(i), 24) for i in range(7) if i != 2])
    assert len(es) == 6 and es.skipped == 1 and es.labels.tolist() == [0, 1, 0, 1, 2, 0]
    assert torch.equal(torch.cat(list(es.chunks(4))), old)
    assert torch.equal(es.images, old) and torch.equal(es.head(2), old[:2])
    assert [c.shape[0] for c in es.chunks(4)] == [4, 2]


def test_streamed_evaluation_equals_unchunked_and_in_memory():
    src = ArraySource(9, captions=True, labels=True)
    streamed = load_eval_set("s", src, 16, templates=["a {}"])
    in_memory = EvalSet("m", streamed.images, labels=streamed.labels, classnames=streamed.classnames,
                        templates=["a {}"], captions=streamed.captions)

    class PixelEncoder:
        """Mean colour per quadrant through a fixed projection; texts hashed to fixed vectors."""

        def __init__(self):
            self.batches = []
            self.w = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))

        def encode_image(self, x):
            self.batches.append(x.shape[0])
            return F.adaptive_avg_pool2d(x, 2).flatten(1) @ self.w

        def encode_text(self, texts):
            return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(len(t) * 7 + ord(t[-1])))
                                for t in texts])

    out = {}
    for name, sets, chunk in (("small", streamed, 3), ("whole", streamed, 1000), ("memory", in_memory, 5)):
        enc = PixelEncoder()
        out[name] = evaluation.evaluate(enc, {"classification": {"x": sets}, "retrieval": {"x": sets}},
                                        image_batch=2, chunk_size=chunk)
        assert enc.batches == [2, 2, 2, 2, 1] * 2  # chunks are whole batches: the encoder's calls never change
    for name in ("small", "memory"):
        for kind in ("classification", "retrieval"):
            a, b = out[name][kind]["x"], out["whole"][kind]["x"]
            assert torch.equal(a.image_emb, b.image_emb) and a.metrics == b.metrics and a.ci95 == b.ci95


def test_bootstrap_contains_the_estimate_narrows_and_matches_a_plain_loop():
    rng = np.random.default_rng(1)
    small = (rng.random(100) < 0.4).astype(float)
    big = np.tile(small, 20)  # same rate, 20x the images
    lo_s, hi_s = bootstrap_ci({"top1": small}, 100)["top1"]
    lo_b, hi_b = bootstrap_ci({"top1": big}, 2000)["top1"]
    p = small.mean()
    assert lo_s <= p <= hi_s and lo_b <= p <= hi_b
    assert (hi_b - lo_b) < 0.4 * (hi_s - lo_s)  # about 1 / sqrt(20) as wide
    # the vectorised draws equal the textbook loop: resample the images with replacement, recompute, percentiles
    loop_rng = np.random.default_rng(0)
    stats = [small[loop_rng.integers(0, 100, 100)].mean() for _ in range(1000)]
    assert bootstrap_ci({"top1": small}, 100)["top1"] == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])))
    assert bootstrap_ci({"top1": small}, 100, seed=3) != bootstrap_ci({"top1": small}, 100)


def test_bootstrap_resamples_images_with_all_their_captions():
    hits = np.array([1, 1, 0, 0, 1, 0], float)  # captions of images [0, 0, 1, 1, 2, 2]
    owners = {"t2i_r1": [0, 0, 1, 1, 2, 2]}
    lo, hi = bootstrap_ci({"t2i_r1": hits}, 3, owners)["t2i_r1"]
    # every image has 2 captions: a resample's rate is the mean of the drawn images' rates (1, 0, 0.5)
    per_image = np.array([1.0, 0.0, 0.5])
    r = np.random.default_rng(0)
    stats = [per_image[r.integers(0, 3, 3)].mean() for _ in range(1000)]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])))
    with pytest.raises(ValueError):
        bootstrap_ci({"x": hits}, 0)


def test_report_markdown_shows_the_intervals():
    row = {"status": "ok", "role": "student", "runtime": "torch", "precision": "fp32",
           "zeroshot": {"fm": {"top1": 0.412, "top1_ci95": [0.381, 0.44], "top5": 0.9}},
           "retrieval": {"tux": {**{f"{d}_r{k}": 0.5 for d in ("i2t", "t2i") for k in (1, 5, 10)},
                                 "i2t_r1_ci95": [0.25, 0.75]}}}
    old = {**row, "zeroshot": {"fm": {"top1": 0.3, "top5": 0.8}}}  # a report written before intervals
    md = render_markdown({"experiment": "x", "variants": {"s": row, "o": old}})
    assert "41.20 [38.10, 44.00] / 90.00" in md and "30.00 / 80.00" in md
    assert "50.00 [25.00, 75.00] / 50.00 / 50.00" in md

import json

import numpy as np
import pytest
import torch

from distill.cache import build_or_load, cache_fingerprint
from distill.data import TrainSet, ViewSpec
from tests.conftest import ArraySource


def _set(**kw):
    return TrainSet([ArraySource(10, broken=(7,))], ViewSpec(size=32, views=2, augment=True, seed=1), **kw)


def test_cache_matches_online_teacher_and_skips_unreadable(tmp_path, tiny_teacher):
    ds = _set()
    cache = build_or_load(tiny_teacher, ds, tmp_path, chunk_size=6, batch_size=4, progress=False)
    assert cache.image_emb.shape == (20, 32) and cache.image_emb.dtype == np.float16
    assert cache.valid.sum() == 18 and not cache.valid[14] and not cache.valid[15]
    assert cache.manifest["skipped"] == 2 and cache.manifest["logit_scale"] == pytest.approx(tiny_teacher.logit_scale)
    j = torch.tensor([0, 5, 13])
    online = tiny_teacher.encode_image(torch.stack([ds[i]["image"] for i in j.tolist()]))
    assert torch.allclose(cache.image_targets(j), online, atol=2e-3)  # fp16 storage
    t = torch.tensor([ds.text_index(i) for i in j.tolist()])
    assert torch.allclose(cache.text_targets(t), tiny_teacher.encode_text([ds.texts[k] for k in t.tolist()]), atol=2e-3)


def test_cache_is_reused_and_fingerprint_tracks_inputs(tmp_path, tiny_teacher):
    ds = _set()
    a = build_or_load(tiny_teacher, ds, tmp_path, progress=False)
    mtime = (a.path / "image_emb.npy").stat().st_mtime_ns
    b = build_or_load(tiny_teacher, ds, tmp_path, progress=False)
    assert b.path == a.path and (b.path / "image_emb.npy").stat().st_mtime_ns == mtime
    other = TrainSet([ArraySource(10, broken=(7,))], ViewSpec(size=32, views=2, augment=True, seed=2))
    assert cache_fingerprint(tiny_teacher, other) != cache_fingerprint(tiny_teacher, ds)
    c = build_or_load(tiny_teacher, other, tmp_path, progress=False)
    assert c.path != a.path


def test_interrupted_build_resumes_to_identical_result(tmp_path, tiny_teacher):
    ds = _set()
    ref = build_or_load(tiny_teacher, ds, tmp_path / "ref", chunk_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(tiny_teacher, ds, tmp_path / "r", chunk_size=4, progress=False, _stop_after_chunks=2)
    partial = next((tmp_path / "r").glob("*.partial"))
    assert len(json.loads((partial / "progress.json").read_text())["done_chunks"]) == 2
    got = build_or_load(tiny_teacher, ds, tmp_path / "r", chunk_size=4, progress=False)
    assert not partial.exists()
    np.testing.assert_array_equal(np.asarray(got.image_emb), np.asarray(ref.image_emb))
    np.testing.assert_array_equal(got.valid, ref.valid)


class _CountingTexts:
    """A teacher stand-in for text embeddings: counts how many texts it encodes."""

    embed_dim = 4
    fingerprint = "counting-v1"

    def __init__(self):
        self.encoded = 0

    def encode_text(self, texts):
        self.encoded += len(texts)
        return torch.nn.functional.normalize(torch.tensor([[len(t), 1.0, 0.0, t.count("a")] for t in texts]), dim=-1)


def test_text_embeddings_are_computed_once_per_teacher_and_texts(tmp_path):
    from distill.cache import text_embeddings

    t = _CountingTexts()
    texts = ["a", "cat", "banana", "dog"]
    first = text_embeddings(t, texts, tmp_path, batch_size=3, progress=False)
    assert t.encoded == 4 and first.shape == (4, 4) and first.dtype == np.float32
    np.testing.assert_allclose(first, t.encode_text(texts).numpy(), atol=1e-3)  # stored as float16
    t.encoded = 0
    again = text_embeddings(t, texts, tmp_path, progress=False)
    assert t.encoded == 0 and np.array_equal(again, first)
    text_embeddings(t, texts[:3], tmp_path, progress=False)  # other texts: a new entry
    assert t.encoded == 3
    assert len(list((tmp_path / "texts").glob("*.npy"))) == 2 and not list((tmp_path / "texts").glob("*tmp*"))

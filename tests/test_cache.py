import json
import os

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
    assert cache.manifest["skipped_first"] == [ds.key(14), ds.key(15)]  # named for the report
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
    # a teacher whose text tower is unchanged (other image weights: another fingerprint) reuses the entry
    t.encoded, t.fingerprint, t.text_fingerprint = 0, "tuned-image", t.fingerprint
    assert np.array_equal(text_embeddings(t, texts, tmp_path, progress=False), first) and t.encoded == 0
    t.text_fingerprint = "tuned-text"
    text_embeddings(t, texts, tmp_path, progress=False)
    assert t.encoded == 4


# ---------------------------------------------------------------- data identity: files, not paths


def _noise_png(path, seed, size=(40, 48)):
    """A PNG of random pixels, stored uncompressed so that every seed gives the same file size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, compress_level=0)


def _folder_set(root):
    from distill.datasets import ClassFolder

    return TrainSet([ClassFolder(str(root))], ViewSpec(size=32, views=1))


@pytest.fixture
def png_folder(tmp_path):
    root = tmp_path / "imgs"
    for c, seeds in (("cat", (0, 1)), ("dog", (2, 3))):
        (root / c).mkdir(parents=True)
        for s in seeds:
            _noise_png(root / c / f"{s}.png", s)
    return root


def test_untouched_rerun_reuses_cache_and_manifest_records_the_rule(tmp_path, tiny_teacher, png_folder):
    from distill.cache import FILE_IDENTITY

    a = build_or_load(tiny_teacher, _folder_set(png_folder), tmp_path / "c", progress=False)
    mtime = (a.path / "image_emb.npy").stat().st_mtime_ns
    b = build_or_load(tiny_teacher, _folder_set(png_folder), tmp_path / "c", progress=False)
    assert b.path == a.path and (b.path / "image_emb.npy").stat().st_mtime_ns == mtime
    assert a.manifest["file_identity"] == FILE_IDENTITY and "blake2b" in FILE_IDENTITY
    (src,) = a.manifest["data_identity"]
    assert src["source"] == "folder:imgs" and src["files"] == 4 and len(src["digest"]) == 16


def test_image_replaced_in_place_rebuilds_the_cache(tmp_path, tiny_teacher, png_folder, caplog):
    ds = _folder_set(png_folder)
    old = build_or_load(tiny_teacher, ds, tmp_path / "c", progress=False)
    old_emb = np.asarray(old.image_emb, dtype=np.float32).copy()
    target = png_folder / "dog" / "2.png"
    j = ds.sources[0].paths.index(str(target))
    _noise_png(target, 99)  # new content at the same path (a new mtime too)
    ds2 = _folder_set(png_folder)
    assert ds2.fingerprint() == ds.fingerprint()  # the keys alone cannot tell
    with caplog.at_level("INFO", logger="distill.cache"):
        new = build_or_load(tiny_teacher, ds2, tmp_path / "c", progress=False)
    assert new.path != old.path
    assert any("changed since" in r.getMessage() and "folder:imgs" in r.getMessage() for r in caplog.records)
    new_emb = np.asarray(new.image_emb, dtype=np.float32)
    assert not np.allclose(new_emb[j], old_emb[j], atol=1e-2)
    others = [k for k in range(len(ds2)) if k != j]
    np.testing.assert_array_equal(new_emb[others], old_emb[others])
    assert new.manifest["data_identity"][0]["digest"] != old.manifest["data_identity"][0]["digest"]


def test_same_size_and_restored_mtime_is_caught_by_the_content_hash(tmp_path, tiny_teacher, png_folder):
    ds = _folder_set(png_folder)
    old = build_or_load(tiny_teacher, ds, tmp_path / "c", progress=False)
    target = png_folder / "cat" / "1.png"
    st = target.stat()
    _noise_png(target, 77)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    new = build_or_load(tiny_teacher, _folder_set(png_folder), tmp_path / "c", progress=False)
    assert new.path != old.path
    j = ds.sources[0].paths.index(str(target))
    assert not np.allclose(np.asarray(new.image_emb[j], np.float32), np.asarray(old.image_emb[j], np.float32), atol=1e-2)


def test_csv_regenerated_with_new_files_at_the_same_paths(tmp_path, tiny_teacher):
    import shutil

    from distill.datasets import CsvPairs

    d = tmp_path / "data"
    d.mkdir()
    for k in range(3):
        _noise_png(d / f"{k}.png", k)
    _noise_png(tmp_path / "other.png", 50)
    (d / "pairs.csv").write_text("img,cap\n0.png,zero\n1.png,one\n2.png,two\n")

    def make():
        return TrainSet([CsvPairs(str(d / "pairs.csv"), img_key="img", caption_key="cap", sep=",")],
                        ViewSpec(size=32))

    old = build_or_load(tiny_teacher, make(), tmp_path / "c", progress=False)
    shutil.copy2(tmp_path / "other.png", d / "1.png")  # copy tools keep the source's mtime
    new = build_or_load(tiny_teacher, make(), tmp_path / "c", progress=False)
    assert new.path != old.path
    assert not np.allclose(np.asarray(new.image_emb[1], np.float32), np.asarray(old.image_emb[1], np.float32), atol=1e-2)
    np.testing.assert_array_equal(np.asarray(new.image_emb[[0, 2]]), np.asarray(old.image_emb[[0, 2]]))
    # the CSV itself is part of the identity: rewriting it (same rows) is a new entry too
    again = build_or_load(tiny_teacher, make(), tmp_path / "c", progress=False)
    assert again.path == new.path
    (d / "pairs.csv").write_text("img,cap\n0.png,zero\n1.png,one\n2.png,two\n\n")
    assert build_or_load(tiny_teacher, make(), tmp_path / "c", progress=False).path != new.path


def test_file_identity_tracks_edits_at_either_end_of_big_files(tmp_path):
    from distill.cache import IDENTITY_BLOCK, file_identity

    p = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 5 * IDENTITY_BLOCK, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    st = p.stat()
    ref = file_identity(p)
    assert ref.startswith(f"{st.st_size}:{st.st_mtime_ns}:")
    for pos in (10, len(data) - 10):  # a byte changed in the first / last block, mtime restored
        changed = bytearray(data)
        changed[pos] ^= 0xFF
        p.write_bytes(bytes(changed))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file_identity(p) != ref
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_identity(p) == ref
    assert file_identity(tmp_path / "gone.png") == "missing"


def test_in_memory_sources_have_no_files_and_keep_a_stable_fingerprint(tiny_teacher):
    from distill.cache import data_identity

    ds = _set()
    assert data_identity(ds) == [{"source": "synthetic", "files": None, "digest": None}]
    assert cache_fingerprint(tiny_teacher, ds) == cache_fingerprint(tiny_teacher, _set())

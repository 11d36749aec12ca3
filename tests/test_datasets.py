"""Data sources: odd image files, CSV/folder/WebDataset sources, the packaged Debian sets."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from distill import datasets
from distill.data import TrainSet, ViewSpec, load_eval_set
from distill.errors import MissingDataError, UserError
from distill.imageio import MAX_SIDE, SkipLog, load_rgb, try_open


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """One class folder holding every kind of awkward file; returns (root, readable, unreadable)."""
    d = tmp_path / "messy" / "things"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    readable = {
        "rgb.jpg": _png_bytes(rgb, "JPEG"),
        "cmyk.jpg": _png_bytes(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _png_bytes(Image.fromarray((rng.integers(0, 65535, (16, 16))).astype(np.uint16))),
        "palette.png": _png_bytes(rgb.convert("P")),
        "palette_transparent.png": _png_bytes(rgb.convert("P"), transparency=0),
        "rgba.png": _png_bytes(Image.new("RGBA", (12, 12), (255, 0, 0, 0))),
        "la.png": _png_bytes(Image.new("LA", (12, 12), (10, 200))),
        "bw.png": _png_bytes(Image.new("1", (9, 9), 1)),
        "huge.png": _png_bytes(Image.new("L", (MAX_SIDE * 2 + 10, 40), 128), compress_level=1),
    }
    unreadable = {
        "empty.jpg": b"",
        "truncated.jpg": _png_bytes(rgb, "JPEG")[:200],
        "text.png": b"this is not an image at all",
    }
    for name, data in {**readable, **unreadable}.items():
        (d / name).write_bytes(data)
    return tmp_path / "messy", set(readable), set(unreadable)


def test_messy_folder_converts_readable_and_counts_unreadable(messy_folder):
    root, readable, unreadable = messy_folder
    src = datasets.ClassFolder(str(root))
    # a path that vanished after listing: the "missing" case
    src.paths.append(str(root / "things" / "gone.jpg"))
    src.labels.append(0)
    src.captions.append("a photo of a things.")
    skips = SkipLog(keep=3)
    ok = {}
    for i in range(len(src)):
        img = try_open(src, i, skips)
        if img is not None:
            assert img.mode == "RGB" and max(img.size) <= MAX_SIDE
            ok[src.key(i).rsplit("/", 1)[1]] = img
    assert set(ok) == readable
    assert skips.count == len(unreadable) + 1
    assert len(skips.first) == 3 and "skipped" in skips.summary() and "more" in skips.summary()
    # transparency goes onto white, not black
    assert ok["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    # 16-bit is rescaled by its range, not clipped to white
    g = np.asarray(ok["gray16.png"])
    assert g.min() == 0 and g.max() == 255
    # the training set and the eval loader survive the folder and count the same skips
    ds = TrainSet([src], ViewSpec(size=16))
    items = [ds[j] for j in range(len(ds))]
    assert sum(it["image"] is None for it in items) == len(unreadable) + 1 == ds.skips.count
    es = load_eval_set("messy", src, 16)
    assert es.images.shape[0] == len(readable) and es.skipped == len(unreadable) + 1


def test_source_with_nothing_readable_is_one_clear_error(tmp_path):
    d = tmp_path / "bad" / "cls"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="no readable image"):
        load_eval_set("bad", datasets.ClassFolder(str(tmp_path / "bad")), 16)


def test_load_rgb_missing_file():
    with pytest.raises(FileNotFoundError):
        load_rgb("/nonexistent/x.jpg")


def test_csv_pairs(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("img,cap\na.png,a red square\n/abs/b.png,missing one\n")
    src = datasets.CsvPairs(str(tmp_path / "pairs.csv"), img_key="img", caption_key="cap", sep=",")
    assert len(src) == 2 and src.captions == ["a red square", "missing one"]
    assert src.open(0).size == (8, 8) and src.key(1) == "/abs/b.png"
    # the teacher cache hashes the CSV itself and every image it names (kept by subset)
    assert src.identity_files() == [str(tmp_path / "pairs.csv"), str(tmp_path / "a.png"), "/abs/b.png"]
    assert src.subset([1]).identity_files() == [str(tmp_path / "pairs.csv"), "/abs/b.png"]
    with pytest.raises(UserError, match="no column 'filepath'"):
        datasets.CsvPairs(str(tmp_path / "pairs.csv"), sep=",")
    with pytest.raises(UserError, match="caption file not found"):
        datasets.CsvPairs(str(tmp_path / "nope.tsv"))


def test_class_folder_names_and_captions(tmp_path):
    for c in ("ankle_boot", "bag"):
        (tmp_path / c).mkdir()
        for k in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{k}.png")
    src = datasets.ClassFolder(str(tmp_path), templates=["a photo of a {}.", "a {}."], per_class=2)
    assert src.classnames == ["ankle boot", "bag"] and src.labels == [0, 0, 1, 1]
    assert all(c in ("a photo of a ankle boot.", "a ankle boot.") for c in src.captions[:2])
    assert datasets.ClassFolder(str(tmp_path)).captions == datasets.ClassFolder(str(tmp_path)).captions
    assert src.identity_files() == src.paths and len(src.paths) == 4


def test_webdataset_shards_index_and_read(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tf:
            for k in range(3):
                for ext, data in (("jpg", _png_bytes(Image.new("RGB", (10 + k, 8), "blue"), "JPEG")),
                                  ("txt", f"sample {s}-{k}".encode())):
                    info = tarfile.TarInfo(f"{s:03d}{k:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("lonely.txt")  # a caption without an image is ignored
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    src = datasets.WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"))
    assert len(src) == 6 and src.captions[4] == "sample 1-1"
    assert src.open(4).size == (11, 8)
    assert datasets.WebDatasetShards(str(tmp_path / "shard-000.tar"), limit=2).captions == ["sample 0-0", "sample 0-1"]
    # the cache keys on the shard files themselves, only those the items come from
    assert src.identity_files() == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    assert datasets.WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), limit=2).identity_files() == [
        str(tmp_path / "shard-000.tar")]
    with pytest.raises(UserError, match="shard not found"):
        datasets.WebDatasetShards(str(tmp_path / "shard-{000..002}.tar"))
    with pytest.raises(UserError, match="stream URL"):
        datasets.WebDatasetShards("https://example.com/x.tar")


def test_missing_debian_package_names_the_install_command(monkeypatch):
    import subprocess

    datasets.package_files.cache_clear()

    class Res:
        returncode, stdout = 1, ""

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Res())
    try:
        with pytest.raises(MissingDataError, match="apt-get install --no-install-recommends dataset-fashion-mnist"):
            datasets.package_files("dataset-fashion-mnist")
    finally:
        datasets.package_files.cache_clear()


def _have(pkg: str) -> bool:
    try:
        datasets.package_files(pkg)
        return True
    except MissingDataError:
        return False


@pytest.mark.skipif(not _have("dataset-fashion-mnist"), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_splits():
    tr, va, te = datasets.fashion_mnist("train"), datasets.fashion_mnist("val"), datasets.fashion_mnist("test")
    assert (len(tr), len(va), len(te)) == (55_000, 5_000, 10_000)
    assert not set(tr.key(i) for i in range(0, 55_000, 997)) & set(va.key(i) for i in range(5_000))
    pc = datasets.fashion_mnist("test", per_class=3)
    assert len(pc) == 30 and sorted(pc.labels) == sorted(list(range(10)) * 3)
    img = pc.open(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    inv = datasets.fashion_mnist("test", per_class=3, invert=True).open(0)
    assert (np.asarray(img) + np.asarray(inv) == 255).all()
    assert pc.classnames[9] == "Ankle boot"
    assert [f.rsplit("/", 1)[1] for f in pc.identity_files()] == ["t10k-images-idx3-ubyte.gz",
                                                                   "t10k-labels-idx1-ubyte.gz"]


@pytest.mark.skipif(not _have("tuxpaint-stamps-default"), reason="apt-get install tuxpaint-stamps-default")
def test_tuxpaint_pairs_and_split():
    all_, tr, va = datasets.tuxpaint("all"), datasets.tuxpaint("train"), datasets.tuxpaint("val")
    assert len(all_) == len(tr) + len(va) and len(all_) >= 500
    assert not set(tr.paths) & set(va.paths)
    assert 0.12 < len(va) / len(all_) < 0.28
    assert all(c and "=" not in c for c in all_.captions)
    assert not any("/symbols/" in p or "_mirror" in p for p in all_.paths)
    assert all_.open(0).mode == "RGB"


def test_repeat_makes_distinct_items_of_the_same_images():
    src = datasets.FileListSource("pairs", ["a.png", "b.png"], captions=["an a", "a b"], labels=[0, 1],
                                  classnames=["a", "b"])
    opened = []
    src.open = lambda i: opened.append(i) or i
    r = datasets.repeat(src, 3)
    assert len(r) == 6 and r.name == "pairs/x3"
    assert [r.key(i) for i in (0, 1, 2, 5)] == ["a.png#0", "b.png#0", "a.png#1", "b.png#2"]
    assert r.captions == ["an a", "a b"] * 3 and r.labels == [0, 1] * 3 and r.classnames == ["a", "b"]
    assert [r.open(i) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    with pytest.raises(UserError, match="times=0"):
        datasets.repeat(src, 0)


def test_mixup_blends_reproducible_pairs_of_distinct_images():
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    src = datasets.FileListSource("rgb", ["r.png", "b.png", "g.png"])
    src.open = lambda i: Image.new("RGB", (8, 8) if i else (4, 4), colours[i])
    m = datasets.mixup(src, 50, alpha=0.5, seed=1)
    assert len(m) == 50 and m.captions is None and m.labels is None
    assert [m.key(i) for i in range(50)] == [datasets.mixup(src, 50, alpha=0.5, seed=1).key(i) for i in range(50)]
    assert m.key(0) != datasets.mixup(src, 50, alpha=0.5, seed=2).key(0)
    for i in range(50):
        a, b, lam = m._draw(i)
        assert a != b and 0.0 <= lam <= 1.0
        img = m.open(i)
        assert img.size == ((4, 4) if a == 0 else (8, 8))  # the first image's size
        expected = np.round(lam * np.array(colours[a]) + (1 - lam) * np.array(colours[b]))
        assert np.abs(np.asarray(img)[1, 1].astype(float) - expected).max() <= 1.0
    with pytest.raises(UserError, match="at least 2 images"):
        datasets.mixup(src.subset([0]), 5)


def test_wrappers_and_trainset_pass_on_their_sources_files():
    src = datasets.FileListSource("rgb", ["r.png", "b.png", "g.png"], captions=["r", "b", "g"], index_files=["l.csv"])
    files = ["l.csv", "r.png", "b.png", "g.png"]
    assert datasets.repeat(src, 3).identity_files() == files
    assert datasets.mixup(src, 4).identity_files() == files

    class InMemory:  # a source without files (like tests.conftest.ArraySource)
        name, captions, labels, classnames = "mem", ["x"], None, None

        def __len__(self):
            return 1

        def key(self, i):
            return "mem/0"

    assert datasets.source_identity_files(InMemory()) is None
    assert datasets.repeat(InMemory(), 2).identity_files() is None
    ds = TrainSet([src, InMemory()], ViewSpec(size=8))
    assert ds.identity_files() == [("rgb", files), ("mem", None)]

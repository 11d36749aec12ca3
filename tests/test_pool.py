"""The packaged general pool (distill.pool): listing through dpkg, the held-out split, seeded crops, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill import datasets, pool
from distill.data import TrainSet, ViewSpec
from distill.errors import MissingDataError
from distill.imageio import SkipLog, try_open


@pytest.fixture
def fake_pool(tmp_path, monkeypatch):
    """Two fake packages: 'walls' with 3 photos (one corrupt), 'art' with 20 pictures and animation frames."""
    rng = np.random.default_rng(0)
    files: dict[str, list[str]] = {"walls": [], "art": []}
    w = tmp_path / "walls"
    w.mkdir()
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(w / f"photo{k}.jpg")
    (w / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (w / "readme.txt").write_text("x")
    a = tmp_path / "art"
    a.mkdir()
    for k in range(20):
        Image.fromarray(np.full((40, 30, 3), k * 10, np.uint8)).save(a / f"pic{chr(97 + k)}.png")
    Image.new("RGB", (40, 30)).save(a / "pica-attack-1.png")
    files["walls"] = sorted(str(p) for p in w.iterdir())
    files["art"] = sorted(str(p) for p in a.iterdir())

    def package_files(pkg):
        if pkg not in files:
            raise MissingDataError(f"data package {pkg} is not installed")
        return tuple(files[pkg])

    monkeypatch.setattr(pool, "package_files", package_files)
    monkeypatch.setattr(pool, "POOL_PARTS", {
        "walls": pool.PoolPart("walls", str(w) + "/", photos=True),
        "art": pool.PoolPart("art", str(a) + "/", base_sprites=True)})
    return tmp_path


def test_pool_lists_crops_and_splits_by_picture(fake_pool):
    allp = pool.general_pool("all", crops=3, heldout_fraction=0.3)
    assert len(allp) == 3 * 3 + 20  # 3 photo files x 3 crops (the corrupt one included) + 20 pictures, no frames
    assert allp.captions is None and datasets.is_image_only(allp)
    train, held = pool.general_pool("train", crops=3, heldout_fraction=0.3), pool.general_pool("heldout", crops=3,
                                                                                               heldout_fraction=0.3)
    keys = lambda s: {s.key(i) for i in range(len(s))}  # noqa: E731
    assert keys(train) | keys(held) == keys(allp) and not keys(train) & keys(held) and len(held) > 0
    pic = lambda k: k.split("#")[0]  # noqa: E731
    assert not {pic(k) for k in keys(train)} & {pic(k) for k in keys(held)}  # a photo's crops stay on one side
    assert keys(pool.general_pool("train", crops=3, heldout_fraction=0.3)) == keys(train)
    assert len(pool.general_pool("all", crops=0)) == 3 + 20


def test_crops_are_seeded_distinct_and_small(fake_pool):
    p = pool.general_pool("all", crops=4, max_side=64, seed=0)
    photo = [i for i in range(len(p)) if "photo0" in p.key(i)]
    assert len(photo) == 4
    boxes = [p.crop_box(i, 400, 300) for i in photo]
    assert len(set(boxes)) == 4
    for left, top, right, bottom in boxes:
        assert right - left == bottom - top and 0.35 * 300 - 1 <= right - left <= 0.7 * 300 + 1
    views = [np.asarray(p.open(i)) for i in photo]
    assert all(max(v.shape[:2]) <= 64 for v in views)
    assert np.array_equal(views[0], np.asarray(pool.general_pool("all", crops=4, max_side=64, seed=0).open(photo[0])))
    other = pool.general_pool("all", crops=4, max_side=64, seed=1)
    assert [other.crop_box(i, 400, 300) for i in photo] != boxes


def test_a_photo_is_decoded_once_for_its_neighbouring_crops(fake_pool, monkeypatch):
    import pickle

    p = pool.general_pool("all", crops=4, max_side=64, seed=0)
    fresh = pool.general_pool("all", crops=4, max_side=64, seed=0)
    fresh.KEEP = 0  # nothing kept: every crop decodes its photo
    decoded = []
    real = pool.load_rgb
    monkeypatch.setattr(pool, "load_rgb", lambda path: decoded.append(path) or real(path))
    photo = [i for i in range(len(p)) if "photo" in p.key(i)]
    kept = [np.asarray(p.open(i)) for i in photo]
    assert len(decoded) == 2  # two readable photos, four crops each
    assert all(np.array_equal(a, np.asarray(fresh.open(i))) for a, i in zip(kept, photo))  # same pixels
    assert len(decoded) == 2 + len(photo) and len(p._recent) <= p.KEEP
    assert len(pickle.loads(pickle.dumps(p))._recent) == 0  # a loader worker starts without the parent's photos


def test_corrupt_pool_image_is_skipped_and_counted(fake_pool):
    p = pool.general_pool("all", crops=2)
    bad = [i for i in range(len(p)) if "broken" in p.key(i)]
    skips = SkipLog()
    assert [try_open(p, i, skips) for i in bad] == [None, None] and skips.count == 2
    ds = TrainSet([p], ViewSpec(size=16), corpus=["a photo of a dog."])
    assert ds.load_view(bad[0]) is None and ds.skips.count == 1
    assert ds.load_view(bad[0] + 2).shape == (3, 16, 16)


def test_missing_package_is_one_line_naming_apt_get(fake_pool, monkeypatch):
    monkeypatch.setitem(pool.POOL_PARTS, "gone", pool.PoolPart("not-installed-pkg", "/usr/share/x/"))
    with pytest.raises(MissingDataError) as e:
        pool.general_pool("train")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install" in msg and "not-installed-pkg" in msg
    with pytest.raises(Exception, match="parts .*unknown"):
        pool.general_pool("train", parts=["nope"])


def test_pool_is_registered_and_installed_by_setup():
    assert datasets.SOURCES.get("general_pool") is pool.general_pool
    setup = (Path(__file__).resolve().parents[1] / "tools" / "setup.sh").read_text()
    assert all(pkg in setup for pkg in pool.POOL_PACKAGES)


def test_real_pool_when_installed():
    try:
        p = pool.general_pool("all", crops=2)
    except MissingDataError:
        pytest.skip("the pool's Debian packages are not installed (bash tools/setup.sh)")
    assert len(p) > 500 and p.open(0).mode == "RGB"

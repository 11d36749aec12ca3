"""The teacher cache's data identity hashes whole files, and concurrent builders of one entry build it once."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from distill.cache import DELAY_ENV, KILL_ENV, build_or_load, file_identity
from distill.data import TrainSet, ViewSpec
from tests.conftest import REPO


def _bmp(path, pixels: np.ndarray) -> None:
    """An uncompressed BMP: same dimensions give the same size, and rows map to byte ranges."""
    from PIL import Image

    Image.fromarray(pixels).save(path, format="BMP")


def _noise(seed: int, h: int = 300, w: int = 400) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_file_identity_sees_a_middle_edit_with_size_and_mtime_restored(tmp_path):
    p = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    st = p.stat()
    ref = file_identity(p)
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    assert file_identity(p) != ref


def test_middle_edit_of_a_large_image_rebuilds_the_cache(tmp_path, tiny_teacher):
    from distill.datasets import ClassFolder

    root = tmp_path / "imgs"
    for c, seeds in (("cat", (0, 1)), ("dog", (2, 3))):
        (root / c).mkdir(parents=True)
        for s in seeds:
            _bmp(root / c / f"{s}.bmp", _noise(s))

    def make():
        return TrainSet([ClassFolder(str(root))], ViewSpec(size=32, views=1))

    ds = make()
    old = build_or_load(tiny_teacher, ds, tmp_path / "c", progress=False)
    target = root / "dog" / "2.bmp"
    st, before = target.stat(), target.read_bytes()
    assert st.st_size > 4 * 64 * 1024
    pixels = _noise(2)
    pixels[100:200] = 255 - pixels[100:200]  # the middle third of the rows: the file's middle bytes
    _bmp(target, pixels)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = target.read_bytes()
    changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    assert len(after) == len(before) and target.stat().st_mtime_ns == st.st_mtime_ns
    assert changed.min() > 64 * 1024 and changed.max() < len(after) - 64 * 1024  # neither the head nor the tail

    new = build_or_load(tiny_teacher, make(), tmp_path / "c", progress=False)
    assert new.path != old.path
    j = ds.sources[0].paths.index(str(target))
    assert not np.allclose(np.asarray(new.image_emb[j], np.float32), np.asarray(old.image_emb[j], np.float32),
                           atol=1e-3)
    assert new.manifest["file_identity"] == "size+mtime_ns+blake2b(whole file)"


BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from distill.cache import build_or_load
from distill.data import TrainSet, ViewSpec
from distill.teachers.open_clip_teacher import OpenClipTeacher
from tests.conftest import TINY_TEACHER_CFG, ArraySource
teacher = OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0)
ds = TrainSet([ArraySource(24)], ViewSpec(size=32, views=2, seed=0))
c = build_or_load(teacher, ds, sys.argv[1], chunk_size=8, batch_size=4, progress=False)
print("entry", c.path, flush=True)
"""


def test_concurrent_builders_of_one_entry_build_it_once(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in (KILL_ENV, "RANK", "WORLD_SIZE")},
           "OMP_NUM_THREADS": "1", DELAY_ENV: "0:8"}  # a builder holds its build open 8 s: the other arrives meanwhile
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    built = sum(o.count("teacher cache built:") for o in outs)
    assert built == 1, "\n".join(outs)
    assert sum("is building it: waiting" in o or "teacher cache hit" in o for o in outs) == 1
    entries = {line.split()[1] for o in outs for line in o.splitlines() if line.startswith("entry ")}
    assert len(entries) == 1 and [p.name for p in cache.iterdir() if p.is_dir()] == [os.path.basename(*entries)]

"""The teacher cache built by two torchrun "nodes" equals a one-process build bit for bit.

Two ``torchrun --nnodes=2 --nproc_per_node=1`` launches meet at a c10d rendezvous on this machine
(gloo) and run ``python -m distill.cache_build`` on the smoke experiment (tiny random teacher):
(a) their entry equals the single-process one; (b) a rank SIGKILLed mid-build (the
DISTILL_CACHE_TEST_KILL hook) loses only the chunk it was embedding and a rerun completes the
entry, identical again; (c) ranks whose configs differ fail with one line before any work.
The in-process tests at the end cover the .partial folder's resume rules.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.cache import DELAY_ENV, KILL_ENV, TEXT_CHUNK_FACTOR, build_or_load
from distill.data import TrainSet, ViewSpec
from tests.conftest import REPO, ArraySource, free_port, torchrun_two_nodes

CHUNK = 8
OVERRIDES = ["+experiment=smoke", "device=cpu", "threads=1", f"cache.chunk_size={CHUNK}", "cache.batch_size=4"]
ARRAYS = ("image_emb.npy", "text_emb.npy", "valid.npy")
TIMEOUT = 300


_free_port = free_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", KILL_ENV, DELAY_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _build_args(cache_dir: Path, *extra: str) -> list[str]:
    return ["-m", "distill.cache_build", *OVERRIDES, f"cache.dir={cache_dir}", *extra]


def _run_single(cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_build_args(cache_dir)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)


def _run_two_nodes(tmp: Path, cache_dir: Path, node_extra=((), ()), **env: str) -> list[tuple[int, str]]:
    """(exit code, output) of each torchrun "node" building the cache."""
    return torchrun_two_nodes(_build_args(cache_dir), tmp, node_extra, env={KILL_ENV: "", **env}, timeout=TIMEOUT)


def _entry(cache_dir: Path) -> Path:
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    return entry


def _assert_same(got: Path, ref: Path) -> None:
    assert got.name == ref.name  # the same fingerprint
    for name in ARRAYS:
        np.testing.assert_array_equal(np.load(got / name), np.load(ref / name), err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The entry one process builds (``python -m distill.cache_build``, no torchrun)."""
    d = tmp_path_factory.mktemp("one")
    r = _run_single(d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((_entry(d) / "manifest.json").read_text())["build_ranks"] == 1
    return _entry(d)


@pytest.mark.slow
def test_two_nodes_build_the_same_entry_as_one_process(tmp_path, reference):
    results = _run_two_nodes(tmp_path, tmp_path / "c")
    assert [c for c, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    got = _entry(tmp_path / "c")
    _assert_same(got, reference)
    assert json.loads((got / "manifest.json").read_text())["build_ranks"] == 2
    shares = sorted(re.search(r"rank (\d)/2 embeds (\d+) of (\d+) chunks \(0 already", out).groups()
                    for _, out in results)
    (r0, n0, total), (r1, n1, _) = shares
    assert (r0, r1) == ("0", "1") and int(n0) > 0 and int(n1) > 0 and int(n0) + int(n1) == int(total)
    assert not list((tmp_path / "c").glob("*.partial"))


def _chunk_rows(ref: Path, name: str) -> tuple[str, np.ndarray]:
    """(array file, the reference rows) that the chunk file ``name`` holds."""
    kind, cid = name.removesuffix(".npz").split("-")
    size = CHUNK if kind == "image" else CHUNK * TEXT_CHUNK_FACTOR
    array = "image_emb.npy" if kind == "image" else "text_emb.npy"
    return array, np.load(ref / array)[int(cid) * size:(int(cid) + 1) * size]


@pytest.mark.slow
def test_killed_rank_loses_only_its_unfinished_chunk_and_the_rerun_completes(tmp_path, reference):
    results = _run_two_nodes(tmp_path, tmp_path / "c", **{KILL_ENV: "1:1"})
    assert all(c != 0 for c, _ in results)
    assert any("SIGKILL" in out for _, out in results)
    (part,) = (tmp_path / "c").glob("*.partial")
    done = sorted(p.name for p in (part / "chunks").glob("*.npz"))
    # rank 1 takes every other chunk from the second: it saved image-1 and died holding image-3
    assert "image-000001.npz" in done and "image-000003.npz" not in done
    assert not list((part / "chunks").glob(".image-000003*"))  # nothing half-written
    for name in done:  # every chunk on disk is whole and final
        array, rows = _chunk_rows(reference, name)
        with np.load(part / "chunks" / name) as z:
            np.testing.assert_array_equal(z["emb"], rows, err_msg=name)
    rerun = _run_single(tmp_path / "c")  # one process resumes what two left
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(done)} already built)" in rerun.stderr
    _assert_same(_entry(tmp_path / "c"), reference)
    assert not part.exists()


@pytest.mark.slow
def test_a_rank_finishing_long_after_the_other_outlasts_the_collective_timeout(tmp_path, reference):
    # the default group times out after 3 s (as NCCL's does after 10 minutes); rank 1 ends its share
    # 10 s after rank 0: the end-of-build wait must not use that timeout
    results = _run_two_nodes(tmp_path, tmp_path / "c", **{"DISTILL_DIST_TIMEOUT_S": "3", DELAY_ENV: "1:10"})
    assert [c for c, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    _assert_same(_entry(tmp_path / "c"), reference)


@pytest.mark.slow
def test_ranks_with_different_configs_fail_with_one_line_before_any_work(tmp_path):
    results = _run_two_nodes(tmp_path, tmp_path / "c", node_extra=((), ("data.train.seed=1",)))
    for code, out in results:
        assert code != 0 and "exitcode  : 2" in out
        lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1, out[-3000:]
        assert lines[0].startswith("error: teacher cache: rank 1 disagrees with rank 0 on the training data "
                                   "(items, views with their seed, or texts): fingerprint ")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# ------------------------------------------------------------------ the .partial folder, in process


def _set() -> TrainSet:
    return TrainSet([ArraySource(10, broken=(7,))], ViewSpec(size=32, views=2, augment=True, seed=1))


def test_resumed_build_keeps_its_chunk_size_and_equals_a_fresh_one(tmp_path, tiny_teacher, caplog):
    ref = build_or_load(tiny_teacher, _set(), tmp_path / "ref", chunk_size=4, batch_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(tiny_teacher, _set(), tmp_path / "r", chunk_size=4, batch_size=3, progress=False,
                      _stop_after_chunks=2)
    with caplog.at_level("INFO", logger="distill.cache"):
        got = build_or_load(tiny_teacher, _set(), tmp_path / "r", chunk_size=6, batch_size=5, progress=False)
    assert any("with its chunk_size=4 batch_size=3" in r.getMessage() for r in caplog.records)
    for name in ARRAYS:
        np.testing.assert_array_equal(np.load(got.path / name), np.load(ref.path / name), err_msg=name)
    assert got.manifest["skipped"] == 2 and got.manifest["build_ranks"] == 1


def test_partial_folder_of_the_memmap_layout_is_discarded(tmp_path, tiny_teacher):
    from distill.cache import cache_fingerprint

    part = tmp_path / f"{cache_fingerprint(tiny_teacher, _set())}.partial"
    part.mkdir()
    (part / "image_emb.npy").write_bytes(b"stale")
    (part / "progress.json").write_text(json.dumps({"fingerprint": part.name[:-8], "done_chunks": [0, 1],
                                                    "text_done": True, "skipped": {}, "seconds": 1.0}))
    got = build_or_load(tiny_teacher, _set(), tmp_path, chunk_size=4, progress=False)
    ref = build_or_load(tiny_teacher, _set(), tmp_path / "ref", chunk_size=4, progress=False)
    for name in ARRAYS:
        np.testing.assert_array_equal(np.load(got.path / name), np.load(ref.path / name), err_msg=name)
    assert not part.exists()

"""Streaming WebDataset shards (distill/streaming.py): openers, splits, seeds, exact resume, bad input.

Every shard is written here into tmp_path (tiny PNG/JPEG images + .txt captions); http URLs are
served by a real http.server on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from distill.errors import UserError
from distill.streaming import StreamingShards, StreamLoader, expand_urls

REPO = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 4, 6


def _image(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 3, 8), ((i * 37) % 256, (i * 11) % 256, 90)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, start: int, n: int, corrupt: tuple[int, ...] = (), fmt: str = "PNG") -> list[str]:
    """A tar shard of samples start..start+n-1 (image + .txt); -> the member keys in file order."""
    ext = "png" if fmt == "PNG" else "jpg"
    keys = []
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            key = f"{i:06d}"
            img = b"\x89PNG this is not an image" if i in corrupt else _image(i, fmt)
            for name, data in ((f"{key}.{ext}", img), (f"{key}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


@pytest.fixture
def shards(tmp_path):
    """N_SHARDS shards of PER_SHARD samples (shard 1 holds JPEGs); -> (folder, {path: member keys})."""
    out = {}
    for s in range(N_SHARDS):
        p = tmp_path / f"shard-{s:03d}.tar"
        out[str(p)] = write_shard(p, s * PER_SHARD, PER_SHARD, fmt="JPEG" if s == 1 else "PNG")
    return tmp_path, out


def _pattern(folder: Path) -> str:
    return str(folder / f"shard-{{000..{N_SHARDS - 1:03d}}}.tar")


def _all_keys(layout: dict[str, list[str]]) -> list[str]:
    return [f"{p}#{k}" for p, keys in layout.items() for k in keys]


def _keys(samples) -> list[str]:
    return [s.key for s in samples]


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


@pytest.fixture
def http_root(shards):
    """The shard folder served over real HTTP on 127.0.0.1; -> (base URL, folder, layout)."""
    folder, layout = shards
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder, layout
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test output stays readable
        pass


# --------------------------------------------------------------------------------------------
# Openers: local paths, brace expansion, pipe:, http
# --------------------------------------------------------------------------------------------


def test_local_brace_pattern_yields_every_sample_in_file_order(shards):
    folder, layout = shards
    src = StreamingShards(_pattern(folder), buffer=0, shuffle_shards=False)
    samples = list(src.iter_reader(0, 1))
    assert _keys(samples) == _all_keys(layout)
    for s in samples:
        i = int(s.key.rsplit("#", 1)[1])
        assert s.caption == f"caption {i}"
        assert s.image.mode == "RGB" and s.image.size == (8 + i % 3, 8)  # PNG and JPEG both decode
    assert samples[-1].state["shards_done"] == N_SHARDS and samples[-1].state["samples"] == N_SHARDS * PER_SHARD


def test_url_lists_and_double_colon_expand_like_the_indexed_source(shards):
    folder, _ = shards
    a, b = str(folder / "shard-{000..001}.tar"), str(folder / "shard-{002..003}.tar")
    assert expand_urls(f"{a}::{b}") == expand_urls([a, b]) == expand_urls(_pattern(folder))
    assert len(expand_urls(_pattern(folder))) == N_SHARDS
    with pytest.raises(UserError, match="no shard URLs"):
        expand_urls("  ")


def test_pipe_urls_stream_the_same_samples(shards):
    folder, layout = shards
    src = StreamingShards(f"pipe:cat {_pattern(folder)}", buffer=0, shuffle_shards=False)
    got = [s.key.split("#", 1)[1] for s in src.iter_reader(0, 1)]
    assert got == [k for keys in layout.values() for k in keys]
    assert src.urls[0] == f"pipe:cat {folder}/shard-000.tar"


def test_http_urls_stream_over_real_http(http_root):
    base, _, layout = http_root
    src = StreamingShards(f"{base}/shard-{{000..{N_SHARDS - 1:03d}}}.tar", buffer=3, seed=1)
    samples = list(src.iter_reader(0, 1))
    assert sorted(s.key.split("#", 1)[1] for s in samples) == sorted(k for keys in layout.values() for k in keys)
    assert all(s.key.startswith(base) for s in samples)
    assert all(s.image.mode == "RGB" for s in samples)


# --------------------------------------------------------------------------------------------
# Splits and seeds
# --------------------------------------------------------------------------------------------


def test_split_by_node_and_worker_covers_each_sample_once(shards):
    folder, layout = shards
    seen: list[list[str]] = []
    for rank in range(2):  # two "nodes" by explicit rank/world, each with two real DataLoader workers
        src = StreamingShards(_pattern(folder), seed=3, buffer=4, rank=rank, world_size=2)
        loader = StreamLoader(src, batch_size=2, num_workers=2)
        seen.append([k for batch in loader for k in batch["key"]])
        assert loader.stats()["samples"] == len(seen[-1])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_all_keys(layout))


def test_readers_partition_shards_in_both_modes(shards):
    folder, _ = shards
    for resampled in (False, True):
        src = StreamingShards(_pattern(folder), resampled=resampled, seed=5, buffer=2)
        urls = [{s.key.split("#")[0] for s in _take(src.iter_reader(r, 4), 30 if resampled else PER_SHARD)}
                for r in range(4)]
        assert all(len(u) == 1 for u in urls)  # four readers, four shards: one shard each
        assert len(set().union(*urls)) == N_SHARDS


def test_resampled_is_endless_and_seeded(shards):
    folder, _ = shards

    def first(seed: int, n: int = 60) -> list[str]:
        return _keys(_take(StreamingShards(_pattern(folder), resampled=True, seed=seed, buffer=5).iter_reader(0, 1), n))

    a = first(7)
    assert len(a) == 60 > N_SHARDS * PER_SHARD  # endless: more samples than the data set holds
    assert a == first(7)
    assert a != first(8)


def test_one_epoch_shuffles_within_shards_and_shard_order_by_seed(shards):
    folder, layout = shards
    a = _keys(StreamingShards(_pattern(folder), seed=1, buffer=6).iter_reader(0, 1))
    b = _keys(StreamingShards(_pattern(folder), seed=2, buffer=6).iter_reader(0, 1))
    assert sorted(a) == sorted(b) == sorted(_all_keys(layout))
    assert a != b and a != _all_keys(layout)
    two = _keys(StreamingShards(_pattern(folder), seed=1, buffer=6, epochs=2).iter_reader(0, 1))
    assert two[:len(a)] == a and sorted(two[len(a):]) == sorted(a) and two[len(a):] != a  # epoch 1 reshuffled


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resampled", [False, True])
def test_reader_resumes_exactly_from_every_position(shards, resampled):
    folder, _ = shards
    (folder / "shard-002.tar").write_bytes(_cut_mid_member(folder / "shard-002.tar", 4))
    write_shard(folder / "shard-003.tar", 3 * PER_SHARD, PER_SHARD, corrupt=(3 * PER_SHARD + 2,))

    def reader(start=None):
        src = StreamingShards(_pattern(folder), resampled=resampled, seed=11, buffer=4, epochs=2)
        return src.iter_reader(0, 1, start)

    n = 40
    full = _take(reader(), n) if resampled else list(reader())
    for cut in range(1, len(full) - 1):
        state = json.loads(json.dumps(full[cut - 1].state))  # what a checkpoint stores
        rest = _take(reader(state), len(full) - cut) if resampled else list(reader(state))
        assert _keys(rest) == _keys(full[cut:]), cut
        assert rest[-1].state == full[-1].state, cut  # counters continue, nothing counted twice
    last = full[-1].state
    assert last["images_corrupt"] >= 1 and last["shards_truncated"] >= 1


@pytest.mark.parametrize("resampled", [False, True])
def test_loader_with_workers_resumes_the_exact_batch_sequence(shards, resampled):
    folder, _ = shards

    def loader():
        src = StreamingShards(_pattern(folder), resampled=resampled, seed=4, buffer=3, epochs=None)
        return StreamLoader(src, batch_size=4, num_workers=2, drop_last=True)

    full = [b["key"] for b in _take(iter(loader()), 14)]
    first = loader()
    it = iter(first)
    head = [next(it)["key"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    del it  # the run is gone; only the state survives
    again = loader()
    again.load_state_dict(state)
    tail = [b["key"] for b in _take(iter(again), 9)]
    assert head + tail == full
    assert state["workers"] == 2 and len(state["readers"]) == 2 and len(json.dumps(state)) < 2000


def test_one_epoch_resume_is_exact_where_readers_run_out_at_different_times(tmp_path):
    for s in range(5):  # 6 or 7 samples a shard: the two readers get 3 and 2 shards, batches end ragged
        write_shard(tmp_path / f"s-{s}.tar", s * 10, 6 + s % 2)

    def loader():
        return StreamLoader(StreamingShards(str(tmp_path / "s-{0..4}.tar"), seed=1, buffer=3), batch_size=3, num_workers=2)

    full = [b["key"] for b in loader()]
    assert sum(map(len, full)) == 32 and len(full[-1]) < 3
    for cut in (3, 8, 9, len(full) - 1):  # cuts before, at and after the shorter reader runs out
        first = loader()
        it = iter(first)
        head = [next(it)["key"] for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        del it
        again = loader()
        again.load_state_dict(state)
        assert head + [b["key"] for b in again] == full, cut


def test_resume_after_sigkill_continues_the_uninterrupted_stream(shards, tmp_path):
    folder, _ = shards
    record = tmp_path / "progress.json"
    setup = (f"from distill.streaming import StreamingShards, StreamLoader\n"
             f"src = StreamingShards({_pattern(folder)!r}, resampled=True, seed=9, buffer=5)\n"
             f"loader = StreamLoader(src, batch_size=3, num_workers=2)\n")
    script = setup + textwrap.dedent(f"""
        import json, os
        keys = []
        for batch in loader:  # checkpoint after every batch, atomically, then keep going until killed
            keys += batch["key"]
            with open({str(record)!r} + ".tmp", "w") as f:
                json.dump({{"keys": keys, "state": loader.state_dict()}}, f)
            os.replace({str(record)!r} + ".tmp", {str(record)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not record.exists() or len(json.loads(record.read_text())["keys"]) < 15):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the run and its loader workers
        proc.wait()
    saved = json.loads(record.read_text())
    ns: dict = {}
    exec(setup, ns)
    ns["loader"].load_state_dict(saved["state"])
    resumed = [k for b in _take(iter(ns["loader"]), 8) for k in b["key"]]
    exec(setup, ns)
    full = [k for b in _take(iter(ns["loader"]), len(saved["keys"]) // 3 + 8) for k in b["key"]]
    assert saved["keys"] + resumed == full


def test_state_refuses_another_worker_layout(shards):
    folder, _ = shards
    a = StreamLoader(StreamingShards(_pattern(folder)), batch_size=2, num_workers=0)
    next(iter(a))
    b = StreamLoader(StreamingShards(_pattern(folder)), batch_size=2, num_workers=2)
    with pytest.raises(UserError, match="workers saved 1 now 2"):
        b.load_state_dict(a.state_dict())
    c = StreamLoader(StreamingShards(_pattern(folder), seed=99), batch_size=2)
    c.load_state_dict(a.state_dict())
    assert c.source.seed == 0  # the recorded seed wins, so the resumed stream is the saved one


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _cut_mid_member(path: Path, member: int) -> bytes:
    """The shard's bytes cut inside the data of its ``member``-th tar member."""
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        m = tf.getmembers()[member]
    return data[:m.offset_data + m.size // 2]


def _cut_at_header(path: Path, member: int) -> bytes:
    """The shard's bytes cut just before the header of its ``member``-th member (no end-of-archive block)."""
    with tarfile.open(path) as tf:
        return path.read_bytes()[:tf.getmembers()[member].offset]


def test_missing_and_truncated_shards_are_skipped_and_counted(shards):
    folder, layout = shards
    paths = list(layout)
    Path(paths[0]).unlink()
    Path(paths[1]).write_bytes(_cut_mid_member(Path(paths[1]), 5))  # cut in sample 2's image
    Path(paths[2]).write_bytes(_cut_at_header(Path(paths[2]), 7))  # cut before sample 3's caption
    loader = StreamLoader(StreamingShards(_pattern(folder), buffer=0, shuffle_shards=False), batch_size=4)
    keys = [k for b in loader for k in b["key"]]
    assert keys == ([f"{paths[1]}#{k}" for k in layout[paths[1]][:2]] + [f"{paths[2]}#{k}" for k in layout[paths[2]][:3]]
                    + [f"{paths[3]}#{k}" for k in layout[paths[3]]])
    st = loader.stats()
    assert (st["shards_failed"], st["shards_truncated"], st["shards_done"]) == (1, 2, 3)
    assert st["samples"] == len(keys)
    assert f"shard {paths[0]} could not be read (file not found)" in st["failures"][0]
    assert "ended after 2 sample(s)" in st["failures"][1] and "re-copy or re-download" in st["failures"][1]


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 5, corrupt=(1, 3))
    loader = StreamLoader(StreamingShards(str(tmp_path / "a.tar"), buffer=0), batch_size=2)
    keys = [k.rsplit("#", 1)[1] for b in loader for k in b["key"]]
    assert keys == ["000000", "000002", "000004"]
    st = loader.stats()
    assert st["images_corrupt"] == 2 and st["samples"] == 3
    assert "unreadable image" in st["failures"][0] and "000001" in st["failures"][0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_unreachable_url_gives_one_line_naming_url_and_fix(workers):
    url = f"http://127.0.0.1:{_closed_port()}/shard-000.tar"
    loader = StreamLoader(StreamingShards(url, resampled=True), batch_size=2, num_workers=workers)
    with pytest.raises(UserError) as e:
        next(iter(loader))
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "could not connect" in msg and "check the URL" in msg


def test_http_404_and_failing_pipe_name_the_url(http_root, tmp_path):
    base, folder, _ = http_root
    bad = [f"{base}/nope.tar", f"pipe:cat {tmp_path}/gone.tar"]
    loader = StreamLoader(StreamingShards(bad + [str(folder / "shard-000.tar")], buffer=0, shuffle_shards=False),
                          batch_size=3)
    assert sum(len(b["key"]) for b in loader) == PER_SHARD
    lines = loader.stats()["failures"]
    assert lines[0].startswith(f"shard {base}/nope.tar could not be read (curl exit 22")
    assert lines[1].startswith(f"shard pipe:cat {tmp_path}/gone.tar could not be read (the command exited with status 1)")
    with pytest.raises(UserError, match="exited with status 1"):
        list(StreamLoader(StreamingShards(bad[1]), batch_size=1))


def test_all_local_shards_missing_raises_with_workers(tmp_path):
    loader = StreamLoader(StreamingShards(str(tmp_path / "x-{0..3}.tar"), resampled=True), batch_size=2, num_workers=2)
    with pytest.raises(UserError, match=r"x-0\.tar could not be read \(file not found\): check data.train_urls"):
        next(iter(loader))


def test_garbage_over_http_reports_the_tar_error_not_curls_broken_pipe(http_root):
    base, folder, _ = http_root
    (folder / "garbage.tar").write_bytes(os.urandom(1 << 20))  # larger than a pipe buffer: curl is mid-write
    loader = StreamLoader(StreamingShards([f"{base}/garbage.tar", str(folder / "shard-000.tar")], buffer=0,
                                          shuffle_shards=False), batch_size=8)
    assert sum(len(b["key"]) for b in loader) == PER_SHARD
    line = loader.stats()["failures"][0]
    assert line.startswith(f"shard {base}/garbage.tar could not be read (") and "curl exit" not in line
    assert "check that it is a (gzipped) tar shard" in line


def test_gzipped_shards_stream(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 3)
    import gzip

    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    src = StreamingShards(str(tmp_path / "a.tar.gz"), buffer=0)
    assert [s.caption for s in src.iter_reader(0, 1)] == ["caption 0", "caption 1", "caption 2"]


def test_endless_stream_of_only_corrupt_images_stops_with_a_user_error(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 3, corrupt=(0, 1, 2))
    src = StreamingShards(str(tmp_path / "a.tar"), resampled=True)
    with pytest.raises(UserError, match="holds a readable image .*skipping unreadable image"):
        next(src.iter_reader(0, 1))


def test_a_new_iter_continues_and_reset_starts_over(shards):
    folder, layout = shards
    loader = StreamLoader(StreamingShards(_pattern(folder), buffer=0, shuffle_shards=False), batch_size=4)
    first = next(iter(loader))["key"]
    second = next(iter(loader))["key"]
    assert first + second == _all_keys(layout)[:8]
    loader.reset()
    assert next(iter(loader))["key"] == first


def _ddp_rank(rank: int, port: int, pattern: str, out_dir: str) -> None:
    import torch.distributed as dist

    from distill import distributed as dist_utils

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        def loader():  # the rank comes from torch.distributed, not from arguments
            return StreamLoader(StreamingShards(pattern, resampled=True, seed=2, buffer=3), batch_size=2)

        full = [b["key"] for b in _take(iter(loader()), 7)]
        first = loader()
        head = [b["key"] for b in _take(iter(first), 4)]
        state = first.state_dict()  # a collective: both ranks' readers end up in it
        counts = first.stats(all_ranks=True)
        again = loader()
        again.load_state_dict(json.loads(json.dumps(state)))
        tail = [b["key"] for b in _take(iter(again), 3)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"full": full, "resumed": head + tail, "state": state, "counts": counts}, f)
    finally:
        dist_utils.cleanup()


@pytest.mark.slow
def test_torch_distributed_ranks_split_gather_state_and_resume(shards, tmp_path):
    import torch.multiprocessing as mp

    folder, _ = shards
    mp.spawn(_ddp_rank, args=(_closed_port(), _pattern(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["resumed"] == r["full"]
        assert sorted(r["state"]["readers"]) == ["0", "1"] and r["state"]["world_size"] == 2
        assert r["counts"]["samples"] == 2 * 4 * 2  # two ranks x four batches x two samples
    shard_sets = [{k.split("#")[0] for b in r["full"] for k in b} for r in ranks]
    assert shard_sets[0].isdisjoint(shard_sets[1])

"""Tar-shard primitives (distill/shards.py): one module that both the streaming reader and the
reinforced-shard builder import, the size cap per tar member, and the stall timeout on pipe: shards."""

from __future__ import annotations

import ast
import io
import tarfile
import time
from pathlib import Path

import pytest

from distill import shards
from distill.errors import UserError
from distill.streaming import StreamingShards, StreamLoader
from tests.test_streaming import write_shard

PKG = Path(__file__).resolve().parents[1] / "distill"


def _imported(module: str) -> set[str]:
    """Every module ``distill/<module>.py`` imports, function-level imports included."""
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_streaming_and_reinforce_share_shards_not_each_other():
    assert "distill.reinforce" not in _imported("streaming")
    assert "distill.streaming" not in _imported("reinforce")
    assert "distill.shards" in _imported("streaming") and "distill.shards" in _imported("reinforce")
    for name in ("tar_groups", "pick_sample", "READ_ERRORS", "paired_groups", "companion_url", "shard_stem"):
        assert hasattr(shards, name)


def _shard_with_member(path: Path, size: int) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in (("000000.txt", b"a caption"), ("000000.png", b"\0" * size)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_a_member_over_the_cap_fails_its_shard_with_a_line_naming_it(tmp_path):
    big = tmp_path / "big.tar"
    _shard_with_member(big, 3 << 20)
    with open(big, "rb") as f, pytest.raises(tarfile.ReadError, match=r"000000\.png is 3 MB, over the cap of 2 MB"):
        list(shards.tar_groups(f, 2 << 20))
    write_shard(tmp_path / "ok.tar", 0, 3)
    loader = StreamLoader(StreamingShards([str(big), str(tmp_path / "ok.tar")], buffer=0, shuffle_shards=False,
                                          max_member_mb=2), batch_size=2)
    assert sum(len(b["key"]) for b in loader) == 3
    st = loader.stats()
    assert st["shards_failed"] == 1 and "000000.png is 3 MB" in st["failures"][0]
    assert "raise data.train.stream.max_member_mb" in st["failures"][0]


def test_the_cap_is_checked_before_the_member_is_read(tmp_path):
    """A member header that claims more than the cap fails before any of its bytes are held."""
    big = tmp_path / "big.tar"
    _shard_with_member(big, 3 << 20)

    class Counting(io.FileIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_bytes += len(data)
            return data

    with Counting(big) as f, pytest.raises(tarfile.ReadError):
        list(shards.tar_groups(f, 1 << 20))
    assert Counting.read_bytes < 1 << 20


def test_a_pipe_command_that_stalls_is_killed_and_reported(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 20)
    url = f"pipe:sh -c 'head -c 3000 {tmp_path}/a.tar; exec sleep 30'"
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        next(iter(StreamLoader(StreamingShards(url, stall_timeout_s=0.3, retries=1, retry_delay_s=0), batch_size=2)))
    assert time.monotonic() - t0 < 10
    assert str(err.value).startswith(f"shard {url} stalled (no data for 0.3 s) on 2 tries:")


def test_fetch_settings_are_checked():
    with pytest.raises(UserError, match="stall_timeout_s=0 must be > 0"):
        StreamingShards("/x/shard-000.tar", stall_timeout_s=0)
    with pytest.raises(UserError, match="retries=-1"):
        StreamingShards("/x/shard-000.tar", retries=-1)

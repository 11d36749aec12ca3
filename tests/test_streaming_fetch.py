"""Fetching shards over http that misbehave (distill.streaming with distill.shards): a server that
sends headers and part of the body and then stalls, or drops the connection mid-body, is retried and
then stops the stream with one UserError line naming the URL (the CLI prints it and exits 2); a
transfer that breaks once goes on where it broke, with the same samples as an unbroken read.

The servers are http.server on 127.0.0.1 in a thread; a stalled handler waits at most 10 s."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distill.errors import UserError
from distill.streaming import StreamingShards, StreamLoader
from tests.test_streaming import write_shard

REPO = Path(__file__).resolve().parents[1]
FAST = {"stall_timeout_s": 0.5, "retries": 1, "retry_delay_s": 0}


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Serves files from ``server.folder``; request n behaves as ``server.modes[n]`` (the last one
    repeats): "ok" sends the file, "stall" sends ``server.cut`` bytes and then nothing, "drop" sends
    ``server.cut`` bytes and closes the connection. Content-Length is always the whole file's."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        srv = self.server
        path = srv.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        with srv.lock:
            mode = srv.modes[min(srv.hits, len(srv.modes) - 1)]
            srv.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "ok":
            self.wfile.write(body)
            return
        self.wfile.write(body[: srv.cut if srv.cut > 0 else len(body) // 2])
        self.wfile.flush()
        if mode == "stall":
            srv.release.wait(timeout=10)
        self.close_connection = True

    def log_message(self, *args) -> None:  # the test output stays readable
        pass


@pytest.fixture
def serve(tmp_path):
    """-> start(modes, cut=2048): the base URL of a misbehaving server over tmp_path/shards."""
    servers = []

    def start(modes: list[str], cut: int = 2048) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
        server.daemon_threads = True
        server.folder, server.modes, server.cut, server.hits = tmp_path / "shards", modes, cut, 0
        server.lock, server.release = threading.Lock(), threading.Event()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "shard-000.tar", 0, 40)
    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def _first_batch_error(url: str, workers: int = 0, **kw) -> str:
    loader = StreamLoader(StreamingShards(url, resampled=True, **{**FAST, **kw}), batch_size=2, num_workers=workers)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        next(iter(loader))
    assert time.monotonic() - t0 < 30
    return str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stalled_server_is_retried_then_stops_with_one_line_naming_the_url(serve, workers):
    base = serve(["stall"])
    url = f"{base}/shard-000.tar"
    msg = _first_batch_error(url, workers)
    assert "\n" not in msg and msg.startswith(f"shard {url} stalled (no data for 0.5 s) on 2 tries:")
    assert "stall_timeout_s" in msg and "rerun the same command" in msg


def test_a_dropped_connection_is_retried_then_stops_with_one_line(serve):
    base = serve(["drop"])
    url = f"{base}/shard-000.tar"
    msg = _first_batch_error(url)
    assert "\n" not in msg and msg.startswith(f"shard {url} broke off (curl exit 18:")
    assert "on 2 tries" in msg


@pytest.mark.parametrize("mode", ["stall", "drop"])
def test_a_transfer_that_breaks_once_goes_on_with_the_same_samples(serve, tmp_path, mode):
    base = serve([mode, "ok"], cut=0)  # the first try breaks half way through the shard
    kw = {"buffer": 5, "seed": 1, "epochs": 1}
    local = [k.rsplit("#", 1)[1] for b in StreamLoader(StreamingShards(str(tmp_path / "shards/shard-000.tar"), **kw),
                                                       batch_size=4) for k in b["key"]]
    loader = StreamLoader(StreamingShards(f"{base}/shard-000.tar", **kw, **FAST), batch_size=4)
    remote = [k.rsplit("#", 1)[1] for b in loader for k in b["key"]]
    assert remote == local and len(remote) == 40
    st = loader.stats()
    assert (st["shards_done"], st["shards_failed"], st["shards_truncated"]) == (1, 0, 0)


def test_the_data_config_sets_the_timeouts(serve):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    url = f"{serve(['stall'])}/shard-000.tar"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+experiment=smoke", "data=webdataset_stream", f"data.train_urls={url}",
            "data.train.stream.stall_timeout_s=0.5", "data.train.stream.retries=0",
            "data.train.stream.max_member_mb=8"])
    src = instantiate(cfg.data.train.stream, _convert_="all")
    assert (src.fetch.stall_timeout_s, src.fetch.retries, src.fetch.max_member_mb) == (0.5, 0, 8)
    with pytest.raises(UserError, match="stalled .* on 1 try:"):
        next(iter(StreamLoader(src, batch_size=2)))


def test_the_cli_prints_one_line_and_exits_2_on_a_stalled_server(serve, tmp_path):
    url = f"{serve(['stall'])}/shard-000.tar"
    args = ["+experiment=smoke", "data=webdataset_stream", "cache.enabled=false", "threads=1",
            f"data.train_urls={url}", f"data.val_urls={tmp_path / 'shards/shard-000.tar'}",
            "data.train.stream.stall_timeout_s=0.5", "data.train.stream.retries=1", "data.train.stream.retry_delay_s=0",
            "train.progress=false", "train.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and url in errors[0] and "stalled" in errors[0]
    assert "Traceback" not in out.stderr

"""A node of a two-node torchrun job dies mid-training: the surviving rank prints one ``error:`` line
(distill.distributed.peer_lost) and exits 2, instead of gloo's and the elastic agent's tracebacks.

The two "nodes" are two ``torchrun --nnodes=2 --nproc_per_node=1`` launches on 127.0.0.1 (gloo). Node 0
starts first and hosts the rendezvous store, so the node that dies (node 1) takes no store with it;
each worker's own output goes to a file (``--redirects 3``), apart from torchrun's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.distributed import PEER_LOST_FIX, peer_lost
from distill.errors import UserError
from tests.conftest import REPO, free_port

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:34736. This is typically caused by a remote worker crashing. Check the logs of the remote "
        "worker before reporting an error. GLHF!")
STORE = "Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown or crash?"


@pytest.fixture
def under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")


def test_a_gloo_peer_loss_becomes_one_line(under_torchrun):
    err = peer_lost(RuntimeError(GLOO))  # what a gloo collective raised in the two-node run below
    assert isinstance(err, UserError) and "\n" not in str(err)
    assert str(err) == ("a peer rank of this torchrun job stopped (gloo: connection closed by peer 127.0.0.1:34736, "
                        f"seen by rank 1): {PEER_LOST_FIX}")


def test_a_store_loss_inside_a_wrapper_is_found_and_other_errors_are_not(under_torchrun, monkeypatch):
    import torch.distributed as dist

    try:
        try:
            raise dist.DistNetworkError(STORE)
        except RuntimeError as inner:
            raise ValueError("while saving the checkpoint") from inner
    except ValueError as wrapped:
        err = peer_lost(wrapped)
    assert err is not None and "(c10d store: connection was likely closed, seen by rank 1)" in str(err)
    assert peer_lost(RuntimeError("CUDA out of memory")) is None
    assert peer_lost(RuntimeError("Broken pipe while writing metrics.jsonl")) is None  # not from a backend
    assert peer_lost(UserError("shard x stalled")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_lost(dist.DistBackendError(GLOO)) is None  # one process: no peer to lose


TRAIN = ["-m", "distill", "+experiment=smoke", "threads=1", "train.steps=100000", "train.ckpt_every=0",
         "train.progress=false", "train.tensorboard=false", "train.batch_size=8",
         "variants=[teacher_torch_fp32,student_torch_fp32]", "export.bundle=false"]


def _torchrun(node: int, port: int, tmp: Path, args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", f"--log-dir={tmp / f'workers{node}'}", "--redirects=3", *args]
    with open(tmp / f"node{node}.log", "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and the worker it started (in a session of its own)."""
    import psutil

    workers = psutil.Process(agent.pid).children(recursive=True)
    for p in workers:
        p.kill()
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()


def test_the_survivor_of_a_killed_node_prints_one_line_and_exits_2(tmp_path):
    port, run = free_port(), tmp_path / "run"
    args = [*TRAIN, f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
    nodes = [_torchrun(0, port, tmp_path, args)]
    try:
        _wait(lambda: _listening(port), 60, "node 0's rendezvous store")
        nodes.append(_torchrun(1, port, tmp_path, args))
        metrics = run / "metrics.jsonl"
        _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 300, "two training steps")
        _kill_node(nodes[1])
        nodes[0].wait(timeout=120)
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    (worker_err,) = (tmp_path / "workers0").rglob("stderr.log")
    text = worker_err.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("error: a peer rank of this torchrun job stopped (gloo: ")
    assert PEER_LOST_FIX in errors[0]
    assert "Traceback" not in text and "pair.cc" not in text, text[-3000:]
    assert "exitcode  : 2" in (tmp_path / "node0.log").read_text()  # torchrun's record of the worker's exit code

"""Shared fixtures: tiny models and in-memory image sources (synthetic data lives only in tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(width=64, layers=1, head_width=32, patch_size=8, image_size=32),
    text_cfg=dict(width=32, layers=1, heads=2, context_length=16, vocab_size=49408),
)


class ArraySource:
    """An ImageSource over generated images; indices in ``broken`` raise like a corrupt file."""

    def __init__(self, n: int, captions: bool = True, labels: bool = False, broken: tuple[int, ...] = (),
                 name: str = "synthetic", seed: int = 0, size: int = 40):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]
        self.captions = [f"a photo of thing number {i}" for i in range(n)] if captions else None
        self.labels = [i % 3 for i in range(n)] if labels else None
        self.classnames = ["cat", "dog", "bird"] if labels else None
        self.broken = set(broken)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def open(self, i: int) -> Image.Image:
        if i in self.broken:
            raise OSError("image file is truncated")
        return Image.fromarray(self.images[i])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_teacher():
    from distill.teachers.open_clip_teacher import OpenClipTeacher

    return OpenClipTeacher(model_name=None, model_cfg=TINY_TEACHER_CFG, seed=0)


@pytest.fixture
def conf_dir() -> str:
    return str(REPO / "conf")


# --------------------------------------------------------------------------------------------
# Helpers shared by test files (plain functions, not fixtures)
# --------------------------------------------------------------------------------------------

EDGE_RUNTIME_DEPS = ("numpy", "onnxruntime", "PIL")  # what the edge runtime needs, as import names


def link_edge_deps(deps: Path) -> Path:
    """A folder of links to this environment's numpy, onnxruntime and PIL (and the shared libraries
    their wheels carry): put it on a fresh interpreter's path to give it those three and nothing else."""
    deps.mkdir(parents=True, exist_ok=True)
    for mod in EDGE_RUNTIME_DEPS:
        pkg = Path(__import__(mod).__file__).parent
        for p in [pkg, *pkg.parent.glob(f"{pkg.name.lower()}*.libs"), *pkg.parent.glob(f"{mod}.libs")]:
            if p.exists() and not (deps / p.name).exists():
                (deps / p.name).symlink_to(p)
    return deps


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], logs: Path, per_node=((), ()), env: dict[str, str] | None = None,
                       timeout: float = 400) -> list[tuple[int, str]]:
    """Two ``torchrun --nnodes=2 --nproc_per_node=1`` launches of ``python <args>`` (e.g. ``["-m",
    "distill", ...]``) meeting at a c10d rendezvous on 127.0.0.1: (exit code, output) per "node".
    Output goes to files in ``logs``, not to pipes nobody drains; a hung launch is killed as a group."""
    import os
    import signal
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    port, procs, files = free_port(), [], [logs / f"node{i}.log" for i in (0, 1)]
    for i in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--node_rank={i}", *args, *per_node[i]]
        with open(files[i], "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(c, f.read_text()) for c, f in zip(codes, files)]

"""Small torch.distributed helpers: torchrun setup, rank queries, feature gathering.

Everything here degrades to the single-process case: without an initialised process group
``rank() == 0``, ``world_size() == 1`` and ``gather_features(x)`` returns ``x``.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from distill.errors import UserError


# Waits where ranks may arrive far apart (the end of a teacher-embedding build, whose shares can
# differ by more than the default group's timeout: NCCL's is 10 minutes) go through a gloo group
# with a long timeout. It is made at init, while every rank is alive: made later, it hangs once a
# peer has died, and so did a store-based wait. Gloo reports a dead peer at once.
WAIT_TIMEOUT = timedelta(hours=float(os.environ.get("DISTILL_WAIT_HOURS", 24)))
_wait_group = None


def is_dist() -> bool:
    """True when a process group is initialised (torchrun, or a test that called init_process_group)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """Rank within the node (torchrun's LOCAL_RANK); 0 when unset."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0: the process that logs, writes checkpoints and reports."""
    return rank() == 0


def setup_from_env(backend: str | None = None) -> bool:
    """Initialise the process group from torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    ``backend`` None picks nccl when CUDA is available, else gloo. Returns True when running with
    more than one process; a no-op (False) when WORLD_SIZE is unset or 1.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if is_dist():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    # DISTILL_DIST_TIMEOUT_S: the default group's collective timeout (torch's default when unset)
    timeout = os.environ.get("DISTILL_DIST_TIMEOUT_S")
    dist.init_process_group(backend=backend, **({"timeout": timedelta(seconds=float(timeout))} if timeout else {}))
    global _wait_group
    _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return True


def cleanup() -> None:
    """Wait for every rank, then destroy the process group (if one is initialised).

    Without the barrier a rank that finishes first tears down its gloo connections while a peer is
    still inside its last collective; the peer then dies with SIGABRT ("terminate called without
    an active exception"), seen now and then in tests/test_losses_ddp.py.
    """
    global _wait_group
    if is_dist():
        try:
            dist.barrier()
        finally:
            _wait_group = None
            dist.destroy_process_group()


def abandon() -> None:
    """Destroy the process group without waiting for peers: for a rank that leaves on an error. A
    group left alive is torn down at interpreter exit, where gloo may abort the process (SIGABRT)
    instead of letting it exit with the error's code."""
    global _wait_group
    if is_dist():
        _wait_group = None
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway: the error being reported matters more
            pass


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def wait_for_peers() -> None:
    """A barrier for ranks that may arrive far apart (up to WAIT_TIMEOUT, DISTILL_WAIT_HOURS, 24 h by
    default); a plain barrier where the process group was not made by ``setup_from_env``."""
    if not is_dist():
        return
    if _wait_group is None:
        dist.barrier()
    else:
        dist.barrier(group=_wait_group)


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank (e.g. the main process's early-stop decision)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.broadcast(t, src=src)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable object on every rank (e.g. the run folder rank 0 chose)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that have it: the logged loss of a DDP step is the global batch's."""
    parts = all_gather_object(values)
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


def all_gather_object(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_features(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """(B, D) on each rank -> (world * B, D), rows ordered by rank; every rank must pass the same B.

    ``with_grad=True`` uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the
    gradient that every rank's loss sends to this rank's rows (reduce-scatter). ``with_grad=False``
    returns a detached tensor (for teacher targets).
    """
    if not is_dist() or world_size() == 1:
        return x if with_grad else x.detach()
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def all_reduce_grads(params: Iterable[torch.nn.Parameter], average: bool = True) -> None:
    """Sum (or average) ``.grad`` across ranks, as DDP does for the modules it wraps.

    For trainable modules outside DDP, e.g. the feature projector inside DistillLoss: without this
    each rank would update its projector with its own gradient and the copies would drift apart.
    Parameters without a gradient contribute zeros so every rank joins the same collectives.
    """
    if not is_dist() or world_size() == 1:
        return
    w = world_size()
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if average:
            p.grad.div_(w)


# What gloo, NCCL and the c10d store say when the rank or node at the other end is gone.
PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection was likely closed",
             "remote process exited", "ncclremoteerror", "communicator was aborted")
PEER_LOST_FIX = "rerun the same command on every node to resume from the last checkpoint"


def peer_lost(e: BaseException | None) -> UserError | None:
    """One line for an error (or one in its cause chain) that says a peer rank of this torchrun job
    died, instead of the collective's multi-line backend text; None for any other error."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None  # not under torchrun: a network-sounding error is not about a peer rank
    seen = set()
    while e is not None and id(e) not in seen and not isinstance(e, UserError):
        seen.add(id(e))
        text = str(e)
        low = text.lower()
        phrase = next((p for p in PEER_LOST if p in low), None)
        ours = isinstance(e, dist.DistError) or any(m in low for m in ("gloo", "nccl", "c10d", "tcpstore"))
        if isinstance(e, RuntimeError) and ours and phrase is not None:
            backend = "nccl" if "nccl" in low else "gloo" if "gloo" in low else "c10d store"
            peer = re.search(r"\[([0-9a-fA-F.:]+)\]:(\d+)", text)
            where = f" {peer.group(1)}:{peer.group(2)}" if peer else ""
            return UserError(f"a peer rank of this torchrun job stopped ({backend}: {phrase}{where}, seen by rank "
                             f"{os.environ.get('RANK', '?')}): {PEER_LOST_FIX}")
        e = e.__cause__ or e.__context__
    return None

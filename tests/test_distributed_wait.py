"""``distributed.wait_all``: the end-of-build barrier through the process group's store, whose wait
is ours to set (a rank's share of a large build can outlast a collective's timeout by hours)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_losses_ddp import _free_port


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from distill import distributed as dist_utils

    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    try:
        if rank == 1:
            time.sleep(1.5)  # a slow share
        t0 = time.perf_counter()
        dist_utils.wait_all("slow", seconds=30)
        result["waited"] = time.perf_counter() - t0
        if rank == 1:
            time.sleep(2.0)  # arrives after rank 0's short limit
        try:
            dist_utils.wait_all("late", seconds=0.5)
            result["late"] = "ok"
        except Exception as e:  # the store's timeout error
            result["late"] = type(e).__name__
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist_utils.cleanup()


def test_wait_all_waits_for_the_slowest_rank_and_times_out_on_its_own_limit(tmp_path):
    from distill import distributed as dist_utils

    dist_utils.wait_all("single")  # a single process: nothing to wait for
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["waited"] > 1.2 and r1["waited"] < 1.0
    assert r0["late"] != "ok" and r1["late"] == "ok"  # rank 0 gave up after 0.5 s; rank 1 found its key set

"""Two "nodes" on this machine: two ``torchrun --nnodes=2 --nproc_per_node=1`` launches meeting at a
c10d rendezvous on 127.0.0.1 (gloo), each one process, running the real commands.

(a) Training: ``python -m distill +experiment=smoke`` with 8 images per rank logs the same losses
    and ends with the same student weights as one process with the global batch of 16.
(b) Reinforced shards: the companion teacher shards written by two ranks (each its share of the
    shards, ``python -m distill cache`` on a stream config) equal a one-process build byte for byte.
(c) Ranks launched with different configs stop with one line before writing anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, torchrun_two_nodes
from tests.test_stream_training import N_SHARDS, write_shards

TIMEOUT = 400
TRAIN = ["+experiment=smoke", "threads=1", "train.ckpt_every=0", "train.progress=false", "train.tensorboard=false",
         "variants=[teacher_torch_fp32,student_torch_fp32]", "export.bundle=false"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _single(args: list[str], log: Path) -> int:
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "distill", *args], cwd=REPO, env=_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT).returncode


def _two_nodes(args: list[str], tmp: Path, per_node=((), ())) -> list[tuple[int, str]]:
    return torchrun_two_nodes(["-m", "distill", *args], tmp, per_node, timeout=TIMEOUT)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_two_nodes_train_like_one_process_with_the_global_batch(tmp_path):
    cache = f"cache.dir={tmp_path / 'cache'}"
    assert _single([*TRAIN, cache, "train.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}"],
                   tmp_path / "one.log") == 0, (tmp_path / "one.log").read_text()[-3000:]
    nodes = _two_nodes([*TRAIN, cache, "train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    for code, out in nodes:
        assert code == 0, out[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    assert json.loads((tmp_path / "two" / "report.json").read_text())["training"]["world_size"] == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    assert abs(one[-1] - one[0]) > 1e-3  # the weights moved: equal losses are not equal by standing still
    w1 = load_file(tmp_path / "one/export/open_clip/open_clip_model.safetensors")
    w2 = load_file(tmp_path / "two/export/open_clip/open_clip_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


FINETUNE = ["+experiment=smoke", "threads=1", "finetune=lora", "finetune.train.steps=6", "finetune.train.eval_every=0",
            "finetune.train.ckpt_every=6", "finetune.train.log_every=1", "+finetune.train.progress=false",
            "finetune.chain_eval=false", "finetune.wise_ft.alpha=1.0", "finetune.then=export", "export.bundle=false",
            "variants=[teacher_torch_fp32,student_torch_fp32]"]


def test_two_nodes_fine_tune_like_one_process_with_the_global_batch(tmp_path):
    """LoRA fine-tuning with the CLIP contrastive loss: each rank's rows meet the whole global batch."""
    cache = f"cache.dir={tmp_path / 'cache'}"
    assert _single([*FINETUNE, cache, "finetune.train.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}"],
                   tmp_path / "one.log") == 0, (tmp_path / "one.log").read_text()[-3000:]
    nodes = _two_nodes([*FINETUNE, cache, "finetune.train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}"],
                       tmp_path)
    for code, out in nodes:
        assert code == 0, out[-3000:]
    one, two = _losses(tmp_path / "one/finetune"), _losses(tmp_path / "two/finetune")
    assert len(one) == len(two) == 6 and abs(one[-1] - one[0]) > 1e-3
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)
    (w1,), (w2,) = ((tmp_path / r / "finetune/checkpoints/step_0000006").glob("*.safetensors") for r in ("one", "two"))
    a, b = load_file(w1), load_file(w2)
    assert any("lora_" in k for k in a) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def _stream_cfg(tmp: Path) -> list[str]:
    shards = tmp / "shards"
    shards.mkdir(exist_ok=True)
    pattern = write_shards(shards)
    val = pattern.replace(f"{{000..{N_SHARDS - 1:03d}}}", "000")
    return ["cache", "+experiment=smoke", "data=webdataset_stream", "device=cpu", "threads=1",
            f"data.train_urls='{pattern}'", f"data.val_urls={val}", "data.train.stream.reinforced=true",
            "data.train.views=2", "cache.batch_size=4"]


def test_two_nodes_write_the_same_companion_shards_as_one_process(tmp_path):
    args = _stream_cfg(tmp_path)
    ref_root, two_root = tmp_path / "one", tmp_path / "two"
    assert _single([*args, f"data.train.stream.teacher_root={ref_root}"], tmp_path / "one.log") == 0, \
        (tmp_path / "one.log").read_text()[-3000:]
    nodes = _two_nodes([*args, f"data.train.stream.teacher_root={two_root}"], tmp_path)
    for code, out in nodes:
        assert code == 0, out[-3000:]
    assert "built 2, kept 0" in nodes[0][1]  # rank 0 built its half, rank 1 the other
    ref = sorted(p.name for p in ref_root.glob("*.teacher.tar"))
    assert len(ref) == N_SHARDS and ref == sorted(p.name for p in two_root.glob("*.teacher.tar"))
    for name in ref:
        assert (two_root / name).read_bytes() == (ref_root / name).read_bytes(), name
    assert json.loads((two_root / "teacher_manifest.json").read_text())["complete"]


@pytest.mark.parametrize("differ", ["data.train.views=3"])
def test_ranks_that_disagree_on_the_config_stop_with_one_line(tmp_path, differ):
    args = [*_stream_cfg(tmp_path), f"data.train.stream.teacher_root={tmp_path / 'comp'}"]
    nodes = _two_nodes(args, tmp_path, per_node=((), (differ,)))
    assert all(code != 0 for code, _ in nodes)
    errors = [line for _, out in nodes for line in out.splitlines() if line.startswith("error: ranks disagree")]
    assert errors and "same config" in errors[0]
    assert not list((tmp_path / "comp").glob("*.teacher.tar")) if (tmp_path / "comp").exists() else True


def test_two_nodes_train_a_batchnorm_tower_and_say_its_statistics_are_per_rank(tmp_path):
    """A timm conv student (BatchNorm) under DDP: both ranks train, rank 0 ships it; on CPU ranks
    BatchNorm statistics stay per rank (torch's SyncBatchNorm is GPU-only), said in one warning."""
    args = [*TRAIN, "student=tiny_timm", f"cache.dir={tmp_path / 'cache'}", "train.batch_size=8",
            f"hydra.run.dir={tmp_path / 'two'}"]
    nodes = _two_nodes(args, tmp_path)
    for code, out in nodes:
        assert code == 0, out[-3000:]
    assert any("normalise over each rank's own batch" in out for _, out in nodes)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["training"]["world_size"] == 2 and report["variants"]["student_torch_fp32"]["status"] == "ok"
    losses = _losses(tmp_path / "two")
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))


def test_gpu_ranks_convert_batchnorm_to_sync_batchnorm_in_place():
    from distill.engine.loop import has_batchnorm, sync_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    weight = model[1].weight
    assert sync_batchnorm(model, torch.device("cuda"))  # conversion only: no GPU needed until forward
    assert isinstance(model[1], torch.nn.SyncBatchNorm) and model[1].weight is weight  # the optimiser's tensors
    assert not sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cuda"))
    assert has_batchnorm(model) and not has_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    cpu = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    assert not sync_batchnorm(cpu, torch.device("cpu")) and isinstance(cpu[0], torch.nn.BatchNorm1d)

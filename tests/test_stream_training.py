"""Distillation from a stream of WebDataset shards (distill.streaming through DistillTask) with the
online teacher: training, exact resume through the engine's checkpoint, http shards, skipped shards,
and the pipeline's config (data=webdataset_stream).

Every shard is written into tmp_path; http URLs are served by a real http.server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from distill.data import ViewSpec
from distill.engine import EngineConfig, fit
from distill.engine.checkpoint import load_state
from distill.errors import UserError
from distill.streaming import StreamingShards
from distill import data_build
from distill import train as train_mod
from distill.data_build import TrainStream
from distill.train import DistillTask, train
from tests.conftest import REPO, ArraySource
from tests.test_train import _cfg, _loss, _student

N_SHARDS, PER_SHARD = 4, 6
CORPUS = [f"a photo of word {k}" for k in range(10)]
CPU = torch.device("cpu")


def write_shards(folder: Path) -> str:
    """N_SHARDS shards of PER_SHARD PNG samples; every third sample has no caption. -> the brace pattern."""
    src = ArraySource(N_SHARDS * PER_SHARD)
    for s in range(N_SHARDS):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
                buf = io.BytesIO()
                Image.fromarray(src.images[i]).save(buf, "PNG")
                members = [(f"{i:06d}.png", buf.getvalue())]
                if i % 3:
                    members.append((f"{i:06d}.txt", src.captions[i].encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(folder / f"shard-{{000..{N_SHARDS - 1:03d}}}.tar")


@pytest.fixture
def pattern(tmp_path) -> str:
    (tmp_path / "shards").mkdir()
    return write_shards(tmp_path / "shards")


def _stream(urls: str, augment: bool = True, **kw) -> TrainStream:
    kw = {"resampled": True, "buffer": 4, "seed": 3, **kw}
    return TrainStream(StreamingShards(urls, **kw), ViewSpec(size=32, augment=augment, seed=5), list(CORPUS))


def _tok():
    return open_clip.SimpleTokenizer(context_length=16)


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


class Recording(DistillTask):
    """Records each micro-batch's keys and pixel sums by step."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: dict[int, tuple[list[str], list[float]]] = {}

    def loss(self, batch, step, micro, autocast):
        self.seen[step] = (list(batch["key"]), batch["image"].sum(dim=(1, 2, 3)).tolist())
        return super().loss(batch, step, micro, autocast)


def _fit_recording(stream: TrainStream, teacher, out_dir: Path, student=None, **cfg):
    ecfg = EngineConfig.from_mapping(_cfg(**cfg))
    task = Recording(student or _student(), _loss(), None, _tok(), ecfg, 32, teacher=teacher, stream=stream)
    return task, fit(task, ecfg, out_dir, CPU)


def test_stream_trains_with_the_online_teacher_and_reports_the_stream(tmp_path, pattern, tiny_teacher):
    out = train(student=_student(), loss_fn=_loss(), dataset=None, tokenizer=_tok(), cfg=_cfg(steps=30),
                out_dir=tmp_path / "run", device=CPU, teacher=tiny_teacher, stream=_stream(pattern))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert out["target_source"] == "online" and out["images_seen"] == 120
    assert out["stream"]["samples"] == 120 and out["stream"]["shards_failed"] == 0 and out["stream"]["failures"] == []


def test_shards_moved_to_another_folder_give_the_same_batches(tmp_path, pattern, tiny_teacher):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(Path(pattern).parent, moved)
    a, _ = _fit_recording(_stream(pattern), tiny_teacher, tmp_path / "a", steps=3)
    b, _ = _fit_recording(_stream(str(moved / Path(pattern).name)), tiny_teacher, tmp_path / "b", steps=3)
    assert [v[1] for v in a.seen.values()] == [v[1] for v in b.seen.values()]  # the same crops, pixel for pixel


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stopped_stream_run_resumes_with_the_same_batches_and_weights(tmp_path, pattern, tiny_teacher, workers):
    full, _ = _fit_recording(_stream(pattern), tiny_teacher, tmp_path / "a", num_workers=workers)
    _fit_recording(_stream(pattern), tiny_teacher, tmp_path / "b", num_workers=workers, ckpt_every=1,
                   stop_after_steps=3)
    saved = load_state(tmp_path / "b/checkpoints/step_0000003")
    assert saved["data"]["kind"] == "distill.streaming" and saved["data"]["workers"] == max(1, workers)
    resumed, res = _fit_recording(_stream(pattern), tiny_teacher, tmp_path / "b", student=_student(seed=9),
                                  num_workers=workers, ckpt_every=1, resume="auto")
    assert res["resumed_from_step"] == 3 and sorted(resumed.seen) == [3, 4, 5]
    for step in (3, 4, 5):  # the same samples in the same order, with the same crops
        assert resumed.seen[step][0] == full.seen[step][0]
        assert resumed.seen[step][1] == full.seen[step][1]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert res["stream"]["samples"] == 24  # the counters continue from the checkpoint, nothing counted twice


def test_views_depend_on_the_reader_counter_not_only_the_key(tmp_path, pattern, tiny_teacher):
    from distill.train import StreamViews

    views = StreamViews(ViewSpec(size=32, augment=True, seed=5))
    first = next(iter(_stream(pattern).source.iter_reader(0, 1)))
    again = first._replace(state={**first.state, "samples": first.state["samples"] + 24})
    assert views.seed(first) != views.seed(again)
    assert torch.equal(views(first)["image"], views(first)["image"])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test output stays readable
        pass


@pytest.fixture
def http_base(pattern):
    folder = Path(pattern).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_trains_from_shards_served_over_http(tmp_path, http_base, tiny_teacher):
    stream = _stream(f"{http_base}/shard-{{000..{N_SHARDS - 1:03d}}}.tar")
    task, out = _fit_recording(stream, tiny_teacher, tmp_path / "run", steps=4)
    keys = [k for step in sorted(task.seen) for k in task.seen[step][0]]
    assert len(keys) == 16 and all(k.startswith(f"{http_base}/shard-") for k in keys)
    assert out["stream"]["samples"] == 16 and out["stream"]["shards_failed"] == 0
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "run"))))


def test_a_missing_shard_is_skipped_counted_and_reported(tmp_path, pattern, tiny_teacher):
    missing = Path(pattern).parent / "shard-001.tar"
    missing.unlink()
    stream = _stream(pattern, resampled=False, epochs=None)  # one pass over the 3 readable shards takes 18 samples
    task, out = _fit_recording(stream, tiny_teacher, tmp_path / "run", steps=5)
    keys = [k for step in sorted(task.seen) for k in task.seen[step][0]]
    assert len(keys) == 20 and not any("shard-001" in k for k in keys)
    assert out["stream"]["shards_failed"] >= 1 and out["stream"]["samples"] == 20
    assert str(missing) in out["stream"]["failures"][0] and "could not be read" in out["stream"]["failures"][0]


def test_a_one_epoch_stream_that_runs_out_says_how_to_fix_it(tmp_path, pattern, tiny_teacher):
    with pytest.raises(UserError, match="ended after 6 batches.*resampled: true"):
        _fit_recording(_stream(pattern, resampled=False, epochs=1), tiny_teacher, tmp_path / "run", steps=8)


# --------------------------------------------------------------------------------------------
# The pipeline: data=webdataset_stream
# --------------------------------------------------------------------------------------------


def _compose(pattern: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    val = pattern.replace(f"{{000..{N_SHARDS - 1:03d}}}", "000")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["+experiment=smoke", "data=webdataset_stream",
                                                        f"data.train_urls='{pattern}'", f"data.val_urls={val}",
                                                        *overrides])


def test_stream_with_the_cache_enabled_is_one_line_error(tmp_path, pattern):
    from distill import pipeline

    with pytest.raises(UserError) as err:
        pipeline.run(_compose(pattern), out_dir=tmp_path / "run")  # cache.enabled defaults to true
    assert "cache.enabled=false" in str(err.value) and "reinforced=true" in str(err.value) and "\n" not in str(err.value)


def test_validate_names_what_a_stream_cannot_serve(pattern):
    from distill import validate

    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(_compose(pattern, "cache.enabled=false", "finetune=lora",
                                       "variants=[teacher_torch_fp32,student_onnx_static_int8]"))
    assert len(err.value.problems) == 2 and "finetune=none" in err.value.problems[0]
    assert "student_onnx_static_int8" in err.value.problems[1]


def test_the_stream_config_builds_and_trains_through_the_pipeline(tmp_path, pattern):
    from distill import pipeline, validate

    cfg = _compose(pattern, "cache.enabled=false", "+data.train.corpus.extra=['a cat','a dog']", "train.steps=3",
                   "train.ckpt_every=0", "train.progress=false", "train.tensorboard=false", "train.resume=never")
    validate.check_config(cfg)
    stream, eval_sets, info = data_build.build_data(cfg.data)
    assert isinstance(stream, TrainStream) and stream.source.resampled and stream.spec.augment
    assert info["stream"]["shards"] == N_SHARDS and eval_sets["retrieval"]
    teacher = pipeline.build_teacher(cfg.teacher, CPU)
    student, model_cfg = pipeline.build_student_stage(cfg.student, teacher)
    res = train_mod.train_stage(cfg, teacher, student, model_cfg, pipeline.student_tokenizer(model_cfg), stream,
                               eval_sets, None, tmp_path / "run", CPU)
    assert res["steps"] == 3 and res["target_source"] == "online" and res["stream"]["samples"] > 0


def test_ddp_needs_a_resampled_or_endless_stream(pattern, monkeypatch):
    monkeypatch.setattr(data_build.dist_utils, "world_size", lambda: 2)
    with pytest.raises(UserError, match="needs resampled: true"):
        data_build.build_data(_compose(pattern, "data.train.stream.resampled=false").data)

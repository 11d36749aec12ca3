"""Reinforced shards (distill.reinforce): companion teacher shards built beside the data shards, read
in lockstep by the stream, and training that takes its targets from them.

What must hold: the student sees exactly the view the teacher embedded; a rebuild skips finished
shards and rebuilds stale ones; a killed build loses only its unfinished shard; a companion that does
not match its data shard is one line, counted, and the rest of the data still trains; http works.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import reinforce
from distill.data import ViewSpec, augmented_view
from distill.errors import UserError
from distill.streaming import StreamingShards, StreamLoader
from distill.data_build import TrainStream
from distill.train import StreamViews, stream_collate
from tests.conftest import REPO
from tests.test_stream_training import (CORPUS, N_SHARDS, PER_SHARD, _fit_recording, _losses, _stream,  # noqa: F401
                                        http_base, pattern, write_shards)

SPEC = ViewSpec(size=32, views=3, augment=True, seed=5)


def _build(teacher, pattern, spec=SPEC, **kw):
    return reinforce.build_companions(teacher, StreamingShards(pattern).urls, spec, batch_size=8, **kw)


def _reinforced(pattern: str, teacher, spec=SPEC, **kw) -> TrainStream:
    stream = _stream(pattern, reinforced=True, **kw)
    stream.spec = spec
    stream.source.teacher_fingerprint = reinforce.fingerprint(teacher.fingerprint, spec)
    return stream


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def test_companions_hold_k_views_seeds_and_captions_and_a_manifest(tmp_path, pattern, tiny_teacher):
    out = _build(tiny_teacher, pattern)
    folder = Path(pattern).parent
    assert out["built"] == N_SHARDS and out["kept"] == 0 and out["failed"] == []
    comp = folder / "shard-000.teacher.tar"
    head = reinforce.read_header(str(comp))
    assert head["samples"] == PER_SHARD and head["skipped"] == 0 and head["views"] == 3
    assert head["data_shard"] == "shard-000" and head["data_bytes"] == (folder / "shard-000.tar").stat().st_size
    names = _members(comp)
    assert names[0] == reinforce.HEADER and names[1:] == [f"{i:06d}.teacher" for i in range(PER_SHARD)]
    with tarfile.open(comp) as tf:
        rec = {n: reinforce.decode_record(tf.extractfile(n).read(), 3, tiny_teacher.embed_dim) for n in names[1:]}
    assert rec["000000.teacher"]["text"] is None and rec["000001.teacher"]["text"] is not None  # uncaptioned, captioned
    man = json.loads((folder / reinforce.MANIFEST).read_text())
    assert man["complete"] and len(man["shards"]) == N_SHARDS and man["bytes_per_view"] == 2 * tiny_teacher.embed_dim
    # the stored rows are the teacher's embeddings of the views built from the stored seeds
    emb, seeds = rec["000001.teacher"]["image"], rec["000001.teacher"]["seeds"]
    from PIL import Image

    with tarfile.open(folder / "shard-000.tar") as tf:
        img = Image.open(io.BytesIO(tf.extractfile("000001.png").read())).convert("RGB")
    views = torch.stack([augmented_view(img, 32, int(s), scale=SPEC.scale) for s in seeds])
    ref = tiny_teacher.encode_image(views).numpy()
    assert emb.shape == (3, tiny_teacher.embed_dim) and np.abs(emb.astype(np.float32) - ref).max() < 2e-3
    assert len(set(seeds.tolist())) == 3


def test_the_student_sees_exactly_the_view_the_teacher_embedded(pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    stream = _reinforced(pattern, tiny_teacher)
    loader = StreamLoader(stream.source, 5, transform=StreamViews(stream.spec), collate=stream_collate)
    batch = next(iter(loader))
    got = batch["t_image"]
    ref = tiny_teacher.encode_image(batch["image"])
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=2e-3)
    for i, cap in enumerate(batch["caption"]):  # caption rows stored for captioned samples only
        t = batch["t_text"][i]
        assert (t is None) == (not cap)
        if cap:
            assert torch.allclose(t, tiny_teacher.encode_text([cap])[0], atol=2e-3)


def test_training_from_reinforced_shards_uses_the_stored_targets(tmp_path, pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    calls = {"image": 0}
    real = tiny_teacher.encode_image

    def counting(images):
        calls["image"] += 1
        return real(images)

    tiny_teacher.encode_image = counting
    task, out = _fit_recording(_reinforced(pattern, tiny_teacher), tiny_teacher, tmp_path / "run", steps=30)
    losses = _losses(tmp_path / "run")
    assert calls["image"] == 0  # the image tower never runs: every image target came from the shards
    assert out["target_source"] == "reinforced shards" and out["stream"]["teacher_mismatch"] == 0
    assert len(losses) == 30 and sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_a_rebuild_skips_finished_companions_and_rebuilds_stale_ones(pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    comp = Path(pattern).parent / "shard-002.teacher.tar"
    before = comp.read_bytes()
    again = _build(tiny_teacher, pattern)
    assert again["built"] == 0 and again["kept"] == N_SHARDS
    other = ViewSpec(size=32, views=2, augment=True, seed=6)  # another recipe never reuses the old embeddings
    changed = _build(tiny_teacher, pattern, spec=other)
    assert changed["built"] == N_SHARDS and comp.read_bytes() != before
    _build(tiny_teacher, pattern)
    assert comp.read_bytes() == before  # deterministic: the same recipe writes the same bytes


def test_a_killed_build_keeps_its_finished_shards(tmp_path, pattern):
    """A real process (the cache command on a stream config) SIGKILLed after its second shard."""
    from tests.test_stream_training import _compose  # noqa: F401 - the same overrides as the stream tests

    val = pattern.replace(f"{{000..{N_SHARDS - 1:03d}}}", "000")
    args = [sys.executable, "-m", "distill", "cache", "+experiment=smoke", "data=webdataset_stream", "device=cpu",
            "threads=1", f"data.train_urls='{pattern}'", f"data.val_urls={val}", "data.train.stream.reinforced=true",
            "data.train.views=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", reinforce.KILL_ENV: "0:2"}
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    folder = Path(pattern).parent
    done = sorted(p.name for p in folder.glob("*.teacher.tar"))
    assert len(done) == 2 and not list(folder.glob(".*tmp*"))
    kept = {p: (folder / p).read_bytes() for p in done}
    env.pop(reinforce.KILL_ENV)
    r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "built 2, kept 2, failed 0" in r.stdout
    assert all((folder / p).read_bytes() == b for p, b in kept.items())
    assert json.loads((folder / reinforce.MANIFEST).read_text())["complete"]


def _read_all(stream: TrainStream) -> tuple[list[str], dict]:
    loader = StreamLoader(stream.source, 4, transform=StreamViews(stream.spec), collate=stream_collate)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader.stats()


def test_a_companion_of_another_shard_is_one_line_and_the_rest_trains(pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    folder = Path(pattern).parent
    shutil.copyfile(folder / "shard-002.teacher.tar", folder / "shard-001.teacher.tar")
    (folder / "shard-003.teacher.tar").unlink()
    keys, stats = _read_all(_reinforced(pattern, tiny_teacher, resampled=False))
    assert len(keys) == 2 * PER_SHARD and not any("shard-001" in k or "shard-003" in k for k in keys)
    assert stats["teacher_mismatch"] == 2
    lines = " | ".join(stats["failures"])
    assert "belongs to shard-002, not shard-001" in lines and "shard-003.teacher.tar" in lines
    assert "python -m distill cache" in lines and all("\n" not in f for f in stats["failures"])


def test_a_companion_with_fewer_samples_keeps_what_it_paired(pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    comp = Path(pattern).parent / "shard-000.teacher.tar"
    with tarfile.open(comp) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(comp, "w") as tf:  # drop the last sample's record
        for m, data in members:
            if not m.name.startswith("000005."):
                tf.addfile(m, io.BytesIO(data))
    keys, stats = _read_all(_reinforced(pattern, tiny_teacher, resampled=False, buffer=0))
    shard0 = [k for k in keys if "shard-000" in k]
    assert len(shard0) == PER_SHARD - 1 and stats["teacher_mismatch"] == 1
    assert "at sample 5" in stats["failures"][0] and "companion ended" in stats["failures"][0]


def test_records_round_trip_and_a_damaged_record_is_a_mismatch(pattern, tiny_teacher):
    img = np.arange(6, dtype=np.float16).reshape(2, 3)
    rec = reinforce.decode_record(reinforce.encode_record([2**64 - 1, 7], img, np.ones(3)), 2, 3)
    assert rec["seeds"].tolist() == [2**64 - 1, 7] and np.array_equal(rec["image"], img) and rec["text"].sum() == 3
    assert reinforce.decode_record(reinforce.encode_record([1, 2], img, None), 2, 3)["text"] is None
    with pytest.raises(ValueError, match="expected"):
        reinforce.decode_record(reinforce.encode_record([1, 2], img, None)[:-2], 2, 3)
    _build(tiny_teacher, pattern)
    comp = Path(pattern).parent / "shard-000.teacher.tar"
    with tarfile.open(comp) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(comp, "w") as tf:
        for m, data in members:
            if m.name == "000003.teacher":
                data = data[:-6]
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    keys, stats = _read_all(_reinforced(pattern, tiny_teacher, resampled=False, buffer=0))
    assert len([k for k in keys if "shard-000" in k]) == 3 and stats["teacher_mismatch"] == 1
    assert "damaged record" in stats["failures"][0]


def test_another_teacher_or_recipe_is_refused_with_the_rebuild_command(pattern, tiny_teacher):
    _build(tiny_teacher, pattern)
    stream = _reinforced(pattern, tiny_teacher, resampled=False)
    stream.source.teacher_fingerprint = "0" * 20
    with pytest.raises(UserError, match="built for another teacher or view recipe.*python -m distill cache"):
        _read_all(stream)


def test_a_corrupt_image_is_skipped_at_build_and_at_training(tmp_path, tiny_teacher):
    folder = tmp_path / "shards"
    folder.mkdir()
    pat = write_shards(folder)
    shard = folder / "shard-000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name == "000002.png":
                data = data[:40]
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    _build(tiny_teacher, pat)
    head = reinforce.read_header(str(folder / "shard-000.teacher.tar"))
    assert head["skipped"] == 1 and "000002.skip.txt" in _members(folder / "shard-000.teacher.tar")
    keys, stats = _read_all(_reinforced(pat, tiny_teacher, resampled=False))
    assert len(keys) == N_SHARDS * PER_SHARD - 1 and stats["images_corrupt"] == 1 and stats["teacher_mismatch"] == 0


def test_reinforced_shards_train_over_http(tmp_path, pattern, http_base, tiny_teacher):
    _build(tiny_teacher, pattern)
    urls = f"{http_base}/shard-{{000..{N_SHARDS - 1:03d}}}.tar"
    stream = _reinforced(urls, tiny_teacher, teacher_root=http_base)
    task, out = _fit_recording(stream, tiny_teacher, tmp_path / "run", steps=3)
    assert out["stream"]["samples"] == 12 and out["stream"]["teacher_mismatch"] == 0
    assert out["target_source"] == "reinforced shards"


def test_remote_sources_need_a_companion_folder_to_build(tiny_teacher):
    with pytest.raises(UserError, match="set data.train.stream.teacher_root"):
        reinforce.build_companions(tiny_teacher, ["http://127.0.0.1:9/shard-000.tar"], SPEC)


def test_the_pipeline_builds_companions_then_trains_from_them(tmp_path, pattern):
    from distill import pipeline
    from tests.test_stream_training import _compose

    cfg = _compose(pattern, "data.train.stream.reinforced=true", "data.train.views=2", "train.steps=3",
                   "+data.train.corpus.extra=[a cat,a dog]",
                   "train.ckpt_every=0", "train.progress=false", "train.tensorboard=false",
                   "variants=[teacher_torch_fp32,student_torch_fp32]", "export.bundle=false")
    report = pipeline.run(cfg, out_dir=tmp_path / "run")
    info = report["training"]
    assert info["target_source"] == "reinforced shards" and info["stream"]["teacher_mismatch"] == 0
    assert info["data"]["reinforce"]["built"] == N_SHARDS and info["data"]["stream"]["reinforced"]
    assert len(list(Path(pattern).parent.glob("*.teacher.tar"))) == N_SHARDS

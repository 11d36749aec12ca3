"""Reinforced WebDataset shards: the teacher's embeddings travel with the samples, in a companion
shard next to each data shard (``shard-000123.tar`` -> ``shard-000123.teacher.tar``).

Why companions and not rewritten shards: the data shards stay byte-for-byte as they were (they are
often read-only, shared and hashed on object storage), one data set can carry the embeddings of
several teachers or view recipes side by side, a rebuild rewrites a few KB per sample instead of
copying every image, and a companion is checked against its data shard sample by sample.

Companion layout: distill/shards.py (its records, header and the reader's pairing live there).

Views. View k of sample ``key`` of shard ``name`` is ``augmented_view(image, size, seed_k, scale)``
with ``seed_k = stable_int(spec.seed, name, key, k)`` (``eval_view`` when augment is off); the
training stream picks one of the K stored seeds per visit and builds the same pixels from them, so
the student sees exactly the view the teacher embedded and no cache is addressed at random.

Building (``build_companions``). Under torchrun rank r takes shards ``urls[r::world]``; each
companion is written to a temporary name and renamed, so a killed rank loses only its unfinished
shard, and a rerun skips every companion whose header carries the wanted fingerprint (a companion
with another fingerprint is rebuilt, never reused). After a barrier rank 0 writes
``teacher_manifest.json`` next to the companions. Companions go next to local data shards, or into
``root`` (required for http(s)/pipe: sources) under the data shard's file name.

Reading (``distill.shards.paired_groups``): the streaming reader opens the data shard and its
companion together and pairs them key by key; a companion that is missing, has another
fingerprint, or holds other keys or fewer samples than its data shard is one line naming the
problem and the fix, and the reader skips the rest of that shard (counted as ``teacher_mismatch``);
samples already paired stay.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill import distributed as dist_utils
from distill.data import ViewSpec, stable_int
from distill.errors import UserError
from distill.shards import (CAPTION_KEYS, DECODE_ERRORS, FORMAT, HEADER, IMAGE_KEYS, CompanionMismatch, companion_url,
                            decode_record, encode_record, is_meta, open_shard, paired_groups, pick_sample,
                            read_header, shard_stem, tar_groups)

log = logging.getLogger(__name__)

MANIFEST = "teacher_manifest.json"
KILL_ENV = "DISTILL_REINFORCE_TEST_KILL"  # "RANK:N": SIGKILL that rank after N finished shards (tests)


def fingerprint(teacher_fp: str, spec: ViewSpec) -> str:
    """What a companion's embeddings depend on besides the data: the teacher and the view recipe."""
    return hashlib.sha256(f"reinforce-v{FORMAT}|{teacher_fp}|{spec.describe()}".encode()).hexdigest()[:20]


def view_seeds(spec: ViewSpec, shard: str, key: str) -> list[int]:
    return [stable_int(spec.seed, shard_stem(shard), key, k) for k in range(int(spec.views))]


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class _HashingReader:
    """A read-through stream that hashes and counts the data shard's bytes, recorded in the header."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.bytes = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self.raw.close()


def _views(image: Any, spec: ViewSpec, seeds: Sequence[int]):
    import torch

    from distill.data import augmented_view, eval_view

    if not spec.augment:
        return torch.stack([eval_view(image, spec.size)] * len(seeds))
    return torch.stack([augmented_view(image, spec.size, s, scale=tuple(spec.scale)) for s in seeds])


class _ShardEmbedder:
    """Embeds a shard's views batch by batch as they are read, so memory holds float16 embeddings
    (K x D per sample), never a whole shard of decoded pixels."""

    def __init__(self, teacher: Any, batch_size: int) -> None:
        self.teacher, self.batch_size = teacher, int(batch_size)
        self.pending: list = []  # view tensors not yet embedded
        self.done: list[np.ndarray] = []

    def add(self, views: Any) -> None:
        self.pending.extend(views)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        import torch

        if self.pending:
            with torch.no_grad():
                emb = self.teacher.encode_image(torch.stack(self.pending))
            self.done.append(emb.float().cpu().numpy().astype(np.float16))
            self.pending = []

    def images(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.done) if self.done else np.zeros((0, self.teacher.embed_dim), np.float16)

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            with torch.no_grad():
                out.append(self.teacher.encode_text(texts[i:i + self.batch_size]).float().cpu().numpy())
        return np.concatenate(out).astype(np.float16) if out else np.zeros((0, self.teacher.embed_dim), np.float16)


def _read_shard(url: str, spec: ViewSpec, embedder: _ShardEmbedder, image_keys: Sequence[str],
                caption_keys: Sequence[str]) -> tuple[list[tuple], _HashingReader]:
    """Every sample of a data shard in file order as (key, seeds, caption, why skipped or ""), its
    views handed to ``embedder`` in that order; and the reader that hashed the shard's bytes."""
    from distill.imageio import error_reason, load_rgb

    raw = _HashingReader(open_shard(url))
    rows = []
    try:
        for key, group in tar_groups(raw):
            if is_meta(key):
                continue
            _, data, caption = pick_sample(url, key, group, image_keys, caption_keys)
            seeds, why = view_seeds(spec, url, key), "no image" if data is None else ""
            if data is not None:
                try:
                    embedder.add(_views(load_rgb(io.BytesIO(data)), spec, seeds))
                except DECODE_ERRORS as e:
                    why = f"unreadable image: {error_reason(e)}"
            rows.append((key, seeds, caption, why))
        while raw.read(1 << 20):  # the end-of-archive padding, so the hash covers the whole file
            pass
    finally:
        raw.close()
    return rows, raw


def _write_tar(tmp: Path, head: dict[str, Any], rows: list[tuple], img: np.ndarray, txt: dict[str, np.ndarray],
               views: int) -> None:
    with tarfile.open(tmp, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0  # no clock in the bytes: a rebuild writes the same file
            tf.addfile(info, io.BytesIO(data))

        add(HEADER, json.dumps(head, sort_keys=True).encode())
        k = 0
        for key, seeds, caption, why in rows:
            if why:
                add(f"{key}.skip.txt", why.encode())
                continue
            add(f"{key}.teacher", encode_record(seeds, img[k * views:(k + 1) * views], txt.get(caption)))
            k += 1
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def build_one(teacher: Any, url: str, dst: Path, spec: ViewSpec, fp: str, *, batch_size: int = 64,
              image_keys: Sequence[str] = IMAGE_KEYS,
              caption_keys: Sequence[str] = CAPTION_KEYS) -> dict[str, Any]:
    """Embed one data shard's views and captions and write its companion atomically; -> its header."""
    embedder = _ShardEmbedder(teacher, batch_size)
    rows, raw = _read_shard(url, spec, embedder, image_keys, caption_keys)
    if not rows:
        raise UserError(f"shard {url} holds no samples: check that it is a WebDataset tar shard")
    img = embedder.images()
    texts = sorted({r[2] for r in rows if r[2] and not r[3]})
    txt = dict(zip(texts, embedder.texts(texts)))
    skipped = sum(bool(r[3]) for r in rows)
    head = {"format": FORMAT, "fingerprint": fp, "teacher": teacher.fingerprint, "spec": spec.describe(),
            "data_shard": shard_stem(url), "data_bytes": raw.bytes, "data_sha256": raw.sha.hexdigest(),
            "samples": len(rows), "skipped": skipped, "views": int(spec.views),
            "embed_dim": int(img.shape[1]) if len(img) else int(teacher.embed_dim), "dtype": "float16"}
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    _write_tar(tmp, head, rows, img, txt, int(spec.views))
    os.replace(tmp, dst)
    return head


def _agree(fp: str) -> None:
    """Every rank must build the same companions: a rank with another config is one line, before any work."""
    fps = dist_utils.all_gather_object(fp) if dist_utils.is_dist() else [fp]
    if len(set(fps)) > 1:
        raise UserError(f"ranks disagree on the teacher / view config (fingerprints by rank: {fps}): launch every "
                        f"rank with the same config and overrides")


def _local_dir(url: str) -> Path:
    if url.startswith(("http://", "https://", "pipe:")):
        raise UserError(f"companion teacher shards cannot be written to {url}: set data.train.stream.teacher_root "
                        f"to a local (shared) folder")
    return Path(url[7:] if url.startswith("file:") else url).parent


def _out_dir(urls: Sequence[str], root: str | None) -> Path:
    """Where this build writes: ``root`` (created; every rank must see the same folder) or beside the shards."""
    if root is None:
        return _local_dir(urls[0])
    folder = _local_dir(f"{root}/x")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _companion_path(url: str, root: str | None) -> Path:
    return (_out_dir([url], root) if root else _local_dir(url)) / f"{shard_stem(url)}.teacher.tar"


def build_companions(teacher: Any, urls: Sequence[str], spec: ViewSpec, *, root: str | None = None,
                     batch_size: int = 64, image_keys: Sequence[str] = IMAGE_KEYS,
                     caption_keys: Sequence[str] = CAPTION_KEYS) -> dict[str, Any]:
    """This rank's missing companions (see the module docstring); rank 0 then writes the manifest.
    -> {"built", "kept", "failed": [lines], "seconds", "manifest"} for this rank."""
    fp = fingerprint(teacher.fingerprint, spec)
    _agree(fp)
    _out_dir(urls, root)  # a remote root is refused before any work
    rank, world = dist_utils.rank(), dist_utils.world_size()
    t0, built, kept, failed = time.perf_counter(), 0, 0, []
    for url in list(urls)[rank::world]:
        dst = _companion_path(url, root)
        head = read_header(str(dst)) if dst.exists() else None
        if head is not None and head.get("fingerprint") == fp:
            kept += 1
            continue
        try:
            build_one(teacher, url, dst, spec, fp, batch_size=batch_size, image_keys=image_keys,
                      caption_keys=caption_keys)
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            line = f"shard {url}: no companion written ({str(e).splitlines()[0][:160]}): fix or drop the shard and rerun"
            log.warning("%s", line)
            failed.append(line)
            continue
        built += 1
        if os.environ.get(KILL_ENV) == f"{rank}:{built}":
            os.kill(os.getpid(), signal.SIGKILL)
    dist_utils.wait_for_peers()  # shares may end far apart: past the default group's timeout
    out = {"built": built, "kept": kept, "failed": failed, "seconds": round(time.perf_counter() - t0, 3)}
    if rank == 0:
        out["manifest"] = str(write_manifest(urls, spec, fp, root))
    return out


def write_manifest(urls: Sequence[str], spec: ViewSpec, fp: str, root: str | None = None) -> Path:
    """``teacher_manifest.json`` beside the companions: the recipe, per-shard counts and storage."""
    shards, folder = [], _out_dir(urls, root)
    for url in urls:
        comp = str(_companion_path(url, root))
        head = read_header(comp) or {}
        shards.append({"data": url, "companion": comp, "samples": head.get("samples"), "skipped": head.get("skipped"),
                       "ok": head.get("fingerprint") == fp,
                       "bytes": os.path.getsize(comp) if os.path.exists(comp) else None})
    dim = next((s for s in (read_header(x["companion"]) for x in shards if x["ok"]) if s), {}).get("embed_dim")
    man = {"format": FORMAT, "fingerprint": fp, "spec": spec.describe(), "embed_dim": dim, "dtype": "float16",
           "bytes_per_view": None if dim is None else 2 * int(dim), "shards": shards,
           "complete": all(s["ok"] for s in shards)}
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(man, indent=1))
    os.replace(tmp, path)
    return path


# the companion format's names, re-exported for callers of this module
__all__ = ["FORMAT", "HEADER", "CompanionMismatch", "build_companions", "build_one", "companion_url", "decode_record",
           "encode_record", "fingerprint", "paired_groups", "read_header", "view_seeds", "write_manifest"]

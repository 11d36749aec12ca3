"""Teacher-embedding cache: the frozen teacher's outputs computed once and memory-mapped.

Layout of one cache entry, ``<root>/<fingerprint>/``:
    manifest.json    teacher / data / view fingerprints, sizes, dtype, skip counts, timing
    image_emb.npy    (N * K, D) float16: one row per (image, view) item of the TrainSet
    text_emb.npy     (T, D) float16: one row per unique text of the TrainSet
    valid.npy        (N * K,) bool: False where the image could not be read

The fingerprint hashes the teacher's fingerprint, the TrainSet's (every item key, the view
spec with its seed and count, and the texts) and the identity of the data files (``FILE_IDENTITY``:
size, mtime and a hash of the first and last 64 KiB of every image, CSV, tar shard or IDX file the
sources read), so any change to them builds a new entry, including an image replaced at the same
path; an entry is never reused for inputs it was not built from. The manifest records the rule and
one digest per source (``data_identity``). A build happens in
``<fingerprint>.partial/``; finished chunks are recorded in ``progress.json`` after their rows
are flushed, so an interrupted build resumes where it stopped, and the folder is renamed into
place only when complete (an atomic rename on one file system).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.data import TrainSet, collate
from distill.teachers.base import Teacher

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
IDENTITY_BLOCK = 64 * 1024
# Recorded in the manifest and hashed into the fingerprint: changing the rule builds new entries.
FILE_IDENTITY = "size+mtime_ns+blake2b(first 64KiB, last 64KiB; whole file when <= 128KiB)"


@dataclass
class TeacherCache:
    """Loaded cache entry. ``image_emb``/``text_emb`` are read-only memory maps (float16)."""

    path: Path
    image_emb: np.ndarray  # (N*K, D)
    text_emb: np.ndarray  # (T, D)
    valid: np.ndarray  # (N*K,) bool
    manifest: dict[str, Any]

    def image_targets(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) item indices -> (B, D) float32 teacher image embeddings."""
        return torch.from_numpy(np.asarray(self.image_emb[index.numpy()], dtype=np.float32))

    def mean_embeddings(self, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """(image mean over the readable rows, text mean over the stored texts), each (D,) float32:
        the mean of the L2-normalised teacher embeddings (the mean itself is not renormalised), read
        in chunks from the memory maps."""
        def mean(arr: np.ndarray, keep: np.ndarray | None) -> torch.Tensor:
            total, n = np.zeros(arr.shape[1], dtype=np.float64), 0
            for lo in range(0, arr.shape[0], chunk):
                rows = np.asarray(arr[lo:lo + chunk], dtype=np.float64)
                rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)  # as the loss sees them
                if keep is not None:
                    rows = rows[keep[lo:lo + chunk]]
                total += rows.sum(0)
                n += len(rows)
            return torch.from_numpy((total / max(n, 1)).astype(np.float32))

        return mean(self.image_emb, np.asarray(self.valid, dtype=bool)), mean(self.text_emb, None)

    def text_targets(self, text_index: torch.Tensor) -> torch.Tensor:
        """(B,) text indices -> (B, D) float32 teacher text embeddings."""
        return torch.from_numpy(np.asarray(self.text_emb[text_index.numpy()], dtype=np.float32))


def file_identity(path: str | os.PathLike) -> str:
    """``size:mtime_ns:blake2b`` of one file, hashing its first and last 64 KiB (the whole file when
    it is at most 128 KiB); ``missing`` or ``unreadable:<error>`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h = hashlib.blake2b(digest_size=16)
            if st.st_size <= 2 * IDENTITY_BLOCK:
                h.update(f.read())
            else:
                h.update(f.read(IDENTITY_BLOCK))
                f.seek(-IDENTITY_BLOCK, os.SEEK_END)
                h.update(f.read(IDENTITY_BLOCK))
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable:{type(e).__name__}"
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def data_identity(dataset: TrainSet, threads: int = 8) -> list[dict[str, Any]]:
    """One entry per source: ``{"source", "files", "digest"}``, the digest hashing every file's path
    and ``file_identity``; ``files`` and ``digest`` are None for a source without files (in memory).
    Each distinct file is read once, a few at a time (the reads dominate on network disks)."""
    per_source = dataset.identity_files()
    unique = sorted({p for _, files in per_source if files for p in files})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique)))) as ex:
        ident = dict(zip(unique, ex.map(file_identity, unique)))
    log.debug("data identity: %d files in %.2fs", len(unique), time.perf_counter() - t0)
    out: list[dict[str, Any]] = []
    for name, files in per_source:
        if files is None:
            out.append({"source": name, "files": None, "digest": None})
            continue
        h = hashlib.blake2b(digest_size=8)
        for p in files:
            h.update(f"{p}\0{ident[p]}\n".encode())
        missing = sum(ident[p] == "missing" for p in files)
        out.append({"source": name, "files": len(files), "digest": h.hexdigest(),
                    **({"missing": missing} if missing else {})})
    return out


def _fingerprint(teacher_fp: str, data_fp: str, identity: list[dict[str, Any]]) -> str:
    digests = ";".join(f"{d['source']}={d['digest']}" for d in identity)
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{teacher_fp}|{data_fp}|{FILE_IDENTITY}|{digests}".encode())
    return h.hexdigest()[:20]


def cache_fingerprint(teacher: Teacher, dataset: TrainSet, identity: list[dict[str, Any]] | None = None) -> str:
    """The cache entry name for (teacher, dataset): teacher, item keys, views, texts and the data
    files' identity (``data_identity``, computed here unless given)."""
    if identity is None:
        identity = data_identity(dataset)
    return _fingerprint(teacher.fingerprint, dataset.fingerprint(), identity)


def _log_data_change(root: Path, teacher_fp: str, data_fp: str, identity: list[dict[str, Any]]) -> None:
    """Say which sources' files changed when the newest entry for the same teacher, keys, views
    and texts differs from this build only in its data identity."""
    manifests = []
    for m in root.glob("*/manifest.json"):
        try:
            manifests.append((m.stat().st_mtime, m))
        except OSError:
            continue
    for _, m in sorted(manifests, reverse=True):
        try:
            old = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        if old.get("teacher_fingerprint") != teacher_fp or old.get("data_fingerprint") != data_fp:
            continue
        before = old.get("data_identity")
        if not isinstance(before, list) or len(before) != len(identity):
            return  # built before file identities were recorded: nothing to compare
        changed = [d["source"] for d, o in zip(identity, before) if d["digest"] != o.get("digest")]
        if changed:
            log.info("teacher cache: files of %s changed since %s was built: building a new entry",
                     ", ".join(changed), m.parent)
        return


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def load_cache(path: Path) -> TeacherCache:
    manifest = json.loads((path / "manifest.json").read_text())
    return TeacherCache(
        path=path,
        image_emb=np.load(path / "image_emb.npy", mmap_mode="r"),
        text_emb=np.load(path / "text_emb.npy", mmap_mode="r"),
        valid=np.load(path / "valid.npy"),
        manifest=manifest,
    )


def _load_hit(final: Path, fp: str, n: int) -> TeacherCache | None:
    if not (final / "manifest.json").exists():
        return None
    cache = load_cache(final)
    if cache.manifest.get("fingerprint") != fp or cache.image_emb.shape[0] != n:
        raise RuntimeError(f"cache entry {final} does not match its fingerprint; delete it and rerun")
    log.info("teacher cache hit: %s", final)
    return cache


def _progress_state(part: Path, fp: str) -> dict[str, Any]:
    """The build's progress.json, or a fresh state (and an emptied folder) when it belongs to another build."""
    progress_file = part / "progress.json"
    state = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    if state.get("fingerprint") != fp:
        state = {"fingerprint": fp, "done_chunks": [], "text_done": False, "skipped": {}, "seconds": 0.0}
        for f in part.iterdir():
            f.unlink()
    return state


def _encode_texts(teacher: Teacher, dataset: TrainSet, part: Path, state: dict[str, Any], batch_size: int) -> None:
    if state["text_done"]:
        return
    txt = np.lib.format.open_memmap(part / "text_emb.npy", mode="w+", dtype=np.float16,
                                    shape=(len(dataset.texts), teacher.embed_dim))
    for s in range(0, len(dataset.texts), batch_size):
        txt[s:s + batch_size] = teacher.encode_text(dataset.texts[s:s + batch_size]).cpu().numpy()
    txt.flush()
    del txt
    state["text_done"] = True
    _write_json_atomic(part / "progress.json", state)


def _encode_chunk(teacher: Teacher, dataset: TrainSet, lo: int, hi: int, img: np.ndarray, valid: np.ndarray,
                  state: dict[str, Any], batch_size: int, num_workers: int, device: torch.device | str, bar) -> None:
    """Embed items ``lo`` to ``hi`` - 1 into ``img``; unreadable ones are marked invalid and recorded."""
    loader = DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate)
    valid[lo:hi] = True
    for batch in loader:
        for j in batch["skipped"]:
            valid[j] = False
            state["skipped"][str(j)] = dataset.key(j)
        if len(batch["index"]):
            img[batch["index"].numpy()] = teacher.encode_image(batch["image"].to(device)).cpu().numpy()  # (B, D)
        bar.update(len(batch["index"]) + len(batch["skipped"]))
    img.flush()
    valid.flush()


def _manifest(teacher: Teacher, dataset: TrainSet, fp: str, data_fp: str, identity: list[dict[str, Any]],
              state: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "teacher_fingerprint": teacher.fingerprint,
        "data_fingerprint": data_fp,
        "file_identity": FILE_IDENTITY,
        "data_identity": identity,
        "views": dataset.spec.describe(),
        "items": len(dataset),
        "texts": len(dataset.texts),
        "embed_dim": teacher.embed_dim,
        "logit_scale": float(teacher.logit_scale),
        "dtype": "float16",
        "skipped": len(state["skipped"]),
        "skipped_first": list(state["skipped"].values())[:5],
        "build_seconds": round(state["seconds"], 2),
    }


def build_or_load(
    teacher: Teacher,
    dataset: TrainSet,
    root: str | os.PathLike,
    *,
    chunk_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    _stop_after_chunks: int | None = None,
) -> TeacherCache:
    """Return the cache entry for (teacher, dataset), building or finishing it if needed.

    ``_stop_after_chunks`` simulates an interruption (tests): the build stops after that many
    new chunks, leaving a resumable ``.partial`` folder, and raises KeyboardInterrupt.
    """
    identity = data_identity(dataset)  # once per call: it stats and reads every data file
    data_fp = dataset.fingerprint()
    fp = _fingerprint(teacher.fingerprint, data_fp, identity)
    root, n = Path(root), len(dataset)
    final = root / fp
    hit = _load_hit(final, fp, n)
    if hit is not None:
        return hit
    _log_data_change(root, teacher.fingerprint, data_fp, identity)
    part = root / f"{fp}.partial"
    part.mkdir(parents=True, exist_ok=True)
    state = _progress_state(part, fp)
    mode = "r+" if (part / "image_emb.npy").exists() else "w+"
    img = np.lib.format.open_memmap(part / "image_emb.npy", mode=mode, dtype=np.float16, shape=(n, teacher.embed_dim))
    valid = np.lib.format.open_memmap(part / "valid.npy", mode=mode, dtype=np.bool_, shape=(n,))
    t0 = time.perf_counter()
    _encode_texts(teacher, dataset, part, state, batch_size)
    n_chunks = (n + chunk_size - 1) // chunk_size
    todo = [c for c in range(n_chunks) if c not in set(state["done_chunks"])]
    bar = tqdm(total=n, initial=n - sum(min(chunk_size, n - c * chunk_size) for c in todo),
               desc=f"teacher cache {fp[:8]}", unit="img", disable=not progress)
    for new_chunks, c in enumerate(todo, start=1):
        _encode_chunk(teacher, dataset, c * chunk_size, min(n, (c + 1) * chunk_size), img, valid, state,
                      batch_size, num_workers, device, bar)
        state["done_chunks"].append(c)
        state["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        _write_json_atomic(part / "progress.json", state)
        if _stop_after_chunks is not None and new_chunks >= _stop_after_chunks and len(state["done_chunks"]) < n_chunks:
            bar.close()
            raise KeyboardInterrupt(f"cache build interrupted after {new_chunks} chunks (test hook)")
    bar.close()
    del img, valid
    if state["skipped"]:
        log.warning("teacher cache: skipped %d unreadable images, first: %s", len(state["skipped"]),
                    list(state["skipped"].values())[:5])
    manifest = _manifest(teacher, dataset, fp, data_fp, identity, state)
    _write_json_atomic(part / "manifest.json", manifest)
    (part / "progress.json").unlink()
    if final.exists():  # a concurrent builder finished first; ours is identical by construction
        shutil.rmtree(part)
    else:
        os.replace(part, final)
    log.info("teacher cache built: %s (%d items, %.1fs)", final, n, manifest["build_seconds"])
    return load_cache(final)


def text_embeddings(teacher: Teacher, texts: list[str], root: str | os.PathLike, *, batch_size: int = 512,
                    progress: bool = True, desc: str = "teacher texts") -> np.ndarray:
    """The teacher's embeddings of ``texts`` as (T, D) float32, computed once per (teacher, texts)
    and kept under ``<root>/texts/<fingerprint>.npy`` (float16, written atomically) for later runs."""
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{teacher.fingerprint}|".encode())
    for t in texts:
        h.update(t.encode() + b"\x00")
    path = Path(root) / "texts" / f"{h.hexdigest()[:20]}.npy"
    if path.exists():
        out = np.load(path)
        if out.shape == (len(texts), teacher.embed_dim):
            log.info("teacher text cache hit: %s", path)
            return out.astype(np.float32)
        log.warning("teacher text cache %s has shape %s, expected %s: rebuilding", path, out.shape,
                    (len(texts), teacher.embed_dim))
    t0 = time.perf_counter()
    out = np.empty((len(texts), teacher.embed_dim), dtype=np.float16)
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        out[s:s + batch_size] = teacher.encode_text(texts[s:s + batch_size]).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    log.info("teacher text cache built: %s (%d texts, %.1fs)", path, len(texts), time.perf_counter() - t0)
    return out.astype(np.float32)

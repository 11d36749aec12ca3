"""Teacher-embedding cache: the frozen teacher's outputs computed once and memory-mapped.

Layout of one cache entry, ``<root>/<fingerprint>/``:
    manifest.json    teacher / data / view fingerprints, sizes, dtype, skip counts, timing
    image_emb.npy    (N * K, D) float16: one row per (image, view) item of the TrainSet
    text_emb.npy     (T, D) float16: one row per unique text of the TrainSet
    valid.npy        (N * K,) bool: False where the image could not be read
    view_params.npy  (N * K,) structured (``PARAMS_DTYPE``): what each item's pixels are, as
                     ``TrainSet.view_params`` says: its crop, and with ``data.train.mix`` its mix
                     mode, partner item, lam and cutmix box (the teacher embedded the mixed pixels).
                     ``TeacherCache.view_params(j)`` reads it back; entries built before it existed lack it.

The fingerprint hashes the teacher's fingerprint, the TrainSet's (every item key, the view
spec with its seed, count and mix, and the texts) and the identity of the data files (``FILE_IDENTITY``:
size, mtime and a hash of the whole content of every image, CSV, tar shard or IDX file the sources
read), so any change to them builds a new entry, including an image replaced at the same path or
edited in place with its size and mtime restored; an entry is never reused for inputs it was not
built from. Hashing whole files reads every data file once per run, a cache hit included. The
manifest records the rule and one digest per source (``data_identity``).

Concurrent builds. Before building, a run's rank 0 takes an exclusive ``fcntl.flock`` on
``<root>/<fingerprint>.lock`` and holds it until the entry is in place: a second run (another
command, a parallel sweep job, another torchrun job) that needs the same entry waits on that lock,
then finds the finished entry and loads it, so every entry is built once. Only rank 0 of a run
locks (its other ranks wait for it at a barrier that tolerates long waits), so the ranks of one
run never wait on each other's lock; the operating system drops the lock of a killed process and
the next run resumes its ``.partial`` folder. The text-embedding entries (``text_embeddings``) are
locked the same way, per process.

Building. The items are cut into chunks of ``chunk_size`` rows and the texts into chunks of
``TEXT_CHUNK_FACTOR * chunk_size``; each chunk is embedded in batches of ``batch_size`` counted
from its first row, so a chunk's rows do not depend on who embeds it. A build happens in
``<fingerprint>.partial/``: ``progress.json`` (written by rank 0: the chunk and batch size, which
a resumed build keeps, and the image chunks rank 0 knows finished) and ``chunks/image-<c>.npz`` /
``chunks/text-<c>.npz``, each written to a temporary name, fsynced and renamed, so a finished chunk
is whole and a killed process loses only the chunk it was embedding. Under torchrun
(``distill.distributed``) every rank first compares its fingerprint with the others' (a mismatch
is a UserError naming what differs), rank 0 lists the chunks not yet on disk and hands them out
round-robin (the i-th missing chunk to rank i mod world size), every rank embeds its share, and
after a barrier rank 0 copies the chunks into the entry's arrays, writes the manifest and renames
the folder into place (an atomic rename on one file system); a single process does the same alone.
``cache.dir`` must therefore be one file system that every rank sees (checked before any work).
A rerun, with any world size, skips the chunks already on disk. The chunk files are kept only
until the entry is complete. With the same devices and thread settings an entry is bit-identical
whichever number of processes built it (tests/test_cache_distributed.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill import distributed as dist_utils
from distill.data import MIX_CODES, TrainSet, collate
from distill.imageio import SkipLog
from distill.errors import UserError
from distill.teachers.base import Teacher

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
IDENTITY_BLOCK = 1 << 20  # read size while hashing a file
# Recorded in the manifest and hashed into the fingerprint: changing the rule builds new entries.
FILE_IDENTITY = "size+mtime_ns+blake2b(whole file)"
# The .partial folder's layout: 2 = chunk files; a folder of layout 1 (memmaps written in place) is discarded.
PARTIAL_LAYOUT = 2
TEXT_CHUNK_FACTOR = 8  # a text costs far less than an image: its chunks are 8 times longer
SHARED_FS_WAIT_S = 60.0  # how long a rank waits for another node's file to show on a network file system
KILL_ENV = "DISTILL_CACHE_TEST_KILL"  # test hook, see _test_kill
DELAY_ENV = "DISTILL_CACHE_TEST_DELAY"  # test hook, see _test_delay
# One row per item of view_params.npy: crop (top, left, h, w, flip; -1 without a crop), mix (an
# index into distill.data.MIX_CODES), partner (-1: none), lam (1.0 unmixed), box (top, left, h, w; -1: none).
PARAMS_DTYPE = np.dtype([("crop", np.int32, (5,)), ("mix", np.int8), ("partner", np.int64), ("lam", np.float64),
                         ("box", np.int32, (4,))])


def empty_params(n: int) -> np.ndarray:
    """``n`` rows of PARAMS_DTYPE meaning "no crop, not mixed" (an unreadable item keeps them)."""
    out = np.zeros(n, dtype=PARAMS_DTYPE)
    out["crop"], out["partner"], out["lam"], out["box"] = -1, -1, 1.0, -1
    return out


def params_row(out: np.ndarray, row: int, p: dict[str, Any]) -> None:
    """Write ``TrainSet.view_params``'s dict ``p`` into row ``row`` of a PARAMS_DTYPE array."""
    c, b = p.get("crop"), p.get("box")
    if c is not None:
        out["crop"][row] = (c["top"], c["left"], c["h"], c["w"], int(c["flip"]))
    out["mix"][row] = MIX_CODES.index(p.get("mix", "none"))
    out["partner"][row] = -1 if p.get("partner") is None else int(p["partner"])
    out["lam"][row] = float(p.get("lam", 1.0))
    if b is not None:
        out["box"][row] = (b["top"], b["left"], b["h"], b["w"])


def params_dict(rec: np.void, valid: bool) -> dict[str, Any]:
    """A PARAMS_DTYPE row back as ``TrainSet.view_params``'s dict."""
    crop, box = rec["crop"].tolist(), rec["box"].tolist()
    return {"valid": bool(valid),
            "crop": None if crop[0] < 0 else dict(zip(("top", "left", "h", "w"), crop[:4]), flip=bool(crop[4])),
            "mix": MIX_CODES[int(rec["mix"])], "partner": None if rec["partner"] < 0 else int(rec["partner"]),
            "lam": float(rec["lam"]), "box": None if box[0] < 0 else dict(zip(("top", "left", "h", "w"), box))}


@dataclass
class TeacherCache:
    """Loaded cache entry. ``image_emb``/``text_emb`` are read-only memory maps (float16)."""

    path: Path
    image_emb: np.ndarray  # (N*K, D)
    text_emb: np.ndarray  # (T, D)
    valid: np.ndarray  # (N*K,) bool
    manifest: dict[str, Any]
    params: np.ndarray | None = None  # (N*K,) PARAMS_DTYPE memory map; None for entries built before it existed

    def view_params(self, j: int) -> dict[str, Any]:
        """Item j's view parameters as the build saw them (``TrainSet.view_params``'s dict)."""
        if self.params is None:
            raise UserError(f"teacher cache {self.path} was built before view parameters were stored: delete it "
                            f"and rerun to rebuild it")
        return params_dict(self.params[int(j)], bool(self.valid[int(j)]))

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
    """``size:mtime_ns:blake2b`` of one file, hashing all of its content; ``missing`` or
    ``unreadable:<error>`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h = hashlib.blake2b(digest_size=16)
            while block := f.read(IDENTITY_BLOCK):
                h.update(block)
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


@contextlib.contextmanager
def _exclusive(lock_file: Path, what: str):
    """Hold an exclusive ``flock`` on ``lock_file`` (made if needed), waiting for whoever holds it;
    the operating system releases it when its holder dies."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            log.info("%s: process %s is building it: waiting for it to finish", what, holder)
            t0 = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log.info("%s: waited %.1fs for process %s", what, time.perf_counter() - t0, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # named in the message of whoever waits
        yield
    finally:
        os.close(fd)


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
        params=np.load(path / "view_params.npy", mmap_mode="r") if (path / "view_params.npy").exists() else None,
    )


def _wait_for(path: Path, seconds: float) -> bool:
    """Whether ``path`` exists, polling up to ``seconds``: a network file system may show another
    node's new file a little later than the barrier that follows its writing."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _load_hit(final: Path, fp: str, n: int) -> TeacherCache:
    if not _wait_for(final / "manifest.json", SHARED_FS_WAIT_S if dist_utils.rank() else 0):
        raise UserError(f"teacher cache: rank {dist_utils.rank()} cannot see {final}, which rank 0 sees: put "
                        f"cache.dir on a file system that every node mounts")
    cache = load_cache(final)
    if cache.manifest.get("fingerprint") != fp or cache.image_emb.shape[0] != n:
        raise RuntimeError(f"cache entry {final} does not match its fingerprint; delete it and rerun")
    return cache


@dataclass(frozen=True)
class _Chunk:
    """Rows ``lo`` to ``hi`` - 1 of the image items (``kind`` image) or of the texts (``kind`` text)."""

    kind: str
    id: int
    lo: int
    hi: int

    @property
    def file(self) -> str:
        return f"{self.kind}-{self.id:06d}.npz"


def _chunks(items: int, texts: int, chunk_size: int) -> list[_Chunk]:
    """Every chunk of a build, image chunks first; the texts' chunks are TEXT_CHUNK_FACTOR times longer."""
    out = [_Chunk("image", c, lo, min(items, lo + chunk_size)) for c, lo in enumerate(range(0, items, chunk_size))]
    step = chunk_size * TEXT_CHUNK_FACTOR
    return out + [_Chunk("text", c, lo, min(texts, lo + step)) for c, lo in enumerate(range(0, texts, step))]


def _agree_across_ranks(teacher_fp: str, data_fp: str, identity: list[dict[str, Any]], fp: str) -> None:
    """Raise one line naming what differs when another rank would build another entry (before any work)."""
    mine = {"fp": fp, "teacher": teacher_fp, "data": data_fp, "files": {d["source"]: d["digest"] for d in identity}}
    every = dist_utils.all_gather_object(mine)
    ref = every[0]
    for r, other in enumerate(every):
        if other["fp"] == ref["fp"]:
            continue
        if other["teacher"] != ref["teacher"]:
            what = "the teacher (its config or weights)"
        elif other["data"] != ref["data"]:
            what = "the training data (items, views with their seed, or texts)"
        else:
            changed = sorted(set(ref["files"].items()) ^ set(other["files"].items()))
            what = f"the data files of {', '.join(dict(changed)) or 'the sources'} (paths, sizes, mtimes or contents)"
        raise UserError(f"teacher cache: rank {r} disagrees with rank 0 on {what}: fingerprint {other['fp']} vs "
                        f"{ref['fp']}; every rank must run the same config on the same files")


def _progress_state(part: Path, fp: str, chunk_size: int, batch_size: int) -> dict[str, Any]:
    """Rank 0: the build's progress.json, or a fresh state (and an emptied folder) when it belongs
    to another build or to the memmap layout of earlier versions; a resumed build keeps its sizes."""
    progress_file = part / "progress.json"
    state = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    if state.get("fingerprint") != fp or state.get("layout") != PARTIAL_LAYOUT:
        shutil.rmtree(part, ignore_errors=True)
        state = {"fingerprint": fp, "layout": PARTIAL_LAYOUT, "chunk_size": chunk_size, "batch_size": batch_size,
                 "done_chunks": []}
    elif (state["chunk_size"], state["batch_size"]) != (chunk_size, batch_size):
        log.info("teacher cache: resuming %s with its chunk_size=%d batch_size=%d (the chunks must not change "
                 "mid-build)", part, state["chunk_size"], state["batch_size"])
    (part / "chunks").mkdir(parents=True, exist_ok=True)
    return state


def _open_partial(part: Path, fp: str, chunk_size: int, batch_size: int) -> dict[str, Any]:
    """Rank 0 prepares ``part``; every rank gets its progress state and proves it sees rank 0's copy."""
    token = dist_utils.broadcast_object(os.urandom(8).hex())  # this attempt's mark in progress.json
    if dist_utils.rank() == 0:
        state = {**_progress_state(part, fp, chunk_size, batch_size), "attempt": token}
        _write_json_atomic(part / "progress.json", state)
    dist_utils.barrier()
    if dist_utils.rank() != 0:
        state = _read_attempt(part / "progress.json", token)
    sees = dist_utils.all_gather_object(state is not None)
    if not all(sees):
        blind = ", ".join(str(r) for r, ok in enumerate(sees) if not ok)
        raise UserError(f"teacher cache: rank {blind} cannot see rank 0's {part}: put cache.dir on a file system "
                        f"that every node mounts")
    return state


def _read_attempt(progress_file: Path, token: str) -> dict[str, Any] | None:
    """progress.json as rank 0 wrote it for this attempt, or None when it does not show up in time."""
    deadline = time.monotonic() + SHARED_FS_WAIT_S
    while True:
        try:
            state = json.loads(progress_file.read_text())
            if state.get("attempt") == token:
                return state
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _missing(part: Path, chunks: list[_Chunk], state: dict[str, Any]) -> list[_Chunk]:
    """Rank 0: the chunks without a file yet (the files are the truth; progress.json follows them)."""
    todo = [c for c in chunks if not (part / "chunks" / c.file).exists()]
    left = {c.id for c in todo if c.kind == "image"}
    state["done_chunks"] = [c.id for c in chunks if c.kind == "image" and c.id not in left]
    return todo


def _embed_images(teacher: Teacher, dataset: TrainSet, c: _Chunk, batch_size: int, num_workers: int,
                  device: torch.device | str, bar) -> dict[str, np.ndarray]:
    """The chunk's items as {emb: (rows, D) float16, valid: (rows,) bool, params: (rows,) PARAMS_DTYPE};
    unreadable rows stay zero (their params "no crop, not mixed"). The rows embed exactly the pixels
    ``TrainSet`` gives (mixed ones included), and their params come with those pixels."""
    emb = np.zeros((c.hi - c.lo, teacher.embed_dim), dtype=np.float16)
    valid = np.ones(c.hi - c.lo, dtype=np.bool_)
    params = empty_params(c.hi - c.lo)
    loader = DataLoader(torch.utils.data.Subset(dataset, range(c.lo, c.hi)), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate)
    for batch in loader:
        valid[np.asarray(batch["skipped"], dtype=np.int64) - c.lo] = False
        if len(batch["index"]):
            emb[batch["index"].numpy() - c.lo] = teacher.encode_image(batch["image"].to(device)).cpu().numpy()
        for j, p in zip(batch["index"].tolist(), batch.get("params") or []):
            if p is not None:
                params_row(params, j - c.lo, p)
        bar.update(len(batch["index"]) + len(batch["skipped"]))
    return {"emb": emb, "valid": valid, "params": params}


def _embed_texts(teacher: Teacher, texts: list[str], c: _Chunk, batch_size: int) -> dict[str, np.ndarray]:
    emb = np.empty((c.hi - c.lo, teacher.embed_dim), dtype=np.float16)
    for s in range(c.lo, c.hi, batch_size):
        e = min(c.hi, s + batch_size)
        emb[s - c.lo:e - c.lo] = teacher.encode_text(texts[s:e]).cpu().numpy()
    return {"emb": emb}


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write, fsync, rename: a chunk file on disk is always whole, even after a crash of the node."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _test_kill(saved: int) -> None:
    """Test hook: ``DISTILL_CACHE_TEST_KILL=RANK:N`` SIGKILLs that rank once it has embedded, but
    not yet saved, the chunk after its first N."""
    if os.environ.get(KILL_ENV) == f"{dist_utils.rank()}:{saved}":
        os.kill(os.getpid(), signal.SIGKILL)


def _test_delay() -> None:
    """Test hook: ``DISTILL_CACHE_TEST_DELAY=RANK:SECONDS`` holds that rank back after its share."""
    want = os.environ.get(DELAY_ENV, "")
    if want.partition(":")[0] == str(dist_utils.rank()):
        time.sleep(float(want.partition(":")[2]))


def _build_chunks(teacher: Teacher, dataset: TrainSet, part: Path, mine: list[_Chunk], state: dict[str, Any],
                  num_workers: int, device: torch.device | str, progress: bool,
                  stop_after: int | None) -> None:
    """Embed and save this rank's chunks; rank 0 keeps progress.json current."""
    bar = tqdm(total=sum(c.hi - c.lo for c in mine if c.kind == "image"), desc=f"teacher cache {part.name[:8]}",
               unit="img", disable=not progress)
    for saved, c in enumerate(mine):
        t0 = time.perf_counter()
        if c.kind == "image":
            arrays = _embed_images(teacher, dataset, c, state["batch_size"], num_workers, device, bar)
        else:
            arrays = _embed_texts(teacher, dataset.texts, c, state["batch_size"])
        _test_kill(saved)
        _save_chunk(part / "chunks" / c.file, {**arrays, "seconds": np.float64(time.perf_counter() - t0)})
        if dist_utils.rank() == 0 and c.kind == "image":
            state["done_chunks"] = sorted({*state["done_chunks"], c.id})
            _write_json_atomic(part / "progress.json", state)
        if stop_after is not None and saved + 1 >= stop_after and saved + 1 < len(mine):
            bar.close()
            raise KeyboardInterrupt(f"cache build interrupted after {saved + 1} chunks (test hook)")
    bar.close()


def _read_chunk(path: Path, c: _Chunk, dim: int) -> dict[str, np.ndarray]:
    """A finished chunk's arrays; a missing or damaged one is an error that a rerun repairs."""
    if not _wait_for(path, SHARED_FS_WAIT_S if dist_utils.world_size() > 1 else 0):
        raise RuntimeError(f"teacher cache chunk {path} is missing after every rank finished: rerun to build it")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if arrays["emb"].shape != (c.hi - c.lo, dim):
            raise ValueError(f"shape {arrays['emb'].shape}")
        if "params" in arrays and (arrays["params"].dtype != PARAMS_DTYPE or len(arrays["params"]) != c.hi - c.lo):
            raise ValueError(f"view params {arrays['params'].dtype} x {len(arrays['params'])}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"teacher cache chunk {path} was damaged ({e}) and is removed: rerun to rebuild it") from e
    return arrays


def _assemble(teacher: Teacher, dataset: TrainSet, part: Path, chunks: list[_Chunk]) -> tuple[dict[str, str], float]:
    """Rank 0: copy every chunk into the entry's arrays; returns (skipped item -> key, summed seconds)."""
    n, dim = len(dataset), teacher.embed_dim
    img = np.lib.format.open_memmap(part / "image_emb.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    valid = np.lib.format.open_memmap(part / "valid.npy", mode="w+", dtype=np.bool_, shape=(n,))
    params = np.lib.format.open_memmap(part / "view_params.npy", mode="w+", dtype=PARAMS_DTYPE, shape=(n,))
    txt = np.lib.format.open_memmap(part / "text_emb.npy", mode="w+", dtype=np.float16,
                                    shape=(len(dataset.texts), dim))
    seconds = 0.0
    for c in chunks:
        arrays = _read_chunk(part / "chunks" / c.file, c, dim)
        (img if c.kind == "image" else txt)[c.lo:c.hi] = arrays["emb"]
        if c.kind == "image":
            valid[c.lo:c.hi] = arrays["valid"]
            params[c.lo:c.hi] = arrays["params"] if "params" in arrays else _params_of(dataset, c, arrays["valid"])
        seconds += float(arrays["seconds"])
    for arr in (img, valid, txt, params):
        arr.flush()
    skipped = {str(j): dataset.key(int(j)) for j in np.flatnonzero(~np.asarray(valid))}
    del img, valid, txt, params
    return skipped, seconds


def _params_of(dataset: TrainSet, c: _Chunk, valid: np.ndarray) -> np.ndarray:
    """View params of a chunk that an earlier version embedded without them (a resumed build)."""
    log.info("teacher cache: chunk %s has no view params (built by an earlier version): computing them", c.file)
    out = empty_params(c.hi - c.lo)
    for j in range(c.lo, c.hi):
        if valid[j - c.lo]:
            params_row(out, j - c.lo, dataset.view_params(j))
    return out


def _manifest(teacher: Teacher, dataset: TrainSet, fp: str, data_fp: str, identity: list[dict[str, Any]],
              skipped: dict[str, str], seconds: float) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "teacher_fingerprint": teacher.fingerprint,
        "data_fingerprint": data_fp,
        "file_identity": FILE_IDENTITY,
        "data_identity": identity,
        "views": dataset.spec.describe(),
        "view_params": "view_params.npy",  # per item: crop, mix mode, partner, lam, cutmix box
        "items": len(dataset),
        "texts": len(dataset.texts),
        "embed_dim": teacher.embed_dim,
        "logit_scale": float(teacher.logit_scale),
        "dtype": "float16",
        "skipped": len(skipped),
        "skipped_first": list(skipped.values())[:SkipLog.keep],
        "build_seconds": round(seconds, 2),  # summed over the chunks: process-seconds, whatever the world size
        "build_ranks": dist_utils.world_size(),  # of the run that finished it
    }


def _finish(teacher: Teacher, dataset: TrainSet, part: Path, final: Path, chunks: list[_Chunk],
            manifest_args: tuple[str, str, list[dict[str, Any]]]) -> None:
    """Rank 0: assemble the entry, write its manifest and rename it into place."""
    skipped, seconds = _assemble(teacher, dataset, part, chunks)
    if skipped:
        log.warning("teacher cache: skipped %d unreadable images, first: %s", len(skipped), list(skipped.values())[:SkipLog.keep])
    manifest = _manifest(teacher, dataset, *manifest_args, skipped, seconds)
    _write_json_atomic(part / "manifest.json", manifest)
    shutil.rmtree(part / "chunks")
    (part / "progress.json").unlink()
    if final.exists():  # a concurrent builder finished first; ours is identical by construction
        shutil.rmtree(part)
    else:
        os.replace(part, final)
    log.info("teacher cache built: %s (%d items, %.1f process-seconds, %d ranks)", final, len(dataset),
             manifest["build_seconds"], manifest["build_ranks"])


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

    Under torchrun every rank must call it (it joins collectives): the ranks build the missing
    chunks together and all return the same entry. ``_stop_after_chunks`` simulates an
    interruption (tests, one process): the build stops after that many new chunks, leaving a
    resumable ``.partial`` folder, and raises KeyboardInterrupt.
    """
    identity = data_identity(dataset)  # once per call: it stats and reads every data file
    data_fp = dataset.fingerprint()
    fp = _fingerprint(teacher.fingerprint, data_fp, identity)
    root = Path(root)
    final, part = root / fp, root / f"{fp}.partial"
    _agree_across_ranks(teacher.fingerprint, data_fp, identity, fp)
    if dist_utils.broadcast_flag((final / "manifest.json").exists()):  # rank 0's view decides for all
        log.info("teacher cache hit: %s", final)
        return _load_hit(final, fp, len(dataset))
    r, world = dist_utils.rank(), dist_utils.world_size()
    # rank 0 alone locks the entry against other runs; its own ranks wait for it below
    with _exclusive(root / f"{fp}.lock", f"teacher cache {fp[:8]}") if r == 0 else contextlib.nullcontext():
        dist_utils.wait_for_peers()  # rank 0 may wait long for another run's build
        if dist_utils.broadcast_flag((final / "manifest.json").exists()):
            log.info("teacher cache hit: %s (built by another run meanwhile)", final)
            return _load_hit(final, fp, len(dataset))
        if r == 0:
            _log_data_change(root, teacher.fingerprint, data_fp, identity)
        state = _open_partial(part, fp, chunk_size, batch_size)
        chunks = _chunks(len(dataset), len(dataset.texts), state["chunk_size"])
        todo = dist_utils.broadcast_object(_missing(part, chunks, state) if r == 0 else None)
        log.info("teacher cache %s: rank %d/%d embeds %d of %d chunks (%d already built)", fp[:8], r, world,
                 len(todo[r::world]), len(chunks), len(chunks) - len(todo))
        _build_chunks(teacher, dataset, part, todo[r::world], state, num_workers, device, progress and r == 0,
                      _stop_after_chunks)
        _test_delay()
        dist_utils.wait_for_peers()  # shares may end far apart: past the default group's timeout
        if r == 0:
            _finish(teacher, dataset, part, final, chunks, (fp, data_fp, identity))
    dist_utils.wait_for_peers()  # rank 0 assembles the entry
    return _load_hit(final, fp, len(dataset))


def text_embeddings(teacher: Teacher, texts: list[str], root: str | os.PathLike, *, batch_size: int = 512,
                    progress: bool = True, desc: str = "teacher texts") -> np.ndarray:
    """The teacher's embeddings of ``texts`` as (T, D) float32, computed once per (teacher, texts)
    and kept under ``<root>/texts/<fingerprint>.npy`` (float16, written atomically) for later runs.
    Keyed by the teacher's ``text_fingerprint`` where it has one (what its text tower depends on),
    so a fine-tune that leaves the text tower alone reuses the entry."""
    key = getattr(teacher, "text_fingerprint", None) or teacher.fingerprint
    h = hashlib.sha256(f"v{CACHE_FORMAT}|{key}|".encode())
    for t in texts:
        h.update(t.encode() + b"\x00")
    path = Path(root) / "texts" / f"{h.hexdigest()[:20]}.npy"
    hit = _text_hit(path, (len(texts), teacher.embed_dim))
    if hit is not None:
        return hit
    with _exclusive(path.with_suffix(".lock"), f"teacher text cache {path.stem[:8]}"):
        hit = _text_hit(path, (len(texts), teacher.embed_dim))  # another process may have built it meanwhile
        return hit if hit is not None else _build_text_embeddings(teacher, texts, path, batch_size, progress, desc)


def _text_hit(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    if not path.exists():
        return None
    out = np.load(path)
    if out.shape == shape:
        log.info("teacher text cache hit: %s", path)
        return out.astype(np.float32)
    log.warning("teacher text cache %s has shape %s, expected %s: rebuilding", path, out.shape, shape)
    return None


def _build_text_embeddings(teacher: Teacher, texts: list[str], path: Path, batch_size: int, progress: bool,
                           desc: str) -> np.ndarray:
    t0 = time.perf_counter()
    out = np.empty((len(texts), teacher.embed_dim), dtype=np.float16)
    # batches of similar length: a batch pads to its longest text, and 49k BPE tokens range from 1 to ~15 characters
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = order[s:s + batch_size]
        out[rows] = teacher.encode_text([texts[i] for i in rows]).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    log.info("teacher text cache built: %s (%d texts, %.1fs)", path, len(texts), time.perf_counter() - t0)
    return out.astype(np.float32)

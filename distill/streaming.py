"""Streaming WebDataset shards: image-caption samples read front to back from tar streams (local
paths, ``pipe:`` commands, http(s) through curl), split over (node rank, DataLoader worker) readers.
A reader's state is a few integers, so ``StreamLoader`` resumes the exact batch sequence from a
checkpoint; bad shards and images are skipped and counted, a stalled or broken transfer is retried
and then stops the run with one line. Order, resume guarantee and failure handling: docs/streaming.md.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill import distributed as dist_utils
from distill.data import stable_int
from distill.datasets import SOURCES
from distill.errors import UserError
from distill.imageio import error_reason, load_rgb
from distill.shards import (CAPTION_KEYS, DECODE_ERRORS, DEFAULT_FETCH, IMAGE_KEYS, READ_ERRORS,
                            CompanionMismatch, Fetch, TransferError, companion_url, open_shard, paired_groups,
                            pick_sample, shard_stem, tar_samples)

log = logging.getLogger(__name__)

STATE_VERSION = 1
KEEP_FAILURES = 5  # failure lines kept (and logged) per reader; the counters keep counting
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect (refused or unreachable)",
              22: "HTTP error status (e.g. 404)", 28: "timed out", 35: "TLS handshake failed",
              56: "connection reset while receiving"}


class Sample(NamedTuple):
    key: str  # "<url>#<member key>"
    image: Any  # RGB PIL image
    caption: str  # "" when the sample has no caption
    reader: int  # the reader that produced it (rank * workers + worker)
    state: dict  # that reader's ReaderState (as a dict) just after this sample
    teacher: Any = None  # reinforced shards: {"image": (K, D) f16, "seeds": (K,), "text": (D,) f16 | None}


@dataclass
class ReaderState:
    """One reader's position and counters; a few integers, whatever the data set size."""

    epoch: int = 0
    shard: int = 0  # cursor into this epoch's shard order (resampled: the draw number)
    item: int = 0  # samples taken from the current shard's shuffled order, skipped ones included
    samples: int = 0  # samples this reader has yielded in all
    shards_done: int = 0
    shards_failed: int = 0
    shards_truncated: int = 0
    images_corrupt: int = 0
    no_image: int = 0
    teacher_mismatch: int = 0  # reinforced shards whose companion is missing or does not match (rest skipped)
    failures: list = field(default_factory=list)  # the first KEEP_FAILURES failure lines

    @classmethod
    def from_dict(cls, d: dict | None) -> "ReaderState":
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in (d or {}).items() if k in names}
        return cls(**{**kept, "failures": list(kept.get("failures", []))})  # a copy: the saved dict stays as saved

    def snapshot(self) -> dict:
        """A copy as a plain dict (not dataclasses.asdict, which deep-copies field by field: slow per sample)."""
        return {**self.__dict__, "failures": list(self.failures)}

    def note(self, line: str) -> None:
        if len(self.failures) < KEEP_FAILURES:
            self.failures.append(line)
            log.warning("%s", line)


COUNTERS = ("samples", "shards_done", "shards_failed", "shards_truncated", "images_corrupt", "no_image",
            "teacher_mismatch")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expanded shard URLs; ``::`` separates patterns inside one string."""
    from braceexpand import braceexpand  # webdataset's own brace expansion dependency

    specs = [urls] if isinstance(urls, str) else list(urls)
    out = [s for spec in specs for pat in str(spec).split("::") if pat.strip() for s in braceexpand(pat.strip())]
    if not out:
        raise UserError("no shard URLs: set data.train_urls to a pattern like /data/shard-{000000..000099}.tar")
    return out


def shards_digest(urls: Sequence[str]) -> str:
    """A short hash of the shard list, so a saved state is only applied to the stream it came from."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def stable_key(key: str) -> str:
    """A sample key without its shard's location (``shard-000123#000045``): what seeds are drawn
    from, so the draws stay the same when the shards move (another mount, a mirror, http)."""
    url, _, member = key.rpartition("#")
    return f"{shard_stem(url)}#{member}"


# --------------------------------------------------------------------------------------------
# Reading one shard
# --------------------------------------------------------------------------------------------


def _close(stream: Any) -> int | None:
    """Close a stream; -> a pipe's exit status (webdataset's Pipe), None for a file."""
    if stream is None:
        return None
    try:
        stream.close()
    except READ_ERRORS:
        pass  # a Pipe raises on a bad exit status; the status is read below
    status = getattr(stream, "status", None)
    # curl's 23 / a shell's 141 mean "we stopped reading" (webdataset ignores them): not the cause of a failure
    return None if status in getattr(stream, "ignore_status", [0]) else status


def _exit_code(e: BaseException, status: int | None) -> int | None:
    if status not in (None, 0):
        return status
    m = re.search(r"exit (\d+)", str(e))
    return int(m.group(1)) if m else None


def describe_failure(url: str, e: BaseException, status: int | None = None, samples: int = 0) -> str:
    """One line: which shard, what went wrong, and what to do about it."""
    scheme = url.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]+:", url) else ""
    code = _exit_code(e, status)
    if "unsafe_gopen" in str(e):
        why, fix = "WDS_SECURE=1 forbids local files and pipe: URLs", "unset WDS_SECURE or serve the shards over http(s)"
    elif scheme == "pipe" and code is not None:
        why, fix = f"the command exited with status {code}", f"run `{url[5:]}` in a shell to see its error"
    elif scheme in ("http", "https") and isinstance(e, FileNotFoundError):
        why, fix = "curl is not installed", "install curl (webdataset streams http(s) through it) or use a pipe: URL"
    elif scheme in ("http", "https") and code is not None:
        why = f"curl exit {code}: {CURL_EXITS.get(code, 'transfer failed')}"
        fix = f"check the URL and that the server is up (try `curl -fIL {url}`)"
    elif isinstance(e, FileNotFoundError):
        why, fix = "file not found", "check data.train_urls (brace patterns like shard-{000000..000099}.tar are expanded)"
    elif isinstance(e, PermissionError):
        why, fix = "permission denied", "make the shard readable by this user"
    elif isinstance(e, ValueError) and "gopen handler" in str(e):
        why, fix = f"no opener for the scheme {scheme}:", "use a local path, http(s):// or pipe:<command>"
    elif "max_member_mb" in str(e):
        why, fix = str(e).split("\n")[0], "raise data.train.stream.max_member_mb if that member is genuine"
    else:
        why = str(e).split("\n")[0][:160] or type(e).__name__
        fix = "re-copy or re-download the shard" if samples else "check that it is a (gzipped) tar shard"
    if samples:
        return f"shard {url} ended after {samples} sample(s) ({why}): the rest was skipped; {fix}"
    return f"shard {url} could not be read ({why}): {fix}"


def _raw_samples(stream: Any, url: str, image_keys: Sequence[str], caption_keys: Sequence[str],
                 companion: tuple[str, str | None] | None, fetch: Fetch) -> Iterator[tuple]:
    """(key, image bytes, caption) per sample, plus the teacher entry when paired with a companion shard."""
    if companion is None:
        yield from tar_samples(stream, url, image_keys, caption_keys, fetch.max_member_bytes)
        return
    for key, group, teacher in paired_groups(stream, url, *companion, fetch=fetch):
        yield (*pick_sample(url, key, group, image_keys, caption_keys), teacher)


def transfer_failure(url: str, e: TransferError, tries: int) -> str:
    """One line for a shard whose transfer stalled or broke off on every try."""
    n = f"{tries} {'try' if tries == 1 else 'tries'}"
    return (f"shard {url} {e} on {n}: check that the server is up and reachable (data.train.stream.stall_timeout_s "
            f"and retries set the patience), then rerun the same command to resume from the last checkpoint")


def shuffled_events(url: str, rng: random.Random, buffer: int, image_keys: Sequence[str],
                    caption_keys: Sequence[str], companion: tuple[str, str | None] | None = None,
                    fetch: Fetch = DEFAULT_FETCH) -> Iterator[tuple[str, Any]]:
    """A shard's samples in seeded shuffle-buffer order, as ("sample", raw) events, with at most one
    ("failed" | "truncated" | "mismatch", line) event where reading broke off; the buffer drains at the
    end. ``companion``: (companion shard URL, wanted fingerprint) of a reinforced shard. A transfer that
    stalls or breaks off is retried from the shard's start, skipping the samples already read (the same
    bytes give the same samples), ``fetch.retries`` times; then UserError names the URL."""
    buf: list = []
    stream, read, tries = None, 0, 0
    try:
        while True:
            try:
                stream, seen = open_shard(url, fetch), 0
                for raw in _raw_samples(stream, url, image_keys, caption_keys, companion, fetch):
                    seen += 1
                    if seen <= read:
                        continue  # read before an earlier try broke off
                    read += 1
                    buf.append(raw)
                    if len(buf) >= buffer:
                        yield "sample", _pop(buf, rng)
                break
            except TransferError as e:
                _close(stream)
                stream, tries = None, tries + 1
                if tries > fetch.retries:
                    raise UserError(transfer_failure(url, e, tries)) from None
                log.warning("shard %s %s: try %d of %d in %g s", url, e, tries + 1, fetch.retries + 1,
                            fetch.retry_delay_s)
                time.sleep(fetch.retry_delay_s)
        status, stream = _close(stream), None
        if status not in (None, 0):
            raise OSError(f"exit {status}")
        if not read:
            raise tarfile.ReadError("no samples in the shard")
    except READ_ERRORS as e:
        yield ("truncated" if read else "failed"), describe_failure(url, e, _close(stream), read)
        stream = None
    except CompanionMismatch as e:  # samples already paired are sound; the rest of the shard is skipped
        yield "mismatch", str(e)
    finally:
        _close(stream)
    while buf:
        yield "sample", _pop(buf, rng)


def _pop(buf: list, rng: random.Random) -> Any:
    j = rng.randrange(len(buf))
    buf[j], buf[-1] = buf[-1], buf[j]
    return buf.pop()


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


@SOURCES.register("StreamingShards")
class StreamingShards(IterableDataset):
    """WebDataset shards read as a stream (docs/streaming.md): an IterableDataset of ``Sample``.

    ``rank``/``world_size`` default to torch.distributed's (distill.distributed); the DataLoader
    worker split comes from ``get_worker_info``. ``epochs`` (one-epoch mode): passes over the
    shards, None for endless. ``buffer``: shuffle-buffer size in samples (0 or 1: file order);
    ``shuffle_shards``: shuffle the shard order per epoch. ``stall_timeout_s``, ``retries``,
    ``retry_delay_s``, ``max_member_mb``: how shards are fetched (distill.shards.Fetch). Iterate it
    through ``StreamLoader`` to get batches, counters and a resumable state.
    """

    def __init__(self, urls: str | Sequence[str], resampled: bool = False, epochs: int | None = 1, seed: int = 0,
                 buffer: int = 1000, shuffle_shards: bool = True, rank: int | None = None,
                 world_size: int | None = None, image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_keys: Sequence[str] = CAPTION_KEYS, reinforced: bool = False,
                 teacher_root: str | None = None, stall_timeout_s: float = DEFAULT_FETCH.stall_timeout_s,
                 retries: int = DEFAULT_FETCH.retries, retry_delay_s: float = DEFAULT_FETCH.retry_delay_s,
                 max_member_mb: float = DEFAULT_FETCH.max_member_mb) -> None:
        self.urls = expand_urls(urls)
        self.fetch = Fetch(stall_timeout_s, retries, retry_delay_s, max_member_mb).checked()
        if epochs is not None and int(epochs) < 1:
            raise UserError(f"epochs={epochs} must be >= 1 (or None for endless)")
        if int(buffer) < 0:
            raise UserError(f"shuffle buffer={buffer} must be >= 0 samples")
        self.resampled, self.epochs, self.seed = bool(resampled), None if epochs is None else int(epochs), int(seed)
        self.buffer, self.shuffle_shards = int(buffer), bool(shuffle_shards)
        self._rank, self._world = rank, world_size
        self.image_keys, self.caption_keys = tuple(image_keys), tuple(caption_keys)
        # reinforced: each shard is read with its companion teacher shard (distill.reinforce), whose
        # header must carry teacher_fingerprint (set by the pipeline once the teacher is built)
        self.reinforced, self.teacher_root = bool(reinforced), teacher_root
        self.teacher_fingerprint: str | None = None
        self.name = f"wds-stream:{os.path.basename(self.urls[0]) or self.urls[0]}+{len(self.urls) - 1}"
        self.resume: dict[int, dict] = {}  # reader id -> ReaderState dict, read when iteration starts
        self.worker_offset = 0  # worker w plays reader slot (w + offset) % workers: see StreamLoader

    def node(self) -> tuple[int, int]:
        """(rank, world size): the explicit ones, else torch.distributed's."""
        rank = dist_utils.rank() if self._rank is None else int(self._rank)
        world = dist_utils.world_size() if self._world is None else int(self._world)
        if not 0 <= rank < world:
            raise UserError(f"rank {rank} is outside world size {world}")
        return rank, world

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rank, world = self.node()
        reader = rank * workers + (worker + self.worker_offset) % workers
        return self.iter_reader(reader, world * workers, self.resume.get(reader))

    def _schedule(self, reader: int, readers: int, st: ReaderState) -> Iterator[tuple[int, int, str, frozenset]]:
        """(epoch, cursor, url, the urls this reader may get) from the state's position on."""
        n = len(self.urls)
        if self.resampled:
            part = self.urls[reader::readers] if n >= readers else self.urls
            pool = frozenset(part)
            k = st.shard
            while True:
                yield 0, k, part[stable_int(self.seed, "draw", reader, k) % len(part)], pool
                k += 1
        e = st.epoch
        while self.epochs is None or e < self.epochs:
            order = list(range(n))
            if self.shuffle_shards:
                random.Random(stable_int(self.seed, "epoch", e)).shuffle(order)
            mine = [self.urls[i] for i in order[reader::readers]]
            if not mine:
                return  # more readers than shards: this one has nothing to read
            for c in range(st.shard if e == st.epoch else 0, len(mine)):
                yield e, c, mine[c], frozenset(mine)
            e += 1

    def iter_reader(self, reader: int, readers: int, start: dict | None = None) -> Iterator[Sample]:
        """Reader ``reader`` of ``readers``' samples, from ``start`` (a ReaderState dict) or the beginning."""
        st = ReaderState.from_dict(start)
        barren: set[str] = set()  # shards that gave this reader no sample (failed, or nothing decodable)
        for epoch, cursor, url, pool in self._schedule(reader, readers, st):
            if (epoch, cursor) != (st.epoch, st.shard):
                st.epoch, st.shard, st.item = epoch, cursor, 0
            before = st.samples
            yield from self._read_shard(url, reader, st)
            if st.samples == before:
                barren.add(url)
            if st.samples == 0 and pool <= barren:  # else an endless stream would spin on unreadable shards
                line = st.failures[0] if st.failures else f"no shard of {self.name} holds a sample"
                if not line.startswith(("shard ", "companion ")):
                    line = f"no shard of {self.name} holds a readable image ({line}): check image_keys and the files"
                if readers == 1 and get_worker_info() is None:  # in a worker StreamLoader raises it, on one line
                    raise UserError(line)
                log.warning("reader %d: none of its %d shard(s) gave a sample; it stops (%s)", reader, len(pool), line)
                return

    def _read_shard(self, url: str, reader: int, st: ReaderState) -> Iterator[Sample]:
        """One shard's samples from ``st.item`` on; events before that point are already in ``st``.

        Each sample is held back until the next one arrives, so the shard's last sample can carry the
        position "shard finished": a resume from it starts on the next shard instead of re-reading this one.
        """
        skip, taken, held = st.item, 0, None
        rng = random.Random(stable_int(self.seed, "buffer", reader, st.epoch, st.shard))
        for kind, payload in shuffled_events(url, rng, self.buffer, self.image_keys, self.caption_keys,
                                             self.companion(url), self.fetch):
            if kind == "sample":
                taken += 1
                if taken <= skip:
                    continue  # taken before the saved position: not decoded, not counted again
                st.item += 1
                sample = self._decode(payload, reader, st)
                if sample is not None:
                    if held is not None:
                        yield held
                    held = sample
            elif kind == "mismatch":
                if taken >= skip:
                    st.teacher_mismatch += 1
                    st.note(payload)
            elif kind == "failed":
                if taken >= skip:  # events before the saved position are already in the restored counters
                    st.shards_failed += 1
                    st.note(payload)
                return
            elif taken >= skip:
                st.shards_truncated += 1
                st.note(payload)
        st.shards_done += 1
        if held is not None:  # every later event of this shard is in st: fold them into the finished position
            yield held._replace(state={**st.snapshot(), "shard": st.shard + 1, "item": 0})

    def companion(self, url: str) -> tuple[str, str | None] | None:
        """(companion shard URL, wanted fingerprint) for a reinforced stream, else None."""
        if not self.reinforced:
            return None
        return companion_url(url, self.teacher_root), self.teacher_fingerprint

    def _decode(self, raw: tuple, reader: int, st: ReaderState) -> Sample | None:
        key, data, caption = raw[:3]
        if data is None:
            st.no_image += 1
            return None
        try:
            img = load_rgb(io.BytesIO(data))
        except DECODE_ERRORS as e:
            st.images_corrupt += 1
            st.note(f"skipping unreadable image {key}: {error_reason(e)}")
            return None
        st.samples += 1
        return Sample(key, img, caption, reader, st.snapshot(), raw[3] if len(raw) > 3 else None)

    def probe(self) -> str | None:
        """The first shard's failure line when no shard yields a sample, else None (main-process diagnosis)."""
        first = None
        for url in self.urls:
            for kind, payload in shuffled_events(url, random.Random(0), 0, self.image_keys, self.caption_keys,
                                                 self.companion(url), self.fetch):
                if kind == "sample":
                    return None
                first = first or payload
        return first


# --------------------------------------------------------------------------------------------
# Batches, counters and the resumable state
# --------------------------------------------------------------------------------------------


class _Batch(NamedTuple):
    data: Any
    reader: int
    state: dict


def default_collate(samples: list[Any]) -> dict[str, list]:
    """{"key": [...], "image": [...], "caption": [...]} of a list of Samples (images left as they are)."""
    return {"key": [s.key for s in samples], "image": [s.image for s in samples],
            "caption": [s.caption for s in samples]}


class _BatchFn:
    """The DataLoader's collate_fn, run in the worker: transform, collate, and carry the position along."""

    def __init__(self, transform: Callable[[Sample], Any] | None, collate: Callable[[list], Any] | None) -> None:
        self.transform, self.collate = transform, collate or default_collate

    def __call__(self, samples: list[Sample]) -> _Batch:
        last = samples[-1]  # a worker's batch holds one reader's samples, in order
        items = [self.transform(s) for s in samples] if self.transform is not None else samples
        return _Batch(self.collate(items), last.reader, last.state)


def worker_line(e: BaseException) -> str:
    """A worker's UserError line: DataLoader re-raises it in the main process wrapped in the worker's traceback."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, line = last.partition(": ")
    return line if sep and re.fullmatch(r"[\w.]+", name) else last


class StreamLoader:
    """Batches of a ``StreamingShards`` through a DataLoader, with the bookkeeping that makes the
    stream resumable: the position of every reader as of the last batch handed out, and which
    worker's batch comes next (workers take turns). ``transform(sample)`` and ``collate(items)`` run
    in the workers (default: lists of keys, PIL images and captions).

    ``state_dict`` / ``load_state_dict`` save and restore the position (a JSON-able dict; see
    docs/streaming.md for the guarantee); ``stats`` gives the skip counters for logs and reports.
    Under torch.distributed ``state_dict`` and ``stats(all_ranks=True)`` are collectives: call
    them on every rank.
    """

    def __init__(self, source: StreamingShards, batch_size: int, num_workers: int = 0,
                 transform: Callable[[Sample], Any] | None = None, collate: Callable[[list], Any] | None = None,
                 drop_last: bool = False, **loader_kw: Any) -> None:
        self.source, self.batch_size, self.num_workers = source, int(batch_size), int(num_workers)
        self.transform, self.collate, self.drop_last, self.loader_kw = transform, collate, drop_last, loader_kw
        self.positions: dict[int, dict] = {}  # reader id -> ReaderState dict after its last batch handed out
        self.next_worker = 0
        self.batches = 0

    def reset(self) -> None:
        """Start over at the next ``iter`` (otherwise a new ``iter`` continues from the last batch handed out)."""
        self.positions, self.next_worker = {}, 0

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[Any]:
        rank, _ = self.source.node()
        w = self.workers
        self.source.worker_offset = self.next_worker
        self.source.resume = {r: p for r, p in self.positions.items() if r // w == rank}
        loader = DataLoader(self.source, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=_BatchFn(self.transform, self.collate), drop_last=self.drop_last,
                            **self.loader_kw)
        try:
            for b in loader:
                self.positions[b.reader] = b.state
                self.next_worker = (b.reader % w + 1) % w
                self.batches += 1
                yield b.data
        except UserError as e:
            raise UserError(worker_line(e)) from None
        if not any(p.get("samples", 0) for p in self.positions.values()):
            line = self.source.probe()
            if line is not None:  # nothing was ever read and no shard yields a sample: every shard failed
                raise UserError(line)

    def _gather(self, obj: Any) -> list[Any]:
        if not dist_utils.is_dist() or self.source._world is not None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * dist_utils.world_size()
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (every rank's readers), a JSON-able dict for the checkpoint."""
        rank, world = self.source.node()
        parts = self._gather({"rank": rank, "readers": {str(r): p for r, p in self.positions.items()},
                              "next_worker": self.next_worker})
        src = self.source
        return {"version": STATE_VERSION, "kind": "distill.streaming", "seed": src.seed,
                "shards": len(src.urls), "shards_sha": shards_digest(src.urls), "resampled": src.resampled,
                "buffer": src.buffer, "world_size": world, "workers": self.workers,
                "readers": {k: v for p in parts for k, v in p["readers"].items()},
                "next_worker": {str(p["rank"]): p["next_worker"] for p in parts}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``) at the next ``iter``; refuses a state taken on
        other shards, another shuffle setup or another reader layout."""
        src, (rank, world) = self.source, self.source.node()
        if state.get("kind") != "distill.streaming" or int(state.get("version", 0)) != STATE_VERSION:
            raise UserError("the checkpoint's data-stream state is not a distill.streaming v1 state: "
                            "resume with the code that wrote it or start fresh (train.resume=never)")
        want = {"shards_sha": shards_digest(src.urls), "resampled": src.resampled, "buffer": src.buffer,
                "world_size": world, "workers": self.workers}
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            shown = ", ".join(f"{k} saved {a!r} now {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"the data stream cannot resume from this checkpoint ({shown}): use the same "
                            f"shards, buffer, world size and data.num_workers, or start fresh (train.resume=never)")
        if int(state["seed"]) != src.seed:
            log.warning("data stream: resuming with the checkpoint's seed %s (configured: %s)", state["seed"], src.seed)
            src.seed = int(state["seed"])
        self.positions = {int(r): dict(p) for r, p in state["readers"].items()}
        self.next_worker = int(state["next_worker"].get(str(rank), 0))

    def stats(self, all_ranks: bool = False) -> dict[str, Any]:
        """Counters summed over this rank's readers (every rank's with ``all_ranks``) and the first failure lines."""
        pos = self.positions
        if all_ranks:
            pos = {int(r): p for part in self._gather({str(r): p for r, p in pos.items()}) for r, p in part.items()}
        out: dict[str, Any] = {k: sum(int(p.get(k, 0)) for p in pos.values()) for k in COUNTERS}
        out["failures"] = [line for p in pos.values() for line in p.get("failures", [])][:KEEP_FAILURES]
        return out

"""Streaming WebDataset shards: image-caption samples read front to back from tar streams.

``WebDatasetShards`` (distill/datasets.py) indexes every tar member at start-up and reads by
seeking, so it needs local files and its index grows with the items. ``StreamingShards`` reads
each shard once, in order, through webdataset's own opener (``webdataset.gopen``: local paths,
``file:``, ``pipe:<command>``, ``http(s)://`` through curl), so its state is a few integers per
reader whatever the data set size. URLs are brace-expanded (``shard-{000000..000099}.tar``) and
``::`` joins patterns, as in ``WebDatasetShards``.

Samples. Tar members that share a key (the path up to the first dot of the file name) form one
sample; its image is the first of ``image_keys`` present, its caption the first of
``caption_keys`` (a JSON caption's ``caption``/``text``/``title`` field). Each yielded ``Sample``
is (key, RGB PIL image, caption, reader, state): the key is ``<url>#<member key>`` as in
``WebDatasetShards``; ``state`` is the reader's position just after this sample.

Order. Shards are spread over *readers*: one per (node rank, DataLoader worker), reader id
``rank * workers + worker``. One epoch (``resampled=False``): epoch e shuffles the shard list by
(seed, e) and reader r takes every R-th shard from position r, so the readers cover each shard
exactly once. Resampled (``resampled=True``, endless): reader r draws its k-th shard at random,
seeded by (seed, r, k), from its own slice ``shards[r::R]`` (from all shards when there are fewer
shards than readers). A seeded shuffle buffer of ``buffer`` samples mixes the samples of a shard.

State and resume. A reader's state is (epoch, shard cursor, item: samples taken from the current
shard's shuffled order) plus skip counters and the first few failure lines; the whole stream's
state (``StreamLoader.state_dict``) is that per reader plus the seed, the shard list's hash and
which worker's batch comes next: O(readers), independent of the number of items, and plain JSON.
The shuffle buffer is seeded by (seed, reader, epoch, cursor) and drains at the end of every
shard, so a shard's shuffled order is a function of its bytes and that seed alone; a restored
reader re-opens its current shard, re-reads (without decoding) the ``item`` samples it had taken
and goes on.

"Exact" resume, the guarantee (tests/test_streaming.py checks it, including after SIGKILL):
with the same shard list, buffer size, world size and worker count, and shards that read back
the same bytes (and fail at the same points) as before, the batches a ``StreamLoader`` yields
after ``load_state_dict(state)`` are, in order, exactly those the uninterrupted run yields after
the batch at which ``state`` was taken (also at the end of a one-epoch pass, where readers run out
at different times and DataLoader skips the finished workers' turns); the skip counters continue from the saved values and
nothing is counted twice. The recorded seed wins over the configured one. Not guaranteed: if a
shard's bytes or readability change between the runs (a flaky HTTP read, a re-uploaded shard),
the stream from that shard on differs (it stays deterministic for the new bytes); another worker
or world size is refused with a UserError. Cost: at resume each reader re-reads at most one shard.
Why a buffer that drains per shard: a buffer that spans shards (webdataset's ``shuffle``) holds
samples of earlier shards, and restoring it needs either its contents in the checkpoint (O(buffer)
items) or a replay reaching arbitrarily far back. The price: samples mix within a shard (a window
of ``buffer``), not across shard boundaries; shard order itself is shuffled or drawn at random.

Bad input is skipped and counted, never fatal on its own: a shard that cannot be opened or is not
a tar with samples (``shards_failed``), a shard that ends early (``shards_truncated``: samples
already read are kept, a partly read sample is dropped), a sample whose image does not decode
(``images_corrupt``) and a sample without an image (``no_image``). Each failure is one line naming
the URL and the fix, logged (first few per reader) and kept in ``StreamLoader.stats()``. When every
shard fails, ``StreamLoader`` (or a lone reader) raises ``UserError`` with the first such line.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import tarfile
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill import distributed as dist_utils
from distill.data import _stable_int
from distill.datasets import _json_caption
from distill.errors import UserError
from distill.imageio import _reason, load_rgb

log = logging.getLogger(__name__)

STATE_VERSION = 1
KEEP_FAILURES = 5  # failure lines kept (and logged) per reader; the counters keep counting
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)  # as imageio.try_open
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)
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
        """A copy as a plain dict (dataclasses.asdict deep-copies field by field: a tenth of a reader's time)."""
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


def shard_stem(url: str) -> str:
    """A shard's file name without its folder or tar extension: ``.../shard-000123.tar`` -> ``shard-000123``."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def stable_key(key: str) -> str:
    """A sample key without its shard's location (``shard-000123#000045``): what seeds are drawn
    from, so the draws stay the same when the shards move (another mount, a mirror, http)."""
    url, _, member = key.rpartition("#")
    return f"{shard_stem(url)}#{member}"


# --------------------------------------------------------------------------------------------
# Reading one shard
# --------------------------------------------------------------------------------------------


def _pick(url: str, key: str, group: dict[str, bytes], image_keys: Sequence[str],
          caption_keys: Sequence[str]) -> tuple[str, bytes | None, str]:
    """(key, image bytes or None, caption) of one grouped sample."""
    image = next((group[k] for k in image_keys if k in group), None)
    caption = ""
    for k in caption_keys:
        if k in group:
            raw = group[k].decode("utf-8", "replace")
            caption = _json_caption(raw) if k == "json" else raw.strip()
            break
    return f"{url}#{key}", image, caption


def tar_groups(stream: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(member key, {extension: bytes}) of a tar stream in file order; raises tarfile.ReadError on a
    stream that ends early. Members sharing the path up to the first dot of their name form a group."""
    tf = tarfile.open(fileobj=stream, mode="r|*")
    key, group = None, {}
    for m in tf:
        tf.members = []  # stream mode keeps every TarInfo otherwise: memory would grow with the shard
        if not m.isreg():
            continue
        d, base = os.path.split(m.name)
        stem, _, ext = base.partition(".")
        if stem.startswith("__") and stem.endswith("__") and key is not None:
            continue  # webdataset's metadata members (__key__ files); a leading one is a shard header
        k, ext = os.path.join(d, stem), ext.lower()
        if k != key or ext in group:  # a new key's header: the previous sample is complete
            if group:
                yield key, group
            key, group = k, {}
        group[ext] = tf.extractfile(m).read()
    # A complete archive ends with a zero block that tarfile read past; a stream cut at a member
    # boundary ends without one (tarfile takes that as a clean end), and its last sample may lack members.
    if getattr(tf.fileobj, "pos", tf.offset + tarfile.BLOCKSIZE) - tf.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")
    if group:
        yield key, group


def tar_samples(stream: Any, url: str, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                caption_keys: Sequence[str] = ("txt", "caption", "json")) -> Iterator[tuple[str, bytes | None, str]]:
    """Samples of a tar stream in file order; raises tarfile.ReadError on a stream that ends early."""
    for key, group in tar_groups(stream):
        if key.startswith("__") and key.endswith("__"):
            continue  # a leading metadata member
        yield _pick(url, key, group, image_keys, caption_keys)


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
    else:
        why = str(e).split("\n")[0][:160] or type(e).__name__
        fix = "re-copy or re-download the shard" if samples else "check that it is a (gzipped) tar shard"
    if samples:
        return f"shard {url} ended after {samples} sample(s) ({why}): the rest was skipped; {fix}"
    return f"shard {url} could not be read ({why}): {fix}"


def _raw_samples(stream: Any, url: str, image_keys: Sequence[str], caption_keys: Sequence[str],
                 companion: tuple[str, str | None] | None) -> Iterator[tuple]:
    """(key, image bytes, caption) per sample, plus the teacher entry when paired with a companion shard."""
    if companion is None:
        yield from tar_samples(stream, url, image_keys, caption_keys)
        return
    from distill.reinforce import paired_groups

    for key, group, teacher in paired_groups(stream, url, *companion):
        yield (*_pick(url, key, group, image_keys, caption_keys), teacher)


def shuffled_events(url: str, rng: random.Random, buffer: int, image_keys: Sequence[str],
                    caption_keys: Sequence[str], companion: tuple[str, str | None] | None = None
                    ) -> Iterator[tuple[str, Any]]:
    """A shard's samples in seeded shuffle-buffer order, as ("sample", raw) events, with at most one
    ("failed" | "truncated" | "mismatch", line) event where reading broke off; the buffer drains at the
    end. ``companion``: (companion shard URL, wanted fingerprint) of a reinforced shard."""
    from webdataset.gopen import gopen

    from distill.reinforce import CompanionMismatch

    buf: list = []
    stream, read = None, 0
    try:
        stream = gopen(url, "rb")
        for raw in _raw_samples(stream, url, image_keys, caption_keys, companion):
            read += 1
            buf.append(raw)
            if len(buf) >= buffer:
                yield "sample", _pop(buf, rng)
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


class StreamingShards(IterableDataset):
    """WebDataset shards read as a stream (see the module docstring): an IterableDataset of ``Sample``.

    ``rank``/``world_size`` default to torch.distributed's (distill.distributed); the DataLoader
    worker split comes from ``get_worker_info``. ``epochs`` (one-epoch mode): passes over the
    shards, None for endless. ``buffer``: shuffle-buffer size in samples (0 or 1: file order);
    ``shuffle_shards``: shuffle the shard order per epoch. Iterate it through ``StreamLoader`` to
    get batches, counters and a resumable state.
    """

    def __init__(self, urls: str | Sequence[str], resampled: bool = False, epochs: int | None = 1, seed: int = 0,
                 buffer: int = 1000, shuffle_shards: bool = True, rank: int | None = None,
                 world_size: int | None = None, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 caption_keys: Sequence[str] = ("txt", "caption", "json"), reinforced: bool = False,
                 teacher_root: str | None = None) -> None:
        self.urls = expand_urls(urls)
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
                yield 0, k, part[_stable_int(self.seed, "draw", reader, k) % len(part)], pool
                k += 1
        e = st.epoch
        while self.epochs is None or e < self.epochs:
            order = list(range(n))
            if self.shuffle_shards:
                random.Random(_stable_int(self.seed, "epoch", e)).shuffle(order)
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
        rng = random.Random(_stable_int(self.seed, "buffer", reader, st.epoch, st.shard))
        for kind, payload in shuffled_events(url, rng, self.buffer, self.image_keys, self.caption_keys,
                                             self.companion(url)):
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
        from distill.reinforce import companion_url

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
            st.note(f"skipping unreadable image {key}: {_reason(e)}")
            return None
        st.samples += 1
        return Sample(key, img, caption, reader, st.snapshot(), raw[3] if len(raw) > 3 else None)

    def probe(self) -> str | None:
        """The first shard's failure line when no shard yields a sample, else None (main-process diagnosis)."""
        first = None
        for url in self.urls:
            for kind, payload in shuffled_events(url, random.Random(0), 0, self.image_keys, self.caption_keys,
                                                 self.companion(url)):
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


class StreamLoader:
    """Batches of a ``StreamingShards`` through a DataLoader, with the bookkeeping that makes the
    stream resumable: the position of every reader as of the last batch handed out, and which
    worker's batch comes next (workers take turns). ``transform(sample)`` and ``collate(items)`` run
    in the workers (default: lists of keys, PIL images and captions).

    ``state_dict`` / ``load_state_dict`` save and restore the position (a JSON-able dict, see the
    module docstring for the guarantee); ``stats`` gives the skip counters for logs and reports.
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
        for b in loader:
            self.positions[b.reader] = b.state
            self.next_worker = (b.reader % w + 1) % w
            self.batches += 1
            yield b.data
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

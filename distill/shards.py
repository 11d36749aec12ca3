"""Tar-shard primitives shared by the streaming reader (distill.streaming) and the reinforced-shard
builder (distill.reinforce): opening a shard with a stall timeout, grouping tar members into samples
with a size cap per member, shard names, and the companion teacher shard's format and pairing.

Companion layout (a plain tar, members in the data shard's sample order):
    __teacher__.json      header: format, fingerprint (teacher + view recipe), teacher fingerprint,
                          view spec, views K, embed_dim D, data shard name / bytes / sha256, samples, skipped
    <key>.teacher         one record per sample, little-endian: uint64[K] view seeds, uint64 flags
                          (bit 0: has a caption row), float16[K, D] the teacher's embedding of each
                          view, float16[D] the caption's embedding (when flagged); one member, not three
                          files, because every tar member costs a 512-byte header plus padding
    <key>.skip.txt        instead of the record, for a sample without a readable image
"""

from __future__ import annotations

import json
import os
import select
import tarfile
import zlib
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from distill.datasets import json_caption
from distill.errors import UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "json")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)  # as imageio.try_open
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)
# curl exits that mean the transfer broke after it started (retried), not that the URL is wrong
CURL_TRANSFER_EXITS = {18: "the server closed the connection mid-transfer", 28: "the transfer timed out",
                       52: "the server sent an empty reply", 55: "sending failed", 56: "the connection was reset",
                       16: "HTTP/2 framing error", 92: "HTTP/2 stream error"}

FORMAT = 1
HEADER = "__teacher__.json"
REBUILD = "rebuild the companions with `python -m distill cache +experiment=...` (same config)"


class Fetch(NamedTuple):
    """How shards are fetched: a stream with no byte for ``stall_timeout_s`` is given up, a broken
    transfer is retried ``retries`` times ``retry_delay_s`` apart, and no tar member may exceed
    ``max_member_mb`` (a member is held in memory whole)."""

    stall_timeout_s: float = 60.0
    retries: int = 3
    retry_delay_s: float = 2.0
    max_member_mb: float = 256.0

    @property
    def max_member_bytes(self) -> int:
        return int(float(self.max_member_mb) * (1 << 20))

    def checked(self) -> "Fetch":
        if not float(self.stall_timeout_s) > 0:
            raise UserError(f"stall_timeout_s={self.stall_timeout_s} must be > 0 seconds (data.train.stream)")
        if int(self.retries) < 0 or float(self.retry_delay_s) < 0:
            raise UserError(f"retries={self.retries} and retry_delay_s={self.retry_delay_s} must be >= 0 "
                            f"(data.train.stream)")
        if not float(self.max_member_mb) > 0:
            raise UserError(f"max_member_mb={self.max_member_mb} must be > 0 (data.train.stream)")
        return Fetch(float(self.stall_timeout_s), int(self.retries), float(self.retry_delay_s),
                     float(self.max_member_mb))


DEFAULT_FETCH = Fetch()


class TransferError(OSError):
    """A shard's transfer stalled or broke off after it started: worth another try, unlike a bad URL or file."""


class CompanionMismatch(Exception):
    """A companion shard does not belong to its data shard; the message is the one line users see."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def shard_stem(url: str) -> str:
    """A shard's file name without its folder or tar extension: ``.../shard-000123.tar`` -> ``shard-000123``."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def is_meta(key: str) -> bool:
    """A webdataset metadata key (``__key__``, a companion's ``__teacher__``), not a sample."""
    return key.startswith("__") and key.endswith("__")


def companion_url(url: str, root: str | None = None) -> str:
    """``.../shard-000123.tar`` -> ``<root or the shard's folder>/shard-000123.teacher.tar``."""
    name = f"{shard_stem(url)}.teacher.tar"
    if root:
        return f"{str(root).rstrip('/')}/{name}"
    if url.startswith("pipe:"):
        raise UserError(f"reinforced shards for the pipe: source {url} need a companion folder: set "
                        f"data.train.stream.teacher_root")
    return f"{url.rsplit('/', 1)[0]}/{name}" if "/" in url else name


# --------------------------------------------------------------------------------------------
# Opening a shard
# --------------------------------------------------------------------------------------------


class GuardedPipe:
    """A webdataset ``Pipe`` (http(s) through curl, ``pipe:`` commands) read with a stall timeout:
    no byte for ``stall_timeout_s`` kills the command and raises TransferError, and so does an
    http transfer that curl reports as broken off."""

    def __init__(self, pipe: Any, url: str, stall_timeout_s: float) -> None:
        self.pipe, self.url, self.timeout = pipe, url, float(stall_timeout_s)
        self.fd = pipe.stream.fileno()
        self.http = url.split(":", 1)[0].lower() in ("http", "https")

    @property
    def status(self) -> int | None:
        return self.pipe.status

    @property
    def ignore_status(self) -> list:
        return self.pipe.ignore_status

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all with -1), fewer only at the end, as a buffered file reads."""
        parts, want = [], (1 << 62) if n is None or n < 0 else n
        while want > 0:
            data = self._chunk(min(want, 1 << 20))
            if not data:
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def _chunk(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self.pipe.proc.kill()
            raise TransferError(f"stalled (no data for {self.timeout:g} s)")
        data = os.read(self.fd, n)
        if not data:  # end of stream: the exit status tells a finished transfer from a broken one
            code = self.pipe.proc.wait()
            if self.http and code in CURL_TRANSFER_EXITS:
                raise TransferError(f"broke off (curl exit {code}: {CURL_TRANSFER_EXITS[code]})")
            if code not in self.pipe.ignore_status:
                raise OSError(f"{self.url}: exit {code}")  # as webdataset's Pipe.read
        return data

    def close(self) -> None:
        self.pipe.close()


def open_shard(url: str, fetch: Fetch = DEFAULT_FETCH) -> Any:
    """A readable stream of ``url`` through webdataset's opener (local path, ``file:``, ``pipe:``,
    http(s)); command-backed streams get the stall timeout."""
    from webdataset.gopen import Pipe, gopen

    stream = gopen(url, "rb")
    return GuardedPipe(stream, url, fetch.stall_timeout_s) if isinstance(stream, Pipe) else stream


# --------------------------------------------------------------------------------------------
# Tar members and samples
# --------------------------------------------------------------------------------------------


def tar_groups(stream: Any, max_member_bytes: int = DEFAULT_FETCH.max_member_bytes
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(member key, {extension: bytes}) of a tar stream in file order; raises tarfile.ReadError on a
    stream that ends early or a member over ``max_member_bytes``. Members sharing the path up to the
    first dot of their name form a group."""
    tf = tarfile.open(fileobj=stream, mode="r|*")
    key, group = None, {}
    for m in tf:
        tf.members = []  # stream mode keeps every TarInfo otherwise: memory would grow with the shard
        if not m.isreg():
            continue
        d, base = os.path.split(m.name)
        stem, _, ext = base.partition(".")
        if is_meta(stem) and key is not None:
            continue  # webdataset's metadata members (__key__ files); a leading one is a shard header
        if m.size > max_member_bytes:
            raise tarfile.ReadError(f"member {m.name} is {m.size / (1 << 20):.0f} MB, over the cap of "
                                    f"{max_member_bytes / (1 << 20):g} MB (data.train.stream.max_member_mb)")
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


def pick_sample(url: str, key: str, group: dict[str, bytes], image_keys: Sequence[str] = IMAGE_KEYS,
                caption_keys: Sequence[str] = CAPTION_KEYS) -> tuple[str, bytes | None, str]:
    """(``<url>#<key>``, image bytes or None, caption) of one grouped sample."""
    image = next((group[k] for k in image_keys if k in group), None)
    caption = ""
    for k in caption_keys:
        if k in group:
            raw = group[k].decode("utf-8", "replace")
            caption = json_caption(raw) if k == "json" else raw.strip()
            break
    return f"{url}#{key}", image, caption


def tar_samples(stream: Any, url: str, image_keys: Sequence[str] = IMAGE_KEYS,
                caption_keys: Sequence[str] = CAPTION_KEYS,
                max_member_bytes: int = DEFAULT_FETCH.max_member_bytes) -> Iterator[tuple[str, bytes | None, str]]:
    """Samples of a tar stream in file order; raises tarfile.ReadError on a stream that ends early."""
    for key, group in tar_groups(stream, max_member_bytes):
        if not is_meta(key):
            yield pick_sample(url, key, group, image_keys, caption_keys)


# --------------------------------------------------------------------------------------------
# Companion teacher shards: records, header, pairing with the data shard
# --------------------------------------------------------------------------------------------


def encode_record(seeds: Sequence[int], image: np.ndarray, text: np.ndarray | None) -> bytes:
    """One sample's ``.teacher`` member (layout in the module docstring)."""
    head = np.asarray([*seeds, int(text is not None)], dtype="<u8").tobytes()
    rows = [np.asarray(image, dtype="<f2").tobytes()]
    if text is not None:
        rows.append(np.asarray(text, dtype="<f2").tobytes())
    return head + b"".join(rows)


def decode_record(data: bytes, views: int, dim: int) -> dict[str, Any]:
    """``{"seeds": (K,) uint64, "image": (K, D) float16, "text": (D,) float16 | None}`` of a record."""
    meta = np.frombuffer(data, dtype="<u8", count=views + 1)
    off = 8 * (views + 1)
    has_text = bool(meta[-1] & 1)
    want = off + 2 * dim * (views + has_text)
    if len(data) != want:
        raise ValueError(f"teacher record of {len(data)} bytes, expected {want} for K={views}, D={dim}")
    image = np.frombuffer(data, dtype="<f2", count=views * dim, offset=off).reshape(views, dim)
    text = np.frombuffer(data, dtype="<f2", count=dim, offset=off + 2 * views * dim) if has_text else None
    return {"seeds": meta[:views], "image": image, "text": text}


def header_of(key: str | None, group: dict[str, bytes] | None) -> dict[str, Any] | None:
    """The header of a companion's first member group, None when it is not one (or not JSON)."""
    if key != HEADER.split(".")[0] or not group or "json" not in group:
        return None
    try:
        return json.loads(group["json"])
    except ValueError:
        return None


def read_header(url: str, fetch: Fetch = DEFAULT_FETCH) -> dict[str, Any] | None:
    """A companion's header, None when it cannot be opened or does not start with one."""
    try:
        stream = open_shard(url, fetch)
        try:
            for key, group in tar_groups(stream, fetch.max_member_bytes):
                return header_of(key, group)
        finally:
            stream.close()
    except READ_ERRORS:
        return None
    return None


def _check_header(head: dict[str, Any] | None, companion: str, data_url: str, want: str | None) -> None:
    if head is None:
        raise CompanionMismatch(f"companion teacher shard {companion} of {data_url} is missing or has no header: "
                                f"{REBUILD}")
    if want is not None and head.get("fingerprint") != want:
        raise CompanionMismatch(f"companion teacher shard {companion} was built for another teacher or view recipe "
                                f"(fingerprint {head.get('fingerprint')}, this run wants {want}): {REBUILD}")
    if head.get("data_shard") != shard_stem(data_url):
        raise CompanionMismatch(f"companion teacher shard {companion} belongs to {head.get('data_shard')}, not "
                                f"{shard_stem(data_url)}: {REBUILD}")


def _teacher_entry(group: dict[str, bytes], head: dict[str, Any], companion: str) -> dict[str, Any] | None:
    if "skip.txt" in group:
        return None
    try:
        return decode_record(group["teacher"], int(head["views"]), int(head["embed_dim"]))
    except (KeyError, ValueError) as e:
        raise CompanionMismatch(f"companion teacher shard {companion} has a damaged record ({e}): {REBUILD}") from None


def _next_group(groups: Iterator, companion: str, data_url: str) -> tuple[str | None, dict | None]:
    try:
        return next(groups, (None, None))
    except TransferError:
        raise  # a stalled or broken transfer is retried by the reader, not blamed on the companion's bytes
    except READ_ERRORS as e:  # the companion broke, not the data shard: say so, not "data truncated"
        raise CompanionMismatch(f"companion teacher shard {companion} of {data_url} cannot be read "
                                f"({str(e).splitlines()[0][:120]}): {REBUILD}") from None


def paired_groups(data_stream: Any, data_url: str, companion: str, want: str | None, fetch: Fetch = DEFAULT_FETCH
                  ) -> Iterator[tuple[str, dict[str, bytes], dict[str, Any] | None]]:
    """(key, data group, teacher entry or None for a skipped sample) in file order; raises
    CompanionMismatch (one line) on the first disagreement. Holds one sample of each shard at a time."""
    try:
        comp = open_shard(companion, fetch)
    except READ_ERRORS:
        raise CompanionMismatch(f"companion teacher shard {companion} of {data_url} cannot be opened: "
                                f"{REBUILD}") from None
    try:
        groups = tar_groups(comp, fetch.max_member_bytes)
        key0, first = _next_group(groups, companion, data_url)
        head = header_of(key0, first)
        _check_header(head, companion, data_url, want)
        n = 0
        for key, group in tar_groups(data_stream, fetch.max_member_bytes):
            if is_meta(key):
                continue
            tkey, tgroup = _next_group(groups, companion, data_url)
            if tkey != key:
                raise CompanionMismatch(
                    f"companion teacher shard {companion} does not match {data_url} at sample {n} (data {key}, "
                    f"companion {tkey or 'ended'}; it holds {head.get('samples')} samples): {REBUILD}")
            n += 1
            yield key, group, _teacher_entry(tgroup, head, companion)
    finally:
        try:
            comp.close()
        except READ_ERRORS:
            pass  # a killed or failed command's status: the error that ended the pairing is the one to report

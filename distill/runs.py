"""Run folders: which folder a command writes into, and whether a checkpoint may be resumed.

A run folder holds ``run_state.json``: its status (``running`` until the report is written, then
``finished``) and the run's *identity*, the config keys that change the model or the data. With
``train.resume=auto`` and Hydra's default time-stamped folder, a command continues the newest
unfinished sibling run whose identity matches; a finished run is never continued, so rerunning a
finished command starts a new run. Resuming a checkpoint whose identity differs stops with one
line that names the differing keys; a checkpoint without ``run_state.json`` is checked against the
folder's ``config.yaml`` (what the run was started with), and one with neither is refused.

A live run holds an exclusive lock (``fcntl.flock``) on its folder's ``.run.lock`` until it ends,
so two commands never write into one folder: a second command whose time-stamped folder is taken
(both started within the same second) writes into ``<name>-1`` (``-2``, ...), made with an
exclusive ``mkdir``; a run that another live process holds is never resumed; and a pinned folder
(``out_dir``, ``hydra.run.dir``) that another live run holds is one line naming it. Under torchrun
only rank 0 picks the folder, so only rank 0 takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill.errors import UserError

log = logging.getLogger(__name__)

RUN_STATE = "run_state.json"
RUN_LOCK = ".run.lock"
MAX_SUFFIX = 1000  # how many -N siblings a taken time-stamped folder name may try
LOCK_PATIENCE_S = 0.5  # outlasts another command's momentary probe (is_busy) of the same lock
# Sections of the config that decide what is trained on what.
IDENTITY_SECTIONS = ("teacher", "finetune", "student", "data", "loss", "train", "seed")
# train.* (and the fine-tune's own train.*) keys that steer a run without changing its result
# (logging, checkpoint cadence, workers). finetune.train.eval_every is not among them: it picks the
# steps early stopping can stop at.
_CONTROL = ("resume", "stop_after_steps", "progress", "tensorboard", "log_every", "ckpt_every",
            "keep_checkpoints", "num_workers", "find_unused_parameters")
RUN_CONTROL_KEYS = frozenset({f"train.{k}" for k in (*_CONTROL, "eval_every")}
                             | {f"finetune.train.{k}" for k in _CONTROL})
# where a run's engine stages keep their checkpoints: the student's, and the fine-tune's before it
CHECKPOINT_DIRS = ("checkpoints", "finetune/checkpoints")

# run folders this process writes into -> the descriptor holding their lock (released at exit)
_held: dict[Path, int] = {}


def _lock(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock for this process without waiting; False when another live process
    holds it. Raises FileNotFoundError when the folder is gone."""
    key = run_dir.resolve()
    if key in _held:
        return True
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(0.05)
    try:
        same = os.fstat(fd).st_ino == os.stat(run_dir / RUN_LOCK).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the folder was removed (and maybe made again) while we locked: the caller starts over
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "run folder removed while locking", str(run_dir))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the messages of the others
    _held[key] = fd
    return True


def _unlock(run_dir: Path) -> None:
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def _holder(run_dir: Path) -> str:
    try:
        pid = (run_dir / RUN_LOCK).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


def is_busy(run_dir: Path) -> bool:
    """Whether another live process writes into ``run_dir`` (holds its lock)."""
    if run_dir.resolve() in _held or not (run_dir / RUN_LOCK).exists():
        return False
    try:
        fd = os.open(run_dir / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = node


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config's model- and data-deciding keys, flattened: {"train.optimizer.lr": 5e-4, ...}."""
    out: dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        if section in cfg:
            node = cfg[section]
            _flatten(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node,
                     section, out)
    return {k: v for k, v in sorted(out.items()) if k not in RUN_CONTROL_KEYS}


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, or that only one side has."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None


def write_state(run_dir: Path, status: str, ident: dict[str, Any]) -> None:
    """Atomically record the run's status and identity."""
    tmp = run_dir / (RUN_STATE + ".tmp")
    tmp.write_text(json.dumps({"status": status, "fingerprint": fingerprint(ident), "identity": ident},
                              indent=1, default=str))
    os.replace(tmp, run_dir / RUN_STATE)


def _latest_files(run_dir: Path) -> list[Path]:
    return [f for f in (run_dir / d / "latest.json" for d in CHECKPOINT_DIRS) if f.exists()]


def has_checkpoint(run_dir: Path) -> bool:
    """A checkpoint of any stage: a run killed while fine-tuning is as resumable as one killed while distilling."""
    return bool(_latest_files(run_dir))


def _recorded_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity ``run_dir`` was started with: its run_state.json's, else the one its
    config.yaml (written at the start of every run) gives; None when it holds neither."""
    state = read_state(run_dir)
    if state is not None and isinstance(state.get("identity"), dict):
        return state["identity"]
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        return identity(cfg) if isinstance(cfg, DictConfig) else None
    except Exception:  # absent or not a config: nothing to check against
        return None


def check_resumable(run_dir: Path, ident: dict[str, Any]) -> None:
    """Stop with one line when ``run_dir``'s checkpoints were trained under a different identity,
    or when the folder holds nothing that says which config they were trained with."""
    if not has_checkpoint(run_dir):
        return
    recorded = _recorded_identity(run_dir)
    if recorded is None:
        raise UserError(f"cannot resume {run_dir}: it has a checkpoint but neither {RUN_STATE} nor config.yaml "
                        f"to check its config against; pass train.resume=never to start over, or use another "
                        f"run folder")
    diff = differing_keys(recorded, ident)
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise UserError(f"cannot resume {run_dir}: its checkpoint was trained with a different config "
                        f"({shown}); rerun with the same settings, or pass train.resume=never to start over")


def unfinished_runs(parent: Path, ident: dict[str, Any], exclude: Path) -> list[Path]:
    """The unfinished run folders under ``parent`` with a checkpoint and the same identity that no
    live process writes into, newest checkpoint first."""
    fp = fingerprint(ident)
    candidates = []
    for d in parent.iterdir() if parent.is_dir() else []:
        if d.resolve() == exclude.resolve() or not has_checkpoint(d):
            continue
        if is_busy(d):
            log.info("not resuming %s: %s is still writing into it", d, _holder(d))
            continue
        state = read_state(d)
        if state is None or state.get("status") != "running":
            continue
        if state.get("fingerprint") == fp:
            candidates.append(d)
        else:
            log.info("not resuming %s: its config differs in %s", d,
                     ", ".join(differing_keys(state.get("identity", {}), ident)[:8]))
    return sorted(candidates, key=lambda d: max(f.stat().st_mtime for f in _latest_files(d)), reverse=True)


def find_unfinished(parent: Path, ident: dict[str, Any], exclude: Path) -> Path | None:
    """The newest unfinished run folder under ``parent`` with a checkpoint and the same identity."""
    return next(iter(unfinished_runs(parent, ident, exclude)), None)


def _only_hydra_files(run_dir: Path) -> bool:
    """True when a folder holds nothing but what Hydra writes at start (.hydra/ and its job log) and its lock."""
    return all(p.name in (".hydra", RUN_LOCK) or p.suffix == ".log" for p in run_dir.iterdir())


def _claim(out: Path, pinned: bool) -> Path:
    """Lock ``out`` for this run, or, when another live run holds it and the name is Hydra's
    time-stamped default, the first free ``<out>-N`` sibling (made with an exclusive mkdir, so no
    two commands pick one name); a pinned folder held by another run is an error."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        if _lock(out):
            return out
    except FileNotFoundError:  # a run that resumed another folder removed this fresh one: take it back
        out.mkdir(parents=True, exist_ok=True)
        if _lock(out):
            return out
    if pinned:
        raise UserError(f"{out} is in use by {_holder(out)}, a run still writing into it: wait for it to end, "
                        f"or pass another out_dir")
    for n in range(1, MAX_SUFFIX + 1):
        cand = out.with_name(f"{out.name}-{n}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        _lock(cand)
        return cand
    raise UserError(f"{out} and its {MAX_SUFFIX} numbered siblings are all taken: pass out_dir=<a new folder>")


def _follow_hydra(hydra_dir: Path, run_dir: Path, cfg: DictConfig, write_files: bool) -> None:
    """Point Hydra's job log from ``hydra_dir`` to ``run_dir`` and, with ``write_files``, give
    ``run_dir`` this run's .hydra/ files, since Hydra set both up in the folder this run left."""
    root = logging.getLogger()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == hydra_dir.resolve():
            h.acquire()
            try:
                h.close()
                h.baseFilename = str(run_dir.resolve() / Path(h.baseFilename).name)
                h.stream = h._open()
            finally:
                h.release()
    if not write_files:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not under Hydra (tests, the API): no .hydra/ to give
        return
    if hc.output_subdir is None:
        return
    sub = run_dir / hc.output_subdir
    sub.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, sub / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), sub / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, sub / "overrides.yaml")


def select_run_dir(cfg: DictConfig, out: Path, pinned: bool) -> Path:
    """The folder this run writes into: ``out``, or with ``train.resume=auto`` and an unpinned,
    fresh ``out``, the newest unfinished sibling run of the same identity (whose checkpoint the
    training stage then continues). Checks that a resumed checkpoint matches the config."""
    ident = identity(cfg)
    resume = str(cfg.train.get("resume", "auto"))
    hydra_dir = out
    out = _claim(out, pinned)
    claimed, resumed = out, False
    if resume == "auto" and not pinned and not has_checkpoint(out):
        for found in unfinished_runs(out.parent, ident, exclude=out):
            if not _lock(found):  # another command resumed it a moment ago
                continue
            if _only_hydra_files(out):
                shutil.rmtree(out, ignore_errors=True)
            _unlock(out)
            out, resumed = found, True
            break
    if out.resolve() != hydra_dir.resolve():
        _follow_hydra(hydra_dir, out, cfg, write_files=not (out / ".hydra").exists())
    if resumed:
        print(f"resuming the unfinished run {out}")
        log.info("resuming the unfinished run %s", out)
    elif claimed != hydra_dir:
        log.info("run folder %s is in use by %s: this run writes into %s", hydra_dir, _holder(hydra_dir), out)
    if resume == "auto":
        check_resumable(out, ident)
    elif resume != "never":
        target = Path(resume)
        run_dir = target.parent.parent if any((target / f).exists() for f in ("manifest.json", "state.pt")) else \
            target.parent if target.name == "checkpoints" else target
        check_resumable(run_dir, ident)
    write_state(out, "running", ident)
    return out


def mark_finished(run_dir: Path, cfg: DictConfig) -> None:
    write_state(run_dir, "finished", identity(cfg))
    _unlock(run_dir)

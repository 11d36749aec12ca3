"""What trains in a fine-tune: the methods (full, one tower, LoRA through peft, bottleneck adapters,
head only), where a dual encoder's parts are (``Layout``), and turning a tuned model back into a
plain one at a WiSE-FT α for export.

Every method works from a ``Layout``, so the same code serves open_clip CLIPs and the packaged
ConSE teacher; only the layouts differ. Each method is one ``Method`` registered in ``METHODS`` (a
distill.registry.Registry) by ``@method``; the fine-tune stage looks ``finetune.method`` up there.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from distill.errors import UserError
from distill.registry import Registry
from distill.students.text import TEXT_PARAM_PREFIXES

SELECTED = ("full", "lock_image", "lock_text", "head")  # the methods that only choose which weights train
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts before every parameter name
PARAMS_ADAPTER = "params"  # the LoRA adapter on raw attention weights (open_clip's own Attention)


@dataclass(frozen=True)
class Layout:
    """Where a dual encoder's parts are, by parameter and module name."""

    image: tuple[str, ...]  # parameter-name prefixes of the image tower
    text: tuple[str, ...]  # ... of the text tower
    head: tuple[str, ...]  # exact names (or prefixes ending in '.') of projections, temperature, class table
    blocks: Mapping[str, str]  # tower -> prefix of its numbered blocks ("...resblocks.")
    adapter_after: Mapping[str, Any]  # tower -> module-name pattern (or predicate(name, module)) an adapter follows
    lora_keywords: Mapping[str, Any] = field(default_factory=dict)  # keyword -> predicate(name, module)
    lora_default: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tower -> targets of "auto"

    def part(self, name: str) -> str:
        """"head", "image", "text" or "" for a parameter name (peft's prefix removed)."""
        name = name.removeprefix(PEFT_PREFIX)
        if any(name == h or (h.endswith(".") and name.startswith(h)) for h in self.head):
            return "head"
        if name.startswith(self.image):
            return "image"
        if name.startswith(self.text):
            return "text"
        return ""

    def group(self, name: str) -> str:
        """The learning-rate group of a trainable parameter: "adapter" for LoRA and adapter weights,
        else its part ("image", "text", "head")."""
        if "lora_" in name or ".adapter." in name:
            return "adapter"
        return self.part(name)


def _is_attention(module: nn.Module) -> bool:
    """nn.MultiheadAttention, or an attention with a raw ``in_proj_weight`` and a real ``out_proj``
    (later open_clip's own ``Attention``): detected by type, never by version number."""
    return isinstance(module, nn.MultiheadAttention) or (
        isinstance(getattr(module, "in_proj_weight", None), nn.Parameter)
        and isinstance(getattr(module, "out_proj", None), nn.Linear))


OPEN_CLIP = Layout(
    image=("visual.",), text=TEXT_PARAM_PREFIXES,
    head=("visual.proj", "text_projection", "logit_scale"),
    blocks={"image": "visual.transformer.resblocks.", "text": "transformer.resblocks."},
    adapter_after={"image": "visual.transformer.resblocks.*.mlp", "text": "transformer.resblocks.*.mlp"},
    lora_keywords={"attn": lambda name, m: _is_attention(m)},
    lora_default={"image": ("attn",), "text": ("attn",)},
)


def layout_for(model: nn.Module) -> Layout:
    """The layout of an open_clip CLIP: its image tower's part from the tower's kind (distill.students;
    a timm tower's stages, 1x1 convolutions and head), the text tower's from ``OPEN_CLIP``; ``OPEN_CLIP``
    itself for a ViT."""
    from distill.students import tower_for

    tower = tower_for(model)
    image = tower.layout(model) if tower is not None else None
    if image is None:
        return OPEN_CLIP
    return Layout(image=tuple(image["image"]), text=OPEN_CLIP.text,
                  head=(*image["head"], "text_projection", "logit_scale"),
                  blocks={"image": image["blocks"], "text": OPEN_CLIP.blocks["text"]},
                  adapter_after={"image": image["adapter_after"], "text": OPEN_CLIP.adapter_after["text"]},
                  lora_keywords={**OPEN_CLIP.lora_keywords, **image["lora_keywords"]},
                  lora_default={"image": tuple(image["lora_default"]), "text": OPEN_CLIP.lora_default["text"]})


def _block_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def count_params(model: nn.Module) -> dict[str, int]:
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def select_trainable(model: nn.Module, method: str, layout: Layout = OPEN_CLIP,
                     unlocked_layers: int = 0) -> dict[str, int]:
    """Set ``requires_grad`` for full / lock_image / lock_text / head; return {"trainable", "total"}.

    lock_image / lock_text: the other tower and the head train, plus the locked tower's last
    ``unlocked_layers`` blocks (open_clip's --lock-image-unlocked-groups / --lock-text-unlocked-layers).
    """
    if method not in SELECTED:
        raise UserError(f"finetune.method={method!r} is unknown here: use one of {list(SELECTED)}")
    locked = {"lock_image": "image", "lock_text": "text"}.get(method)
    n_blocks = len({_block_index(n, layout.blocks[locked]) for n, _ in model.named_parameters()} - {None}) \
        if locked else 0
    for name, p in model.named_parameters():
        part = layout.part(name)
        if method == "full":
            train = True
        elif method == "head":
            train = part == "head"
        else:
            block = _block_index(name, layout.blocks[locked])
            train = part != locked or (block is not None and block >= n_blocks - int(unlocked_layers))
        p.requires_grad_(train)
    return check_trainable(model, method)


def check_trainable(model: nn.Module, method: str) -> dict[str, int]:
    counts = count_params(model)
    if counts["trainable"] == 0:
        raise UserError(f"finetune.method={method} leaves nothing trainable in this model: "
                        f"pick another method (or raise finetune.unlocked_layers)")
    return counts


# ------------------------------------------------------------------------------------------ LoRA
def _closest(wanted: str, names: Sequence[str]) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    return difflib.get_close_matches(wanted, sorted(leaves), n=3, cutoff=0.3) or sorted(leaves)[:3]


def _max_rank(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        return min(module.in_channels, module.out_channels)
    if _is_attention(module):
        return int(min(module.in_proj_weight.shape))
    return 1 << 30


def lora_targets(model: nn.Module, layout: Layout, targets: Mapping[str, Sequence[str]],
                 rank: int) -> tuple[list[str], list[str]]:
    """Resolve per-tower target keywords to exact module names (and raw parameters, for attentions
    that run ``in_proj_weight`` through F.linear). A keyword is one of the layout's (e.g. ``attn``,
    found by type) or a module's last name component (``query``, ``c_fc``); ``auto`` is the layout's
    default for that tower (attention for open_clip; ConSE: query/value, 1x1 convolutions, classifier)."""
    modules, params = [], []
    named = dict(model.named_modules())
    for tower, words in targets.items():
        if tower not in ("image", "text"):
            raise UserError(f"finetune.lora.targets has tower {tower!r}: use image and/or text")
        prefixes = layout.image if tower == "image" else layout.text
        in_tower = {n: m for n, m in named.items() if n.startswith(prefixes)}
        words = [words] if isinstance(words, str) else list(words)
        if words == ["auto"]:
            words = list(layout.lora_default[tower])
        for word in words:
            pred = layout.lora_keywords.get(word, lambda n, m, w=word: n.rsplit(".", 1)[-1] == w)
            hits = [n for n, m in in_tower.items() if pred(n, m)]
            if not hits:
                raise UserError(f"finetune.lora.targets.{tower}: {word!r} matches no module of the {tower} tower; "
                                f"closest module names: {_closest(word, list(in_tower))}")
            for n in hits:
                m = in_tower[n]
                if int(rank) > _max_rank(m):
                    raise UserError(f"finetune.lora.rank={rank} is larger than layer {n} "
                                    f"({_max_rank(m)}): use a rank of at most {_max_rank(m)}")
                if isinstance(m, nn.MultiheadAttention) or not _is_attention(m):
                    modules.append(n)
                else:  # open_clip's own Attention: out_proj is a module, in_proj_weight a parameter
                    modules.append(f"{n}.out_proj")
                    params.append(f"{n}.in_proj_weight")
    return modules, params


def attach_lora(model: nn.Module, layout: Layout, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                targets: Mapping[str, Sequence[str]] | None = None) -> nn.Module:
    """The model wrapped by peft with LoRA on the resolved targets (peft freezes everything else)."""
    from peft import LoraConfig, get_peft_model

    if int(rank) < 1:
        raise UserError(f"finetune.lora.rank={rank} must be >= 1")
    modules, params = lora_targets(model, layout, targets or {"image": "auto", "text": "auto"}, rank)
    common = dict(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout))
    pm = get_peft_model(model, LoraConfig(target_modules=modules, **common))
    if params:
        # Raw parameters go in a second adapter, added after the modules: peft 0.22 wraps target_parameters
        # before target_modules in one config and then cannot find an out_proj inside the wrapped attention.
        pm.add_adapter(PARAMS_ADAPTER, LoraConfig(target_modules=[], target_parameters=params, **common))
        pm.base_model.set_adapter(["default", PARAMS_ADAPTER])
    return pm


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


# -------------------------------------------------------------------------------------- adapters
class BottleneckAdapter(nn.Module):
    """x + up(gelu(down(x))) with reduction r; ``up`` starts at zero, so the tuned model starts as the base."""

    def __init__(self, width: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, width // int(reduction))
        self.down, self.act, self.up = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a convolution's (B, C, H, W) output: the MLP runs over the channels
            return x + self.up(self.act(self.down(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return x + self.up(self.act(self.down(x)))


def _out_width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    # a conv block (timm towers) ends in its last convolution, a transformer MLP in its last linear
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UserError(f"cannot place an adapter after {type(module).__name__}: it has no linear or conv layer")
    last = layers[-1]
    return int(last.out_features if isinstance(last, nn.Linear) else last.out_channels)


def _adapter_site(where: Any, name: str, module: nn.Module) -> bool:
    """Whether an adapter follows module ``name``: ``where`` is a name pattern or a predicate(name, module)."""
    return where(name, module) if callable(where) else fnmatch.fnmatchcase(name, where)


def attach_adapters(model: nn.Module, layout: Layout, reduction: int = 4,
                    towers: Sequence[str] = ("image", "text")) -> dict[str, int]:
    """A ``BottleneckAdapter`` after each block's MLP of ``towers``; only the adapters train.

    In an ``nn.Sequential`` MLP the adapter is appended as its last step (keys ``...mlp.adapter.*``);
    elsewhere a forward hook applies it to the module's output.
    """
    if int(reduction) < 1:
        raise UserError(f"finetune.adapter.reduction={reduction} must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    sites = [(n, m) for n, m in model.named_modules()
             if any(_adapter_site(layout.adapter_after[t], n, m) for t in towers)]
    if not sites:
        raise UserError(f"finetune.adapter: no block MLP found in towers {list(towers)} of this model")
    for _, m in sites:
        adapter = BottleneckAdapter(_out_width(m), reduction)
        m.add_module("adapter", adapter)
        if not isinstance(m, nn.Sequential):
            m.register_forward_hook(lambda mod, args, out: mod.adapter(out))
    return check_trainable(model, "adapter")


# ---------------------------------------------------------------------------------------- output
def merged(model: nn.Module, alpha: float = 1.0) -> nn.Module:
    """A plain module at WiSE-FT ``alpha``: peft models get their adapter scaled by α and merged
    (``merge_and_unload``); others are returned as they are (their weights are interpolated
    by ``distill.finetune.wise.wise_ft`` beforehand)."""
    if not is_peft(model):
        return model
    from peft.helpers import rescale_adapter_scale

    with rescale_adapter_scale(model, float(alpha)):
        plain = model.merge_and_unload()
        return _merge_leftovers(plain)


def _merge_leftovers(model: nn.Module) -> nn.Module:
    """Merge and unwrap LoRA layers that ``merge_and_unload`` left behind, innermost first.

    peft collects the names to unwrap before it unwraps any, so a LoRA ``out_proj`` inside a
    ``ParamWrapper`` (LoRA on the attention's raw in_proj_weight) is no longer found once its
    outer wrapper is gone: its adapter would stay unmerged in the "plain" model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    while True:
        wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        if not wrapped:
            return model
        name = max(wrapped, key=lambda n: n.count("."))
        parent_name, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        layer.merge()
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())


# --------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A registered fine-tune method: ``prepare(model, layout, cfg)`` -> (the model ready to train,
    its parameter counts), or None for no fine-tune; ``save(model, ft_dir)`` -> {label: file} of the
    parts it trains beside the base weights (the LoRA adapter, bottleneck adapters)."""

    name: str
    prepare: Callable[[nn.Module, Layout, Any], tuple[nn.Module, dict[str, int]]] | None
    save: Callable[[nn.Module, Path], dict[str, str]]


def _no_parts(model: nn.Module, ft_dir: Path) -> dict[str, str]:
    return {}


METHODS: Registry[Method] = Registry("fine-tune method")
METHODS.register("none", Method("none", None, _no_parts), doc="No fine-tune: the teacher is distilled as built.")


def method(name: str, save: Callable[[nn.Module, Path], dict[str, str]] = _no_parts) -> Callable:
    """Register ``prepare(model, layout, cfg)`` as fine-tune method ``name`` in ``METHODS`` (its docstring
    is its description); ``save`` writes the parts it trains beside the base weights."""

    def wrap(prepare: Callable) -> Callable:
        METHODS.register(name, Method(name, prepare, save), doc=prepare.__doc__)
        return prepare

    return wrap


@method("full")
def _full(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """Every weight trains: both towers and the head."""
    return model, select_trainable(model, "full", layout, int(cfg.get("unlocked_layers", 0)))


@method("lock_image")
def _lock_image(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """The image tower is locked (but its last finetune.unlocked_layers blocks); the text tower and the head train."""
    return model, select_trainable(model, "lock_image", layout, int(cfg.get("unlocked_layers", 0)))


@method("lock_text")
def _lock_text(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """The text tower is locked (but its last finetune.unlocked_layers blocks); the image tower and the head train."""
    return model, select_trainable(model, "lock_text", layout, int(cfg.get("unlocked_layers", 0)))


def _save_lora(model: nn.Module, ft_dir: Path) -> dict[str, str]:
    """The adapter alone (peft's safetensors and config), so one base can carry several domains."""
    model.save_pretrained(str(ft_dir / "lora_adapter"))
    parts = {"lora_adapter": str(ft_dir / "lora_adapter" / "adapter_model.safetensors")}
    if PARAMS_ADAPTER in model.peft_config:  # peft saves a second adapter in a subfolder
        parts["lora_adapter_params"] = str(ft_dir / "lora_adapter" / PARAMS_ADAPTER / "adapter_model.safetensors")
    return parts


@method("lora", save=_save_lora)
def _lora(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """LoRA through peft on the layout's targets (finetune.lora), merged into the weights for export."""
    from omegaconf import OmegaConf

    lc = cfg.lora
    targets = OmegaConf.to_container(lc.targets, resolve=True) if OmegaConf.is_config(lc.targets) else lc.targets
    model = attach_lora(model, layout, rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                        targets=targets)
    return model, check_trainable(model, "lora")


def _save_adapters(model: nn.Module, ft_dir: Path) -> dict[str, str]:
    """The bottleneck adapters' weights alone."""
    from safetensors.torch import save_file

    parts = {k: v.contiguous() for k, v in model.state_dict().items() if ".adapter." in k}
    save_file(parts, str(ft_dir / "adapters.safetensors"))
    return {"adapters": str(ft_dir / "adapters.safetensors")}


@method("adapter", save=_save_adapters)
def _adapter(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """Bottleneck adapters after each block's MLP (finetune.adapter); only the adapters train."""
    return model, attach_adapters(model, layout, int(cfg.adapter.reduction), list(cfg.adapter.towers))


@method("head")
def _head(model: nn.Module, layout: Layout, cfg: Any) -> tuple[nn.Module, dict[str, int]]:
    """Only the layout's head trains: projections, temperature and any class table."""
    return model, select_trainable(model, "head", layout, int(cfg.get("unlocked_layers", 0)))

"""The fine-tune's data: a class id per training image, a validation split carved from the training
images (never the test split), per-item sampling weights, and the validation score."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from distill.data import TrainSet, eval_view
from distill.errors import UserError
from distill.imageio import try_open


def _fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(("finetune-val/" + key).encode()).digest()[:8], "little") / 2**64


def item_labels(trainset: TrainSet, templates: Sequence[str] = ("a photo of a {}.",)) -> tuple[list[int], list[str]]:
    """(a class id per training image, -1 for none; one prompt per class id). Sources with labels
    and class names give classes ("a photo of a {name}." by ``templates[0]``); a captioned image
    without them is its own caption's class."""
    ids: dict[tuple[str, str], int] = {}
    prompts: list[str] = []
    labels = []
    for s, i in trainset.index:
        src = trainset.sources[s]
        names, lab, caps = getattr(src, "classnames", None), getattr(src, "labels", None), src.captions
        if names and lab is not None:
            key = ("class", str(names[int(lab[i])]).lower())
            text = templates[0].format(key[1])
        elif caps is not None:
            key, text = ("caption", caps[i]), caps[i]
        else:
            labels.append(-1)
            continue
        if key not in ids:
            ids[key] = len(prompts)
            prompts.append(text)
        labels.append(ids[key])
    return labels, prompts


def carve(trainset: TrainSet, labels: Sequence[int], val_fraction: float, balanced: bool = False,
          need_caption: bool = True) -> tuple[list[int], list[int]]:
    """(per-item sampling weights for training, the validation images). An image is in the
    validation split by a hash of its key (stable across runs and data order); its views are all
    on the same side. Weights are 0 for validation and unusable items; with ``balanced``, an
    item of a rare class repeats so that every class is drawn about equally often."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"finetune.val_fraction={val_fraction} must lie in (0, 1), e.g. 0.1")
    n_img, views = len(trainset.index), trainset.spec.views
    usable = [labels[k] >= 0 and (not need_caption or trainset.paired(k * views)) for k in range(n_img)]
    is_val = [usable[k] and _fraction(trainset.key(k * views)) < float(val_fraction) for k in range(n_img)]
    val = [k for k in range(n_img) if is_val[k]]
    if not val:
        raise UserError(f"finetune: the validation split is empty ({sum(usable)} usable captioned images, "
                        f"val_fraction={val_fraction}): raise finetune.val_fraction or add captioned training data")
    train = [k for k in range(n_img) if usable[k] and not is_val[k]]
    if not train:
        raise UserError("finetune: no captioned training image is left after the validation split: "
                        "lower finetune.val_fraction or add captioned training data")
    counts: dict[int, int] = {}
    for k in train:
        counts[labels[k]] = counts.get(labels[k], 0) + 1
    most = max(counts.values())
    per_image = [0] * n_img
    for k in train:
        per_image[k] = max(1, round(most / counts[labels[k]])) if balanced else 1
    return [per_image[j // views] for j in range(n_img * views)], val


@dataclass
class ValSet:
    """The validation images (uint8, centre view), their class ids and captions."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,)
    captions: list[str]

    @classmethod
    def load(cls, trainset: TrainSet, val: Sequence[int], labels: Sequence[int]) -> "ValSet":
        imgs, labs, caps = [], [], []
        for k in val:
            s, i = trainset.index[k]
            img = try_open(trainset.sources[s], i, trainset.skips)
            if img is None:
                continue
            imgs.append((eval_view(img, trainset.spec.size) * 255).round().to(torch.uint8))
            labs.append(labels[k])
            caps.append(trainset.texts[trainset.text_index(k * trainset.spec.views)])
        if not imgs:
            raise UserError("finetune: no validation image could be read: check the training sources")
        return cls(torch.stack(imgs), torch.tensor(labs), caps)

    @torch.no_grad()
    def score(self, encoder: Any, batch: int = 64) -> dict[str, float]:
        """{"val/top1"}: the share of validation images whose nearest caption (among the split's
        unique captions) belongs to their own class."""
        texts = list(dict.fromkeys(self.captions))
        text_label = {c: int(l) for c, l in zip(self.captions, self.labels.tolist())}
        t = torch.as_tensor(encoder.encode_text(texts)).float().cpu()
        feats = [torch.as_tensor(encoder.encode_image(self.images[i:i + batch].float() / 255)).float().cpu()
                 for i in range(0, len(self.images), batch)]
        nearest = (torch.cat(feats) @ t.T).argmax(dim=1)
        predicted = torch.tensor([text_label[texts[j]] for j in nearest.tolist()])
        return {"val/top1": float((predicted == self.labels).float().mean())}

"""Ablations of the offline flagship's recipe, with a per-tower breakdown of the student's accuracy.

    .venv/bin/python benchmarks/studies/bench_offline_recipe.py NAME [hydra overrides] ['py:<python editing cfg>']

Composes ``+experiment=offline`` with the overrides (an argument starting ``py:`` is Python run
with ``cfg`` in scope, for edits the Hydra command line cannot express, such as appending a data
source), builds the teacher cache, trains, and evaluates on the experiment's eval sets four ways:
teacher image x teacher text (TT), student x student (SS), student image x teacher text (S_img)
and teacher image x student text (S_txt), plus the mean image/text cosine to the teacher. S_img
and S_txt say which tower loses the accuracy. A constant baseline too: the cosine of the teacher's
eval embeddings to the mean teacher target of each training source's views; and, for a classification
set, a label oracle (``label_oracle``: every eval image given the mean teacher target of its class's
training views, from a training source labelled with the same classes). Appends one JSON line to
benchmarks/results/offline_recipe.jsonl (no export, no latency: see the pipeline's report for those).
A study: one ablation of the recipe per call.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from distill import pipeline  # noqa: E402
from distill.cache import build_or_load  # noqa: E402
from distill.data_build import build_data  # noqa: E402
from distill.encoders import ClipEncoder  # noqa: E402
from distill.metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier  # noqa: E402
from distill.train import train  # noqa: E402


def label_oracle(ds, targets: torch.Tensor, owner: torch.Tensor, ev, teacher_emb: torch.Tensor,
                 teacher_classifier: torch.Tensor) -> dict[str, dict[str, float]]:
    """A reference point for a classification eval set: a student that knows every eval image's
    class perfectly and outputs the mean teacher target of that class's training views. Per training
    source labelled with the eval set's class names: that oracle's mean cosine to the teacher's eval
    embeddings and its top-1 with the teacher's text classifier. What is left above it is the
    teacher's response to the individual image, which the student has to see to copy."""
    out = {}
    for si, src in enumerate(ds.sources):
        if getattr(src, "labels", None) is None or list(getattr(src, "classnames", None) or []) != list(ev.classnames):
            continue
        rows = (owner == si).nonzero().squeeze(1)
        labels = torch.tensor([src.labels[ds.index[int(j) // ds.spec.views][1]] for j in rows])
        per_class = torch.nn.functional.normalize(
            torch.stack([targets[rows[labels == c]].mean(0) for c in range(len(ev.classnames))]), dim=-1)
        oracle = per_class[ev.labels]
        out[src.name] = {"image_cosine": round((teacher_emb * oracle).sum(-1).mean().item(), 4),
                         "top1": round(zero_shot_accuracy(oracle, teacher_classifier, ev.labels)["top1"] * 100, 1)}
    return out


def main(argv=None) -> int:
    ap = common.parser(__doc__, "offline_recipe.md", smoke=False)
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides and 'py:<python editing cfg>' edits")
    parsed = common.parse(ap, argv)
    name, args = parsed.name, parsed.overrides
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    cfg = common.compose(["+experiment=offline"] + [a for a in args if not a.startswith("py:")])
    OmegaConf.set_struct(cfg, False)
    for a in args:
        if a.startswith("py:"):
            exec(a[3:], {"cfg": cfg, "OmegaConf": OmegaConf})  # noqa: S102 - the user's own command line
    t0 = time.time()
    dev = torch.device("cpu")
    teacher = pipeline.build_teacher(cfg.teacher, dev)
    ds, evs, _ = build_data(cfg.data)
    cache = build_or_load(teacher, ds, cfg.cache.dir, progress=False)
    t_cache = time.time() - t0
    student, model_cfg = pipeline.build_student_stage(cfg.student, teacher, cache_dir=cfg.cache.dir)
    tok = pipeline.student_tokenizer(model_cfg)
    loss_fn = instantiate(cfg.loss, student_dim=int(model_cfg["embed_dim"]), teacher_dim=teacher.embed_dim,
                          _convert_="all")
    size = int(model_cfg["vision_cfg"]["image_size"])
    train(student=student, loss_fn=loss_fn, dataset=ds, tokenizer=tok, cfg=OmegaConf.to_container(cfg.train, resolve=True),
          out_dir=Path("/tmp") / f"offline_recipe_{name}", device=dev, teacher=None, cache=cache, evaluate=None,
          image_size=size)
    t_train = time.time() - t0 - t_cache
    s = ClipEncoder(student.eval(), tok, size)
    res = {"name": name, "args": args, "items": len(ds), "cache_s": round(t_cache), "train_s": round(t_train)}
    targets = torch.from_numpy(np.asarray(cache.image_emb, dtype=np.float32))
    owner = torch.tensor([ds.index[j // ds.spec.views][0] for j in range(len(ds))])
    means = {src.name: torch.nn.functional.normalize(targets[owner == i].mean(0), dim=0)
             for i, src in enumerate(ds.sources)}
    for n, e in evs["classification"].items():
        ti, si = teacher.encode_image(e.images), s.encode_image(e.images)
        tmpl = e.templates or ["a photo of a {}."]
        tc = zero_shot_classifier(teacher.encode_text, e.classnames, tmpl)
        sc = zero_shot_classifier(s.encode_text, e.classnames, tmpl)
        for a, b, lab in ((ti, tc, "TT"), (si, sc, "SS"), (si, tc, "S_img"), (ti, sc, "S_txt")):
            res[f"{n}/top1/{lab}"] = round(zero_shot_accuracy(a, b, e.labels)["top1"] * 100, 1)
        res[f"{n}/image_cosine"] = round((ti * si).sum(-1).mean().item(), 4)
        res[f"{n}/teacher_cosine_to_train_mean"] = {k: round((ti @ m).mean().item(), 4) for k, m in means.items()}
        res[f"{n}/label_oracle"] = label_oracle(ds, targets, owner, e, ti, tc)
    for n, e in evs["retrieval"].items():
        ti, si = teacher.encode_image(e.images), s.encode_image(e.images)
        tt, st = teacher.encode_text(e.captions), s.encode_text(e.captions)
        for a, b, lab in ((ti, tt, "TT"), (si, st, "SS"), (si, tt, "S_img"), (ti, st, "S_txt")):
            r = retrieval_recall(a, b)
            res[f"{n}/r5_i2t_t2i/{lab}"] = [round(r["i2t_r5"] * 100, 1), round(r["t2i_r5"] * 100, 1)]
        res[f"{n}/text_cosine"] = round((tt * st).sum(-1).mean().item(), 4)
        res[f"{n}/image_cosine"] = round((ti * si).sum(-1).mean().item(), 4)
        res[f"{n}/teacher_cosine_to_train_mean"] = {k: round((ti @ m).mean().item(), 4) for k, m in means.items()}
    common.append_jsonl(Path(parsed.out).with_suffix(".jsonl"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the flagship student loses the tuned teacher's accuracy: per tower, and train against test.

    .venv/bin/python benchmarks/studies/bench_flagship_towers.py RUN_DIR     # a finished offline_finetuned run folder

Pairs the run's exported towers four ways: TT (tuned teacher, its ONNX export), SS (the shipped
student bundle), S_img (student image x teacher text), S_txt (teacher image x student text), on
Fashion-MNIST test and *train* (200 a class, eval transform; the train images are ones the student
distilled on, less the 10% validation carve) and Tux Paint val and train (retrieval R@5). S_img
and S_txt say which tower loses the accuracy; train against test says underfit or overfit.
A diagnostic study of one run. Writes benchmarks/results/flagship_towers.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


class Mix:
    """One encoder's image tower with another's text tower (both in the teacher's 384-d space)."""

    def __init__(self, image_enc, text_enc) -> None:
        self.i, self.t = image_enc, text_enc
        self.image_size = getattr(image_enc, "image_size", 224)

    def encode_image(self, x):
        return self.i.encode_image(x)

    def encode_text(self, x):
        return self.t.encode_text(x)


def main(argv=None) -> None:
    ap = common.parser(__doc__, "flagship_towers.md", smoke=False)
    ap.add_argument("run", type=Path, help="a finished +experiment=offline_finetuned run folder")
    args = common.parse(ap, argv)
    import torch

    from distill import datasets, evaluation
    from distill.data import load_eval_set
    from distill.teachers.conse_onnx import ConSEOnnx
    from distill.teachers.onnx_teacher import OnnxDualEncoder

    torch.set_num_threads(2)
    run = args.run
    T = ConSEOnnx(run / "export/teacher_onnx", threads=2)
    S = OnnxDualEncoder(bundle=run / "export/bundle", threads=2)
    encs = {"TT": T, "SS": S, "S_img": Mix(S, T), "S_txt": Mix(T, S)}
    tmpl, size = ["a photo of a {}."], S.image_size
    sets = {"classification": {
        f"fashion-mnist/{sp}": load_eval_set(sp, datasets.fashion_mnist(split=sp, per_class=200, invert=True), size,
                                             templates=tmpl) for sp in ("test", "train")},
        "retrieval": {f"tuxpaint/{sp}": load_eval_set(sp, datasets.tuxpaint(split=sp), size) for sp in ("val", "train")}}
    out = {}
    for name, e in encs.items():
        res = evaluation.evaluate(e, sets, image_batch=64, text_batch=64, resamples=0)
        out[name] = {k: round(100 * v, 2) for k, v in evaluation.flat_metrics(res).items() if k.endswith(("top1", "_r5"))}
    cols = list(out["TT"])
    lines = ["# The flagship student, tower by tower", "",
             f"`{common.command(args.argv)}` (one seed's run). Percent; Fashion-MNIST: 2,000 images "
             "of each split (200 a class), top-1 with the prompt \"a photo of a {}.\"; Tux Paint: R@5 both ways.", "",
             "| pairing | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             *[f"| {n} | " + " | ".join(f"{v[c]:.1f}" for c in cols) + " |" for n, v in out.items()]]
    common.write_results(args.out, lines, data={"run": str(run), "scores": out})
    print("\n".join(lines[4:10]))


if __name__ == "__main__":
    main()

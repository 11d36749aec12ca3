"""`python -m distill list`: every registered part a config can name, with one line each.

Loss terms come from distill.losses.TERMS, deployment variants from distill.variants.VARIANTS,
data sources from distill.datasets.SOURCES; teachers, students, data sets and experiments are
the YAML files of their config groups (the comment at the top of each file describes it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

GROUPS = {"teachers": "teacher", "students": "student", "data": "data", "experiments": "experiment"}


def _sentence(text: str, limit: int = 120) -> str:
    """The first sentence of ``text``, cut at a word boundary when longer than ``limit``."""
    text = " ".join(text.split())
    if ". " in text:
        text = text[: text.index(". ") + 1]
    if len(text) > limit:
        text = text[: text.rfind(" ", 0, limit - 3)].rstrip(",;:") + "..."
    return text


def _first_comment(path: Path) -> str:
    """The comment block at the top of a YAML file (Hydra directives skipped), first sentence."""
    block = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("# @package"):
            continue
        if not text.startswith("#"):
            break
        block.append(text.lstrip("#").strip())
    return _sentence(" ".join(block))


def _first_line(obj: Callable) -> str:
    doc = (obj.__doc__ or "").strip().split("\n\n")[0]
    return _sentence(doc)


def catalog() -> dict[str, list[tuple[str, str]]]:
    """Section -> [(name, one-line description)], in the order ``list`` prints them."""
    from distill.compose import config_dir
    from distill.datasets import SOURCES
    from distill.losses import TERMS
    from distill.variants import VARIANTS

    out: dict[str, list[tuple[str, str]]] = {"loss terms": [(t.name, _sentence(t.doc)) for t in TERMS.values()]}
    out["deployment variants"] = [(v.name, f"{v.role}, {v.runtime} {v.precision}: {_sentence(v.doc)}")
                                  for v in VARIANTS.values()]
    out["data sources"] = [(name, _first_line(f)) for name, f in SOURCES.items()]
    conf = Path(config_dir())
    for section, group in GROUPS.items():
        out[section] = [(p.stem, _first_comment(p)) for p in sorted((conf / group).glob("*.yaml"))]
    return out


def render(cat: dict[str, list[tuple[str, str]]]) -> str:
    lines = []
    for section, entries in cat.items():
        lines.append(f"{section}:")
        width = max((len(n) for n, _ in entries), default=0)
        lines += [f"  {name:<{width}}  {desc}".rstrip() for name, desc in entries]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(render(catalog()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

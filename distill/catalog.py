"""`python -m distill list`: every registered part and every config option, with one line each.

The registries (distill.registry.Registry) live in the modules that define their entries; each
section is one registry, titled by its kind. The config groups are the folders of conf/, each
option described by the comment at the top of its YAML file.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from distill.registry import Registry, first_sentence

# (module, attribute) of each registry, in the order ``list`` prints them
REGISTRIES = (
    ("distill.losses", "TERMS"),
    ("distill.variants", "VARIANTS"),
    ("distill.datasets", "SOURCES"),
    ("distill.finetune.methods", "METHODS"),
    ("distill.teachers", "TEACHERS"),
    ("distill.students", "STUDENT_TOWERS"),
)


def registries() -> list[Registry]:
    """Every registry, filled. The student towers' registry is distill.students.STUDENT_TOWERS when that
    module defines one, else distill.registry.STUDENT_TOWERS."""
    from distill import registry

    out = []
    for module, attr in REGISTRIES:
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            out.append(getattr(mod, attr))
        elif hasattr(registry, attr):
            out.append(getattr(registry, attr))
    return out


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
    return first_sentence(" ".join(block))


def config_groups(conf: Path) -> dict[str, list[Path]]:
    """Group name -> its option files: every folder of ``conf`` that holds YAML files."""
    return {d.name: sorted(d.glob("*.yaml")) for d in sorted(conf.iterdir())
            if d.is_dir() and any(d.glob("*.yaml"))}


def _defaults(conf: Path) -> set[str]:
    """The groups config.yaml's defaults list picks an option of (the others are added with ``+group=``)."""
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(conf / "config.yaml")).get("defaults", [])
    return {k.lstrip("+/") for e in entries if isinstance(e, dict) for k in e}


def catalog() -> dict[str, list[tuple[str, str]]]:
    """Section -> [(name, one-line description)], in the order ``list`` prints them: the registries
    ("loss terms", ...), then one "config group <name> (<override>)" per folder of conf/."""
    from distill.compose import config_dir

    conf = Path(config_dir())
    out: dict[str, list[tuple[str, str]]] = {f"{reg.kind}s": reg.entries() for reg in registries()}
    listed = _defaults(conf)
    for group, files in config_groups(conf).items():
        usage = f"{'' if group in listed else '+'}{group}=NAME"
        out[f"config group {group} ({usage})"] = [(p.stem, _first_comment(p)) for p in files]
    return out


def render(cat: dict[str, list[tuple[str, str]]]) -> str:
    lines = []
    for section, entries in cat.items():
        lines.append(f"{section}:")
        width = max((len(n) for n, _ in entries), default=0)
        lines += [f"  {name:<{width}}  {desc}".rstrip() for name, desc in entries] or ["  (none registered)"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(render(catalog()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every `python -m distill ...` command the README and the guide show composes, and every key it sets
is one the strict key check knows: a command a newcomer copies must not die on a renamed key."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distill.compose import compose
from distill.validate import _check_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "guide.md"]


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # join continued lines
        for line in text.splitlines():
            m = re.search(r"(?:python|torchrun [^|#]*?)\s+-m distill\s+([^#`|&]*)", line)
            if not m:
                continue
            args = [a for a in shlex.split(m.group(1), posix=True) if "=" in a and not a.startswith("-")]
            if any("<" in a or "..." in a or "NAME" in a for a in args) or not any(
                    a.startswith("+experiment=") for a in args):
                continue  # a placeholder the reader fills in, or a subcommand (list, cache) without an experiment
            out.append((f"{doc.name}: {m.group(1).strip()[:80]}", [a for a in args if not a.startswith("hydra.")]))
    return out


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize("args", [a for _, a in COMMANDS], ids=[n for n, _ in COMMANDS])
def test_documented_command_composes_with_known_keys(args):
    cfg = compose(args)
    assert list(_check_keys(cfg)) == []

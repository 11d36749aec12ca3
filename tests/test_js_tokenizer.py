"""The JavaScript tokenizer (distill/web/tokenizer.js) gives distill.tokenizer_np's ids on every
text of the fixture tools/tokenizer_fixture.py writes (run with ``node --test``)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_TEST = "tests/js/tokenizer.test.mjs"


def _fixture_module():
    # tools/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("tokenizer_fixture", REPO / "tools" / "tokenizer_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        msg = "node not found: install it with `sudo apt-get install nodejs` (tools/setup.sh does)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(msg)  # CI must run this test, not skip it
        pytest.skip(msg)
    return node


def test_js_tokenizer_matches_numpy_tokenizer(tmp_path):
    node = _node()
    fixture = _fixture_module().build_fixture(tmp_path)
    out = subprocess.run([node, "--test", NODE_TEST], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TOKENIZER_FIXTURE": str(fixture)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    m = re.search(r"exact match: (\d+)/(\d+) texts \(([\d.]+)%\)", log)
    assert m, f"no exact-match line in node's output:\n{log[-3000:]}"
    same, total = int(m.group(1)), int(m.group(2))
    print(m.group(0))
    assert total > 5000 and same == total, m.group(0)

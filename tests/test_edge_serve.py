"""``python -m distill.edge serve`` serves only files whose real path lies inside the bundle: a
symlink out of it (a file, or a folder such as ``/``) is a 404 like a missing file, and a bundle
holding symlinks gets one warning line at start. The printed address is the one it listens on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from distill import edge
from tests.conftest import REPO


@pytest.fixture()
def linked_bundle(tmp_path):
    """A bundle with a page, plus symlinks: three out of it (files, the filesystem root) and one inside."""
    bundle = tmp_path / "bundle"
    (bundle / "web").mkdir(parents=True)
    (bundle / "web" / "index.html").write_text("<html>page</html>")
    (bundle / "web" / "app.js").write_text("// app")
    (bundle / "labels.json").write_text("[]")
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    os.symlink(secret, bundle / "web" / "leak.json")
    os.symlink("/", bundle / "web" / "root")
    os.symlink("app.js", bundle / "web" / "alias.js")
    (bundle / "web" / "sub").mkdir()  # a folder is served as its index.html: here a link out
    os.symlink(secret, bundle / "web" / "sub" / "index.html")
    return bundle


def _status(url: str, method: str = "GET", **headers: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_symlinks_out_of_the_bundle_are_404_and_warned_about(linked_bundle):
    proc = subprocess.Popen([sys.executable, "-m", "distill.edge", "serve", str(linked_bundle), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), line + (proc.stderr.read() if proc.poll() is not None else "")
        root = line.split(" at ", 1)[1].split()[0].rsplit("/web/", 1)[0]
        assert root.startswith("http://127.0.0.1:")
        assert _status(f"{root}/web/app.js") == (200, b"// app")
        assert _status(f"{root}/web/alias.js") == (200, b"// app")  # a link that stays inside is served
        for path in ("/web/leak.json", "/web/root/etc/passwd", "/web/root/", "/web/root", "/web/sub/"):
            assert _status(root + path)[0] == 404, path
            assert _status(root + path, method="HEAD")[0] == 404, path
        assert _status(f"{root}/web/leak.json", **{"Accept-Encoding": "gzip"})[0] == 404  # the gzip path too
        assert b"secret" not in _status(f"{root}/web/leak.json")[1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    warnings = [w for w in proc.stderr.read().splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1, warnings  # one line at start, however many links
    assert warnings[0].startswith(f"warning: {linked_bundle.resolve()} holds 4 symlinks"), warnings
    assert "3 of them lead outside it and are not served" in warnings[0] and "cp -rL" in warnings[0]


def test_no_warning_without_symlinks_and_the_real_listening_address(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("page")
    assert edge._symlink_warning(tmp_path) is None
    line = edge.serving_line(tmp_path, "0.0.0.0", 8765)
    assert line.startswith(f"serving {tmp_path} at http://0.0.0.0:8765/web/ (every network interface")
    assert "http://127.0.0.1:8765/web/ here" in line
    assert edge.serving_line(tmp_path, "127.0.0.1", 80) == \
        f"serving {tmp_path} at http://127.0.0.1:80/web/ (Ctrl-C stops)"

"""Headless Chromium driven through the DevTools protocol over a pipe (no extra Python package), and the
bundle's browser page served by ``python -m distill.edge serve``: the one driver that tests/test_web_page.py
and the benchmarks (benchmarks/bench_web_runtime.py, benchmarks/bench_students.py) share.

    .venv/bin/python tools/browser_driver.py BUNDLE [--threads N] [--repeats 20]   # int8 image b1 in the browser

tools/ is not a package: a user puts this folder on sys.path and imports ``browser_driver``.

Needs Debian's chromium-headless-shell (``apt-get install --no-install-recommends chromium-headless-shell``,
tools/setup.sh does) and, in the bundle, the page with onnxruntime-web (``npm ci`` in distill/web before the
bundle is written). What is missing raises BrowserUnavailable (a RuntimeError) saying how to get it; tests turn
that into a skip.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL_CHROMIUM = "apt-get install -y --no-install-recommends chromium-headless-shell (tools/setup.sh does)"
INSTALL_TUXPAINT = "apt-get install --no-install-recommends tuxpaint-stamps-default"
# what the page needs from the bundle to run a model (distill.bundle.write_bundle copies them into bundle/web/)
PAGE_FILES = ("web/index.html", "web/app.js", "web/ort/ort.wasm.min.mjs", "web/ort/ort-wasm-simd-threaded.mjs",
              "web/ort/ort-wasm-simd-threaded.wasm")


class BrowserUnavailable(RuntimeError):
    """Something the browser page needs is not here: Chromium, a Debian package, or the bundle's page and
    onnxruntime-web. The message says what, and how to get it."""


def chromium_binary() -> str | None:
    """Debian's chromium-headless-shell: on PATH, else where dpkg put it."""
    found = shutil.which("chromium-headless-shell")
    if found:
        return found
    try:
        out = subprocess.run(["dpkg", "-L", "chromium-headless-shell"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((p for p in out.split() if p.endswith("/chromium-headless-shell") and os.access(p, os.X_OK)), None)


def tuxpaint_pngs(n: int) -> list[str]:
    """n real photos from the tuxpaint-stamps-default Debian package (sorted, so the choice is stable);
    BrowserUnavailable when the package is not installed."""
    try:
        out = subprocess.run(["dpkg", "-L", "tuxpaint-stamps-default"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise BrowserUnavailable(
            f"Debian package tuxpaint-stamps-default is not installed ({INSTALL_TUXPAINT})") from None
    pngs = sorted(p for p in out.stdout.split() if p.endswith(".png") and "/stamps/animals/" in p and Path(p).is_file())
    return pngs[:: max(1, len(pngs) // n)][:n]


# ---------------------------------------------------------------------------- DevTools protocol over a pipe

class Chromium:
    """Headless Chromium driven through --remote-debugging-pipe (fd 3: commands in, fd 4: replies out,
    NUL-terminated JSON), so no websocket client is needed. One page target, flattened session."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 1000, timeout: float = 120):
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        # above 9, so that moving them to 3 and 4 below never closes one of them
        cmd_r, out_w = (self._high(fd) for fd in (cmd_r, out_w))
        args = [binary, "--remote-debugging-pipe", "--headless", "--no-sandbox", "--no-first-run", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        Path(profile).mkdir(parents=True, exist_ok=True)
        self.log = Path(profile) / "chromium.log"  # a file, not a pipe nobody reads: a full pipe would stall the browser
        # the browser wants the pipe on fds 3 and 4 exactly: let bash (dash takes fds up to 9 only) move them there
        script = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, *args], pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(cmd_r)
        os.close(out_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(out_r, "rb", buffering=0)
        self.timeout = timeout
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._cv = threading.Condition()
        self.events: queue.Queue = queue.Queue()
        self.console: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.width, self.height = width, height
        deadline = time.monotonic() + 30
        while not (pages := [t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page"]):
            if time.monotonic() > deadline:  # the about:blank tab opens with the browser; wait for it, not forever
                raise TimeoutError(f"no page target; {self.log}: {self.log.read_text()[-1000:]}")
            time.sleep(0.1)
        target = pages[0]
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        for m in ("Page.enable", "Runtime.enable"):
            self.page(m)
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self._r.read(1 << 16)
            except (OSError, ValueError):  # close() closed the pipe under this thread: the browser is gone
                break
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()
                else:
                    if msg.get("method") == "Runtime.consoleAPICalled":
                        self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                                     for a in msg["params"]["args"]))
                    elif msg.get("method") == "Runtime.exceptionThrown":
                        self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])
                    self.events.put(msg)

    def send(self, method: str, session: str | None = None, timeout: float | None = None, **params):
        self._id += 1
        mid = self._id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cv:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    why = "exited" if self.proc.poll() is not None else "timed out"
                    raise TimeoutError(f"{method}: no reply (browser {why}); console: {self.console[-5:]}; "
                                       f"{self.log}: {self.log.read_text(errors='replace')[-800:]}")
                self._cv.wait(min(left, 1.0))
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method: str, timeout: float | None = None, **params):
        return self.send(method, session=self.session, timeout=timeout, **params)

    def navigate(self, url: str) -> None:
        while not self.events.empty():
            self.events.get_nowait()
        self.page("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                ev = self.events.get(timeout=1.0)
            except queue.Empty:
                continue
            if ev.get("method") == "Page.loadEventFired":
                return
        raise TimeoutError(f"{url}: no load event; console: {self.console[-5:]}")

    def eval(self, expression: str, timeout: float | None = None):
        """Evaluate in the page, awaiting a promise; returns the JSON value (raises on a JS exception)."""
        r = self.page("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"page: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def set_files(self, selector: str, paths: list[str]) -> None:
        root = self.page("DOM.getDocument")["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def screenshot(self, path: Path) -> None:
        height = int(self.eval("Math.ceil(document.documentElement.scrollHeight)") or self.height)
        self.page("Emulation.setDeviceMetricsOverride", width=self.width, height=max(height, 400), deviceScaleFactor=1,
                  mobile=False)
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        self.page("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)

    def version(self) -> str:
        return self.send("Browser.getVersion")["product"]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may be gone already; the kill below makes sure
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
            self.proc.wait()
        for f in (self._w, self._r):
            try:
                f.close()
            except OSError:
                pass


class Server:
    """``python -m distill.edge serve BUNDLE --port 0`` in a subprocess; .url is the page's address."""

    def __init__(self, bundle: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "distill.edge", "serve", str(bundle), "--port", "0"],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split(" at ", 1)[1].split()[0]  # http://127.0.0.1:PORT/web/
        self.root = self.url.rsplit("/web/", 1)[0]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drop_files(browser: Chromium, paths: list[str], selector: str = "#files") -> dict:
    """Give the page's file input these files (a folder for #folder), wait until they are all embedded
    and classified, and return clipDemo.report()."""
    # a listener added after the page's own runs after it, so by then the files are queued
    browser.eval(f"window.__changed = new Promise(r => document.querySelector({json.dumps(selector)})"
                 ".addEventListener('change', () => r(), {once: true})); true")
    browser.set_files(selector, paths)
    browser.eval("window.__changed.then(() => clipDemo.idle())", timeout=600)
    return browser.eval("clipDemo.report()")


# ---------------------------------------------------------------------------- measurements

def browser_int8_b1(bundle: str | os.PathLike, *, threads: int | None = 1, warmup: int = 3, repeats: int = 20,
                    binary: str | None = None, timeout: float = 300) -> dict:
    """The bundle's int8 image encoder at batch 1 in headless Chromium: the bundle served by
    ``python -m distill.edge serve``, its page opened at ``?precision=int8&threads=N`` in a fresh profile, then
    ``clipDemo.bench`` (``warmup`` untimed calls, then ``repeats`` timed ``session.run`` calls, performance.now(),
    on a constant 0.1 input of the bundle's image size). ``threads``: wasm threads (None or 0: onnxruntime-web's
    default; the page is cross-origin isolated, so more than 1 takes effect).

    Returns {"browser_int8_b1_ms": median ms, "threads": the page's wasm threads, "chromium": version,
    "onnxruntime_web": version, "cross_origin_isolated": whether wasm threads were possible, "samples_ms": the
    timed calls}. Raises BrowserUnavailable when Chromium is not installed, the bundle has no page, no
    onnxruntime-web or no int8 image encoder, or the page cannot run the bundle.
    """
    bundle = Path(bundle)
    missing = [rel for rel in PAGE_FILES if not (bundle / rel).is_file()]
    if missing:
        raise BrowserUnavailable(f"{bundle}: no {', '.join(missing)} (the page and its runtime come from `npm ci "
                                 "--prefix distill/web` before the bundle is written; tools/setup.sh does)")
    if not (bundle / "image_encoder.int8.onnx").is_file():
        raise BrowserUnavailable(f"{bundle}: no image_encoder.int8.onnx (the run's student_onnx_int8 variant "
                                 "writes it)")
    binary = binary or chromium_binary()
    if binary is None:
        raise BrowserUnavailable(f"headless Chromium not found: {INSTALL_CHROMIUM}")
    query = "precision=int8" + (f"&threads={int(threads)}" if threads else "")
    with tempfile.TemporaryDirectory(prefix="browser_int8_") as profile:
        server = Server(bundle)
        try:
            b = Chromium(binary, Path(profile), timeout=timeout)
            try:
                b.navigate(f"{server.url}?{query}")
                try:
                    rep = b.eval("clipDemo.ready.then(() => clipDemo.report())", timeout=timeout)
                except RuntimeError as e:  # the page says why (no runtime, a checksum, no int8 file)
                    raise BrowserUnavailable(f"the page cannot run {bundle}: {e}") from e
                if rep.get("precision") != "int8":
                    raise BrowserUnavailable(f"the page opened {bundle} in {rep.get('precision')}, not int8")
                res = b.eval(f"clipDemo.bench({{warmup: {int(warmup)}, repeats: {int(repeats)}, text: false}})",
                             timeout=max(timeout, 600))
                version = b.version()
            finally:
                b.close()
        finally:
            server.close()
    ms = [float(x) for x in res["image_ms"]]
    return {"browser_int8_b1_ms": float(statistics.median(ms)), "threads": int(res["threads"]), "chromium": version,
            "onnxruntime_web": (rep.get("ort") or {}).get("web"),
            "cross_origin_isolated": bool(rep.get("crossOriginIsolated")), "samples_ms": ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The bundle's int8 image encoder at batch 1 in headless Chromium "
                                             "(prints the figures as JSON).")
    ap.add_argument("bundle", help="an edge bundle folder (a run writes <run>/export/bundle)")
    ap.add_argument("--threads", type=int, default=1, help="wasm threads (0: onnxruntime-web's default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        res = browser_int8_b1(args.bundle, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    except BrowserUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render a local HTML file in headless Chromium over the DevTools protocol: a screenshot, the
page's console errors and uncaught exceptions, and every request it made.

    shot = render("report.html")      # Shot(png, errors, requests)

Chromium is Debian's `chromium` package (.ci/run installs it when missing); the protocol
client is the `websockets` package (dev extra, pinned in constraints.txt).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from base64 import b64decode
from pathlib import Path
from typing import NamedTuple

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


class Shot(NamedTuple):
    png: bytes  # the screenshot of the whole page
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    requests: list[str]  # every URL the page asked for (itself included)


def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def render(path: str | Path, width: int = 1280, height: int = 900,
           timeout: float = 60.0) -> Shot:
    """Load `path` (a local file) in a fresh headless Chromium and report what happened."""
    from websockets.sync.client import connect

    exe = find_browser()
    if exe is None:
        raise RuntimeError("no chromium found (apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="fedtext-chromium-") as profile:
        proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-extensions", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--mute-audio",
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile), proc, timeout)
            targets = json.loads(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=timeout).read())
            page = next(t for t in targets if t.get("type") == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None,
                         open_timeout=timeout) as ws:
                return _drive(ws, url, width, timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _devtools_port(profile: Path, proc, timeout: float) -> int:
    f = profile / "DevToolsActivePort"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode}")
        if f.exists() and (lines := f.read_text().split()):
            return int(lines[0])
        time.sleep(0.05)
    raise RuntimeError("chromium did not open its DevTools port")


def _drive(ws, url: str, width: int, timeout: float) -> Shot:
    ids = iter(range(1, 1 << 30))
    errors: list[str] = []
    requests: list[str] = []

    def send(method, **params) -> int:
        i = next(ids)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        return i

    def until(pred, what):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"timed out waiting for {what}")
            msg = json.loads(ws.recv(timeout=left))
            method, p = msg.get("method"), msg.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                errors.append("exception: " + d.get("exception", {}).get(
                    "description", d.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append(f"console.{p['type']}: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip())
            elif method == "Network.requestWillBeSent":
                requests.append(p["request"]["url"])
            elif method == "Network.loadingFailed":
                errors.append(f"failed load: {p.get('errorText')}")
            if pred(msg):
                return msg

    for domain in ("Runtime", "Log", "Network", "Page"):
        i = send(f"{domain}.enable")
        until(lambda m, i=i: m.get("id") == i, f"{domain}.enable")
    send("Page.navigate", url=url)
    until(lambda m: m.get("method") == "Page.loadEventFired", "the page's load event")
    i = send("Runtime.evaluate", expression="document.documentElement.scrollHeight",
             returnByValue=True)
    height = until(lambda m: m.get("id") == i, "the page height")["result"]["result"]["value"]
    i = send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
             clip={"x": 0, "y": 0, "width": width, "height": min(int(height), 16000),
                   "scale": 1})
    png = b64decode(until(lambda m: m.get("id") == i, "the screenshot")["result"]["data"])
    time.sleep(0.2)  # late console messages (none expected from a page without scripts)
    send("Runtime.evaluate", expression="1")
    until(lambda m: "id" in m and m.get("method") is None and "result" in m, "a last reply")
    return Shot(png, errors, requests)


def blankness(png: bytes) -> dict:
    """How much of the screenshot is not background: {"ink": fraction of pixels differing
    from the most common colour, "colours": distinct colours, "height", "width"}."""
    import numpy as np
    from matplotlib import image

    a = image.imread(io.BytesIO(png), format="png")[..., :3]  # (H, W, 3) floats
    q = (a * 255).round().astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(q, axis=0, return_counts=True)
    return {"ink": 1.0 - counts.max() / len(q), "colours": len(colours),
            "height": a.shape[0], "width": a.shape[1]}


def required() -> bool:
    """CI (.ci/run) sets FEDTEXT_REQUIRE_BROWSER=1: a missing chromium fails the test there."""
    return os.environ.get("FEDTEXT_REQUIRE_BROWSER") == "1"

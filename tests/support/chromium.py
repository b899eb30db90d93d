"""A real headless Chromium (Debian's package) driven over the DevTools protocol.

``Browser`` starts ``/usr/bin/chromium --headless`` with a private profile on a free debugging
port, and :class:`Page` speaks CDP to one tab over a websocket (``websockets``, already in the
dev lock): navigate, evaluate JavaScript, wait for a condition, resize the viewport, take
screenshots. Every console error, uncaught exception and browser log error (failed loads,
Content-Security-Policy violations) is collected in ``Page.errors``. Ended by its pid.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.support.net import end_process, free_port, wait_serving

CHROMIUM = Path("/usr/bin/chromium")


class Page:
    """One tab: CDP calls on its websocket, with the events in between kept."""

    def __init__(self, ws_url: str) -> None:
        self.ws: ClientConnection = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=10)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """One CDP command; its result (AssertionError on a protocol error)."""
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer to {method} in {timeout} s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description")) for a in params.get("args", [])]
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        res = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in res:
            raise AssertionError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str, timeout: float = 30) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def wait_for(self, expression: str, timeout: float = 30, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; its value. AssertionError at ``timeout``."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{what or expression} not true after {timeout} s (last {value!r})")

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the page's viewport as a window resize would (resize events, observers)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        self.ws.close()


class Browser:
    """``chromium --headless`` on a free debugging port; :meth:`page` opens a tab."""

    def __init__(self, workdir: Path, width: int = 1400, height: int = 1600) -> None:
        self.port = free_port()
        self.log = workdir / "chromium.log"
        self.width, self.height = width, height
        args = [
            str(CHROMIUM),
            "--headless",
            f"--remote-debugging-port={self.port}",
            "--remote-allow-origins=*",
            f"--user-data-dir={workdir / 'chromium-profile'}",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.pages: list[Page] = []

    def _targets(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/json/list"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return list(json.load(resp))

    def page(self, timeout: float = 30) -> Page:
        """The first tab, once Chromium answers on its debugging port."""
        pages: list[dict[str, Any]] = []

        def ready() -> bool:
            pages[:] = [t for t in self._targets() if t.get("type") == "page"]
            return bool(pages)

        wait_serving(self.proc, ready, "chromium", timeout, self.output)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        page.set_viewport(self.width, self.height)
        self.pages.append(page)
        return page

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        for page in self.pages:
            page.close()
        end_process(self.proc, grace=10)

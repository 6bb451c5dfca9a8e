"""Headless Chromium for tests, driven over the Chrome DevTools Protocol with aiohttp's websocket client.

No browser-automation package is needed: Debian's ``chromium`` is installed with apt when it is missing
(CI runs as root on a fresh Debian machine, and apt is one of the hosts it may reach), and the few CDP
commands a test needs (navigate, evaluate, screenshot) are plain JSON messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


def _apt_install(package: str) -> None:
    """``apt-get install`` one Debian package (as root), updating the package lists first if they are missing."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"cannot install Debian's `{package}` package (needs root and apt-get): install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=True)
        subprocess.run(install, env=env, capture_output=True, timeout=900, check=True)


def ensure_chromium() -> str:
    """The path of a Chromium binary, installing Debian's package first if there is none."""
    found = next((path for name in BINARIES if (path := shutil.which(name))), None)
    if found:
        return found
    _apt_install("chromium")
    found = next((path for name in BINARIES if (path := shutil.which(name))), None)
    if found is None:
        raise RuntimeError("apt-get installed chromium but no binary is on PATH")
    return found


# Debian's smallest font covering Chinese (~7 MB; fonts-noto-cjk, the usual desktop one, is ~60 MB to fetch).
CJK_FONT_PACKAGE = "fonts-wqy-zenhei"


def chinese_font_families() -> set[str]:
    """The families of the installed fonts that fontconfig says cover Chinese (``fc-list :lang=zh``), installing
    Debian's ``fonts-wqy-zenhei`` first if there are none, so Chinese text is drawn in glyphs, not as boxes."""
    families = _fc_families()
    if not families:
        _apt_install(CJK_FONT_PACKAGE)
        families = _fc_families()
        if not families:
            raise RuntimeError(f"apt-get installed {CJK_FONT_PACKAGE} but fontconfig lists no Chinese font")
    return families


def _fc_families() -> set[str]:
    """Every name of every font covering Chinese: ``fc-list`` gives each font's names comma-separated
    (``WenQuanYi Zen Hei,文泉驛正黑,文泉驿正黑``)."""
    listed = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=60,
                            check=True).stdout
    return {name.strip() for line in listed.splitlines() for name in line.split(",") if name.strip()}


class HeadlessChromium:
    """``async with HeadlessChromium(binary, profile_dir) as browser: await browser.navigate(url)``."""

    def __init__(self, binary: str, profile_dir: Path, *, width: int = 1280, height: int = 900) -> None:
        self.binary = binary
        self.profile_dir = profile_dir
        self.size = (width, height)
        self._process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        log = self.profile_dir / "chromium.log"
        with log.open("wb") as sink:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            self._process = await asyncio.create_subprocess_exec(
                self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={self.profile_dir}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--window-size={self.size[0]},{self.size[1]}", "about:blank",
                stdout=sink, stderr=sink)
        try:
            browser_url = await self._devtools_url(log)
            self._http = aiohttp.ClientSession()
            http_base = browser_url.replace("ws://", "http://").split("/devtools/")[0]
            async with self._http.get(f"{http_base}/json/list") as response:
                pages = [t for t in await response.json() if t.get("type") == "page"]
            self._socket = await self._http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
            await self.send("Page.enable")
            await self.send("Runtime.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._socket is not None:
            await self._socket.close()
        if self._http is not None:
            await self._http.close()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def _devtools_url(self, log: Path, within: float = 60.0) -> str:
        async with asyncio.timeout(within):
            while True:
                text = await asyncio.to_thread(log.read_text, errors="replace")
                match = DEVTOOLS_LINE.search(text)
                if match:
                    return match.group(1)
                if self._process is not None and self._process.returncode is not None:
                    raise RuntimeError(f"chromium exited early: {text[-2000:]}")
                await asyncio.sleep(0.1)

    async def _read(self) -> None:
        assert self._socket is not None
        async for message in self._socket:
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self._events.put_nowait(data)

    async def send(self, method: str, within: float = 30.0, **params: Any) -> dict[str, Any]:
        """One CDP command; its ``result``, or RuntimeError with the browser's error."""
        assert self._socket is not None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._socket.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, within)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def navigate(self, url: str, within: float = 30.0) -> None:
        """Open ``url`` and wait for its load event."""
        while not self._events.empty():
            self._events.get_nowait()
        await self.send("Page.navigate", url=url)
        await self.wait_for_event("Page.loadEventFired", within)

    async def wait_for_event(self, method: str, within: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                event = await self._events.get()
                if event["method"] == method:
                    return event

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, expression: str, within: float, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; its value. TimeoutError after ``within`` seconds."""
        async with asyncio.timeout(within):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(interval)
            return value

    async def screenshot(self, path: Path) -> Path:
        """Save the page as PNG at ``path``."""
        result = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write, path, base64.b64decode(result["data"]))
        return path


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

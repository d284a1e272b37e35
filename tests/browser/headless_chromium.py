"""Debian's Chromium, headless, driven over the DevTools protocol: open a page, act on it, read the rendered DOM.

The browser runs with the flags that keep it off the network on its own (no background networking,
component updates or sync), a fresh profile, and every request that leaves 127.0.0.1 sent to a dead proxy;
``offline=True`` also cuts the page's own network (DevTools' offline emulation), for pages that must render
from what they carry. Waits are on conditions in the page, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp
import psutil

CHROMIUM = shutil.which("chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--proxy-server=127.0.0.1:9",  # nothing listens there: any request off this machine fails (loopback bypasses)
    "--window-size=1400,900",
    "--remote-debugging-port=0",
)


class HeadlessChromium:
    """One browser with one page; use as a context manager (the browser and its children are killed by pid)."""

    def __init__(self, profile: Path):
        assert CHROMIUM, "chromium is not installed (bash .ci/install installs Debian's package)"
        profile.mkdir(parents=True)
        self.profile = profile
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._session: Optional[aiohttp.ClientSession] = None
        self._socket: Optional[aiohttp.ClientWebSocketResponse] = None
        try:
            self._loop.run_until_complete(self._connect())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self, url: str, *, offline: bool = False) -> None:
        self.command("Network.enable")
        self.command(
            "Network.emulateNetworkConditions",
            offline=offline,
            latency=0,
            downloadThroughput=-1,
            uploadThroughput=-1,
        )
        self.command("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        answer = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression!r} raised in the page: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate ``expression`` until it is truthy (an exception counts as not yet: the page may be loading);
        fail with the page's text if it never is."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(
                f"(() => {{ try {{ const value = ({expression}); return value instanceof Node ? true : value; }} "
                "catch (error) { return null; } })()"
            )
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""

                raise AssertionError(f"{expression} not true in {timeout}s; the page shows:\n{text[:3000]}")
            time.sleep(0.25)

    def rendered_dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def command(self, method: str, **params: Any) -> dict:
        return self._loop.run_until_complete(self._command(method, params))

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for process in [*children, self.process]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        self.process.wait(30)

    async def _connect(self, timeout: float = 60.0) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.process.poll() is None, f"chromium exited with {self.process.returncode}"
            assert time.monotonic() < deadline, f"chromium wrote no DevTools port in {timeout}s"
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = json.loads(await response.text())
        page = next(target for target in targets if target["type"] == "page")
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _command(self, method: str, params: dict) -> dict:
        assert self._socket is not None
        call_id = next(self._ids)
        await self._socket.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._socket.receive(timeout=120)).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})

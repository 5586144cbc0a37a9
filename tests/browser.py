"""Headless Chromium driven over the Chrome DevTools Protocol (a WebSocket we already depend
on): no driver binary, no extra package. Debian's ``chromium`` (.ci/run installs it)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
)


class Page:
    """One tab (or, with no session, the browser): ``call`` a CDP method, ``evaluate``
    JavaScript, take a ``screenshot``."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        self.ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)  # the latest, unread

    async def call(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        cid = next(self.ids)
        message: dict[str, Any] = {"id": cid, "method": method, "params": params}
        if self.session:  # else a browser-level command
            message["sessionId"] = self.session
        await self.ws.send(json.dumps(message))
        async with asyncio.timeout(timeout):
            while True:
                answer = json.loads(await self.ws.recv())
                if answer.get("id") == cid:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    result: dict[str, Any] = answer.get("result", {})
                    return result
                self.events.append(answer)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, data)


@contextlib.asynccontextmanager
async def chromium_page(width: int = 1440, height: int = 1100) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab; the browser and every process it started
    (its own process group) are killed after, then its profile folder removed."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            async with asyncio.timeout(30):
                while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                    assert proc.returncode is None, f"chromium exited with {proc.returncode}"
                    await asyncio.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            async with connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20) as ws:
                browser = Page(ws, "")
                target = await browser.call("Target.createTarget", url="about:blank")
                attached = await browser.call(
                    "Target.attachToTarget", targetId=target["targetId"], flatten=True
                )
                page = Page(ws, attached["sessionId"])
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its renderers and helpers too
            await proc.wait()
    finally:
        await _remove(Path(profile))


async def _remove(folder: Path) -> None:
    """Remove ``folder``; a helper of the killed browser may still be writing in it for a
    moment (it is killed, not yet reaped), so try again for up to 5 s."""
    async with asyncio.timeout(5):
        while True:
            try:
                await asyncio.to_thread(shutil.rmtree, folder)
                return
            except FileNotFoundError:
                return
            except OSError:
                await asyncio.sleep(0.1)

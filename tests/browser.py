"""A tiny headless-Chromium driver over the DevTools protocol (CDP), for browser tests.

Debian's ``/usr/bin/chromium`` is launched with ``--remote-debugging-port=0``; the DevTools
WebSocket URL is read from its stderr and spoken to with trio-websocket (no Playwright, no
browser download)::

    async with launch_browser() as browser:
        page = await browser.new_page()            # its own browser context: own localStorage
        await page.goto("http://127.0.0.1:3000/")
        await page.wait_for("window.cdcddp && window.cdcddp.client.status === 'connected'")
        print(await page.evaluate("document.title"))
        await page.screenshot(Path("/tmp/shot.png"))

``evaluate`` awaits promises and returns the value (JSON-able); a JavaScript exception raises
``JavaScriptError`` with its description. ``page.console`` and ``page.errors`` collect console
output and uncaught exceptions for failure messages.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket

__all__ = ["Browser", "BrowserError", "JavaScriptError", "Page", "find_chromium",
           "launch_browser"]

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_DEVTOOLS_URL = re.compile(rb"DevTools listening on (ws://\S+)")
MAX_CDP_MESSAGE = 64 * 1_048_576  # screenshots arrive base64 in one message


class BrowserError(RuntimeError):
    """The browser failed to start, or a DevTools command returned an error."""


class JavaScriptError(BrowserError):
    """An expression evaluated in a page threw (or its promise rejected)."""


def find_chromium() -> str | None:
    explicit = os.environ.get("CDCDDP_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


class _Connection:
    """One CDP WebSocket: commands by id, events routed to the page of their session."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.pages: dict[str, Page] = {}
        self.closed = False

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session_id: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        if self.closed:
            raise BrowserError("the browser connection is closed")
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        done = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[message_id] = (done, slot)
        try:
            await self.ws.send_message(json.dumps(message))
            with trio.fail_after(timeout):
                await done.wait()
        finally:
            self._waiting.pop(message_id, None)
        if not slot:
            raise BrowserError(f"{method}: the browser connection closed")
        reply = slot[0]
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    async def read_loop(self) -> None:
        try:
            while True:
                message = json.loads(await self.ws.get_message())
                if "id" in message:
                    waiting = self._waiting.get(message["id"])
                    if waiting is not None:
                        waiting[1].append(message)
                        waiting[0].set()
                elif (page := self.pages.get(message.get("sessionId", ""))) is not None:
                    page._on_event(message["method"], message.get("params", {}))
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed = True
            for done, _ in self._waiting.values():
                done.set()


class Page:
    """One tab (target) attached with a flat session."""

    def __init__(self, connection: _Connection, target_id: str, session_id: str,
                 context_id: str | None) -> None:
        self._connection = connection
        self.target_id = target_id
        self.session_id = session_id
        self.context_id = context_id
        self.console: list[str] = []
        self.errors: list[str] = []
        self._loaded = trio.Event()

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> dict[str, Any]:
        return await self._connection.send(method, params, session_id=self.session_id,
                                           timeout=timeout)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", "")))
                            for arg in params.get("args", []))
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            self.errors.append(exception.get("description") or details.get("text", "?"))

    async def goto(self, url: str, *, timeout: float = 15.0) -> None:
        """Navigate and wait for the load event."""
        self._loaded = trio.Event()
        with trio.fail_after(timeout):
            result = await self.send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"navigating to {url}: {result['errorText']}")
            await self._loaded.wait()

    async def reload(self, *, timeout: float = 15.0) -> None:
        """Reload the page (a new document even if only the fragment would differ)."""
        self._loaded = trio.Event()
        with trio.fail_after(timeout):
            await self.send("Page.reload", {"ignoreCache": True})
            await self._loaded.wait()

    async def evaluate(self, expression: str, *, timeout: float = 15.0) -> Any:
        """Evaluate ``expression`` in the page; promises are awaited; returns the JSON value."""
        result = await self.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True,
            "userGesture": True}, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exception = details.get("exception", {})
            text = exception.get("description") or exception.get("value") or details.get("text")
            raise JavaScriptError(f"{text}\n  in: {expression[:300]}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0,
                       interval_ms: int = 20) -> Any:
        """Poll ``expression`` inside the page until it is truthy; return its value.

        Polling runs in the page (one round trip), so a condition is seen within ~20 ms.
        """
        # The expression is inlined into a function so that it is re-evaluated each poll.
        poller = f"""new Promise((resolve, reject) => {{
            const deadline = Date.now() + {int(timeout * 1000)};
            const check = () => (({expression}));
            const poll = () => {{
                let value, failure;
                try {{ value = check(); }} catch (e) {{ failure = e; }}
                if (value) {{ resolve(value); return; }}
                if (Date.now() > deadline) {{
                    const status = document.getElementById("status");
                    reject(new Error("timed out waiting for: " + {json.dumps(expression)}
                        + (failure ? " (last error: " + failure + ")" : "")
                        + (status ? " (status line: " + JSON.stringify(status.textContent) + ")"
                                  : "")));
                    return;
                }}
                setTimeout(poll, {interval_ms});
            }};
            poll();
        }})"""
        return await self.evaluate(poller, timeout=timeout + 5)

    async def screenshot(self, path: Path) -> Path:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def close(self) -> None:
        if self._connection.closed:
            return
        await self._connection.send("Target.closeTarget", {"targetId": self.target_id})
        if self.context_id is not None:
            await self._connection.send("Target.disposeBrowserContext",
                                        {"browserContextId": self.context_id})
        self._connection.pages.pop(self.session_id, None)


class Browser:
    def __init__(self, connection: _Connection, process: trio.Process) -> None:
        self._connection = connection
        self.process = process

    async def new_page(self, url: str | None = None, *, isolated: bool = True,
                       width: int = 1100, height: int = 760) -> Page:
        """A new tab; ``isolated`` gives it its own browser context (cookies, localStorage),
        as a second browser would have."""
        context_id: str | None = None
        params: dict[str, Any] = {"url": "about:blank", "width": width, "height": height}
        if isolated:
            created = await self._connection.send("Target.createBrowserContext",
                                                  {"disposeOnDetach": True})
            context_id = created["browserContextId"]
            params["browserContextId"] = context_id
        target_id = (await self._connection.send("Target.createTarget", params))["targetId"]
        attached = await self._connection.send("Target.attachToTarget",
                                               {"targetId": target_id, "flatten": True})
        page = Page(self._connection, target_id, attached["sessionId"], context_id)
        self._connection.pages[page.session_id] = page
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        if url is not None:
            await page.goto(url)
        return page


@asynccontextmanager
async def launch_browser(*, executable: str | None = None, startup_timeout: float = 20.0
                         ) -> AsyncIterator[Browser]:
    """Start headless Chromium in a throwaway profile; close it (and the profile) on exit."""
    executable = executable or find_chromium()
    if executable is None:
        raise BrowserError("Chromium not found: apt-get install chromium (tests/run does)")
    profile = tempfile.mkdtemp(prefix="cdcddp-chromium-")
    args = [
        executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
        # Pages in other contexts must keep running timers and sockets at full speed.
        "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
        "--disable-backgrounding-occluded-windows",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
    ]
    stderr_tail = bytearray()  # kept for the error message if startup fails
    try:
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            assert process.stderr is not None
            try:
                url = await _devtools_url(process.stderr, stderr_tail, startup_timeout)
                # Keep draining stderr: a full pipe would block the browser.
                nursery.start_soon(_drain, process.stderr)
                async with trio_websocket.open_websocket_url(
                        url, max_message_size=MAX_CDP_MESSAGE) as ws:
                    connection = _Connection(ws)
                    nursery.start_soon(connection.read_loop)
                    try:
                        yield Browser(connection, process)
                    finally:
                        # Shielded: a test that cancels its nursery must not leak a browser.
                        with trio.CancelScope(shield=True), trio.move_on_after(2), \
                                contextlib.suppress(BrowserError, trio.TooSlowError):
                            await connection.send("Browser.close", timeout=2)
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(process)
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def _stop(process: trio.Process) -> None:
    """Wait briefly for the browser to exit (after Browser.close), then terminate, then kill."""
    for stop in (None, process.terminate, process.kill):
        if process.returncode is not None:
            return
        if stop is not None:
            stop()
        with trio.move_on_after(3):
            await process.wait()


async def _devtools_url(stderr: trio.abc.ReceiveStream, tail: bytearray, timeout: float
                        ) -> str:
    with trio.move_on_after(timeout):
        while chunk := await stderr.receive_some(65536):
            tail += chunk
            if match := _DEVTOOLS_URL.search(tail):
                return match.group(1).decode()
    raise BrowserError("Chromium did not report its DevTools URL; stderr:\n"
                       + tail[-4000:].decode(errors="replace"))


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        while await stream.receive_some(65536):
            pass


@asynccontextmanager
async def diagnosed(*pages: Page, directory: Path | None = None) -> AsyncIterator[None]:
    """On failure inside the block, add each page's screenshot path, status line, console and
    uncaught errors to the exception (a failing browser test should say what it saw)."""
    try:
        yield
    except Exception as exc:  # not Cancelled: nothing may be awaited then
        notes: list[str] = []
        directory = directory or Path(tempfile.mkdtemp(prefix="cdcddp-browser-"))
        for index, page in enumerate(pages):
            label = f"page {index}"
            with trio.move_on_after(5) as scope, contextlib.suppress(Exception):
                shot = await page.screenshot(directory / f"page-{index}.png")
                status = await page.evaluate(
                    "document.getElementById('status')?.textContent ?? ''")
                notes.append(f"{label}: screenshot {shot}; status line {status!r}")
            if scope.cancelled_caught:
                notes.append(f"{label}: no screenshot (timed out)")
            notes.extend(f"{label} console: {line}" for line in page.console[-20:])
            notes.extend(f"{label} uncaught: {line}" for line in page.errors[-10:])
        for note in notes:
            exc.add_note(note)
        raise

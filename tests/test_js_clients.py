"""Real Meteor DDP clients from npm (simpleddp, ddp.js, asteroid, on the `ws` WebSocket)
against a real cdcddp server: echo, Meteor error shapes, 500 without internals, 404s, a fixed
publication's documents, unsubscribe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from cdcddp.client import connect
from tests.server_support import running_server

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")


async def run_node(script: str, url: str) -> tuple[int, str]:
    assert NODE is not None, "node is required (tests/run installs it)"
    assert (JS_DIR / "node_modules" / "ws").is_dir(), "run `npm ci` in tests/js (tests/run does)"
    with trio.fail_after(30):
        done = await trio.run_process([NODE, str(JS_DIR / script), url], cwd=JS_DIR,
                                      capture_stdout=True, capture_stderr=True, check=False)
    output = done.stdout.decode() + done.stderr.decode()
    return done.returncode, output


@pytest.mark.parametrize("script", ["simpleddp_check.js", "ddpjs_check.js", "asteroid_check.js"])
async def test_npm_client_against_server(script: str) -> None:
    async with running_server() as server:
        code, output = await run_node(script, server.ws_url)
        assert code == 0, output
        assert "checks passed" in output
        # the client's disconnect left the server serving others
        async with connect(server.ws_url) as client:
            assert await client.call("echo", script) == [script]

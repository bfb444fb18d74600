"""The HTTP front: pure request-head parsing and routing, then plain routes over real sockets."""

from __future__ import annotations

import json

import pytest
import trio

from cdcddp.server import http
from tests.server_support import fast_config, get, http_request, running_server

# ---- pure parsing -----------------------------------------------------------------------------


def test_parse_request_head() -> None:
    head = http.parse_request_head(
        b"GET /sockjs/info%2F?t=1 HTTP/1.1\r\nHost: x\r\nOrigin:  http://o.example \r\n"
        b"Connection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n")
    assert (head.method, head.path, head.query, head.version) == (
        "GET", "/sockjs/info/", "t=1", "HTTP/1.1")
    assert head.header("ORIGIN") == "http://o.example"
    assert http.is_websocket_upgrade(head)


@pytest.mark.parametrize("raw", [
    b"GET /\r\n\r\n",
    b"GET / HTTP/2\r\n\r\n",
    b"GET nopath HTTP/1.1\r\n\r\n",
    b"G(T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
    b"\r\n\r\n",
])
def test_parse_rejects_malformed_heads(raw: bytes) -> None:
    with pytest.raises(http.BadRequest) as info:
        http.parse_request_head(raw)
    assert info.value.status == 400


def test_find_head_end_bounds_the_head() -> None:
    assert http.find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert http.find_head_end(b"GET / HTTP/1.1\r\n\r\nbody") == 18
    with pytest.raises(http.BadRequest) as info:
        http.find_head_end(b"x" * 20_000, max_head_bytes=16_384)
    assert info.value.status == 431


@pytest.mark.parametrize(("path", "kind"), [
    ("/websocket", http.RouteKind.RAW_WEBSOCKET),
    ("/websocket/", http.RouteKind.RAW_WEBSOCKET),
    ("/sockjs/123/abcdefgh/websocket", http.RouteKind.SOCKJS_WEBSOCKET),
    ("/sockjs/info", http.RouteKind.SOCKJS_INFO),
    ("/healthz", http.RouteKind.HEALTH),
    ("/sockjs/1.2/abc/websocket", http.RouteKind.OTHER),
    ("/favicon.ico", http.RouteKind.OTHER),
])
def test_route(path: str, kind: http.RouteKind) -> None:
    head = http.parse_request_head(f"GET {path}?x=1 HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    assert http.route(head) is kind


# ---- over real sockets ------------------------------------------------------------------------


async def test_sockjs_info_with_cors() -> None:
    async with running_server() as server:
        status, headers, body = await get(server.port, "/sockjs/info?t=123",
                                          {"Origin": "http://o.example"})
        assert status == 200
        info = json.loads(body)
        assert info["websocket"] is True and info["cookie_needed"] is False
        assert info["origins"] == ["*:*"] and isinstance(info["entropy"], int)
        assert headers["access-control-allow-origin"] == "http://o.example"
        assert headers["access-control-allow-credentials"] == "true"
        assert "no-cache" in headers["cache-control"]
        assert headers["content-type"].startswith("application/json")
        _, _, again = await get(server.port, "/sockjs/info")
        assert json.loads(again)["entropy"] != info["entropy"]  # fresh each time (≈1 in 2^32)

        status, headers, body = await get(server.port, "/sockjs/info", {"Origin": "http://x"},
                                          method="OPTIONS")
        assert status == 204 and body == b""
        assert headers["access-control-allow-methods"] == "OPTIONS, GET"
        assert headers["access-control-allow-origin"] == "http://x"


async def test_health_greeting_and_unknown_routes() -> None:
    async with running_server() as server:
        assert (await get(server.port, "/healthz"))[:1] == (200,)
        status, _, body = await get(server.port, "/sockjs")
        assert (status, body) == (200, b"Welcome to SockJS!\n")
        assert (await get(server.port, "/nope"))[0] == 404
        assert (await get(server.port, "/healthz", method="POST"))[0] == 405
        status, headers, body = await get(server.port, "/healthz", method="HEAD")
        assert status == 200 and body == b"" and headers["content-length"] == "3"
        # a plain GET on a WebSocket path is not an upgrade
        assert (await get(server.port, "/websocket"))[0] == 400


async def test_malformed_and_oversized_heads_get_4xx_and_server_survives() -> None:
    async with running_server() as server:
        assert (await http_request(server.port, b"garbage garbage\r\n\r\n"))[0] == 400
        assert (await http_request(server.port, b"\x00\xff\xfe\r\n\r\n"))[0] == 400
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await http_request(server.port, big))[0] == 431
        upgrade = ("GET /websocket HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 8\r\n\r\n")
        assert (await http_request(server.port, upgrade.encode()))[0] == 400
        # an upgrade to an unknown path is a 404, not a WebSocket
        assert (await http_request(server.port,
                                   upgrade.replace("/websocket", "/other")
                                   .replace("Version: 8", "Version: 13").encode()))[0] == 404
        assert (await get(server.port, "/healthz"))[0] == 200


async def test_slow_head_times_out_without_blocking_others() -> None:
    async with running_server(config=fast_config(head_timeout=0.5)) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # and never finish the head
            with trio.fail_after(1):
                assert (await get(server.port, "/healthz"))[0] == 200
            with trio.fail_after(3):
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 408")


async def test_static_hook() -> None:
    def static(head: http.RequestHead) -> http.HttpResponse | None:
        if head.path == "/hello.txt":
            return http.text_response(200, "hello\n")
        return None

    async with running_server(config=fast_config(static=static)) as server:
        assert (await get(server.port, "/hello.txt"))[::2] == (200, b"hello\n")
        assert (await get(server.port, "/other.txt"))[0] == 404

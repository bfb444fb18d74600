"""Static files over a real socket: content types, index, HEAD, ETag/304, cache headers, and
every way out of the directory refused with 404."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdcddp.server import http
from cdcddp.server.static import DEFAULT_DIRECTORY, StaticFiles
from tests.server_support import fast_config, get, http_request, running_server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """root/ (served) next to a secret file and a secret directory that must stay private."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>home</title>")
    (root / "app.js").write_text("export const x = 1;\n")
    (root / "style.css").write_text("body{}\n")
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "logo.png").write_bytes(PNG)
    (root / "data.json").write_text('{"a": 1}')
    (root / "blob.bin").write_bytes(b"\x00\x01")
    (root / "sub" / "index.html").write_text("<p>sub</p>")
    (root / "sub" / "page.html").write_text("<p>page</p>")
    (root / ".env").write_text("SECRET=1")
    (tmp_path / "secret.txt").write_text("top secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "file.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "leak.txt")
    os.symlink(tmp_path / "outside", root / "leakdir")
    os.symlink(root / "app.js", root / "alias.js")  # a link that stays inside is fine
    os.mkfifo(root / "fifo.js")
    return root


CONTENT_TYPES = [
    ("/", "text/html; charset=utf-8", b"<title>home</title>"),
    ("/index.html", "text/html; charset=utf-8", b"<title>home</title>"),
    ("/app.js", "text/javascript; charset=utf-8", b"export const x"),
    ("/style.css", "text/css; charset=utf-8", b"body{}"),
    ("/logo.svg", "image/svg+xml", b"<svg"),
    ("/logo.png", "image/png", PNG),
    ("/data.json", "application/json", b'{"a": 1}'),
    ("/blob.bin", "application/octet-stream", b"\x00\x01"),
    ("/sub/", "text/html; charset=utf-8", b"<p>sub</p>"),
    ("/sub/page.html", "text/html; charset=utf-8", b"<p>page</p>"),
    ("/alias.js", "text/javascript; charset=utf-8", b"export const x"),
    ("/app.js?v=3", "text/javascript; charset=utf-8", b"export const x"),
    ("/%61pp.js", "text/javascript; charset=utf-8", b"export const x"),
]


async def test_files_with_content_types_and_cache_headers(site: Path) -> None:
    async with running_server(config=fast_config(static=StaticFiles(site))) as server:
        for path, content_type, start in CONTENT_TYPES:
            status, headers, body = await get(server.port, path)
            assert status == 200, path
            assert headers["content-type"] == content_type, path
            assert start in body, path
            assert headers["content-length"] == str(len(body))
            assert headers["cache-control"] == "no-cache"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["etag"].startswith('"') and headers["last-modified"].endswith("GMT")
            assert ("content-security-policy" in headers) == content_type.startswith("text/html")


async def test_head_etag_and_methods(site: Path) -> None:
    async with running_server(config=fast_config(static=StaticFiles(site))) as server:
        status, headers, body = await get(server.port, "/app.js")
        status_head, headers_head, body_head = await get(server.port, "/app.js", method="HEAD")
        assert (status_head, body_head) == (200, b"")
        assert headers_head["content-length"] == str(len(body))
        assert headers_head["etag"] == headers["etag"]

        etag = headers["etag"]
        for validator in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            status, headers_304, body = await get(server.port, "/app.js",
                                                  {"If-None-Match": validator})
            assert (status, body) == (304, b""), validator
            assert headers_304["etag"] == etag
        assert (await get(server.port, "/app.js", {"If-None-Match": '"other"'}))[0] == 200

        # A changed file gets a new ETag (the cache is keyed by size and mtime).
        (site / "app.js").write_text("export const x = 2; // changed\n")
        status, headers, body = await get(server.port, "/app.js", {"If-None-Match": etag})
        assert status == 200 and b"changed" in body and headers["etag"] != etag

        status, headers, _ = await get(server.port, "/app.js", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        # The hook itself refuses other methods too, when called without the front.
        head = http.parse_request_head(b"DELETE /app.js HTTP/1.1\r\nHost: x\r\n\r\n")
        response = StaticFiles(site)(head)
        assert response is not None and response.status == 405


TRAVERSALS = [
    "/../secret.txt",
    "/sub/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/%2e%2e%2fsecret.txt",  # an encoded slash is decoded before splitting: still refused
    "/..%5csecret.txt",
    "/sub\\..\\..\\secret.txt",
    "//etc/passwd",
    "/etc/passwd",
    "/C:/secret.txt",
    "/app.js%00.html",
    "/./app.js",
    "/.env",
    "/leak.txt",  # a symlink pointing out of the directory
    "/leakdir/file.txt",
    "/sub",  # a directory without the trailing slash
    "/fifo.js",
    "/missing.js",
    "/sub/missing/",
]


async def test_traversal_and_missing_are_404(site: Path) -> None:
    async with running_server(config=fast_config(static=StaticFiles(site))) as server:
        for path in TRAVERSALS:
            status, _, body = await get(server.port, path)
            assert status == 404, path
            assert b"secret" not in body and b"outside" not in body, path
        # Raw bytes, in case a client library would normalise "..": the server must not.
        status, _, body = await http_request(
            server.port, b"GET /../../secret.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404 and b"top secret" not in body


async def test_fall_through_lets_the_front_answer(site: Path) -> None:
    static = StaticFiles(site, fall_through=True)
    head = http.parse_request_head(b"GET /missing.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert static(head) is None
    refused = http.parse_request_head(b"GET /../secret.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    response = static(refused)
    assert response is not None and response.status == 404
    async with running_server(config=fast_config(static=static)) as server:
        assert (await get(server.port, "/missing.js"))[0] == 404
        assert (await get(server.port, "/healthz"))[0] == 200  # the front's routes still win


async def test_default_directory_is_the_todos_page() -> None:
    assert (DEFAULT_DIRECTORY / "index.html").is_file()
    async with running_server(config=fast_config(static=StaticFiles())) as server:
        status, headers, body = await get(server.port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b'src="/app.js"' in body
        for path in ("/app.js", "/ddp-client.js"):
            status, headers, body = await get(server.port, path)
            assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
        status, headers, _ = await get(server.port, "/style.css")
        assert status == 200 and headers["content-type"] == "text/css; charset=utf-8"

"""Static files for the HTTP front (the live Todos page in ``cdcddp/static`` by default).

``StaticFiles(directory)`` is a request → response function that plugs into the front's static
hook (``ServerConfig(static=StaticFiles())``). It serves regular files under the directory for
GET and HEAD, ``index.html`` for ``/`` (and for ``/sub/``), and answers 404 for anything it will
not serve: ``..`` or ``.``-prefixed segments (also when percent-encoded — the front decodes the
path once), backslashes, NUL, absolute or drive-style paths, and symlinks that resolve outside
the directory. Every response carries ``Cache-Control: no-cache`` plus an ``ETag``, so browsers
revalidate (a cheap 304) and never run a stale ``app.js`` against a newer server.

Files are small and local, so they are read synchronously inside the hook; the contents are
cached keyed by (inode, size, mtime), so a repeated request costs one ``stat``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Final

from cdcddp.server.http import HttpResponse, RequestHead, text_response

__all__ = ["CONTENT_TYPES", "DEFAULT_DIRECTORY", "StaticFiles"]

DEFAULT_DIRECTORY: Final = Path(__file__).resolve().parent.parent / "static"

CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
    ".webmanifest": "application/manifest+json",
}
FALLBACK_CONTENT_TYPE: Final = "application/octet-stream"

# The page talks only to its own origin (the DDP WebSocket included: CSP3 'self' covers ws/wss
# on the same host); inline scripts and framing are refused.
PAGE_CSP: Final = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                   "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

MAX_FILE_BYTES: Final = 8 * 1_048_576  # a static asset larger than this is a deployment mistake


@dataclass(frozen=True)
class _Cached:
    key: tuple[int, int, int, int]  # (device, inode, size, mtime_ns)
    body: bytes
    etag: str
    last_modified: str


class StaticFiles:
    """Serve the files under ``directory``; a ``StaticHandler`` for ``ServerConfig.static``.

    ``fall_through=True`` returns None instead of 404 for missing files, so another hook (or
    the front's own 404) can answer; refused paths are always 404.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 index: str = "index.html", fall_through: bool = False) -> None:
        self.root = Path(directory if directory is not None else DEFAULT_DIRECTORY).resolve(
            strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(str(self.root))
        self.index = index
        self.fall_through = fall_through
        self._cache: dict[Path, _Cached] = {}

    def __call__(self, head: RequestHead) -> HttpResponse | None:
        if head.method not in ("GET", "HEAD"):
            return text_response(405, "Method Not Allowed\n", [("Allow", "GET, HEAD")])
        target = self.resolve(head.path)
        if target is None:
            return _not_found()
        try:
            cached = self._load(target)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None if self.fall_through else _not_found()
        except OSError:
            return _not_found()  # unreadable, too large, a fifo...: nothing to serve
        headers = [
            ("Content-Type", CONTENT_TYPES.get(target.suffix.lower(), FALLBACK_CONTENT_TYPE)),
            ("Cache-Control", "no-cache"),
            ("ETag", cached.etag),
            ("Last-Modified", cached.last_modified),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if target.suffix.lower() == ".html":
            headers.append(("Content-Security-Policy", PAGE_CSP))
        if _etag_matches(head.header("if-none-match"), cached.etag):
            # A 304 has no body; its Content-Length, if sent, must be the 200's (RFC 9110 8.6).
            return HttpResponse(304, [*headers, ("Content-Length", str(len(cached.body)))])
        return HttpResponse(200, headers, cached.body)

    def resolve(self, url_path: str) -> Path | None:
        """The file a (percent-decoded) URL path names, or None if the path is refused.

        The result is inside the root after resolving symlinks; it may not exist.
        """
        if not url_path.startswith("/") or "\x00" in url_path or "\\" in url_path:
            return None
        segments = url_path[1:].split("/")
        if segments[-1] == "":
            segments[-1] = self.index  # "/" and "/dir/" name the directory's index
        for segment in segments:
            # "", ".", ".." and hidden files; ":" rules out drive letters and NTFS streams.
            if not segment or segment.startswith(".") or ":" in segment:
                return None
        candidate = self.root.joinpath(*segments)
        try:
            resolved = candidate.resolve(strict=False)
        except (OSError, RuntimeError):  # symlink loops
            return None
        if resolved != self.root and self.root not in resolved.parents:
            return None  # a symlink pointing out of the directory
        return resolved

    def _load(self, path: Path) -> _Cached:
        # O_NOFOLLOW is belt and braces: resolve() already followed every link to its target.
        # O_NONBLOCK: opening a fifo must not hang the server.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IsADirectoryError(str(path))
            if info.st_size > MAX_FILE_BYTES:
                raise OSError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            cached = self._cache.get(path)
            if cached is not None and cached.key == key:
                return cached
            with os.fdopen(fd, "rb", closefd=False) as file:
                body = file.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        cached = _Cached(key, body, etag, formatdate(info.st_mtime, usegmt=True))
        self._cache[path] = cached
        return cached


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    # Weak comparison, as RFC 9110 asks for If-None-Match.
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags


def _not_found() -> HttpResponse:
    return text_response(404, "Not Found\n")

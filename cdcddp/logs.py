"""Logging set-up: plain text for a terminal, JSON lines for a log collector; secrets masked.

    setup_logging("info", json=True)

Every record leaving the handler installed here goes through :func:`mask_secrets`, so a DSN
(or anything shaped like ``password=...``) logged by any module, a library or an exception
message reaches the output as ``password=****``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from typing import Any, TextIO

import orjson

MASK = "****"

# key=value DSN parts and similar: password='it''s' / password=xyz / token = abc
_KV_SECRET = re.compile(
    r"""(?P<key>\b(?:password|passwd|pwd|secret|token|api_?key)\b\s*=\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.)*"|[^\s,;&]+)""",
    re.IGNORECASE)
# URI userinfo: postgresql://user:secret@host/db
_URI_USERINFO = re.compile(r"(?P<key>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<value>[^@\s]*)(?=@)",
                           re.IGNORECASE)
# Key names whose values are secrets wherever they appear (config keys, log extras).
SECRET_KEY = re.compile(r"password|passwd|secret|token|api_?key", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with passwords in DSNs / URIs and ``secret=value`` pairs replaced by ****."""
    if "=" not in text and "://" not in text:
        return text  # the common case: nothing to look at
    text = _URI_USERINFO.sub(lambda m: m["key"] + MASK, text)
    return _KV_SECRET.sub(lambda m: m["key"] + MASK, text)


mask_dsn = mask_secrets  # a DSN is just the main case


# Attributes every LogRecord has; anything else was passed with extra={...}.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def _masked_value(key: str, value: Any) -> Any:
    if SECRET_KEY.search(key):
        return MASK
    if isinstance(value, str):
        return mask_secrets(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = _masked_value(key, value)
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = mask_secrets(record.exc_text)
        if record.stack_info:
            entry["stack"] = mask_secrets(self.formatStack(record.stack_info))
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``cdcddp: LEVEL: logger: message`` with secrets masked (traceback included)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class SecretMaskingFilter(logging.Filter):
    """Masks secrets in a record's message in place, for handlers set up by someone else
    (add it to the handler: a logger's filters do not see records propagated from children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_HANDLER_MARK = "_cdcddp_handler"


def setup_logging(level: str | int = "info", json: bool = False,
                  stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once (calling again replaces cdcddp's handler).

    ``level``: debug / info / warning / error / critical (any case) or a logging number.
    Returns the installed handler.
    """
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log_level: expected debug, info, warning or error, got {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(SecretMaskingFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # trio-websocket logs every frame at DEBUG; keep it quiet unless asked for everything.
    logging.getLogger("trio-websocket").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING)
    return handler

"""Pure parts of the streaming replication protocol: CopyData sub-messages and acknowledgements.

No I/O here. ``parse_copy_data`` turns a CopyData payload into ``XLogData`` or ``Keepalive``;
``build_status_update`` builds the standby status update (``'r'``); ``AckTracker`` decides which
flush position may be confirmed to the server (DESIGN invariant 7).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Final

# Protocol clocks count microseconds since 2000-01-01 00:00:00 UTC.
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000

_XLOGDATA_HEADER = struct.Struct("!QQq")  # dataStart, walEnd, sendTime (after the 'w' byte)
_KEEPALIVE = struct.Struct("!Qq?")  # walEnd, sendTime, reply requested (after the 'k' byte)
_STATUS = struct.Struct("!cQQQq?")  # 'r', write, flush, apply, clock, reply requested
XLOGDATA_PAYLOAD_OFFSET: Final = 1 + _XLOGDATA_HEADER.size  # 25


class ProtocolError(Exception):
    """The server sent a CopyData message this client does not understand."""


@dataclass(slots=True, frozen=True)
class XLogData:
    data_start: int
    wal_end: int
    send_time: int  # µs since the PostgreSQL epoch
    payload: memoryview  # one wal2json document


@dataclass(slots=True, frozen=True)
class Keepalive:
    wal_end: int  # the walsender's sent position: every commit before it was already sent
    send_time: int
    reply_requested: bool


def parse_copy_data(buf: bytes | memoryview) -> XLogData | Keepalive:
    view = memoryview(buf)
    if not view:
        raise ProtocolError("empty CopyData message")
    kind = view[0]
    if kind == 0x77:  # 'w'
        if len(view) < XLOGDATA_PAYLOAD_OFFSET:
            raise ProtocolError(f"XLogData message too short ({len(view)} bytes)")
        start, end, sent = _XLOGDATA_HEADER.unpack_from(view, 1)
        return XLogData(start, end, sent, view[XLOGDATA_PAYLOAD_OFFSET:])
    if kind == 0x6B:  # 'k'
        if len(view) < 1 + _KEEPALIVE.size:
            raise ProtocolError(f"keepalive message too short ({len(view)} bytes)")
        end, sent, reply = _KEEPALIVE.unpack_from(view, 1)
        return Keepalive(end, sent, reply)
    raise ProtocolError(f"unknown CopyData message type {bytes([kind])!r}")


def pg_clock_now() -> int:
    """Now, in µs since the PostgreSQL epoch."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


def build_status_update(write: int, flush: int, apply: int, clock: int | None = None,
                        reply_requested: bool = False) -> bytes:
    """A standby status update; LSNs are "last byte + 1", 0 means unknown."""
    return _STATUS.pack(b"r", write, flush, apply,
                        pg_clock_now() if clock is None else clock, reply_requested)


def parse_status_update(buf: bytes) -> tuple[int, int, int, int, bool]:
    """Inverse of ``build_status_update`` (for tests and diagnostics)."""
    kind, write, flush, apply, clock, reply = _STATUS.unpack(buf)
    if kind != b"r":
        raise ProtocolError(f"not a status update: {kind!r}")
    return write, flush, apply, clock, reply


class AcknowledgeError(ValueError):
    """The consumer acknowledged a position the stream never delivered as a commit."""


class AckTracker:
    """Which flush LSN may be sent to the server.

    The reader reports what it receives (``on_begin``, ``on_commit``, ``on_data``,
    ``on_keepalive``); the consumer reports what it has finished (``acknowledge``).
    ``acknowledged_lsn`` — the flush position to send — only ever covers:

    * the end LSN of commits the consumer acknowledged, and
    * the walEnd of a keepalive received while no transaction was open and every commit
      received before it had been acknowledged (an idle or filtered stream must still confirm,
      or the slot retains WAL for ever).

    Confirming an LSN inside a transaction would make the server re-send the whole
    transaction, and confirming past an unprocessed commit would skip it on restart: neither
    may happen, so a keepalive seen mid-transaction or with commits pending is only used
    once those commits are acknowledged.
    """

    def __init__(self, start_lsn: int = 0) -> None:
        self.received_lsn = start_lsn  # write position: highest dataStart / walEnd seen
        self.acknowledged_lsn = start_lsn  # flush position; never decreases
        self.last_commit_lsn = start_lsn  # end LSN of the last commit received
        self.in_transaction = False
        self._consumer_lsn = start_lsn  # highest commit end the consumer acknowledged
        # (keepalive walEnd, commit end that must be acknowledged before it may be used)
        self._idle_candidate: tuple[int, int] | None = None

    @property
    def pending(self) -> bool:
        """Whether something received is not yet acknowledged by the consumer."""
        return self.in_transaction or self._consumer_lsn < self.last_commit_lsn

    def on_data(self, data_start: int) -> None:
        if data_start > self.received_lsn:
            self.received_lsn = data_start

    def on_begin(self) -> None:
        self.in_transaction = True

    def on_commit(self, end_lsn: int) -> None:
        self.in_transaction = False
        if end_lsn > self.last_commit_lsn:
            self.last_commit_lsn = end_lsn

    def on_keepalive(self, wal_end: int) -> None:
        if wal_end > self.received_lsn:
            self.received_lsn = wal_end
        if self.in_transaction:
            return  # walEnd may lie past this transaction's commit: never usable
        if not self.pending:
            self._advance(wal_end)
        else:
            self._idle_candidate = (wal_end, self.last_commit_lsn)

    def acknowledge(self, end_lsn: int) -> None:
        """The consumer finished the transaction whose Commit had this ``end_lsn``."""
        if end_lsn > self.last_commit_lsn:
            raise AcknowledgeError(
                f"acknowledged LSN {end_lsn:#x} is past the last commit received "
                f"({self.last_commit_lsn:#x}): acknowledge Commit.end_lsn values only")
        if end_lsn > self._consumer_lsn:
            self._consumer_lsn = end_lsn
        self._advance(end_lsn)
        candidate = self._idle_candidate
        if candidate is not None and self._consumer_lsn >= candidate[1]:
            self._idle_candidate = None
            self._advance(candidate[0])

    def on_reconnect(self) -> None:
        """The connection was replaced: a half-received transaction will come again, whole."""
        self.in_transaction = False
        self._idle_candidate = None

    def _advance(self, lsn: int) -> None:
        if lsn > self.acknowledged_lsn:
            self.acknowledged_lsn = lsn

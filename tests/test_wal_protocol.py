"""Pure protocol pieces: CopyData parsing, status updates, acknowledgement bookkeeping."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcddp.wal.protocol import (
    PG_EPOCH_OFFSET_US,
    AcknowledgeError,
    AckTracker,
    Keepalive,
    ProtocolError,
    XLogData,
    build_status_update,
    parse_copy_data,
    parse_status_update,
    pg_clock_now,
)


def test_parse_xlogdata() -> None:
    raw = b"w" + struct.pack("!QQq", 0x1_0000_0010, 0x1_0000_0020, 123) + b'{"action":"B"}'
    msg = parse_copy_data(raw)
    assert isinstance(msg, XLogData)
    assert (msg.data_start, msg.wal_end, msg.send_time) == (0x1_0000_0010, 0x1_0000_0020, 123)
    assert bytes(msg.payload) == b'{"action":"B"}'


def test_parse_keepalive() -> None:
    msg = parse_copy_data(b"k" + struct.pack("!Qq?", 0x2A, -5, True))
    assert msg == Keepalive(0x2A, -5, True)
    assert parse_copy_data(memoryview(b"k" + struct.pack("!Qq?", 1, 2, False))) == Keepalive(
        1, 2, False)


@pytest.mark.parametrize("raw", [b"", b"x123", b"w" + b"\0" * 10, b"k\0\0"])
def test_parse_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_copy_data(raw)


def test_status_update_layout() -> None:
    raw = build_status_update(0x30, 0x20, 0x10, clock=99)
    assert len(raw) == 34 and raw[:1] == b"r"
    assert parse_status_update(raw) == (0x30, 0x20, 0x10, 99, False)


def test_clock_is_pg_epoch_microseconds() -> None:
    import time

    assert abs(pg_clock_now() + PG_EPOCH_OFFSET_US - time.time() * 1e6) < 5e6


def test_ack_covers_only_acknowledged_commits() -> None:
    t = AckTracker(100)
    t.on_begin()
    t.on_data(150)
    t.on_commit(200)
    t.on_begin()
    t.on_commit(300)
    assert t.acknowledged_lsn == 100 and t.received_lsn == 150
    t.on_keepalive(400)  # commits pending: must not move
    assert t.acknowledged_lsn == 100
    t.acknowledge(200)
    assert t.acknowledged_lsn == 200
    t.acknowledge(300)  # now nothing is pending: the keepalive seen earlier becomes usable
    assert t.acknowledged_lsn == 400


def test_idle_keepalive_advances() -> None:
    t = AckTracker(100)
    t.on_keepalive(500)
    assert t.acknowledged_lsn == 500 and t.received_lsn == 500


def test_keepalive_inside_transaction_is_never_used() -> None:
    t = AckTracker(100)
    t.on_begin()
    t.on_keepalive(900)  # may lie past this transaction's commit
    t.on_commit(800)
    t.acknowledge(800)
    assert t.acknowledged_lsn == 800


def test_acknowledging_unreceived_position_is_refused() -> None:
    t = AckTracker(100)
    t.on_begin()
    t.on_commit(200)
    with pytest.raises(AcknowledgeError):
        t.acknowledge(250)
    assert t.acknowledged_lsn == 100


def test_reconnect_forgets_half_transaction_and_candidate() -> None:
    t = AckTracker(100)
    t.on_begin()
    t.on_commit(200)
    t.on_keepalive(300)
    t.on_begin()
    t.on_reconnect()
    assert not t.in_transaction
    t.acknowledge(200)
    assert t.acknowledged_lsn == 200  # the pre-drop keepalive is not trusted any more


@given(st.lists(st.tuples(st.sampled_from(["tx", "ka", "ack"]), st.integers(1, 50)),
                max_size=60))
def test_flush_never_passes_unacknowledged_commit(ops: list[tuple[str, int]]) -> None:
    """Model check: the flush LSN never reaches the start of an unacknowledged commit."""
    t = AckTracker(0)
    lsn = 0
    commits: list[tuple[int, int]] = []  # (commit record start, end)
    acked = 0
    for op, step in ops:
        if op == "tx":
            t.on_begin()
            lsn += step
            t.on_data(lsn)
            start = lsn + 1
            lsn += 2
            t.on_commit(lsn)
            commits.append((start, lsn))
        elif op == "ka":
            lsn += step
            t.on_keepalive(lsn)
        else:
            done = [end for _, end in commits if end > acked]
            if done:
                acked = done[min(step, len(done)) - 1]
                t.acknowledge(acked)
        unacked = [s for s, end in commits if end > acked]
        if unacked:
            assert t.acknowledged_lsn < min(unacked)
        assert t.acknowledged_lsn <= max(lsn, 0)

"""Which stream transactions a snapshot query already saw (DESIGN invariant 2).

A subscription's initial rows come from a REPEATABLE READ transaction that also reads
``pg_current_snapshot()``. A streamed transaction is already reflected in those rows exactly
when its xid is visible in that snapshot: ``xid < xmin``, or ``xid < xmax`` and not in ``xip``.
Those must not be applied again; every other committed transaction must be.

wal2json reports 32-bit xids while ``pg_current_snapshot()`` is in 64-bit (epoch-extended)
``xid8``; a 32-bit xid is widened relative to the snapshot's xmax, which is correct as long as
the transaction is within 2^31 xids of the snapshot — PostgreSQL's own wraparound horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

_XID_SPACE = 1 << 32
_HALF = 1 << 31
_MASK = _XID_SPACE - 1


def later_xid(newest: int | None, xid: int) -> int:
    """The later of two 32-bit xids (``newest`` None: ``xid``), compared modulo 2^32 as
    PostgreSQL compares them: a log of delivered transactions records the newest xid so far
    with each, which only grows along the log (see :meth:`Snapshot.saw_all_up_to`)."""
    if newest is None or (xid - newest) & _MASK < _HALF:
        return xid
    return newest


@dataclass(frozen=True, slots=True)
class Snapshot:
    xmin: int  # 64-bit
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Parse ``pg_snapshot`` text output: ``'xmin:xmax:xip1,xip2'``."""
        try:
            xmin_s, xmax_s, xip_s = text.split(":")
            xip = frozenset(int(x) for x in xip_s.split(",") if x)
            snap = cls(int(xmin_s), int(xmax_s), xip)
        except ValueError as exc:
            raise ValueError(f"not a pg_snapshot: {text!r}") from exc
        if snap.xmin > snap.xmax:
            raise ValueError(f"not a pg_snapshot (xmin > xmax): {text!r}")
        return snap

    def widen(self, xid32: int) -> int:
        """The 64-bit xid of a 32-bit xid that is near this snapshot."""
        epoch_base = self.xmax - (self.xmax % _XID_SPACE)
        full = epoch_base + xid32
        # Pick the candidate nearest to xmax (the xid is within 2^31 of it).
        if full - self.xmax > _HALF:
            full -= _XID_SPACE
        elif self.xmax - full > _HALF:
            full += _XID_SPACE
        return full

    def saw_all_up_to(self, newest_xid32: int) -> bool:
        """True when every xid up to ``newest_xid32`` is below this snapshot's xmin: each of
        those transactions that committed is in its data. Along a log that records the
        newest xid so far with each transaction, this is true of a leading run, found by
        bisection instead of a visibility test each."""
        return self.widen(newest_xid32) < self.xmin

    def is_visible(self, xid32: int) -> bool:
        """True when the committed transaction ``xid32`` is already in this snapshot's data."""
        xid = self.widen(xid32)
        if xid < self.xmin:
            return True
        if xid >= self.xmax:
            return False
        return xid not in self.xip

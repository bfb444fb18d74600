"""A subscribed connection as the live-data engine sees it: its merge box, when it may flush
(``FlushGate``), and the DDP text of its settled documents, encoded once per flush round for
every client that gets the same change (``EncodeCache``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, Final

from cdcddp.ddp import messages
from cdcddp.ddp.mergebox import MergeBox, Transition, transition_op
from cdcddp.ddp.session import ServerSession
from cdcddp.gcpause import gc_paused

__all__ = [
    "MAX_OPS_PER_FLUSH",
    "OPEN_GATE",
    "EncodeCache",
    "FlushGate",
    "LiveClient",
    "SubKey",
    "encode_transition",
    "encode_transitions",
    "transition_message",
]

SubKey = Hashable  # a merge-box subscription id: the DDP sub id, or a universal handle


# ---------------------------------------------------------------------------- encoding once


def transition_message(transition: Transition) -> dict[str, Any] | None:
    """The DDP message for one settled merge-box document (None: nothing to send)."""
    before, after = transition[2], transition[3]
    if before is None and after and "_id" not in after:
        # The common case (every document of a snapshot), without building the op tuple.
        return messages.added_message(transition[0], transition[1], after)
    op = transition_op(transition)
    if op is None:
        return None
    kind = op[0]
    if kind == "added":
        return messages.added_message(op[1], op[2], op[3])  # type: ignore[misc]
    if kind == "changed":
        return messages.changed_message(op[1], op[2], op[3], op[4])  # type: ignore[misc]
    return messages.removed_message(op[1], op[2])


def encode_transition(transition: Transition) -> bytes | None:
    message = transition_message(transition)
    return None if message is None else messages.encode(message)


def encode_transitions(transitions: Iterable[Transition]) -> list[bytes]:
    """The messages for settled documents, encoded together (one encoder call per flush
    piece, not per document)."""
    return messages.encode_many([message for transition in transitions
                                 if (message := transition_message(transition)) is not None])


class EncodeCache:
    """Diffs and encodes merge-box output once per flush round when many clients get it.

    :meth:`encode` keys on the identities of the mappings a client has and should have:
    for a document one subscription holds they are the observer's shared, immutable field
    mappings, so every client of the observer gets the same text from one diff and one
    encoding. Entries keep those mappings alive (an id is not reused while cached); the cache
    lives for one round (one commit).
    """

    __slots__ = ("_removed", "_transitions", "hits")

    def __init__(self) -> None:
        self._removed: dict[tuple[str, str], bytes] = {}
        self._transitions: dict[tuple[str, str, int, int], tuple[Any, Any, bytes | None]] = {}
        self.hits = 0

    def transition(self, transition: Transition) -> bytes | None:
        """The text of one settled document (None: no message); see :meth:`encode`."""
        texts = self.encode([transition])
        return texts[0] if texts else None

    def _removed_text(self, collection: str, doc_id: str) -> bytes:
        key = (collection, doc_id)
        text = self._removed.get(key)
        if text is None:
            text = self._removed[key] = messages.encode(
                messages.removed_message(collection, doc_id))
        else:
            self.hits += 1
        return text

    def encode(self, transitions: list[Transition]) -> list[bytes]:
        """The texts of a client's settled documents, in order (nothing for those that need
        no message): cached texts reused, the others encoded together, with one encoder call
        (a client that gets several changes nobody else gets) and cached."""
        texts: list[Any] = []
        missing: list[tuple[int, tuple[str, str, int, int], Transition, dict[str, Any]]] = []
        cached = self._transitions
        for transition in transitions:
            collection, doc_id, before, after = transition
            if after is None:
                texts.append(self._removed_text(collection, doc_id))
                continue
            key = (collection, doc_id, id(before), id(after))
            hit = cached.get(key)
            if hit is not None and hit[0] is before and hit[1] is after:
                self.hits += 1
                texts.append(hit[2])
                continue
            message = transition_message(transition)
            if message is None:
                cached[key] = (before, after, None)
            else:
                missing.append((len(texts), key, transition, message))
            texts.append(None)
        if missing:
            encoded = messages.encode_many([message for _, _, _, message in missing])
            for (index, key, transition, _), text in zip(missing, encoded, strict=True):
                texts[index] = text
                cached[key] = (transition[2], transition[3], text)
        return [text for text in texts if text is not None]


# ---------------------------------------------------------------------------- clients


class FlushGate:
    """Client flushes wait while the engine holds a partly applied transaction (``closed``),
    and after a resync until the stream has caught up with its snapshot (``held``)."""

    def __init__(self) -> None:
        self.closed = False
        self.held = False
        self.deferred: set[LiveClient] = set()

    def defer(self, client: LiveClient) -> bool:
        if self.closed or self.held:
            self.deferred.add(client)
            return True
        return False


OPEN_GATE: Final = FlushGate()  # for connections without an engine (never closes)


# Documents settled per merge-box flush: a large initial result is written in pieces of about
# this many messages, each waiting for the previous write (so the send buffer bound applies to
# clients that stop reading, not to big subscriptions).
MAX_OPS_PER_FLUSH = 2000


def _nothing() -> None:
    pass


def _never() -> bool:
    return False


def _ignore_reason(reason: str) -> None:
    pass


class LiveClient:
    """One connection's merge box and its way out to the connection's session.

    Publishers (observers via the engine, handler-style publication contexts) change the box;
    :meth:`request_flush` turns its dirty documents into DDP messages — now, at the engine's
    commit if a transaction is partly applied, or when the socket is free again (then the box
    keeps coalescing: a slow client costs its view, not a queue). Control messages that must
    follow data (``ready``, ``nosub``) go through :meth:`after_flush`.
    """

    def __init__(self, session: ServerSession, wake: Callable[[], None],
                 output_busy: Callable[[], bool] = _never,
                 gate: FlushGate = OPEN_GATE,
                 on_failure: Callable[[str], None] = _ignore_reason) -> None:
        self.box = MergeBox()
        self.session = session
        self.gate = gate
        self.flush_wanted = False
        self.closed = False
        self._wake = wake
        self._output_busy = output_busy
        self._on_failure = on_failure
        self._after: list[Callable[[], None]] = []
        # The engine stopped an observer one of this client's subscriptions uses (its query
        # can no longer run, e.g. after a schema change): (sub key, client-safe error).
        self.on_subscription_failed: Callable[[SubKey, BaseException], None] | None = None
        # Commit timestamp (time.time() scale) of the oldest applied transaction whose
        # messages this client has not written yet; 0.0: none. Set only with metrics; the
        # connection observes commit->sent latency after its next write and resets it.
        self.commit_time = 0.0

    def fail(self, reason: str) -> None:
        """Drop the connection (its view cannot be trusted); the client reconnects."""
        self._on_failure(reason)

    def after_flush(self, action: Callable[[], None]) -> None:
        self._after.append(action)

    def request_flush(self, cache: EncodeCache | None = None) -> None:
        gate = self.gate
        if self.closed or ((gate.closed or gate.held) and gate.defer(self)):
            return
        if self._output_busy():
            self.flush_wanted = True  # the connection calls flush() once its write is done
            return
        self.flush(cache)

    def flush(self, cache: EncodeCache | None = None) -> None:
        if self.closed or self.gate.defer(self):
            return
        self.flush_wanted = False
        with gc_paused():  # short-lived tuples by the thousand (see cdcddp.gcpause)
            if cache is not None:  # many clients flush the same documents this round
                ops = cache.encode(self.box.settle(MAX_OPS_PER_FLUSH))
            elif (fresh := self.box.settle_fresh(MAX_OPS_PER_FLUSH)) is not None:
                collection, documents = fresh  # a new subscription's (large initial result)
                ops = messages.encode_added(collection, documents)
            else:
                ops = encode_transitions(self.box.settle(MAX_OPS_PER_FLUSH))
        if ops:
            self.session.send_encoded_many(ops)
        if self.box.has_pending:
            # More than one write's worth: the rest goes after this write; ready/updated
            # (the after-flush actions) wait until everything is out.
            self.flush_wanted = True
            self._wake()
            return
        after = self._after
        if after:
            self._after = []
            for action in after:
                action()
        if ops or after:
            self._wake()

    def close(self) -> None:
        """The connection is gone: forget everything, send nothing. (Its callbacks are
        the connection's methods: dropping them breaks the reference cycle, so a closed
        connection is freed at once, not by a later full garbage collection.)"""
        self.closed = True
        self.box.reset()
        self._after.clear()
        self._wake = _nothing
        self._output_busy = _never
        self._on_failure = _ignore_reason
        self.on_subscription_failed = None



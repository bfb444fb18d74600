"""The server's WebSocket (RFC 6455 over wsproto's frame protocol, on a real socket pair):
frames written without wsproto's per-frame cost and without a task switch, messages read
whole, pings, the closing handshake either way, limits and broken input."""

from __future__ import annotations

import socket

import pytest
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from cdcddp.server.transport import FrameWriter, text_frames
from cdcddp.server.websocket import (
    ConnectionClosed,
    ServerWebSocket,
    accept_key,
    handshake_response,
)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frames_are_wsprotos_server_frames(size: int) -> None:
    proto = FrameProtocol(client=False, extensions=[])
    for text in ("a" * size, "é€" * (size // 5)):
        assert text_frames([text, "x"]) == (proto.send_data(text, True)
                                            + proto.send_data("x", True))


def test_accept_key_and_response() -> None:
    # RFC 6455 §1.3's example
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    response = handshake_response("dGhlIHNhbXBsZSBub25jZQ==")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")


class Peer:
    """The client end: wsproto's client protocol on the other socket of the pair."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.stream = trio.SocketStream(sock)
        self.proto = Connection(ConnectionType.CLIENT)

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.proto.send(event) for event in events))

    async def receive(self) -> list[Event]:
        """What the server sent next (waits for at least one event; [] at EOF)."""
        with trio.fail_after(5):
            while True:
                events = list(self.proto.events())
                if events:
                    return events
                data = await self.stream.receive_some(65536)
                if not data:
                    return []
                self.proto.receive_data(data)


def socket_pair(max_message_size: int = 1000, received: bytes = b"",
                sndbuf: int | None = None) -> tuple[ServerWebSocket, Peer]:
    left, right = trio.socket.socketpair()
    if sndbuf is not None:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    ws = ServerWebSocket(trio.SocketStream(left), received, max_message_size=max_message_size)
    return ws, Peer(right)


async def test_messages_are_read_whole_pipelined_bytes_first_and_pings_answered() -> None:
    client = Connection(ConnectionType.CLIENT)
    pipelined = client.send(TextMessage("first"))  # arrived in the same read as the head
    ws, peer = socket_pair(received=pipelined)
    peer.proto = client
    assert await ws.get_message() == "first"
    await peer.send(TextMessage("frag", message_finished=False), Ping(b"p1"),
                    TextMessage("mented é", message_finished=True),
                    BytesMessage(b"\x00\x01"))
    assert await ws.get_message() == "fragmented é"  # the ping between the parts: answered
    assert await ws.get_message() == b"\x00\x01"
    assert await peer.receive() == [Pong(b"p1")]


async def test_the_clients_close_is_answered_and_ends_reading() -> None:
    ws, peer = socket_pair()
    await peer.send(CloseConnection(code=1000, reason="bye"))
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1000
    assert ws.closed is not None and (ws.closed.code, ws.closed.reason) == (1000, "bye")
    assert await peer.receive() == [CloseConnection(code=1000, reason="bye")]
    assert peer.proto.state is ConnectionState.CLOSED
    with pytest.raises(ConnectionClosed):
        await FrameWriter(ws).write(["late"])  # nothing goes out after a Close


async def test_a_lost_connection_reads_as_1006() -> None:
    ws, peer = socket_pair()
    await peer.stream.aclose()
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    assert ws.closed is not None and ws.closed.code == 1006


async def test_a_message_over_the_limit_closes_with_1009_even_in_fragments() -> None:
    ws, peer = socket_pair(max_message_size=100)
    await peer.send(TextMessage("x" * 60, message_finished=False),
                    TextMessage("y" * 60, message_finished=True))
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    assert ws.closed is not None and ws.closed.code == 1009
    (event,) = await peer.receive()
    assert isinstance(event, CloseConnection) and event.code == 1009


@pytest.mark.parametrize(("raw", "code"), [
    (b"\x81\x85abcd" + bytes(b ^ k for b, k in zip(b"\xff\xfe\xfd\xfc\xfb", b"abcda",
                                                     strict=True)), 1007),  # not UTF-8
    (b"\x81\x05hello", 1002),  # a client frame must be masked
])
async def test_a_broken_frame_gets_a_close_frame_with_its_code(raw: bytes, code: int) -> None:
    ws, peer = socket_pair()
    await peer.stream.send_all(raw)
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    assert ws.closed is not None and ws.closed.code == code
    (event,) = await peer.receive()
    assert isinstance(event, CloseConnection) and event.code == code


async def test_the_servers_close_waits_for_the_reply_read_by_the_reader() -> None:
    ws, peer = socket_pair()
    done: list[str] = []

    async def reader() -> None:
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            done.append("reader")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(ws.aclose, 1001, "Going away")
        (event,) = await peer.receive()
        assert isinstance(event, CloseConnection) and event.code == 1001
        await trio.sleep(0.05)
        assert done == []  # still waiting for the reply
        await peer.send(event.response())
    assert done == ["reader"]
    assert ws.closed is not None and ws.closed.code == 1001
    assert await peer.receive() == []  # then the server closed the TCP connection


async def test_send_nowait_keeps_what_the_socket_refuses_ahead_of_later_writes() -> None:
    ws, peer = socket_pair(sndbuf=4096)
    big = bytes(range(256)) * 4096  # more than the socket buffers take at once
    assert ws.send_nowait(big)
    assert ws.has_backlog
    assert not ws.send_nowait(b"later")  # would overtake the backlog: refused

    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(big) + 4:
            received.extend(await peer.stream.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await ws.send_all(b"tail")  # the backlog goes first
    assert not ws.has_backlog
    assert bytes(received) == big + b"tail"
    assert ws.send_nowait(b"now")  # idle again: written at once
    assert await peer.stream.receive_some(10) == b"now"


async def test_frame_writer_batches_frames_the_client_reads_as_messages() -> None:
    ws, peer = socket_pair()
    writer = FrameWriter(ws)
    assert writer.try_write(["a", "é" * 200])
    await writer.write(["c"])
    events: list[Event] = []
    while len(events) < 3:
        events += await peer.receive()
    assert [e.data for e in events if isinstance(e, Message)] == ["a", "é" * 200, "c"]

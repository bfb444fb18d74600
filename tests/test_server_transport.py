"""Writing WebSocket frames without wsproto's per-frame cost, and without a task switch."""

from __future__ import annotations

import socket

import pytest
import trio
from wsproto.frame_protocol import FrameProtocol

from cdcddp.server.transport import ReplayStream, text_frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frames_are_wsprotos_server_frames(size: int) -> None:
    proto = FrameProtocol(client=False, extensions=[])
    for text in ("a" * size, "é€" * (size // 5)):
        assert text_frames([text, "x"]) == (proto.send_data(text, True)
                                            + proto.send_data("x", True))


async def test_send_nowait_keeps_what_the_socket_refuses_ahead_of_later_writes() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = ReplayStream(trio.SocketStream(left), b"")
    peer = trio.SocketStream(right)
    big = bytes(range(256)) * 4096  # more than the socket buffers take at once
    assert stream.send_nowait(big)
    assert stream.has_backlog
    assert not stream.send_nowait(b"later")  # would overtake the backlog: refused

    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(big) + 4:
            received.extend(await peer.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await stream.send_all(b"tail")  # the backlog goes first
    assert not stream.has_backlog
    assert bytes(received) == big + b"tail"
    assert stream.send_nowait(b"now")  # idle again: written at once
    assert await peer.receive_some(10) == b"now"

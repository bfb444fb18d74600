"""The Python DDP client (cdcddp.client) against a real server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio

from cdcddp.client import DDPConnectionClosed, MeteorError, connect
from tests.server_support import FIXED_ITEMS, running_server


async def test_call_results_errors_and_updated() -> None:
    async with running_server() as server, connect(server.ws_url, log_messages=True) as client:
        assert client.session and len(client.session) == 17
        assert await client.call("echo", 1, "two", {"three": [3]}) == [1, "two", {"three": [3]}]
        when = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        assert await client.call("echo", when, b"\x00\x01") == [when, b"\x00\x01"]
        assert await client.call("nothing", wait_updated=True) is None

        with pytest.raises(MeteorError) as info:
            await client.call("boom_meteor")
        assert (info.value.error, info.value.reason, info.value.details) == (
            "not-allowed", "Nope", {"why": "test"})
        with pytest.raises(MeteorError) as info:
            await client.call("boom_internal")
        assert (info.value.error, info.value.reason) == (500, "Internal server error")
        with pytest.raises(MeteorError) as info:
            await client.call("nope")
        assert info.value.error == 404

        call = await client.apply("whoami", [], random_seed="seed-1")
        assert (await call.result())["seed"] == "seed-1"
        with trio.fail_after(2):
            await call.updated_received.wait()
        assert client.messages is not None
        kinds = [m["msg"] for m in client.messages if m.get("id") == call.id or
                 call.id in m.get("methods", [])]
        assert sorted(kinds) == ["result", "updated"]


async def test_subscribe_store_and_unsubscribe() -> None:
    async with running_server() as server, connect(server.ws_url) as client:
        sub_id = await client.subscribe("fixed")
        assert client.collections["items"] == FIXED_ITEMS
        await client.subscribe("evolving")
        assert client.collections["things"] == {"x": {"a": 5}}
        await client.unsubscribe(sub_id)
        assert client.collections["items"] == {}

        with pytest.raises(MeteorError) as info:
            await client.subscribe("nope")
        assert info.value.error == 404
        with pytest.raises(MeteorError) as info:
            await client.subscribe("failing")
        assert info.value.error == 500
        assert "doomed" not in client.collections["items"]


async def test_ping_wait_for_and_message_log() -> None:
    async with running_server() as server, connect(server.ws_url, log_messages=True) as client:
        rtt = await client.ping()
        assert 0 < rtt < 1
        await client.send({"msg": "sub", "id": "manual", "name": "one", "params": ["q"]})
        await client.wait_for(lambda: "manual" in client.ready_subs, timeout=2)
        added = await client.wait_for_message(lambda m: m.get("msg") == "added")
        assert added == {"msg": "added", "collection": "items", "id": "q",
                         "fields": {"name": "only q"}}
        with pytest.raises(trio.TooSlowError):
            await client.wait_for(lambda: False, timeout=0.1)


async def test_refused_version_and_closed_connection() -> None:
    async with running_server() as server:
        with pytest.raises(DDPConnectionClosed):
            async with connect(server.ws_url, version="pre0"):
                pass
        async with connect(server.ws_url) as client:
            await client.ws.aclose()
            with pytest.raises(DDPConnectionClosed):
                await client.call("echo", 1, timeout=2)

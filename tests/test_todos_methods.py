"""The Todos example's methods: happy paths, ownership, incomplete_count."""

from __future__ import annotations

import hashlib
import random

import trio

from cdcddp.db import Database
from cdcddp.ddp.meteor_random import RandomStream
from cdcddp.examples import todos
from cdcddp.methods import Methods
from cdcddp.methods.accounts import Accounts, AccountsConfig
from tests.methods_support import (  # noqa: F401  (fixtures)
    FAST_HASHING,
    Client,
    app_database,
    database,
)


def make_methods() -> Methods:
    methods = Methods()
    methods.include(Accounts(AccountsConfig(password_hashing=FAST_HASHING,
                                            attempts_per_connection=100)).methods)
    methods.include(todos.todo_methods)
    return methods


async def logged_in(methods: Methods, db: Database, username: str) -> Client:
    client = Client(methods, db, connection_id=username)
    digest = hashlib.sha256(b"pw").hexdigest()
    await client.ok("createUser", {"username": username,
                                   "password": {"digest": digest, "algorithm": "sha-256"}})
    return client


async def counts_agree(db: Database) -> dict[str, int]:
    """incomplete_count of every list, after checking it against a COUNT of unchecked todos."""
    rows = await db.fetchall(
        "SELECT l.id, l.incomplete_count, "
        "(SELECT count(*) FROM todos t WHERE t.list_id = l.id AND NOT t.checked) FROM lists l")
    for list_id, stored, actual in rows:
        assert stored == actual, f"list {list_id}: incomplete_count {stored} != {actual}"
    return {r[0]: r[1] for r in rows}


async def test_app_module_declares_methods_and_publications() -> None:
    assert {"login", "createUser", "lists.insert", "todos.insert"} <= {
        m.name for m in todos.methods}
    assert {p.name for p in todos.publications} == {"lists.public", "lists.private",
                                                    "todos.inList"}
    assert len(todos.publications.universal) == 1


async def test_lists_happy_path(app_database: Database) -> None:  # noqa: F811
    anonymous = Client(make_methods(), app_database, "anon")
    seed = "0123456789abcdef0123"
    first = await anonymous.ok("lists.insert", {}, random_seed=seed)
    assert first == RandomStream(seed).id_for_collection("lists")
    second = await anonymous.ok("lists.insert", {"locale": "en"})
    named = await anonymous.ok("lists.insert", {"name": "Groceries"})
    names = dict(await app_database.fetchall("SELECT id, name FROM lists"))
    assert names == {first: "List A", second: "List B", named: "Groceries"}
    await anonymous.ok("lists.updateName", {"listId": named, "newName": "Food"})
    await anonymous.ok("lists.remove", {"listId": second})
    names = dict(await app_database.fetchall("SELECT id, name FROM lists"))
    assert names == {first: "List A", named: "Food"}
    error = await anonymous.fails("lists.insert", {"name": "x", "extra": 1})
    assert error.error == 400
    assert (await anonymous.fails("lists.remove", {"listId": "missing"})).error == 404


async def test_private_lists_and_ownership(app_database: Database) -> None:  # noqa: F811
    methods = make_methods()
    alice = await logged_in(methods, app_database, "alice")
    bob = await logged_in(methods, app_database, "bob")
    anonymous = Client(methods, app_database, "anon")
    public = await alice.ok("lists.insert", {"name": "Public"})
    mine = await alice.ok("lists.insert", {"name": "Mine"})

    error = await anonymous.fails("lists.makePrivate", {"listId": mine})
    assert error.error == "api.lists.makePrivate.notLoggedIn"
    await alice.ok("lists.makePrivate", {"listId": mine})
    (owner,) = (await app_database.fetchall("SELECT user_id FROM lists WHERE id = %s",
                                            (mine,)))[0]
    assert owner == alice.login.user_id
    todo = await alice.ok("todos.insert", {"listId": mine, "text": "secret"})

    refusals = [
        ("lists.makePrivate", {"listId": mine}, "api.lists.makePrivate.accessDenied"),
        ("lists.makePublic", {"listId": mine}, "api.lists.makePublic.accessDenied"),
        ("lists.updateName", {"listId": mine, "newName": "x"},
         "api.lists.updateName.accessDenied"),
        ("lists.remove", {"listId": mine}, "api.lists.remove.accessDenied"),
        ("todos.insert", {"listId": mine, "text": "x"}, "api.todos.insert.accessDenied"),
        ("todos.setCheckedStatus", {"todoId": todo, "newCheckedStatus": True},
         "api.todos.setCheckedStatus.accessDenied"),
        ("todos.updateText", {"todoId": todo, "newText": "x"},
         "api.todos.updateText.accessDenied"),
        ("todos.remove", {"todoId": todo}, "api.todos.remove.accessDenied"),
    ]
    for who in (bob, anonymous):
        for name, args, code in refusals:
            if who is anonymous and name == "lists.makePrivate":
                code = "api.lists.makePrivate.notLoggedIn"
            elif who is anonymous and name == "lists.makePublic":
                code = "api.lists.makePublic.notLoggedIn"
            error = await who.fails(name, args)
            assert error.error == code, (who.connection_id, name, error)
    # Nothing changed.
    rows = await app_database.fetchall("SELECT id, name, user_id FROM lists ORDER BY name")
    assert rows == [(mine, "Mine", alice.login.user_id), (public, "Public", None)]
    assert await app_database.fetchall("SELECT text, checked FROM todos") == [("secret", False)]

    # The last public list can be neither made private nor removed.
    error = await alice.fails("lists.makePrivate", {"listId": public})
    assert error.error == "api.lists.makePrivate.lastPublicList"
    error = await bob.fails("lists.remove", {"listId": public})
    assert error.error == "api.lists.remove.lastPublicList"
    # The owner can do everything, and make the list public again.
    await alice.ok("todos.updateText", {"todoId": todo, "newText": "less secret"})
    await alice.ok("lists.makePublic", {"listId": mine})
    await bob.ok("todos.setCheckedStatus", {"todoId": todo, "newCheckedStatus": True})
    await bob.ok("lists.remove", {"listId": mine})  # public again, not the last public one
    assert await app_database.fetchall("SELECT id FROM todos") == []


async def test_incomplete_count_follows_every_change(app_database: Database) -> None:  # noqa: F811
    client = Client(make_methods(), app_database, "c")
    list_a = await client.ok("lists.insert", {})
    list_b = await client.ok("lists.insert", {})
    seed = "b2c4e6a8f0d1c3e5a7b9"
    first = await client.ok("todos.insert", {"listId": list_a, "text": "one"}, random_seed=seed)
    assert first == "EQxrD4ZJ49N6MwnDK"  # Meteor's id for this seed, scope /collection/todos
    todo_ids = [first]
    for i in range(5):
        todo_ids.append(await client.ok("todos.insert", {"listId": list_a, "text": f"t{i}"}))
    todo_ids.append(await client.ok("todos.insert", {"listId": list_b, "text": "b"}))
    assert await counts_agree(app_database) == {list_a: 6, list_b: 1}

    await client.ok("todos.setCheckedStatus", {"todoId": todo_ids[0], "newCheckedStatus": True})
    await client.ok("todos.setCheckedStatus", {"todoId": todo_ids[0], "newCheckedStatus": True})
    await client.ok("todos.setCheckedStatus", {"todoId": todo_ids[1], "newCheckedStatus": True})
    await client.ok("todos.setCheckedStatus", {"todoId": todo_ids[1], "newCheckedStatus": False})
    assert (await counts_agree(app_database))[list_a] == 5
    await client.ok("todos.remove", {"todoId": todo_ids[0]})  # checked: no change
    await client.ok("todos.remove", {"todoId": todo_ids[2]})  # unchecked: -1
    assert (await counts_agree(app_database))[list_a] == 4
    outcome = await client.call("todos.setCheckedStatus",
                                {"todoId": todo_ids[3], "newCheckedStatus": "maybe"})
    assert outcome.error is not None and outcome.error.error == 400
    assert (await client.fails("todos.remove", {"todoId": "missing"})).error == 404

    # A random sequence of operations keeps the count right throughout.
    rng = random.Random(7)
    live: dict[str, bool] = {t: False for t in [todo_ids[1], *todo_ids[3:6]]}
    for step in range(40):
        action = rng.choice(["insert", "check", "uncheck", "remove"])
        if action == "insert" or not live:
            live[await client.ok("todos.insert", {"listId": list_a, "text": f"r{step}"})] = False
        elif action == "remove":
            todo_id = rng.choice(sorted(live))
            await client.ok("todos.remove", {"todoId": todo_id})
            del live[todo_id]
        else:
            todo_id = rng.choice(sorted(live))
            await client.ok("todos.setCheckedStatus",
                            {"todoId": todo_id, "newCheckedStatus": action == "check"})
            live[todo_id] = action == "check"
    counts = await counts_agree(app_database)
    assert counts[list_a] == sum(1 for checked in live.values() if not checked)


async def test_writes_report_an_xid_for_the_fence(app_database: Database) -> None:  # noqa: F811
    client = Client(make_methods(), app_database, "c")
    outcome = await client.call("lists.insert", {"name": "L"})
    assert outcome.xid is not None
    refused = await client.call("lists.remove", {"listId": "missing"})
    assert refused.error is not None and refused.xid is None


async def test_concurrent_toggles_keep_the_count(app_database: Database) -> None:  # noqa: F811
    methods = make_methods()
    setup = Client(methods, app_database, "setup")
    list_id = await setup.ok("lists.insert", {})
    todo_ids = [await setup.ok("todos.insert", {"listId": list_id, "text": f"t{i}"})
                for i in range(3)]

    async def toggle(n: int) -> None:
        client = Client(methods, app_database, f"c{n}")
        await client.ok("todos.setCheckedStatus",
                        {"todoId": todo_ids[n % 3], "newCheckedStatus": n % 2 == 0})

    async with trio.open_nursery() as nursery:
        for n in range(24):
            nursery.start_soon(toggle, n)
    await counts_agree(app_database)

"""The live Todos page in two headless Chromium browsers against the real Todos app on a fresh
PostgreSQL database: raw SQL writes reach both pages; a todo added in A appears in B; ticking it
in B ticks it in A; a user signs up in A, makes the list private, and it disappears from B
(anonymous, then signed in as another user); the login survives a reload (resume token), sign
out hides the private list again, and making it public brings it back to B.

``todos_app``/``todos_server`` below are the one place that knows how the Todos example is
served.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import psycopg
import trio

from cdcddp.app import App, load_app
from cdcddp.client import connect, random_id
from cdcddp.publish.livedata import LiveDataConfig
from cdcddp.server.config import ServerConfig
from cdcddp.server.server import Server
from cdcddp.server.static import StaticFiles
from tests.browser import Page, diagnosed, launch_browser
from tests.server_support import fast_config

SCHEMA = Path(__file__).resolve().parent.parent / "schema"


def todos_app(dsn: str) -> App:
    """The Todos example (cdcddp.examples.todos: accounts, lists.*, todos.* methods;
    lists.public, lists.private, todos.inList and the current user's publication), to serve on
    the database ``dsn`` (see ``todos_server``)."""
    return load_app("cdcddp.examples.todos:app")


def todos_server(app: App, dsn: str, config: ServerConfig) -> Server:
    """The server for ``app`` on ``dsn``, with its own (temporary) replication slot."""
    return Server(app, config, dsn=dsn, live_config=LiveDataConfig(
        slot=f"todos_browser_{os.getpid()}", temporary_slot=True))


def sql(dsn: str, query: str, params: tuple[Any, ...] = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, params)  # type: ignore[arg-type]


def apply_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("accounts.sql", "todos.sql"):
            conn.execute((SCHEMA / name).read_text())  # type: ignore[arg-type]


def js(value: Any) -> str:
    return json.dumps(value)


def list_link(list_id: str) -> str:
    return f"document.querySelector({js(f'#lists li[data-list-id={js(list_id)}]')})"


def todo_item(text: str) -> str:
    return ("[...document.querySelectorAll('#todos li')].find((li) => "
            f"li.querySelector('.text').textContent === {js(text)})")


async def submit(page: Page, form_id: str, values: dict[str, str]) -> None:
    sets = "".join(f"document.getElementById({js(k)}).value = {js(v)};" for k, v in values.items())
    await page.evaluate(f"(() => {{ {sets} document.getElementById({js(form_id)})"
                        ".requestSubmit(); })()")


async def click(page: Page, expression: str) -> None:
    await page.evaluate(f"({expression}).click()")


async def sign_up(page: Page, username: str, password: str) -> str:
    await page.evaluate(f"""(() => {{
        document.getElementById('login-username').value = {js(username)};
        document.getElementById('login-password').value = {js(password)};
        document.getElementById('signup-button').click();
    }})()""")
    user_id = await page.wait_for("document.body.dataset.userId", timeout=15)
    await page.wait_for(f"document.getElementById('user-name').textContent === {js(username)}")
    return user_id


async def test_two_browsers_live_todos_accounts_and_private_lists(db_dsn: str) -> None:
    await trio.to_thread.run_sync(apply_schema, db_dsn)
    app = todos_app(db_dsn)
    config = fast_config(static=StaticFiles())
    async with launch_browser() as browser, trio.open_nursery() as nursery:
        server = todos_server(app, db_dsn, config)
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}/"
        a = await browser.new_page(url)
        b = await browser.new_page(url)  # its own browser context: its own login
        async with diagnosed(a, b):
            for page in (a, b):
                await page.evaluate("window.cdcddp.ready")

            # Any writer: a list inserted with plain SQL shows up in both pages.
            seed = random_id()
            await trio.to_thread.run_sync(
                sql, db_dsn, "INSERT INTO lists (id, name) VALUES (%s, 'Groceries')", (seed,))
            for page in (a, b):
                await page.wait_for(f"{list_link(seed)}?.textContent.includes('Groceries')")

            # A makes a list (the method names it "List A") and lands on it; B opens it.
            await click(a, "document.getElementById('new-list')")
            # (The page opened the first list, the seed, on its own: wait for the new one.)
            list_id = await a.wait_for(
                "(() => { const v = document.querySelector('#list-view[data-list-state=shown]');"
                f" return v && v.dataset.listId !== {js(seed)} ? v.dataset.listId : null; }})()")
            assert list_id != seed and len(list_id) == 17
            assert await a.evaluate("document.getElementById('list-name').textContent") == \
                "List A"
            await b.wait_for(list_link(list_id))
            await click(b, f"{list_link(list_id)}.querySelector('a')")
            await b.wait_for("document.querySelector('#list-view[data-todos-ready=true]')")

            # A todo added in A appears in B, with its createdAt decoded as a Date.
            await submit(a, "new-todo", {"new-todo-text": "buy milk"})
            await b.wait_for(todo_item("buy milk"))
            assert await b.evaluate("window.cdcddp.client.find('todos')"
                                    ".every((t) => t.createdAt instanceof Date)") is True
            count = f"{list_link(list_id)}.querySelector('.count').textContent"
            await a.wait_for(f"{count} === '1'")

            # Ticking it in B ticks it in A, and the list's incompleteCount follows.
            await click(b, f"{todo_item('buy milk')}.querySelector('input[type=checkbox]')")
            await a.wait_for(f"{todo_item('buy milk')}?.dataset.checked === 'true'")
            await a.wait_for(f"{count} === ''")  # 0 unfinished: no badge

            # A plain SQL update reaches both pages too.
            await trio.to_thread.run_sync(
                sql, db_dsn, "UPDATE todos SET text = 'buy oat milk' WHERE list_id = %s",
                (list_id,))
            for page in (a, b):
                await page.wait_for(todo_item("buy oat milk"))

            # User X signs up in A and makes the list private: it disappears from B.
            x_id = await sign_up(a, "xavier", "correct horse")
            await a.wait_for("!document.getElementById('privacy-button').hidden")
            await click(a, "document.getElementById('privacy-button')")
            await a.wait_for(f"{list_link(list_id)}?.dataset.private === 'true'")
            await b.wait_for(f"!{list_link(list_id)}")
            await b.wait_for("document.querySelector('#list-view[data-list-state=missing]')")
            # The todos leave when todos.inList re-runs on the list's change: a moment after
            # the list itself (a separate re-resolution, not the same flush).
            await b.wait_for(
                f"window.cdcddp.client.find('todos', (t) => t.listId === {js(list_id)}).length"
                " === 0")
            assert await b.evaluate(f"!!{list_link(seed)}") is True  # the public one stays

            # Another user in B does not see it either.
            y_id = await sign_up(b, "yvonne", "battery staple")
            assert y_id != x_id
            await b.wait_for(f"{list_link(seed)} && document.body.dataset.ready === 'true'")
            assert await b.evaluate(f"!!{list_link(list_id)}") is False

            # The page sent sha-256(password): a Python client logs in with its own digest.
            async with connect(f"ws://127.0.0.1:{port}/websocket") as client:
                digest = hashlib.sha256(b"correct horse").hexdigest()
                result = await client.call("login", {"user": {"username": "xavier"},
                                                     "password": {"digest": digest,
                                                                  "algorithm": "sha-256"}})
                assert result["id"] == x_id

            # A reload resumes the login from the stored token: the private list is still there.
            assert await a.evaluate("location.hash") == f"#/lists/{list_id}"
            await a.reload()
            await a.evaluate("window.cdcddp.ready")
            await a.wait_for(f"document.body.dataset.userId === {js(x_id)}")
            await a.wait_for(f"{list_link(list_id)}?.dataset.private === 'true'")
            await a.wait_for(todo_item("buy oat milk"))

            # Signing out hides it from A; signing in again brings it back.
            await click(a, "document.getElementById('logout-button')")
            await a.wait_for("document.body.dataset.userId === ''")
            await a.wait_for(f"!{list_link(list_id)}")
            await submit(a, "login-form", {"login-username": "xavier",
                                           "login-password": "correct horse"})
            await a.wait_for(f"{list_link(list_id)}?.dataset.private === 'true'")
            await click(a, f"{list_link(list_id)}.querySelector('a')")

            # A wrong password is refused, visibly, in B.
            await click(b, "document.getElementById('logout-button')")
            await b.wait_for("document.body.dataset.userId === ''")
            await submit(b, "login-form", {"login-username": "xavier",
                                           "login-password": "wrong"})
            status = await b.wait_for(
                "document.querySelector('#status[data-kind=error]')?.textContent")
            assert status.startswith("Signing in failed:")
            assert await b.evaluate("document.body.dataset.userId") == ""

            # Made public again, the list and its todo come back to B.
            await a.wait_for("document.getElementById('privacy-button').dataset.action "
                             "=== 'makePublic'")
            await click(a, "document.getElementById('privacy-button')")
            await b.wait_for(f"{list_link(list_id)}?.dataset.private === 'false'")
            await click(b, f"{list_link(list_id)}.querySelector('a')")
            await b.wait_for(todo_item("buy oat milk"))
            assert a.errors == [] and b.errors == []
        nursery.cancel_scope.cancel()

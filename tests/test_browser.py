"""The page and its DDP client in real headless Chromium against a real server: the test App
of tests/server_support.py (loading, errors shown, subscriptions, methods with EJSON, Meteor
errors, SHA-256 digests, reconnecting after a server restart), and two pages sharing live todos
through an in-memory stand-in of the Todos app (same publication and method names).

The page against the real Todos app on PostgreSQL, accounts and private lists included, is
tests/test_browser_todos.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from cdcddp.app import App, MethodContext, PublicationContext
from cdcddp.client import random_id
from cdcddp.ddp.messages import MeteorError
from cdcddp.server.server import Server
from cdcddp.server.static import StaticFiles
from tests.browser import Page, diagnosed, launch_browser
from tests.server_support import FIXED_ITEMS, build_test_app, fast_config, running_server


@asynccontextmanager
async def page_on_test_app() -> AsyncIterator[tuple[Page, int]]:
    async with running_server(config=fast_config(static=StaticFiles())) as server, \
            launch_browser() as browser:
        page = await browser.new_page(f"http://127.0.0.1:{server.port}/")
        async with diagnosed(page):
            await page.wait_for("window.cdcddp && window.cdcddp.client.status === 'connected'")
            yield page, server.port


async def test_page_connects_and_shows_subscription_errors() -> None:
    async with page_on_test_app() as (page, _):
        assert await page.evaluate("document.title") == "Todos · cdcddp"
        assert await page.evaluate("document.body.dataset.connection") == "connected"
        assert await page.evaluate("window.cdcddp.client.sessionId.length") > 0
        # The test app has no Todos publications: `ready` rejects with the server's 404 and
        # the page says so in its status line instead of failing silently.
        error = await page.evaluate(
            "window.cdcddp.ready.then(() => null, (e) => ({error: e.error, reason: e.reason}))")
        assert error == {"error": 404, "reason": "Subscription 'lists.public' not found"}
        status = await page.wait_for(
            "document.querySelector('#status[data-kind=error]')?.textContent")
        assert status.startswith("Loading the lists failed: Subscription 'lists.public' not found")
        assert await page.evaluate("document.body.dataset.ready") == "false"
        assert await page.evaluate("document.querySelector('#login-form').hidden") is False
        assert page.errors == []


async def test_ddp_client_subscriptions_methods_and_ejson() -> None:
    async with page_on_test_app() as (page, _):
        result = await page.evaluate("""(async () => {
            const c = window.cdcddp.client;
            const fixed = c.subscribe("fixed");
            await fixed.ready;
            const items = Object.fromEntries(c.find("items").map((d) => [d._id, d]));
            const evolving = c.subscribe("evolving");
            await evolving.ready;
            const things = c.find("things");
            fixed.stop();
            await new Promise((r) => setTimeout(r, 0));
            return {items, things, ready: fixed.isReady()};
        })()""")
        assert result["items"] == {k: {**v, "_id": k} for k, v in FIXED_ITEMS.items()}
        assert result["things"] == [{"a": 5, "_id": "x"}]  # changed, cleared "b"; "y" removed
        await page.wait_for("window.cdcddp.client.find('items').length === 0")

        # EJSON both ways: the server echoes what it decoded, re-encoded.
        echoed = await page.evaluate("""(async () => {
            const [d, b, inf, nan, esc, nested] = await window.cdcddp.client.call("echo",
                new Date(1234), new Uint8Array([1, 2, 255]), -Infinity, NaN, {$date: 5},
                {when: [new Date(0)]});
            return {d: d instanceof Date && d.getTime(), b: Array.from(b), inf: String(inf),
                    nan: String(nan), esc, nested: nested.when[0] instanceof Date};
        })()""")
        assert echoed == {"d": 1234, "b": [1, 2, 255], "inf": "-Infinity", "nan": "NaN",
                          "esc": {"$date": 5}, "nested": True}

        errors = await page.evaluate("""(async () => {
            const c = window.cdcddp.client;
            const shape = (e) => ({name: e.name, error: e.error, reason: e.reason,
                                   details: e.details ?? null, message: e.message});
            const out = {};
            for (const name of ["boom_meteor", "boom_internal", "no_such_method"]) {
                out[name] = await c.call(name).then(() => null, shape);
            }
            out.failing = await c.subscribe("failing").ready.then(() => null, shape);
            out.whoami = await c.call("whoami");
            return out;
        })()""")
        assert errors["boom_meteor"] == {"name": "DDPError", "error": "not-allowed",
                                         "reason": "Nope", "details": {"why": "test"},
                                         "message": "Nope [not-allowed]"}
        assert errors["boom_internal"]["error"] == 500
        assert errors["boom_internal"]["reason"] == "Internal server error"
        assert "hunter2" not in json.dumps(errors)
        assert errors["no_such_method"]["error"] == 404
        assert errors["failing"]["error"] == 500
        assert errors["whoami"]["user"] is None
        assert await page.evaluate("window.cdcddp.client.find('items').length") == 0


async def test_password_digest_matches_sha256() -> None:
    samples = ["", "abc", "correct horse battery staple", "pässwörd ✓ 🔑", "x" * 55, "y" * 56,
               "z" * 64, "w" * 1000]
    async with page_on_test_app() as (page, _):
        digests = await page.evaluate(f"""(async () => {{
            const m = await import("/ddp-client.js");
            const out = [];
            for (const s of {json.dumps(samples)}) {{
                out.push([await m.sha256Hex(s), m.sha256HexFallback(new TextEncoder().encode(s))]);
            }}
            return out;
        }})()""")
    for text, (subtle, fallback) in zip(samples, digests, strict=True):
        expected = hashlib.sha256(text.encode()).hexdigest()
        assert subtle == expected and fallback == expected, text


async def test_reconnects_after_server_restart_and_resubscribes() -> None:
    config = fast_config(static=StaticFiles())
    async with launch_browser() as browser, trio.open_nursery() as nursery:
        first = Server(build_test_app(), config)
        port = await nursery.start(first.serve, "127.0.0.1", 0)
        page = await browser.new_page(f"http://127.0.0.1:{port}/")
        async with diagnosed(page):
            await page.wait_for("window.cdcddp?.client.status === 'connected'")
            before = await page.evaluate("""(async () => {
                const c = window.cdcddp.client;
                window.fixedSub = c.subscribe("fixed");
                await window.fixedSub.ready;
                return c.sessionId;
            })()""")
            await first.shutdown()
            await page.wait_for("window.cdcddp.client.status !== 'connected'")
            assert await page.evaluate("document.body.dataset.connection") != "connected"
            # The documents stay visible while offline.
            assert await page.evaluate("window.cdcddp.client.find('items').length") == 3

            second = Server(build_test_app(), config)
            await nursery.start(second.serve, "127.0.0.1", port)
            await page.wait_for("window.cdcddp.client.reconnects === 1 && "
                                "window.cdcddp.client.status === 'connected'", timeout=15)
            after = await page.evaluate("window.cdcddp.client.sessionId")
            assert after != before
            # Re-subscribed on the new session: the store was rebuilt from its `ready`.
            await page.wait_for("window.cdcddp.client._resync === null")
            assert len(second.connections) == 1
            assert await page.evaluate(
                "window.cdcddp.client.find('items').map((d) => d._id).sort().join()") == "a,b,c"
            assert await page.evaluate("window.cdcddp.client.call('echo', 'back')") == ["back"]
            await page.wait_for("document.body.dataset.connection === 'connected'")
            # A client-side drop (what a heartbeat timeout does) reconnects the same way.
            await page.evaluate("window.cdcddp.client.reconnect()")
            await page.wait_for("window.cdcddp.client.reconnects === 2 && "
                                "window.cdcddp.client.status === 'connected' && "
                                "window.cdcddp.client._resync === null")
            assert await page.evaluate("window.cdcddp.client.find('items').length") == 3
        nursery.cancel_scope.cancel()


# ---- two pages, live todos (an in-memory stand-in for the Todos app) --------------------------

Doc = dict[str, Any]
Matcher = Callable[[str, Doc], bool]


PASSWORD = "correct horse"


def in_memory_todos_app(log: list[str] | None = None) -> App:
    """Todos' publications and methods over dicts: every change is pushed to the live
    subscription contexts that match before and/or after it, as the live-data layer does with
    the database's changes. Accounts are fakes that only check the wire shape (one user, one
    token; the server side of users is not involved): ``log`` records logins and
    subscriptions in the order the server ran them."""
    app = App("todos-in-memory")
    log = log if log is not None else []
    data: dict[str, dict[str, Doc]] = {"lists": {}, "todos": {}}
    live: list[tuple[PublicationContext, str, Matcher]] = []

    def publish(ctx: PublicationContext, collection: str, matches: Matcher) -> None:
        for doc_id, doc in data[collection].items():
            if matches(doc_id, doc):
                ctx.added(collection, doc_id, doc)
        live.append((ctx, collection, matches))
        ctx.ready()

    def write(collection: str, doc_id: str, new: Doc | None) -> None:
        old = data[collection].get(doc_id)
        if new is None:
            data[collection].pop(doc_id, None)
        else:
            data[collection][doc_id] = new
        live[:] = [entry for entry in live if not entry[0].stopped]
        for ctx, name, matches in live:
            was = old is not None and name == collection and matches(doc_id, old)
            now = new is not None and name == collection and matches(doc_id, new)
            if now and not was:
                ctx.added(collection, doc_id, new)  # type: ignore[arg-type]
            elif now and was:
                assert old is not None and new is not None
                ctx.changed(collection, doc_id, {k: v for k, v in new.items() if old.get(k) != v})
            elif was:
                ctx.removed(collection, doc_id)

    def get(collection: str, doc_id: Any) -> Doc:
        doc = data[collection].get(doc_id) if isinstance(doc_id, str) else None
        if doc is None:
            raise MeteorError(404, f"{collection[:-1].title()} not found")
        return doc

    def count(list_id: str, delta: int) -> None:
        lst = get("lists", list_id)
        write("lists", list_id, {**lst, "incompleteCount": lst["incompleteCount"] + delta})

    digest = {"digest": hashlib.sha256(PASSWORD.encode()).hexdigest(), "algorithm": "sha-256"}
    session = {"id": "user1", "token": "token-1",
               "tokenExpires": dt.datetime(2100, 1, 1, tzinfo=dt.UTC)}

    @app.method("createUser")
    async def create_user(ctx: MethodContext, options: dict[str, Any]) -> dict[str, Any]:
        log.append(f"createUser:{options.get('username')}")
        if options.get("password") != digest:
            raise MeteorError(400, "Unexpected password shape")
        return session

    @app.method("login")
    async def login(ctx: MethodContext, options: dict[str, Any]) -> dict[str, Any]:
        if "resume" in options:
            log.append(f"login:resume:{options['resume']}")
            if options["resume"] != session["token"]:
                raise MeteorError(403, "You've been logged out by the server. "
                                  "Please log in again.")
            return session
        log.append(f"login:password:{options.get('user', {}).get('username')}")
        if options.get("password") != digest:
            raise MeteorError(403, "Incorrect password")
        return session

    @app.method("logout")
    async def logout(ctx: MethodContext) -> None:
        log.append("logout")

    @app.publish("lists.public")
    async def lists_public(ctx: PublicationContext) -> None:
        log.append("sub:lists.public")
        publish(ctx, "lists", lambda _, doc: doc["userId"] is None)

    @app.publish("lists.private")
    async def lists_private(ctx: PublicationContext) -> None:
        ctx.ready()  # anonymous: ready and empty

    @app.publish("todos.inList")
    async def todos_in_list(ctx: PublicationContext, params: dict[str, Any]) -> None:
        publish(ctx, "todos", lambda _, doc: doc["listId"] == params["listId"])

    @app.method("lists.insert")
    async def lists_insert(ctx: MethodContext, args: dict[str, Any]) -> str:
        list_id = random_id()
        name = args.get("name") or f"List {chr(ord('A') + len(data['lists']))}"
        write("lists", list_id, {"name": name, "incompleteCount": 0, "userId": None})
        return list_id

    @app.method("lists.updateName")
    async def lists_update_name(ctx: MethodContext, args: dict[str, Any]) -> None:
        write("lists", args["listId"], {**get("lists", args["listId"]), "name": args["newName"]})

    @app.method("lists.remove")
    async def lists_remove(ctx: MethodContext, args: dict[str, Any]) -> None:
        get("lists", args["listId"])
        if len(data["lists"]) == 1:
            raise MeteorError("api.lists.remove.lastPublicList",
                              "Cannot delete the last public list.")
        for todo_id, todo in list(data["todos"].items()):
            if todo["listId"] == args["listId"]:
                write("todos", todo_id, None)
        write("lists", args["listId"], None)

    @app.method("todos.insert")
    async def todos_insert(ctx: MethodContext, args: dict[str, Any]) -> str:
        get("lists", args["listId"])
        todo_id = random_id()
        write("todos", todo_id, {"listId": args["listId"], "text": args["text"],
                                 "checked": False, "createdAt": dt.datetime.now(dt.UTC)})
        count(args["listId"], 1)
        return todo_id

    @app.method("todos.setCheckedStatus")
    async def todos_set_checked(ctx: MethodContext, args: dict[str, Any]) -> None:
        todo = get("todos", args["todoId"])
        if todo["checked"] != args["newCheckedStatus"]:
            write("todos", args["todoId"], {**todo, "checked": args["newCheckedStatus"]})
            count(todo["listId"], -1 if args["newCheckedStatus"] else 1)

    @app.method("todos.remove")
    async def todos_remove(ctx: MethodContext, args: dict[str, Any]) -> None:
        todo = get("todos", args["todoId"])
        write("todos", args["todoId"], None)
        if not todo["checked"]:
            count(todo["listId"], -1)

    return app


async def test_two_pages_share_live_todos() -> None:
    """Add, check, rename, remove in one page; the other shows it. Methods wait for `updated`,
    so the acting page's own store is already up to date when its call returns."""
    config = fast_config(static=StaticFiles())
    async with running_server(in_memory_todos_app(), config) as server, \
            launch_browser() as browser:
        url = f"http://127.0.0.1:{server.port}/"
        a = await browser.new_page(url)
        b = await browser.new_page(url)
        async with diagnosed(a, b):
            for page in (a, b):
                await page.evaluate("window.cdcddp.ready")
                assert await page.evaluate("document.body.dataset.ready") == "true"
                assert await page.evaluate("document.getElementById('lists-empty').hidden") \
                    is False
            # A makes a list and lands on it; B sees it in its sidebar and opens it.
            await a.evaluate("document.getElementById('new-list').click()")
            list_id = await a.wait_for(
                "document.querySelector('#list-view[data-list-state=shown]')?.dataset.listId")
            assert await a.evaluate("document.getElementById('list-name').textContent") == \
                "List A"
            link = f"#lists li[data-list-id='{list_id}'] a"
            await b.wait_for(f"document.querySelector(\"{link}\")")
            await b.evaluate(f"document.querySelector(\"{link}\").click()")
            await b.wait_for("document.querySelector('#list-view[data-todos-ready=true]')")

            # A adds two todos; B shows them, newest first.
            for text in ("buy milk", "walk the dog"):
                await a.evaluate(f"""(() => {{
                    document.getElementById('new-todo-text').value = {json.dumps(text)};
                    document.getElementById('new-todo').requestSubmit();
                }})()""")
                await a.wait_for(f"[...document.querySelectorAll('#todos .text')]"
                                 f".some((e) => e.textContent === {json.dumps(text)})")
            texts = "[...document.querySelectorAll('#todos .text')].map((e) => e.textContent)"
            assert await b.wait_for(f"{texts}.length === 2 && {texts}") == \
                ["walk the dog", "buy milk"]
            count = f"document.querySelector(\"#lists li[data-list-id='{list_id}'] .count\")"
            assert await a.wait_for(f"{count}.textContent === '2' && {count}.textContent")

            # B ticks "buy milk"; A shows it checked and its count drops.
            milk = "[...document.querySelectorAll('#todos li')].find((li) => " \
                   "li.querySelector('.text').textContent === 'buy milk')"
            await b.evaluate(f"{milk}.querySelector('input[type=checkbox]').click()")
            await a.wait_for(f"{milk}?.dataset.checked === 'true' && "
                             f"{milk}.querySelector('input').checked")
            await a.wait_for(f"{count}.textContent === '1'")
            await b.evaluate(f"{milk}.querySelector('input[type=checkbox]').click()")
            await a.wait_for(f"{milk}?.dataset.checked === 'false'")

            # A renames the list; B's header and sidebar follow.
            await a.evaluate("""(() => {
                document.getElementById('rename-button').click();
                document.getElementById('rename-input').value = 'Groceries';
                document.getElementById('rename-form').requestSubmit();
            })()""")
            await b.wait_for("document.getElementById('list-name').textContent === 'Groceries'")
            await b.wait_for(f"document.querySelector(\"{link} .name\").textContent "
                             "=== 'Groceries'")

            # B removes "walk the dog"; A no longer shows it.
            await b.evaluate("[...document.querySelectorAll('#todos li')].find((li) => "
                             "li.querySelector('.text').textContent === 'walk the dog')"
                             ".querySelector('.remove').click()")
            assert await a.wait_for(f"{texts}.length === 1 && {texts}") == ["buy milk"]

            # The server refuses to delete the last list: the page says why.
            await b.evaluate("document.getElementById('delete-list-button').click()")
            await b.evaluate("document.getElementById('delete-list-button').click()")
            status = await b.wait_for(
                "document.querySelector('#status[data-kind=error]')?.textContent")
            assert status == ("Deleting the list failed: Cannot delete the last public list. "
                              "[api.lists.remove.lastPublicList]")

            # A makes a second list and deletes the first: B is told it is gone.
            await a.evaluate("document.getElementById('new-list').click()")
            await a.wait_for(f"document.querySelector('#list-view').dataset.listId !== "
                             f"{json.dumps(list_id)}")
            await a.evaluate(f"window.cdcddp.selectList({json.dumps(list_id)})")
            await a.wait_for("document.querySelector('#list-view[data-list-state=shown]')")
            await a.evaluate("document.getElementById('delete-list-button').click()")
            await a.evaluate("document.getElementById('delete-list-button').click()")
            await b.wait_for("document.querySelector('#list-view[data-list-state=missing]')")
            assert await b.evaluate("document.getElementById('no-list-text').textContent") == \
                "This list is private or was deleted."
            assert await b.evaluate(f"document.querySelector(\"{link}\")") is None
            assert await b.evaluate("window.cdcddp.client.find('todos').length") == 0
            assert a.errors == [] and b.errors == []


async def test_login_token_is_resumed_first_after_reload() -> None:
    """The page's accounts plumbing (the server's accounts are tests/test_browser_todos.py's):
    sign up sends sha-256(password); the token is kept and, after a reload, the resume login
    reaches the server before any subscription; sign out forgets it; errors are shown."""
    log: list[str] = []
    config = fast_config(static=StaticFiles())
    async with running_server(in_memory_todos_app(log), config) as server, \
            launch_browser() as browser:
        page = await browser.new_page(f"http://127.0.0.1:{server.port}/")
        async with diagnosed(page):
            await page.evaluate("window.cdcddp.ready")
            assert log == ["sub:lists.public"]
            await page.evaluate(f"""(() => {{
                document.getElementById('login-username').value = 'xavier';
                document.getElementById('login-password').value = {json.dumps(PASSWORD)};
                document.getElementById('signup-button').click();
            }})()""")
            await page.wait_for("document.body.dataset.userId === 'user1'")
            assert await page.evaluate("document.getElementById('login-form').hidden") is True
            assert await page.evaluate("document.getElementById('user-box').hidden") is False
            assert await page.evaluate("document.getElementById('login-password').value") == ""
            assert log[-1] == "createUser:xavier"
            assert await page.evaluate("localStorage.getItem('cdcddp.loginToken')") == "token-1"

            log.clear()
            await page.reload()
            await page.evaluate("window.cdcddp.ready")
            await page.wait_for("document.body.dataset.userId === 'user1'")
            assert log[:2] == ["login:resume:token-1", "sub:lists.public"]

            await page.evaluate("document.getElementById('logout-button').click()")
            await page.wait_for("document.body.dataset.userId === ''")
            assert log[-1] == "logout"
            assert await page.evaluate("localStorage.getItem('cdcddp.loginToken')") is None
            log.clear()
            await page.reload()
            await page.evaluate("window.cdcddp.ready")
            assert log == ["sub:lists.public"]

            await page.evaluate("""(() => {
                document.getElementById('login-username').value = 'xavier';
                document.getElementById('login-password').value = 'wrong';
                document.getElementById('login-form').requestSubmit();
            })()""")
            status = await page.wait_for(
                "document.querySelector('#status[data-kind=error]')?.textContent")
            assert status == "Signing in failed: Incorrect password [403]"
            assert log[-1] == "login:password:xavier"
            assert await page.evaluate("document.body.dataset.userId") == ""
            assert page.errors == []

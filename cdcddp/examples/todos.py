"""The Todos example (Meteor's todos app) on PostgreSQL: methods and publications.

Tables: ``schema/accounts.sql`` then ``schema/todos.sql``. Every method takes one object
argument, as the app's validated methods do, and runs in one transaction; the ids of inserted
rows come from the call's random stream, so they equal the ids the client's simulation made.

Rules (Meteor todos' ``editableBy``): a list with no owner is public and anybody may edit it
and its todos; a private list (``user_id`` set) only by its owner. The last public list can be
neither made private nor removed. ``incomplete_count`` is kept equal to the number of unchecked
todos of the list, in the same transaction as the change that moves it.
"""

from __future__ import annotations

from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, StringConstraints

from cdcddp.app import App
from cdcddp.ddp.messages import MeteorError
from cdcddp.methods.accounts import Accounts, current_user_publication
from cdcddp.methods.context import MethodContext
from cdcddp.methods.registry import Methods
from cdcddp.publish.definition import Cursor, Publication, Publications
from cdcddp.publish.filters import C, UserId
from cdcddp.publish.lookup import RowLookup

__all__ = ["accounts", "app", "methods", "publications", "todo_methods"]

DEFAULT_LIST_NAME: Final = "List"

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=10_000)]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")  # SimpleSchema's validator refuses unknown keys


class ListsInsertArgs(_Args):
    name: Text | None = None
    locale: str | None = None  # sent by Meteor's todos client; the default name is English


class ListIdArgs(_Args):
    listId: Id


class ListsUpdateNameArgs(_Args):
    listId: Id
    newName: Text


class TodosInsertArgs(_Args):
    listId: Id
    text: Text


class TodoIdArgs(_Args):
    todoId: Id


class TodosSetCheckedArgs(_Args):
    todoId: Id
    newCheckedStatus: bool


class TodosUpdateTextArgs(_Args):
    todoId: Id
    newText: Text


todo_methods = Methods()


# ---- helpers ---------------------------------------------------------------------------------

def _not_found(what: str) -> MeteorError:
    return MeteorError(404, f"{what} not found")


async def _list_owner(ctx: MethodContext, list_id: str) -> tuple[bool, str | None]:
    """(exists, owner) of a list, locking it for the rest of the call."""
    row = await ctx.fetchone("SELECT user_id FROM lists WHERE id = %s FOR UPDATE", (list_id,))
    return (False, None) if row is None else (True, row[0])


def _editable_by(owner: str | None, user_id: str | None) -> bool:
    # Meteor todos' list.editableBy: public lists are everybody's, private ones their owner's.
    return owner is None or owner == user_id


async def _editable_list(ctx: MethodContext, list_id: str, code: str, reason: str) -> str | None:
    exists, owner = await _list_owner(ctx, list_id)
    if not exists:
        raise _not_found("List")
    if not _editable_by(owner, ctx.user_id):
        raise MeteorError(code, reason)
    return owner


async def _is_last_public_list(ctx: MethodContext, list_id: str) -> bool:
    # Lock the public lists so two calls cannot each take a different "last" one private.
    rows = await ctx.fetchall("SELECT id FROM lists WHERE user_id IS NULL ORDER BY id FOR UPDATE")
    return [r[0] for r in rows] == [list_id]


async def _todo_list(ctx: MethodContext, todo_id: str, code: str, reason: str) -> str:
    """The list of an editable todo (its list locked), or the Meteor.Error to refuse."""
    list_id = await ctx.fetchval("SELECT list_id FROM todos WHERE id = %s", (todo_id,))
    if list_id is None:
        raise _not_found("Todo")
    await _editable_list(ctx, list_id, code, reason)
    return list_id


# ---- lists -----------------------------------------------------------------------------------

@todo_methods.method("lists.insert")
async def lists_insert(ctx: MethodContext, args: ListsInsertArgs) -> str:
    list_id = ctx.new_id("lists")
    name = args.name
    if not name:
        # As the app: "List A", then the next letter not taken (it may go past "Z").
        taken = {r[0] for r in await ctx.fetchall(
            "SELECT name FROM lists WHERE name LIKE %s", (f"{DEFAULT_LIST_NAME} _",))}
        letter = "A"
        while f"{DEFAULT_LIST_NAME} {letter}" in taken:
            letter = chr(ord(letter) + 1)
        name = f"{DEFAULT_LIST_NAME} {letter}"
    await ctx.execute("INSERT INTO lists (id, name) VALUES (%s, %s)", (list_id, name))
    return list_id


@todo_methods.method("lists.makePrivate")
async def lists_make_private(ctx: MethodContext, args: ListIdArgs) -> None:
    if ctx.user_id is None:
        raise MeteorError("api.lists.makePrivate.notLoggedIn",
                          "Must be logged in to make private lists.")
    await _editable_list(ctx, args.listId, "api.lists.makePrivate.accessDenied",
                         "You don't have permission to edit this list.")
    if await _is_last_public_list(ctx, args.listId):
        raise MeteorError("api.lists.makePrivate.lastPublicList",
                          "Cannot make the last public list private.")
    await ctx.execute("UPDATE lists SET user_id = %s WHERE id = %s", (ctx.user_id, args.listId))


@todo_methods.method("lists.makePublic")
async def lists_make_public(ctx: MethodContext, args: ListIdArgs) -> None:
    if ctx.user_id is None:
        raise MeteorError("api.lists.makePublic.notLoggedIn",
                          "Must be logged in.")
    await _editable_list(ctx, args.listId, "api.lists.makePublic.accessDenied",
                         "You don't have permission to edit this list.")
    await ctx.execute("UPDATE lists SET user_id = NULL WHERE id = %s", (args.listId,))


@todo_methods.method("lists.updateName")
async def lists_update_name(ctx: MethodContext, args: ListsUpdateNameArgs) -> None:
    await _editable_list(ctx, args.listId, "api.lists.updateName.accessDenied",
                         "You don't have permission to edit this list.")
    await ctx.execute("UPDATE lists SET name = %s WHERE id = %s", (args.newName, args.listId))


@todo_methods.method("lists.remove")
async def lists_remove(ctx: MethodContext, args: ListIdArgs) -> None:
    owner = await _editable_list(ctx, args.listId, "api.lists.remove.accessDenied",
                                 "You don't have permission to remove this list.")
    if owner is None and await _is_last_public_list(ctx, args.listId):
        raise MeteorError("api.lists.remove.lastPublicList",
                          "Cannot delete the last public list.")
    await ctx.execute("DELETE FROM lists WHERE id = %s", (args.listId,))  # todos cascade


# ---- todos -----------------------------------------------------------------------------------

@todo_methods.method("todos.insert")
async def todos_insert(ctx: MethodContext, args: TodosInsertArgs) -> str:
    await _editable_list(ctx, args.listId, "api.todos.insert.accessDenied",
                         "Cannot add todos to a private list that is not yours")
    todo_id = ctx.new_id("todos")
    await ctx.execute("INSERT INTO todos (id, list_id, text) VALUES (%s, %s, %s)",
                      (todo_id, args.listId, args.text))
    await ctx.execute("UPDATE lists SET incomplete_count = incomplete_count + 1 WHERE id = %s",
                      (args.listId,))
    return todo_id


@todo_methods.method("todos.setCheckedStatus")
async def todos_set_checked_status(ctx: MethodContext, args: TodosSetCheckedArgs) -> None:
    list_id = await _todo_list(ctx, args.todoId, "api.todos.setCheckedStatus.accessDenied",
                               "Cannot edit checked status in a private list that is not yours")
    # Only a real change moves the count; the list row is locked, so concurrent toggles of
    # the same todo are serialised.
    changed = await ctx.execute(
        "UPDATE todos SET checked = %s WHERE id = %s AND checked <> %s",
        (args.newCheckedStatus, args.todoId, args.newCheckedStatus))
    if changed:
        await ctx.execute(
            "UPDATE lists SET incomplete_count = incomplete_count + %s WHERE id = %s",
            (-1 if args.newCheckedStatus else 1, list_id))


@todo_methods.method("todos.updateText")
async def todos_update_text(ctx: MethodContext, args: TodosUpdateTextArgs) -> None:
    await _todo_list(ctx, args.todoId, "api.todos.updateText.accessDenied",
                     "Cannot edit todos in a private list that is not yours")
    await ctx.execute("UPDATE todos SET text = %s WHERE id = %s", (args.newText, args.todoId))


@todo_methods.method("todos.remove")
async def todos_remove(ctx: MethodContext, args: TodoIdArgs) -> None:
    list_id = await _todo_list(ctx, args.todoId, "api.todos.remove.accessDenied",
                               "Cannot remove todos in a private list that is not yours")
    checked = await ctx.fetchval("DELETE FROM todos WHERE id = %s RETURNING checked",
                                 (args.todoId,))
    if checked is False:
        await ctx.execute(
            "UPDATE lists SET incomplete_count = incomplete_count - 1 WHERE id = %s", (list_id,))


# ---- the app: accounts + todos methods, publications ----------------------------------------

accounts = Accounts()
methods = Methods()
methods.include(accounts.methods)
methods.include(todo_methods)

LIST_FIELDS: Final = ["name", "incomplete_count", "user_id"]  # Lists.publicFields

publications = Publications()
publications.add(current_user_publication())
publications.add(Publication(
    "lists.public",
    Cursor("lists", collection="lists", camel_case=True, fields=LIST_FIELDS,
           filter=C("user_id").is_null())))
publications.add(Publication(
    "lists.private",
    Cursor("lists", collection="lists", camel_case=True, fields=LIST_FIELDS,
           filter=C("user_id") == UserId()),
    requires_user=True))


class InListParams(BaseModel):
    listId: Id


TODO_FIELDS: Final = ["list_id", "text", "checked", "created_at"]  # Todos.publicFields


@publications.publication("todos.inList", params=InListParams)
def todos_in_list(params: InListParams, user_id: str | None, lookup: RowLookup
                  ) -> Cursor | None:
    """A list's todos while the list is public or the subscriber's (publish-composite in
    Meteor's app). The list row is a reactive dependency: made private, the list's todos leave
    other users' views; made public again, they come back."""
    found = lookup.row("lists", params.listId, columns=["user_id"])
    if found is None or found["user_id"] not in (None, user_id):
        return None
    return Cursor("todos", collection="todos", camel_case=True, fields=TODO_FIELDS,
                  filter=C("list_id") == params.listId)


# Served with ``cdcddp serve cdcddp.examples.todos:app`` (applies schema/accounts.sql and
# schema/todos.sql at start: both are idempotent).
app = App("todos", methods=methods, schemas=("accounts", "todos"))
app.include_publications(publications)

// The live Todos page: Meteor's Todos app (lists, todos, accounts) on cdcddp.
//
// Every change reaches this page from PostgreSQL through the DDP subscriptions, whoever made it
// (another browser, a script, psql). The page never edits its store by itself: it calls a
// method and the server's added/changed/removed messages update what is shown.
//
// For tests and tinkering, `window.cdcddp` holds {client, ready, selectList, state}; the DOM
// carries stable ids, data-testid and data-* state (body[data-connection], [data-ready],
// [data-user-id]; #list-view[data-list-id][data-todos-ready][data-list-state];
// li[data-list-id][data-private]; li[data-todo-id][data-checked]).

import { DDPClient } from "./ddp-client.js";

const $ = (id) => document.getElementById(id);

const client = new DDPClient(DDPClient.urlForPage());
const state = {
  selectedListId: listIdFromHash(),
  todosSub: null,
  todosSubListId: null,
  todosReady: false,
  renaming: false,
  autoSelected: false,
};

// ---- status line: every failure is shown, never swallowed ----------------------------------

let statusTimer = null;

function showStatus(text, kind = "info") {
  const status = $("status");
  status.textContent = text;
  status.dataset.kind = kind;
  clearTimeout(statusTimer);
  // Errors stay until the next message or a click; information fades.
  if (kind !== "error") statusTimer = setTimeout(() => { status.textContent = ""; }, 3000);
}

function showError(action, error) {
  const why = error?.reason || error?.message || String(error);
  const code = error?.error !== undefined ? ` [${error.error}]` : "";
  showStatus(`${action} failed: ${why}${code}`, "error");
  console.warn(`${action} failed`, error);
}

/** Run an action, showing its error if it fails; resolves to its value or undefined. */
async function attempt(action, work) {
  try {
    return await work();
  } catch (error) {
    showError(action, error);
    return undefined;
  }
}

$("status").addEventListener("click", () => { $("status").textContent = ""; });

// ---- subscriptions -------------------------------------------------------------------------

const publicLists = client.subscribe("lists.public");
let privateLists = null;

// The user's own lists are subscribed only while signed in: a server may refuse that
// publication to anonymous clients (or answer it empty); either way nothing is lost.
function updatePrivateSubscription() {
  if (client.userId && !privateLists) {
    privateLists = client.subscribe("lists.private");
    privateLists.ready.catch((error) => showError("Loading your lists", error));
  } else if (!client.userId && privateLists) {
    privateLists.stop();
    privateLists = null;
  }
}

// `connected` resolves once a stored login token was tried, so the user is known by then.
const ready = client.connected.then(() => {
  updatePrivateSubscription();
  return Promise.all([publicLists.ready, privateLists?.ready]);
}).then(() => {
  document.body.dataset.ready = "true";
  scheduleRender();
});
ready.catch((error) => showError("Loading the lists", error));

function updateTodosSubscription() {
  const listId = state.selectedListId;
  if (listId === state.todosSubListId) return;
  state.todosSub?.stop();
  state.todosSub = null;
  state.todosSubListId = listId;
  state.todosReady = false;
  if (!listId) return;
  const sub = client.subscribe("todos.inList", { listId });
  state.todosSub = sub;
  sub.ready.then(() => {
    if (state.todosSub === sub) { state.todosReady = true; scheduleRender(); }
  }, (error) => {
    if (state.todosSub === sub) showError("Loading the tasks", error);
  });
}

// ---- navigation ----------------------------------------------------------------------------

function listIdFromHash() {
  const match = /^#\/lists\/([^/]+)$/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function selectList(listId) {
  const hash = listId ? `#/lists/${encodeURIComponent(listId)}` : "";
  if (window.location.hash !== hash) window.location.hash = hash;
  onHashChange();
}

function onHashChange() {
  const listId = listIdFromHash();
  if (listId !== state.selectedListId) {
    state.selectedListId = listId;
    state.renaming = false;
  }
  updateTodosSubscription();
  scheduleRender();
}

window.addEventListener("hashchange", onHashChange);

// ---- reading the store ---------------------------------------------------------------------

function byNameThenId(a, b) {
  return String(a.name).localeCompare(String(b.name)) || String(a._id).localeCompare(b._id);
}

function visibleLists() {
  return client.find("lists").sort(byNameThenId);
}

function todosOf(listId) {
  const time = (todo) => (todo.createdAt instanceof Date ? todo.createdAt.getTime() : 0);
  // Newest first, as Meteor's Todos shows them.
  return client.find("todos", (todo) => todo.listId === listId)
    .sort((a, b) => time(b) - time(a) || String(a._id).localeCompare(b._id));
}

// ---- rendering -----------------------------------------------------------------------------

let renderQueued = false;

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  // A microtask, not requestAnimationFrame: background tabs get no frames, and tests read the
  // DOM of pages that are not in front.
  queueMicrotask(() => { renderQueued = false; render(); });
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "className") node.className = value;
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

function render() {
  const body = document.body;
  body.dataset.connection = client.status;
  $("connection-text").textContent = {
    connected: "live", connecting: "connecting…", offline: "offline, reconnecting…",
    closed: "closed",
  }[client.status] || client.status;

  renderAccount();
  renderLists();
  renderListPanel();
}

function renderAccount() {
  const userId = client.userId || "";
  document.body.dataset.userId = userId;
  $("login-form").hidden = Boolean(userId);
  $("user-box").hidden = !userId;
  $("user-name").textContent = userId ? (client.user?.username || "signed in") : "";
}

function renderLists() {
  const lists = visibleLists();
  const items = lists.map((list) => el("li", {
    dataset: { testid: "list", listId: list._id, private: String(Boolean(list.userId)) },
    className: list._id === state.selectedListId ? "selected" : "",
  }, el("a", { href: `#/lists/${encodeURIComponent(list._id)}` },
    el("span", { className: "name" }, String(list.name ?? "")),
    el("span", { className: "count", title: "unfinished tasks" },
      list.incompleteCount ? String(list.incompleteCount) : ""))));
  $("lists").replaceChildren(...items);
  $("lists-empty").hidden = lists.length > 0 || document.body.dataset.ready !== "true";

  // First visit without a list in the URL: open the first list once the lists are in.
  if (!state.selectedListId && !state.autoSelected && document.body.dataset.ready === "true"
      && lists.length > 0) {
    state.autoSelected = true;
    history.replaceState(null, "", `#/lists/${encodeURIComponent(lists[0]._id)}`);
    onHashChange();
  }
}

function renderListPanel() {
  const view = $("list-view");
  const listId = state.selectedListId;
  const list = listId ? client.findOne("lists", listId) : null;
  view.dataset.listId = listId || "";
  view.dataset.todosReady = String(state.todosReady);
  if (!list) {
    const listsLoaded = document.body.dataset.ready === "true";
    view.dataset.listState = !listId ? "none" : listsLoaded ? "missing" : "loading";
    $("no-list-text").textContent = !listId ? "Pick a list, or make a new one."
      : listsLoaded ? "This list is private or was deleted." : "Loading…";
    $("no-list").hidden = false;
    $("list-panel").hidden = true;
    return;
  }
  view.dataset.listState = "shown";
  $("no-list").hidden = true;
  $("list-panel").hidden = false;

  $("list-name").textContent = String(list.name ?? "");
  $("list-name").hidden = state.renaming;
  $("rename-form").hidden = !state.renaming;
  $("rename-button").hidden = state.renaming;

  const privacy = $("privacy-button");
  privacy.hidden = !client.userId; // Meteor's Todos: only signed-in users own private lists
  privacy.dataset.action = list.userId ? "makePublic" : "makePrivate";
  privacy.textContent = list.userId ? "Make public" : "Make private";

  const todos = todosOf(listId);
  $("todos").replaceChildren(...todos.map((todo) => el("li", {
    dataset: { testid: "todo", todoId: todo._id, checked: String(Boolean(todo.checked)) },
  },
  el("input", { type: "checkbox", checked: Boolean(todo.checked), "aria-label": "done" }),
  el("span", { className: "text" }, String(todo.text ?? "")),
  el("button", { type: "button", className: "remove", title: "Remove task",
    "aria-label": "Remove task" }, "×"))));
  $("todos-empty").hidden = todos.length > 0 || !state.todosReady;
}

client.onChange((event) => {
  if (event.type === "user") updatePrivateSubscription();
  scheduleRender();
});

// ---- actions -------------------------------------------------------------------------------

$("new-list").addEventListener("click", async () => {
  const listId = await attempt("Creating a list", () => client.call("lists.insert", {}));
  if (listId) selectList(listId);
});

$("new-todo").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("new-todo-text");
  const text = input.value.trim();
  const listId = state.selectedListId;
  if (!text || !listId) return;
  input.value = "";
  const added = await attempt("Adding a task", () => client.call("todos.insert", { listId, text }));
  if (added === undefined) input.value = text; // give the text back to retry
});

$("todos").addEventListener("change", (event) => {
  const box = event.target;
  if (!(box instanceof HTMLInputElement) || box.type !== "checkbox") return;
  const todoId = box.closest("li").dataset.todoId;
  attempt("Checking a task", () => client.call("todos.setCheckedStatus",
    { todoId, newCheckedStatus: box.checked })).then(scheduleRender); // undo a refused tick
});

$("todos").addEventListener("click", (event) => {
  const button = event.target.closest("button.remove");
  if (!button) return;
  const todoId = button.closest("li").dataset.todoId;
  attempt("Removing a task", () => client.call("todos.remove", { todoId }));
});

$("rename-button").addEventListener("click", () => {
  const list = client.findOne("lists", state.selectedListId);
  if (!list) return;
  state.renaming = true;
  $("rename-input").value = list.name ?? "";
  render();
  $("rename-input").focus();
});

$("rename-cancel").addEventListener("click", () => { state.renaming = false; render(); });
$("rename-input").addEventListener("keydown", (event) => {
  if (event.key === "Escape") { state.renaming = false; render(); }
});

$("rename-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const listId = state.selectedListId;
  const newName = $("rename-input").value.trim();
  if (!listId || !newName) return;
  state.renaming = false;
  render();
  await attempt("Renaming the list", () => client.call("lists.updateName", { listId, newName }));
});

$("privacy-button").addEventListener("click", async (event) => {
  const listId = state.selectedListId;
  const method = `lists.${event.currentTarget.dataset.action}`;
  const action = method === "lists.makePrivate" ? "Making the list private"
    : "Making the list public";
  await attempt(action, () => client.call(method, { listId }));
});

// Deleting asks twice (a second click within 3 s) instead of a blocking confirm() dialog.
let deleteArmedFor = null;
$("delete-list-button").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const listId = state.selectedListId;
  if (deleteArmedFor !== listId) {
    deleteArmedFor = listId;
    button.textContent = "Really delete?";
    setTimeout(() => { deleteArmedFor = null; button.textContent = "Delete"; }, 3000);
    return;
  }
  deleteArmedFor = null;
  button.textContent = "Delete";
  const removed = await attempt("Deleting the list", async () => {
    await client.call("lists.remove", { listId });
    return true;
  });
  if (removed && state.selectedListId === listId) selectList(visibleLists()[0]?._id ?? null);
});

async function signIn(create) {
  const username = $("login-username").value.trim();
  const password = $("login-password").value;
  if (!username || !password) {
    showStatus("Enter a username and a password.", "error");
    return;
  }
  const action = create ? "Creating the account" : "Signing in";
  const result = await attempt(action, () => (create
    ? client.createUser(username, password) : client.loginWithPassword(username, password)));
  if (result) {
    $("login-password").value = "";
    showStatus(`Signed in as ${username}.`);
  }
}

$("login-form").addEventListener("submit", (event) => { event.preventDefault(); signIn(false); });
$("signup-button").addEventListener("click", () => {
  if ($("login-form").reportValidity()) signIn(true);
});
$("logout-button").addEventListener("click", async () => {
  await attempt("Signing out", () => client.logout());
});

// ---- start ---------------------------------------------------------------------------------

updateTodosSubscription();
render();

window.cdcddp = { client, ready, state, selectList, render };

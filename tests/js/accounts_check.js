// Accounts and methods through real npm DDP clients against the cdcddp Todos app:
// simpleddp creates a user (Meteor's digest form) and calls methods; asteroid logs in with its
// own loginWithPassword (plain password, accepted on loopback) and calls methods too.
"use strict";

const crypto = require("crypto");
const simpleDDP = require("simpleddp");
const { createClass } = require("asteroid");
const WebSocket = require("ws");
const { makeChecker, endpointFromArgs } = require("./ddp_common");

const t = makeChecker("accounts");
const endpoint = endpointFromArgs();
const digest = (text) => ({ digest: crypto.createHash("sha256").update(text).digest("hex"),
                            algorithm: "sha-256" });

async function withSimpleddp() {
  const server = new simpleDDP({ endpoint, SocketConstructor: WebSocket,
                                 reconnectInterval: 60000 });
  await server.connect();
  const created = await server.call("createUser", { username: "sim", password: digest("s3cret!") });
  t.check("createUser returns id and token", typeof created.id === "string"
          && typeof created.token === "string" && created.tokenExpires instanceof Date, created);
  const listId = await server.call("lists.insert", { name: "From simpleddp" });
  t.check("lists.insert returns an id", typeof listId === "string" && listId.length === 17, listId);
  const todoId = await server.call("todos.insert", { listId, text: "first" });
  t.check("todos.insert returns an id", typeof todoId === "string", todoId);
  await server.call("lists.insert", {});  // Meteor's rule: one list must stay public
  await server.call("lists.makePrivate", { listId });
  try {
    await server.call("login", { user: { username: "sim" }, password: digest("wrong") });
    t.check("a wrong password is refused", false);
  } catch (err) {
    t.check("a wrong password is a 403", err && err.error === 403, err);
  }
  try {
    await server.call("todos.insert", { listId });
    t.check("bad params are refused", false);
  } catch (err) {
    t.check("bad params are a 400", err && err.error === 400, err);
  }
  server.disconnect();
  return { token: created.token, listId, userId: created.id };
}

async function withAsteroid(first) {
  const Asteroid = createClass();
  const asteroid = new Asteroid({ endpoint, SocketConstructor: WebSocket, autoReconnect: false });
  const userId = await asteroid.loginWithPassword({ username: "sim", password: "s3cret!" });
  t.check("asteroid logs in with a password", userId === first.userId, userId);
  await asteroid.call("todos.insert", { listId: first.listId, text: "from asteroid" });
  await asteroid.call("lists.updateName", { listId: first.listId, newName: "Renamed" });
  try {
    await asteroid.call("lists.remove", { listId: "no-such-list" });
    t.check("removing a missing list fails", false);
  } catch (err) {
    t.check("a Meteor.Error reaches asteroid", err && err.errorType === "Meteor.Error", err);
  }
  await asteroid.logout();
  try {
    await asteroid.call("todos.insert", { listId: first.listId, text: "anonymous" });
    t.check("after logout a private list is closed", false);
  } catch (err) {
    t.check("after logout a private list is closed", err && err.errorType === "Meteor.Error", err);
  }
  asteroid.disconnect();
}

async function main() {
  const first = await withSimpleddp();
  await withAsteroid(first);
  t.finish();
}

main().catch(t.crash);

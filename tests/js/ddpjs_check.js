// ddp.js (with ws as its WebSocket) against a cdcddp test server.
"use strict";

const DDP = require("ddp.js").default;
const WebSocket = require("ws");
const { FIXED_ITEMS, makeChecker, checkMeteorError, endpointFromArgs } = require("./ddp_common");

const t = makeChecker("ddp.js");

function main() {
  const ddp = new DDP({ endpoint: endpointFromArgs(), SocketConstructor: WebSocket,
                        autoReconnect: false });
  const results = new Map(); // method id -> {result, updated}
  const db = {};
  const waiters = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  const until = (predicate) => new Promise((resolve) => {
    const test = () => (predicate() ? resolve() : waiters.push(test));
    test();
  });

  const entry = (id) => results.get(id) || results.set(id, {}).get(id);
  ddp.on("result", (m) => { entry(m.id).result = m; wake(); });
  ddp.on("updated", (m) => { m.methods.forEach((id) => { entry(id).updated = true; }); wake(); });
  ddp.on("added", (m) => { (db[m.collection] = db[m.collection] || {})[m.id] = { ...m.fields }; wake(); });
  ddp.on("changed", (m) => {
    const doc = db[m.collection][m.id];
    Object.assign(doc, m.fields);
    (m.cleared || []).forEach((k) => delete doc[k]);
    wake();
  });
  ddp.on("removed", (m) => { delete db[m.collection][m.id]; wake(); });
  const ready = new Set();
  const nosubs = new Map();
  ddp.on("ready", (m) => { m.subs.forEach((s) => ready.add(s)); wake(); });
  ddp.on("nosub", (m) => { nosubs.set(m.id, m.error); wake(); });

  async function call(name, params) {
    const id = ddp.method(name, params);
    await until(() => entry(id).result && entry(id).updated);
    return entry(id).result;
  }

  (async () => {
    await new Promise((resolve) => ddp.on("connected", resolve));
    const echo = await call("echo", [1, "two", { three: [3] }]);
    t.deepEqual("echo", echo.result, [1, "two", { three: [3] }]);
    const date = await call("echo", [{ $date: 1234567 }]);
    t.deepEqual("echo EJSON date passes through on the wire", date.result, [{ $date: 1234567 }]);

    checkMeteorError(t, "MeteorError", (await call("boom_meteor", [])).error, "not-allowed", "Nope");
    t.deepEqual("MeteorError details", (await call("boom_meteor", [])).error.details, { why: "test" });
    const internal = (await call("boom_internal", [])).error;
    checkMeteorError(t, "internal error", internal, 500, "Internal server error");
    t.check("internal error hides internals", !JSON.stringify(internal).includes("secret"), internal);
    checkMeteorError(t, "unknown method", (await call("nope", [])).error, 404, "Method 'nope' not found");
    const nothing = await call("nothing", []);
    t.check("a method returning None has no result key", !("result" in nothing), nothing);

    const subId = ddp.sub("fixed", []);
    await until(() => ready.has(subId));
    t.deepEqual("fixed documents", db.items, FIXED_ITEMS);

    const badId = ddp.sub("nope", []);
    await until(() => nosubs.has(badId));
    checkMeteorError(t, "unknown publication", nosubs.get(badId), 404, "Subscription 'nope' not found");

    ddp.unsub(subId);
    await until(() => nosubs.has(subId));
    t.deepEqual("unsub removed the documents, then nosub", db.items, {});
    t.check("nosub after unsub carries no error", nosubs.get(subId) === undefined, nosubs.get(subId));

    ddp.disconnect();
    t.finish();
  })().catch(t.crash);
}

main();

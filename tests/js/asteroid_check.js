// asteroid 2.x (with ws as its WebSocket) against a cdcddp test server.
"use strict";

const { createClass } = require("asteroid");
const WebSocket = require("ws");
const { FIXED_ITEMS, makeChecker, checkMeteorError, endpointFromArgs } = require("./ddp_common");

const t = makeChecker("asteroid");

const expectError = t.expectError;

async function main() {
  const Asteroid = createClass();
  const asteroid = new Asteroid({ endpoint: endpointFromArgs(), SocketConstructor: WebSocket,
                                  autoReconnect: false });
  const db = {};
  asteroid.ddp.on("added", ({ collection, id, fields }) => {
    (db[collection] = db[collection] || {})[id] = { ...fields };
  });
  asteroid.ddp.on("removed", ({ collection, id }) => { delete db[collection][id]; });
  await new Promise((resolve) => asteroid.on("connected", resolve));

  t.deepEqual("echo", await asteroid.call("echo", 1, "two", { three: [3] }), [1, "two", { three: [3] }]);
  checkMeteorError(t, "MeteorError", await expectError("boom_meteor", asteroid.call("boom_meteor")),
                   "not-allowed", "Nope");
  const internal = await expectError("boom_internal", asteroid.call("boom_internal"));
  checkMeteorError(t, "internal error", internal, 500, "Internal server error");
  checkMeteorError(t, "unknown method", await expectError("nope", asteroid.call("nope")),
                   404, "Method 'nope' not found");

  const sub = asteroid.subscribe("fixed");
  await new Promise((resolve, reject) => { sub.on("ready", resolve); sub.on("error", reject); });
  t.deepEqual("fixed documents", db.items, FIXED_ITEMS);

  const bad = asteroid.subscribe("nope");
  const subError = await new Promise((resolve) => {
    bad.on("ready", () => resolve(null));
    bad.on("error", resolve);
  });
  checkMeteorError(t, "unknown publication", subError, 404, "Subscription 'nope' not found");

  asteroid.disconnect();
  t.finish();
}

main().catch(t.crash);

// simpleddp (with ws as its WebSocket) against a cdcddp test server.
"use strict";

const simpleDDP = require("simpleddp");
const WebSocket = require("ws");
const { FIXED_ITEMS, makeChecker, checkMeteorError, endpointFromArgs } = require("./ddp_common");

const t = makeChecker("simpleddp");

const expectError = t.expectError;

async function main() {
  const server = new simpleDDP({ endpoint: endpointFromArgs(), SocketConstructor: WebSocket,
                                 reconnectInterval: 60000 });
  await server.connect();
  t.check("connected", server.connected === true);

  t.deepEqual("echo", await server.call("echo", 1, "two", { three: [3] }), [1, "two", { three: [3] }]);
  const date = await server.call("echo", new Date(1234567));
  t.check("echo Date round trip (EJSON)", Array.isArray(date) && date[0] instanceof Date
          && date[0].getTime() === 1234567, date);

  checkMeteorError(t, "MeteorError", await expectError("boom_meteor", server.call("boom_meteor")),
                   "not-allowed", "Nope");
  const internal = await expectError("boom_internal", server.call("boom_internal"));
  checkMeteorError(t, "internal error", internal, 500, "Internal server error");
  t.check("internal error hides internals", !JSON.stringify(internal).includes("secret"), internal);
  checkMeteorError(t, "unknown method", await expectError("nope", server.call("nope")),
                   404, "Method 'nope' not found");

  const sub = server.subscribe("fixed");
  await sub.ready();
  const docs = {};
  for (const doc of server.collection("items").fetch()) {
    const { id, _id, ...fields } = doc;
    docs[id || _id] = fields;
  }
  t.deepEqual("fixed documents", docs, FIXED_ITEMS);

  t.expectUnhandledRejection((e) => e && e.error === 404
                             && e.reason === "Subscription 'nope' not found");
  const missing = server.subscribe("nope");
  const subError = await expectError("unknown publication", missing.ready());
  checkMeteorError(t, "unknown publication", subError, 404, "Subscription 'nope' not found");

  await sub.stop();
  t.check("unsubscribe removes documents", server.collection("items").fetch().length === 0,
          server.collection("items").fetch());

  await server.disconnect();
  t.finish();
}

main().catch(t.crash);

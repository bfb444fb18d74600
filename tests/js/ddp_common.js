// Shared helpers for the interop scripts: collect failures, print them, exit 0/1.
"use strict";

const util = require("util");

// The fixed documents the test app's "fixed" publication sends (tests/server_support.py).
const FIXED_ITEMS = {
  a: { name: "alpha", n: 1 },
  b: { name: "beta", n: 2, tags: ["x", "y"] },
  c: { name: "gamma", n: 3, nested: { deep: true } },
};

function makeChecker(clientName) {
  const failures = [];
  let passed = 0;
  const timer = setTimeout(() => {
    failures.push("timed out after 20 s");
    finish();
  }, 20000);

  function check(what, ok, detail) {
    if (ok) passed += 1;
    else failures.push(`${what}${detail === undefined ? "" : ": " + util.inspect(detail, { depth: 5 })}`);
  }

  function deepEqual(what, actual, expected) {
    let ok = true;
    try {
      require("assert").deepStrictEqual(actual, expected);
    } catch (e) {
      ok = false;
    }
    check(what, ok, { actual, expected });
  }

  function finish() {
    clearTimeout(timer);
    if (failures.length) {
      console.log(`${clientName}: ${failures.length} failed, ${passed} passed`);
      for (const f of failures) console.log(`FAIL ${f}`);
      process.exit(1);
    }
    console.log(`${clientName}: all ${passed} checks passed`);
    process.exit(0);
  }

  // Some clients drop promises of their own (simpleddp's subscription constructor discards the
  // ready() promise it starts), so a nosub error surfaces as an unhandled rejection; a script
  // may declare which ones are expected.
  const expectedRejections = [];
  function expectUnhandledRejection(predicate) {
    expectedRejections.push(predicate);
  }

  function crash(error) {
    if (expectedRejections.some((p) => p(error))) return;
    failures.push(`unexpected exception: ${error && error.stack ? error.stack : util.inspect(error)}`);
    finish();
  }
  process.on("uncaughtException", crash);
  process.on("unhandledRejection", crash);

  // Resolves to the error a promise rejects with (null, and a failure, if it resolves).
  async function expectError(what, promise) {
    try {
      const value = await promise;
      check(`${what} should fail`, false, value);
      return null;
    } catch (err) {
      return err;
    }
  }

  return { check, deepEqual, finish, crash, expectUnhandledRejection, expectError };
}

// Meteor's error object on the wire: {error, reason, message, errorType, details?}.
function checkMeteorError(t, what, err, code, reason) {
  t.check(`${what}: error code`, err && err.error === code, err);
  t.check(`${what}: reason`, err && err.reason === reason, err);
  t.check(`${what}: errorType`, err && err.errorType === "Meteor.Error", err);
  t.check(`${what}: message`, err && err.message === `${reason} [${code}]`, err);
}

function endpointFromArgs() {
  const url = process.argv[2] || process.env.CDCDDP_URL;
  if (!url) {
    console.log("usage: node script.js ws://host:port/websocket");
    process.exit(2);
  }
  return url;
}

module.exports = { FIXED_ITEMS, makeChecker, checkMeteorError, endpointFromArgs };

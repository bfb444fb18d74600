// Meteor's own EJSON (npm meteor-standalone-ejson) as the reference for tests/test_ddp_ejson.py.
//
//   node ejson_check.js fixtures      -> JSON object {name: EJSON.stringify(value)} of JS values
//   node ejson_check.js roundtrip     <- stdin: JSON array of EJSON texts
//                                     -> JSON array of EJSON.stringify(EJSON.parse(text)),
//                                        or {"error": message} where Meteor refuses the text
"use strict";
const EJSON = require("meteor-standalone-ejson");

// A custom type like Meteor's ObjectID, registered as "oid".
class ObjectID {
  constructor(hex) { this._str = hex; }
  typeName() { return "oid"; }
  toJSONValue() { return this._str; }
  equals(other) { return other instanceof ObjectID && other._str === this._str; }
  clone() { return new ObjectID(this._str); }
}
EJSON.addType("oid", (hex) => new ObjectID(hex));

function binary(bytes) {
  const out = EJSON.newBinary(bytes.length);
  bytes.forEach((b, i) => { out[i] = b; });
  return out;
}

const fixtures = {
  brief: { a: new Date(0), b: binary([1, 2]), c: { $date: 5 }, d: Infinity },
  dates: [new Date(-1), new Date(1700000000123), new Date(Date.UTC(2024, 1, 29))],
  infnan: [NaN, Infinity, -Infinity, 1.5, -0.25],
  binary: [binary([]), binary([0, 255, 254]), binary([104, 105, 33, 63])],
  escapes: [
    { $date: 5 }, { $InfNaN: 1 }, { $binary: "AQI=" }, { $escape: { $date: 1 } },
    { $type: "oid", $value: "x" }, { $date: 5, x: 1 }, { $foo: 1 }, { $date: new Date(7) },
    { $type: "t", $value: { $date: new Date(3) } }, {},
  ],
  nested: { list: [{ deep: { when: new Date(86400000) } }, [binary([9])]], s: "$date" },
  custom: { id: new ObjectID("0123456789abcdef01234567") },
};

function main() {
  const mode = process.argv[2];
  if (mode === "fixtures") {
    const out = {};
    for (const [name, value] of Object.entries(fixtures)) out[name] = EJSON.stringify(value);
    process.stdout.write(JSON.stringify(out));
    return;
  }
  if (mode === "roundtrip") {
    const texts = JSON.parse(require("fs").readFileSync(0, "utf8"));
    const out = texts.map((text) => {
      try {
        return EJSON.stringify(EJSON.parse(text));
      } catch (err) {
        return { error: String(err && err.message) };
      }
    });
    process.stdout.write(JSON.stringify(out));
    return;
  }
  process.stderr.write("usage: node ejson_check.js fixtures|roundtrip\n");
  process.exit(2);
}

main();

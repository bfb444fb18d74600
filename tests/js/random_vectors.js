// Prints JSON test vectors computed by Meteor's own `random` package (npm
// meteor-standalone-random), for tests/test_meteor_random.py to compare against
// cdcddp.ddp.meteor_random. Run from tests/js: `node random_vectors.js`.
'use strict';

const Random = require('meteor-standalone-random');

// Seed lists cover: a DDP-style hex randomSeed plus a scope, several seeds, numbers,
// booleans, the empty string, and non-ASCII text (charCodeAt works on UTF-16 code units).
const SEED_LISTS = [
  ['0123456789abcdef0123', '/collection/todos'],
  ['0123456789abcdef0123', '/collection/lists'],
  ['5d3a1f9c0e7b2a4d6c8e', '/collection/todos'],
  ['5d3a1f9c0e7b2a4d6c8e', '/rpc/createTodo'],
  ['seed'],
  ['a', 'b', 'c'],
  [0],
  [42, 'x'],
  [123456789012345],
  [true, false],
  [''],
  ['Grüße, 世界 😀'],
];

const vectors = SEED_LISTS.map((seeds) => {
  const out = { seeds };
  let g = Random.createWithSeeds(...seeds);
  out.ids = [g.id(), g.id(), g.id(), g.id(), g.id()];
  out.short_id = g.id(5);
  g = Random.createWithSeeds(...seeds);
  out.fractions = [];
  for (let i = 0; i < 8; i++) out.fractions.push(g.fraction());
  g = Random.createWithSeeds(...seeds);
  out.hex20 = g.hexString(20);
  out.hex24 = g.hexString(24);
  out.secret = g.secret();
  out.choices = [g.choice(['x', 'y', 'z']), g.choice('abcdef'), g.choice([1, 2, 3, 4, 5, 6, 7])];
  return out;
});

// How a method's insert ids and nested-call seeds come out of one randomSeed: the
// sequence for a scope is created once per call, so successive draws continue it.
const streamSeed = 'b2c4e6a8f0d1c3e5a7b9';
const todos = Random.createWithSeeds(streamSeed, '/collection/todos');
const lists = Random.createWithSeeds(streamSeed, '/collection/lists');
const rpc = Random.createWithSeeds(streamSeed, '/rpc/addTask');
const stream = {
  seed: streamSeed,
  todos_ids: [todos.id(), todos.id(), todos.id()],
  lists_ids: [lists.id()],
  rpc_seeds: [rpc.hexString(20), rpc.hexString(20)],
};

process.stdout.write(JSON.stringify({ vectors, stream }) + '\n');

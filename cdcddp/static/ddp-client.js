// A minimal DDP client for the browser (plain ES module, no dependencies, no build step).
//
//   const client = new DDPClient(DDPClient.urlForPage());   // ws(s)://<this host>/websocket
//   const sub = client.subscribe("lists.public");
//   await sub.ready;                                          // rejects on nosub with an error
//   client.find("lists");                                     // [{_id, name, ...}]
//   const id = await client.call("lists.insert", {});        // resolves after result AND updated
//   client.onChange((event) => render());
//
// What it does: the `connect` handshake (version "1"), answers the server's `ping`, pings an
// idle server itself and reconnects with backoff when it goes quiet; `sub`/`unsub` with
// ready/nosub promises; `method` with `result` and `updated` promises (`call` waits for both, as
// Meteor runs a callback only then, so the caller's own writes are already in the local store);
// a local store of collections applying added/changed(fields + cleared)/removed; EJSON
// ($date, $binary, $InfNaN, $escape); accounts-password login (SHA-256 digest), resume tokens
// kept in localStorage and re-used on reload and on reconnect.
//
// On reconnect it re-subscribes and rebuilds the store from scratch, swapping it in only once
// every subscription is ready again (no flicker, no stale documents). Methods whose `result`
// had not arrived when the connection dropped are rejected (code "connection-lost") instead of
// being re-sent: the server may already have run them.

const ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz";
const EJSON_KEYS = new Set(["$date", "$binary", "$InfNaN", "$escape", "$type", "$value"]);

export function randomId(length = 17) {
  const bytes = crypto.getRandomValues(new Uint8Array(length));
  // 256 % 55 != 0: a tiny bias, irrelevant for subscription and method ids.
  return Array.from(bytes, (b) => ID_ALPHABET[b % ID_ALPHABET.length]).join("");
}

// ---- EJSON -------------------------------------------------------------------------------

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value)
    && !(value instanceof Date) && !(value instanceof Uint8Array);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function bytesToBase64(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

/** Wire JSON value -> JavaScript value (Date, Uint8Array, Infinity/NaN, escaped objects). */
export function fromJSONValue(value) {
  if (Array.isArray(value)) return value.map(fromJSONValue);
  if (!isPlainObject(value)) return value;
  const keys = Object.keys(value);
  if (keys.length === 1) {
    const [key] = keys;
    if (key === "$date" && typeof value.$date === "number") return new Date(value.$date);
    if (key === "$binary" && typeof value.$binary === "string") return base64ToBytes(value.$binary);
    if (key === "$InfNaN") return value.$InfNaN === 0 ? NaN : value.$InfNaN * Infinity;
    if (key === "$escape" && isPlainObject(value.$escape)) {
      const out = {};
      for (const [k, v] of Object.entries(value.$escape)) out[k] = fromJSONValue(v);
      return out;
    }
  }
  // {$type, $value}: a custom type this page does not know; kept as is.
  const out = {};
  for (const [k, v] of Object.entries(value)) out[k] = fromJSONValue(v);
  return out;
}

/** JavaScript value -> wire JSON value (the inverse of fromJSONValue). */
export function toJSONValue(value) {
  if (value instanceof Date) return { $date: value.getTime() };
  if (value instanceof Uint8Array) return { $binary: bytesToBase64(value) };
  if (typeof value === "number" && !Number.isFinite(value)) {
    return { $InfNaN: Number.isNaN(value) ? 0 : Math.sign(value) };
  }
  if (Array.isArray(value)) return value.map(toJSONValue);
  if (!isPlainObject(value)) return value === undefined ? null : value;
  const out = {};
  for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = toJSONValue(v);
  const keys = Object.keys(out);
  // An object that would read back as EJSON is escaped, as Meteor's EJSON does.
  const looksLikeEJSON = (keys.length === 1 && EJSON_KEYS.has(keys[0]))
    || (keys.length === 2 && keys.includes("$type") && keys.includes("$value"));
  return looksLikeEJSON ? { $escape: out } : out;
}

/** Meteor's MongoID.idParse for the string ids on the wire. */
export function parseId(id) {
  if (id.startsWith("-")) return id.slice(1);
  if (id.startsWith("~")) return JSON.parse(id.slice(1));
  return id;
}

// ---- SHA-256 (accounts-password digests) ---------------------------------------------------

/** Hex SHA-256 of a UTF-8 string. crypto.subtle exists only in secure contexts (https,
 * localhost); over plain http on a LAN address the small implementation below is used. */
export async function sha256Hex(text) {
  const data = new TextEncoder().encode(text);
  if (globalThis.crypto?.subtle) {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
    return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  return sha256HexFallback(data);
}

const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

/** FIPS 180-4 SHA-256 of bytes, as hex (exported so a test can compare it with crypto.subtle). */
export function sha256HexFallback(data) {
  const bitLength = data.length * 8;
  const padded = new Uint8Array(Math.ceil((data.length + 9) / 64) * 64);
  padded.set(data);
  padded[data.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bitLength / 2 ** 32));
  view.setUint32(padded.length - 4, bitLength >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let offset = 0; offset < padded.length; offset += 64) {
    for (let i = 0; i < 16; i += 1) w[i] = view.getUint32(offset + i * 4);
    for (let i = 16; i < 64; i += 1) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i += 1) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g))
        + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      [hh, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    const add = [a, b, c, d, e, f, g, hh];
    for (let i = 0; i < 8; i += 1) h[i] = (h[i] + add[i]) >>> 0;
  }
  return Array.from(h, (x) => x.toString(16).padStart(8, "0")).join("");
}

// ---- errors --------------------------------------------------------------------------------

/** A Meteor.Error from the server (or "connection-lost" from this client). */
export class DDPError extends Error {
  constructor({ error, reason, details, message } = {}) {
    super(message || (reason ? `${reason} [${error}]` : `[${error}]`));
    this.name = "DDPError";
    this.error = error;
    this.reason = reason;
    this.details = details;
  }
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // callers may never await it: no "unhandled rejection" noise
  return { promise, resolve, reject };
}

// ---- the client ----------------------------------------------------------------------------

export class DDPClient {
  /** ws(s)://<host of this page>/websocket */
  static urlForPage(location = window.location) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/websocket`;
  }

  constructor(url, options = {}) {
    this.url = url;
    this.options = {
      minDelayMs: 200, maxDelayMs: 10_000, heartbeatMs: 17_500, heartbeatTimeoutMs: 15_000,
      tokenKey: "cdcddp.loginToken", storage: safeLocalStorage(), ...options,
    };
    this.status = "connecting"; // "connecting" | "connected" | "offline" | "closed"
    this.sessionId = null;
    this.userId = null;
    this.collections = new Map(); // name -> Map(wireId -> document)
    this.reconnects = 0; // how many times a connection was re-established (tests read it)
    this._subs = new Map(); // id -> {id, name, params, readyFlag, ready: deferred, stopped}
    this._methods = new Map(); // sent, unfinished: id -> {result, updated, gotResult, ...}
    this._methodIds = 0;
    this._queue = []; // methods not sent yet: offline, or behind a `wait` method
    this._blocker = null; // id of the in-flight `wait` method (login/logout) holding the queue
    this._listeners = new Set();
    this._resync = null; // {store, waiting: Set(subId)} while rebuilding after a reconnect
    this._attempt = 0;
    this._ws = null;
    this._everConnected = false;
    this._lastReceived = Date.now();
    this._pingSentAt = null;
    this._connected = deferred();
    this._heartbeat = setInterval(() => this._checkHeartbeat(), 2_500);
    this._open();
  }

  /** Resolves on the first `connected` (after the stored token, if any, was tried). */
  get connected() { return this._connected.promise; }

  // ---- events ----

  /** listener({type: "added"|"changed"|"removed"|"status"|"user"|"resync", ...}); returns
   * a function that removes it. */
  onChange(listener) {
    this._listeners.add(listener);
    return () => this._listeners.delete(listener);
  }

  _emit(event) {
    for (const listener of this._listeners) {
      try { listener(event); } catch (error) { console.error("DDP listener failed", error); }
    }
  }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this._emit({ type: "status", status });
  }

  _setUser(userId) {
    if (this.userId === userId) return;
    this.userId = userId;
    this._emit({ type: "user", userId });
  }

  // ---- the local store ----

  /** The documents of a collection (copies are not made: treat them as read-only). */
  find(collection, predicate = () => true) {
    const docs = this.collections.get(collection);
    return docs ? Array.from(docs.values()).filter(predicate) : [];
  }

  findOne(collection, id) {
    return this.collections.get(collection)?.get(id);
  }

  _applyData(message) {
    const store = this._resync ? this._resync.store : this.collections;
    const { collection, id } = message;
    if (typeof collection !== "string" || typeof id !== "string") return;
    let docs = store.get(collection);
    if (!docs) { docs = new Map(); store.set(collection, docs); }
    if (message.msg === "added") {
      docs.set(id, { ...fromJSONValue(message.fields || {}), _id: parseId(id) });
    } else if (message.msg === "changed") {
      const doc = docs.get(id);
      if (!doc) return; // the merge box never sends this; ignore rather than invent a doc
      Object.assign(doc, fromJSONValue(message.fields || {}));
      for (const field of message.cleared || []) delete doc[field];
    } else if (message.msg === "removed") {
      docs.delete(id);
    }
    if (!this._resync) this._emit({ type: message.msg, collection, id });
  }

  // ---- connection ----

  _open() {
    this._setStatus("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._lastReceived = Date.now();
      this._rawSend({ msg: "connect", version: "1", support: ["1"] });
    };
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      this._lastReceived = Date.now();
      this._pingSentAt = null;
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      this._handle(message);
    };
    ws.onclose = () => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._lostConnection();
    };
    ws.onerror = () => {}; // onclose follows and does the work
  }

  _rawSend(message) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) {
      this._ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  _send(message) {
    if (this.status === "connected") this._rawSend(message);
  }

  _handle(message) {
    switch (message.msg) {
      case "connected": this._onConnected(message); break;
      case "failed":
        console.error("DDP version refused by the server", message);
        this._ws?.close();
        break;
      case "ping": this._rawSend(message.id === undefined ? { msg: "pong" }
        : { msg: "pong", id: message.id }); break;
      case "pong": break;
      case "added": case "changed": case "removed": this._applyData(message); break;
      case "ready": for (const id of message.subs || []) this._onReady(id); break;
      case "nosub": this._onNosub(message); break;
      case "result": this._onResult(message); break;
      case "updated": for (const id of message.methods || []) this._onUpdated(id); break;
      case "error": console.error("DDP error from server", message); break;
      default: break; // server_id greeting, future messages
    }
  }

  _onConnected(message) {
    const reconnecting = this._everConnected;
    this._everConnected = true;
    this.sessionId = message.session;
    this._attempt = 0;
    if (reconnecting) this.reconnects += 1;
    this.status = "connected"; // emitted below, once the resume login is queued
    const token = this._storedToken();
    let resumed = Promise.resolve();
    if (token) {
      // Sent before the subscriptions: the server handles one connection's messages in order,
      // so user-dependent publications already see the user.
      resumed = this._login({ resume: token }, "login", true).catch((error) => {
        // Only a refused token is forgotten; a connection drop keeps it for the next try.
        if (error.error !== "connection-lost") {
          this._forgetToken();
          this._setUser(null);
        }
      });
    } else {
      this._setUser(null);
    }
    const active = [...this._subs.values()].filter((sub) => !sub.stopped);
    if (reconnecting) {
      this._resync = { store: new Map(), waiting: new Set(active.map((sub) => sub.id)) };
    }
    this._flushMethods(); // the resume login first, then what was queued offline
    for (const sub of active) this._rawSend(subMessage(sub));
    this._maybeFinishResync();
    this._emit({ type: "status", status: "connected" });
    resumed.then(() => this._connected.resolve(this));
  }

  _lostConnection() {
    this._resync = null;
    this._blocker = null;
    for (const [id, sub] of this._subs) if (sub.stopped) this._subs.delete(id);
    for (const [id, call] of this._methods) {
      if (!call.gotResult) {
        call.result.reject(new DDPError({ error: "connection-lost",
          reason: "The connection was lost before the method returned" }));
      }
      // Its data messages (if any) come back with the resubscription.
      call.updated.resolve();
      this._methods.delete(id);
    }
    this._setStatus("offline");
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this.status === "closed") return;
    const base = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** this._attempt);
    this._attempt += 1;
    const delay = base * (0.5 + Math.random() * 0.5); // jitter: clients do not return in step
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  /** Drop the socket now and reconnect at once (tests; a "retry now" button). */
  reconnect() {
    this._attempt = 0;
    if (this._ws) this._ws.close();
    else { clearTimeout(this._reconnectTimer); this._open(); }
  }

  close() {
    this._setStatus("closed");
    clearInterval(this._heartbeat);
    clearTimeout(this._reconnectTimer);
    const ws = this._ws;
    this._ws = null;
    ws?.close();
  }

  _checkHeartbeat() {
    if (this.status !== "connected") return;
    const now = Date.now();
    if (this._pingSentAt !== null) {
      if (now - this._pingSentAt > this.options.heartbeatTimeoutMs) this._ws?.close();
    } else if (now - this._lastReceived > this.options.heartbeatMs) {
      this._pingSentAt = now;
      this._rawSend({ msg: "ping", id: randomId(8) });
    }
  }

  // ---- subscriptions ----

  /** Returns {id, name, params, ready: Promise, stop()}; `ready` rejects with a DDPError
   * if the server answers nosub with an error. */
  subscribe(name, ...params) {
    const sub = { id: randomId(), name, params, readyFlag: false, ready: deferred(),
      stopped: false, error: null };
    this._subs.set(sub.id, sub);
    if (this._resync) this._resync.waiting.add(sub.id);
    this._send(subMessage(sub));
    return {
      id: sub.id, name, params,
      ready: sub.ready.promise,
      isReady: () => sub.readyFlag,
      stop: () => this._unsubscribe(sub.id),
    };
  }

  _unsubscribe(id) {
    const sub = this._subs.get(id);
    if (!sub || sub.stopped) return;
    sub.stopped = true;
    this._send({ msg: "unsub", id }); // the server's nosub removes it from _subs
    if (this.status !== "connected") this._subs.delete(id);
  }

  _onReady(id) {
    const sub = this._subs.get(id);
    if (!sub) return;
    sub.readyFlag = true;
    sub.ready.resolve(sub.id);
    if (this._resync) { this._resync.waiting.delete(id); this._maybeFinishResync(); }
    this._emit({ type: "ready", subId: id, name: sub.name });
  }

  _onNosub(message) {
    const sub = this._subs.get(message.id);
    if (!sub) return;
    this._subs.delete(message.id);
    const error = message.error ? new DDPError(message.error) : null;
    sub.error = error;
    if (error) sub.ready.reject(error);
    else sub.ready.resolve(sub.id); // stopped before ready: nothing will come
    if (this._resync) { this._resync.waiting.delete(message.id); this._maybeFinishResync(); }
    this._emit({ type: "nosub", subId: message.id, name: sub.name, error });
  }

  _maybeFinishResync() {
    if (!this._resync || this._resync.waiting.size > 0) return;
    this.collections = this._resync.store;
    this._resync = null;
    this._emit({ type: "resync" });
  }

  // ---- methods ----

  /** Send a method; returns {id, result: Promise, updated: Promise}. Methods with
   * `wait: true` (login, logout) hold back later methods until both of theirs arrived, and
   * `front: true` puts one ahead of everything queued (the resume login on reconnect). */
  apply(name, params = [], { wait = false, front = false } = {}) {
    this._methodIds += 1;
    const id = String(this._methodIds);
    const call = { result: deferred(), updated: deferred(), gotResult: false, gotUpdated: false };
    const message = { msg: "method", id, method: name, params: toJSONValue(params),
      randomSeed: randomId(20) };
    const entry = { id, message, call, wait };
    if (front) this._queue.unshift(entry);
    else this._queue.push(entry);
    this._flushMethods();
    return { id, result: call.result.promise, updated: call.updated.promise };
  }

  _flushMethods() {
    while (this.status === "connected" && this._blocker === null && this._queue.length > 0) {
      const entry = this._queue.shift();
      this._methods.set(entry.id, entry.call);
      this._rawSend(entry.message);
      if (entry.wait) this._blocker = entry.id;
    }
  }

  /** Resolves with the method's result once `result` and `updated` both arrived. */
  async call(name, ...params) {
    const { result, updated } = this.apply(name, params);
    const [value] = await Promise.all([result, updated]);
    return value;
  }

  _onResult(message) {
    const call = this._methods.get(message.id);
    if (!call) return;
    call.gotResult = true;
    if (message.error) call.result.reject(new DDPError(message.error));
    else call.result.resolve(fromJSONValue(message.result));
    this._forgetMethodIfDone(message.id, call);
  }

  _onUpdated(id) {
    const call = this._methods.get(id);
    if (!call) return;
    call.gotUpdated = true;
    call.updated.resolve();
    this._forgetMethodIfDone(id, call);
  }

  _forgetMethodIfDone(id, call) {
    if (!call.gotResult || !call.gotUpdated) return;
    this._methods.delete(id);
    if (this._blocker === id) {
      this._blocker = null;
      this._flushMethods();
    }
  }

  // ---- accounts ----

  get user() {
    return this.userId ? this.findOne("users", this.userId) || null : null;
  }

  async loginWithPassword(username, password) {
    return this._login({ user: { username }, password: await passwordDigest(password) });
  }

  async createUser(username, password) {
    return this._login({ username, password: await passwordDigest(password) }, "createUser");
  }

  async logout() {
    const { result, updated } = this.apply("logout", [], { wait: true });
    try {
      await Promise.all([result, updated]);
    } finally {
      this._forgetToken();
      this._setUser(null);
    }
  }

  async _login(options, method = "login", front = false) {
    const { result, updated } = this.apply(method, [options], { wait: true, front });
    const [value] = await Promise.all([result, updated]);
    if (value && value.token) this._storeToken(value.token);
    this._setUser(value ? value.id : null);
    return value;
  }

  _storedToken() {
    try { return this.options.storage?.getItem(this.options.tokenKey) || null; } catch {
      return null;
    }
  }

  _storeToken(token) {
    try { this.options.storage?.setItem(this.options.tokenKey, token); } catch { /* private */ }
  }

  _forgetToken() {
    try { this.options.storage?.removeItem(this.options.tokenKey); } catch { /* private */ }
  }
}

async function passwordDigest(password) {
  return { digest: await sha256Hex(password), algorithm: "sha-256" };
}

function subMessage(sub) {
  return { msg: "sub", id: sub.id, name: sub.name, params: toJSONValue(sub.params) };
}

function safeLocalStorage() {
  try { return window.localStorage; } catch { return null; } // blocked storage: no resume
}

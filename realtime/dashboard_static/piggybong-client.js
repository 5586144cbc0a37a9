// PiggyBong Realtime: a JavaScript client (ES module) for browsers and Node (a global
// WebSocket, or pass `WebSocket`). It does what clients/python/piggybong_client does:
//
// - reconnects with exponential backoff and full jitter; a close 1001 (a server draining or
//   restarting) reconnects at once; 4003 (forbidden) stops; a connect refused with
//   `retry_after` (a busy node) waits at least that long, plus up to as long again of jitter;
// - gets its token from a callback, at every connect and before `exp` (`refresh`);
// - keeps, per channel, the (epoch, offset) of the last publication it handed over, and
//   resumes every channel with `since` in one `connect`;
// - hands each publication to `onEvent` once and in offset order: a live event past the next
//   offset makes it fetch the gap with `history` first; one at or below the last offset is
//   dropped. `recovered: false` (or a new epoch) calls `onResync(channel)`: the app refetches
//   that channel's state from its backend.
//
// JSON by default; `encoding: "msgpack"` loads @msgpack/msgpack (or pass `msgpack: {encode,
// decode}`). docs/protocol.md, section 9, describes the algorithm.

/** Seconds before `exp` at which the token is refreshed (at most half its lifetime). */
export const REFRESH_MARGIN = 60;
/** Publications asked for per `history` call while filling a gap (the server's maximum). */
export const HISTORY_PAGE = 100;

/** An error reply: `code`, `message` and `retryAfter` as the server sent them. */
export class ClientError extends Error {
  constructor(error) {
    super(`${error?.code}: ${error?.message}`);
    this.code = String(error?.code);
    this.retryAfter = error?.retry_after;
  }
}

/** Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base*2^n)) s. */
export class Backoff {
  constructor({ base = 0.5, cap = 30, random = Math.random } = {}) {
    Object.assign(this, { base, cap, random, attempt: 0 });
  }

  nextDelay() {
    const ceiling = Math.min(this.cap, this.base * 2 ** Math.min(this.attempt, 32));
    this.attempt += 1;
    return this.random() * ceiling;
  }

  reset() {
    this.attempt = 0;
  }

  /** The next delay; when the server said when to come back (`retryAfter` s), at least that
   * plus up to as long again of jitter, so that a crowd told the same time does not return
   * at once. */
  nextDelayAfter(retryAfter) {
    const delay = this.nextDelay();
    const told = Number(retryAfter);
    return told > 0 && told <= 300 ? Math.max(delay, told * (1 + this.random())) : delay;
  }
}

/** The `exp` claim of a JWT (not verified: the server does that), or null. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });

export class Client {
  /**
   * @param {string} url  ws://host:port/v1/ws
   * @param {object} options
   *   token: async () => string (called at every connect and before exp)
   *   onEvent(publication), onResync(channel), onNotification(message), onPresence(message),
   *   onState(state: "connecting" | "connected" | "disconnected" | "closed", detail)
   *   encoding: "json" | "msgpack"; msgpack: {encode, decode}; WebSocket: a constructor;
   *   backoff: Backoff; commandTimeout: seconds (10)
   */
  constructor(url, options) {
    this.url = url;
    this.tokenProvider = options.token;
    this.onEvent = options.onEvent ?? (() => {});
    this.onResync = options.onResync ?? (() => {});
    this.onNotification = options.onNotification ?? (() => {});
    this.onPresence = options.onPresence ?? (() => {});
    this.onState = options.onState ?? (() => {});
    this.encoding = options.encoding ?? "json";
    this.msgpack = options.msgpack ?? null;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.backoff = options.backoff ?? new Backoff();
    this.commandTimeout = (options.commandTimeout ?? 10) * 1000;
    /** channel -> {position: {epoch, offset} | null, buffer: items | null, presence} */
    this.channels = new Map();
    this.stats = { connects: 0, recovered: 0, resyncs: 0, gapsFilled: 0, duplicatesDropped: 0, refreshes: 0 };
    this.session = null; // the last connect result
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.closing = false;
    this.abort = new AbortController();
    this.connectedWaiters = [];
    this.lastClose = null;
    this.retryAfter = null; // what the last refused connect said of when to come back
  }

  // ---------------------------------------------------------------- the app's calls

  /** Starts the connect loop; resolves with the first connect result. */
  start() {
    const first = this.waitConnected();
    this.loop = this.run();
    return first;
  }

  /** Resolves with the connect result once connected (now, or at the next connect). */
  waitConnected() {
    if (this.ws && this.session) return Promise.resolve(this.session);
    return new Promise((resolve) => this.connectedWaiters.push(resolve));
  }

  get connected() {
    return this.ws !== null && this.session !== null;
  }

  position(channel) {
    return this.channels.get(channel)?.position ?? null;
  }

  /** Follows `channel` from now on, across reconnects. `presence: true` asks for counts. */
  async subscribe(channel, { presence = false } = {}) {
    if (this.channels.has(channel)) return;
    this.channels.set(channel, { position: null, buffer: null, presence });
    if (this.connected) {
      const fields = { channel, ...(presence ? { presence } : {}) };
      try {
        await this.command("subscribe", fields, (result) => this.settle(channel, null, result));
      } catch (error) {
        this.channels.delete(channel);
        throw error;
      }
    }
  }

  async unsubscribe(channel) {
    if (!this.channels.delete(channel)) return;
    if (this.connected) await this.command("unsubscribe", { channel });
  }

  publish(channel, event, data = {}) {
    return this.command("publish", { channel, event, data });
  }

  /** The `history` op: `since` is {epoch, offset} (or null: the latest `limit`). */
  history(channel, { since = null, limit = HISTORY_PAGE } = {}) {
    return this.command("history", { channel, limit, ...(since ? { since: { epoch: since.epoch, offset: since.offset } } : {}) });
  }

  presence(channel) {
    return this.command("presence", { channel });
  }

  ping() {
    return this.command("ping", {});
  }

  /** Closes for good (1000); the loop ends. */
  async close() {
    this.closing = true;
    this.abort.abort();
    this.ws?.close(1000);
    await this.loop;
    this.onState("closed");
  }

  // ---------------------------------------------------------------- the loop

  async run() {
    while (!this.closing) {
      let code = null;
      try {
        code = await this.sessionOnce();
      } catch (error) {
        this.onState("disconnected", { error });
      }
      if (this.closing) return;
      if (code === 4003) {
        this.onState("closed", { code });
        return; // a refused user: reconnecting cannot help
      }
      if (code === 1001) this.backoff.reset(); // draining or restarting: somewhere else, now
      const told = this.retryAfter;
      this.retryAfter = null;
      await sleep(this.backoff.nextDelayAfter(told) * 1000, this.abort.signal);
    }
  }

  async openSocket() {
    const protocol = this.encoding === "msgpack" ? "piggybong.v1.msgpack" : "piggybong.v1.json";
    if (this.encoding === "msgpack" && this.msgpack === null) {
      this.msgpack = await import("@msgpack/msgpack");
    }
    const ws = new this.WebSocket(this.url, [protocol]);
    ws.binaryType = "arraybuffer";
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("WebSocket failed to open"));
      ws.onclose = (ev) => reject(new Error(`WebSocket closed (${ev.code}) before it opened`));
    });
    return ws;
  }

  async sessionOnce() {
    this.onState("connecting");
    const ws = await this.openSocket();
    this.ws = ws;
    const closed = new Promise((resolve) => {
      ws.onclose = (ev) => resolve(ev.code);
      ws.onerror = () => {};
    });
    ws.onmessage = (ev) => this.receive(ev.data);
    let refresher = null;
    try {
      const token = await this.tokenProvider();
      // Channels watched for presence are subscribed after the connect (a connect entry
      // cannot ask for presence pushes); the others resume in the connect itself.
      const positions = new Map([...this.channels].map(([name, state]) => [name, state.position]));
      const watched = [...this.channels].filter(([, state]) => state.presence).map(([name]) => name);
      const wanted = new Map([...positions].filter(([name]) => !watched.includes(name)));
      const sinceOf = (since) => (since ? { since: { epoch: since.epoch, offset: since.offset } } : {});
      const channels = [...wanted].map(([channel, since]) => ({ channel, ...sinceOf(since) }));
      const result = await Promise.race([
        this.command("connect", { token, client: { app: "piggybong-js", version: "0.1.0" }, channels }, (result) => {
          for (const [name, entry] of Object.entries(result.channels ?? {})) {
            if (!this.channels.has(name)) this.channels.set(name, { position: null, buffer: null, presence: false });
            this.settle(name, wanted.get(name) ?? null, entry);
          }
        }),
        closed.then((code) => Promise.reject(new ClientError({ code, message: "closed during connect" }))),
      ]);
      this.session = result;
      this.stats.connects += 1;
      this.backoff.reset();
      for (const name of watched) {
        const since = positions.get(name) ?? null;
        const fields = { channel: name, presence: true, ...sinceOf(since) };
        this.command("subscribe", fields, (r) => this.settle(name, since, r)).catch(() => {});
      }
      refresher = this.refreshLoop(token);
      this.onState("connected", result);
      for (const resolve of this.connectedWaiters.splice(0)) resolve(result);
      const code = await closed;
      this.lastClose = code;
      return code;
    } catch (error) {
      this.retryAfter = error instanceof ClientError ? error.retryAfter : null; // e.g. a busy node
      ws.close();
      const code = await closed;
      this.lastClose = code;
      return code;
    } finally {
      this.ws = null;
      this.session = null;
      refresher?.stop();
      for (const { reject, timer } of this.pending.values()) {
        clearTimeout(timer);
        reject(new Error("connection lost"));
      }
      this.pending.clear();
      for (const state of this.channels.values()) state.buffer = null; // resumed at the next connect
      if (!this.closing) this.onState("disconnected", { code: this.lastClose });
    }
  }

  receive(data) {
    const message = this.decode(data);
    if (message.type === undefined && Number.isInteger(message.id)) {
      const pending = this.pending.get(message.id);
      if (!pending) return;
      this.pending.delete(message.id);
      clearTimeout(pending.timer);
      if ("error" in message) {
        pending.reject(new ClientError(message.error));
        return;
      }
      // Run before any later frame is handled: recovered publications come before live ones.
      if (pending.onResult) pending.onResult(message.result);
      pending.resolve(message.result);
      return;
    }
    switch (message.type) {
      case "event":
        this.live(message.channel, [message]);
        break;
      case "batch":
        this.live(message.channel, message.items.map((item) => ({ ...item, channel: message.channel })));
        break;
      case "notification":
        this.onNotification(message);
        break;
      case "presence":
        this.onPresence(message);
        break;
      default:
        break;
    }
  }

  // ---------------------------------------------------------------- positions

  settle(channel, since, result) {
    const state = this.channels.get(channel) ?? { position: null, buffer: null, presence: false };
    this.channels.set(channel, state);
    if (since && "recovered" in result) {
      if (result.recovered) {
        this.stats.recovered += 1;
        for (const publication of result.publications ?? []) {
          if (publication.offset > since.offset) this.onEvent(publication);
        }
      } else {
        this.stats.resyncs += 1;
        this.onResync(channel);
      }
    }
    if (typeof result.epoch === "string") state.position = { epoch: result.epoch, offset: result.offset };
  }

  live(channel, items) {
    const state = this.channels.get(channel);
    for (const item of items) {
      if (!state || !state.position || !Number.isInteger(item.offset)) {
        this.onEvent(item);
        continue;
      }
      if (state.buffer) {
        state.buffer.push(item);
        continue;
      }
      const { offset } = item;
      if (offset <= state.position.offset) {
        this.stats.duplicatesDropped += 1;
      } else if (offset > state.position.offset + 1) {
        state.buffer = [item]; // held while the gap is fetched
        this.fill(channel, state);
      } else {
        this.onEvent(item);
        state.position.offset = offset;
      }
    }
  }

  async fill(channel, state) {
    const position = state.position;
    const until = state.buffer[0].offset;
    try {
      while (position.offset + 1 < until) {
        const page = await this.history(channel, { since: position });
        if (page.epoch !== position.epoch) {
          this.stats.resyncs += 1;
          this.onResync(channel);
          position.epoch = page.epoch;
          break;
        }
        const publications = page.publications.filter((p) => p.offset < until);
        for (const publication of publications) {
          this.onEvent(publication);
          position.offset = publication.offset;
          this.stats.gapsFilled += 1;
        }
        if (page.publications.length < HISTORY_PAGE || publications.length === 0) break; // holes
      }
    } catch {
      // the connection dropped or the history is down: the next connect resumes
    }
    if (state.buffer === null) return; // disconnected meanwhile: resumed from the position
    const held = state.buffer;
    state.buffer = null;
    for (const item of held) {
      if (item.offset > position.offset) {
        this.onEvent(item);
        position.offset = item.offset;
      } else {
        this.stats.duplicatesDropped += 1;
      }
    }
  }

  // ---------------------------------------------------------------- token refresh

  refreshLoop(token) {
    let timer = null;
    let stopped = false;
    const schedule = (current) => {
      const exp = tokenExpiry(current);
      if (exp === null || stopped) return;
      const left = exp - Date.now() / 1000;
      const wait = Math.max(1, Math.min(left - REFRESH_MARGIN, left / 2));
      timer = setTimeout(async () => {
        try {
          const next = await this.tokenProvider();
          await this.command("refresh", { token: next });
          this.stats.refreshes += 1;
          schedule(next);
        } catch {
          if (!stopped) timer = setTimeout(() => schedule(current), 1000);
        }
      }, wait * 1000);
    };
    schedule(token);
    return {
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  // ---------------------------------------------------------------- wire

  command(op, fields, onResult = null) {
    const ws = this.ws;
    if (ws === null) return Promise.reject(new Error("not connected"));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${op}: no reply within ${this.commandTimeout} ms`));
      }, this.commandTimeout);
      this.pending.set(id, { resolve, reject, timer, onResult });
      ws.send(this.encode({ id, op, ...fields }));
    });
  }

  encode(message) {
    return this.encoding === "msgpack" ? this.msgpack.encode(message) : JSON.stringify(message);
  }

  decode(data) {
    if (typeof data === "string") return JSON.parse(data);
    return this.msgpack.decode(new Uint8Array(data));
  }
}

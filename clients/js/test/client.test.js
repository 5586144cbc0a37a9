// The client against the real server (and a real Redis): connect, subscribe, publish,
// history, presence, msgpack, token refresh, gap fill, and resume after a server restart.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Backoff, Client, tokenExpiry } from "../src/index.js";
import { mintToken, sleep, startRedis, startServer, until } from "./helpers.js";

// Node 22+ (and 20/21 with --experimental-websocket) has a global WebSocket; older: ws.
const WebSocket = globalThis.WebSocket ?? (await import("ws")).WebSocket;
const servers = [];
after(async () => {
  for (const stop of servers.reverse()) await stop();
});

async function server(options) {
  const s = await startServer(options);
  servers.push(s.stop);
  return s;
}

function client(url, user, options = {}) {
  const events = [];
  const resyncs = [];
  const c = new Client(url, {
    token: async () => mintToken(user, options.tokenOptions ?? {}),
    onEvent: (e) => events.push(e),
    onResync: (channel) => resyncs.push(channel),
    backoff: new Backoff({ base: 0.1, cap: 0.5 }),
    WebSocket,
    ...options,
  });
  return { c, events, resyncs };
}

test("tokenExpiry reads exp; Backoff is full jitter under an exponential cap", () => {
  assert.equal(tokenExpiry(mintToken("u", { ttl: 10 })) - Math.floor(Date.now() / 1000), 10);
  assert.equal(tokenExpiry("garbage"), null);
  const backoff = new Backoff({ base: 1, cap: 5, random: () => 1 });
  assert.deepEqual([1, 2, 3, 4].map(() => backoff.nextDelay()), [1, 2, 4, 5]);
  backoff.reset();
  assert.equal(backoff.nextDelay(), 1);
  backoff.reset();
  assert.equal(backoff.nextDelayAfter(3), 6); // told 3 s: 3 s plus up to 3 s of jitter
  assert.equal(backoff.nextDelayAfter(null), 2); // told nothing: the backoff's own
  assert.equal(backoff.nextDelayAfter("soon"), 4);
});

test("connect, subscribe, publish, history and presence, in JSON and msgpack", { timeout: 30000 }, async () => {
  const s = await server();
  for (const encoding of ["json", "msgpack"]) {
    const { c, events } = client(s.wsUrl, `fan-${encoding}`, { encoding });
    const session = await c.start();
    assert.equal(session.user, `fan-${encoding}`);
    await c.subscribe(`artist:${encoding}`);
    const { offsets } = await s.publish({ channel: `artist:${encoding}`, event: "news", data: { n: 1 } });
    await until(() => events.some((e) => e.event === "news"), 5000, "the event");
    const event = events.find((e) => e.event === "news");
    assert.deepEqual([event.channel, event.data, event.offset], [`artist:${encoding}`, { n: 1 }, offsets[0]]);
    const own = await c.publish(`user:fan-${encoding}`, "sync", { k: "v" });
    assert.equal(typeof own.id, "string");
    const page = await c.history(`artist:${encoding}`, { limit: 10 });
    assert.deepEqual(page.publications.map((p) => p.offset), offsets);
    const presence = await c.presence(`artist:${encoding}`);
    assert.deepEqual([presence.users, presence.connections], [1, 1]);
    await assert.rejects(c.subscribe("premium:x"), (error) => error.code === "forbidden");
    await c.close();
  }
});

test("presence pushes, also after a reconnect", { timeout: 30000 }, async () => {
  let s = await server();
  const pushes = [];
  const { c } = client(s.wsUrl, "fan-presence", { onPresence: (m) => pushes.push(m) });
  await c.start();
  await c.subscribe("artist:presence", { presence: true });
  await until(() => pushes.length === 1, 5000, "the first presence push");
  assert.deepEqual([pushes[0].channel, pushes[0].users, pushes[0].connections], ["artist:presence", 1, 1]);
  assert.equal(await s.stop(), 0);
  s = await server({ port: s.port });
  await c.waitConnected();
  await until(() => pushes.length === 2, 5000, "the presence push after the reconnect");
  assert.equal(pushes[1].connections, 1);
  await c.close();
});

test("a live gap is filled from history before the later event", { timeout: 30000 }, async () => {
  const s = await server();
  const { c, events } = client(s.wsUrl, "fan-gap");
  await c.start();
  await c.subscribe("artist:gap");
  for (let i = 1; i <= 5; i++) await s.publish({ channel: "artist:gap", event: "e", data: { i } });
  await until(() => events.length === 5, 5000, "5 events");
  // Forget offsets 3..5 as if they had been lost on the way; the next live one shows the gap.
  c.position("artist:gap").offset = 2;
  events.length = 0;
  await s.publish({ channel: "artist:gap", event: "e", data: { i: 6 } });
  await until(() => events.length === 4, 5000, "the filled gap");
  assert.deepEqual(events.map((e) => e.offset), [3, 4, 5, 6]);
  assert.equal(c.stats.gapsFilled, 3);
  await c.close();
});

test("the token is refreshed through the callback before it expires", { timeout: 30000 }, async () => {
  const s = await server();
  let minted = 0;
  const { c } = client(s.wsUrl, "fan-refresh", {
    token: async () => (minted++, mintToken("fan-refresh", { ttl: 3 })),
  });
  await c.start();
  await sleep(4500); // past the first token's exp: closed 4001 without a refresh
  assert.ok(c.connected);
  assert.ok(c.stats.refreshes >= 1 && minted >= 2, `refreshes ${c.stats.refreshes}`);
  assert.equal(c.stats.connects, 1);
  await c.ping();
  await c.close();
});

test("resume after a server restart on Redis: what was published meanwhile, once, in order", { timeout: 60000 }, async () => {
  const redis = await startRedis();
  servers.push(redis.stop);
  const env = { REALTIME_REDIS_URL: redis.url };
  let a = await server({ env });
  const b = await server({ env }); // stays up: publishes while a is down
  const { c, events, resyncs } = client(a.wsUrl, "fan-resume");
  await c.start();
  await c.subscribe("artist:resume");
  for (let i = 1; i <= 3; i++) await b.publish({ channel: "artist:resume", event: "e", data: { i } });
  await until(() => events.length === 3, 5000, "3 live events");
  assert.equal(await a.stop(), 0);
  await until(() => !c.connected, 5000, "the disconnect");
  for (let i = 4; i <= 6; i++) await b.publish({ channel: "artist:resume", event: "e", data: { i } });
  a = await server({ env, port: a.port });
  await c.waitConnected();
  await until(() => events.length === 6, 5000, "the recovered events");
  await b.publish({ channel: "artist:resume", event: "e", data: { i: 7 } });
  await until(() => events.length === 7, 5000, "the next live event");
  assert.deepEqual(events.map((e) => e.data.i), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(events.map((e) => e.offset), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(resyncs, []);
  assert.equal(c.stats.recovered >= 1 && c.stats.connects, 2);
  await c.close();
});

test("resume after a restart without Redis: the history is gone, the client resyncs", { timeout: 60000 }, async () => {
  let s = await server();
  const { c, events, resyncs } = client(s.wsUrl, "fan-memory");
  await c.start();
  await c.subscribe("artist:memory");
  await s.publish({ channel: "artist:memory", event: "e", data: { i: 1 } });
  await until(() => events.length === 1, 5000, "the event");
  assert.equal(await s.stop(), 0);
  s = await server({ port: s.port });
  await c.waitConnected();
  await until(() => resyncs.includes("artist:memory"), 5000, "the resync");
  assert.deepEqual(resyncs.sort(), ["artist:memory", "user:fan-memory"]); // both histories lost
  await s.publish({ channel: "artist:memory", event: "e", data: { i: 2 } });
  await until(() => events.length === 2, 5000, "the live event of the new epoch");
  assert.equal(events[1].offset, 1); // offsets restarted with the new epoch
  await c.close();
});

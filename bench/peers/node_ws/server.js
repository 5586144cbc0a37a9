// The Node `ws` peer of the fan-out benchmark: what a team might pick instead of ours.
//
// Like bench/baseline_server.py it speaks just enough of protocol-v1 for the benchmark's
// clients (`connect` and `subscribe` replies, `event` messages, JSON only) and of the HTTP
// API (`POST /v1/publish` with one event or a list, `GET /healthz`); it checks no token and
// no API key. A published event is serialized once (one Buffer) and handed to `send` of
// every subscriber in a loop: the peers table's "serialize once, loop send". No compression.
//
// Run: node bench/peers/node_ws/server.js --port 8100
"use strict";

const http = require("http");
const { WebSocketServer } = require("ws");

const SUBPROTOCOL = "piggybong.v1.json";
const argv = process.argv.slice(2);
const port = Number(argv[argv.indexOf("--port") + 1] || 8100);
const host = "127.0.0.1";

const channels = new Map(); // channel -> Set<WebSocket>
let nextId = 1;

function publish(items) {
  const ids = [];
  for (const item of items) {
    const id = `n-${nextId++}`;
    ids.push(id);
    const channel = String(item.channel);
    const frame = Buffer.from(JSON.stringify({
      type: "event", channel, event: item.event, id, ts: Date.now(),
      data: item.data === undefined ? null : item.data,
    }));
    const subs = channels.get(channel);
    if (subs === undefined) continue;
    for (const ws of subs) ws.send(frame, { binary: false });
  }
  return ids;
}

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/healthz") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end('{"status":"ok","node":"node-ws"}');
    return;
  }
  if (req.method !== "POST" || req.url !== "/v1/publish") {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString());
    } catch {
      res.writeHead(400).end();
      return;
    }
    const ids = publish(Array.isArray(body) ? body : [body]);
    const answer = JSON.stringify(Array.isArray(body) ? { ids } : { id: ids[0] });
    res.writeHead(202, {
      "content-type": "application/json", "content-length": Buffer.byteLength(answer),
    });
    res.end(answer);
  });
});

const wss = new WebSocketServer({
  server, path: "/v1/ws", perMessageDeflate: false,
  handleProtocols: (offered) => (offered.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
});

wss.on("connection", (ws) => {
  const mine = new Set();
  ws.on("message", (raw) => {
    let command;
    try {
      command = JSON.parse(raw.toString());
    } catch {
      ws.close(4000);
      return;
    }
    let result = {};
    if (command.op === "subscribe") {
      const channel = String(command.channel);
      if (!channels.has(channel)) channels.set(channel, new Set());
      channels.get(channel).add(ws);
      mine.add(channel);
    } else if (command.op === "connect") {
      result = { session: "node-ws", user: "", tier: "free", subscriptions: [] };
    }
    ws.send(JSON.stringify({ id: command.id === undefined ? null : command.id, result }));
  });
  ws.on("close", () => {
    for (const channel of mine) {
      const subs = channels.get(channel);
      if (subs !== undefined) subs.delete(ws);
    }
  });
});

server.keepAliveTimeout = 120_000; // the publishers' lanes stay open between steps
server.listen({ port, host, backlog: 4096 });
process.on("SIGTERM", () => process.exit(0));

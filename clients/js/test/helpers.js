// The real server and a real Redis for the client's tests: `python -m realtime serve` from the
// repository's .venv (or $PIGGYBONG_PYTHON), and `redis-server` on free ports.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { connect, createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { existsSync } from "node:fs";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const JWT_SECRET = "test-secret-0123456789abcdef0123456789";
export const API_KEY = "test-api-key";
const PYTHON = process.env.PIGGYBONG_PYTHON ?? path.join(ROOT, ".venv/bin/python");

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` every 20 ms until it returns truthy, or throws after `timeout` ms. */
export async function until(check, timeout = 5000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 token for `user` valid for `ttl` seconds (what `realtime token` mints). */
export function mintToken(user, { tier, ttl = 3600 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: user, iat: now, exp: now + ttl, aud: "authenticated", ...(tier ? { tier } : {}) };
  const head = `${b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64url(JSON.stringify(claims))}`;
  return `${head}.${createHmac("sha256", JWT_SECRET).update(head).digest("base64url")}`;
}

export async function startRedis() {
  const port = await freePort();
  const bin = ["/usr/bin/redis-server", "/usr/sbin/redis-server"].find(existsSync) ?? "redis-server";
  const proc = spawn(bin, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  const url = `redis://127.0.0.1:${port}/0`;
  await until(() => new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => (socket.destroy(), resolve(true)));
    socket.once("error", () => resolve(false));
  }), 10000, "redis-server");
  return { url, port, stop: () => stopProcess(proc) };
}

function stopProcess(proc, signal = "SIGTERM") {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(proc.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20000);
    proc.once("exit", (code) => (clearTimeout(timer), resolve(code)));
    proc.kill(signal);
  });
}

/** A running server; `stop()` sends SIGTERM and resolves with the exit code. */
export async function startServer({ port, env = {} } = {}) {
  port ??= await freePort();
  let log = "";
  const proc = spawn(PYTHON, ["-m", "realtime", "serve"], {
    cwd: ROOT,
    env: {
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("REALTIME_"))),
      REALTIME_HOST: "127.0.0.1",
      REALTIME_PORT: String(port),
      REALTIME_JWT_SECRET: JWT_SECRET,
      REALTIME_API_KEYS: API_KEY,
      PYTHONPATH: ROOT,
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  proc.stdout.on("data", (d) => (log += d));
  proc.stderr.on("data", (d) => (log += d));
  const base = `http://127.0.0.1:${port}`;
  await until(async () => {
    if (proc.exitCode !== null) throw new Error(`server exited ${proc.exitCode}:\n${log}`);
    try {
      return (await fetch(`${base}/healthz`)).ok;
    } catch {
      return false;
    }
  }, 20000, "the server");
  return {
    port,
    base,
    wsUrl: `ws://127.0.0.1:${port}/v1/ws`,
    log: () => log,
    stop: () => stopProcess(proc),
    async publish(body) {
      const response = await fetch(`${base}/v1/publish`, {
        method: "POST",
        headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.status !== 202) throw new Error(`publish: ${response.status} ${await response.text()}`);
      return response.json();
    },
  };
}

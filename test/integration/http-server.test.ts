// The HTTP rules that only a real socket shows: what Bun.serve answers before the app sees a
// request (its own body limit answered a bare 413 with Connection: close), against the
// scheduler role as it is started in production.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect } from "node:net";
import { loadConfig } from "../../src/config";
import { silentLogger } from "../../src/log";
import { Scheduler } from "../../src/scheduler/scheduler";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const LIMIT = 1024;
/** A body this long is never sent: the server must have answered first. */
const ENDLESS = 256 * 1024 * 1024;
let scheduler: Scheduler;
let url: string;
let port: number;

beforeAll(async () => {
  port = await freePort();
  scheduler = new Scheduler(
    loadConfig({ TQ_SCHEDULER_PORT: String(port), TQ_MAX_BODY_BYTES: String(LIMIT) }),
    db.url,
    silentLogger,
  );
  url = await scheduler.start();
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await scheduler?.stop();
}, HOOK_TIMEOUT_MS);

interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/**
 * Writes `head` (and then `body`, which may be endless) on a fresh connection and resolves with
 * the first response, parsed from the bytes the server sent.
 */
function rawRequest(head: string, body?: () => string | null): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    let received = "";
    let sending = true;
    const done = (answer: RawAnswer) => {
      sending = false;
      socket.destroy();
      resolve(answer);
    };
    // One chunk per turn of the event loop, so that the server's answer can arrive between.
    const pump = () => {
      if (!sending || !body) return;
      const chunk = body();
      if (chunk === null) return;
      if (socket.write(chunk)) setImmediate(pump);
      else socket.once("drain", pump);
    };
    socket.on("connect", () => {
      socket.write(head);
      pump();
    });
    socket.on("data", (data) => {
      received += data.toString("latin1");
      const end = received.indexOf("\r\n\r\n");
      if (end < 0) return;
      const [statusLine = "", ...lines] = received.slice(0, end).split("\r\n");
      const headers = Object.fromEntries(
        lines.map((line) => [line.slice(0, line.indexOf(":")).toLowerCase(), line.slice(line.indexOf(":") + 1).trim()]),
      );
      const length = Number(headers["content-length"] ?? 0);
      const rest = received.slice(end + 4);
      if (Buffer.byteLength(rest, "latin1") >= length) done({ status: Number(statusLine.split(" ")[1]), headers, body: rest });
    });
    // Once the server has answered, it may reset a connection still sending.
    socket.on("error", (error) => (sending ? reject(error) : undefined));
  });
}

function expectTooLarge(answer: RawAnswer) {
  expect(answer.status).toBe(413);
  expect(answer.headers["content-type"]).toContain("application/json");
  expect(JSON.parse(answer.body)).toEqual({
    error: {
      code: "payload_too_large",
      message: `request body is larger than ${LIMIT} bytes (TQ_MAX_BODY_BYTES)`,
      field: "body",
    },
  });
}

describe("body size limit over a socket", () => {
  test("a declared Content-Length over the limit is the JSON 413 naming it, however large", async () => {
    for (const length of [LIMIT + 1, 10 * LIMIT, 1e12]) {
      const head = `POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`;
      expectTooLarge(await rawRequest(head, () => null));
    }
  });

  test("a chunked body that grows past the limit is cut off with the JSON 413", async () => {
    let sent = 0;
    const head = "POST /submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    const chunk = " ".repeat(256);
    const answer = await rawRequest(head, () => {
      // Endless as far as the server can tell: it must answer without waiting for an end.
      if (sent > ENDLESS) return null;
      sent += chunk.length;
      return `${chunk.length.toString(16)}\r\n${sent === chunk.length ? `{"command":"x"${chunk.slice(14)}` : chunk}\r\n`;
    });
    expectTooLarge(answer);
    expect(sent).toBeLessThan(ENDLESS);
  });

  test("a route that takes no body answers without reading an endless one", async () => {
    const id = Bun.randomUUIDv7();
    for (const [method, path, status] of [
      ["POST", `/tasks/${id}/cancel`, 404],
      ["POST", "/nope", 404],
      ["POST", "/workers", 405],
      ["GET", `/tasks/${id}`, 404],
      ["GET", "/workers", 200],
    ] as const) {
      let sent = 0;
      const head = `${method} ${path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n`;
      const answer = await rawRequest(head, () => {
        if (sent > ENDLESS) return null;
        sent += 1024;
        return `400\r\n${"[".repeat(1024)}\r\n`;
      });
      expect({ method, path, status: answer.status, endless: sent < ENDLESS }).toEqual({ method, path, status, endless: true });
    }
  });

  test("a body of exactly the limit is accepted", async () => {
    const body = JSON.stringify({ command: "x".repeat(LIMIT - '{"command":""}'.length) });
    expect(body.length).toBe(LIMIT);
    const response = await fetch(`${url}/tasks`, { method: "POST", headers: { "content-type": "application/json" }, body });
    expect(response.status).toBe(201);
    expect(response.headers.get("location")).toBe(`/tasks/${((await response.json()) as { id: string }).id}`);
  });
});

describe("media types and methods over a socket", () => {
  test("the seed's curl (form content type, and none) works; another media type is 415", async () => {
    const seed = '{"command":"echo seed","scheduled_at":"2030-01-01T00:00:00Z"}';
    const form = await fetch(`${url}/schedule`, {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: seed,
    });
    expect(form.status).toBe(200);
    const none = await rawRequest(`POST /schedule HTTP/1.1\r\nHost: x\r\nContent-Length: ${seed.length}\r\n\r\n${seed}`);
    expect(none.status).toBe(200);
    expect(JSON.parse(none.body).command).toBe("echo seed");
    const xml = await fetch(`${url}/schedule`, { method: "POST", headers: { "content-type": "application/xml" }, body: seed });
    expect(xml.status).toBe(415);
    expect(((await xml.json()) as any).error).toMatchObject({ code: "unsupported_media_type", field: "Content-Type" });
  });

  test("a wrong method is 405 with Allow", async () => {
    const response = await fetch(`${url}/schedule`, { method: "DELETE" });
    expect(response.status).toBe(405);
    expect(response.headers.get("allow")).toBe("POST");
    expect(((await response.json()) as any).error.code).toBe("method_not_allowed");
  });
});

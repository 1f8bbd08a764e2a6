// Live logs on real processes (issue 15 part 1): a coordinator and a worker, tasks that write
// over time. A task held on a file the test creates proves the tail sees output before the task
// ends; offsets, streams, Last-Event-ID, the bound and TailLogs are read from the same logs.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { existsSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import { clientConstructor } from "../../src/rpc/definitions";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { type RoleProcess, spawnRole } from "../support/processes";
import { taskDir } from "../support/task-dir";
import { TcpProxy } from "../support/tcp-proxy";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const processes: RoleProcess[] = [];
let dir: string;
let url: string;
let grpcAddress: string;
const MAX = 100_000;
let common: Record<string, string> = {};

beforeAll(async () => {
  dir = taskDir("tq-live-logs-");
  const http = await freePort();
  const grpcPort = await freePort();
  common = { TQ_HEARTBEAT_INTERVAL_MS: "200", TQ_HEARTBEAT_TIMEOUT_MS: "1000" };
  const coordinator = spawnRole("coordinator", {
    ...common,
    DATABASE_URL: db.url,
    TQ_COORDINATOR_PORT: String(http),
    TQ_GRPC_PORT: String(grpcPort),
    TQ_LOG_MAX_BYTES: String(MAX),
  });
  processes.push(coordinator);
  await coordinator.waitForEvent("coordinator.started");
  url = `http://127.0.0.1:${http}`;
  grpcAddress = `127.0.0.1:${grpcPort}`;
  // The default queue only: queue "cut" is the worker behind the proxy's (the reconnect test).
  const worker = spawnRole("worker", {
    ...common,
    TQ_COORDINATOR_ADDRESSES: grpcAddress,
    TQ_WORKER_SLOTS: "4",
    TQ_WORKER_QUEUES: "default",
  });
  processes.push(worker);
  await worker.waitForEvent("worker.connected");
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all(processes.map((p) => p.stop(5000)));
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

async function submit(command: string): Promise<string> {
  const response = await fetch(`${url}/tasks`, { method: "POST", body: JSON.stringify({ command }) });
  const json = (await response.json()) as { id: string };
  if (response.status !== 201) throw new Error(`submit: ${response.status} ${JSON.stringify(json)}`);
  return json.id;
}

async function state(id: string): Promise<string> {
  return ((await (await fetch(`${url}/tasks/${id}`)).json()) as { state: string }).state;
}

async function logs(id: string, query = "") {
  const response = await fetch(`${url}/tasks/${id}/logs${query}`);
  return {
    status: response.status,
    body: await response.text(),
    attempt: response.headers.get("tq-log-attempt"),
    offset: response.headers.get("tq-log-offset"),
    next: response.headers.get("tq-log-next-offset"),
    complete: response.headers.get("tq-log-complete"),
    truncated: response.headers.get("tq-log-truncated"),
  };
}

interface SseEvent {
  event: string;
  id?: string;
  data: any;
}

/** Reads server-sent events as they come; `until` decides when to stop reading (not the stream's end). */
async function* events(response: Response): AsyncGenerator<SseEvent> {
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut = buffer.indexOf("\n\n");
    while (cut >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      cut = buffer.indexOf("\n\n");
      const fields: Record<string, string> = {};
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const at = line.indexOf(": ");
        if (at > 0) fields[line.slice(0, at)] = line.slice(at + 2);
      }
      if (!fields.event) continue;
      yield { event: fields.event, id: fields.id, data: JSON.parse(fields.data ?? "null") };
    }
  }
}

test("follow sees output before the task ends, then the rest and end; plain reads from offsets and streams", async () => {
  const go = join(dir, "go");
  const id = await submit(`echo first; while [ ! -e ${go} ]; do sleep 0.02; done; echo second >&2; echo third`);
  const response = await fetch(`${url}/tasks/${id}/logs?follow=1`);
  expect(response.status).toBe(200);
  expect(response.headers.get("content-type")).toContain("text/event-stream");
  const seen: SseEvent[] = [];
  let end: SseEvent | null = null;
  for await (const event of events(response)) {
    if (event.event === "end") {
      end = event;
      break;
    }
    seen.push(event);
    if (seen.length === 1) {
      // The task waits on the file: what was seen was written by a running task.
      expect(event.data).toEqual({ stream: "stdout", offset: 0, data: "first\n" });
      expect(event.id).toBe("6");
      expect(await state(id)).toBe("running");
      await Bun.write(go, "");
    }
  }
  expect(seen.map((e) => e.data.data).join("")).toBe("first\nsecond\nthird\n");
  expect(seen.find((e) => e.data.stream === "stderr")?.data).toEqual({ stream: "stderr", offset: 6, data: "second\n" });
  expect(end?.data).toEqual({ attempt: 1, state: "succeeded", exit_code: 0, truncated: 0 });

  const all = await logs(id);
  expect(all).toMatchObject({ status: 200, body: "first\nsecond\nthird\n", attempt: "1", offset: "0", next: "19" });
  expect(all.complete).toBe("true");
  expect(all.truncated).toBe("0");
  expect((await logs(id, "?offset=6")).body).toBe("second\nthird\n");
  expect((await logs(id, "?stream=stdout")).body).toBe("first\nthird\n");
  expect((await logs(id, "?stream=stdout&offset=6")).body).toBe("third\n");
  expect((await logs(id, "?stream=stderr")).body).toBe("second\n");
  const past = await logs(id, "?offset=1000");
  expect(past).toMatchObject({ body: "", next: "1000" });

  // Resume: from the offset a client last saw, nothing before it again.
  const resumed = await fetch(`${url}/tasks/${id}/logs?follow=1`, { headers: { "last-event-id": "6" } });
  const after: SseEvent[] = [];
  for await (const event of events(resumed)) after.push(event);
  expect(
    after
      .filter((e) => e.event === "log")
      .map((e) => e.data.data)
      .join(""),
  ).toBe("second\nthird\n");
  expect(after.at(-1)?.event).toBe("end");

  // The task view keeps its stored tail as before.
  const task = (await (await fetch(`${url}/tasks/${id}`)).json()) as { stdout: string; stderr: string };
  expect(task.stdout).toBe("first\nthird\n");
  expect(task.stderr).toBe("second\n");
});

test("a chatty task is stored in a few chunks, a silent one in none; the bound cuts and says so", async () => {
  const chatty = await submit("i=0; while [ $i -lt 5000 ]; do echo line $i; i=$((i+1)); done");
  const silent = await submit("true");
  const big = await submit(`head -c ${MAX + 12_345} /dev/zero | tr '\\0' a`);
  await eventually(async () => (await Promise.all([chatty, silent, big].map(state))).every((s) => s === "succeeded"), {
    what: "the three tasks succeeded",
    timeoutMs: 30_000,
  });
  const expected = Array.from({ length: 5000 }, (_, i) => `line ${i}\n`).join("");
  const read = await logs(chatty);
  expect(read.body).toBe(expected);
  expect(read.complete).toBe("true");
  const [chunks] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_log_chunks WHERE task_id = ${chatty}`;
  // 48 KiB of lines, one per flush of up to 64 KiB or the flush delay: never a row per line.
  expect(chunks!.n).toBeLessThan(50);
  const [none] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_log_chunks WHERE task_id = ${silent}`;
  expect(none!.n).toBe(0);
  const quiet = await logs(silent);
  expect(quiet).toMatchObject({ status: 200, body: "", complete: "true", truncated: "0", attempt: "1" });
  const cut = await logs(big);
  expect(cut.body.length).toBe(MAX);
  expect(cut.truncated).toBe("12345");
  expect(cut.complete).toBe("true");
});

test("an early hand-over (armed before its start time) streams its log as one started at once does", async () => {
  // Due in 1.5 s: the coordinator hands it over TQ_DISPATCH_AHEAD_MS early and the worker arms
  // it (its shell spawned, held before the command); its output is streamed from the release.
  const runAt = new Date(Date.now() + 1500).toISOString();
  const response = await fetch(`${url}/tasks`, {
    method: "POST",
    body: JSON.stringify({ command: "echo armed-out; echo armed-err >&2", scheduled_at: runAt }),
  });
  const body = (await response.json()) as { id: string };
  expect(response.status).toBe(201);
  const { id } = body;
  await eventually(async () => (await state(id)) === "succeeded", { what: "early task succeeded", timeoutMs: 15_000 });
  await eventually(async () => (await logs(id)).complete === "true", { what: "its log complete", timeoutMs: 10_000 });
  expect((await logs(id, "?stream=stdout")).body).toBe("armed-out\n");
  expect((await logs(id, "?stream=stderr")).body).toBe("armed-err\n");
});

test("unknown tasks and attempts are 404 with their codes; bad input is 400", async () => {
  const missing = await fetch(`${url}/tasks/${Bun.randomUUIDv7()}/logs`);
  expect(missing.status).toBe(404);
  expect(((await missing.json()) as any).error.code).toBe("task_not_found");
  const id = await submit("echo x");
  await eventually(async () => (await state(id)) === "succeeded", { what: "task succeeded", timeoutMs: 10_000 });
  const attempt = await fetch(`${url}/tasks/${id}/logs?attempt=7`);
  expect(attempt.status).toBe(404);
  expect(((await attempt.json()) as any).error.code).toBe("attempt_not_found");
  expect((await fetch(`${url}/tasks/${id}/logs?offset=-1`)).status).toBe(400);
  expect((await fetch(`${url}/tasks/${id}/logs?stream=nope`)).status).toBe(400);
  const badResume = await fetch(`${url}/tasks/${id}/logs?follow=1`, { headers: { "last-event-id": "x" } });
  expect(badResume.status).toBe(400);
});

test("TailLogs over gRPC follows the same way", async () => {
  const go = join(dir, "go-grpc");
  const id = await submit(`echo alpha; while [ ! -e ${go} ]; do sleep 0.02; done; echo beta`);
  const Client = clientConstructor(TaskService);
  const client = new Client(grpcAddress, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  try {
    const call = client.tailLogs!({ taskId: id, follow: true }, new grpc.Metadata()) as grpc.ClientReadableStream<any>;
    const got: any[] = [];
    await new Promise<void>((resolve, reject) => {
      call.on("data", (chunk: any) => {
        got.push(chunk);
        if (got.length === 1) void Bun.write(go, "");
      });
      call.on("end", () => resolve());
      call.on("error", reject);
    });
    const text = got
      .filter((c) => !c.end)
      .map((c) => Buffer.from(c.data).toString())
      .join("");
    expect(text).toBe("alpha\nbeta\n");
    expect(Buffer.from(got[0].data).toString()).toBe("alpha\n");
    const last = got.at(-1);
    expect(last.end).toBe(true);
    expect(last.state).toBe("succeeded");
    expect(last.exitCode).toBe(0);
    expect(last.attempt).toBe(1);
  } finally {
    client.close();
  }
});

test("each attempt has its own log; attempt=K reads an earlier one, the default the latest", async () => {
  const response = await fetch(`${url}/tasks`, {
    method: "POST",
    body: JSON.stringify({
      command: 'echo "try $TQ_TASK_ATTEMPT"; [ "$TQ_TASK_ATTEMPT" -ge 2 ]',
      max_attempts: 2,
      retry: { backoff_base_ms: 10, backoff_cap_ms: 10 },
    }),
  });
  const { id } = (await response.json()) as { id: string };
  await eventually(async () => (await state(id)) === "succeeded", { what: "the second attempt succeeded", timeoutMs: 20_000 });
  expect(await logs(id)).toMatchObject({ attempt: "2", body: "try 2\n", complete: "true" });
  expect(await logs(id, "?attempt=1")).toMatchObject({ attempt: "1", body: "try 1\n", complete: "true" });
  const first = await fetch(`${url}/tasks/${id}/logs?follow=1&attempt=1`);
  const seen: SseEvent[] = [];
  for await (const event of events(first)) seen.push(event);
  expect(seen.map((e) => e.event)).toEqual(["log", "end"]);
  expect(seen[1]!.data).toMatchObject({ attempt: 1, exit_code: 1, truncated: 0 });
});

test("output written while the worker is cut off arrives after it reconnects, before its result", async () => {
  const proxy = await TcpProxy.start("127.0.0.1", Number(grpcAddress.split(":")[1]));
  const worker = spawnRole("worker", {
    ...common,
    TQ_COORDINATOR_ADDRESSES: `127.0.0.1:${proxy.port}`,
    TQ_WORKER_QUEUES: "cut",
  });
  processes.push(worker);
  try {
    await worker.waitForEvent("worker.connected");
    const go = join(dir, "go-cut");
    const wrote = join(dir, "wrote-cut");
    const response = await fetch(`${url}/tasks`, {
      method: "POST",
      body: JSON.stringify({
        command: `echo one; while [ ! -e ${go} ]; do sleep 0.02; done; echo two; : > ${wrote}`,
        queue: "cut",
      }),
    });
    const { id } = (await response.json()) as { id: string };
    await eventually(async () => (await logs(id)).body === "one\n", { what: "the first line stored", timeoutMs: 20_000 });
    proxy.cut();
    await worker.waitForEvent("worker.disconnected");
    // Written and finished while no coordinator can hear it: kept, and sent again on the next stream.
    await Bun.write(go, "");
    await eventually(() => existsSync(wrote), { what: "the task wrote its second line while cut off", timeoutMs: 20_000 });
    proxy.restore();
    await eventually(async () => (await state(id)) === "succeeded", { what: "the task succeeded", timeoutMs: 30_000 });
    expect(await logs(id)).toMatchObject({ body: "one\ntwo\n", complete: "true", attempt: "1" });
  } finally {
    await proxy.stop();
  }
});

test("following a task that has not run waits for it; cancelled before any attempt, it ends with attempt 0", async () => {
  const response = await fetch(`${url}/tasks`, {
    method: "POST",
    body: JSON.stringify({ command: "echo never", queue: "nobody" }),
  });
  const { id } = (await response.json()) as { id: string };
  expect(await logs(id)).toMatchObject({ status: 200, body: "", attempt: "0", complete: "false" });
  const follow = await fetch(`${url}/tasks/${id}/logs?follow=1`);
  expect(follow.status).toBe(200);
  const cancelled = await fetch(`${url}/tasks/${id}/cancel`, { method: "POST" });
  expect(cancelled.status).toBe(200);
  const seen: SseEvent[] = [];
  for await (const event of events(follow)) seen.push(event);
  expect(seen).toEqual([
    { event: "end", id: undefined, data: { attempt: 0, state: "cancelled", exit_code: null, truncated: 0 } },
  ]);
});

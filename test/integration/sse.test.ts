import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, setDefaultTimeout, test } from "bun:test";
import type { ApiDeps } from "../../src/api/deps";
import { createApp } from "../../src/api/index";
import { watchTask } from "../../src/api/service";
import { taskEventsResponse } from "../../src/api/sse";
import { apiSettings, loadConfig } from "../../src/config";
import { claimDue } from "../../src/db/claim";
import { listTaskEvents } from "../../src/db/events";
import { insertTask } from "../../src/db/insert";
import { type TaskChange, TaskChangeFeed } from "../../src/db/notify";
import type { Sql } from "../../src/db/sql";
import { cancelTask, finishAttempt, markStarted } from "../../src/db/transitions";
import { silentLogger } from "../../src/log";
import { TaskQueueError } from "../../src/task/errors";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { attemptResult, createTask, newTaskId, openAuth, taskSpec } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

/**
 * A started feed that counts live subscriptions, resolves `released()` when none are left,
 * and keeps the last task listener and resync callback so tests can drive them.
 */
function watchedFeed(sql: Sql) {
  const feed = new TaskChangeFeed(sql);
  let active = 0;
  const waiters: (() => void)[] = [];
  const track = (off: () => void) => {
    active++;
    let done = false;
    return () => {
      off();
      if (done) return;
      done = true;
      active--;
      if (active === 0) for (const resolve of waiters.splice(0)) resolve();
    };
  };
  const onTask = feed.onTask.bind(feed);
  const onResync = feed.onResync.bind(feed);
  const state = {
    feed,
    active: () => active,
    released: () => (active === 0 ? Promise.resolve() : new Promise<void>((resolve) => waiters.push(resolve))),
    lastListener: null as ((change: TaskChange) => void) | null,
    lastResync: null as (() => void) | null,
  };
  feed.onTask = async (id, listener) => {
    state.lastListener = listener;
    return track(await onTask(id, listener));
  };
  feed.onResync = (callback) => {
    state.lastResync = callback;
    return track(onResync(callback));
  };
  return state;
}

function depsFor(sql: Sql, feed: TaskChangeFeed): ApiDeps {
  return {
    role: "coordinator",
    settings: apiSettings(loadConfig({})),
    sql,
    feed,
    log: silentLogger,
    auth: openAuth,
    submit: (id, spec) => insertTask(sql, id, spec),
  };
}

interface SseMessage {
  id?: string;
  event?: string;
  // The TaskEventJson of a task message.
  data?: any;
  comment?: string;
}

/** Reads an event stream message by message; null once the stream has ended. */
function sseReader(response: Response) {
  const reader = response.body!.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const parse = (block: string): SseMessage => {
    const message: SseMessage = {};
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) message.comment = line.slice(1).trim();
      else if (line.startsWith("id: ")) message.id = line.slice(4);
      else if (line.startsWith("event: ")) message.event = line.slice(7);
      else if (line.startsWith("data: ")) message.data = JSON.parse(line.slice(6));
      else throw new Error(`unexpected SSE line: ${line}`);
    }
    return message;
  };
  return {
    async next(): Promise<SseMessage | null> {
      for (;;) {
        const end = buffer.indexOf("\n\n");
        if (end >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          return parse(block);
        }
        const { done, value } = await reader.read();
        if (done) {
          expect(buffer).toBe("");
          return null;
        }
        buffer += decoder.decode(value, { stream: true });
      }
    },
    /** The next task message, skipping keepalive comments. */
    async nextTask(): Promise<SseMessage | null> {
      for (;;) {
        const message = await this.next();
        if (message === null || message.comment === undefined) return message;
      }
    },
    cancel: () => reader.cancel(),
  };
}

const srcPath = (relative: string) => new URL(`../../src/${relative}`, import.meta.url).pathname;

/** Runs `body` in another bun process with `sql` connected to this file's database. */
async function inAnotherProcess(body: string, env: Record<string, string>): Promise<void> {
  const script = `
    import { connect } from ${JSON.stringify(srcPath("db/sql.ts"))};
    import * as claim from ${JSON.stringify(srcPath("db/claim.ts"))};
    import * as transitions from ${JSON.stringify(srcPath("db/transitions.ts"))};
    const tasks = { ...claim, ...transitions };
    const sql = connect(process.env.DATABASE_URL, { max: 1 });
    try {
      ${body}
    } finally {
      await sql.end();
    }`;
  const child = Bun.spawn([process.execPath, "-e", script], {
    env: { ...process.env, DATABASE_URL: db.url, ...env },
    stdout: "pipe",
    stderr: "pipe",
  });
  const [code, stderr] = await Promise.all([child.exited, new Response(child.stderr).text()]);
  if (code !== 0) throw new Error(`child process failed (${code}): ${stderr}`);
}

let live: ReturnType<typeof watchedFeed>;
let app: ReturnType<typeof createApp>;

beforeAll(async () => {
  live = watchedFeed(db.sql);
  await live.feed.start();
  app = createApp(depsFor(db.sql, live.feed));
});

afterAll(async () => {
  await live.feed.stop();
});

beforeEach(async () => {
  await db.sql`TRUNCATE tasks, task_events, task_attempts, task_log_chunks, workers`;
});

async function submit(): Promise<string> {
  const response = await app.handle(new Request("http://localhost/tasks", { method: "POST", body: '{"command":"true"}' }));
  expect(response.status).toBe(201);
  return ((await response.json()) as { id: string }).id;
}

async function openEvents(id: string, signal?: AbortSignal, lastEventId?: string) {
  const headers: Record<string, string> = lastEventId === undefined ? {} : { "last-event-id": lastEventId };
  const response = await app.handle(new Request(`http://localhost/tasks/${id}/events`, { signal, headers }));
  expect(response.status).toBe(200);
  expect(response.headers.get("content-type")).toStartWith("text/event-stream");
  expect(response.headers.get("cache-control")).toBe("no-cache");
  return sseReader(response);
}

describe("GET /tasks/:id/events", () => {
  test("the current state first, then a run made by another process, then the end", async () => {
    const id = await submit();
    const stream = await openEvents(id);
    const first = await stream.nextTask();
    expect(first).toMatchObject({ event: "task", data: { id, state: "queued", attempt: 0, event: null } });
    expect(Number(first!.id)).toBeGreaterThan(0);

    await inAnotherProcess(
      `
      const id = process.env.TASK_ID;
      const [claimed] = await tasks.claimDue(sql, "c-other", ["w-other"], 30000);
      if (claimed?.id !== id) throw new Error("claimed " + claimed?.id);
      await tasks.markStarted(sql, { taskId: id, attempt: 1, workerId: "w-other", startedAt: new Date(), pid: 4242 });
      await tasks.finishAttempt(sql, { taskId: id, attempt: 1, workerId: "w-other" }, {
        state: "succeeded", exitCode: 0, signal: null, stdout: "ok\\n", stderr: "", stdoutTruncated: false,
        stderrTruncated: false, stdoutReplaced: false, stderrReplaced: false, error: null, startedAt: new Date(), finishedAt: new Date(),
      });`,
      { TASK_ID: id },
    );

    const messages = [first!];
    for (let message = await stream.nextTask(); message !== null; message = await stream.nextTask()) messages.push(message);
    // One message per event, none skipped even when they land together, each with its own facts.
    expect(messages.slice(1).map((m) => [m.data.event.kind, m.data.event.state, m.data.event.attempt])).toEqual([
      ["dispatched", "dispatched", 1],
      ["started", "running", 1],
      ["succeeded", "succeeded", 1],
    ]);
    for (const m of messages.slice(1)) expect(m.data.event.id).toBe(m.id);
    const ids = messages.map((m) => BigInt(m.id!));
    for (let i = 1; i < ids.length; i++) expect(ids[i]!).toBeGreaterThan(ids[i - 1]!);
    const last = messages.at(-1)!;
    expect(last.data).toMatchObject({
      state: "succeeded",
      exit_code: 0,
      stdout: "ok\n",
      worker_id: "w-other",
      coordinator_id: "c-other",
      event: { kind: "succeeded", id: last.id, state: "succeeded", worker_id: "w-other" },
    });
    expect(last.data.completed_at).toMatch(/Z$/);
    // The stream ended on its own; the watcher let go of the feed.
    await live.released();
  });

  test("a cancel made by another process ends the stream", async () => {
    const id = await submit();
    const stream = await openEvents(id);
    expect((await stream.nextTask())?.data.state).toBe("queued");
    await inAnotherProcess(
      `const outcome = await tasks.cancelTask(sql, process.env.TASK_ID);
       if (outcome.kind !== "cancelled") throw new Error(outcome.kind);`,
      { TASK_ID: id },
    );
    const cancelled = await stream.nextTask();
    expect(cancelled?.data).toMatchObject({ id, state: "cancelled", event: { kind: "cancelled" } });
    expect(cancelled?.data.cancelled_at).toMatch(/Z$/);
    expect(await stream.nextTask()).toBeNull();
  });

  test("a task already final gives one message and ends", async () => {
    const id = await submit();
    await cancelTask(db.sql, id);
    const stream = await openEvents(id);
    const only = await stream.nextTask();
    expect(only?.data).toMatchObject({ state: "cancelled", event: null });
    expect(await stream.nextTask()).toBeNull();
    await live.released();
  });

  test("a malformed or unknown id is a JSON error, not a stream", async () => {
    const malformed = await app.handle(new Request("http://localhost/tasks/nope/events"));
    expect(malformed.status).toBe(400);
    expect(await malformed.json()).toMatchObject({ error: { code: "invalid_argument", field: "id" } });
    const unknown = await app.handle(new Request(`http://localhost/tasks/${newTaskId()}/events`));
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as any).error.code).toBe("not_found");
    await live.released();
  });

  test("a client that disconnects releases its subscription", async () => {
    const id = await submit();
    const controller = new AbortController();
    const stream = await openEvents(id, controller.signal);
    expect((await stream.nextTask())?.data.state).toBe("queued");
    expect(live.active()).toBe(2);
    controller.abort();
    await live.released();
    expect(await stream.next()).toBeNull();
  });

  test("a client that cancels the body releases its subscription", async () => {
    const id = await submit();
    const stream = await openEvents(id);
    expect((await stream.nextTask())?.data.state).toBe("queued");
    expect(live.active()).toBe(2);
    await stream.cancel();
    await live.released();
  });

  test("a quiet stream sends keepalive comments", async () => {
    const id = await submit();
    const request = new Request(`http://localhost/tasks/${id}/events`);
    const stream = sseReader(await taskEventsResponse(depsFor(db.sql, live.feed), id, request, { keepaliveMs: 5 }));
    expect((await stream.next())?.data.state).toBe("queued");
    expect(await stream.next()).toEqual({ comment: "keepalive" });
    await stream.cancel();
    await live.released();
  });
});

describe("GET /tasks/:id/events with Last-Event-ID", () => {
  /** Every message until the stream ends. */
  async function drain(stream: Awaited<ReturnType<typeof openEvents>>) {
    const messages = [];
    for (let message = await stream.nextTask(); message !== null; message = await stream.nextTask()) messages.push(message);
    return messages;
  }

  test("replays every event after the id, in order, each with its own facts, and ends at the final one", async () => {
    const task = await createTask(db.sql, taskSpec({ maxAttempts: 2 }));
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    await markStarted(db.sql, { taskId: task.id, attempt: 1, workerId: "w1", startedAt: new Date(), pid: 1 });
    await finishAttempt(db.sql, { taskId: task.id, attempt: 1, workerId: "w1" }, attemptResult({ state: "failed", exitCode: 5 }));
    await claimDue(db.sql, "c1", ["w2"], 30_000);
    await finishAttempt(db.sql, { taskId: task.id, attempt: 2, workerId: "w2" }, attemptResult());
    const history = await listTaskEvents(db.sql, task.id);
    const from = history[1]!; // attempt 1's dispatch
    const messages = await drain(await openEvents(task.id, undefined, from.id));
    const expected = history.slice(2);
    expect(messages.map((m) => m.id)).toEqual(expected.map((e) => e.id));
    expect(messages.map((m) => [m.data.event.kind, m.data.event.state, m.data.event.attempt, m.data.event.at])).toEqual(
      expected.map((e) => [e.kind, e.state, e.attempt, e.at.toISOString()]),
    );
    expect(messages.map((m) => m.data.event.kind)).toEqual(["started", "retrying", "dispatched", "succeeded"]);
    // The task as it is now rides along; the event says what it was then.
    expect(messages[1]!.data).toMatchObject({ state: "succeeded", event: { state: "queued", detail: { exit_code: 5 } } });
    await live.released();
  });

  test("replays what was missed, then continues live with no gap and no repeat", async () => {
    const task = await createTask(db.sql, taskSpec());
    await claimDue(db.sql, "c1", ["w1"], 30_000);
    const stream = await openEvents(task.id, undefined, task.event_id);
    const replayed = await stream.nextTask();
    expect(replayed?.data.event).toMatchObject({ kind: "dispatched", attempt: 1, worker_id: "w1" });
    await inAnotherProcess(
      `
      const id = process.env.TASK_ID;
      await tasks.markStarted(sql, { taskId: id, attempt: 1, workerId: "w1", startedAt: new Date(), pid: 9 });
      await tasks.finishAttempt(sql, { taskId: id, attempt: 1, workerId: "w1" }, {
        state: "succeeded", exitCode: 0, signal: null, stdout: "", stderr: "", stdoutTruncated: false,
        stderrTruncated: false, stdoutReplaced: false, stderrReplaced: false, error: null, startedAt: new Date(), finishedAt: new Date(),
      });`,
      { TASK_ID: task.id },
    );
    const rest = await drain(stream);
    const history = await listTaskEvents(db.sql, task.id);
    expect([replayed!, ...rest].map((m) => m.id)).toEqual(history.slice(1).map((e) => e.id));
    expect(rest.map((m) => m.data.event.kind)).toEqual(["started", "succeeded"]);
    await live.released();
  });

  test("a resume with nothing missed opens at once and waits for the next event", async () => {
    const task = await createTask(db.sql, taskSpec());
    // Answered before the task changes again: the status and headers do not wait for an event.
    const stream = await openEvents(task.id, undefined, task.event_id);
    expect(await stream.next()).toEqual({ comment: `resuming after event ${task.event_id}` });
    const cancelled = await cancelTask(db.sql, task.id);
    if (cancelled.kind !== "cancelled") throw new Error(cancelled.kind);
    const next = await stream.nextTask();
    expect(next?.id).toBe(cancelled.task.event_id);
    expect(next?.data.event).toMatchObject({ kind: "cancelled", state: "cancelled" });
    expect(await stream.nextTask()).toBeNull();
    await live.released();
  });

  test("a final task with nothing after the id is 204, so EventSource stops reconnecting", async () => {
    const id = await submit();
    const cancelled = await cancelTask(db.sql, id);
    if (cancelled.kind !== "cancelled") throw new Error(cancelled.kind);
    const response = await app.handle(
      new Request(`http://localhost/tasks/${id}/events`, { headers: { "last-event-id": cancelled.task.event_id } }),
    );
    expect(response.status).toBe(204);
    await live.released();
  });

  test("a malformed Last-Event-ID is a 400 naming it", async () => {
    const id = await submit();
    const response = await app.handle(new Request(`http://localhost/tasks/${id}/events`, { headers: { "last-event-id": "x1" } }));
    expect(response.status).toBe(400);
    expect(await response.json()).toMatchObject({ error: { code: "invalid_argument", field: "Last-Event-ID" } });
    await live.released();
  });
});

describe("watchTask", () => {
  // Feeds never started, so that no notification reaches them; a subscription still opens
  // their listening connection, which stop() closes.
  const quietFeeds: TaskChangeFeed[] = [];
  const quietFeed = () => {
    const quiet = watchedFeed(db.sql);
    quietFeeds.push(quiet.feed);
    return quiet;
  };
  afterEach(async () => {
    for (const feed of quietFeeds.splice(0)) await feed.stop();
  });

  test("re-reads the task after a resync, when notifications may have been missed", async () => {
    // Never started: no notification reaches this feed, as while its connection was down.
    const quiet = quietFeed();
    const task = await createTask(db.sql, taskSpec());
    const updates = watchTask(depsFor(db.sql, quiet.feed), task.id, new AbortController().signal);
    const first = await updates.next();
    expect(first.value).toMatchObject({ task: { state: "queued" }, event: null, eventId: task.event_id });
    const outcome = await cancelTask(db.sql, task.id);
    if (outcome.kind !== "cancelled") throw new Error(outcome.kind);
    const next = updates.next();
    quiet.lastResync!();
    const update = (await next).value;
    expect(update?.task.state).toBe("cancelled");
    expect(update?.event).toMatchObject({ kind: "cancelled", id: outcome.task.event_id, state: "cancelled" });
    expect(update?.eventId).toBe(outcome.task.event_id);
    expect((await updates.next()).done).toBe(true);
    expect(quiet.active()).toBe(0);
  });

  test("skips notifications of changes the first read already showed", async () => {
    const quiet = quietFeed();
    const task = await createTask(db.sql, taskSpec());
    const updates = watchTask(depsFor(db.sql, quiet.feed), task.id, new AbortController().signal);
    await updates.next();
    const next = updates.next();
    // The notification of the insert, arriving after the first read: nothing new.
    quiet.lastListener!({
      id: task.id,
      state: "queued",
      attempt: 0,
      worker_id: null,
      coordinator_id: null,
      event_id: task.event_id,
      kind: "submitted",
      due_in_ms: 0,
    });
    const [claimed] = await claimDue(db.sql, "c1", ["w1"], 30_000);
    const change: TaskChange = {
      id: task.id,
      state: "dispatched",
      attempt: 1,
      worker_id: "w1",
      coordinator_id: "c1",
      event_id: claimed!.event_id,
      kind: "dispatched",
      due_in_ms: null,
    };
    quiet.lastListener!(change);
    const update = (await next).value;
    expect(update?.task).toMatchObject({ state: "dispatched", attempt: 1, worker_id: "w1" });
    expect(update?.event).toMatchObject({
      id: change.event_id,
      kind: "dispatched",
      state: "dispatched",
      attempt: 1,
      worker_id: "w1",
    });
    expect(update?.eventId).toBe(change.event_id);
    await updates.return(undefined);
    expect(quiet.active()).toBe(0);
  });

  test("an abort ends a waiting watcher and releases it", async () => {
    const quiet = quietFeed();
    const task = await createTask(db.sql, taskSpec());
    const abort = new AbortController();
    const updates = watchTask(depsFor(db.sql, quiet.feed), task.id, abort.signal);
    await updates.next();
    const next = updates.next();
    abort.abort();
    expect((await next).done).toBe(true);
    expect(quiet.active()).toBe(0);
  });

  test("an unknown task throws not_found and releases its subscriptions", async () => {
    const quiet = quietFeed();
    const updates = watchTask(depsFor(db.sql, quiet.feed), newTaskId(), new AbortController().signal);
    const error = await updates.next().catch((e: unknown) => e);
    expect(error).toBeInstanceOf(TaskQueueError);
    expect((error as TaskQueueError).code).toBe("not_found");
    expect(quiet.active()).toBe(0);
  });
});

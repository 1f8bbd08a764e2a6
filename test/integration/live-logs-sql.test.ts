// Live logs' storage (src/db/logs.ts) and its writer (src/coordinator/log-writer.ts) on real
// PostgreSQL: chunks stored once per number, fenced to the attempt's own worker while it holds
// its task, cut at the bound, read back by offset for each stream, pruned by age in batches,
// and deleted with their task.
import { expect, setDefaultTimeout, test } from "bun:test";
import { create } from "@bufbuild/protobuf";
import pino from "pino";
import type { ApiDeps } from "../../src/api/deps";
import { logQuery, readLog } from "../../src/api/logs";
import { LogWriter } from "../../src/coordinator/log-writer";
import { insertLogChunks, type LogChunkRow, pruneLogChunks, readLogAttempt, readLogPieces } from "../../src/db/logs";
import { TaskChangeFeed } from "../../src/db/notify";
import { requeueWorkerTasks } from "../../src/db/transitions";
import { TaskOutputSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { createTask } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const silent = pino({ level: "silent" });
const text = (s: string) => new TextEncoder().encode(s);

async function runningTask(workerId = "w1") {
  return createTask(db.sql, undefined, { assignTo: { workerId, coordinatorId: "c1", leaseMs: 60_000 } });
}

/** Flushes of "out1\n" (stdout), "err1\n" (stderr), then "out2\n" + "err2\n" in one flush, final. */
function flushes(taskId: string, workerId = "w1"): LogChunkRow[] {
  const base = { taskId, attempt: 1, workerId, cut: 0 };
  return [
    { ...base, seq: 0, offset: 0, stdoutOffset: 0, stderrOffset: 0, runs: [5], data: text("out1\n"), final: false },
    { ...base, seq: 1, offset: 5, stdoutOffset: 5, stderrOffset: 0, runs: [-5], data: text("err1\n"), final: false },
    { ...base, seq: 2, offset: 10, stdoutOffset: 5, stderrOffset: 5, runs: [5, -5], data: text("out2\nerr2\n"), final: true },
  ];
}

const joined = (pieces: { data: Uint8Array }[]) => pieces.map((p) => new TextDecoder().decode(p.data)).join("");

test("chunks are read back by offset for each stream, in the order written", async () => {
  const task = await runningTask();
  expect(await insertLogChunks(db.sql, flushes(task.id), 1 << 20)).toBe(3);
  const read = (stream: "stdout" | "stderr" | "both", offset: number) =>
    readLogPieces(db.sql, task.id, 1, stream, offset, 1 << 20);
  expect(joined(await read("both", 0))).toBe("out1\nerr1\nout2\nerr2\n");
  expect(joined(await read("both", 7))).toBe("r1\nout2\nerr2\n");
  expect(joined(await read("stdout", 0))).toBe("out1\nout2\n");
  expect(joined(await read("stdout", 6))).toBe("ut2\n");
  expect(joined(await read("stderr", 5))).toBe("err2\n");
  expect(await read("both", 20)).toEqual([]);
  // Pieces say their stream and where they start; adjacent bytes of one stream are one piece.
  const pieces = await read("stdout", 0);
  expect(pieces.map((p) => [p.stream, p.offset])).toEqual([["stdout", 0]]);
  const both = await read("both", 0);
  expect(both.map((p) => [p.stream, p.offset, p.data.length])).toEqual([
    ["stdout", 0, 5],
    ["stderr", 5, 5],
    ["stdout", 10, 5],
    ["stderr", 15, 5],
  ]);
  const state = await readLogAttempt(db.sql, task.id, 0);
  expect(state).toMatchObject({ attempt: 1, ended: false, finalStored: true, anyStored: true, cut: 0 });
});

test("a chunk number is stored once: a re-send changes nothing", async () => {
  const task = await runningTask();
  const rows = flushes(task.id);
  await insertLogChunks(db.sql, rows.slice(0, 2), 1 << 20);
  const resent = [{ ...rows[0]!, data: text("XXXX\n") }, rows[1]!, rows[2]!];
  expect(await insertLogChunks(db.sql, resent, 1 << 20)).toBe(1);
  expect(joined(await readLogPieces(db.sql, task.id, 1, "both", 0, 1 << 20))).toBe("out1\nerr1\nout2\nerr2\n");
});

test("fenced: another worker, or an attempt that no longer holds its task, writes nothing", async () => {
  const task = await runningTask("w-fenced");
  expect(await insertLogChunks(db.sql, flushes(task.id, "w-other"), 1 << 20)).toBe(0);
  expect(await insertLogChunks(db.sql, [flushes(task.id, "w-fenced")[0]!], 1 << 20)).toBe(1);
  // The attempt is lost (its worker did not hold it after reconnecting): its late output is refused.
  expect((await requeueWorkerTasks(db.sql, "w-fenced", "test: not held", "interrupted")).length).toBe(1);
  expect(await insertLogChunks(db.sql, flushes(task.id, "w-fenced").slice(1), 1 << 20)).toBe(0);
  expect(joined(await readLogPieces(db.sql, task.id, 1, "both", 0, 1 << 20))).toBe("out1\n");
  const state = await readLogAttempt(db.sql, task.id, 1);
  expect(state).toMatchObject({ attempt: 1, ended: true, outcome: "interrupted", finalStored: false });
  expect(await readLogAttempt(db.sql, task.id, 5)).toMatchObject({ attempt: -1 });
  expect(await readLogAttempt(db.sql, Bun.randomUUIDv7(), 0)).toBeNull();
});

test("the bound cuts what lies beyond it, and the final chunk says how much was cut", async () => {
  const task = await runningTask();
  // The final chunk is kept even beyond the bound (empty), to say the cut: 3 bytes of the
  // middle chunk and all 10 of its own.
  expect(await insertLogChunks(db.sql, flushes(task.id), 7)).toBe(3);
  expect(joined(await readLogPieces(db.sql, task.id, 1, "both", 0, 1 << 20))).toBe("out1\ner");
  expect(joined(await readLogPieces(db.sql, task.id, 1, "stderr", 0, 1 << 20))).toBe("er");
  const state = await readLogAttempt(db.sql, task.id, 1);
  expect(state).toMatchObject({ finalStored: true, cut: 13 });
  const other = await runningTask();
  const final = { ...flushes(other.id)[2]!, seq: 0, offset: 0, stdoutOffset: 0, stderrOffset: 0, cut: 40 };
  expect(await insertLogChunks(db.sql, [final], 4)).toBe(1);
  expect(await readLogAttempt(db.sql, other.id, 1)).toMatchObject({ finalStored: true, cut: 46 });
});

test("retention deletes old chunks in batches; deleting a task deletes its chunks", async () => {
  const old = await runningTask();
  const fresh = await runningTask();
  await insertLogChunks(db.sql, [...flushes(old.id), ...flushes(fresh.id)], 1 << 20);
  await db.sql`UPDATE task_log_chunks SET written_at = now() - interval '2 hours' WHERE task_id = ${old.id}`;
  expect(await pruneLogChunks(db.sql, 3_600_000, 2)).toBe(2);
  expect(await pruneLogChunks(db.sql, 3_600_000, 2)).toBe(1);
  expect(await pruneLogChunks(db.sql, 3_600_000, 2)).toBe(0);
  const [left] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_log_chunks WHERE task_id = ${fresh.id}`;
  expect(left!.n).toBe(3);
  await db.sql`DELETE FROM tasks WHERE id = ${fresh.id}`;
  const [gone] = await db.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_log_chunks WHERE task_id = ${fresh.id}`;
  expect(gone!.n).toBe(0);
});

test("the writer batches flushes, notifies the task's channel, and lets a result wait for its output", async () => {
  const task = await runningTask();
  const feed = new TaskChangeFeed(db.sql);
  await feed.start();
  const kinds: string[] = [];
  let heard: () => void = () => {};
  const notified = new Promise<void>((resolve) => (heard = resolve));
  const off = await feed.onTask(task.id, (change) => {
    kinds.push(change.kind);
    heard();
  });
  const writer = new LogWriter({ sql: db.sql, log: silent, maxBytes: 1 << 20, retentionMs: 0 });
  writer.start();
  try {
    expect(writer.whenWritten(task.id, 1)).toBeNull();
    for (const row of flushes(task.id)) {
      writer.add(
        "w1",
        create(TaskOutputSchema, {
          ref: { taskId: row.taskId, attempt: row.attempt },
          seq: row.seq,
          offset: BigInt(row.offset),
          stdoutOffset: BigInt(row.stdoutOffset),
          stderrOffset: BigInt(row.stderrOffset),
          runs: row.runs,
          data: row.data,
          final: row.final,
        }),
      );
    }
    const waiting = writer.whenWritten(task.id, 1);
    expect(waiting).not.toBeNull();
    await waiting;
    expect(joined(await readLogPieces(db.sql, task.id, 1, "both", 0, 1 << 20))).toBe("out1\nerr1\nout2\nerr2\n");
    expect(writer.whenWritten(task.id, 1)).toBeNull();
    await notified;
    expect(kinds).toContain("log");
  } finally {
    off();
    await writer.stop();
    await feed.stop();
  }
});

test("the writer's prune pass removes what retention expired", async () => {
  const task = await runningTask();
  await insertLogChunks(db.sql, flushes(task.id), 1 << 20);
  await db.sql`UPDATE task_log_chunks SET written_at = now() - interval '1 day' WHERE task_id = ${task.id}`;
  const writer = new LogWriter({ sql: db.sql, log: silent, maxBytes: 1 << 20, retentionMs: 60_000, pruneBatch: 2 });
  expect(await writer.prune()).toBe(3);
  await writer.stop();
});

test("a read of one stream skips rows holding only the other, however many", async () => {
  const task = await runningTask();
  const base = { taskId: task.id, attempt: 1, workerId: "w1", cut: 0, final: false };
  await insertLogChunks(
    db.sql,
    [
      { ...base, seq: 0, offset: 0, stdoutOffset: 0, stderrOffset: 0, runs: [-1], data: text("x") },
      { ...base, seq: 1, offset: 1, stdoutOffset: 0, stderrOffset: 1, runs: [-1], data: text("y") },
      { ...base, seq: 2, offset: 2, stdoutOffset: 0, stderrOffset: 2, runs: [1], data: text("z") },
    ],
    1 << 20,
  );
  // 1024 bytes at most: one row per read, so a read that took any row could come back empty.
  expect(joined(await readLogPieces(db.sql, task.id, 1, "stdout", 0, 1024))).toBe("z");
  expect(joined(await readLogPieces(db.sql, task.id, 1, "stderr", 1, 1024))).toBe("y");
  expect(await readLogPieces(db.sql, task.id, 1, "stdout", 1, 1024)).toEqual([]);
});

test("at the writer's backlog bound an attempt's output is dropped from there on, so its log is never called complete", async () => {
  const task = await runningTask();
  const writer = new LogWriter({ sql: db.sql, log: silent, maxBytes: 1 << 20, retentionMs: 0, maxPendingBytes: 12 });
  const output = (row: LogChunkRow) =>
    create(TaskOutputSchema, {
      ref: { taskId: row.taskId, attempt: row.attempt },
      seq: row.seq,
      offset: BigInt(row.offset),
      stdoutOffset: BigInt(row.stdoutOffset),
      stderrOffset: BigInt(row.stderrOffset),
      runs: row.runs,
      data: row.data,
      final: row.final,
    });
  try {
    // 5 + 5 fit the bound while the first write is in flight; the final 10 does not.
    for (const row of flushes(task.id)) writer.add("w1", output(row));
    await writer.whenWritten(task.id, 1);
    expect(await readLogAttempt(db.sql, task.id, 1)).toMatchObject({ finalStored: false });
  } finally {
    await writer.stop();
  }
});

test("a read whose start was pruned says where its bytes begin", async () => {
  const task = await runningTask();
  await insertLogChunks(db.sql, flushes(task.id), 1 << 20);
  await db.sql`UPDATE task_log_chunks SET written_at = now() - interval '2 hours' WHERE task_id = ${task.id} AND seq = 0`;
  expect(await pruneLogChunks(db.sql, 3_600_000, 10)).toBe(1);
  const deps = { sql: db.sql } as unknown as ApiDeps;
  const read = await readLog(deps, task.id, logQuery(task.id, {}));
  expect(new TextDecoder().decode(read.bytes)).toBe("err1\nout2\nerr2\n");
  expect(read).toMatchObject({ attempt: 1, offset: 5, nextOffset: 20, complete: false });
  expect(() => logQuery(task.id, { attempt: "4294967295" })).toThrow("attempt must be at most");
  expect(() => logQuery("nope", {})).toThrow("task id");
});

// ReportWorkerLost's rate limits, against real PostgreSQL: the handler as the coordinator
// serves it, called with a request, its metadata and a peer, on a clock the test moves.
import { expect, setDefaultTimeout, test } from "bun:test";
import * as grpc from "@grpc/grpc-js";
import { RateLimiter } from "../../src/auth/rate-limit";
import { hashToken } from "../../src/auth/tokens";
import { WorkerRegistry } from "../../src/coordinator/registry";
import { peerHost, reportWorkerLostHandler } from "../../src/coordinator/worker-lost";
import { insertCredential } from "../../src/db/worker-credentials";
import { silentLogger } from "../../src/log";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { createTask } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();

function harness(limits = { perCredential: { perSecond: 1, burst: 2 }, perPeer: { perSecond: 2, burst: 4 } }) {
  let clock = 0;
  const handler = reportWorkerLostHandler({
    sql: db.sql,
    registry: new WorkerRegistry(),
    log: silentLogger,
    limits,
    now: () => clock,
  });
  const report = (options: { workerId: string; bearer: string | null; peer: string; taskId?: string }) => {
    const metadata = new grpc.Metadata();
    if (options.bearer !== null) metadata.set("authorization", `Bearer ${options.bearer}`);
    const call = {
      request: {
        workerId: options.workerId,
        attempts: options.taskId ? [{ taskId: options.taskId, attempt: 1 }] : [],
        reason: "test",
      },
      metadata,
      getPeer: () => options.peer,
    };
    return new Promise<{ code: grpc.status; details: string; requeued?: number }>((resolve) =>
      handler(call as never, (error, response) =>
        resolve(
          error
            ? { code: (error as { code: grpc.status }).code, details: String((error as { details?: string }).details) }
            : { code: grpc.status.OK, details: "", requeued: response?.requeued },
        ),
      ),
    );
  };
  return { report, advance: (ms: number) => (clock += ms) };
}

test("a credential gets its burst, then RESOURCE_EXHAUSTED with the wait, and its rate again as time passes", async () => {
  const { report, advance } = harness();
  const secret = "the-worker-credential-0123456789";
  await insertCredential(db.sql, { workerId: "w-limited", secretHash: hashToken(secret), joinedWith: null });
  const task = await createTask(db.sql, undefined, {
    assignTo: { workerId: "w-limited", coordinatorId: "c1", leaseMs: 60_000 },
  });
  const valid = { workerId: "w-limited", bearer: secret, peer: "ipv4:10.0.0.1:40000" };
  const first = await report({ ...valid, taskId: task.id });
  expect(first).toMatchObject({ code: grpc.status.OK, requeued: 1 });
  // The same report again from another port of that host: the burst of 2 still has one.
  expect((await report({ ...valid, peer: "ipv4:10.0.0.1:40001" })).code).toBe(grpc.status.OK);
  const limited = await report({ ...valid, peer: "ipv4:10.0.0.2:40000" });
  expect(limited.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  expect(limited.details).toMatch(/^too many lost-worker reports from this worker or host; retry in (\d+) ms$/);
  expect(Number(/retry in (\d+) ms/.exec(limited.details)![1])).toBeGreaterThan(0);
  advance(1000);
  expect((await report(valid)).code).toBe(grpc.status.OK);
  expect((await report(valid)).code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  // The first report requeued the task once; nothing since touched it.
  const [row] = await db.sql<{ state: string; attempt: number }[]>`SELECT state, attempt FROM tasks WHERE id = ${task.id}`;
  expect(row).toMatchObject({ state: "queued", attempt: 1 });
});

test("a host sending forged reports is held to its own rate, whatever credentials it tries; other hosts are not", async () => {
  const { report, advance } = harness();
  const forged = (i: number, peer = "ipv4:192.0.2.9:5000") =>
    report({ workerId: `w${i}`, bearer: `forged-${i}-0123456789`, peer });
  const answers = [];
  for (let i = 0; i < 6; i++) answers.push((await forged(i)).code);
  // Burst 4 per host: four are checked (and refused), the rest never reach the database.
  expect(answers).toEqual([
    grpc.status.UNAUTHENTICATED,
    grpc.status.UNAUTHENTICATED,
    grpc.status.UNAUTHENTICATED,
    grpc.status.UNAUTHENTICATED,
    grpc.status.RESOURCE_EXHAUSTED,
    grpc.status.RESOURCE_EXHAUSTED,
  ]);
  expect((await forged(7, "ipv6:[2001:db8::1]:5000")).code).toBe(grpc.status.UNAUTHENTICATED);
  advance(500);
  expect((await forged(8)).code).toBe(grpc.status.UNAUTHENTICATED);
  expect((await forged(9)).code).toBe(grpc.status.RESOURCE_EXHAUSTED);
});

test("reports without a credential share one bucket per worker id", async () => {
  const { report } = harness();
  const bare = (peer: string) => report({ workerId: "w-bare", bearer: null, peer });
  expect((await bare("ipv4:10.1.0.1:1")).code).toBe(grpc.status.UNAUTHENTICATED);
  expect((await bare("ipv4:10.1.0.2:1")).code).toBe(grpc.status.UNAUTHENTICATED);
  expect((await bare("ipv4:10.1.0.3:1")).code).toBe(grpc.status.RESOURCE_EXHAUSTED);
});

test("peerHost drops the port of each form grpc-js gives", () => {
  expect(peerHost("ipv4:10.0.0.7:41234")).toBe("10.0.0.7");
  expect(peerHost("ipv6:[::1]:5000")).toBe("::1");
  expect(peerHost("127.0.0.1:80")).toBe("127.0.0.1");
  expect(peerHost("unix:/run/tq.sock")).toBe("unix:/run/tq.sock");
});

test("the limiter keeps at most maxKeys buckets, dropping the least recently used", () => {
  const limiter = new RateLimiter(1, 1, 2);
  expect(limiter.take("a", 0)).toBe(0);
  expect(limiter.take("b", 0)).toBe(0);
  expect(limiter.take("a", 0)).toBeGreaterThan(0);
  expect(limiter.take("c", 0)).toBe(0);
  expect(limiter.size).toBe(2);
  // "b" was the least recently used: dropped, it comes back full; "a" is still empty.
  expect(limiter.take("a", 0)).toBeGreaterThan(0);
  expect(limiter.take("b", 0)).toBe(0);
});

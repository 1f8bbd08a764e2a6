// WorkerService.ReportWorkerLost: a worker's watchdog (src/worker/watchdog-process.ts) says its
// worker died or froze and that it stopped these attempts' processes. That is confirmed death,
// the one case besides the worker's own word in which an attempt is requeued before its lease
// lapses: a closed stream alone proves nothing (src/coordinator/worker-sessions.ts).
//
// Only the worker's own credential (from Welcome) is accepted, revoked or not (a revoked worker
// kills its tasks and exits, and its watchdog then reports them): a join token proves that one
// may join, not that one speaks for this worker. Each requeue is fenced on the task, attempt
// and worker, so a report can only end attempts that worker still held.
//
// Rate limited before any database work: a watchdog reports once when its worker dies (and
// retries what was not taken, at most every second), so per presented credential a few a
// second and per peer host (all the workers of one machine may die at once) some more are
// plenty; beyond that the answer is RESOURCE_EXHAUSTED with the wait, which the watchdog
// retries like any other failure. Nobody can make the coordinator check credentials or
// requeue faster than that, nor log a refusal a line per request.
import * as grpc from "@grpc/grpc-js";
import { RateLimiter } from "../auth/rate-limit";
import { bearerToken, hashToken } from "../auth/tokens";
import type { Sql } from "../db/sql";
import { requeueAttempt } from "../db/transitions";
import { checkCredential, touchCredential } from "../db/worker-credentials";
import type { ReportWorkerLostRequest, ReportWorkerLostResponse } from "../gen/taskqueue/v1/worker_service_pb";
import type { Logger } from "../log";
import type { TaskMetrics } from "../metrics/metrics";
import { attemptRefFromProto } from "../rpc/convert";
import type { WorkerRegistry } from "./registry";

export interface WorkerLostOptions {
  sql: Sql;
  registry: WorkerRegistry;
  log: Logger;
  /** Counts the attempts requeued on confirmed death (taskqueue_tasks_rescued_total). */
  metrics?: TaskMetrics;
  /** The rate limits (defaults: WORKER_LOST_LIMITS). */
  limits?: WorkerLostLimits;
  /** The clock of the rate limits, in ms (defaults to performance.now). */
  now?: () => number;
  /**
   * Told once attempts were requeued: this coordinator's dispatcher runs a pass at once rather
   * than when the change comes back through the database's notification.
   */
  requeued?: () => void;
}

/** Reports a second, and at once, per presented credential and per peer host. */
export interface WorkerLostLimits {
  perCredential: { perSecond: number; burst: number };
  perPeer: { perSecond: number; burst: number };
}

export const WORKER_LOST_LIMITS: WorkerLostLimits = {
  perCredential: { perSecond: 1, burst: 5 },
  perPeer: { perSecond: 10, burst: 50 },
};

/** Buckets kept per limit; past it the least recently used goes (src/auth/rate-limit.ts). */
const MAX_BUCKETS = 10_000;

/** The host of a grpc-js peer ("ipv4:10.0.0.7:41234", "ipv6:[::1]:5000", "unix:/path"), without its port. */
export function peerHost(peer: string): string {
  const ipv6 = /^ipv6:\[(.*)\](?::\d+)?$/.exec(peer);
  if (ipv6) return ipv6[1]!;
  const ipv4 = /^(?:ipv4:)?([^:]+):\d+$/.exec(peer);
  if (ipv4) return ipv4[1]!;
  return peer;
}

/** What the history says (event detail.reason) of an attempt the watchdog stopped. */
export const WATCHDOG_REASON = "stopped by the watchdog after the worker died";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function reportWorkerLostHandler(
  options: WorkerLostOptions,
): grpc.handleUnaryCall<ReportWorkerLostRequest, Partial<ReportWorkerLostResponse>> {
  const limits = options.limits ?? WORKER_LOST_LIMITS;
  const byCredential = new RateLimiter(limits.perCredential.perSecond, limits.perCredential.burst, MAX_BUCKETS);
  const byPeer = new RateLimiter(limits.perPeer.perSecond, limits.perPeer.burst, MAX_BUCKETS);
  const now = options.now ?? (() => performance.now());
  return (call, callback) => {
    const request = call.request;
    const value = call.metadata.get("authorization")[0];
    const credential = bearerToken(typeof value === "string" ? value : undefined);
    const peer = peerHost(call.getPeer());
    const at = now();
    // Both buckets pay for the request, so neither many peers with one credential nor many
    // credentials from one peer go past their limit.
    const wait = Math.max(
      byPeer.take(peer, at),
      byCredential.take(credential ? hashToken(credential) : `none:${request.workerId.slice(0, 200)}`, at),
    );
    if (wait > 0) {
      options.log.debug(
        { event: "coordinator.worker_lost_limited", worker: request.workerId, peer },
        "lost-worker report rate limited",
      );
      return callback({
        code: grpc.status.RESOURCE_EXHAUSTED,
        details: `too many lost-worker reports from this worker or host; retry in ${Math.ceil(wait)} ms`,
      });
    }
    const problem = requestProblem(request);
    if (problem) return callback({ code: grpc.status.INVALID_ARGUMENT, details: problem });
    void handle(options, request, credential).then(
      (answer) =>
        callback(answer.ok ? null : { code: answer.code, details: answer.details }, answer.ok ? answer.response : undefined),
      (error) => {
        options.log.warn({ err: error, worker: request.workerId }, "recording a lost worker failed");
        callback({ code: grpc.status.UNAVAILABLE, details: "could not record the report; retry" });
      },
    );
  };
}

type Answer = { ok: true; response: Partial<ReportWorkerLostResponse> } | { ok: false; code: grpc.status; details: string };

async function handle(options: WorkerLostOptions, request: ReportWorkerLostRequest, credential: string | null): Promise<Answer> {
  const { sql, log, registry } = options;
  const check = credential ? await checkCredential(sql, request.workerId, hashToken(credential)) : "unknown";
  // The use is recorded beside the requeue, not before it: a rescue waits for one round trip less.
  const touched =
    check === "valid"
      ? touchCredential(sql, request.workerId).catch((error) =>
          log.warn({ err: error, worker: request.workerId }, "recording a credential's use failed"),
        )
      : null;
  if (check !== "valid" && check !== "revoked") {
    log.warn(
      { event: "coordinator.worker_lost_refused", worker: request.workerId },
      "refused a lost-worker report without that worker's credential",
    );
    return {
      ok: false,
      code: grpc.status.UNAUTHENTICATED,
      details: "the worker's own credential is required (authorization: Bearer)",
    };
  }
  const why = request.reason.slice(0, 300);
  // "worker lost: ..." as every other loss of a worker reads (a final task's error says it too).
  const reason = `worker lost: ${WATCHDOG_REASON}${why ? ` (${why})` : ""}`;
  // Dead by its watchdog's word: none of the work requeued here may go back to it, whatever
  // pass (this one's wake, or a notification's) comes before its stream is gone.
  const corpse = registry.get(request.workerId);
  if (corpse) registry.drain(corpse);
  // Each requeue is fenced on its own attempt; they run side by side (the pool's connections).
  const rows = await Promise.all(
    request.attempts.map((ref) => requeueAttempt(sql, attemptRefFromProto(ref, request.workerId), reason, "lost")),
  );
  const requeued = rows.flatMap((row) => (row ? [row.id] : []));
  options.metrics?.rescued(requeued.length);
  log.warn(
    {
      event: "coordinator.worker_lost",
      worker: request.workerId,
      attempts: request.attempts.map((ref) => `${ref.taskId}:${ref.attempt}`),
      requeued: requeued.length,
      reason: why,
    },
    "the worker's watchdog confirmed its death: requeued its stopped attempts",
  );
  // Dead, or killed by its watchdog: a stream still open here is a corpse's.
  registry.get(request.workerId)?.close("its watchdog reported it lost");
  if (requeued.length > 0) options.requeued?.();
  await touched;
  return { ok: true, response: { requeued: requeued.length } };
}

function requestProblem(request: ReportWorkerLostRequest): string | null {
  if (!request.workerId || request.workerId.length > 200) return "worker_id must be 1 to 200 characters";
  if (request.attempts.length > 1024) return "attempts lists more attempts than a worker can hold";
  for (const ref of request.attempts) if (!UUID.test(ref.taskId)) return "attempts[].task_id must be a task id";
  return null;
}

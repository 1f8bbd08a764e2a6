// task-queue on a Patroni cluster, every part on a host of its own: the PostgreSQL cluster of
// test/support/patroni.ts (3 etcd, 2 PostgreSQL nodes), two coordinators, a scheduler and
// workers, all given the multi-host DATABASE_URL with target_session_attrs=primary. `Load`
// submits steadily with idempotency keys, retrying each key until it is acknowledged, and
// records every answer: what the failover test asserts on and the failover bench times.
// Used by test/e2e/patroni-failover.test.ts and bench/failover.ts (postgres-failover).
import { loggedCommand } from "./attempt-log";
import type { NetHost } from "./netns";
import { spawnRoleOn } from "./netns";
import { type PatroniCluster, startPatroniCluster } from "./patroni";
import type { RoleProcess } from "./processes";

const HTTP_PORT = 8080;
const GRPC_PORT = 50051;
const SCHEDULER_PORT = 8081;

export interface HaStack {
  cluster: PatroniCluster;
  coordinators: { process: RoleProcess; url: string; host: NetHost }[];
  scheduler: { process: RoleProcess; url: string };
  workers: RoleProcess[];
  databaseUrl: string;
  logs(lines?: number): string;
  stop(): Promise<void>;
}

export async function startHaStack(options: { workers: number; slots?: number; env?: Record<string, string> }): Promise<HaStack> {
  const roleHosts = 3 + options.workers;
  const cluster = await startPatroniCluster({ roleHosts });
  const processes: RoleProcess[] = [];
  const stop = async () => {
    for (const host of cluster.network.hosts) host.heal();
    await Promise.all(processes.filter((p) => p.role.startsWith("worker")).map((p) => p.stop(5000)));
    await Promise.all(processes.filter((p) => !p.role.startsWith("worker")).map((p) => p.stop(5000)));
    await cluster.stop();
  };
  try {
    const primary = await cluster.waitHealthy();
    const admin = (await import("postgres")).default(`postgres://postgres@${primary.host.ip}:5432/postgres`, {
      max: 1,
      onnotice: () => {},
    });
    await admin`CREATE DATABASE taskqueue`;
    await admin.end();
    const databaseUrl = cluster.url("taskqueue");
    const [c1, c2, s, ...workerHosts] = cluster.roleHosts as [NetHost, NetHost, NetHost, ...NetHost[]];
    const shared = {
      TQ_INSECURE: "true",
      TQ_LOG_LEVEL: "info",
      TQ_DB_QUERY_TIMEOUT_MS: "4000",
      TQ_DB_STATEMENT_TIMEOUT_MS: "3000",
      ...options.env,
    };
    const startRole = async (host: NetHost, role: "coordinator" | "scheduler", event: string) => {
      const proc = spawnRoleOn(host, role, {
        ...shared,
        DATABASE_URL: databaseUrl,
        TQ_HOST: host.ip,
        TQ_COORDINATOR_PORT: String(HTTP_PORT),
        TQ_SCHEDULER_PORT: String(SCHEDULER_PORT),
        TQ_GRPC_PORT: String(GRPC_PORT),
        ...(role === "coordinator" ? { TQ_COORDINATOR_ID: `coordinator@${host.ip}` } : {}),
      });
      processes.push(proc);
      await proc.waitForEvent(event, { timeoutMs: 60_000 });
      return proc;
    };
    // The first one migrates; the others then find the schema in place.
    const first = await startRole(c1, "coordinator", "coordinator.started");
    const [second, scheduler] = await Promise.all([
      startRole(c2, "coordinator", "coordinator.started"),
      startRole(s, "scheduler", "scheduler.started"),
    ]);
    const slots = options.slots ?? 2;
    const uidBase = 40_000 + Math.floor(Math.random() * 200) * 100;
    const workers = await Promise.all(
      workerHosts.slice(0, options.workers).map(async (host, i) => {
        const firstUid = uidBase + i * slots;
        const { TQ_DB_QUERY_TIMEOUT_MS: _q, TQ_DB_STATEMENT_TIMEOUT_MS: _s, ...workerEnv } = shared;
        const proc = spawnRoleOn(
          host,
          "worker",
          {
            ...workerEnv,
            TQ_COORDINATOR_ADDRESSES: `${c1.ip}:${GRPC_PORT},${c2.ip}:${GRPC_PORT}`,
            TQ_WORKER_SLOTS: String(slots),
            TQ_WORKER_WATCHDOG: "lean",
            TQ_TASK_UIDS: `${firstUid}-${firstUid + slots - 1}`,
          },
          { group: true },
        );
        processes.push(proc);
        await proc.waitForEvent("worker.connected", { timeoutMs: 60_000 });
        return proc;
      }),
    );
    return {
      cluster,
      coordinators: [
        { process: first, url: `http://${c1.ip}:${HTTP_PORT}`, host: c1 },
        { process: second, url: `http://${c2.ip}:${HTTP_PORT}`, host: c2 },
      ],
      scheduler: { process: scheduler, url: `http://${s.ip}:${SCHEDULER_PORT}` },
      workers,
      databaseUrl,
      logs(lines = 30) {
        return [
          ...processes.map((p) => `--- ${p.role} (pid ${p.pid}):\n${p.raw.slice(-lines).join("\n")}`),
          ...cluster.nodes.map((n) => cluster.log(n)),
        ].join("\n");
      },
      stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

export interface Answer {
  /** ms since the epoch when the request was sent (the first byte of its try). */
  sentAt: number;
  /** ms since the epoch when the answer came. */
  at: number;
  /** HTTP status, or 0 for no answer (connection refused or reset, our own timeout). */
  status: number;
  url: string;
}

/**
 * A steady submit load: `parallel` loops, each submitting one task at a time with a fresh
 * idempotency key and retrying that key (after 100 ms) until it is acknowledged, alternating
 * between the coordinators. `acked` maps each key to the task id acknowledged for it.
 */
export class Load {
  readonly answers: Answer[] = [];
  readonly acked = new Map<string, string>();
  /** Task id → when the try that was acknowledged was sent. */
  readonly sentAtById = new Map<string, number>();
  private running = true;
  private stoppedAt: number | null = null;
  private readonly loops: Promise<void>[] = [];
  private counter = 0;

  constructor(
    private readonly urls: string[],
    private readonly command: (key: string) => string,
    parallel = 3,
    private readonly pauseMs = 100,
  ) {
    for (let i = 0; i < parallel; i++) this.loops.push(this.loop(i));
  }

  private async loop(n: number): Promise<void> {
    const run = Math.random().toString(36).slice(2, 8);
    while (this.running) {
      const key = `load-${run}-${n}-${this.counter++}`;
      const body = JSON.stringify({ command: this.command(key), max_attempts: 3 });
      for (let tries = 0; ; tries++) {
        const url = this.urls[(n + tries) % this.urls.length]!;
        let status = 0;
        let text = "";
        const sentAt = Date.now();
        try {
          const response = await fetch(`${url}/tasks`, {
            method: "POST",
            headers: { "content-type": "application/json", "idempotency-key": key },
            body,
            signal: AbortSignal.timeout(15_000),
          });
          status = response.status;
          text = await response.text();
        } catch {
          status = 0;
        }
        this.answers.push({ sentAt, at: Date.now(), status, url });
        if (status === 200 || status === 201) {
          const id = (JSON.parse(text) as { id: string }).id;
          this.acked.set(key, id);
          this.sentAtById.set(id, sentAt);
          break;
        }
        // A key not yet acknowledged is retried even after stop() (it may have been written),
        // for up to a minute: then it stays unacknowledged, which asserts nothing about it.
        if (!this.running && (this.stoppedAt ?? 0) + 60_000 < Date.now()) break;
        await Bun.sleep(100);
      }
      await Bun.sleep(this.pauseMs);
    }
  }

  /**
   * When the first request sent at or after `t` (ms since the epoch) was acknowledged: one in
   * flight at `t` may have committed just before it.
   */
  firstAckAfter(t: number): number | null {
    const acks = this.answers.filter((a) => a.sentAt >= t && (a.status === 200 || a.status === 201));
    return acks.length === 0 ? null : Math.min(...acks.map((a) => a.at));
  }

  statuses(from = 0): Map<number, number> {
    const counts = new Map<number, number>();
    for (const a of this.answers) if (a.at >= from) counts.set(a.status, (counts.get(a.status) ?? 0) + 1);
    return counts;
  }

  async stop(): Promise<void> {
    if (this.running) this.stoppedAt = Date.now();
    this.running = false;
    await Promise.all(this.loops);
  }
}

/** A task body for the load: logs its attempt to `log` (test/support/attempt-log.ts). */
export const loadCommand = (log: string) => () => loggedCommand(log, "sleep 0.05");

/** Polls GET /readyz while running; keeps every non-200 answer with its body. */
export class ReadyWatch {
  readonly notReady: { at: number; status: number; body: string }[] = [];
  private running = true;
  private readonly done: Promise<void>;

  constructor(url: string) {
    this.done = (async () => {
      while (this.running) {
        try {
          const response = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(5000) });
          const body = await response.text();
          if (response.status !== 200) this.notReady.push({ at: Date.now(), status: response.status, body });
        } catch (error) {
          this.notReady.push({ at: Date.now(), status: 0, body: String(error) });
        }
        await Bun.sleep(100);
      }
    })();
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.done;
  }
}

// WorkerOptions from the configuration, shared by `bun run worker` and `bun start`.

import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../../package.json";
import { type Config, inheritedEnvironment, taskIsolation, workerRoutingConfig } from "../config";
import type { Logger } from "../log";
import { grpcClientCredentials } from "../tls";
import { cannotSwitchUsers, prepareIdentities, readableBy, type TaskIdentity } from "./identity";
import type { WorkerOptions } from "./worker";

export function workerOptions(
  config: Config,
  log: Logger,
  where: { name: string; addresses: string[]; identities?: readonly TaskIdentity[] },
): WorkerOptions {
  return {
    name: where.name,
    addresses: where.addresses,
    credentials: grpcClientCredentials(config),
    slots: config.TQ_WORKER_SLOTS,
    ...workerRoutingConfig(config),
    log,
    heartbeatIntervalMs: config.TQ_HEARTBEAT_INTERVAL_MS,
    heartbeatTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS,
    killGraceMs: config.TQ_KILL_GRACE_MS,
    drainGraceMs: config.TQ_DRAIN_GRACE_MS,
    maxOutputBytes: config.TQ_MAX_OUTPUT_BYTES,
    logFlush: { flushBytes: config.TQ_LOG_FLUSH_BYTES, maxDelayMs: config.TQ_LOG_FLUSH_MS },
    maxMessageBytes: config.TQ_GRPC_MAX_MESSAGE_BYTES,
    refusedBackoffMs: config.TQ_WORKER_REFUSED_BACKOFF_MS,
    maxUnacked: config.TQ_WORKER_MAX_UNACKED,
    version: pkg.version,
    baseEnv: inheritedEnvironment(),
    workerToken: config.TQ_WORKER_TOKEN,
    identities: where.identities,
    hostGateDir: hostGateDir(config),
    limits: {
      mode: config.TQ_WORKER_LIMITS,
      maxima: {
        memoryMb: config.TQ_WORKER_MAX_MEMORY_MB,
        pids: config.TQ_WORKER_MAX_PIDS,
        nofile: config.TQ_WORKER_MAX_NOFILE,
        cpu: config.TQ_WORKER_MAX_CPU,
      },
    },
  };
}

/**
 * The task users of `workers` workers of TQ_WORKER_SLOTS slots each, one list per worker (worker
 * k's slots follow worker k-1's in TQ_TASK_UIDS), or undefined for each when tasks run as the
 * worker itself, which is logged as a warning (`worker.no_isolation`). Throws when isolation is
 * required but impossible, or when the range or the homes do not fit.
 */
export function taskIdentities(config: Config, log: Logger, workers = 1): Array<readonly TaskIdentity[] | undefined> {
  const settings = taskIsolation(config);
  if (workers === 0) return [];
  const none = Array.from({ length: workers }, () => undefined);
  const why = settings.mode === "off" ? "TQ_TASK_ISOLATION=off" : cannotSwitchUsers();
  if (why !== null) {
    if (settings.mode === "required") {
      throw new Error(`TQ_TASK_ISOLATION=required, but this worker cannot run tasks as other users: ${why}`);
    }
    log.warn(
      { event: "worker.no_isolation", reason: why },
      `tasks run as the worker's own user (${why}): a task can read the worker's environment, its token included, and the environment and files of every other task; run the worker as root (or with CAP_SETUID and CAP_SETGID) to give each slot its own user`,
    );
    return none;
  }
  const slots = config.TQ_WORKER_SLOTS;
  const setting = workers === 1 ? `TQ_WORKER_SLOTS=${slots}` : `TQ_WORKERS=${workers} x TQ_WORKER_SLOTS=${slots}`;
  const all = prepareIdentities(settings, workers * slots, setting);
  if (config.TQ_WORKER_TOKEN_FILE && all.some((identity) => readableBy(config.TQ_WORKER_TOKEN_FILE!, identity))) {
    log.warn(
      { event: "worker.token_file_readable", path: config.TQ_WORKER_TOKEN_FILE },
      "tasks can read TQ_WORKER_TOKEN_FILE: make it readable by the worker's user only (chmod 600)",
    );
  }
  const last = all[all.length - 1];
  log.info(
    { event: "worker.isolated", uids: `${settings.ids.first}-${last?.uid ?? settings.ids.first}`, homeDir: settings.homeDir },
    "each slot runs its tasks as its own user",
  );
  return Array.from({ length: workers }, (_, k) => all.slice(k * slots, (k + 1) * slots));
}

/** TQ_WORKER_GATE_DIR: the folder of this user's host start gates, or null for none. */
export function hostGateDir(config: Config): string | null {
  const setting = config.TQ_WORKER_GATE_DIR;
  if (setting === "off") return null;
  return setting ?? join(tmpdir(), `taskqueue-gates-${process.getuid?.() ?? "user"}`);
}

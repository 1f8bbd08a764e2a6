// WorkerOptions from the configuration, shared by `bun run worker` and `bun start`.

import pkg from "../../package.json";
import { type Config, inheritedEnvironment } from "../config";
import type { Logger } from "../log";
import { grpcClientCredentials } from "../tls";
import type { WorkerOptions } from "./worker";

export function workerOptions(config: Config, log: Logger, where: { name: string; addresses: string[] }): WorkerOptions {
  return {
    name: where.name,
    addresses: where.addresses,
    credentials: grpcClientCredentials(config),
    slots: config.TQ_WORKER_SLOTS,
    log,
    heartbeatIntervalMs: config.TQ_HEARTBEAT_INTERVAL_MS,
    heartbeatTimeoutMs: config.TQ_HEARTBEAT_TIMEOUT_MS,
    killGraceMs: config.TQ_KILL_GRACE_MS,
    drainGraceMs: config.TQ_DRAIN_GRACE_MS,
    maxOutputBytes: config.TQ_MAX_OUTPUT_BYTES,
    maxMessageBytes: config.TQ_GRPC_MAX_MESSAGE_BYTES,
    version: pkg.version,
    baseEnv: inheritedEnvironment(),
    workerToken: config.TQ_WORKER_TOKEN,
  };
}

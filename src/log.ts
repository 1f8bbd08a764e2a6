// Structured JSON logs on stdout (pino). One logger per role, children per part.
//
// Every line carries the base fields that say which process wrote it (service: the role,
// version, host, pid); every line about one attempt of a task carries taskFields(), the same
// four names whichever role logs it, so an operator can follow a task across processes by
// filtering on task_id.
import { hostname } from "node:os";
import pino from "pino";
import pkg from "../package.json";
import type { Config } from "./config";

export type Logger = pino.Logger;

/** The base fields of every line a role writes. */
export function baseFields(role: string): { service: string; version: string; host: string; pid: number } {
  return { service: role, version: pkg.version, host: hostname(), pid: process.pid };
}

export function createLogger(role: string, level: Config["TQ_LOG_LEVEL"], destination?: pino.DestinationStream): Logger {
  const options: pino.LoggerOptions = { level, base: baseFields(role), timestamp: pino.stdTimeFunctions.isoTime };
  return destination ? pino(options, destination) : pino(options);
}

/** One attempt, as a log line names it. */
export interface TaskLogRef {
  taskId: string;
  attempt: number;
  /** The worker that holds (or held) the attempt. */
  workerId?: string | null;
  /** The coordinator the worker is (or was) connected to. */
  coordinatorId?: string | null;
}

/** The fields of a task-scoped log line: task_id, attempt, worker_id, coordinator_id. */
export function taskFields(ref: TaskLogRef): {
  task_id: string;
  attempt: number;
  worker_id: string | null;
  coordinator_id: string | null;
} {
  return {
    task_id: ref.taskId,
    attempt: ref.attempt,
    worker_id: ref.workerId ?? null,
    coordinator_id: ref.coordinatorId ?? null,
  };
}

/** A logger that drops everything, for tests and library use. */
export const silentLogger: Logger = pino({ level: "silent" });

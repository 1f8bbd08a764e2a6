// Row factories for tests.

import { ANONYMOUS } from "../../src/auth/tokens";
import type { TaskChangeRow } from "../../src/db/changes";
import { type Assignment, insertTask } from "../../src/db/insert";
import type { Sql } from "../../src/db/sql";
import { type AttemptResult, NO_OUTPUT, type Task, type TaskSpec } from "../../src/task/task";

export function taskSpec(overrides: Partial<TaskSpec> = {}): TaskSpec {
  return {
    command: "true",
    scheduledAt: null,
    timeoutMs: 0,
    maxAttempts: 3,
    env: {},
    secretEnv: {},
    cwd: null,
    retry: { onFailure: true, onTimeout: true, onLost: true, backoffBaseMs: 0, backoffCapMs: 0 },
    idempotencyKey: null,
    ...overrides,
  };
}

/**
 * A tasks row as the database returns it (every column, output included), for tests and
 * benches that need one without a database: a queued task that asked for nothing, with
 * `overrides` on top.
 */
export function taskRow(overrides: Partial<Task> = {}): Task {
  const created = new Date("2030-01-01T09:00:00.000Z");
  return {
    id: "01960f3c-8a4e-7b21-9c3d-2f5e6a7b8c9d",
    command: "true",
    state: "queued",
    priority: 0,
    scheduled_at: created,
    run_at: created,
    created_at: created,
    picked_at: null,
    started_at: null,
    completed_at: null,
    failed_at: null,
    cancelled_at: null,
    attempt: 0,
    interruptions: 0,
    max_attempts: 3,
    timeout_ms: 0,
    env: {},
    cwd: null,
    worker_id: null,
    coordinator_id: null,
    exit_code: null,
    signal: null,
    stdout: null,
    stderr: null,
    stdout_truncated: false,
    stderr_truncated: false,
    stdout_replaced: false,
    stderr_replaced: false,
    error: null,
    lease_expires_at: null,
    lease_ms: null,
    retry_on_failure: true,
    retry_on_timeout: true,
    retry_on_lost: true,
    retry_backoff_base_ms: 0,
    retry_backoff_cap_ms: 0,
    idempotency_key: null,
    idempotency_hash: null,
    secret_env: {},
    limits: null,
    traceparent: null,
    queue: "default",
    requires: [],
    prefers: [],
    schedule_timeout_ms: 0,
    priority_aging_ms: 1000,
    rank: null,
    ref: null,
    on_parent_failure: null,
    parents_pending: 0,
    has_children: false,
    parent_env: null,
    schedule_id: null,
    fire_at: null,
    ...overrides,
  };
}

/** A succeeded attempt's result, as a worker reports it. */
export function attemptResult(overrides: Partial<AttemptResult> = {}): AttemptResult {
  return {
    state: "succeeded",
    exitCode: 0,
    signal: null,
    ...NO_OUTPUT,
    error: null,
    startedAt: new Date(),
    finishedAt: new Date(),
    ...overrides,
  };
}

export const newTaskId = () => Bun.randomUUIDv7();

/** Inserts a task that must be new (no idempotency key clash) and returns its row. */
export async function createTask(
  sql: Sql,
  spec: TaskSpec = taskSpec(),
  options: { id?: string; assignTo?: Assignment } = {},
): Promise<TaskChangeRow> {
  const outcome = await insertTask(sql, options.id ?? newTaskId(), spec, { assignTo: options.assignTo });
  if (outcome.kind !== "created") throw new Error(`task was not created: its idempotency key was taken`);
  return outcome.task;
}

/** ApiDeps.auth that lets everyone in with every scope, for tests of other things. */
export const openAuth = { check: async () => ANONYMOUS };

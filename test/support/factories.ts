// Row factories for tests.

import { ANONYMOUS } from "../../src/auth/tokens";
import type { TaskChangeRow } from "../../src/db/changes";
import { type Assignment, insertTask } from "../../src/db/insert";
import type { Sql } from "../../src/db/sql";
import { type AttemptResult, NO_OUTPUT, type TaskSpec } from "../../src/task/task";

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

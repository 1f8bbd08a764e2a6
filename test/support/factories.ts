// Row factories for tests.
import type { TaskSpec } from "../../src/task/task";

export function taskSpec(overrides: Partial<TaskSpec> = {}): TaskSpec {
  return {
    command: "true",
    scheduledAt: null,
    timeoutMs: 0,
    maxAttempts: 3,
    env: {},
    cwd: null,
    ...overrides,
  };
}

export const newTaskId = () => Bun.randomUUIDv7();

// The task record as the database stores it and every transport reads it.
import type { TaskState } from "./state";

export interface Task {
  id: string;
  command: string;
  state: TaskState;
  priority: number;
  scheduled_at: Date;
  created_at: Date;
  picked_at: Date | null;
  started_at: Date | null;
  completed_at: Date | null;
  failed_at: Date | null;
  cancelled_at: Date | null;
  attempt: number;
  max_attempts: number;
  timeout_ms: number;
  env: Record<string, string>;
  cwd: string | null;
  /** The worker that holds the task, or held its last attempt. */
  worker_id: string | null;
  coordinator_id: string | null;
  exit_code: number | null;
  signal: string | null;
  stdout: string | null;
  stderr: string | null;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  error: string | null;
}

/** What a client asks for; validated at the edge (src/task/spec.ts). */
export interface TaskSpec {
  command: string;
  /** null: run now. */
  scheduledAt: Date | null;
  /** 0: no timeout. */
  timeoutMs: number;
  maxAttempts: number;
  env: Record<string, string>;
  cwd: string | null;
}

/** How an attempt ended, as the worker reports it. */
export interface AttemptResult {
  state: "succeeded" | "failed" | "timed_out";
  exitCode: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  stdoutTruncated: boolean;
  stderrTruncated: boolean;
  error: string | null;
  startedAt: Date | null;
  finishedAt: Date;
}

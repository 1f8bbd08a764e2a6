// Process checks for tests.
import { readFileSync } from "node:fs";

/**
 * Whether a process is alive. A zombie (exited, not yet reaped) counts as gone: PID 1 here
 * can take a while to reap orphans, and kill(pid, 0) succeeds on a zombie.
 */
export function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

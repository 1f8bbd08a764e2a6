// Whether a process, or any process of a group, is still alive (Linux: reads /proc).
import { readdirSync, readFileSync } from "node:fs";

/** The state letter and process group of a process, from /proc/<pid>/stat; null when it is gone. */
function stat(pid: number): { state: string; group: number } | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    // After "pid (comm) ": state, ppid, pgrp. comm may hold spaces and parentheses.
    const [state, , group] = text.slice(text.lastIndexOf(")") + 2).split(" ");
    return { state: state ?? "", group: Number(group) };
  } catch {
    return null;
  }
}

const gone = (state: string) => state === "Z" || state === "X";

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
  const now = stat(pid);
  return now !== null && !gone(now.state);
}

/** The live (not zombie) processes of process group `group`. */
export function runningInGroup(group: number): number[] {
  let pids: string[];
  try {
    pids = readdirSync("/proc").filter((name) => /^\d+$/.test(name));
  } catch {
    return [];
  }
  return pids.map(Number).filter((pid) => {
    const now = stat(pid);
    return now !== null && now.group === group && !gone(now.state);
  });
}

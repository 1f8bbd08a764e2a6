// The ground truth of when each attempt of a task really ran, written by the commands
// themselves: a test wraps a task's command with `loggedCommand`, which appends a `start` line
// (task, attempt, the shell's pid, which leads the attempt's process group, and
// `date +%s%N`) before the body and an `end` line after it. A `start` line also counts the
// live processes of every earlier attempt of the same task, read from /proc at that moment:
// an attempt killed without a chance to write `end` (SIGKILL, a watchdog) still shows
// whether it was gone when the next one began. `overlaps` turns the file into the number of
// times two attempts of one task were alive at once. Tasks may run as their slots' own users:
// the file must live in a `taskDir()` and be created writable by all (`createAttemptLog`).
import { chmodSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export interface AttemptRecord {
  kind: "start" | "end";
  task: string;
  attempt: number;
  /** The attempt's shell: the leader of its process group. */
  pid: number;
  /** Nanoseconds since the epoch (`date +%s%N`). */
  ns: bigint;
  /** On `start`: live processes of earlier attempts' process groups at that moment. */
  alive: number;
  /** The extra word given to `loggedCommand` (e.g. which host ran it). */
  tag: string;
}

/** Creates an empty log in `dir` (a `taskDir()`) that every slot user may append to. */
export function createAttemptLog(dir: string, name = "attempts.log"): string {
  const path = join(dir, name);
  writeFileSync(path, "");
  chmodSync(path, 0o666);
  return path;
}

const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;

/**
 * `body` wrapped so that it logs its start and end to `log`. The start line counts, from
 * /proc, the live (not zombie) processes whose process group is an earlier attempt's shell;
 * the scan runs only when earlier attempts of the task are in the log.
 */
export function loggedCommand(log: string, body: string, tag = "-"): string {
  const f = quote(log);
  if (!/^[\w.-]+$/.test(tag)) throw new Error(`an attempt log tag is one word of [A-Za-z0-9_.-], not ${JSON.stringify(tag)}`);
  const t = tag;
  return [
    `tq_prev=$(awk -v t="$TQ_TASK_ID" '$1 == "start" && $2 == t { print $4 }' ${f})`,
    "tq_alive=0",
    `if [ -n "$tq_prev" ]; then tq_alive=$(cat /proc/[0-9]*/stat 2>/dev/null | awk -v gs="$tq_prev" 'BEGIN { n = split(gs, a, " "); for (i = 1; i <= n; i++) g[a[i]] = 1 } { sub(/^.*\\) /, ""); if (($3 in g) && $1 != "Z" && $1 != "X") c++ } END { print c + 0 }'); fi`,
    `echo "start $TQ_TASK_ID $TQ_TASK_ATTEMPT $$ $(date +%s%N) $tq_alive ${t}" >> ${f}`,
    body,
    "tq_status=$?",
    `echo "end $TQ_TASK_ID $TQ_TASK_ATTEMPT $$ $(date +%s%N) 0 ${t}" >> ${f}`,
    "exit $tq_status",
  ].join("\n");
}

export function readAttemptLog(log: string): AttemptRecord[] {
  const records: AttemptRecord[] = [];
  for (const line of readFileSync(log, "utf8").split("\n")) {
    const [kind, task, attempt, pid, ns, alive, tag] = line.split(" ");
    if ((kind !== "start" && kind !== "end") || !task || !ns) continue;
    records.push({
      kind,
      task,
      attempt: Number(attempt),
      pid: Number(pid),
      ns: BigInt(ns),
      alive: Number(alive ?? 0),
      tag: tag ?? "-",
    });
  }
  return records;
}

export interface AttemptSpan {
  task: string;
  attempt: number;
  pid: number;
  tag: string;
  start: bigint;
  /** Null when the attempt never logged its end (killed). */
  end: bigint | null;
  /** Live processes of earlier attempts when this one started. */
  aliveAtStart: number;
}

/** Each attempt's span, in start order. */
export function attemptSpans(records: readonly AttemptRecord[]): AttemptSpan[] {
  const spans = new Map<string, AttemptSpan>();
  for (const r of records) {
    const key = `${r.task}#${r.attempt}#${r.pid}`;
    if (r.kind === "start") {
      spans.set(key, { task: r.task, attempt: r.attempt, pid: r.pid, tag: r.tag, start: r.ns, end: null, aliveAtStart: r.alive });
    } else {
      const span = spans.get(key);
      if (span) span.end = r.ns;
    }
  }
  return [...spans.values()].sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
}

export interface Overlap {
  task: string;
  earlier: AttemptSpan;
  later: AttemptSpan;
  why: "spans intersect" | "earlier attempt's processes alive at the later start";
}

/**
 * Every pair of attempts of one task that were alive at once: the later one started before
 * the earlier one logged its end, or (the earlier one never logged an end) processes of the
 * earlier one were alive when the later one started.
 */
export function overlaps(records: readonly AttemptRecord[]): Overlap[] {
  const byTask = new Map<string, AttemptSpan[]>();
  for (const span of attemptSpans(records)) {
    const list = byTask.get(span.task) ?? [];
    list.push(span);
    byTask.set(span.task, list);
  }
  const found: Overlap[] = [];
  for (const [task, list] of byTask) {
    for (let j = 1; j < list.length; j++) {
      const later = list[j]!;
      let counted = false;
      for (let i = 0; i < j; i++) {
        const earlier = list[i]!;
        if (earlier.end !== null && earlier.end > later.start) {
          found.push({ task, earlier, later, why: "spans intersect" });
          counted = true;
        }
      }
      if (!counted && later.aliveAtStart > 0) {
        found.push({ task, earlier: list[j - 1]!, later, why: "earlier attempt's processes alive at the later start" });
      }
    }
  }
  return found;
}

export function describeOverlap(o: Overlap): string {
  const at = (ns: bigint | null) => (ns === null ? "never" : `${Number(ns / 1_000_000n) % 100_000} ms`);
  return `${o.task}: attempt ${o.earlier.attempt} (pid ${o.earlier.pid}, ${o.earlier.tag}, ${at(o.earlier.start)}..${at(o.earlier.end)}) and attempt ${o.later.attempt} (pid ${o.later.pid}, ${o.later.tag}, from ${at(o.later.start)}; ${o.later.aliveAtStart} earlier processes alive): ${o.why}`;
}

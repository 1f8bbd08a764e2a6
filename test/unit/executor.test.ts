import { expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execute, type RunResult, type RunSpec } from "../../src/worker/executor.ts";
import { TailBuffer } from "../../src/worker/output.ts";
import { isRunning } from "../support/is-running";

// Real processes and signals: well under a second each when the machine is idle, but a loaded
// CI machine has taken over the runner's 5 s default.
setDefaultTimeout(30_000);

const baseEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin" };

function spec(command: string, overrides: Partial<RunSpec> = {}): RunSpec {
  return { command, env: {}, timeoutMs: 0, killGraceMs: 2000, maxOutputBytes: 1 << 20, baseEnv, ...overrides };
}

function run(command: string, overrides: Partial<RunSpec> = {}) {
  return execute(spec(command, overrides)).result;
}

/**
 * Runs fn with the path of a fresh FIFO. A command writes to it once it is ready (trap set,
 * grandchild forked), and the test reads it: a handshake instead of a sleep.
 */
async function withFifo<T>(fn: (fifo: string) => Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), "executor-"));
  try {
    const fifo = join(dir, "ready");
    expect(Bun.spawnSync(["mkfifo", fifo]).exitCode).toBe(0);
    return await fn(fifo);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The line the command wrote to fifo; fails instead of hanging if the command ends first. */
async function readiness(fifo: string, result: Promise<RunResult>): Promise<string> {
  const line = Bun.file(fifo).text();
  const ended = result.then((r) => {
    throw new Error(`command ended before it was ready: ${JSON.stringify(r)}`);
  });
  return (await Promise.race([line, ended])).trim();
}

test("captures stdout of a successful command", async () => {
  const r = await run("echo hello");
  expect(r.outcome).toBe("exited");
  expect(r.exitCode).toBe(0);
  expect(r.signal).toBeNull();
  expect(r.error).toBeNull();
  expect(r.stdout).toBe("hello\n");
  expect(r.stdoutTruncated).toBe(false);
  expect(r.pid).toBeGreaterThan(0);
  expect(r.finishedAt.getTime()).toBeGreaterThanOrEqual(r.startedAt.getTime());
});

test("a non-zero exit is a result, not an error", async () => {
  const r = await run("exit 3");
  expect(r.outcome).toBe("exited");
  expect(r.exitCode).toBe(3);
  expect(r.signal).toBeNull();
  expect(r.error).toBeNull();
});

test("captures stderr separately from stdout", async () => {
  const r = await run("echo out; echo oops >&2");
  expect(r.stdout).toBe("out\n");
  expect(r.stderr).toBe("oops\n");
});

test("a signal the task sent itself is reported as exited with the signal name", async () => {
  const r = await run("kill -USR1 $$");
  expect(r.outcome).toBe("exited");
  expect(r.exitCode).toBeNull();
  expect(r.signal).toBe("SIGUSR1");
});

test("passes the task env and withholds the worker's own variables", async () => {
  const r = await run('echo "$FOO|$KEEP|${DATABASE_URL-unset}|${TQ_SECRET-unset}|$TQ_TASK_ID|$TQ_TASK_ATTEMPT"', {
    baseEnv: { ...baseEnv, KEEP: "kept", FOO: "base", DATABASE_URL: "postgres://secret", TQ_SECRET: "s" },
    env: { FOO: "task", TQ_TASK_ID: "t1", TQ_TASK_ATTEMPT: "2" },
  });
  expect(r.stdout).toBe("task|kept|unset|unset|t1|2\n");
});

test("does not invent TQ_TASK_ID when the caller does not pass it", async () => {
  const r = await run('echo "${TQ_TASK_ID-unset}"', { baseEnv: { ...baseEnv, TQ_TASK_ID: "worker" } });
  expect(r.stdout).toBe("unset\n");
});

test("runs in the given cwd", async () => {
  const dir = mkdtempSync(join(tmpdir(), "executor-"));
  try {
    const r = await run("pwd -P", { cwd: dir });
    expect(r.stdout.trim()).toBe(Bun.spawnSync(["realpath", dir]).stdout.toString().trim());
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a missing cwd is spawn_failed with a clear error, not a throw", async () => {
  const e = execute(spec("echo never", { cwd: "/nope/does-not-exist" }));
  expect(e.pid).toBeNull();
  e.stop("cancelled"); // no-op
  const r = await e.result;
  expect(r.outcome).toBe("spawn_failed");
  expect(r.error).toBe("cwd /nope/does-not-exist does not exist");
  expect(r.exitCode).toBeNull();
  expect(r.pid).toBeNull();
});

test("a cwd that is a file is spawn_failed", async () => {
  const dir = mkdtempSync(join(tmpdir(), "executor-"));
  try {
    const file = join(dir, "f");
    writeFileSync(file, "");
    const r = await run("echo never", { cwd: file });
    expect(r.outcome).toBe("spawn_failed");
    expect(r.error).toBe(`cwd ${file} is not a directory`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("keeps only the last maxOutputBytes of each stream", async () => {
  const r = await run("head -c 9990 /dev/zero | tr '\\0' a; printf 0123456789; printf %050d 0 >&2", {
    maxOutputBytes: 100,
  });
  expect(r.stdout).toBe(`${"a".repeat(90)}0123456789`);
  expect(r.stdoutTruncated).toBe(true);
  expect(r.stderr).toBe("0".repeat(50));
  expect(r.stderrTruncated).toBe(false);
});

test("large output stays bounded", async () => {
  const r = await run("head -c 50000000 /dev/zero | tr '\\0' x; printf END", { maxOutputBytes: 1000 });
  expect(r.stdout.length).toBe(1000);
  expect(r.stdout.endsWith("xEND")).toBe(true);
  expect(r.stdoutTruncated).toBe(true);
});

test("a NUL byte and invalid UTF-8 become U+FFFD, and the result says so", async () => {
  const r = await run("printf 'a\\0b'; printf 'x\\377\\376y' >&2", { maxOutputBytes: 100 });
  expect(r.stdout).toBe("a\uFFFDb");
  expect(r.stdoutReplaced).toBe(true);
  expect(r.stderr).toBe("x\uFFFD\uFFFDy");
  expect(r.stderrReplaced).toBe(true);
  const clean = await run("printf 'caf\\303\\251'", { maxOutputBytes: 100 });
  expect(clean.stdout).toBe("café");
  expect(clean.stdoutReplaced).toBe(false);
  expect(clean.stderrReplaced).toBe(false);
});

test("replacement never makes a tail longer than its limit in bytes", () => {
  const tail = new TailBuffer(10);
  tail.push(new Uint8Array(10).fill(0xff)); // ten invalid bytes: thirty bytes of U+FFFD
  const text = tail.text();
  expect(text.replaced).toBe(true);
  expect(text.truncated).toBe(true);
  expect(Buffer.byteLength(text.text, "utf8")).toBeLessThanOrEqual(10);
  expect(text.text).toBe("\uFFFD".repeat(3));
});

test("tail buffer drops a partial leading UTF-8 character", () => {
  const tail = new TailBuffer(4);
  tail.push(new TextEncoder().encode("xé€")); // 1 + 2 + 3 bytes; the tail starts mid-é
  expect(tail.truncated).toBe(true);
  expect(tail.text().text).toBe("€");
  const exact = new TailBuffer(3);
  exact.push(new TextEncoder().encode("ab"));
  exact.push(new TextEncoder().encode("c"));
  expect(exact.truncated).toBe(false);
  expect(exact.text()).toEqual({ text: "abc", truncated: false, replaced: false });
});

test("times out and kills the group", async () => {
  const t0 = performance.now();
  const r = await run("sleep 10", { timeoutMs: 100, killGraceMs: 5000 });
  expect(r.outcome).toBe("timed_out");
  expect(r.error).toBe("timed out after 100 ms");
  expect(r.exitCode).toBeNull();
  expect(r.signal).toBe("SIGTERM");
  expect(performance.now() - t0).toBeLessThan(3000);
});

test("stop() kills grandchildren in the process group", async () => {
  await withFifo(async (fifo) => {
    const e = execute(spec(`sleep 100 & echo $! > ${fifo}; sleep 100`, { killGraceMs: 5000 }));
    const grandchild = Number(await readiness(fifo, e.result));
    expect(isRunning(grandchild)).toBe(true);
    e.stop("cancelled");
    e.stop("abandoned"); // idempotent: the first reason wins
    const r = await e.result;
    expect(r.outcome).toBe("cancelled");
    expect(r.error).toBeNull();
    expect(r.exitCode).toBeNull();
    expect(r.signal).toBe("SIGTERM");
    expect(isRunning(grandchild)).toBe(false);
  });
});

test("a process group that ignores SIGTERM is SIGKILLed after killGraceMs", async () => {
  await withFifo(async (fifo) => {
    const e = execute(spec(`trap '' TERM; echo ready > ${fifo}; sleep 100`, { killGraceMs: 300 }));
    expect(await readiness(fifo, e.result)).toBe("ready");
    const t0 = performance.now();
    e.stop("abandoned");
    const r = await e.result;
    const elapsed = performance.now() - t0;
    expect(r.outcome).toBe("abandoned");
    expect(r.signal).toBe("SIGKILL");
    expect(r.exitCode).toBeNull();
    expect(elapsed).toBeGreaterThanOrEqual(290); // timer granularity
    expect(elapsed).toBeLessThan(5000);
  });
});

test("kill() SIGKILLs the whole group at once, without waiting out the grace", async () => {
  await withFifo(async (fifo) => {
    // A grace far longer than the test: only an immediate SIGKILL ends this in time.
    const e = execute(spec(`trap '' TERM; sleep 100 & echo $! > ${fifo}; wait`, { killGraceMs: 120_000 }));
    const grandchild = Number(await readiness(fifo, e.result));
    expect(isRunning(grandchild)).toBe(true);
    e.kill();
    const r = await e.result;
    expect(r.outcome).toBe("abandoned");
    expect(r.signal).toBe("SIGKILL");
    expect(isRunning(grandchild)).toBe(false);
  });
});

test("leaves no timers behind, so a process that only ran tasks exits", async () => {
  // A leaked timeout or SIGKILL timer (60 s each here) would keep this process alive past
  // the test's own timeout.
  const executor = join(import.meta.dir, "../../src/worker/executor.ts");
  const script = `
    import { execute } from ${JSON.stringify(executor)};
    const spec = { env: {}, baseEnv: process.env, timeoutMs: 60000, killGraceMs: 60000, maxOutputBytes: 100 };
    const done = await execute({ ...spec, command: "true" }).result;
    const stopped = execute({ ...spec, command: "sleep 100" });
    stopped.stop("cancelled");
    console.log(done.outcome, (await stopped.result).outcome);
  `;
  const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "inherit" });
  expect(await child.exited).toBe(0);
  expect(await new Response(child.stdout).text()).toBe("exited cancelled\n");
}, 20000);

test("stop() after exit is a no-op", async () => {
  const e = execute(spec("exit 0"));
  const r1 = await e.result;
  e.stop("cancelled");
  const r2 = await e.result;
  expect(r2.outcome).toBe("exited");
  expect(r2.exitCode).toBe(0);
  expect(r2).toBe(r1);
});

test("a background child that outlives the leader is killed and does not hang the result", async () => {
  // $! exists (forked) before the leader prints it, so it is in the group when the leader exits;
  // it holds stdout open, so the result waits for the group to be killed, not for sleep 100.
  const r = await run("sleep 100 & echo $!", { killGraceMs: 5000 });
  expect(r.outcome).toBe("exited");
  expect(r.exitCode).toBe(0);
  const straggler = Number(r.stdout.trim());
  expect(straggler).toBeGreaterThan(0);
  expect(isRunning(straggler)).toBe(false);
});

test("an armed execution holds its command until release(); its start time is the release", async () => {
  const dir = mkdtempSync(join(tmpdir(), "executor-armed-"));
  try {
    const marker = join(dir, "ran");
    const execution = execute(spec(`echo "$TQ_X" > '${marker}'`, { env: { TQ_X: "x" }, armed: true }));
    expect(execution.pid).not.toBeNull();
    expect(execution.released).toBe(false);
    // Spawned and waiting: its process group exists, the command has not run.
    expect(isRunning(execution.pid!)).toBe(true);
    expect(await Bun.file(marker).exists()).toBe(false);
    const spawnedAt = execution.startedAt;
    expect(execution.release()).toBe(true);
    expect(execution.release()).toBe(false);
    expect(execution.released).toBe(true);
    expect(execution.startedAt.getTime()).toBeGreaterThanOrEqual(spawnedAt.getTime());
    const result = await execution.result;
    expect(result).toMatchObject({ outcome: "exited", exitCode: 0 });
    expect(result.startedAt).toBe(execution.startedAt);
    expect(await Bun.file(marker).text()).toBe("x\n");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an armed execution stopped or killed before release never runs its command", async () => {
  const dir = mkdtempSync(join(tmpdir(), "executor-armed-"));
  try {
    const marker = join(dir, "ran");
    const stopped = execute(spec(`touch '${marker}'`, { armed: true }));
    stopped.stop("cancelled");
    expect(stopped.release()).toBe(false);
    expect(await stopped.result).toMatchObject({ outcome: "cancelled" });
    expect(isRunning(stopped.pid!)).toBe(false);

    const killed = execute(spec(`touch '${marker}'`, { armed: true }));
    killed.kill();
    expect(await killed.result).toMatchObject({ outcome: "abandoned" });
    expect(killed.release()).toBe(false);
    expect(await Bun.file(marker).exists()).toBe(false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("an armed execution with a missing cwd fails as an unarmed one does", async () => {
  const execution = execute(spec("true", { cwd: "/nonexistent/armed", armed: true }));
  expect(execution.release()).toBe(false);
  expect(await execution.result).toMatchObject({ outcome: "spawn_failed", error: "cwd /nonexistent/armed does not exist" });
});

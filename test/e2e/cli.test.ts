// tq, driven as a user drives it: `bun src/cli/main.ts <verb>` as its own process (what
// `bun run tq` and the `tq` bin run), against a real coordinator, scheduler and worker on a real
// database, with API tokens that `tq token create` made. `watch` and `logs -f` also run in a
// terminal (a pty, through util-linux's `script`), where their lines must appear as the task
// goes, not at its end.
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import openapi from "../../src/client/openapi.json" with { type: "json" };
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { type Cluster, startCluster } from "../support/processes";
import { taskDir } from "../support/task-dir";

// Each tq run is a process of its own (a Bun start-up each): the tests that run many get twice the usual time.
setDefaultTimeout(2 * TEST_TIMEOUT_MS);

const ROOT = join(import.meta.dir, "../..");
const MAIN = "src/cli/main.ts";
const db = useTestDatabase();
let cluster: Cluster;
let dir: string;
const tokens: Record<string, string> = {};

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs tq with `args` (and TQ_URL/TQ_TOKEN from `env`), as its own process, to its end. */
async function tq(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const proc = Bun.spawn(["bun", MAIN, ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/tmp", ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { code, stdout, stderr };
}

/** tq against the cluster's coordinator with the `ops` token (every scope but admin) unless told otherwise. */
const api = (args: string[], token: string | null = tokens.ops ?? null, url = cluster.coordinatorUrl) =>
  tq(args, { TQ_URL: url, ...(token ? { TQ_TOKEN: token } : {}) });

const shellQuote = (word: string) => `'${word.replaceAll("'", `'\\''`)}'`;

/** tq in a pseudo-terminal: `script` runs it on a pty and copies what the terminal shows to our pipe. */
function inTerminal(args: string[], env: Record<string, string>) {
  const command = ["bun", MAIN, ...args].map(shellQuote).join(" ");
  const proc = Bun.spawn(["script", "-qfec", command, "/dev/null"], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/tmp", TERM: "xterm", ...env },
    stdin: "pipe",
    stdout: "pipe",
    stderr: "pipe",
  });
  let screen = "";
  const waiters: { pattern: RegExp; resolve: () => void }[] = [];
  const reading = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of proc.stdout) {
      screen += decoder.decode(chunk, { stream: true });
      for (const waiter of waiters.splice(0)) {
        if (waiter.pattern.test(screen)) waiter.resolve();
        else waiters.push(waiter);
      }
    }
  })();
  return {
    /** Resolves once the terminal has shown text matching `pattern`. */
    shows(pattern: RegExp): Promise<void> {
      if (pattern.test(screen)) return Promise.resolve();
      return new Promise((resolve) => waiters.push({ pattern, resolve }));
    },
    get screen() {
      return screen;
    },
    async exited(): Promise<number> {
      const code = await proc.exited;
      await reading;
      return code;
    },
  };
}

/** The token printed by `tq token create`. */
function tokenFrom(run: Run): string {
  const match = /token \(shown once, keep it secret\): (tq_\S+)/.exec(run.stdout);
  if (!match) throw new Error(`no token in ${JSON.stringify(run)}`);
  return match[1] as string;
}

beforeAll(async () => {
  dir = taskDir("tq-cli-");
  // Tokens first, by the CLI itself, on the database: the roles then require them from the start.
  for (const [name, scopes] of [
    ["ops", "submit,read,cancel"],
    ["reader", "read"],
    ["root", "admin"],
  ] as const) {
    const made = await tq(["token", "create", "--name", name, "--scope", scopes], { DATABASE_URL: db.url });
    expect(made.code, made.stderr).toBe(0);
    tokens[name] = tokenFrom(made);
  }
  cluster = await startCluster(db.url, { workers: 1, slots: 4, env: { TQ_SCHEDULES: "true" } });
});

afterAll(async () => {
  await cluster?.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("tq token", () => {
  test("lists the tokens it made; a repeated name is refused with exit 2 and the reason", async () => {
    const listed = await tq(["token", "list"], { DATABASE_URL: db.url });
    expect(listed.code).toBe(0);
    expect(listed.stdout).toMatch(/^ops\tsubmit,read,cancel\t/m);
    expect(listed.stdout).toMatch(/^reader\tread\t/m);
    const again = await tq(["token", "create", "--name", "ops", "--scope", "read"], { DATABASE_URL: db.url });
    expect(again.code).toBe(2);
    expect(again.stderr).toContain('a token named "ops" exists already');
  });
});

describe("tq submit", () => {
  test("--wait prints the task's output and exits with its exit code", async () => {
    const run = await api(["submit", "--wait", "--max-attempts", "1", "echo out; echo err >&2; exit 7"]);
    expect(run.code).toBe(7);
    expect(run.stdout).toBe("out\n");
    expect(run.stderr).toContain("err\n");
    expect(run.stderr).toMatch(/task \S+ failed: .*exit code 7/);

    const ok = await api(["submit", "--wait", "--", "printf", "%s-%s", "a", "b"]);
    expect(ok).toMatchObject({ code: 0, stdout: "a-b" });
  });

  test("--wait: 128+N for a signal, 124 for a timeout; --json gives the final task", async () => {
    const killed = await api(["submit", "--wait", "--max-attempts", "1", "kill -9 $$"]);
    expect(killed.code).toBe(128 + 9);
    const slow = await api(["submit", "--wait", "--json", "--max-attempts", "1", "--timeout-ms", "300", "sleep 30"]);
    expect(slow.code).toBe(124);
    const task = JSON.parse(slow.stdout);
    expect(task.state).toBe("timed_out");
  });

  test("--at, --queue and --priority reach the task; it prints the id; status and list show it", async () => {
    const submitted = await api(["submit", "--at", "+1h", "--queue", "cli-later", "--priority", "5", "echo later"]);
    expect(submitted.code).toBe(0);
    const id = submitted.stdout.trim();
    expect(id).toMatch(/^[0-9a-f-]{36}$/);

    const status = await api(["status", id, "--json"]);
    const task = JSON.parse(status.stdout);
    expect(task).toMatchObject({ id, state: "queued", queue: "cli-later", priority: 5, command: "echo later" });
    const inAnHour = Date.parse(task.scheduled_at) - Date.now();
    expect(inAnHour).toBeGreaterThan(50 * 60_000);
    expect(inAnHour).toBeLessThan(61 * 60_000);

    const human = await api(["status", id]);
    expect(human.stdout).toMatch(/^state: +queued$/m);
    expect(human.stdout).toMatch(/^queue: +cli-later$/m);

    const listed = await api(["list", "--queue", "cli-later"]);
    expect(listed.code).toBe(0);
    expect(listed.stdout.split("\n")[0]).toMatch(/^ID +STATE +QUEUE +ATTEMPT +CREATED +COMMAND$/);
    expect(listed.stdout).toContain(`${id}  queued`);
    const json = JSON.parse((await api(["list", "--queue", "cli-later", "--json"])).stdout);
    expect(json.tasks.map((t: { id: string }) => t.id)).toEqual([id]);
  });
});

describe("tq cancel and retry", () => {
  test("one task: cancel, cancel again is 4, retry queues it, retry again is 4", async () => {
    const gate = join(dir, "one-gate");
    // Once retried it runs at once: it waits on the gate, so it has not finished when retried again.
    const id = (await api(["submit", "--at", "+1h", `while [ ! -e '${gate}' ]; do sleep 0.02; done`])).stdout.trim();
    const cancelled = await api(["cancel", id]);
    expect(cancelled).toMatchObject({ code: 0, stdout: `${id} cancelled\n` });
    const again = await api(["cancel", id]);
    expect(again.code).toBe(4);
    expect(again.stderr).toContain("already cancelled");
    const retried = await api(["retry", id]);
    expect(retried).toMatchObject({ code: 0, stdout: `${id} queued\n` });
    const notFinal = await api(["retry", id]);
    expect(notFinal.code).toBe(4);
    expect(notFinal.stderr).toContain("not_final");
    writeFileSync(gate, "");
    // The history names who did it.
    const history = await fetch(`${cluster.coordinatorUrl}/tasks/${id}/history`, {
      headers: { authorization: `Bearer ${tokens.reader}` },
    }).then((response) => response.json() as Promise<{ events: { kind: string; actor: string | null }[] }>);
    expect(history.events.filter((e) => e.kind === "cancelled" || e.kind === "retried").map((e) => [e.kind, e.actor])).toEqual([
      ["cancelled", "ops"],
      ["retried", "ops"],
    ]);
  });

  test("a failed task retried runs once more; watch follows it and exits with its code", async () => {
    const gate = join(dir, "retry-gate");
    const command = `[ -e '${gate}' ] && exit 0; exit 9`;
    const first = await api(["submit", "--wait", "--json", "--max-attempts", "1", command]);
    expect(first.code).toBe(9);
    const id = JSON.parse(first.stdout).id as string;
    writeFileSync(gate, "");
    expect((await api(["retry", id])).code).toBe(0);
    const watched = await api(["watch", id]);
    expect(watched.code).toBe(0);
    // Its last line: succeeded on attempt 2 (an event line, or the state when watch began if it had finished by then).
    expect(watched.stdout).toMatch(/succeeded +attempt 2\n$/);
  });

  test("in bulk: by ids, and by filter, with the skipped ones and their reasons", async () => {
    const gate = join(dir, "bulk-gate");
    const ids: string[] = [];
    // Retried, they run at once and wait on the gate: not finished when retried again.
    for (let i = 0; i < 3; i++) {
      const command = `while [ ! -e '${gate}' ]; do sleep 0.02; done; echo ${i}`;
      ids.push((await api(["submit", "--at", "+1h", "--queue", "cli-bulk", command])).stdout.trim());
    }
    const byFilter = await api(["cancel", "--queue", "cli-bulk"]);
    expect(byFilter).toMatchObject({ code: 0, stdout: "cancelled 3 of 3\n" });
    const byIds = await api(["retry", "--json", ids[0]!, ids[1]!]);
    expect(byIds.code).toBe(0);
    expect(JSON.parse(byIds.stdout)).toEqual({ matched: 2, changed: 2, skipped: [] });
    // Retrying all three again: two are queued now, so only the third changes.
    const partly = await api(["retry", ...ids]);
    expect(partly.code).toBe(0);
    expect(partly.stdout).toBe("retried 1 of 3\n");
    expect(partly.stderr).toContain(`skipped ${ids[0]}: not_final`);
    // None changed: exit 4.
    const none = await api(["retry", ...ids]);
    expect(none.code).toBe(4);
    const both = await api(["cancel", ids[0]!, "--queue", "cli-bulk"]);
    expect(both.code).toBe(2);
    writeFileSync(gate, "");
  });
});

describe("tq workers, queues, schedules", () => {
  test("workers lists the live worker", async () => {
    const run = await api(["workers", "--json"]);
    expect(run.code).toBe(0);
    const { workers } = JSON.parse(run.stdout);
    expect(workers).toHaveLength(1);
    expect(workers[0]).toMatchObject({ state: "connected", slots: 4 });
    const human = await api(["workers"]);
    expect(human.stdout).toContain(workers[0].id);
  });

  test("queues pause and resume need admin; a read token is refused with 5, naming the scope", async () => {
    await api(["submit", "--at", "+1h", "--queue", "cli-q", "true"]);
    const refused = await api(["queues", "pause", "cli-q"], tokens.reader);
    expect(refused.code).toBe(5);
    expect(refused.stderr).toContain("admin");
    const paused = await api(["queues", "pause", "cli-q"], tokens.root);
    expect(paused).toMatchObject({ code: 0, stdout: "cli-q paused\n" });
    const listed = await api(["queues", "--json"], tokens.reader);
    expect(JSON.parse(listed.stdout).queues.find((q: { name: string }) => q.name === "cli-q")).toMatchObject({ paused: true });
    expect((await api(["queues", "resume", "cli-q"], tokens.root)).stdout).toBe("cli-q resumed\n");
    expect((await api(["queues", "frob", "cli-q"], tokens.root)).code).toBe(2);
  });

  test("schedules create, list, pause, resume and trigger, by name", async () => {
    const created = await api([
      "schedules",
      "create",
      "--name",
      "cli-hourly",
      "--every",
      "1h",
      "--queue",
      "cli-s",
      "--",
      "echo",
      "tick",
    ]);
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout).toMatch(/^\S{36} cli-hourly next \S+/);
    const taken = await api(["schedules", "create", "--name", "cli-hourly", "--every", "1h", "echo"]);
    expect(taken.code).toBe(4);
    const badCron = await api(["schedules", "create", "--name", "cli-bad", "--cron", "not a cron", "echo"]);
    expect(badCron.code).toBe(6);
    expect(badCron.stderr).toContain("cron");

    const listed = await api(["schedules", "list"]);
    expect(listed.stdout).toMatch(/cli-hourly +every 1h +no /);
    expect((await api(["schedules", "pause", "cli-hourly"])).stdout).toBe("cli-hourly paused\n");
    expect((await api(["schedules", "resume", "cli-hourly"])).stdout).toMatch(/^cli-hourly resumed, next /);
    const fired = await api(["schedules", "trigger", "cli-hourly", "--json"]);
    expect(fired.code).toBe(0);
    const firing = JSON.parse(fired.stdout);
    expect(firing.outcome).toBe("created");
    const task = await api(["watch", firing.task_id]);
    expect(task.code).toBe(0);
  });
});

describe("errors name the problem, with the documented exit codes", () => {
  test("usage, not found, auth, unreachable", async () => {
    const unknownVerb = await api(["frobnicate"]);
    expect(unknownVerb.code).toBe(2);
    expect(unknownVerb.stderr).toContain('unknown verb "frobnicate"');
    const badFlag = await api(["list", "--colour", "red"]);
    expect(badFlag.code).toBe(2);
    expect(badFlag.stderr).toContain("--colour");
    const badInt = await api(["submit", "--priority", "high", "true"]);
    expect(badInt.code).toBe(2);
    expect(badInt.stderr).toContain("--priority must be an integer");
    const missing = await api(["status"]);
    expect(missing.code).toBe(2);

    const notFound = await api(["status", "0190a0a0-0000-7000-8000-000000000000"]);
    expect(notFound.code).toBe(3);
    expect(notFound.stderr).toContain("not found");
    const badId = await api(["status", "nope"]);
    expect(badId.code).toBe(6);
    expect(badId.stderr).toContain("field id");

    const noToken = await api(["list"], null);
    expect(noToken.code).toBe(5);
    expect(noToken.stderr).toContain("TQ_TOKEN");
    const noScope = await api(["submit", "true"], tokens.reader);
    expect(noScope.code).toBe(5);
    expect(noScope.stderr).toContain("submit scope");

    const unreachable = await tq(["list"], { TQ_URL: "http://127.0.0.1:1", TQ_TOKEN: tokens.ops! });
    expect(unreachable.code).toBe(7);
    expect(unreachable.stderr).toContain("cannot reach the API at http://127.0.0.1:1");
    const badUrl = await tq(["list", "--url", "ftp://x"]);
    expect(badUrl.code).toBe(2);
    // --url beats TQ_URL.
    const flagWins = await tq(["list", "--json", "--url", cluster.coordinatorUrl], {
      TQ_URL: "http://127.0.0.1:1",
      TQ_TOKEN: tokens.ops!,
    });
    expect(flagWins.code).toBe(0);
  });

  test("--help for tq and for every verb, on stdout with exit 0", async () => {
    const overall = await tq(["--help"]);
    expect(overall.code).toBe(0);
    for (const verb of [
      "submit",
      "status",
      "list",
      "watch",
      "logs",
      "cancel",
      "retry",
      "workers",
      "queues",
      "schedules",
      "token",
    ]) {
      expect(overall.stdout).toMatch(new RegExp(`^  ${verb} `, "m"));
      const help = await tq([verb, "--help"]);
      expect(help.code, verb).toBe(0);
      expect(help.stdout, verb).toStartWith(`usage: tq ${verb}`);
    }
    const bare = await tq([]);
    expect(bare.code).toBe(2);
    expect(bare.stderr).toContain("usage: tq <verb>");
  });
});

describe("in a terminal", () => {
  test("watch shows each change as it happens and exits with the task's code", async () => {
    const gate = join(dir, "watch-gate");
    const id = (
      await api(["submit", `while [ ! -e '${gate}' ]; do sleep 0.02; done; exit 3`, "--max-attempts", "1"])
    ).stdout.trim();
    const terminal = inTerminal(["watch", id], { TQ_URL: cluster.coordinatorUrl, TQ_TOKEN: tokens.reader! });
    // Running, and still running: the line is on the screen before the task ends.
    await terminal.shows(/(started|now) +running +attempt 1/);
    expect(terminal.screen).not.toContain("failed");
    writeFileSync(gate, "");
    expect(await terminal.exited()).toBe(3);
    expect(terminal.screen).toMatch(/failed +failed +attempt 1 .*exit_code=3/);
  });

  // GET /tasks/:id/logs is the live-logs part of issue 15 (branch logs): skipped, and reported
  // as skipped, in a build whose API document (src/client/openapi.json) does not have it yet.
  test.skipIf(!("/tasks/{id}/logs" in openapi.paths))(
    "logs -f shows output as the task writes it, then ends with the attempt",
    async () => {
      const gate = join(dir, "logs-gate");
      const id = (
        await api(["submit", `echo one; while [ ! -e '${gate}' ]; do sleep 0.02; done; echo two >&2; echo three`])
      ).stdout.trim();
      const terminal = inTerminal(["logs", "-f", id], { TQ_URL: cluster.coordinatorUrl, TQ_TOKEN: tokens.reader! });
      await terminal.shows(/one/);
      expect(terminal.screen).not.toContain("three");
      writeFileSync(gate, "");
      expect(await terminal.exited()).toBe(0);
      expect(terminal.screen).toMatch(/one\r?\n(.|\n)*two\r?\n(.|\n)*three/);
      // Afterwards, without -f: one stream, exactly.
      const stdout = await api(["logs", "--stream", "stdout", id]);
      expect(stdout).toMatchObject({ code: 0, stdout: "one\nthree\n" });
    },
  );

  // Last: it restarts the coordinator.
  test("watch resumes after its coordinator restarts, showing each event once", async () => {
    const gate = join(dir, "restart-gate");
    const id = (await api(["submit", `while [ ! -e '${gate}' ]; do sleep 0.02; done`])).stdout.trim();
    const terminal = inTerminal(["watch", id], { TQ_URL: cluster.coordinatorUrl, TQ_TOKEN: tokens.reader! });
    await terminal.shows(/(started|now) +running +attempt 1/);
    cluster.coordinator.kill("SIGKILL");
    await cluster.coordinator.exited;
    await cluster.restartCoordinator();
    writeFileSync(gate, "");
    expect(await terminal.exited()).toBe(0);
    expect(terminal.screen.match(/succeeded +succeeded +attempt 1/g)).toHaveLength(1);
    expect(terminal.screen.match(/started +running +attempt 1/g)?.length ?? 0).toBeLessThanOrEqual(1);
  });
});

// The worker's limits policy (src/worker/limits.ts) and the cgroup plumbing it stands on
// (src/worker/cgroup.ts): clamping to the worker's maxima, the rlimit fallback through real
// shells, and, as root with cgroups, that an attempt's cgroup limits it, is reused by the next
// attempt only empty (its usage then the new attempt's own), and is discarded otherwise.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { detectCgroups, parseMembership, parseMounts, type TaskCgroup } from "../../src/worker/cgroup";
import { execute } from "../../src/worker/executor";
import { type Confinement, Limiter } from "../../src/worker/limits";
import { eventually } from "../support/eventually";
import { isRunning } from "../support/is-running";

const baseEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin" };
const NO_MAXIMA = { memoryMb: 0, pids: 0, nofile: 0, cpu: 0 };

function run(command: string, limiter: Limiter, limits: Parameters<Limiter["confine"]>[0]) {
  const confinement = limiter.confine(limits);
  return execute({ command, env: {}, timeoutMs: 0, killGraceMs: 500, maxOutputBytes: 4096, baseEnv, confinement }).result;
}

test("a request is capped by the worker's maxima; one left out is the maximum; 0 is no maximum", () => {
  const limiter = new Limiter({ memoryMb: 512, pids: 64, nofile: 0, cpu: 2 }, null, "rlimit");
  expect(limiter.effective({ memory_mb: 4096, pids: 8, cpu: 0.5 })).toEqual({ memory_mb: 512, pids: 8, cpu: 0.5 });
  expect(limiter.effective(null)).toEqual({ memory_mb: 512, pids: 64, cpu: 2 });
  expect(new Limiter(NO_MAXIMA, null, "rlimit").effective({ nofile: 10 })).toEqual({ nofile: 10 });
  // Open files never above the worker's own hard limit, which a task could not raise to.
  const huge = new Limiter(NO_MAXIMA, null, "rlimit").effective({ nofile: 1_048_576 });
  expect(huge.nofile).toBeLessThanOrEqual(1_048_576);
});

test("without cgroups, memory and open files are rlimits in the spawned shell; pids and cpu are not enforced", async () => {
  const limiter = new Limiter(NO_MAXIMA, null, "rlimit");
  const r = await run("ulimit -n; ulimit -v", limiter, { memory_mb: 100, nofile: 64, pids: 5, cpu: 1 });
  expect(r.stdout).toBe("64\n102400\n");
  expect(r.usage).toMatchObject({ limitsApplied: "rlimit", limits: { memory_mb: 100, nofile: 64, pids: null, cpu: null } });
  expect(r.usage!.peakMemoryBytes).toBeGreaterThan(0);
  expect(r.usage!.cpuUserUs).not.toBeNull();
});

test("an address-space limit stops a memory hog without cgroups (not an OOM kill)", async () => {
  const r = await run("head -c 200M /dev/zero | tail", new Limiter(NO_MAXIMA, null, "rlimit"), { memory_mb: 32 });
  expect(r.exitCode).not.toBe(0);
  expect(r.usage!.oomKilled).toBe(false);
});

test("the command reaches the shell as an argument, unchanged, with $0 as before", async () => {
  const command = `printf '%s|%s|%s\\n' "$0" '$cmd "quoted"' "$#"`;
  const r = await run(command, new Limiter(NO_MAXIMA, null, "rlimit"), { nofile: 100 });
  expect(r.stdout).toBe(`sh|$cmd "quoted"|0\n`);
});

test("with nothing to limit, or limits off, the task runs as plain sh -c and says none", async () => {
  const plain = new Limiter(NO_MAXIMA, null, "rlimit").confine(null);
  expect(plain.applied).toBe("none");
  expect(plain.argv("echo hi")).toEqual(["sh", "-c", "echo hi"]);
  const off = new Limiter({ memoryMb: 64, pids: 0, nofile: 0, cpu: 0 }, null, "none").confine({ nofile: 3 });
  expect(off.applied).toBe("none");
  expect(off.limits).toEqual({ memory_mb: null, pids: null, nofile: null, cpu: null });
  expect(off.argv("echo hi")).toEqual(["sh", "-c", "echo hi"]);
});

test("cgroup membership and mounts are read from /proc/self (v1 hybrid host and a v2-only host)", () => {
  const v1 = parseMembership("8:pids:/\n4:memory:/process_api/abc\n6:freezer:/\n2:cpu,cpuacct:/x\n0::/\n");
  expect(v1.v1.get("memory")).toBe("/process_api/abc");
  expect(v1.v1.get("cpuacct")).toBe("/x");
  const mounts = parseMounts(
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n" +
      "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n" +
      "50 31 0:40 /nested /mnt/other rw - cgroup cgroup rw,pids\n",
  );
  expect(mounts.v1.get("memory")).toBe("/sys/fs/cgroup/memory");
  // A mount of a sub-tree cannot take /proc/self/cgroup's paths.
  expect(mounts.v1.has("pids")).toBe(false);
  expect(mounts.v2).toBe("/sys/fs/cgroup/unified");
  expect(parseMembership("0::/user.slice/app.service\n")).toEqual({ v1: new Map(), v2: "/user.slice/app.service" });
});

const isRoot = process.getuid?.() === 0;
const detected = isRoot ? detectCgroups({ dirName: `taskqueue-${process.pid}-unit` }) : null;
const cgroups = detected?.ok ? detected.cgroups : null;
if (!cgroups) {
  console.warn(`test/unit/limits.test.ts: skipping the cgroup cases: ${isRoot ? (detected as { why: string }).why : "not root"}`);
}

afterAll(() => cgroups?.close());

describe.skipIf(cgroups === null)("with cgroups", () => {
  const dirOf = (file: string) => file.slice(0, file.lastIndexOf("/"));
  const members = (cgroup: TaskCgroup) =>
    readFileSync(cgroup.procsFiles[0]!, "utf8").trim().split("\n").filter(Boolean).map(Number);
  const runIn = (confinement: Confinement, command: string) =>
    execute({ command, env: {}, timeoutMs: 0, killGraceMs: 500, maxOutputBytes: 1 << 16, baseEnv, confinement }).result;

  test("an attempt runs in a cgroup limited as asked; the next attempt gets it back, empty, with its own limits", async () => {
    const limiter = new Limiter(NO_MAXIMA, cgroups, "auto");
    const first = limiter.confine({ memory_mb: 48, pids: 20, nofile: 77 });
    const files = [...first.cgroup!.procsFiles];
    const dirs = files.map(dirOf);
    expect(dirs.every((d) => existsSync(d))).toBe(true);
    const memoryDir = dirs.find((d) => d.includes("/memory/"));
    const pidsDir = dirs.find((d) => d.includes("/pids/"));
    const limitsShown = `${memoryDir ? `; cat '${memoryDir}/memory.limit_in_bytes'` : ""}${pidsDir ? `; cat '${pidsDir}/pids.max'` : ""}`;
    const r = await runIn(first, `cat /proc/self/cgroup; ulimit -n${limitsShown}`);
    expect(r.exitCode).toBe(0);
    const name = dirs[0]!.slice(dirs[0]!.lastIndexOf("/") + 1);
    expect(r.stdout).toContain(`/${name}\n`);
    expect(r.stdout).toContain("\n77\n");
    if (memoryDir) expect(r.stdout).toContain(`${48 * 1024 * 1024}`);
    if (pidsDir) expect(r.stdout).toContain("\n20\n");
    expect(r.usage).toMatchObject({ limits: { memory_mb: 48, pids: 20, nofile: 77 }, oomKilled: false });
    // Released empty: kept, and the next attempt (same owner) gets it, with its own limits.
    expect(members(first.cgroup!)).toEqual([]);
    const second = limiter.confine({ memory_mb: 96 });
    expect(second.cgroup!.procsFiles).toEqual(files);
    const again = await runIn(second, `cat /proc/self/cgroup${limitsShown}`);
    expect(again.stdout).toContain(`/${name}\n`);
    if (memoryDir) expect(again.stdout).toContain(`${96 * 1024 * 1024}`);
    if (pidsDir) expect(again.stdout).toContain("\nmax\n");
    expect(again.usage).toMatchObject({ limits: { memory_mb: 96, pids: null, nofile: null } });
    // A lower limit after a higher one (memsw, where there is swap accounting, follows it).
    const third = limiter.confine({ memory_mb: 40 });
    expect(third.cgroup!.procsFiles).toEqual(files);
    if (memoryDir) expect(readFileSync(`${memoryDir}/memory.limit_in_bytes`, "utf8").trim()).toBe(`${40 * 1024 * 1024}`);
    third.release();
  });

  test("in a reused cgroup, an attempt's usage is its own: CPU, peak memory, OOM kill", async () => {
    const limiter = new Limiter(NO_MAXIMA, cgroups, "auto");
    // A busy shell (a count, not a time) that also holds ~24 MB, then killed by the OOM killer.
    const busy = limiter.confine({ memory_mb: 32 });
    const files = busy.cgroup!.procsFiles;
    const hog = await runIn(busy, "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; head -c 200M /dev/zero | tail");
    expect(hog.usage!.oomKilled).toBe(true);
    expect(hog.usage!.peakMemoryBytes).toBeGreaterThan(16 * 1024 * 1024);
    const busyCpu = hog.usage!.cpuUserUs! + hog.usage!.cpuSystemUs!;
    const quiet = limiter.confine({ memory_mb: 32 });
    expect(quiet.cgroup!.procsFiles).toEqual(files);
    const r = await runIn(quiet, "true");
    expect(r.exitCode).toBe(0);
    expect(r.error).toBeNull();
    expect(r.usage!.oomKilled).toBe(false);
    expect(r.usage!.peakMemoryBytes).toBeLessThan(8 * 1024 * 1024);
    expect(r.usage!.cpuUserUs! + r.usage!.cpuSystemUs!).toBeLessThan(busyCpu / 4);
  });

  test("a pooled cgroup goes back only to attempts of the owner it was given to", () => {
    const a = cgroups!.acquire({ memoryMb: null, pids: null, cpu: null }, { uid: 20_900, gid: 20_900 });
    const own = a.procsFiles;
    expect(statSync(own[0]!).uid).toBe(20_900);
    a.release();
    const b = cgroups!.acquire({ memoryMb: null, pids: null, cpu: null }, { uid: 20_901, gid: 20_901 });
    expect(b.procsFiles).not.toEqual(own);
    expect(statSync(b.procsFiles[0]!).uid).toBe(20_901);
    const c = cgroups!.acquire({ memoryMb: null, pids: null, cpu: null }, { uid: 20_900, gid: 20_900 });
    expect(c.procsFiles).toEqual(own);
    b.release();
    c.release();
  });

  test("a cgroup released with a process still in it is discarded, never handed out again", async () => {
    const cgroup = cgroups!.acquire({ memoryMb: null, pids: null, cpu: null });
    const files = cgroup.procsFiles;
    const sleeper = Bun.spawn(["sh", "-c", 'for f do echo $$ > "$f"; done; exec sleep 300', "sh", ...files]);
    try {
      await eventually(() => members(cgroup).includes(sleeper.pid), { what: "the sleeper in the cgroup" });
      cgroup.release();
      const next = cgroups!.acquire({ memoryMb: null, pids: null, cpu: null });
      expect(next.procsFiles).not.toEqual(files);
      next.release();
    } finally {
      sleeper.kill("SIGKILL");
      await sleeper.exited;
    }
  });

  test("a kill-all still running for one attempt never reaches the next attempt given the same cgroup", async () => {
    const none = { memoryMb: null, pids: null, cpu: null };
    const first = cgroups!.acquire(none);
    const files = first.procsFiles;
    const join = (pid: number) => {
      for (const file of files) writeFileSync(file, String(pid));
    };
    const doomed = Bun.spawn(["sleep", "300"]);
    join(doomed.pid);
    const killing = first.killAll();
    // Synchronously from here to the await, so the kill-all's polls cannot see the cgroup
    // empty in between: the first attempt's process ends, the cgroup goes back to the pool
    // and to the next attempt, whose process joins it.
    while (members(first).length > 0) {
      // spin: the SIGKILL is being delivered
    }
    first.release();
    const second = cgroups!.acquire(none);
    expect(second.procsFiles).toEqual(files);
    const survivor = Bun.spawn(["sleep", "300"]);
    try {
      join(survivor.pid);
      await killing;
      expect(isRunning(survivor.pid)).toBe(true);
      expect(members(second)).toEqual([survivor.pid]);
    } finally {
      survivor.kill("SIGKILL");
      await survivor.exited;
      await doomed.exited;
    }
    await eventually(() => members(second).length === 0 || null, { what: "the survivor gone" });
    second.release();
  });

  test("page cache an attempt left is reclaimed and its cgroup reused; memory that cannot be (tmpfs) discards it", async () => {
    const limiter = new Limiter(NO_MAXIMA, cgroups, "auto");
    const confinement = limiter.confine(null);
    const files = confinement.cgroup!.procsFiles;
    const onDisk = `/tmp/tq-limits-${Bun.randomUUIDv7()}`;
    const inMemory = `/dev/shm/tq-limits-${Bun.randomUUIDv7()}`;
    try {
      const r = await runIn(confinement, `head -c 8M /dev/urandom > '${onDisk}'`);
      expect(r.exitCode).toBe(0);
      const next = limiter.confine(null);
      expect(next.cgroup!.procsFiles).toEqual(files);
      // A file on tmpfs stays charged to the cgroup whatever is reclaimed.
      const held = await runIn(next, `head -c 8M /dev/urandom > '${inMemory}'`);
      expect(held.exitCode).toBe(0);
      const after = limiter.confine(null);
      expect(after.cgroup!.procsFiles).not.toEqual(files);
      after.release();
    } finally {
      rmSync(onDisk, { force: true });
      rmSync(inMemory, { force: true });
    }
  });

  test("killAll empties the cgroup of processes that left the process group and session", async () => {
    const limiter = new Limiter(NO_MAXIMA, cgroups, "auto");
    const confinement = limiter.confine(null);
    const execution = execute({
      command: "for i in 1 2 3; do setsid sleep 300 & done; wait",
      env: {},
      timeoutMs: 0,
      killGraceMs: 200,
      maxOutputBytes: 4096,
      baseEnv,
      confinement,
    });
    // Four processes in the cgroup: the shell and three escapees.
    const cgroup = confinement.cgroup!;
    const pids = await eventually(() => (members(cgroup).length === 4 ? members(cgroup) : null), {
      what: "the escapees in the cgroup",
    });
    const escapees = pids.filter((pid) => pid !== execution.pid);
    expect(escapees).toHaveLength(3);
    execution.stop("cancelled");
    const r = await execution.result;
    expect(r.outcome).toBe("cancelled");
    expect(escapees.filter(isRunning)).toEqual([]);
    expect(members(cgroup)).toEqual([]);
  });

  test("controllers mounted together (cpu,cpuacct) share one directory, joined once", () => {
    // This host's own mounts, but with cpu and cpuacct said to be one hierarchy at cpu's mount.
    const real = readFileSync("/proc/self/mountinfo", "utf8").split("\n");
    const cpuMount = real.find((line) => / - cgroup cgroup [^ ]*\bcpu\b/.test(line));
    if (!cpuMount) return; // no cpu controller here: nothing mounted together to try
    const fake = mkdtempSync(join(tmpdir(), "tq-comount-"));
    try {
      const mountinfo = real
        .filter((line) => !/ - cgroup cgroup [^ ]*\bcpu(acct)?\b/.test(line))
        .concat(cpuMount.replace(/ - cgroup cgroup (\S+)$/, " - cgroup cgroup rw,cpu,cpuacct"));
      const cpuPath = readFileSync("/proc/self/cgroup", "utf8").match(/^\d+:cpu(?:,cpuacct)?:(.*)$/m)?.[1] ?? "/";
      const membership = readFileSync("/proc/self/cgroup", "utf8")
        .split("\n")
        .filter((line) => !/^\d+:cpu(acct)?(,cpuacct)?:/.test(line))
        .concat(`99:cpu,cpuacct:${cpuPath}`);
      writeFileSync(join(fake, "mountinfo"), mountinfo.join("\n"));
      writeFileSync(join(fake, "cgroup"), membership.join("\n"));
      const detected = detectCgroups({ dirName: `taskqueue-${process.pid}-comount`, procSelf: fake });
      if (!detected.ok) throw new Error(detected.why);
      try {
        const cgroup = detected.cgroups.acquire({ memoryMb: null, pids: null, cpu: 0.5 });
        expect(new Set(cgroup.procsFiles).size).toBe(cgroup.procsFiles.length);
        expect(cgroup.procsFiles.filter((f) => f.startsWith(cpuMount.split(" ")[4]!))).toHaveLength(1);
        expect(cgroup.limits.cpu).toBe(0.5);
        cgroup.release();
      } finally {
        detected.cgroups.close();
      }
    } finally {
      rmSync(fake, { recursive: true, force: true });
    }
  });

  test("closing removes the worker's directory with every cgroup in it", () => {
    const detected = detectCgroups({ dirName: `taskqueue-${process.pid}-close` });
    if (!detected.ok) throw new Error(detected.why);
    const kept = detected.cgroups.acquire({ memoryMb: 16, pids: null, cpu: null });
    const dirs = kept.procsFiles.map(dirOf);
    kept.release();
    expect(dirs.every((d) => existsSync(d))).toBe(true);
    detected.cgroups.close();
    expect(dirs.some((d) => existsSync(d))).toBe(false);
    expect(dirs.some((d) => existsSync(dirOf(d)))).toBe(false);
  });
});

// How far one PostgreSQL primary carries task-queue (issue 17, "how it scales"): 1, 2 and 3
// coordinators, each on a host of its own (network namespaces, test/support/netns.ts), against
// one PostgreSQL on another host, with no-op workers (bench/support/noop-fleet.ts: the real
// worker protocol, commands reported done at once) spread over three more hosts. For each
// count: K tasks submitted in batches of 500 across the coordinators, from the first submit
// until all K succeeded: completed tasks/s; and the database's CPU meanwhile (utime + stime of
// the postmaster and its backends, from /proc), in cores. Root only (namespaces); skipped with
// the reason elsewhere. On a shared 2-core machine every process competes for the same two
// cores, so the figures say where this machine tops out, not a server's.
import { chownSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { createNetwork, type NetHost, netnsUnavailable, spawnRoleOn } from "../test/support/netns";
import type { RoleProcess } from "../test/support/processes";
import { type Bench, type BenchOptions, type BenchResult, Scope } from "./support";

const PG_BIN = "/usr/lib/postgresql/15/bin";
const FULL = { tasks: 10_000, counts: [1, 2, 3], workersPerFleet: 20, slots: 4 };
const QUICK = { tasks: 2_000, counts: [1, 2, 3], workersPerFleet: 10, slots: 4 };
const BATCH = 500;
const TICKS = 100;

function cpuTicks(pid: number): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, "utf8")
      .replace(/^.*\) /, "")
      .split(" ");
    return Number(fields[11]) + Number(fields[12]);
  } catch {
    return 0;
  }
}

/** utime + stime (ticks) of the postmaster and every live child of it. */
function postgresTicks(postmaster: number): number {
  let total = cpuTicks(postmaster);
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const fields = readFileSync(`/proc/${entry}/stat`, "utf8")
        .replace(/^.*\) /, "")
        .split(" ");
      if (Number(fields[1]) === postmaster) total += Number(fields[11]) + Number(fields[12]);
    } catch {
      // gone meanwhile
    }
  }
  return total;
}

function spawnFleet(host: NetHost, addresses: string[], workers: number, slots: number) {
  const proc = Bun.spawn(
    host.exec([
      "bun",
      join(import.meta.dir, "support/noop-fleet.ts"),
      "--address",
      addresses.join(","),
      "--workers",
      String(workers),
      "--slots",
      String(slots),
    ]),
    { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
  );
  // Its stdout is read to the end (a stats line a second): closing the pipe would kill it.
  let resolveReady: () => void = () => {};
  let rejectReady: (error: Error) => void = () => {};
  const ready = new Promise<void>((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  void (async () => {
    let text = "";
    for await (const chunk of proc.stdout) {
      if (text !== "done") {
        text += new TextDecoder().decode(chunk);
        if (text.includes('"fleet.ready"')) {
          text = "done";
          resolveReady();
        }
      }
    }
    rejectReady(new Error("the no-op fleet ended before it was ready"));
  })();
  return { proc, ready };
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const unavailable = netnsUnavailable();
  const base = {
    name: "pg-scale",
    description:
      "Completed tasks/s and PostgreSQL CPU with 1, 2 and 3 coordinators on hosts of their own against one PostgreSQL, no-op workers on three more hosts.",
    settings: { ...plan, batch: BATCH },
  };
  if (unavailable) {
    console.log(`pg-scale: skipped: ${unavailable}`);
    const none = { version: "-", source: "none", fsync: "-", synchronous_commit: "-" };
    return {
      ...base,
      figures: { skipped: unavailable },
      summary: [{ metric: "pg-scale", value: `skipped: ${unavailable}` }],
      postgres: none,
    };
  }
  const scope = new Scope();
  try {
    const network = createNetwork(7);
    scope.defer("remove the network", () => network.remove());
    const [pgHost, c1, c2, c3, f1, f2, f3] = network.hosts as [NetHost, NetHost, NetHost, NetHost, NetHost, NetHost, NetHost];
    const dir = mkdtempSync(join(tmpdir(), "tq-pg-scale-"));
    Bun.spawnSync(["chmod", "755", dir]);
    scope.defer("remove the data folder", () => rmSync(dir, { recursive: true, force: true }));
    const uid = Number(Bun.spawnSync(["id", "-u", "postgres"]).stdout.toString().trim());
    const gid = Number(Bun.spawnSync(["id", "-g", "postgres"]).stdout.toString().trim());
    const data = join(dir, "data");
    mkdirSync(data, { mode: 0o700 });
    chownSync(data, uid, gid);
    const as = ["setpriv", `--reuid=${uid}`, `--regid=${gid}`, "--init-groups"];
    const init = Bun.spawnSync([...as, `${PG_BIN}/initdb`, "-D", data, "-A", "trust", "-U", "postgres"], { env: { HOME: dir } });
    if (init.exitCode !== 0) throw new Error(`initdb failed: ${init.stderr.toString()}`);
    const subnet = network.serverIp.replace(/\.1$/, ".0/24");
    await Bun.write(join(data, "pg_hba.conf"), `local all all trust\nhost all all ${subnet} trust\n`);
    const server = Bun.spawn(
      pgHost.exec([
        ...as,
        `${PG_BIN}/postgres`,
        "-D",
        data,
        "-c",
        `listen_addresses=${pgHost.ip}`,
        "-c",
        `unix_socket_directories=${data}`,
        "-c",
        "max_connections=200",
        "-c",
        "shared_buffers=128MB",
      ]),
      { stdin: "ignore", stdout: "ignore", stderr: "pipe", env: { HOME: dir } },
    );
    scope.defer("stop PostgreSQL", async () => {
      server.kill("SIGINT");
      await server.exited;
    });
    const admin = postgres(`postgres://postgres@${pgHost.ip}:5432/postgres`, { max: 1, connect_timeout: 2, onnotice: () => {} });
    scope.defer("close the admin connection", () => admin.end({ timeout: 1 }));
    for (let i = 0; ; i++) {
      try {
        await admin`SELECT 1`;
        break;
      } catch (error) {
        if (i > 100 || server.exitCode !== null)
          throw new Error(`PostgreSQL did not start: ${error}; ${await new Response(server.stderr).text()}`);
        await Bun.sleep(100);
      }
    }
    const [info] =
      (await admin`SELECT version(), current_setting('fsync') AS fsync, current_setting('synchronous_commit') AS synchronous_commit`) as unknown as [
        { version: string; fsync: string; synchronous_commit: string },
      ];
    const rows: { coordinators: number; tasks: number; seconds: number; tasks_per_s: number; db_cpu_cores: number }[] = [];
    for (const count of plan.counts) {
      const database = `tq_scale_${count}`;
      await admin`DROP DATABASE IF EXISTS ${admin(database)} WITH (FORCE)`;
      await admin`CREATE DATABASE ${admin(database)}`;
      const url = `postgres://postgres@${pgHost.ip}:5432/${database}`;
      const roles: RoleProcess[] = [];
      const hosts = [c1, c2, c3].slice(0, count);
      const fleets: ReturnType<typeof spawnFleet>[] = [];
      try {
        for (const host of hosts) {
          const proc = spawnRoleOn(host, "coordinator", {
            DATABASE_URL: url,
            TQ_HOST: host.ip,
            TQ_INSECURE: "true",
            TQ_COORDINATOR_ID: `scale@${host.ip}`,
            TQ_COORDINATOR_PORT: "8080",
            TQ_GRPC_PORT: "50051",
            TQ_LOG_LEVEL: "info",
          });
          roles.push(proc);
          await proc.waitForEvent("coordinator.started", { timeoutMs: 60_000 });
        }
        if (process.env.TQ_BENCH_DEBUG) console.log("pg-scale: coordinators up");
        [f1, f2, f3].forEach((host, i) => {
          fleets.push(spawnFleet(host, [`${hosts[i % count]!.ip}:50051`], plan.workersPerFleet, plan.slots));
        });
        await Promise.all(fleets.map((f) => f.ready));
        if (process.env.TQ_BENCH_DEBUG) console.log("pg-scale: fleets ready");
        const [{ pid: postmaster }] = (await admin`SELECT pg_backend_pid() AS pid`) as unknown as [{ pid: number }];
        const master = Number(
          readFileSync(`/proc/${postmaster}/stat`, "utf8")
            .replace(/^.*\) /, "")
            .split(" ")[1],
        );
        const ticks0 = postgresTicks(master);
        const t0 = performance.now();
        const batches = Math.ceil(plan.tasks / BATCH);
        let next = 0;
        await Promise.all(
          hosts.map(async (host) => {
            for (;;) {
              const b = next++;
              if (b >= batches) return;
              const body = JSON.stringify({
                tasks: Array.from({ length: Math.min(BATCH, plan.tasks - b * BATCH) }, () => ({ command: "true" })),
              });
              const r = await fetch(`http://${host.ip}:8080/tasks/batch`, {
                method: "POST",
                headers: { "content-type": "application/json" },
                body,
              });
              if (r.status !== 201 && r.status !== 200)
                throw new Error(`POST /tasks/batch answered ${r.status}: ${await r.text()}`);
            }
          }),
        );
        const db = postgres(url, { max: 1, onnotice: () => {} });
        try {
          for (;;) {
            const [{ n }] = (await db`SELECT count(*)::int AS n FROM tasks WHERE state = 'succeeded'`) as unknown as [
              { n: number },
            ];
            if (n >= plan.tasks) break;
            if (performance.now() - t0 > 600_000) throw new Error(`only ${n} of ${plan.tasks} tasks succeeded in 600 s`);
            await Bun.sleep(100);
          }
        } finally {
          await db.end({ timeout: 1 });
        }
        const seconds = (performance.now() - t0) / 1000;
        const cores = (postgresTicks(master) - ticks0) / TICKS / seconds;
        const row = {
          coordinators: count,
          tasks: plan.tasks,
          seconds: Math.round(seconds * 100) / 100,
          tasks_per_s: Math.round(plan.tasks / seconds),
          db_cpu_cores: Math.round(cores * 100) / 100,
        };
        rows.push(row);
        console.log(
          `pg-scale: ${count} coordinator(s): ${row.tasks_per_s} tasks/s, PostgreSQL CPU ${row.db_cpu_cores} cores (${row.seconds} s for ${plan.tasks})`,
        );
      } finally {
        for (const f of fleets) f.proc.kill("SIGTERM");
        await Promise.all(fleets.map((f) => Promise.race([f.proc.exited, Bun.sleep(15_000).then(() => f.proc.kill("SIGKILL"))])));
        await Promise.all(roles.map((r) => r.stop(10_000)));
      }
    }
    return {
      ...base,
      figures: { rows, machine_cores: navigator.hardwareConcurrency },
      summary: rows.map((r) => ({
        metric: `${r.coordinators} coordinator(s), one PostgreSQL: completed tasks/s; PostgreSQL CPU`,
        value: `${r.tasks_per_s}/s; ${r.db_cpu_cores} cores`,
      })),
      postgres: { ...info, source: "a PostgreSQL 15 of its own, in a namespace" },
    };
  } finally {
    await scope.close();
  }
}

export const pgScale: Bench = { name: "pg-scale", run };

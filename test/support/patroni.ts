// A highly available PostgreSQL as production runs it: three etcd members and two PostgreSQL
// nodes managed by Patroni (synchronous_mode: an acknowledged commit is on both), each on a
// host of its own (network namespaces, test/support/netns.ts), plus as many more hosts as the
// caller wants for task-queue's roles. Recipe and gotchas: the probe note
// ../shared/notes/patroni-on-these-machines.md (primary_start_timeout 0 so that a killed
// postmaster fails over; REST /primary and /sync as readiness; postmasters outlive a killed
// Patroni; setpriv so that pids are Patroni's own). Root only, with the Debian packages
// `patroni` and `etcd-server` (.ci/run installs them); `patroniUnavailable` says why not.
// Used by test/e2e/patroni-failover.test.ts and bench/failover.ts (postgres-failover).
import { chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { createNetwork, type NetHost, type Network, netnsUnavailable } from "./netns";

const PG_BIN = "/usr/lib/postgresql/15/bin";
const ETCD_CLIENT = 2379;
const ETCD_PEER = 2380;
const PG_PORT = 5432;
const REST_PORT = 8008;

function which(command: string): boolean {
  return Bun.spawnSync(["sh", "-c", `command -v ${command}`]).exitCode === 0;
}

/** Why this machine cannot run the Patroni cluster (null when it can). */
export function patroniUnavailable(): string | null {
  const netns = netnsUnavailable();
  if (netns) return netns;
  if (!which("patroni")) return "patroni is not installed (Debian package patroni; .ci/run installs it)";
  if (!which("etcd")) return "etcd is not installed (Debian package etcd-server; .ci/run installs it)";
  if (!existsSync(`${PG_BIN}/postgres`)) return `PostgreSQL 15 binaries are not in ${PG_BIN}`;
  if (Bun.spawnSync(["id", "-u", "postgres"]).exitCode !== 0) return "there is no postgres user to run PostgreSQL as";
  return null;
}

export interface PgNode {
  name: string;
  host: NetHost;
  dataDir: string;
  /** Patroni's process (killed with the host's postgres for a node loss). */
  patroni: Bun.Subprocess;
  rest: string;
}

export interface PatroniCluster {
  network: Network;
  etcd: Bun.Subprocess[];
  nodes: PgNode[];
  /** Hosts left for the caller's roles (the network's hosts after etcd and PostgreSQL). */
  roleHosts: NetHost[];
  /** The multi-host URL of `database` with target_session_attrs=primary. */
  url(database: string): string;
  /** The node whose Patroni REST answers 200 on /primary, or null. */
  primary(): Promise<PgNode | null>;
  /** Resolves once one node is primary and the other its streaming sync standby. */
  waitHealthy(timeoutMs?: number): Promise<PgNode>;
  /** SIGKILL of `node`'s postmaster (Patroni stays and fails over). */
  killPostmaster(node: PgNode): void;
  /** Patroni log lines of a node. */
  log(node: PgNode): string;
  stop(): Promise<void>;
}

/** GET on a Patroni REST URL: its status, or 0 when it did not answer within `timeoutMs`. */
export async function restStatus(url: string, timeoutMs = 500): Promise<number> {
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    await response.arrayBuffer();
    return response.status;
  } catch {
    return 0;
  }
}

function postmasterPid(dataDir: string): number | null {
  try {
    const pid = Number(readFileSync(join(dataDir, "postmaster.pid"), "utf8").split("\n")[0]);
    if (!Number.isInteger(pid) || pid <= 0) return null;
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return cmdline.includes(dataDir) ? pid : null;
  } catch {
    return null;
  }
}

export async function startPatroniCluster(options: { roleHosts: number; scope?: string }): Promise<PatroniCluster> {
  const network = createNetwork(5 + options.roleHosts);
  const base = mkdtempSync(join(tmpdir(), "tq-patroni-"));
  Bun.spawnSync(["chmod", "755", base]);
  const uid = Number(Bun.spawnSync(["id", "-u", "postgres"]).stdout.toString().trim());
  const gid = Number(Bun.spawnSync(["id", "-g", "postgres"]).stdout.toString().trim());
  const etcdHosts = network.hosts.slice(0, 3);
  const pgHosts = network.hosts.slice(3, 5);
  const etcd: Bun.Subprocess[] = [];
  const nodes: PgNode[] = [];
  const scope = options.scope ?? "tq";
  const subnet = network.serverIp.replace(/\.1$/, ".0/24");

  const stop = async () => {
    for (const host of network.hosts) host.heal();
    for (const node of nodes) node.patroni.kill("SIGKILL");
    await Promise.all(nodes.map((n) => n.patroni.exited));
    for (const node of nodes) {
      const pid = postmasterPid(node.dataDir);
      if (pid) process.kill(pid, "SIGQUIT");
    }
    for (const member of etcd) member.kill("SIGTERM");
    await Promise.all(etcd.map((m) => m.exited));
    for (let i = 0; i < 50 && nodes.some((n) => postmasterPid(n.dataDir) !== null); i++) await Bun.sleep(100);
    network.remove();
    rmSync(base, { recursive: true, force: true });
  };

  try {
    const initialCluster = etcdHosts.map((h, i) => `e${i}=http://${h.ip}:${ETCD_PEER}`).join(",");
    etcdHosts.forEach((host, i) => {
      const logFile = join(base, `etcd${i}.log`);
      etcd.push(
        Bun.spawn(
          host.exec([
            "etcd",
            `--name=e${i}`,
            `--data-dir=${join(base, `etcd${i}`)}`,
            `--listen-client-urls=http://${host.ip}:${ETCD_CLIENT}`,
            `--advertise-client-urls=http://${host.ip}:${ETCD_CLIENT}`,
            `--listen-peer-urls=http://${host.ip}:${ETCD_PEER}`,
            `--initial-advertise-peer-urls=http://${host.ip}:${ETCD_PEER}`,
            `--initial-cluster=${initialCluster}`,
            "--initial-cluster-state=new",
            `--initial-cluster-token=${scope}`,
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--pre-vote=true",
          ]),
          { stdin: "ignore", stdout: Bun.file(logFile), stderr: Bun.file(logFile) },
        ),
      );
    });
    const etcdList = etcdHosts.map((h) => `${h.ip}:${ETCD_CLIENT}`).join(",");
    pgHosts.forEach((host, i) => {
      const name = `node${i + 1}`;
      const dir = join(base, name);
      mkdirSync(dir, { mode: 0o700 });
      chownSync(dir, uid, gid);
      const config = `scope: ${scope}
name: ${name}
log:
  level: INFO
restapi:
  listen: ${host.ip}:${REST_PORT}
  connect_address: ${host.ip}:${REST_PORT}
etcd3:
  hosts: ${etcdList}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    primary_start_timeout: 0
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 5
        max_replication_slots: 5
        max_connections: 100
        wal_retrieve_retry_interval: 500ms
  initdb:
    - encoding: UTF8
    - auth: trust
postgresql:
  listen: ${host.ip}:${PG_PORT}
  connect_address: ${host.ip}:${PG_PORT}
  data_dir: ${dir}/data
  bin_dir: ${PG_BIN}
  pgpass: ${dir}/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
  parameters:
    unix_socket_directories: ${dir}
    shared_buffers: 32MB
    fsync: "off"
  pg_hba:
    - local all all trust
    - host all all ${subnet} trust
    - host replication all ${subnet} trust
`;
      const file = join(base, `${name}.yml`);
      writeFileSync(file, config);
      const logFile = join(base, `${name}.log`);
      const patroni = Bun.spawn(host.exec(["setpriv", `--reuid=${uid}`, `--regid=${gid}`, "--init-groups", "patroni", file]), {
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: dir },
        stdin: "ignore",
        stdout: Bun.file(logFile),
        stderr: Bun.file(logFile),
      });
      nodes.push({ name, host, dataDir: join(dir, "data"), patroni, rest: `http://${host.ip}:${REST_PORT}` });
    });
  } catch (error) {
    await stop();
    throw error;
  }

  const cluster: PatroniCluster = {
    network,
    etcd,
    nodes,
    roleHosts: network.hosts.slice(5),
    url: (database) =>
      `postgres://postgres@${pgHosts.map((h) => `${h.ip}:${PG_PORT}`).join(",")}/${database}?target_session_attrs=primary`,
    async primary() {
      for (const node of nodes) if ((await restStatus(`${node.rest}/primary`)) === 200) return node;
      return null;
    },
    async waitHealthy(timeoutMs = 60_000) {
      const deadline = Date.now() + timeoutMs;
      while (Date.now() < deadline) {
        const primary = await cluster.primary();
        const standby = nodes.find((n) => n !== primary);
        if (primary && standby && (await restStatus(`${standby.rest}/sync`)) === 200) {
          const sql = postgres(`postgres://postgres@${primary.host.ip}:${PG_PORT}/postgres`, {
            max: 1,
            connect_timeout: 2,
            onnotice: () => {},
          });
          try {
            const rows = await sql<{ s: string }[]>`SELECT sync_state || '/' || state AS s FROM pg_stat_replication`;
            if (rows.some((r) => r.s === "sync/streaming")) return primary;
          } catch {
            // not yet
          } finally {
            await sql.end({ timeout: 1 });
          }
        }
        await Bun.sleep(200);
      }
      throw new Error(`the Patroni cluster did not become healthy within ${timeoutMs} ms:\n${nodes.map(cluster.log).join("\n")}`);
    },
    killPostmaster(node) {
      const pid = postmasterPid(node.dataDir);
      if (!pid) throw new Error(`${node.name} has no running postmaster`);
      process.kill(pid, "SIGKILL");
    },
    log(node) {
      try {
        return `--- ${node.name}:\n${readFileSync(join(base, `${node.name}.log`), "utf8")
          .split("\n")
          .slice(-30)
          .join("\n")}`;
      } catch {
        return `--- ${node.name}: no log`;
      }
    },
    stop,
  };
  return cluster;
}

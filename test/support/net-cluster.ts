// A cluster over a real (namespaced) network, as in production: the coordinator on the
// server host (the root namespace, next to PostgreSQL), listening beyond loopback on the
// bridge's address with TLS, API tokens and a worker join token; each worker on a host of its
// own (a network namespace, test/support/netns.ts) dialing it over TLS with the join token.
// Used by test/e2e/multihost.test.ts and bench/failover.ts (the partition case).
import { hashToken, newToken } from "../../src/auth/tokens";
import { newJoinToken } from "../../src/auth/worker-tokens";
import { makeTestCerts, type TestCerts } from "./certs";
import { freePort } from "./db";
import { createNetwork, type Network, spawnRoleOn } from "./netns";
import { type RoleProcess, spawnRole } from "./processes";

export interface NetWorker {
  process: RoleProcess;
  /** The worker's id (from its `worker.starting` line). */
  id: string;
  /** Index of its host in `network.hosts`. */
  host: number;
}

export interface NetCluster {
  network: Network;
  certs: TestCerts;
  /** https://<server ip>:<port> */
  coordinatorUrl: string;
  coordinator: RoleProcess;
  /** One entry per host, the latest worker started there. */
  workers: NetWorker[];
  /** Starts a worker on host `host` (its own group) and waits until it is connected. */
  startWorker(host: number): Promise<NetWorker>;
  /** Stops the coordinator (SIGTERM, or SIGKILL with `kill`), waits `downMs`, starts it again. */
  restartCoordinator(downMs: number, options?: { kill?: boolean }): Promise<RoleProcess>;
  /** fetch against the coordinator with the API token and the test CA. */
  api(path: string, init?: RequestInit): Promise<Response>;
  /** POST /tasks; returns the new task's id. */
  submit(body: Record<string, unknown>): Promise<string>;
  /** The worker (of those started) with this id. */
  byId(id: string): NetWorker | undefined;
  /** Every process started, for failure reports. */
  processes: RoleProcess[];
  logs(lines?: number): string;
  /** Stops every process (thawing frozen ones first), then removes the network and the certificates. */
  stop(): Promise<void>;
}

export async function startNetCluster(
  databaseUrl: string,
  options: { hosts: number; slots: number; env: Record<string, string> },
): Promise<NetCluster> {
  const network = createNetwork(options.hosts);
  let certs: TestCerts;
  try {
    certs = makeTestCerts({ serverIps: [network.serverIp] });
  } catch (error) {
    network.remove();
    throw error;
  }
  const { token: apiToken } = newToken();
  const joinToken = newJoinToken();
  const processes: RoleProcess[] = [];
  const workers: NetWorker[] = [];
  const started: NetWorker[] = [];
  // uids of its own, so that workers of another test file on this machine never share one.
  const uidBase = 30_000 + Math.floor(Math.random() * 300) * 100;
  const [httpPort, grpcPort] = await Promise.all([freePort(), freePort()]);
  const coordinatorEnv = {
    ...options.env,
    DATABASE_URL: databaseUrl,
    TQ_HOST: network.serverIp,
    TQ_COORDINATOR_PORT: String(httpPort),
    TQ_GRPC_PORT: String(grpcPort),
    TQ_TLS_CERT: certs.serverCert,
    TQ_TLS_KEY: certs.serverKey,
    TQ_API_TOKENS: `multihost:admin:${hashToken(apiToken)}`,
    TQ_WORKER_TOKEN: joinToken,
  };
  const startCoordinator = async () => {
    const proc = spawnRole("coordinator", coordinatorEnv);
    processes.push(proc);
    await proc.waitForEvent("coordinator.started");
    return proc;
  };
  const cluster: NetCluster = {
    network,
    certs,
    coordinatorUrl: `https://${network.serverIp}:${httpPort}`,
    coordinator: null as unknown as RoleProcess,
    workers,
    processes,
    async startWorker(host) {
      const { DATABASE_URL: _, ...shared } = options.env;
      const first = uidBase + host * options.slots;
      const proc = spawnRoleOn(
        network.hosts[host]!,
        "worker",
        {
          ...shared,
          TQ_COORDINATOR_ADDRESSES: `${network.serverIp}:${grpcPort}`,
          TQ_TLS_CA: certs.ca,
          TQ_WORKER_TOKEN: joinToken,
          TQ_WORKER_SLOTS: String(options.slots),
          TQ_TASK_UIDS: `${first}-${first + options.slots - 1}`,
        },
        { group: true },
      );
      processes.push(proc);
      const id = String((await proc.waitForEvent("worker.starting")).id);
      await proc.waitForEvent("worker.connected");
      const worker = { process: proc, id, host };
      workers[host] = worker;
      started.push(worker);
      return worker;
    },
    async restartCoordinator(downMs, restartOptions = {}) {
      const old = cluster.coordinator;
      if (restartOptions.kill) old.kill("SIGKILL");
      else old.kill("SIGTERM");
      await old.exited;
      await Bun.sleep(downMs);
      cluster.coordinator = await startCoordinator();
      return cluster.coordinator;
    },
    api(path, init = {}) {
      const headers = new Headers(init.headers);
      headers.set("authorization", `Bearer ${apiToken}`);
      return fetch(`${cluster.coordinatorUrl}${path}`, { ...init, headers, tls: { ca: Bun.file(certs.ca) } } as RequestInit);
    },
    async submit(body) {
      const response = await cluster.api("/tasks", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      const text = await response.text();
      if (response.status !== 201) throw new Error(`POST /tasks answered ${response.status}: ${text}`);
      return (JSON.parse(text) as { id: string }).id;
    },
    byId: (id) => started.find((w) => w.id === id),
    logs(lines = 40) {
      return processes
        .map(
          (p) => `--- ${p.role} (pid ${p.pid}), last ${Math.min(lines, p.raw.length)} lines:\n${p.raw.slice(-lines).join("\n")}`,
        )
        .join("\n");
    },
    async stop() {
      for (const host of network.hosts) host.heal();
      for (const p of processes) if (p.grouped) p.signalGroup("SIGCONT");
      for (const p of processes) p.kill("SIGCONT");
      const isWorker = (p: RoleProcess) => p.role.startsWith("worker");
      await Promise.all(processes.filter(isWorker).map((p) => p.stop(5000)));
      await Promise.all(processes.filter((p) => !isWorker(p)).map((p) => p.stop(5000)));
      network.remove();
      certs.remove();
    },
  };
  try {
    cluster.coordinator = await startCoordinator();
    for (let host = 0; host < options.hosts; host++) await cluster.startWorker(host);
  } catch (error) {
    await cluster.stop();
    throw error;
  }
  return cluster;
}

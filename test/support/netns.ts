// Hosts on one machine: Linux network namespaces joined by veth links to a bridge in the root
// namespace, so that a test can run a coordinator (and PostgreSQL) on one "host" and workers
// on others, and cut a worker's link as a network partition would (its veth taken down: no
// RST, no FIN, packets simply stop, both ways). Root (CAP_NET_ADMIN) only; `netnsUnavailable`
// says why not elsewhere, for a skip with a reason.
//
// Layout, for a network made by `createNetwork(n)` with id X (random hex, so concurrent test
// files never meet) and subnet 10.A.B.0/24:
//   root namespace: bridge tqX-br 10.A.B.1   (the server host: coordinator, PostgreSQL)
//   namespace tq-X-0: tqX-0p 10.A.B.2 ─ veth ─ tqX-0h on the bridge
//   namespace tq-X-1: tqX-1p 10.A.B.3 ─ veth ─ tqX-1h on the bridge   …
// `remove()` deletes the namespaces (which deletes their veths) and the bridge; every network
// made is also removed at process exit. A process killed before it could (a test run stopped
// by a timeout) leaves a record under OWNERS naming its pid: the next createNetwork on the
// machine removes the networks of owners that are gone.
//
// Processes join a namespace with `nsenter --net=/run/netns/<name>`, which changes only the
// network namespace. `ip netns exec` does that too but also remounts /sys, which hides
// /sys/fs/cgroup: a worker started that way could not confine its tasks in cgroups as it does
// on a real host. It is the fallback when nsenter is missing.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { RoleProcess } from "./processes";

const ROOT = new URL("../..", import.meta.url).pathname;

function run(argv: string[]): { ok: boolean; out: string } {
  const result = Bun.spawnSync(argv, { stdout: "pipe", stderr: "pipe" });
  return { ok: result.exitCode === 0, out: `${result.stdout.toString()}${result.stderr.toString()}`.trim() };
}

function must(argv: string[]): void {
  const result = run(argv);
  if (!result.ok) throw new Error(`${argv.join(" ")} failed: ${result.out}`);
}

let probed: string | null | undefined;

/** Why this machine cannot make network namespaces (null when it can); probed once. */
export function netnsUnavailable(): string | null {
  if (probed !== undefined) return probed;
  probed = probe();
  return probed;
}

function probe(): string | null {
  if (process.platform !== "linux") return `network namespaces need Linux, this is ${process.platform}`;
  if (process.getuid?.() !== 0) return `network namespaces need root (CAP_NET_ADMIN); the tests run as uid ${process.getuid?.()}`;
  if (!run(["ip", "-V"]).ok) return "the ip command (iproute2) is not installed";
  const name = `tq-probe-${randomHex(6)}`;
  const added = run(["ip", "netns", "add", name]);
  if (!added.ok) return `ip netns add is refused here: ${added.out}`;
  run(["ip", "netns", "del", name]);
  const bridge = `tqp${randomHex(5)}`;
  const made = run(["ip", "link", "add", bridge, "type", "bridge"]);
  if (!made.ok) return `a bridge cannot be made here: ${made.out}`;
  run(["ip", "link", "del", bridge]);
  return null;
}

function randomHex(n: number): string {
  const bytes = crypto.getRandomValues(new Uint8Array(Math.ceil(n / 2)));
  return [...bytes]
    .map((b) => b.toString(16).padStart(2, "0"))
    .join("")
    .slice(0, n);
}

export interface NetHost {
  /** The namespace's name (under /run/netns). */
  namespace: string;
  /** Its address on the network. */
  ip: string;
  /** The root-namespace end of its link (on the bridge). */
  hostVeth: string;
  /** argv that runs `command` inside this host's network namespace. */
  exec(command: string[]): string[];
  /** Cuts the link: the host's veth end in the root namespace goes down. */
  cut(): void;
  /** Heals a cut. */
  heal(): void;
}

export interface Network {
  /** The root namespace's address on the network (the server host). */
  serverIp: string;
  hosts: NetHost[];
  /** Deletes the namespaces, veths and bridge; idempotent. */
  remove(): void;
}

const live = new Set<Network>();
/** One file per network made: its id, holding the pid of the process that made it. */
const OWNERS = "/tmp/tq-netns-owners";

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

function removeById(id: string, count: number): void {
  for (let i = 0; i < count; i++) run(["ip", "netns", "del", `tq-${id}-${i}`]);
  run(["ip", "link", "del", `tq${id}-br`]);
  rmSync(join(OWNERS, id), { force: true });
}

/** Removes the networks whose owning process is gone. */
function sweepOrphans(): void {
  let ids: string[];
  try {
    ids = readdirSync(OWNERS);
  } catch {
    return;
  }
  for (const id of ids) {
    let owner: { pid: number; count: number };
    try {
      owner = JSON.parse(readFileSync(join(OWNERS, id), "utf8")) as { pid: number; count: number };
    } catch {
      continue;
    }
    if (!pidAlive(owner.pid)) removeById(id, owner.count);
  }
}
let exitHook = false;

const joinNetns = existsSync("/usr/bin/nsenter") || run(["nsenter", "--version"]).ok;

/** A bridge in the root namespace and `count` hosts, each a namespace with a veth to it. */
export function createNetwork(count: number): Network {
  const reason = netnsUnavailable();
  if (reason) throw new Error(`cannot create network namespaces: ${reason}`);
  sweepOrphans();
  const id = randomHex(5);
  mkdirSync(OWNERS, { recursive: true });
  writeFileSync(join(OWNERS, id), JSON.stringify({ pid: process.pid, count }));
  // 10.200.0.0 - 10.249.255.0: a /24 of its own, unlikely to meet another run's.
  const random = crypto.getRandomValues(new Uint8Array(2));
  const subnet = `10.${200 + (random[0]! % 50)}.${random[1]!}`;
  const bridge = `tq${id}-br`;
  const namespaces: string[] = [];
  const veths: string[] = [];
  let removed = false;
  const remove = () => {
    if (removed) return;
    removed = true;
    live.delete(network);
    // Each veth first: a namespace's own end goes only once the kernel frees the namespace,
    // which may be after `ip netns del` returns; deleting our end takes both ends at once.
    for (const veth of veths) run(["ip", "link", "del", veth]);
    for (const ns of namespaces) run(["ip", "netns", "del", ns]);
    run(["ip", "link", "del", bridge]);
    rmSync(join(OWNERS, id), { force: true });
  };
  const network: Network = { serverIp: `${subnet}.1`, hosts: [], remove };
  live.add(network);
  if (!exitHook) {
    exitHook = true;
    process.on("exit", () => {
      for (const n of [...live]) n.remove();
    });
  }
  try {
    must(["ip", "link", "add", bridge, "type", "bridge"]);
    must(["ip", "addr", "add", `${subnet}.1/24`, "dev", bridge]);
    must(["ip", "link", "set", bridge, "up"]);
    for (let i = 0; i < count; i++) {
      const namespace = `tq-${id}-${i}`;
      const hostVeth = `tq${id}-${i}h`;
      const peer = `tq${id}-${i}p`;
      const ip = `${subnet}.${i + 2}`;
      must(["ip", "netns", "add", namespace]);
      namespaces.push(namespace);
      must(["ip", "link", "add", hostVeth, "type", "veth", "peer", "name", peer]);
      veths.push(hostVeth);
      must(["ip", "link", "set", peer, "netns", namespace]);
      must(["ip", "link", "set", hostVeth, "master", bridge]);
      must(["ip", "link", "set", hostVeth, "up"]);
      const inNs = (...argv: string[]) => must(["ip", "-n", namespace, ...argv]);
      inNs("link", "set", "lo", "up");
      inNs("addr", "add", `${ip}/24`, "dev", peer);
      inNs("link", "set", peer, "up");
      network.hosts.push({
        namespace,
        ip,
        hostVeth,
        exec: (command) =>
          joinNetns
            ? ["nsenter", `--net=/run/netns/${namespace}`, "--", ...command]
            : ["ip", "netns", "exec", namespace, ...command],
        cut: () => must(["ip", "link", "set", hostVeth, "down"]),
        heal: () => must(["ip", "link", "set", hostVeth, "up"]),
      });
    }
  } catch (error) {
    remove();
    throw error;
  }
  return network;
}

/**
 * Starts a role (as `bun src/<role>/main.ts`) inside `host`'s network namespace. The process
 * keeps its pid across nsenter's exec, so `pid` and signals reach the role itself; with
 * `group` it leads a process group of its own (signalGroup reaches it and its children).
 */
export function spawnRoleOn(
  host: NetHost,
  role: "coordinator" | "worker" | "scheduler",
  env: Record<string, string>,
  options: { group?: boolean } = {},
): RoleProcess {
  const proc = Bun.spawn(host.exec(["bun", `src/${role}/main.ts`]), {
    cwd: ROOT,
    detached: options.group === true,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/tmp", TQ_LOG_LEVEL: "info", ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  return new RoleProcess(`${role}@${host.ip}`, proc, options.group === true);
}

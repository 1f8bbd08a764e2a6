// The multihost harness itself (test/support/netns.ts): hosts reach the server host over
// their links, a cut stops that until it is healed, and remove() leaves no namespace, veth or
// bridge behind. Skipped, with the reason, where the machine cannot make namespaces.
import { afterAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { eventually } from "../support/eventually";
import { createNetwork, type Network, netnsUnavailable } from "../support/netns";

const unavailable = netnsUnavailable();
if (unavailable) console.warn(`netns tests skipped: ${unavailable}`);

const networks: Network[] = [];
afterAll(() => {
  for (const n of networks) n.remove();
});

/**
 * Whether a TCP connect from inside a host to the server host's listener succeeds within
 * 1.5 s of the probe's own start (its startup, slow on a loaded machine, is not counted).
 */
async function reaches(exec: (argv: string[]) => string[], ip: string, port: number): Promise<boolean> {
  const script = `setTimeout(() => process.exit(1), 1500); const s = await Bun.connect({ hostname: "${ip}", port: ${port}, socket: { data() {} } }); s.end(); process.exit(0)`;
  const proc = Bun.spawn(exec(["bun", "-e", script]), { stdout: "ignore", stderr: "ignore" });
  const timer = setTimeout(() => proc.kill("SIGKILL"), 30_000);
  const code = await proc.exited;
  clearTimeout(timer);
  return code === 0;
}

describe.skipIf(unavailable !== null)("network namespaces", () => {
  setDefaultTimeout(60_000);
  test("hosts reach the server host; a cut link does not until healed; remove() leaves nothing", async () => {
    const network = createNetwork(2);
    networks.push(network);
    const server = Bun.listen({ hostname: network.serverIp, port: 0, socket: { data() {} } });
    try {
      const [a, b] = network.hosts;
      expect(await reaches(a!.exec, network.serverIp, server.port)).toBe(true);
      expect(await reaches(b!.exec, network.serverIp, server.port)).toBe(true);
      a!.cut();
      expect(await reaches(a!.exec, network.serverIp, server.port)).toBe(false);
      expect(await reaches(b!.exec, network.serverIp, server.port)).toBe(true);
      a!.heal();
      // The bridge port forwards again once the veth is up: a try or two.
      await eventually(() => reaches(a!.exec, network.serverIp, server.port), {
        what: "host A reaching the server after the heal",
        timeoutMs: 20_000,
      });
    } finally {
      server.stop(true);
    }
    network.remove();
    const namespaces = Bun.spawnSync(["ip", "netns", "list"]).stdout.toString();
    for (const host of network.hosts) expect(namespaces).not.toContain(host.namespace);
    const links = Bun.spawnSync(["ip", "-o", "link", "show"]).stdout.toString();
    for (const host of network.hosts) expect(links).not.toContain(host.hostVeth);
  });
});

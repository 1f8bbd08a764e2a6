// A TCP proxy to a real server that a test can cut and restore: a database outage for one
// process, without stopping a server other tests share. While cut, open connections are
// reset and new ones are closed on arrival. Or it can go silent (`silence`): a link cut
// without a reset, where bytes are dropped both ways and nothing is closed, as a cable pulled.
import { connect, createServer, type Server, type Socket } from "node:net";
import { Transform } from "node:stream";

export class TcpProxy {
  private readonly sockets = new Set<Socket>();
  private cutOff = false;
  private silent = false;

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  /** Listens on a free loopback port, forwarding to `host:port`. */
  static async start(host: string, port: number): Promise<TcpProxy> {
    let proxy: TcpProxy | null = null;
    const server = createServer((client) => proxy!.accept(client, host, port));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    if (!address || typeof address === "string") throw new Error("the proxy has no TCP address");
    proxy = new TcpProxy(server, address.port);
    return proxy;
  }

  /** `url` (a postgres:// URL to the proxied server) with its port pointed at this proxy. */
  url(url: string): string {
    const parsed = new URL(url);
    parsed.hostname = "127.0.0.1";
    parsed.port = String(this.port);
    return parsed.toString();
  }

  cut(): void {
    this.cutOff = true;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
  }

  restore(): void {
    this.cutOff = false;
    if (this.silent) {
      // What was dropped broke the streams that were open: they end now, as after a real cut.
      this.silent = false;
      for (const socket of this.sockets) socket.destroy();
      this.sockets.clear();
    }
  }

  /** Drops every byte both ways, on open and new connections, and closes nothing, until restore(). */
  silence(): void {
    this.silent = true;
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: Socket, host: string, port: number): void {
    if (this.cutOff) {
      client.destroy();
      return;
    }
    const upstream = connect(port, host);
    for (const [socket, peer] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      this.sockets.add(socket);
      socket.on("error", () => peer.destroy());
      socket.on("close", () => {
        this.sockets.delete(socket);
        peer.destroy();
      });
    }
    // Piped both ways (backpressure and half-closes pass as they would), through a gate that
    // drops every byte while the link is silent.
    const gate = () =>
      new Transform({
        transform: (chunk, _encoding, done) => (this.silent ? done() : done(null, chunk)),
      });
    client.pipe(gate()).pipe(upstream);
    upstream.pipe(gate()).pipe(client);
  }
}

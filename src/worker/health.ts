// The worker's own GET /healthz and GET /metrics (TQ_WORKER_HEALTH_PORT), for a supervisor or an orchestrator's
// probe: whether it is connected, to which coordinator, how long since a result was last
// acknowledged, and how much it holds. A worker without a coordinator for longer than the
// heartbeat timeout answers 503: by then its coordinators have declared it dead.
import type { Logger } from "../log";
import type { WorkerHealth } from "./worker";

export interface WorkerHealthServerOptions {
  host: string;
  /** 0 picks a free port (tests). */
  port: number;
  /** The worker's state now. */
  health: () => WorkerHealth;
  /** How long without a coordinator is unhealthy: the heartbeat timeout. */
  heartbeatTimeoutMs: number;
  log: Logger;
  /** GET /metrics beside /healthz: the Prometheus text of the worker's metrics (src/metrics/worker-metrics.ts). */
  metrics?: { metrics(): Promise<string>; contentType: string };
}

/** 200 while connected or only briefly cut off; 503 once cut off past the heartbeat timeout. */
export function healthStatus(health: WorkerHealth, heartbeatTimeoutMs: number): 200 | 503 {
  return !health.connected && health.disconnected_ms > heartbeatTimeoutMs ? 503 : 200;
}

export class WorkerHealthServer {
  private server: ReturnType<typeof Bun.serve> | null = null;

  constructor(private readonly options: WorkerHealthServerOptions) {}

  /** Listens and returns the port. */
  start(): number {
    const { options } = this;
    this.server = Bun.serve({
      hostname: options.host,
      port: options.port,
      fetch(request) {
        const url = new URL(request.url);
        if (url.pathname === "/metrics" && options.metrics && (request.method === "GET" || request.method === "HEAD")) {
          const metrics = options.metrics;
          return metrics.metrics().then((text) => new Response(text, { headers: { "content-type": metrics.contentType } }));
        }
        if (url.pathname !== "/healthz") {
          return Response.json(
            { error: { code: "not_found", message: `no route for ${url.pathname}; try /healthz` } },
            { status: 404 },
          );
        }
        if (request.method !== "GET" && request.method !== "HEAD") {
          return Response.json(
            {
              error: { code: "method_not_allowed", message: `${request.method} is not allowed on /healthz; allowed: GET, HEAD` },
            },
            { status: 405, headers: { allow: "GET, HEAD" } },
          );
        }
        const health = options.health();
        const status = healthStatus(health, options.heartbeatTimeoutMs);
        return Response.json({ status: status === 200 ? "ok" : "unavailable", ...health }, { status });
      },
    });
    const port = this.server.port ?? options.port;
    options.log.info({ event: "worker.health_listening", host: options.host, port }, "serving /healthz");
    return port;
  }

  async stop(): Promise<void> {
    await this.server?.stop(true);
    this.server = null;
  }
}

// The standard gRPC health service, grpc.health.v1.Health (grpc-health-check), answering as
// /readyz does: SERVING while the database answers, NOT_SERVING while it does not, and
// NOT_SERVING from the moment the role begins to stop. Load balancers and probes that speak
// gRPC use it in place of HTTP.
//
// The database is asked only on demand, at most once per interval and one probe at a time,
// however many callers there are: a Check or a new Watch awaits a probe unless one began less
// than an interval ago, and while any Watch is open one probe runs per interval (a change is
// then streamed). With nobody asking, health costs the database nothing.
import type * as grpc from "@grpc/grpc-js";
import { HealthImplementation, type ServingStatus } from "grpc-health-check";
import type { Logger } from "../log";

/** How often health may probe the database: the most an answer lags it (plus the probe's own up to 2 s). */
export const HEALTH_INTERVAL_MS = 1000;

/**
 * grpc.health.v1.Health as protobuf-es describes it, for reflection: generated from the same
 * health.proto that grpc-health-check serves (vendored in proto/grpc), since the descriptor
 * that package carries comes from proto-loader, which renames the file and leaves some type
 * names relative (strict decoders, protobuf-es among them, refuse it).
 */
export { Health } from "../gen/grpc/health/v1/health_pb";

export interface HealthOptions {
  /** Fully qualified names of the services served; "" (the whole server) is always answered. */
  services: string[];
  /** Resolves when the role is ready, rejects when it is not (checkReady). */
  probe: () => Promise<void>;
  /** Defaults to HEALTH_INTERVAL_MS. */
  intervalMs?: number;
  log: Logger;
}

type Handlers = grpc.UntypedServiceImplementation;

export class HealthService {
  private readonly implementation: HealthImplementation;
  private readonly names: string[];
  private readonly intervalMs: number;
  private status: ServingStatus = "NOT_SERVING";
  private probed = false;
  private probedAt = Number.NEGATIVE_INFINITY;
  private probing: Promise<void> | null = null;
  private readonly watches = new Set<grpc.ServerWritableStream<unknown, unknown>>();
  private timer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;

  constructor(private readonly options: HealthOptions) {
    this.names = ["", ...options.services];
    this.intervalMs = options.intervalMs ?? HEALTH_INTERVAL_MS;
    // Unknown until the first probe, which every first Check or Watch awaits.
    this.implementation = new HealthImplementation(Object.fromEntries(this.names.map((name) => [name, this.status])));
  }

  /**
   * Adds grpc.health.v1.Health to `server`: grpc-health-check's own handlers, each run after a
   * fresh enough probe, with open Watch streams tracked so that they are polled and ended.
   */
  addToServer(server: grpc.Server): void {
    this.implementation.addToServer({
      addService: (definition, handlers) => server.addService(definition, this.wrap(handlers as Handlers)),
    });
  }

  /** NOT_SERVING from now on; open Watch streams are told so and ended, so that they do not hold up shutdown. */
  stop(): void {
    this.stopped = true;
    this.stopTimer();
    this.setStatus("NOT_SERVING");
    for (const call of this.watches) call.end();
    this.watches.clear();
  }

  private wrap(handlers: Handlers): Handlers {
    const check = handlers.check as grpc.handleUnaryCall<unknown, unknown>;
    const list = handlers.list as grpc.handleUnaryCall<unknown, unknown>;
    const watch = handlers.watch as grpc.handleServerStreamingCall<unknown, unknown>;
    return {
      check: ((call, callback) => void this.refresh().then(() => check(call, callback))) as typeof check,
      list: ((call, callback) => void this.refresh().then(() => list(call, callback))) as typeof list,
      watch: ((call) => {
        if (this.stopped) {
          watch(call);
          call.end();
          return;
        }
        this.watches.add(call);
        const forget = () => {
          this.watches.delete(call);
          if (this.watches.size === 0) this.stopTimer();
        };
        call.on("cancelled", forget);
        call.on("close", forget);
        // The first message is the fresh status; grpc-health-check then writes each change.
        void this.refresh().then(() => {
          if (!call.cancelled && this.watches.has(call)) watch(call);
          this.schedule();
        });
      }) as typeof watch,
    };
  }

  /**
   * Probes unless a probe began less than an interval ago; one probe at a time. So the database
   * sees at most one probe per interval, whoever asks.
   */
  private refresh(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.probing) return this.probing;
    if (performance.now() - this.probedAt < this.intervalMs) return Promise.resolve();
    this.probedAt = performance.now();
    this.probing = this.options
      .probe()
      .then(
        () => "SERVING" as const,
        () => "NOT_SERVING" as const,
      )
      .then((status) => {
        this.probing = null;
        if (this.stopped) return;
        // The first probe only settles the initial status; later changes are news.
        if (this.probed && status !== this.status) this.options.log.info({ status }, "gRPC health changed");
        this.probed = true;
        this.setStatus(status);
      });
    return this.probing;
  }

  /** grpc-health-check writes every setStatus to the watchers: only changes are set. */
  private setStatus(status: ServingStatus): void {
    if (status === this.status) return;
    this.status = status;
    for (const name of this.names) this.implementation.setStatus(name, status);
  }

  /** While any Watch is open, the next probe an interval after the last one began. */
  private schedule(): void {
    if (this.timer || this.stopped || this.watches.size === 0) return;
    const wait = Math.max(0, this.probedAt + this.intervalMs - performance.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.refresh().then(() => this.schedule());
    }, wait);
    this.timer.unref?.();
  }

  private stopTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

// A worker's own metrics, served at GET /metrics beside /healthz on TQ_WORKER_HEALTH_PORT: its
// connection, slots and results waiting for acknowledgement, read from Worker.health() at
// scrape time. The task counters and latencies are the coordinator's: it records every event.
import { Gauge, Registry } from "prom-client";
import type { WorkerHealth } from "../worker/worker";

export function workerMetrics(slots: number, health: () => WorkerHealth): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ role: "worker" });
  const gauge = (name: string, help: string, read: (h: WorkerHealth) => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read(health()));
      },
    });
  gauge("taskqueue_worker_connected", "1 while welcomed by a coordinator on the current stream, else 0.", (h) =>
    h.connected ? 1 : 0,
  );
  gauge("taskqueue_worker_slots_total", "Commands this worker runs at once (TQ_WORKER_SLOTS).", () => slots);
  gauge("taskqueue_worker_attempts_held", "Attempts held: waiting for their start time or running.", (h) => h.running);
  gauge(
    "taskqueue_worker_results_unacknowledged",
    "Results waiting for the coordinator's acknowledgement.",
    (h) => h.unacknowledged,
  );
  gauge("taskqueue_worker_draining", "1 while draining, else 0.", (h) => (h.draining ? 1 : 0));
  gauge(
    "taskqueue_worker_disconnected_seconds",
    "How long the worker has been without a coordinator; 0 while connected.",
    (h) => h.disconnected_ms / 1000,
  );
  return registry;
}

// The gauges a coordinator reads from its worker registry at scrape time: its connected
// workers and their slots, used and free (a worker held back from new work has none free).
import type { WorkerRegistry } from "../coordinator/registry";
import type { TaskMetrics } from "./metrics";

export function addRegistryGauges(metrics: TaskMetrics, registry: WorkerRegistry): void {
  metrics.gauge("taskqueue_workers", "Workers connected to this coordinator.", [], (gauge) => {
    gauge.set(registry.all().length);
  });
  metrics.gauge(
    "taskqueue_worker_slots",
    "Slots of the workers connected to this coordinator, by use (used, free).",
    ["use"],
    (gauge) => {
      let used = 0;
      let free = 0;
      for (const worker of registry.all()) {
        used += Math.min(worker.slots, worker.inFlight.size);
        free += registry.freeSlots(worker);
      }
      gauge.set({ use: "used" }, used);
      gauge.set({ use: "free" }, free);
    },
  );
}

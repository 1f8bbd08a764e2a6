// The lease rules with fake time (src/task/lease.ts, src/worker/lease-fence.ts): the worker's
// fence always comes before any coordinator's lapse, a coordinator believes a lapse only once
// it has been renewing for that lease, and a stall is a gap longer than an interval.
import { expect, test } from "bun:test";
import { CLOCK_DRIFT, fenceAt, fenceKillGraceMs, fenceMarginMs, mayBelieveLapse, minLeaseMs } from "../../src/task/lease";
import { toTaskSpec } from "../../src/task/spec";
import { LeaseFence, StallDetector } from "../../src/worker/lease-fence";

const timings = { heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 3000 };
const defaults = { maxAttempts: 3, retry: { backoffBaseMs: 1000, backoffCapMs: 60_000 }, minLeaseMs: minLeaseMs(timings) };

test("the shortest lease is the heartbeat timeout plus two intervals; a shorter lease_ms is refused naming the field", () => {
  expect(minLeaseMs(timings)).toBe(5000);
  expect(toTaskSpec({ command: "true", lease_ms: 5000 }, defaults).leaseMs).toBe(5000);
  expect(() => toTaskSpec({ command: "true", lease_ms: 4999 }, defaults)).toThrow(
    expect.objectContaining({ code: "invalid_argument", field: "lease_ms" }),
  );
  expect(() => toTaskSpec({ command: "true", lease_ms: 0 }, defaults)).toThrow(expect.objectContaining({ field: "lease_ms" }));
  // Absent: the coordinator's default applies, and the spec (and its idempotency hash) is as before.
  expect("leaseMs" in toTaskSpec({ command: "true" }, defaults)).toBe(false);
});

test("the fence margin covers drift, the fence's kill grace and a late timer", () => {
  expect(fenceKillGraceMs(timings, 5000)).toBe(1000);
  expect(fenceKillGraceMs(timings, 200)).toBe(200);
  expect(fenceMarginMs(30_000, timings, 5000)).toBe(300 + 1000 + 500);
  expect(fenceAt(10_000, 30_000, timings, 5000)).toBe(10_000 + 30_000 - 1800);
});

test("the worker's fence (and the end of its kill grace) comes before the coordinator's lapse, at the worst allowed drift", () => {
  for (const leaseMs of [5000, 30_000, 600_000]) {
    for (const killGraceMs of [0, 200, 5000]) {
      // The worker sends its heartbeat at 0 on its clock; the coordinator renews on receipt,
      // later by any transit, so its lease runs out at leaseMs or later in real time. The
      // worker's clock runs slow by the allowed drift: its fence at f on its clock is at
      // f * (1 + drift) in real time, and the processes are gone a kill grace after.
      const fence = fenceAt(0, leaseMs, timings, killGraceMs);
      const goneAt = (fence + fenceKillGraceMs(timings, killGraceMs)) * (1 + CLOCK_DRIFT);
      expect(goneAt).toBeLessThan(leaseMs);
    }
  }
});

test("a confirmed renewal moves an attempt's fence to its heartbeat's send plus the lease; unknown heartbeats move nothing", () => {
  const fence = new LeaseFence({ ...timings, killGraceMs: 5000 });
  fence.granted("t:1", 5000, 100);
  const margin = fenceMarginMs(5000, timings, 5000);
  expect(fence.trusted("t:1", 100 + 5000 - margin - 1)).toBe(true);
  expect(fence.due(100 + 5000 - margin)).toEqual(["t:1"]);

  fence.sent(7n, 1000);
  fence.sent(8n, 2000);
  // Counted from the send, not from the confirmation's arrival (at 2600, say).
  expect([...(fence.confirm(8n, [{ key: "t:1", leaseMs: 5000 }]) ?? [])]).toEqual(["t:1"]);
  expect(fence.leaseOf("t:1")).toEqual({ fenceAt: 2000 + 5000 - margin, leaseMs: 5000 });
  // An older confirmation arriving late never moves it back.
  fence.confirm(7n, [{ key: "t:1", leaseMs: 5000 }]);
  expect(fence.leaseOf("t:1")?.fenceAt).toBe(2000 + 5000 - margin);
  // A heartbeat we never sent (or forgot) confirms nothing; an attempt we do not hold is ignored.
  expect(fence.confirm(99n, [{ key: "t:1", leaseMs: 5000 }])).toBeNull();
  expect([...(fence.confirm(8n, [{ key: "other:1", leaseMs: 5000 }]) ?? [])]).toEqual([]);
  fence.forget("t:1");
  expect(fence.trusted("t:1", 0)).toBe(false);
  expect(fence.due(1e12)).toEqual([]);
});

test("a coordinator believes a lapse only once it has been renewing for that lease", () => {
  expect(mayBelieveLapse(30_000, 29_999)).toBe(false);
  expect(mayBelieveLapse(30_000, 30_000)).toBe(true);
  expect(mayBelieveLapse(5000, 30_000)).toBe(true);
});

test("a stall is a gap between ticks longer than a heartbeat interval", () => {
  const stall = new StallDetector(1000, 0);
  expect(stall.tick(250)).toBeNull();
  expect(stall.tick(1250)).toBeNull();
  expect(stall.tick(2251)).toBe(1001);
  expect(stall.tick(2300)).toBeNull();
});

import { expect, test } from "bun:test";
import { type WorkerConnection, WorkerRegistry } from "../../src/coordinator/registry";

function worker(id: string, slots: number, inFlight: string[] = []): WorkerConnection {
  return {
    id,
    name: id,
    slots,
    inFlight: new Map(inFlight.map((key) => [key, 0])),
    reported: [],
    draining: false,
    ended: false,
    lastSeen: 0,
    send() {},
    close() {},
  };
}

test("the slot plan spreads by free capacity, one entry per free slot", () => {
  const registry = new WorkerRegistry();
  registry.add(worker("a", 2));
  registry.add(worker("b", 2));
  registry.add(worker("c", 3, ["t:1"]));
  expect(registry.slotPlan()).toEqual(["a", "b", "c", "a", "b", "c"]);
  expect(registry.slotPlan(2)).toEqual(["a", "b"]);
  expect(registry.totalFree()).toBe(6);
});

test("the fullest workers come last; full and draining workers get nothing", () => {
  const registry = new WorkerRegistry();
  registry.add(worker("busy", 4, ["x:1", "y:1", "z:1"]));
  registry.add(worker("idle", 3));
  registry.add(worker("full", 1, ["w:1"]));
  const draining = worker("draining", 8);
  draining.draining = true;
  registry.add(draining);
  expect(registry.slotPlan()).toEqual(["idle", "idle", "busy", "idle"]);
});

test("a reconnecting worker replaces its old connection, which can no longer remove it", () => {
  const registry = new WorkerRegistry();
  const old = worker("a", 1);
  registry.add(old);
  const fresh = worker("a", 1);
  registry.add(fresh);
  expect(registry.get("a")).toBe(fresh);
  expect(registry.remove(old)).toBe(false);
  expect(registry.isCurrent(fresh)).toBe(true);
  expect(registry.remove(fresh)).toBe(true);
  expect(registry.size).toBe(0);
});

test("a worker silent past the suspect time gets no new work until it speaks again", () => {
  const registry = new WorkerRegistry(1000);
  const quiet = worker("quiet", 2);
  const chatty = worker("chatty", 1);
  const now = performance.now();
  quiet.lastSeen = now - 5000;
  chatty.lastSeen = now;
  registry.add(quiet);
  registry.add(chatty);
  expect(registry.isSuspect(quiet)).toBe(true);
  expect(registry.slotPlan()).toEqual(["chatty"]);
  quiet.lastSeen = performance.now();
  expect(registry.slotPlan()).toEqual(["quiet", "quiet", "chatty"]);
});

import { expect, test } from "bun:test";
import { type WorkerConnection, WorkerRegistry } from "../../src/coordinator/registry";
import type { CoordinatorMessage } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { cancelMessage } from "../../src/rpc/messages";

/** `held` as "taskId:attempt" strings; `sent` collects what reaches the stream. */
function open(
  registry: WorkerRegistry,
  id: string,
  slots: number,
  held: string[] = [],
  at = performance.now(),
): { worker: WorkerConnection; sent: CoordinatorMessage[]; closed: string[] } {
  const sent: CoordinatorMessage[] = [];
  const closed: string[] = [];
  const refs = held.map((key) => {
    const [taskId = "", attempt = "0"] = key.split(":");
    return { taskId, attempt: Number(attempt) };
  });
  const worker = registry.open(
    { id, name: id, slots, held: refs, features: new Set() },
    { write: (message) => sent.push(message), close: (reason) => closed.push(reason) },
    at,
  );
  return { worker, sent, closed };
}

function add(registry: WorkerRegistry, id: string, slots: number, held: string[] = [], at?: number): WorkerConnection {
  const { worker } = open(registry, id, slots, held, at);
  registry.add(worker);
  return worker;
}

test("the slot plan spreads by free capacity, one entry per free slot", () => {
  const registry = new WorkerRegistry();
  add(registry, "a", 2);
  add(registry, "b", 2);
  add(registry, "c", 3, ["t:1"]);
  expect(registry.slotPlan()).toEqual(["a", "b", "c", "a", "b", "c"]);
  expect(registry.slotPlan(2)).toEqual(["a", "b"]);
  expect(registry.totalFree()).toBe(6);
});

test("the fullest workers come last; full and draining workers get nothing", () => {
  const registry = new WorkerRegistry();
  add(registry, "busy", 4, ["x:1", "y:1", "z:1"]);
  add(registry, "idle", 3);
  add(registry, "full", 1, ["w:1"]);
  const draining = add(registry, "draining", 8);
  registry.drain(draining);
  expect(registry.slotPlan()).toEqual(["idle", "idle", "busy", "idle"]);
});

test("a reconnecting worker replaces its old connection, which can no longer remove it", () => {
  const registry = new WorkerRegistry();
  const old = add(registry, "a", 1);
  const fresh = add(registry, "a", 1);
  expect(registry.get("a")).toBe(fresh);
  expect(registry.remove(old)).toBe(false);
  expect(registry.isCurrent(fresh)).toBe(true);
  expect(registry.remove(fresh)).toBe(true);
  expect(registry.size).toBe(0);
});

test("a worker silent past the suspect time gets no new work until it speaks again", () => {
  const registry = new WorkerRegistry(1000);
  const now = performance.now();
  const quiet = add(registry, "quiet", 2, [], now - 5000);
  add(registry, "chatty", 1, [], now);
  expect(registry.isSuspect(quiet)).toBe(true);
  expect(registry.slotPlan()).toEqual(["chatty"]);
  expect(registry.heard(quiet)).toBe(true);
  expect(registry.slotPlan()).toEqual(["quiet", "quiet", "chatty"]);
});

test("open: what the worker holds counts against its slots, and nothing is sent until it is added", () => {
  const registry = new WorkerRegistry();
  const { worker, sent } = open(registry, "a", 3, ["t:2", "u:1"], 100);
  expect([...worker.inFlight.keys()]).toEqual(["t:2", "u:1"]);
  expect(worker.reported).toEqual([
    { taskId: "t", attempt: 2 },
    { taskId: "u", attempt: 1 },
  ]);
  expect(worker.lastSeen).toBe(100);
  expect(worker.draining).toBe(false);
  expect(worker.ended).toBe(false);
  expect(registry.get("a")).toBeUndefined();
  worker.send(cancelMessage({ taskId: "t", attempt: 2 }, "early"));
  expect(sent).toHaveLength(0);
  registry.add(worker);
  expect(registry.freeSlots(worker)).toBe(1);
  worker.send(cancelMessage({ taskId: "t", attempt: 2 }, "now"));
  expect(sent.map((m) => m.payload.case)).toEqual(["cancel"]);
});

test("send: a replaced or removed connection sends nothing; close reaches its own stream", () => {
  const registry = new WorkerRegistry();
  const old = open(registry, "a", 1);
  registry.add(old.worker);
  const fresh = open(registry, "a", 1);
  registry.add(fresh.worker);
  old.worker.send(cancelMessage({ taskId: "t", attempt: 1 }, "x"));
  expect(old.sent).toHaveLength(0);
  fresh.worker.send(cancelMessage({ taskId: "t", attempt: 1 }, "x"));
  expect(fresh.sent).toHaveLength(1);
  registry.remove(fresh.worker);
  fresh.worker.send(cancelMessage({ taskId: "t", attempt: 1 }, "x"));
  expect(fresh.sent).toHaveLength(1);
  old.worker.close("replaced");
  expect(old.closed).toEqual(["replaced"]);
  expect(fresh.closed).toEqual([]);
});

test("reserve and release: an attempt takes a slot from when it is given and frees it once", () => {
  const registry = new WorkerRegistry();
  const worker = add(registry, "a", 2);
  registry.reserve(worker, "t", 1, 42);
  expect(worker.inFlight.get("t:1")).toBe(42);
  expect(registry.freeSlots(worker)).toBe(1);
  registry.reserve(worker, "t", 2);
  expect(registry.freeSlots(worker)).toBe(0);
  expect(registry.slotPlan()).toEqual([]);
  expect(registry.release(worker, "t", 1)).toBe(true);
  expect(registry.release(worker, "t", 1)).toBe(false);
  expect(registry.release(worker, "nope", 1)).toBe(false);
  expect(registry.freeSlots(worker)).toBe(1);
});

test("reserveFreeSlot takes the slot the plan gives first, and none when every slot is taken", () => {
  const registry = new WorkerRegistry();
  const small = add(registry, "small", 1);
  const big = add(registry, "big", 2);
  expect(registry.reserveFreeSlot("t1", 1)).toBe(big);
  expect(big.inFlight.has("t1:1")).toBe(true);
  expect(registry.reserveFreeSlot("t2", 1)).toBe(small);
  expect(registry.reserveFreeSlot("t3", 1)).toBe(big);
  expect(registry.reserveFreeSlot("t4", 1)).toBeNull();
  expect(registry.totalFree()).toBe(0);
});

test("heard: it records when the worker spoke and says whether it had been suspect", () => {
  const registry = new WorkerRegistry(1000);
  const worker = add(registry, "a", 1, [], 0);
  expect(registry.heard(worker, 500)).toBe(false);
  expect(worker.lastSeen).toBe(500);
  expect(registry.heard(worker, 2000)).toBe(true);
  expect(worker.lastSeen).toBe(2000);
  expect(registry.heard(worker, 2100)).toBe(false);
});

test("heartbeat: the listed attempts replace the last report, as plain refs", () => {
  const registry = new WorkerRegistry();
  const worker = add(registry, "a", 2, ["old:1"]);
  const before = worker.reported;
  registry.heartbeat(worker, [{ taskId: "t", attempt: 3, extra: true } as { taskId: string; attempt: number }]);
  expect(worker.reported).toEqual([{ taskId: "t", attempt: 3 }]);
  expect(before).toEqual([{ taskId: "old", attempt: 1 }]);
  registry.heartbeat(worker, []);
  expect(worker.reported).toEqual([]);
});

test("drain: true only the first time, and the worker gets no new work", () => {
  const registry = new WorkerRegistry();
  const worker = add(registry, "a", 4);
  expect(registry.drain(worker)).toBe(true);
  expect(worker.draining).toBe(true);
  expect(registry.drain(worker)).toBe(false);
  expect(registry.freeSlots(worker)).toBe(0);
  expect(registry.reserveFreeSlot("t", 1)).toBeNull();
});

test("streamEnded marks the connection ended and leaves it registered until removed", () => {
  const registry = new WorkerRegistry();
  const worker = add(registry, "a", 1);
  registry.streamEnded(worker);
  expect(worker.ended).toBe(true);
  expect(registry.isCurrent(worker)).toBe(true);
});

test("expireUnreported frees attempts reserved a lease ago that the worker does not list", () => {
  const registry = new WorkerRegistry();
  const worker = add(registry, "a", 4);
  registry.reserve(worker, "lost", 1, 0);
  registry.reserve(worker, "listed", 1, 0);
  registry.reserve(worker, "recent", 1, 900);
  expect(registry.expireUnreported(worker, new Set(["listed:1"]), 1000, 1500)).toBe(1);
  expect([...worker.inFlight.keys()].sort()).toEqual(["listed:1", "recent:1"]);
  expect(registry.expireUnreported(worker, new Set(["listed:1"]), 1000, 2000)).toBe(1);
  expect([...worker.inFlight.keys()]).toEqual(["listed:1"]);
});

test("silentFor lists the registered workers not heard from for longer than the timeout", () => {
  const registry = new WorkerRegistry();
  const quiet = add(registry, "quiet", 1, [], 0);
  add(registry, "chatty", 1, [], 900);
  expect(registry.silentFor(500, 1000)).toEqual([quiet]);
  expect(registry.silentFor(2000, 1000)).toEqual([]);
  registry.heard(quiet, 1000);
  expect(registry.silentFor(500, 1000)).toEqual([]);
});

test("a connection the registry did not open is refused by its verbs", () => {
  const registry = new WorkerRegistry();
  const impostor = {
    id: "x",
    name: "x",
    slots: 1,
    features: new Set(),
    inFlight: new Map(),
    reported: [],
    reportedSeq: 0n,
    draining: false,
    full: false,
    ended: false,
    lastSeen: 0,
    send() {},
    close() {},
  } satisfies WorkerConnection;
  expect(() => registry.add(impostor)).toThrow("not a connection the registry opened");
  expect(() => registry.reserve(impostor, "t", 1)).toThrow("not a connection the registry opened");
});

test("a full worker and a held-back registry give no free slots, until they clear", () => {
  const registry = new WorkerRegistry();
  const a = add(registry, "a", 2);
  add(registry, "b", 1);
  registry.heartbeat(a, [], true);
  expect(a.full).toBe(true);
  expect(registry.slotPlan()).toEqual(["b"]);
  registry.heartbeat(a, [], false);
  expect(registry.totalFree()).toBe(3);
  expect(registry.holdWork("backlog")).toBe(true);
  expect(registry.holdWork("still")).toBe(false);
  expect(registry.workHeldBack).toBe("backlog");
  expect(registry.totalFree()).toBe(0);
  expect(registry.reserveFreeSlot("t", 1)).toBeNull();
  expect(registry.holdWork(null)).toBe(true);
  expect(registry.holdWork(null)).toBe(false);
  expect(registry.slotPlan()).toEqual(["a", "a", "b"]);
  expect(registry.totalFree()).toBe(3);
});

import { describe, expect, test } from "bun:test";
import { GroupCommit } from "../../src/db/group-commit";

/**
 * A write whose calls are recorded and which finishes only when told to; `called(n)` resolves
 * once it has been called n times.
 */
function controlledWrite() {
  const calls: number[][] = [];
  const pending: (() => void)[] = [];
  const waiters: { n: number; resolve: () => void }[] = [];
  const write = (items: number[]) => {
    calls.push(items);
    for (const waiter of waiters.filter((w) => calls.length >= w.n)) {
      waiters.splice(waiters.indexOf(waiter), 1);
      waiter.resolve();
    }
    return new Promise<string[]>((resolve) => pending.push(() => resolve(items.map((n) => `ok ${n}`))));
  };
  const called = (n: number) =>
    calls.length >= n ? Promise.resolve() : new Promise<void>((resolve) => waiters.push({ n, resolve }));
  return { calls, pending, write, called };
}

/**
 * A group whose writes are recorded and answered by `answer`; the first write waits for
 * gate(), so that later items gather into one batch meanwhile.
 */
function gatedGroup(answer: (items: number[]) => number[]) {
  const calls: number[][] = [];
  let gate!: () => void;
  const opened = new Promise<void>((resolve) => (gate = resolve));
  const group = new GroupCommit(
    async (items: number[]) => {
      calls.push(items);
      if (calls.length === 1) await opened;
      return answer(items);
    },
    { maxItemsPerWrite: 100 },
  );
  return { calls, gate, group };
}

describe("GroupCommit", () => {
  test("writes the first item at once and everything that arrived meanwhile in one batch", async () => {
    const { calls, pending, write, called } = controlledWrite();
    const group = new GroupCommit(write, { maxItemsPerWrite: 100 });
    const first = group.add(1);
    const rest = [2, 3, 4].map((n) => group.add(n));
    expect(calls).toEqual([[1]]);
    pending.shift()!();
    expect(await first).toBe("ok 1");
    // The second write starts once the first has settled.
    await called(2);
    expect(calls[1]).toEqual([2, 3, 4]);
    pending.shift()!();
    expect(await Promise.all(rest)).toEqual(["ok 2", "ok 3", "ok 4"]);
    await group.drained();
  });

  test("splits a backlog at maxItemsPerWrite", async () => {
    const { calls, pending, write, called } = controlledWrite();
    const group = new GroupCommit(write, { maxItemsPerWrite: 2 });
    const all = [1, 2, 3, 4, 5].map((n) => group.add(n));
    for (let i = 1; i <= 3; i++) {
      await called(i);
      pending.shift()!();
    }
    expect(await Promise.all(all)).toEqual(["ok 1", "ok 2", "ok 3", "ok 4", "ok 5"]);
    expect(calls).toEqual([[1], [2, 3], [4, 5]]);
  });

  test("an item the database refuses fails alone; the others of its batch are written", async () => {
    const { calls, gate, group } = gatedGroup((items) => {
      if (items.includes(13)) throw Object.assign(new Error("invalid input syntax"), { code: "22P02" });
      return items.map((n) => n * 10);
    });
    const first = group.add(1);
    const batch = [2, 13, 4].map((n) =>
      group.add(n).then(
        (v) => ({ ok: v }),
        (e: Error) => ({ error: e.message }),
      ),
    );
    gate();
    expect(await first).toBe(10);
    expect(await Promise.all(batch)).toEqual([{ ok: 20 }, { error: "invalid input syntax" }, { ok: 40 }]);
    expect(calls).toEqual([[1], [2, 13, 4], [2], [13], [4]]);
  });

  test("a lost database fails the whole batch without retrying item by item", async () => {
    const { calls, gate, group } = gatedGroup(() => {
      throw Object.assign(new Error("connection refused"), { code: "ECONNREFUSED" });
    });
    const results = [1, 2, 3].map((n) =>
      group.add(n).then(
        () => "resolved",
        (e: Error) => e.message,
      ),
    );
    gate();
    expect(await Promise.all(results)).toEqual(["connection refused", "connection refused", "connection refused"]);
    expect(calls).toEqual([[1], [2, 3]]);
  });
});

// Experiment for issue 13 (schedule firing lateness): how late after its start time an early
// hand-over's command starts on a worker, with `n` attempts due at the same instant (as many
// schedules firing at one second), armed (spawned while they wait, released at the start
// time: src/worker/attempts.ts) against unarmed (each spawned at its start time, one after
// another on the event loop). Rounds alternate between the two, in this one process, so both
// see the same load. Lateness: the attempt's started_at (wall clock, as the worker reports it)
// minus its start time, in ms.
// Usage: bun bench/experiments/armed-start.ts [n=10] [rounds=10] [startInMs=45]
import { create } from "@bufbuild/protobuf";
import { AssignSchema } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { Attempts } from "../../src/worker/attempts";

const [n = 10, rounds = 10, startInMs = 45] = process.argv.slice(2).map(Number);

async function round(armEarly: boolean, tag: string): Promise<number[]> {
  const late: number[] = [];
  const held = new Attempts({
    log: silentLogger,
    killGraceMs: 1000,
    maxOutputBytes: 1000,
    baseEnv: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
    armEarly,
    events: {
      started: () => {},
      finished: (_ref, result) => late.push(result.startedAt.getTime() - due),
      notStarted: () => {},
    },
  });
  // Whole ms on the wall clock, as a fire time is.
  const due = Math.ceil(Date.now() + startInMs);
  const wait = due - Date.now();
  for (let i = 0; i < n; i++) {
    held.take(create(AssignSchema, { ref: { taskId: `${tag}-${i}`, attempt: 1 }, command: "true", startInMs: wait }));
  }
  await held.empty();
  return late;
}

const pct = (xs: number[], p: number) => {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? Number.NaN;
};

const armed: number[] = [];
const unarmed: number[] = [];
for (let r = 0; r < rounds; r++) {
  armed.push(...(await round(true, `a${r}`)));
  unarmed.push(...(await round(false, `u${r}`)));
  await Bun.sleep(200);
}
const line = (name: string, xs: number[]) =>
  `${name}: p50 ${pct(xs, 50)}  p99 ${pct(xs, 99)}  max ${Math.max(...xs)}  min ${Math.min(...xs)} ms (${xs.length} starts)`;
console.log(`${n} attempts due at once, handed over ${startInMs} ms ahead, ${rounds} rounds each, alternating`);
console.log(line("armed  ", armed));
console.log(line("unarmed", unarmed));

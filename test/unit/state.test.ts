import { expect, test } from "bun:test";
import {
  canTransition,
  GUARDS,
  IN_FLIGHT_STATES,
  isFinal,
  isTaskState,
  statesLeadingTo,
  TASK_STATES,
} from "../../src/task/state";

test("final states have no way out but a client's retry", () => {
  for (const state of TASK_STATES) {
    if (!isFinal(state)) continue;
    for (const to of TASK_STATES) expect(canTransition(state, to), `${state} -> ${to}`).toBe(to === "queued");
  }
  expect(GUARDS.retry).toEqual(["succeeded", "failed", "timed_out", "cancelled"]);
  expect(TASK_STATES.filter(isFinal)).toEqual(["succeeded", "failed", "timed_out", "cancelled"]);
});

test("the lifecycle of DESIGN.md", () => {
  expect(canTransition("queued", "dispatched")).toBe(true);
  expect(canTransition("queued", "running")).toBe(false);
  expect(canTransition("queued", "succeeded")).toBe(false);
  expect(canTransition("dispatched", "running")).toBe(true);
  // A finish can overtake its start report.
  expect(canTransition("dispatched", "succeeded")).toBe(true);
  expect(canTransition("running", "queued")).toBe(true);
  expect(canTransition("running", "dispatched")).toBe(false);
  expect(statesLeadingTo("cancelled")).toEqual(["waiting", "queued", "dispatched", "running"]);
  expect(statesLeadingTo("queued")).toEqual([
    "waiting",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
  ]);
  // A task blocked on its parents is released to the queue or ended, never claimed as it is.
  expect(canTransition("waiting", "queued")).toBe(true);
  expect(canTransition("waiting", "dispatched")).toBe(false);
});

test("state names are recognised exactly", () => {
  expect(isTaskState("queued")).toBe(true);
  expect(isTaskState("QUEUED")).toBe(false);
  expect(isTaskState("done")).toBe(false);
});

test("the SQL guards are the states each change may start from", () => {
  expect(GUARDS.claim).toEqual(["queued"]);
  expect(GUARDS.start).toEqual(["dispatched"]);
  expect(GUARDS.cancel).toEqual(["waiting", "queued", "dispatched", "running"]);
  expect(GUARDS.inFlight).toEqual(["dispatched", "running"]);
  expect(GUARDS.waiting).toEqual(["waiting"]);
  // A result or a loss may end the attempt in any of these, and each is entered from in flight only.
  for (const to of ["succeeded", "timed_out"] as const) expect(statesLeadingTo(to)).toEqual([...IN_FLIGHT_STATES]);
  // And failed also from queued: a schedule_timeout_ms that passed without a worker.
  expect(statesLeadingTo("failed")).toEqual(["queued", ...IN_FLIGHT_STATES]);
  expect(GUARDS.scheduleTimeout).toEqual(["queued"]);
  // The queue is entered from in flight (retry, requeue), from waiting (parents resolved) and
  // from a final state (a client's retry).
  expect(statesLeadingTo("queued")).toEqual(["waiting", ...IN_FLIGHT_STATES, ...GUARDS.retry]);
  // Only the client's retry starts from a final state.
  for (const [name, guard] of Object.entries(GUARDS)) {
    if (name === "retry") continue;
    for (const state of guard) expect(isFinal(state), state).toBe(false);
  }
});

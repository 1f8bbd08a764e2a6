// gRPC ScheduleService against a real coordinator (in this process): the same operations and
// validation as /schedules, authenticated like TaskService, described by reflection.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import * as grpc from "@grpc/grpc-js";
import { hashToken, newToken } from "../../src/auth/tokens";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import {
  type CreateScheduleResponse,
  type GetScheduleResponse,
  type ListSchedulesResponse,
  ScheduleService,
  type TriggerScheduleResponse,
  type UpdateScheduleResponse,
} from "../../src/gen/taskqueue/v1/schedule_service_pb";
import { type ListTasksResponse, TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import { silentLogger } from "../../src/log";
import { clientConstructor } from "../../src/rpc/definitions";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const { token } = newToken();
const { token: reader } = newToken();
let coordinator: Coordinator;
let schedules: grpc.Client & Record<string, Function>;
let tasks: grpc.Client & Record<string, Function>;

beforeAll(async () => {
  const config = loadConfig({
    TQ_COORDINATOR_PORT: String(await freePort()),
    TQ_GRPC_PORT: String(await freePort()),
    TQ_API_TOKENS: `ops:read+submit:${hashToken(token)},viewer:read:${hashToken(reader)}`,
    // Fired here by trigger only: the loop would race the assertions on the firings.
    TQ_SCHEDULES: "false",
  });
  coordinator = new Coordinator(config, db.url, silentLogger);
  const { grpcAddress } = await coordinator.start();
  schedules = new (clientConstructor(ScheduleService))(grpcAddress, grpc.credentials.createInsecure()) as typeof schedules;
  tasks = new (clientConstructor(TaskService))(grpcAddress, grpc.credentials.createInsecure()) as typeof tasks;
});

afterAll(async () => {
  schedules?.close();
  tasks?.close();
  await coordinator?.stop();
}, HOOK_TIMEOUT_MS);

function bearer(value = token): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${value}`);
  return metadata;
}

function call<Res>(client: typeof schedules, method: string, request: object, metadata = bearer()): Promise<Res> {
  return new Promise((resolve, reject) =>
    client[method]!(request, metadata, (error: grpc.ServiceError | null, response: Res) =>
      error ? reject(error) : resolve(response),
    ),
  );
}

async function failure(promise: Promise<unknown>): Promise<grpc.ServiceError | "resolved"> {
  try {
    await promise;
    return "resolved";
  } catch (error) {
    return error as grpc.ServiceError;
  }
}

test("create, get, list, update, trigger, and tasks filtered by schedule", async () => {
  const created = await call<CreateScheduleResponse>(schedules, "createSchedule", {
    name: "grpc-hourly",
    cron: "@hourly",
    timeZone: "Europe/Berlin",
    task: { command: "echo hi", env: { A: "1" }, secretEnv: { S: "x" }, timeoutMs: 5000 },
    overlap: "allow",
    catchUp: { window: "30m", mode: "all" },
  });
  const schedule = created.schedule!;
  expect(schedule).toMatchObject({ name: "grpc-hourly", cron: "@hourly", timeZone: "Europe/Berlin", overlap: "allow" });
  expect(schedule.task).toMatchObject({ command: "echo hi", env: { A: "1" }, timeoutMs: 5000 });
  expect(schedule.task!.secretEnv).toEqual({});
  expect(schedule.secretEnvKeys).toEqual(["S"]);
  expect(schedule.catchUp).toMatchObject({ window: "30m", mode: "all" });
  expect(schedule.upcoming).toHaveLength(5);

  const got = await call<GetScheduleResponse>(schedules, "getSchedule", { id: "grpc-hourly" }, bearer(reader));
  expect(got.schedule!.id).toBe(schedule.id);
  const listed = await call<ListSchedulesResponse>(schedules, "listSchedules", {}, bearer(reader));
  expect(listed.schedules.map((s) => s.id)).toContain(schedule.id);

  const updated = await call<UpdateScheduleResponse>(schedules, "updateSchedule", { id: schedule.id, every: "5m" });
  expect(updated.schedule).toMatchObject({ cron: "", every: "5m" });

  const fired = await call<TriggerScheduleResponse>(schedules, "triggerSchedule", { id: schedule.id });
  expect(fired.firing).toMatchObject({ outcome: "created", reason: "triggered" });
  const listedTasks = await call<ListTasksResponse>(tasks, "listTasks", { scheduleId: schedule.id }, bearer(reader));
  expect(listedTasks.tasks.map((t) => t.id)).toEqual([fired.firing!.taskId]);
  expect(listedTasks.tasks[0]!.scheduleId).toBe(schedule.id);
  expect(listedTasks.tasks[0]!.fireAt).toEqual(fired.firing!.fireAt);

  await call(schedules, "deleteSchedule", { id: schedule.id });
  const gone = await failure(call(schedules, "getSchedule", { id: schedule.id }));
  expect(gone === "resolved" ? gone : gone.code).toBe(grpc.status.NOT_FOUND);
});

test("bad input is INVALID_ARGUMENT naming the field; no token is UNAUTHENTICATED; a reader may not change", async () => {
  const bad = await failure(call(schedules, "createSchedule", { name: "x", cron: "99 * * * *", task: { command: "true" } }));
  expect(bad === "resolved" ? bad : bad.code).toBe(grpc.status.INVALID_ARGUMENT);
  expect(bad === "resolved" ? "" : bad.message).toContain("cron");
  const zone = await failure(
    call(schedules, "createSchedule", { name: "x", cron: "* * * * *", timeZone: "No/Where", task: { command: "true" } }),
  );
  expect(zone === "resolved" ? "" : zone.message).toContain("time_zone");
  const anonymous = await failure(call(schedules, "listSchedules", {}, new grpc.Metadata()));
  expect(anonymous === "resolved" ? anonymous : anonymous.code).toBe(grpc.status.UNAUTHENTICATED);
  const denied = await failure(
    call(schedules, "createSchedule", { name: "y", every: "1m", task: { command: "true" } }, bearer(reader)),
  );
  expect(denied === "resolved" ? denied : denied.code).toBe(grpc.status.PERMISSION_DENIED);
});

// gRPC tools without the .proto files: server reflection (v1 and v1alpha) and the standard
// health service, used by a client that knows neither in advance (test/support/
// reflection-client.ts learns every type by reflection, as grpcurl does). Health follows the
// database, cut off through a proxy, and turns NOT_SERVING when the coordinator stops.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { type DescFile, equals, type JsonValue } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { service as healthServiceDefinition } from "grpc-health-check";
import { hashToken, newToken } from "../../src/auth/tokens";
import { loadConfig } from "../../src/config";
import { Coordinator } from "../../src/coordinator/coordinator";
import { ScheduleService } from "../../src/gen/taskqueue/v1/schedule_service_pb";
import { TaskService } from "../../src/gen/taskqueue/v1/task_service_pb";
import { WorkerService } from "../../src/gen/taskqueue/v1/worker_service_pb";
import { silentLogger } from "../../src/log";
import { Health } from "../../src/rpc/health";
import { freePort, HOOK_TIMEOUT_MS, TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { ReflectionClient, type ReflectionVersion } from "../support/reflection-client";
import { TcpProxy } from "../support/tcp-proxy";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
const { token } = newToken();
const bearer = () => {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
};

/** As on a fresh `bun start`: no tokens, straight to the database (the README's examples). */
let open: Coordinator;
let openAddress: string;
/** Tokens required, and its database behind a proxy that can be cut. */
let guarded: Coordinator;
let guardedInfo: { grpcAddress: string; httpUrl: string };
let proxy: TcpProxy;
const clients: ReflectionClient[] = [];

async function startCoordinator(url: string, env: Record<string, string> = {}): Promise<Coordinator> {
  const config = loadConfig({ TQ_COORDINATOR_PORT: String(await freePort()), TQ_GRPC_PORT: String(await freePort()), ...env });
  return new Coordinator(config, url, silentLogger);
}

function client(address: string, version: ReflectionVersion = "v1"): ReflectionClient {
  const reflection = new ReflectionClient(address, version);
  clients.push(reflection);
  return reflection;
}

/** The gRPC status code a call failed with (not expect().rejects: see grpc.test.ts). */
async function failure(promise: Promise<unknown>): Promise<number | "resolved"> {
  try {
    await promise;
    return "resolved";
  } catch (error) {
    return (error as grpc.ServiceError).code;
  }
}

beforeAll(async () => {
  open = await startCoordinator(db.url);
  openAddress = (await open.start()).grpcAddress;
  const target = new URL(db.url);
  proxy = await TcpProxy.start(target.hostname, Number(target.port || 5432));
  guarded = await startCoordinator(proxy.url(db.url), { TQ_API_TOKENS: `tools:read+submit:${hashToken(token)}` });
  guardedInfo = await guarded.start();
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  for (const reflection of clients) reflection.close();
  await open?.stop();
  proxy?.restore();
  await guarded?.stop();
  await proxy?.stop();
}, HOOK_TIMEOUT_MS);

/** A generated file and everything it imports, by name. */
function generatedFiles(file: DescFile, into = new Map<string, DescFile>()): Map<string, DescFile> {
  into.set(file.proto.name, file);
  for (const dependency of file.dependencies) generatedFiles(dependency, into);
  return into;
}

for (const version of ["v1", "v1alpha"] as const) {
  test(`reflection ${version} lists every service served and sends the generated descriptors, byte for byte, with no token`, async () => {
    const reflection = client(guardedInfo.grpcAddress, version);
    expect(await reflection.listServices()).toEqual(
      ["grpc.health.v1.Health", TaskService.typeName, WorkerService.typeName, ScheduleService.typeName].sort(),
    );
    for (const service of [TaskService, WorkerService, ScheduleService]) {
      const sent = await reflection.filesContaining(service.typeName);
      // The file declaring the symbol first, then all it imports (the well-known types too).
      expect(sent[0]!.name).toBe(service.file.proto.name);
      const expected = generatedFiles(service.file);
      expect(sent.map((file) => file.name).sort()).toEqual([...expected.keys()].sort());
      for (const file of sent)
        expect(equals(FileDescriptorProtoSchema, file, expected.get(file.name)!.proto), file.name).toBe(true);
    }
    expect(await failure(reflection.filesContaining("taskqueue.v1.NoSuchService"))).toBe(grpc.status.NOT_FOUND);
  });
}

test("a client that learnt TaskService by reflection submits, gets and lists tasks; the calls still need the token", async () => {
  const reflection = client(guardedInfo.grpcAddress);
  const service = await reflection.service(TaskService.typeName);
  expect(service.methods.map((method) => method.name)).toEqual(TaskService.methods.map((method) => method.name));

  expect(await failure(reflection.unary("taskqueue.v1.TaskService/ListTasks", {}))).toBe(grpc.status.UNAUTHENTICATED);
  const submitted = (await reflection.unary(
    "taskqueue.v1.TaskService/SubmitTask",
    { command: "echo by reflection", maxAttempts: 2, env: { GREETING: "hi" } },
    bearer(),
  )) as { task: { id: string; command: string; maxAttempts: number; state: string }; created: boolean };
  expect(submitted.created).toBe(true);
  expect(submitted.task).toMatchObject({ command: "echo by reflection", maxAttempts: 2, state: "TASK_STATE_QUEUED" });

  const got = (await reflection.unary("taskqueue.v1.TaskService/GetTask", { id: submitted.task.id }, bearer())) as {
    task: { id: string; env: Record<string, string> };
  };
  expect(got.task.id).toBe(submitted.task.id);
  expect(got.task.env).toEqual({ GREETING: "hi" });
  const listed = (await reflection.unary(
    "taskqueue.v1.TaskService/ListTasks",
    { state: "TASK_STATE_QUEUED", limit: 50 },
    bearer(),
  )) as { tasks: { id: string }[] };
  expect(listed.tasks.map((task) => task.id)).toContain(submitted.task.id);
  expect(await failure(reflection.unary("taskqueue.v1.TaskService/GetTask", { id: "not-a-uuid" }, bearer()))).toBe(
    grpc.status.INVALID_ARGUMENT,
  );
});

test("health, learnt by reflection, is SERVING for the server and each service, with no token", async () => {
  const reflection = client(guardedInfo.grpcAddress, "v1alpha");
  for (const name of ["", TaskService.typeName, WorkerService.typeName, ScheduleService.typeName]) {
    expect(await reflection.unary("grpc.health.v1.Health/Check", { service: name })).toEqual({ status: "SERVING" });
  }
  expect(await failure(reflection.unary("grpc.health.v1.Health/Check", { service: "no.such.Service" }))).toBe(
    grpc.status.NOT_FOUND,
  );
  expect(await reflection.unary("grpc.health.v1.Health/List")).toEqual({
    statuses: Object.fromEntries(
      ["", TaskService.typeName, WorkerService.typeName, ScheduleService.typeName].map((name) => [name, { status: "SERVING" }]),
    ),
  });
  const watch = await reflection.stream("grpc.health.v1.Health/Watch", { service: "no.such.Service" });
  expect(await watch.next()).toEqual({ status: "SERVICE_UNKNOWN" });
  watch.cancel();
});

test("the health service reflection describes is the one grpc-health-check serves", () => {
  const served = Object.values(healthServiceDefinition).map((method) => [method.path, method.responseStream]);
  const described = Health.methods.map((method) => [
    `/${Health.typeName}/${method.name}`,
    method.methodKind === "server_streaming",
  ]);
  expect(served).toEqual(described);
});

test("health follows the database: Watch streams NOT_SERVING while it is unreachable, then SERVING again", async () => {
  const reflection = client(guardedInfo.grpcAddress);
  const watch = await reflection.stream("grpc.health.v1.Health/Watch", { service: TaskService.typeName });
  expect(await watch.next()).toEqual({ status: "SERVING" });

  proxy.cut();
  expect(await watch.next()).toEqual({ status: "NOT_SERVING" });
  expect(await reflection.unary("grpc.health.v1.Health/Check", { service: "" })).toEqual({ status: "NOT_SERVING" });
  // The same answer as /readyz.
  expect((await fetch(`${guardedInfo.httpUrl}/readyz`)).status).toBe(503);
  // Reflection needs no database.
  expect(await reflection.listServices()).toContain(TaskService.typeName);

  proxy.restore();
  expect(await watch.next()).toEqual({ status: "SERVING" });
  expect((await fetch(`${guardedInfo.httpUrl}/readyz`)).status).toBe(200);
  watch.cancel();
  expect(await watch.end).toBe(grpc.status.CANCELLED);
});

test("stopping the coordinator turns health NOT_SERVING and ends Watch streams itself", async () => {
  const reflection = client(guardedInfo.grpcAddress);
  const watch = await reflection.stream("grpc.health.v1.Health/Watch", { service: "" });
  expect(await watch.next()).toEqual({ status: "SERVING" });
  const stopped = guarded.stop();
  expect(await watch.next()).toEqual({ status: "NOT_SERVING" });
  // OK, not the CANCELLED or UNAVAILABLE of the forced shutdown that an open stream would meet.
  expect(await watch.end).toBe(grpc.status.OK);
  await stopped;
  guarded = undefined as unknown as Coordinator;
});

// --- The README's grpcurl lines, replayed by the reflection client ---------------------------

/** Splits a shell line into words: single quotes, no escapes; `#` starts a comment. */
function shellWords(line: string): { words: string[]; comment: string } {
  const words: string[] = [];
  let rest = line.trim();
  while (rest.length > 0 && !rest.startsWith("#")) {
    const match = /^'([^']*)'\s*|^(\S+)\s*/.exec(rest)!;
    words.push(match[1] ?? match[2]!);
    rest = rest.slice(match[0].length);
  }
  return { words, comment: rest.replace(/^#\s*/, "") };
}

test("the README's grpcurl examples work as printed", async () => {
  const readme = readFileSync(join(import.meta.dir, "../../README.md"), "utf8");
  const lines = readme.split("\n");
  const examples = lines.flatMap((line, index) => (line.startsWith("grpcurl ") ? [index] : []));
  expect(examples.length).toBeGreaterThanOrEqual(4);
  const reflection = client(openAddress);
  let taskId: string | null = null;
  const seen = new Set<string>();
  for (const index of examples) {
    const { words, comment } = shellWords(lines[index]!);
    expect(words.slice(0, 2), lines[index]).toEqual(["grpcurl", "-plaintext"]);
    let data: JsonValue = {};
    const metadata = new grpc.Metadata();
    let at = 2;
    for (; words[at]!.startsWith("-"); at += 2) {
      if (words[at] === "-d") data = JSON.parse(words[at + 1]!.replace("TASK_ID", taskId ?? "TASK_ID"));
      else if (words[at] === "-H") metadata.set(...(words[at + 1]!.split(/:\s*/, 2) as [string, string]));
      else throw new Error(`unknown grpcurl flag ${words[at]}`);
    }
    expect(words[at]).toBe("localhost:50051");
    const [verb, symbol] = words.slice(at + 1);
    seen.add(verb!.includes("/") ? "call" : verb!);
    if (verb === "list") {
      // The names printed are the comment lines that follow.
      const printed: string[] = [];
      for (let next = index + 1; lines[next]!.startsWith("# "); next++) printed.push(lines[next]!.slice(2));
      expect(printed.length).toBeGreaterThan(0);
      expect(await reflection.listServices()).toEqual(printed);
    } else if (verb === "describe") {
      expect((await reflection.filesContaining(symbol!)).length).toBeGreaterThan(0);
    } else if (verb!.endsWith("/Watch") || verb!.endsWith("/TailLogs")) {
      const watch = await reflection.stream(verb!, data, metadata);
      const first = await watch.next();
      if (comment.startsWith("{")) expect(first).toEqual(JSON.parse(comment));
      watch.cancel();
    } else {
      const response = (await reflection.unary(verb!, data, metadata)) as { task?: { id: string } };
      if (comment.startsWith("{")) expect(response).toEqual(JSON.parse(comment));
      if (verb!.endsWith("/SubmitTask")) taskId = response.task!.id;
    }
  }
  expect([...seen].sort()).toEqual(["call", "describe", "list"]);
  expect(taskId).not.toBeNull();
});

// The OpenAPI document is one a generator can use: valid by Redocly's recommended rules, every
// served route documented (and nothing else), every schema named and referenced, every error
// answered with the Error schema.
import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { createConfig, lintFromString } from "@redocly/openapi-core";
import { createApp } from "../../src/api/index";
import { HTTP_ERROR_CODES } from "../../src/api/model";
import { apiSettings, loadConfig } from "../../src/config";
import { insertTask } from "../../src/db/insert";
import { TaskChangeFeed } from "../../src/db/notify";
import { silentLogger } from "../../src/log";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { openAuth } from "../support/factories";

setDefaultTimeout(TEST_TIMEOUT_MS);

const db = useTestDatabase();
let app: ReturnType<typeof createApp>;
let doc: any;

beforeAll(async () => {
  app = createApp({
    role: "coordinator",
    settings: apiSettings(loadConfig({})),
    sql: db.sql,
    feed: new TaskChangeFeed(db.sql),
    log: silentLogger,
    auth: openAuth,
    submit: (id, spec) => insertTask(db.sql, id, spec),
  });
  const response = await app.handle(new Request("http://localhost/openapi/json"));
  expect(response.status).toBe(200);
  doc = await response.json();
});

const METHODS = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

/** Every operation of the document, as [method, path, operation]. */
function operations(): [string, string, any][] {
  return Object.entries(doc.paths).flatMap(([path, item]: [string, any]) =>
    Object.entries(item)
      .filter(([method]) => METHODS.includes(method))
      .map(([method, operation]) => [method, path, operation] as [string, string, any]),
  );
}

/** Follows a local `$ref`; fails the test if it points nowhere. */
function resolve(ref: string): any {
  expect(ref).toStartWith("#/");
  const target = ref
    .slice(2)
    .split("/")
    .reduce((node: any, key) => node?.[key.replace(/~1/g, "/").replace(/~0/g, "~")], doc);
  expect(target, ref).toBeDefined();
  return target;
}

function allRefs(node: unknown, out: string[] = []): string[] {
  if (Array.isArray(node)) for (const item of node) allRefs(item, out);
  else if (typeof node === "object" && node !== null) {
    for (const [key, value] of Object.entries(node)) {
      if (key === "$ref" && typeof value === "string") out.push(value);
      else allRefs(value, out);
    }
  }
  return out;
}

describe("the OpenAPI document", () => {
  test("passes Redocly's recommended rules with no error, and only the known warnings", async () => {
    const config = await createConfig({ extends: ["recommended"] });
    const problems = await lintFromString({ source: JSON.stringify(doc), absoluteRef: "/openapi.json", config });
    const describe = (p: (typeof problems)[number]) => `${p.severity} ${p.ruleId} ${p.location[0]?.pointer}: ${p.message}`;
    expect(problems.filter((p) => p.severity === "error").map(describe)).toEqual([]);
    // The project has chosen no license; health checks have no client error to answer.
    expect(problems.map((p) => `${p.ruleId} ${p.location[0]?.pointer}`).sort()).toEqual([
      "info-license #/info",
      "operation-4xx-response #/paths/~1healthz/get/responses",
      "operation-4xx-response #/paths/~1readyz/get/responses",
    ]);
  });

  test("documents every route the app serves, and only those", () => {
    const served = app.routes
      // The reference page and the dashboard (src/ui) are pages, not operations.
      .filter((route) => !route.path.startsWith("/openapi") && !route.path.startsWith("/ui"))
      .map((route) => `${route.method.toLowerCase()} ${route.path.replace(/:([^/]+)/g, "{$1}")}`)
      .sort();
    const documented = operations()
      .map(([method, path]) => `${method} ${path}`)
      .sort();
    expect(served.length).toBeGreaterThan(10);
    expect(documented).toEqual(served);
  });

  test("every operation has a unique, readable operationId, a summary and a tag", () => {
    const ids = operations().map(([, , operation]) => operation.operationId);
    expect(new Set(ids).size).toBe(ids.length);
    for (const id of ids) expect(id).toMatch(/^[a-z][A-Za-z]+$/);
    for (const [, , operation] of operations()) {
      expect(operation.summary).toBeString();
      expect(operation.tags?.length).toBeGreaterThan(0);
    }
    const byRoute = Object.fromEntries(
      operations().map(([method, path, operation]) => [`${method} ${path}`, operation.operationId]),
    );
    expect(byRoute).toMatchObject({
      "post /schedule": "scheduleTask",
      "get /status": "getStatus",
      "post /submit": "runTask",
      "post /tasks": "submitTask",
      "post /tasks/batch": "submitTasks",
      "get /tasks": "listTasks",
      "get /tasks/{id}": "getTask",
      "post /tasks/{id}/cancel": "cancelTask",
      "get /tasks/{id}/events": "watchTask",
      "get /workers": "listWorkers",
      "get /healthz": "healthz",
      "get /readyz": "readyz",
    });
  });

  test("every request body and every answer refers to a named schema; every error to Error", () => {
    // The routes that read a body are those with a parser.
    const withBody = new Set(
      app.routes
        .filter((route) => (route.hooks as { parse?: unknown[] }).parse?.length)
        .map((route) => `${route.method.toLowerCase()} ${route.path.replace(/:([^/]+)/g, "{$1}")}`),
    );
    expect(withBody.size).toBeGreaterThanOrEqual(4);
    for (const [method, path, operation] of operations()) {
      const where = `${method} ${path}`;
      expect(operation.requestBody !== undefined, where).toBe(withBody.has(where));
      if (withBody.has(where)) {
        expect(operation.requestBody?.required, where).toBe(true);
        expect(Object.keys(operation.requestBody.content), where).toEqual(["application/json"]);
        expect(operation.requestBody.content["application/json"].schema.$ref, where).toStartWith("#/components/schemas/");
      }
      const statuses = Object.keys(operation.responses);
      expect(
        statuses.some((s) => s.startsWith("2")),
        where,
      ).toBe(true);
      for (const [status, response] of Object.entries(operation.responses) as [string, any][]) {
        expect(response.description, `${where} ${status}`).toBeString();
        // Only a 204 answers without a body.
        if (status === "204") {
          expect(response.content, `${where} ${status}`).toBeUndefined();
          continue;
        }
        const [media] = Object.keys(response.content);
        const schema = response.content[media!].schema;
        expect(schema.$ref, `${where} ${status}`).toStartWith("#/components/schemas/");
        if (Number(status) >= 400) {
          expect(media).toBe("application/json");
          expect(schema.$ref, `${where} ${status}`).toBe("#/components/schemas/Error");
        }
      }
    }
    for (const ref of allRefs(doc)) resolve(ref);
    // Nested uses are references too, not copies.
    expect(doc.components.schemas.TaskList.properties.tasks.items).toEqual({ $ref: "#/components/schemas/Task" });
    expect(doc.components.schemas.BatchInput.properties.tasks.items).toEqual({ $ref: "#/components/schemas/BatchItemInput" });
    expect(doc.components.schemas.Task.properties.state).toEqual({ $ref: "#/components/schemas/TaskState" });
    expect(JSON.stringify(doc)).not.toContain('"$id"');
  });

  test("names the schemas clients use, the inputs included", () => {
    expect(Object.keys(doc.components.schemas)).toEqual(
      expect.arrayContaining([
        "Task",
        "TaskState",
        "TaskList",
        "TaskBatch",
        "TaskEvent",
        "Status",
        "Worker",
        "WorkerList",
        "Error",
        "ErrorCode",
        "TaskInput",
        "SubmitInput",
        "ScheduleInput",
        "BatchInput",
      ]),
    );
    // Every named schema is used somewhere.
    const used = new Set(allRefs({ paths: doc.paths, schemas: doc.components.schemas }));
    for (const name of Object.keys(doc.components.schemas)) expect(used.has(`#/components/schemas/${name}`), name).toBe(true);
  });

  test("authenticated routes document 401, 403, 429, 500 and 503; body routes 400, 413 and 415", () => {
    for (const [method, path, operation] of operations()) {
      const statuses = Object.keys(operation.responses);
      const open = Array.isArray(operation.security) && operation.security.length === 0;
      if (!open) expect(statuses, `${method} ${path}`).toEqual(expect.arrayContaining(["401", "403", "429", "500", "503"]));
      if (open) expect(["/healthz", "/readyz"]).toContain(path);
      if (operation.requestBody) expect(statuses, `${method} ${path}`).toEqual(expect.arrayContaining(["400", "413", "415"]));
      if (path.includes("{id}")) expect(statuses, `${method} ${path}`).toEqual(expect.arrayContaining(["400", "404"]));
    }
    expect(Object.keys(doc.paths["/readyz"].get.responses)).toContain("503");
  });

  test("documents the response headers: Location, Idempotent-Replayed, Retry-After, WWW-Authenticate", () => {
    for (const path of ["/tasks", "/submit"]) {
      const responses = doc.paths[path].post.responses;
      expect(responses["201"].headers.Location.schema.type).toBe("string");
      expect(responses["200"].headers["Idempotent-Replayed"].schema).toEqual({ const: "true", type: "string" });
    }
    expect(doc.paths["/schedule"].post.responses["200"].headers["Idempotent-Replayed"]).toBeDefined();
    expect(doc.paths["/tasks/batch"].post.responses["200"].headers["Idempotent-Replayed"]).toBeDefined();
    for (const [, , operation] of operations()) {
      if (operation.responses["429"]) expect(operation.responses["429"].headers["Retry-After"].schema.type).toBe("integer");
      if (operation.responses["503"]) expect(operation.responses["503"].headers["Retry-After"].schema.type).toBe("integer");
      if (operation.responses["401"])
        expect(operation.responses["401"].headers["WWW-Authenticate"].description).toContain("Bearer");
    }
  });

  test("has servers, uuid ids, the error codes as an enum, and /schedule requiring scheduled_at", () => {
    expect(doc.openapi).toMatch(/^3\.1\./);
    expect(doc.servers).toEqual([{ url: "/", description: expect.any(String) }]);
    expect(doc.components.schemas.Task.properties.id.format).toBe("uuid");
    expect(doc.components.schemas.Status.properties.task_id.format).toBe("uuid");
    expect(doc.paths["/tasks/{id}"].get.parameters).toEqual([
      { name: "id", in: "path", required: true, schema: expect.objectContaining({ type: "string", format: "uuid" }) },
    ]);
    expect(doc.paths["/status"].get.parameters[0]).toMatchObject({ name: "task_id", required: true, schema: { format: "uuid" } });
    const codes = doc.components.schemas.ErrorCode;
    expect(codes.type).toBe("string");
    expect(codes.enum).toEqual([...HTTP_ERROR_CODES]);
    for (const code of [
      "invalid_argument",
      "invalid_json",
      "not_found",
      "internal",
      "unsupported_media_type",
      "method_not_allowed",
    ]) {
      expect(codes.enum).toContain(code);
    }
    expect(doc.components.schemas.Error.properties.error.properties.code).toEqual({ $ref: "#/components/schemas/ErrorCode" });
    const schedule = doc.components.schemas.ScheduleInput;
    expect(schedule.required).toEqual(["command", "scheduled_at"]);
    expect(schedule.properties.schedule_at.deprecated).toBe(true);
    expect(doc.paths["/schedule"].post.requestBody.content["application/json"].schema).toEqual({
      $ref: "#/components/schemas/ScheduleInput",
    });
  });

  test("answers a malformed id with the usual JSON error naming it", async () => {
    for (const url of ["/tasks/not-a-uuid", "/status?task_id=nope"]) {
      const response = await app.handle(new Request(`http://localhost${url}`));
      expect(response.status).toBe(400);
      const body: any = await response.json();
      expect(body.error.code).toBe("invalid_argument");
      expect(body.error.message).toMatch(/UUID/);
    }
  });
});

describe("the reference page's files", () => {
  test("come from the role: the page at /openapi and /openapi/, Swagger UI's files, and nothing else", async () => {
    const get = (path: string) => app.handle(new Request(`http://localhost${path}`));
    for (const path of ["/openapi", "/openapi/"]) {
      const page = await get(path);
      expect(page.status).toBe(200);
      expect(page.headers.get("content-type")).toStartWith("text/html");
      expect(page.headers.get("content-security-policy")).toContain("script-src 'self'");
      const html = await page.text();
      const sources = [...html.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1]!);
      expect(sources.length).toBe(4);
      for (const source of sources) {
        expect(source).toStartWith("/openapi/");
        const asset = await get(source);
        expect(asset.status, source).toBe(200);
        expect((await asset.arrayBuffer()).byteLength, source).toBeGreaterThan(100);
      }
    }
    expect((await get("/openapi/swagger-ui-bundle.js")).headers.get("content-type")).toContain("javascript");
    expect((await get("/openapi/swagger-ui.css")).headers.get("content-type")).toContain("text/css");
    const missing = await get("/openapi/..%2Fpackage.json");
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as any).error.code).toBe("not_found");
  });
});

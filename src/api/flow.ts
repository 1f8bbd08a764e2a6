// Flow control in the HTTP API: the named rate limits (`/rate-limits`, their schemas and
// operations) and what a submit does for flow control (the checks before the insert, the
// concurrency strategies after it, a queued task's waiting reason). The routes are served by
// both roles (createApp); the rules are src/task/flow.ts, the SQL src/db/flow.ts.
import { Elysia, status, t } from "elysia";
import {
  applyKeyStrategies,
  createRateLimit,
  deleteRateLimit,
  existingRateLimits,
  flowWaitOf,
  getRateLimit,
  listRateLimits,
  updateRateLimit,
} from "../db/flow";
import { cancelTask } from "../db/transitions";
import { conflict, invalidArgument, notFound } from "../task/errors";
import { checkSchema } from "../task/explain";
import {
  type ConcurrencyStrategy,
  checkRateLimitName,
  describeWait,
  needsSchedule,
  nextTokenInMs,
  parseRate,
} from "../task/flow";
import type { Task, TaskSpec } from "../task/task";
import type { ApiDeps } from "./deps";
import { readJsonBody } from "./errors";
import { RateLimitInput, RateLimitJson, RateLimitList, RateLimitPatch, rateLimitJson } from "./flow-model";
import { answer, BODY_ERRORS, jsonRequestBody, responses } from "./openapi";

const NameParams = t.Object({ name: t.String({ description: "The limit's name." }) });

function requireName(name: string): void {
  checkRateLimitName(name, "name");
}

const notFoundLimit = { 404: "No rate limit by that name (not_found)." };

export function rateLimitsController(deps: ApiDeps) {
  const body = ({ request }: { request: Request }) => readJsonBody(request, deps.settings.maxBodyBytes);
  return new Elysia({ normalize: false })
    .post(
      "/rate-limits",
      async ({ body: raw, set }) => {
        const input = checkSchema(RateLimitInput, raw);
        const rate = parseRate(input.rate, "rate");
        const row = await createRateLimit(deps.sql, input.name, rate, input.burst ?? rate.count);
        if (!row) throw conflict(`rate limit ${input.name} already exists; PATCH /rate-limits/${input.name} changes it`);
        set.headers.location = `/rate-limits/${row.name}`;
        return status(201, rateLimitJson(row));
      },
      {
        parse: [body, "json"],
        response: responses({ 201: answer(RateLimitJson, "The limit, created.") }, [...BODY_ERRORS, 409], {
          409: "A limit by that name exists (conflict).",
        }),
        detail: {
          operationId: "createRateLimit",
          tags: ["rate-limits"],
          summary: "Create a rate limit",
          description:
            "Tasks naming it (`rate_limit`) each take a token when dispatched; a task without one stays queued, saying " +
            "when the next token comes.",
          requestBody: jsonRequestBody(RateLimitInput),
        },
      },
    )
    .get("/rate-limits", async () => ({ rate_limits: (await listRateLimits(deps.sql)).map(rateLimitJson) }), {
      response: responses({ 200: answer(RateLimitList, "Every rate limit, by name.") }, []),
      detail: { operationId: "listRateLimits", tags: ["rate-limits"], summary: "List rate limits" },
    })
    .get(
      "/rate-limits/:name",
      async ({ params }) => {
        requireName(params.name);
        const row = await getRateLimit(deps.sql, params.name);
        if (!row) throw notFound(`rate limit ${params.name} not found`);
        return rateLimitJson(row);
      },
      {
        params: NameParams,
        response: responses({ 200: answer(RateLimitJson, "The limit.") }, [400, 404], notFoundLimit),
        detail: { operationId: "getRateLimit", tags: ["rate-limits"], summary: "Get a rate limit" },
      },
    )
    .patch(
      "/rate-limits/:name",
      async ({ params, body: raw }) => {
        requireName(params.name);
        const input = checkSchema(RateLimitPatch, raw);
        const row = await updateRateLimit(deps.sql, params.name, {
          ...(input.rate === undefined ? {} : { rate: parseRate(input.rate, "rate") }),
          ...(input.burst === undefined ? {} : { burst: input.burst }),
        });
        if (!row) throw notFound(`rate limit ${params.name} not found`);
        return rateLimitJson(row);
      },
      {
        params: NameParams,
        parse: [body, "json"],
        response: responses({ 200: answer(RateLimitJson, "The limit, changed.") }, [...BODY_ERRORS, 404], notFoundLimit),
        detail: {
          operationId: "updateRateLimit",
          tags: ["rate-limits"],
          summary: "Change a rate limit",
          requestBody: jsonRequestBody(RateLimitPatch),
        },
      },
    )
    .delete(
      "/rate-limits/:name",
      async ({ params }) => {
        requireName(params.name);
        const row = await deleteRateLimit(deps.sql, params.name);
        if (!row) throw notFound(`rate limit ${params.name} not found`);
        return rateLimitJson(row);
      },
      {
        params: NameParams,
        response: responses(
          { 200: answer(RateLimitJson, "The limit, deleted: tasks naming it now run unlimited.") },
          [400, 404],
          notFoundLimit,
        ),
        detail: { operationId: "deleteRateLimit", tags: ["rate-limits"], summary: "Delete a rate limit" },
      },
    );
}

/**
 * A submit's flow checks, before anything is written: a `{schedule}` key only from a
 * schedule, and a rate limit that exists. `field` names each spec for the error (batch items).
 */
export async function checkFlowSpecs(deps: ApiDeps, specs: readonly TaskSpec[], field: (i: number, name: string) => string) {
  specs.forEach((spec, i) => {
    if ((spec as { firing?: unknown }).firing === undefined && needsSchedule(spec.concurrency, spec.rateLimit)) {
      const name = spec.concurrency?.key.includes("{schedule}") ? "concurrency.key" : "rate_limit";
      throw invalidArgument(field(i, name), `${field(i, name)}: {schedule} is filled in only for a schedule's tasks`);
    }
  });
  const names = [...new Set(specs.flatMap((spec) => (spec.rateLimit ? [spec.rateLimit.name] : [])))];
  if (names.length === 0) return;
  const known = await existingRateLimits(deps.sql, names);
  const i = specs.findIndex((spec) => spec.rateLimit && !known.has(spec.rateLimit.name));
  if (i >= 0) {
    const name = specs[i]!.rateLimit!.name;
    throw invalidArgument(
      field(i, "rate_limit"),
      `${field(i, "rate_limit")}: no rate limit named ${name}; create it with POST /rate-limits`,
    );
  }
}

/**
 * After the insert: the strategies of keys that are full. `cancel_newest` cancels the new task
 * (returned in its place); `cancel_in_progress` cancels the oldest live task of its key
 * through the cancel path (its coordinator stops the process group), which frees the slot the
 * new one then takes.
 */
export async function applyStrategies(deps: ApiDeps, tasks: Task[], actor: string): Promise<Task[]> {
  const keyed = tasks.flatMap((task) =>
    task.state === "queued" && task.concurrency_key && task.concurrency_strategy && task.concurrency_strategy !== "queue"
      ? [
          {
            id: task.id,
            key: task.concurrency_key,
            max: task.concurrency_max ?? 1,
            strategy: task.concurrency_strategy as ConcurrencyStrategy,
          },
        ]
      : [],
  );
  if (keyed.length === 0) return tasks;
  const { cancelled, toCancel } = await applyKeyStrategies(deps.sql, keyed);
  for (const { id, key } of toCancel) {
    const outcome = await cancelTask(deps.sql, id, actor);
    if (outcome.kind === "cancelled") {
      deps.log.info({ event: "flow.cancelled_in_progress", task_id: id, key }, "cancelled the oldest live task of a full key");
    }
  }
  const byId = new Map(cancelled.map((task) => [task.id, task as Task]));
  return tasks.map((task) => byId.get(task.id) ?? task);
}

/**
 * What flow control holds a queued task back for (kind key_full or rate_limit), or null. A
 * reason another rule already gave (routing's) is kept: the first that holds wins.
 */
export async function withFlowWaiting(deps: Pick<ApiDeps, "sql">, task: Task): Promise<Task> {
  if (task.state !== "queued" || task.waiting || (!task.concurrency_key && !task.rate_limit)) return task;
  const row = await flowWaitOf(deps.sql, task.id);
  if (!row) return task;
  const max = task.concurrency_max ?? 1;
  if (task.concurrency_key && row.key_live !== null && row.key_live >= max) {
    const wait = { kind: "concurrency", key: task.concurrency_key, live: row.key_live, max } as const;
    return { ...task, waiting: { kind: "key_full", message: describeWait(wait) } };
  }
  if (
    task.rate_limit &&
    row.bucket_tokens !== null &&
    row.rate_count !== null &&
    row.period_ms !== null &&
    row.bucket_tokens < 1
  ) {
    const nextInMs = nextTokenInMs({ tokens: row.bucket_tokens, atMs: 0 }, { count: row.rate_count, periodMs: row.period_ms });
    const wait = { kind: "rate_limit", name: task.rate_limit, key: task.rate_limit_key ?? "", nextInMs } as const;
    return { ...task, waiting: { kind: "rate_limit", message: describeWait(wait) } };
  }
  return task;
}

// The queues controller: GET /queues, PATCH /queues/:name, POST /queues/:name/pause|resume, on
// both HTTP ports. Reads need the read scope, changes the admin scope (src/api/auth.ts).
import { Elysia } from "elysia";
import { listQueues, setQueueLimit, setQueuePaused } from "../db/queues";
import { notFound } from "../task/errors";
import { parseQueueName } from "../task/routing";
import type { ApiDeps } from "./deps";
import { readJsonBody } from "./errors";
import { answer, BODY_ERRORS, responses } from "./openapi";
import { QueueJson, QueueList, QueueParams, QueuePatch, queueJson } from "./queues-model";

async function queueOrThrow(deps: ApiDeps, name: string) {
  const [row] = await listQueues(deps.sql, name);
  if (!row) throw notFound(`queue ${name} not found`);
  return queueJson(row);
}

export function queuesController(deps: ApiDeps) {
  const change = (summary: string, operationId: string, description: string) => ({
    params: QueueParams,
    response: responses({ 200: answer(QueueJson, "The queue, changed.") }, [400]),
    detail: { operationId, tags: ["queues"], summary, description },
  });
  return new Elysia({ normalize: false })
    .get("/queues", async () => ({ queues: (await listQueues(deps.readSql ?? deps.sql)).map(queueJson) }), {
      response: responses({ 200: answer(QueueList, "Every queue, with its depth by state and running count.") }, []),
      detail: { operationId: "listQueues", tags: ["queues"], summary: "List queues" },
    })
    .patch(
      "/queues/:name",
      async ({ params, body }) => {
        const name = parseQueueName(params.name);
        await setQueueLimit(deps.sql, name, body.concurrency_limit);
        return queueOrThrow(deps, name);
      },
      {
        parse: [({ request }: { request: Request }) => readJsonBody(request, deps.settings.maxBodyBytes), "json" as const],
        body: QueuePatch,
        params: QueueParams,
        response: responses({ 200: answer(QueueJson, "The queue, changed (created if it did not exist).") }, [...BODY_ERRORS]),
        detail: {
          operationId: "updateQueue",
          tags: ["queues"],
          summary: "Set a queue's concurrency limit",
          description: "The limit holds across every worker and coordinator; null removes it.",
        },
      },
    )
    .post(
      "/queues/:name/pause",
      async ({ params }) => {
        const name = parseQueueName(params.name);
        await setQueuePaused(deps.sql, name, true);
        return queueOrThrow(deps, name);
      },
      change("Pause a queue", "pauseQueue", "Its queued tasks stay queued (and say so); those running carry on."),
    )
    .post(
      "/queues/:name/resume",
      async ({ params }) => {
        const name = parseQueueName(params.name);
        await setQueuePaused(deps.sql, name, false);
        return queueOrThrow(deps, name);
      },
      change("Resume a queue", "resumeQueue", "Its due tasks are dispatched at once."),
    );
}

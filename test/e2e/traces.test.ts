// OpenTelemetry traces across real roles: a traceparent sent with a submit is the parent of
// the scheduler's or coordinator's `persist` span, whose child is the coordinator's `dispatch`,
// whose child is the worker's `run`; the command's TRACEPARENT names the run span. The spans
// are received by an OTLP/HTTP (JSON) receiver in this process.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { TEST_TIMEOUT_MS, useTestDatabase } from "../support/db";
import { eventually } from "../support/eventually";
import { watchTask } from "../support/http";
import { type Cluster, startCluster } from "../support/processes";

setDefaultTimeout(TEST_TIMEOUT_MS);

interface ReceivedSpan {
  service: string;
  name: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
}

const db = useTestDatabase();
const spans: ReceivedSpan[] = [];
let receiver: ReturnType<typeof Bun.serve>;
let cluster: Cluster;

beforeAll(async () => {
  receiver = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(request) {
      if (request.method !== "POST" || new URL(request.url).pathname !== "/v1/traces") return new Response(null, { status: 404 });
      expect(request.headers.get("content-type")).toStartWith("application/json");
      const body = (await request.json()) as any;
      for (const resourceSpans of body.resourceSpans ?? []) {
        const service = resourceSpans.resource?.attributes?.find((a: any) => a.key === "service.name")?.value?.stringValue;
        for (const scope of resourceSpans.scopeSpans ?? []) {
          for (const span of scope.spans ?? []) {
            spans.push({
              service,
              name: span.name,
              traceId: span.traceId,
              spanId: span.spanId,
              parentSpanId: span.parentSpanId ?? "",
            });
          }
        }
      }
      return Response.json({});
    },
  });
  cluster = await startCluster(db.url, {
    workers: 1,
    // The SDK's own batch setting (it reads OTEL_BSP_*): spans leave within 50 ms, not 5 s.
    env: { OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${receiver.port}`, OTEL_BSP_SCHEDULE_DELAY: "50" },
  });
});
afterAll(async () => {
  await cluster.stop();
  await receiver.stop(true);
});

const CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN = "00f067aa0ba902b7";

async function submitTraced(url: string): Promise<string> {
  const response = await fetch(`${url}/submit`, {
    method: "POST",
    headers: { "content-type": "application/json", traceparent: `00-${CALLER_TRACE}-${CALLER_SPAN}-01` },
    body: JSON.stringify({ command: 'printf %s "$TRACEPARENT"' }),
  });
  expect(response.status).toBe(201);
  return ((await response.json()) as { id: string }).id;
}

for (const role of ["coordinator", "scheduler"] as const) {
  test(`a submit to the ${role} links persist -> dispatch -> run under the caller's trace, and TRACEPARENT names the run`, async () => {
    const id = await submitTraced(role === "coordinator" ? cluster.coordinatorUrl : cluster.schedulerUrl);
    const done = await watchTask(cluster.coordinatorUrl, id);
    expect(done.state).toBe("succeeded");
    const tree = await eventually(
      () => {
        const persist = spans.find(
          (s) => s.name === "persist" && s.parentSpanId === CALLER_SPAN && s.service === `task-queue-${role}`,
        );
        const dispatch = persist && spans.find((s) => s.name === "dispatch" && s.parentSpanId === persist.spanId);
        const run = dispatch && spans.find((s) => s.name === "run" && s.parentSpanId === dispatch.spanId);
        return run ? { persist: persist!, dispatch: dispatch!, run } : null;
      },
      { what: "the persist, dispatch and run spans", timeoutMs: 10_000 },
    );
    for (const span of Object.values(tree)) expect(span.traceId).toBe(CALLER_TRACE);
    expect(tree.dispatch.service).toBe("task-queue-coordinator");
    expect(tree.run.service).toBe("task-queue-worker");
    expect(done.stdout).toBe(`00-${CALLER_TRACE}-${tree.run.spanId}-01`);
  });
}

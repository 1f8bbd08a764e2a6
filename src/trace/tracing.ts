// OpenTelemetry traces, off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (src/config.ts,
// `tracingOptions`). Each role makes its own provider (never the global one: the all-in-one
// process runs three roles), exporting OTLP/HTTP in batches. Off, a role holds no `Tracing` at
// all and every call site is one null check: no span, no allocation.
//
// A task's trace: the submit's `persist` span (a child of the caller's traceparent, when it
// sent one) is stored with the task; the coordinator's `dispatch` span is its child and its
// traceparent travels in Assign; the worker's `run` span is the dispatch span's child and
// lasts the attempt; the command gets TRACEPARENT naming the run span, so its own spans are
// children of the run.
import { type Attributes, ROOT_CONTEXT, type Span, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, BatchSpanProcessor } from "@opentelemetry/sdk-trace-base";
import pkg from "../../package.json" with { type: "json" };
import { formatTraceparent, parseTraceparent } from "./traceparent";

/** The longest a role's stop waits for its last spans to be exported. */
const STOP_TIMEOUT_MS = 2000;

export interface TracingOptions {
  /** OTEL_EXPORTER_OTLP_ENDPOINT: the collector's base URL; spans go to `<it>/v1/traces`. */
  endpoint: string;
  /** The role, part of the service name (`task-queue-<role>`). */
  role: "coordinator" | "scheduler" | "worker";
}

/** One open span and the traceparent that names it. */
export interface OpenSpan {
  readonly traceparent: string;
  end(error?: string | null, attributes?: Attributes): void;
}

export class Tracing {
  private readonly provider: BasicTracerProvider;
  private readonly tracer;

  constructor(options: TracingOptions) {
    const url = `${options.endpoint.replace(/\/+$/, "")}/v1/traces`;
    this.provider = new BasicTracerProvider({
      resource: resourceFromAttributes({
        "service.name": `task-queue-${options.role}`,
        "service.version": pkg.version,
      }),
      spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url }))],
    });
    this.tracer = this.provider.getTracer("task-queue", pkg.version);
  }

  /** Starts a span, the child of `parent` (a traceparent) when it is valid, else a new trace's root. */
  start(name: string, parent: string | null | undefined, attributes: Attributes, kind = SpanKind.INTERNAL): OpenSpan {
    const context = parent ? parentContext(parent) : ROOT_CONTEXT;
    const span = this.tracer.startSpan(name, { kind, attributes }, context);
    return openSpan(span);
  }

  /** Runs `work` in a span that ends with it (in error when it throws). */
  async around<T>(
    name: string,
    parent: string | null | undefined,
    attributes: Attributes,
    work: (span: OpenSpan) => Promise<T>,
  ): Promise<T> {
    const span = this.start(name, parent, attributes, SpanKind.SERVER);
    try {
      const result = await work(span);
      span.end();
      return result;
    } catch (error) {
      span.end(error instanceof Error ? error.message : String(error));
      throw error;
    }
  }

  /**
   * Exports what is left and stops; gives up after STOP_TIMEOUT_MS, so that a collector that
   * is away does not hold up a role's stop (the SDK would wait 30 s).
   */
  async stop(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const gaveUp = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, STOP_TIMEOUT_MS);
    });
    try {
      await Promise.race([this.provider.shutdown().catch(() => {}), gaveUp]);
    } finally {
      clearTimeout(timer);
    }
  }
}

function parentContext(traceparent: string) {
  const parsed = parseTraceparent(traceparent);
  if (!parsed) return ROOT_CONTEXT;
  return trace.setSpanContext(ROOT_CONTEXT, {
    traceId: parsed.traceId,
    spanId: parsed.spanId,
    traceFlags: parsed.flags,
    isRemote: true,
  });
}

function openSpan(span: Span): OpenSpan {
  const context = span.spanContext();
  return {
    traceparent: formatTraceparent({ traceId: context.traceId, spanId: context.spanId, flags: context.traceFlags }),
    end(error, attributes) {
      if (attributes) span.setAttributes(attributes);
      if (error) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
      span.end();
    },
  };
}

/** The role's tracing, or null when OTEL_EXPORTER_OTLP_ENDPOINT is unset. */
export function tracingFor(endpoint: string | undefined, role: TracingOptions["role"]): Tracing | null {
  return endpoint ? new Tracing({ endpoint, role }) : null;
}

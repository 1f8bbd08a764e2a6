// Experiment for issue 12 item 6 (held-up assignments): how long a message written on a
// grpc-js bidi stream (the coordinator's `call.write(Assign)`) takes to reach the other
// process's `data` handler, under Bun's node:http2, in the shapes the product produces:
// a steady trickle, bursts (a dispatch pass over many free slots), the worker answering each
// message with reports (Started, Finished with output tails) on the same connection, the
// worker's event loop blocked (spawning), and the worker not reading for a while.
// Usage: bun bench/experiments/stream-delay.ts [scenario...]; prints p50/p99/max delay (ms).
// The server is this process; the client is a child process, as a worker is.
import * as grpc from "@grpc/grpc-js";

const now = () => performance.timeOrigin + performance.now();
const bytes = (b: Buffer) => b;
const definition: grpc.ServiceDefinition = {
  connect: {
    path: "/exp.Exp/Connect",
    requestStream: true,
    responseStream: true,
    requestSerialize: bytes,
    requestDeserialize: bytes,
    responseSerialize: bytes,
    responseDeserialize: bytes,
  },
};
// The product's keepalive settings (src/coordinator/coordinator.ts, src/worker/worker.ts) at the test suite's heartbeat.
const keepalive = { "grpc.keepalive_time_ms": 1000, "grpc.keepalive_timeout_ms": 1000, "grpc.keepalive_permit_without_calls": 1 };

interface Scenario {
  name: string;
  /** Messages the server writes, and the gap between batches. */
  batches: number;
  perBatch: number;
  gapMs: number;
  /** Per message received, the client writes this many reply bytes (0: none). */
  replyBytes: number;
  /** Per message received, the client blocks its event loop this long. */
  blockMs: number;
  /** The client stops reading for this long after the first message (0: never). */
  pauseMs: number;
  /**
   * A second client on its own connection, sent the same messages, is frozen (SIGSTOP) this
   * long from 1 s in: does a stuck neighbour hold up the first client's messages?
   */
  frozenNeighbourMs?: number;
}

const SCENARIOS: Scenario[] = [
  { name: "trickle", batches: 400, perBatch: 1, gapMs: 5, replyBytes: 0, blockMs: 0, pauseMs: 0 },
  { name: "bursts of 200", batches: 10, perBatch: 200, gapMs: 300, replyBytes: 0, blockMs: 0, pauseMs: 0 },
  { name: "bursts + 2 KB replies", batches: 10, perBatch: 200, gapMs: 300, replyBytes: 2048, blockMs: 0, pauseMs: 0 },
  { name: "bursts + 130 KB replies", batches: 10, perBatch: 50, gapMs: 300, replyBytes: 130_000, blockMs: 0, pauseMs: 0 },
  { name: "trickle, client blocked 3 ms each", batches: 400, perBatch: 1, gapMs: 2, replyBytes: 256, blockMs: 3, pauseMs: 0 },
  { name: "bursts, client pauses 2 s", batches: 10, perBatch: 200, gapMs: 300, replyBytes: 0, blockMs: 0, pauseMs: 2000 },
  {
    name: "trickle, neighbour frozen 2.5 s",
    batches: 600,
    perBatch: 1,
    gapMs: 5,
    replyBytes: 0,
    blockMs: 0,
    pauseMs: 0,
    frozenNeighbourMs: 2500,
  },
  {
    name: "bursts, neighbour frozen 2.5 s",
    batches: 12,
    perBatch: 200,
    gapMs: 300,
    replyBytes: 0,
    blockMs: 0,
    pauseMs: 0,
    frozenNeighbourMs: 2500,
  },
];

function message(size: number): Buffer {
  const b = Buffer.alloc(size);
  b.writeDoubleLE(now(), 0);
  return b;
}

async function client(address: string, scenario: Scenario): Promise<void> {
  const Client = grpc.makeGenericClientConstructor(definition, "Exp");
  const c = new Client(address, grpc.credentials.createInsecure(), keepalive) as unknown as {
    connect(): grpc.ClientDuplexStream<Buffer, Buffer>;
    close(): void;
  };
  const stream = c.connect();
  const delays: number[] = [];
  const sentAt: number[] = [];
  const total = scenario.batches * scenario.perBatch;
  let paused = false;
  stream.on("data", (b: Buffer) => {
    delays.push(now() - b.readDoubleLE(0));
    sentAt.push(b.readDoubleLE(0));
    if (process.env.EXP_TRACE && delays.length % 50 === 0)
      console.error(`client ${process.pid}: ${delays.length} received, last delay ${delays.at(-1)?.toFixed(1)} ms`);
    if (scenario.blockMs > 0) {
      const until = performance.now() + scenario.blockMs;
      while (performance.now() < until) {}
    }
    if (scenario.replyBytes > 0) stream.write(message(scenario.replyBytes));
    if (scenario.pauseMs > 0 && !paused) {
      paused = true;
      stream.pause();
      setTimeout(() => stream.resume(), scenario.pauseMs);
    }
    if (delays.length === total) {
      process.stdout.write(`${JSON.stringify({ delays, sentAt })}\n`);
      stream.end();
      c.close();
      setTimeout(() => process.exit(0), 50);
    }
  });
  stream.on("error", (e) => console.error(`client ${process.pid}: ${e.message}`));
  if (process.env.EXP_TRACE) console.error(`client ${process.pid}: writing hello`);
  stream.write(message(64)); // hello
}

/** Delays of the messages sent while the neighbour was frozen, and of the others. */
let frozenWindow: [number, number] | null = null;

async function server(scenario: Scenario): Promise<{ delays: number[]; sentAt: number[] }> {
  const s = new grpc.Server(keepalive);
  let done: (d: { delays: number[]; sentAt: number[] }) => void = () => {};
  const result = new Promise<{ delays: number[]; sentAt: number[] }>((r) => (done = r));
  const clients = scenario.frozenNeighbourMs ? 2 : 1;
  const calls: grpc.ServerDuplexStream<Buffer, Buffer>[] = [];
  s.addService(definition, {
    connect: (call: grpc.ServerDuplexStream<Buffer, Buffer>) => {
      call.once("data", () => {
        calls.push(call);
        if (process.env.EXP_TRACE) console.error(`server: stream ${calls.length} of ${clients} joined`);
        if (calls.length < clients) return;
        void (async () => {
          for (let i = 0; i < scenario.batches; i++) {
            for (const c of calls) for (let j = 0; j < scenario.perBatch; j++) c.write(message(600));
            await Bun.sleep(scenario.gapMs);
          }
        })();
      });
      call.on("end", () => call.end());
      call.on("error", () => {});
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    s.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
  const child = Bun.spawn(["bun", import.meta.path, "--client", `127.0.0.1:${port}`, scenario.name], {
    stdout: "pipe",
    stderr: "inherit",
  });
  let neighbour: Bun.Subprocess | null = null;
  if (scenario.frozenNeighbourMs) {
    // Its delays are not counted: it only has to be connected, and then stuck.
    neighbour = Bun.spawn(["bun", import.meta.path, "--client", `127.0.0.1:${port}`, scenario.name], {
      stdout: "ignore",
      stderr: "inherit",
    });
    const frozen = neighbour;
    const holdMs = scenario.frozenNeighbourMs;
    void (async () => {
      while (calls.length < 2) await Bun.sleep(10);
      await Bun.sleep(1000);
      frozen.kill("SIGSTOP");
      const frozenAt = now();
      if (process.env.EXP_TRACE) console.error(`server: neighbour ${frozen.pid} frozen`);
      await Bun.sleep(holdMs);
      frozen.kill("SIGCONT");
      frozenWindow = [frozenAt, now()];
      if (process.env.EXP_TRACE) console.error(`server: neighbour ${frozen.pid} thawed`);
    })();
  }
  const out = await new Response(child.stdout).text();
  await child.exited;
  neighbour?.kill("SIGCONT");
  neighbour?.kill("SIGKILL");
  s.forceShutdown();
  done(JSON.parse(out.trim().split("\n").pop() ?? "{}") as { delays: number[]; sentAt: number[] });
  return result;
}

const pct = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN;

if (process.argv[2] === "--client") {
  const scenario = SCENARIOS.find((s) => s.name === process.argv[4]);
  if (!scenario) throw new Error(`no scenario ${process.argv[4]}`);
  await client(process.argv[3]!, scenario);
} else {
  const wanted = process.argv.slice(2);
  for (const scenario of SCENARIOS.filter((s) => wanted.length === 0 || wanted.includes(s.name))) {
    frozenWindow = null;
    const { delays, sentAt } = await server(scenario);
    const line = (label: string, values: number[]) => {
      const sorted = [...values].sort((a, b) => a - b);
      return `${label.padEnd(44)} n=${sorted.length} p50 ${pct(sorted, 50).toFixed(1)} p99 ${pct(sorted, 99).toFixed(1)} max ${(sorted.at(-1) ?? Number.NaN).toFixed(1)} ms`;
    };
    console.log(line(scenario.name, delays));
    const window = frozenWindow as [number, number] | null;
    if (window) {
      const during = delays.filter((_, i) => sentAt[i]! >= window[0] && sentAt[i]! <= window[1]);
      const outside = delays.filter((_, i) => sentAt[i]! < window[0] || sentAt[i]! > window[1]);
      console.log(line("  sent while the neighbour was frozen", during));
      console.log(line("  sent otherwise", outside));
    }
  }
}

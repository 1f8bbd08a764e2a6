// Dependencies: a DAG of 1,000 tasks end to end against 1,000 independent tasks, in the same
// run on the same cluster (one coordinator, one scheduler, four workers with two slots each, as
// the throughput bench). The DAG is a chain of layers: 10 layers of 100 `true` commands, each
// task after two of the layer before (i and i+1), submitted as one POST /tasks/batch with refs.
// The clock runs from the submit to the first poll that finds no unfinished task. The ratio
// says what the waiting, the releases and the ten-deep critical path cost against a flat queue.
import { connect } from "../src/db/sql";
import {
  type Bench,
  type BenchOptions,
  type BenchResult,
  createBenchDatabase,
  ms,
  PRODUCT_ROLE_ENV,
  requireAllSucceeded,
  Scope,
  startBenchCluster,
  untilAllFinal,
  within,
} from "./support";

const FULL = { layers: 10, width: 100, rounds: 2 };
const QUICK = { layers: 5, width: 20, rounds: 1 };
const WORKERS = 4;
const WORKER_SLOTS = 2;
const POLL_MS = 20;
const TIMEOUT_MS = 180_000;
/**
 * The product's settings, but a statement timeout long enough for a 1000-task batch on a
 * shared, loaded machine (both cases get it): at the default 5 s, such a batch's insert was
 * seen to time out under a load average of 20+ on two cores, the plain one as well as the DAG.
 */
const ROLE_ENV = { ...PRODUCT_ROLE_ENV, TQ_DB_STATEMENT_TIMEOUT_MS: "30000" };

interface Item {
  ref?: string;
  command: string;
  depends_on?: string[];
}

function layeredDag(layers: number, width: number): Item[] {
  const items: Item[] = [];
  for (let layer = 0; layer < layers; layer++) {
    for (let i = 0; i < width; i++) {
      const parents = layer === 0 ? [] : [`t${layer - 1}_${i}`, `t${layer - 1}_${(i + 1) % width}`];
      items.push({ ref: `t${layer}_${i}`, command: "true", ...(parents.length > 0 ? { depends_on: parents } : {}) });
    }
  }
  return items;
}

async function post(url: string, items: Item[]): Promise<void> {
  const response = await within(
    fetch(`${url}/tasks/batch`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ tasks: items }),
    }),
    30_000,
    "POST /tasks/batch",
  );
  if (response.status !== 201) throw new Error(`POST /tasks/batch answered ${response.status}: ${await response.text()}`);
}

async function run(options: BenchOptions): Promise<BenchResult> {
  const plan = options.quick ? QUICK : FULL;
  const tasks = plan.layers * plan.width;
  const scope = new Scope();
  try {
    const db = await createBenchDatabase(scope, (line) => console.log(`dependencies: ${line}`));
    const cluster = await startBenchCluster(scope, db.url, { workers: WORKERS, slots: WORKER_SLOTS, env: ROLE_ENV });
    const sql = connect(db.url, { max: 1 });
    scope.defer("close the bench's database connection", () => sql.end({ timeout: 5 }));

    const timed = async (items: Item[]) => {
      const began = performance.now();
      await post(cluster.schedulerUrl, items);
      const ended = await untilAllFinal(sql, POLL_MS, TIMEOUT_MS);
      await requireAllSucceeded(sql);
      return ended - began;
    };
    // Warm-up: the roles' first statements and the workers' first spawns.
    await timed(Array.from({ length: 50 }, () => ({ command: "true" })));
    const plain: number[] = [];
    const dag: number[] = [];
    for (let round = 0; round < plan.rounds; round++) {
      plain.push(await timed(Array.from({ length: tasks }, () => ({ command: "true" }))));
      dag.push(await timed(layeredDag(plan.layers, plan.width)));
      console.log(`dependencies: round ${round + 1}: independent ${ms(plain.at(-1)!)} ms, DAG ${ms(dag.at(-1)!)} ms`);
    }
    const best = (xs: number[]) => Math.min(...xs);
    const ratio = Math.round((best(dag) / best(plain)) * 100) / 100;
    const [released] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM task_events WHERE kind = 'released'`;
    return {
      name: "dependencies",
      description:
        `${tasks} tasks end to end as a DAG (${plan.layers} layers of ${plan.width}, each task after two of the layer before) ` +
        `against ${tasks} independent tasks, same cluster and run; best of ${plan.rounds}.`,
      settings: {
        tasks,
        layers: plan.layers,
        width: plan.width,
        rounds: plan.rounds,
        processes: { coordinator: 1, scheduler: 1, workers: WORKERS, worker_slots: WORKER_SLOTS },
        role_env: ROLE_ENV,
        database: db.postgres.source,
      },
      figures: {
        independent_ms: plain,
        dag_ms: dag,
        independent_tasks_per_s: Math.round(tasks / (best(plain) / 1000)),
        dag_tasks_per_s: Math.round(tasks / (best(dag) / 1000)),
        dag_over_independent: ratio,
        releases: released?.n ?? 0,
      },
      summary: [
        { metric: `${tasks} independent tasks, submit → all final`, value: `${ms(best(plain))} ms` },
        {
          metric: `${tasks}-task DAG (${plan.layers} layers), submit → all final (ratio ×${ratio})`,
          value: `${ms(best(dag))} ms`,
        },
      ],
      postgres: db.postgres,
    };
  } finally {
    await scope.close();
  }
}

export const dependencies: Bench = { name: "dependencies", run };
